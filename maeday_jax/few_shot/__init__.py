"""Few-shot adaptation: fine-tune the MAE on the k normal shots, then score zero-shot.

Spec §1: LoRA (rank 32) on every weight matrix, base weights frozen; SGD with learning
rate 1e-2, momentum 0.9 and PyTorch-style weight decay 0.05; 50 iterations of batch 32,
the shots repeated to fill the batch, every copy with its own random mask (ratio 0.75)
and its own random crop and rotation; loss = MSE between the decoder output and the
pixel target over all patches. The Table 4 ablation fine-tunes all weights instead
(`finetune='full'`, learning rate 1e-4).

    config = few_shot.get_train_config()
    merged, history = few_shot.adapt(model, params, shots, key, config, workdir=workdir)
    maps = zero_shot.anomaly_maps(model, merged, images, key)

Modules: `strategy` (what is trained: LoRA or all weights; split, loss, merge), `loss`
(the reconstruction objective, held-out loss), `optimizer` (PyTorch-equal SGD), `step`
(the on-device batch and the compiled, donated, data-parallel update), `adapt` (the
resumable loop, export of the merged model).
"""

from maeday_jax.few_shot.adapt import CHECKPOINT_DIR, MERGED_DIR, adapt
from maeday_jax.few_shot.loss import as_model_input, heldout_loss, reconstruction_loss
from maeday_jax.few_shot.optimizer import learning_rate, make_optimizer
from maeday_jax.few_shot.step import (
  StepSettings,
  initial_state,
  lower_train_step,
  make_train_step,
  training_batch,
)
from maeday_jax.few_shot.strategy import FullFineTune, LoRA, Strategy
from maeday_jax.settings.few_shot import FINETUNE_MODES, LORA_COMPUTE_MODES
from maeday_jax.settings.few_shot import few_shot_train_config as get_train_config

__all__ = [
  "CHECKPOINT_DIR",
  "FINETUNE_MODES",
  "LORA_COMPUTE_MODES",
  "MERGED_DIR",
  "FullFineTune",
  "LoRA",
  "StepSettings",
  "Strategy",
  "adapt",
  "as_model_input",
  "get_train_config",
  "heldout_loss",
  "initial_state",
  "learning_rate",
  "lower_train_step",
  "make_optimizer",
  "make_train_step",
  "reconstruction_loss",
  "training_batch",
]
