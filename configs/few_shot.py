"""Few-shot MAEDAY: LoRA-adapt the MAE on k normal shots per category, then score.

Per category and per seed (default 3 seeds): choose `shots` normal training images from
the seed, fine-tune (LoRA rank 32 on every weight matrix, SGD lr 1e-2, momentum 0.9,
weight decay 0.05, 50 steps of 32 augmented, masked copies), merge, and score the test
split exactly as the zero-shot job. Reports give mean ± std over the seeds.

  python -m maeday_jax.main --config configs/few_shot.py --workdir runs/few_shot

Methods: --config.method=maeday (default), patchcore, ensemble (MAEDAY + PatchCore, the
paper's best result), patchcore_x2, or several at once, e.g.
--config.method=maeday,patchcore,patchcore_x2,ensemble (the paper's Table 1/2 columns,
written side by side in metrics.md; each method's outputs under seed_<s>/<method>/).
PatchCore needs ImageNet backbone weights (--config.patchcore.backbone=wide_resnet50_2,
downloaded once); with random weights its figures are meaningless.

Overrides: --config.shots=4, --config.seeds=0,1,2, --config.lora.rank=16,
--config.train.steps=100, --config.finetune=full (paper Table 4: all weights, lr 1e-4),
--config.train.learning_rate=..., --config.lora.compute=weights (the same training, computed
on W + A B instead of the activations; for comparisons), and every zero-shot field (model,
data, num_masks...).
`configs/few_shot.py:runlocal` is a smoke test on the tiny random-weight model.

Every setting has one home: the training settings live in `config.train`, and the
shortcuts `config.finetune` and `config.lora.*` are references to `config.train.finetune`
and `config.train.lora.*` (setting either spelling sets both).
"""

import ml_collections

from maeday_jax import defaults
from maeday_jax.detectors.anomalydino import anomalydino_section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = defaults.zero_shot_config(arg)
  config.job = "few_shot"
  config.shots = 1
  config.seeds = (0, 1, 2)  # Shot selections; the same seed gives the same shots everywhere.
  config.heldout_normals = 8  # Normal train images (not shots) to measure the adaptation.
  config.train = train = defaults.few_shot_train_config()
  config.finetune = train.get_ref("finetune")
  config.lora = ml_collections.ConfigDict({name: train.lora.get_ref(name) for name in train.lora})
  config.outputs.overlays = False  # Three seeds x every image: panels only by default.
  # One method or several, comma-separated, on the same shots: maeday, patchcore,
  # ensemble (MAEDAY + PatchCore), patchcore_x2 (two PatchCore banks), anomalydino,
  # maeday_anomalydino (MAEDAY + AnomalyDINO).
  config.method = "maeday"
  config.patchcore = defaults.patchcore_config()
  config.anomalydino = anomalydino_section()
  # Ensembles: sum standardised maps and scores (statistics of the held-out normal
  # training images), or the raw sum (normalize=False) as the paper writes it.
  config.ensemble = ml_collections.ConfigDict(dict(normalize=True))
  if arg == "runlocal":
    config.seeds = (0, 1)
    config.train.steps = 4
    config.train.batch_size = 8
    config.lora.rank = 4
    config.patchcore.backbone = defaults.RANDOM_WEIGHTS
    config.patchcore.variant = "test_wide"
    config.patchcore.image_size = 32  # The tiny MAE's input size: ensembles need one.
    # 16 patches per 32 px shot: keep half, so the image score's neighbourhood is not a
    # single bank row (whose re-weighting would make every score 0).
    config.patchcore.coreset_ratio = 0.5
    config.anomalydino.backbone = "dinov2_test"
    config.anomalydino.checkpoint = defaults.RANDOM_WEIGHTS
    config.anomalydino.image_size = 56
    config.anomalydino.rotations = (0, 90)
  return config
