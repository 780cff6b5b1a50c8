"""Few-shot MAEDAY: LoRA-adapt the MAE on k normal shots per category, then score.

Per category and per seed (default 3 seeds): choose `shots` normal training images from
the seed, fine-tune (LoRA rank 32 on every weight matrix, SGD lr 1e-2, momentum 0.9,
weight decay 0.05, 50 steps of 32 augmented, masked copies), merge, and score the test
split exactly as the zero-shot job. Reports give mean ± std over the seeds.

  python -m maeday_jax.main --config configs/few_shot.py --workdir runs/few_shot

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
  if arg == "runlocal":
    config.seeds = (0, 1)
    config.train.steps = 4
    config.train.batch_size = 8
    config.lora.rank = 4
  return config
