"""MAE pre-training in JAX: train (or continue) an MAE on normal images, then score.

    from maeday_jax import pretrain
    summary = pretrain.train(config, workdir)    # configs/pretrain.py, configs/pretrain_mt.py
    model, params = checkpoints.load_mae(f"{workdir}/model")

(The command-line job around it, `configs/pretrain.py`, is `maeday_jax.jobs.pretrain`.)

The official recipe (He et al., 2022): AdamW (0.9, 0.95), weight decay 0.05 on kernels
only, lr = base_lr * batch / 256 with warm-up and cosine decay, mask ratio 0.75, loss on
the removed patches, random resized crop + flip (on device). One jitted, donated,
data-parallel step; Orbax checkpoints with resume (`maeday_jax.training`); JSONL + PNG
curves; the result is exported in the converted Orbax format every loader accepts.

Modules: `optim` (schedule, decay mask, optimiser), `augmentation` (crops and flips),
`inputs` (training images and batch order), `step` (loss and train step), `logs`,
`loop` (`train`), `evaluate` (zero-shot image AUROC, pixel AUROC, AUPRO).
"""

from maeday_jax.pretrain.evaluate import evaluate_split, evaluate_zero_shot
from maeday_jax.pretrain.loop import train

__all__ = ["evaluate_split", "evaluate_zero_shot", "train"]
