"""The MAE loss and one jitted, donated, data-parallel training step."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from maeday_jax import parallel, training
from maeday_jax.models import MaskedAutoencoder, masking
from maeday_jax.pretrain import augmentation, optim

LOSSES = ("masked", "all")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What the reconstruction loss compares.

  Attributes:
    mask_ratio: fraction of patches removed from each training image.
    loss: 'masked' (official MAE: mean over removed patches only) or 'all' (every
      patch, as MAEDAY's scoring and few-shot fine-tuning use the reconstruction of all).
    norm_pix_loss: targets normalised per patch (official option; better features, but
      the model then predicts normalised patches, not pixels: leave it off for scoring).
  """

  mask_ratio: float = 0.75
  loss: str = "masked"
  norm_pix_loss: bool = False

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"train.loss must be one of {LOSSES}, got {self.loss!r}.")
    masking.num_visible(1, self.mask_ratio)  # Validates the ratio.


def patch_targets(model: MaskedAutoencoder, images: jax.Array, norm_pix_loss: bool) -> jax.Array:
  """Pixel targets (B, L, p*p*C), optionally normalised per patch (eps 1e-6, official)."""
  target = model.patchify(images)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def mae_loss(
  model: MaskedAutoencoder,
  params: Any,
  images: jax.Array,
  noise: jax.Array,
  config: LossConfig,
) -> jax.Array:
  """Mean squared error per pixel, averaged over the removed (or all) patches."""
  pred = model.apply({"params": params}, images, noise=noise, mask_ratio=config.mask_ratio)
  target = patch_targets(model, images, config.norm_pix_loss)
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  if config.loss == "all":
    return per_patch.mean()
  removed = masking.from_noise(noise, config.mask_ratio).mask
  return jnp.sum(per_patch * removed) / jnp.sum(removed)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """What a compiled training step depends on (hashable: steps are cached on it).

  Attributes:
    model: the MAE.
    optimizer: learning-rate schedule and AdamW settings.
    loss: mask ratio and loss options.
    augment: `augmentation.augment_image` options as sorted (name, value) pairs.
  """

  model: MaskedAutoencoder
  optimizer: optim.OptimizerConfig
  loss: LossConfig = LossConfig()
  augment: tuple[tuple[str, Any], ...] = ()


@functools.lru_cache(maxsize=8)
def _compiled_init(spec: TrainSpec, mesh):
  optimizer = spec.optimizer.make()
  return jax.jit(
    lambda p: training.init_state(p, optimizer), out_shardings=parallel.replicated(mesh)
  )


def replicated_init_state(params: Any, spec: TrainSpec, mesh) -> dict:
  """`training.init_state`, compiled (once per spec) and placed on every device of `mesh`.

  (Run op by op, the optimiser initialisation dispatches one small program per leaf.)
  """
  return _compiled_init(spec, mesh)(params)


# Cached so that repeated runs in one process (a sweep, a resumed run, the tests) compile
# the step once.
@functools.lru_cache(maxsize=8)
def make_train_step(spec: TrainSpec, mesh):
  """Returns `step(state, images_u8, key) -> (state, metrics)`, jitted over `mesh`.

  `images_u8` (B, H, W, 3) uint8 is split over the mesh's data axis; `state` and `key`
  are replicated and the state is donated (updated in place). The randomness of step t
  is `fold_in(key, t)`: augmentation and masks depend only on the key, the step and the
  example's row, never on the device count, so a resumed run repeats an uninterrupted
  one. Metrics: loss, learning rate and gradient norm of the step.
  """
  model, loss_config = spec.model, spec.loss
  optimizer, schedule = spec.optimizer.make(), spec.optimizer.schedule()
  augment_options = dict(spec.augment)

  def step(state, images_u8, key):
    step_key = jax.random.fold_in(key, state["step"])
    k_aug, k_mask = jax.random.split(step_key)
    images = augmentation.augment_batch(k_aug, images_u8, model.img_size, **augment_options)
    noise = masking.random_noise(k_mask, images.shape[:1], model.num_patches)
    loss, grads = jax.value_and_grad(mae_loss, argnums=1)(
      model, state["params"], images, noise, loss_config
    )
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": loss,
      "learning_rate": schedule(state["step"]),
      "grad_norm": optax.tree.norm(grads),
    }
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  whole, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(
    step,
    in_shardings=(whole, data, whole),
    out_shardings=(whole, whole),
    donate_argnums=0,
  )
