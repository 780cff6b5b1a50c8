"""The MAE loss and one jitted, donated, data-parallel training step."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from maeday_jax import imagenet, parallel, training
from maeday_jax.models import MaskedAutoencoder, masking
from maeday_jax.objectives import losses, plpm
from maeday_jax.objectives.losses import patch_targets as patch_targets  # moved; re-exported
from maeday_jax.pretrain import augmentation, optim

LOSSES = ("masked", "all")
PIXEL_LOSSES = ("mse", "l1")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What the reconstruction loss compares.

  The official MAE loss is `pixel_loss='mse'` alone. MALA's stage 1 (`maeday_jax.mala`)
  is `pixel_weight * L1 + ssim_weight * (1 - SSIM) + adversarial_weight * CE`, where CE
  is the pseudo-label predictor's (`objectives.plpm`) cross-entropy of the reconstructions
  against the label 'original', the predictor being trained alongside to tell originals
  from reconstructions. SSIM and CE compare whole reconstructed images in [0, 1].

  Attributes:
    mask_ratio: fraction of patches removed from each training image.
    loss: 'masked' (official MAE: mean over removed patches only) or 'all' (every
      patch, as MAEDAY's scoring and few-shot fine-tuning use the reconstruction of all).
    norm_pix_loss: targets normalised per patch (official option; better features, but
      the model then predicts normalised patches, not pixels: leave it off for scoring).
    pixel_loss: 'mse' (official) or 'l1' per pixel, over the patches `loss` selects.
    pixel_weight, ssim_weight, adversarial_weight: the weights of the three terms (0
      turns a term off; the pseudo-label predictor exists only when the last is > 0).
  """

  mask_ratio: float = 0.75
  loss: str = "masked"
  norm_pix_loss: bool = False
  pixel_loss: str = "mse"
  pixel_weight: float = 1.0
  ssim_weight: float = 0.0
  adversarial_weight: float = 0.0

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"train.loss must be one of {LOSSES}, got {self.loss!r}.")
    if self.pixel_loss not in PIXEL_LOSSES:
      raise ValueError(f"train.pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}.")
    if self.norm_pix_loss and (self.ssim_weight or self.adversarial_weight):
      raise ValueError(
        "train.norm_pix_loss predicts normalised patches, not images: the SSIM and "
        "adversarial terms need images; turn one of them off."
      )
    masking.num_visible(1, self.mask_ratio)  # Validates the ratio.

  @property
  def adversarial(self) -> bool:
    return self.adversarial_weight > 0


def mae_loss(
  model: MaskedAutoencoder,
  params: Any,
  images: jax.Array,
  noise: jax.Array,
  config: LossConfig,
) -> jax.Array:
  """The reconstruction loss without an adversarial term (see `reconstruction_loss`)."""
  return reconstruction_loss(model, params, images, noise, config)[0]


def reconstruction_loss(
  model: MaskedAutoencoder,
  params: Any,
  images: jax.Array,
  noise: jax.Array,
  config: LossConfig,
  predictor_params: Any = None,
  predictor: plpm.PseudoLabelPredictor | None = None,
):
  """(loss, (terms, reconstructions in [0, 1] or None)) of one batch.

  The pixel term is the mean squared (or absolute) error per pixel, averaged over the
  removed (or all) patches; the SSIM and adversarial terms, when weighted, compare the
  whole reconstructed images.
  """
  pred, error = losses.reconstruction_errors(
    model,
    params,
    images,
    noise,
    config.mask_ratio,
    norm_pix_loss=config.norm_pix_loss,
    pixel_loss=config.pixel_loss,
  )
  per_patch = jnp.mean(error, axis=-1)
  if config.loss == "all":
    pixel = per_patch.mean()
  else:
    removed = masking.from_noise(noise, config.mask_ratio).mask
    pixel = jnp.sum(per_patch * removed) / jnp.sum(removed)
  terms = {"pixel": pixel}
  total = config.pixel_weight * pixel
  recon = None
  if config.ssim_weight or config.adversarial:
    # Images in [0, 1]: what SSIM's constants and the predictor expect.
    recon = _to_unit(model.unpatchify(pred))
    if config.ssim_weight:
      terms["ssim"] = losses.ssim_loss(recon, _to_unit(images), data_range=1.0)
      total = total + config.ssim_weight * terms["ssim"]
    if config.adversarial:
      terms["adversarial"] = plpm.adversarial_loss(predictor_params, predictor, recon)
      total = total + config.adversarial_weight * terms["adversarial"]
  return total, (terms, recon)


def _to_unit(x: jax.Array) -> jax.Array:
  """Normalised images -> [0, 1] RGB, differentiably (no rounding)."""
  mean, std = jnp.asarray(imagenet.IMAGENET_MEAN), jnp.asarray(imagenet.IMAGENET_STD)
  return x * std + mean


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
  # A light predictor, trained on a few images a step: convolution gradients are the
  # slowest part of a step on CPUs, and telling blur from detail needs little capacity.
  predictor_widths: tuple[int, ...] = (16, 32, 64, 128)
  predictor_lr: float = 2e-4
  predictor_batch: int = 8
  seed: int = 0

  def predictor(self) -> plpm.PseudoLabelPredictor:
    return plpm.PseudoLabelPredictor(widths=tuple(self.predictor_widths))

  def predictor_optimizer(self) -> optax.GradientTransformation:
    return optax.adam(self.predictor_lr, b1=0.5, b2=0.999)  # The usual GAN setting.


@functools.lru_cache(maxsize=8)
def _compiled_init(spec: TrainSpec, mesh):
  optimizer = spec.optimizer.make()

  def init(params):
    state = training.init_state(params, optimizer)
    if spec.loss.adversarial:
      size = spec.model.img_size
      _, d_params = plpm.init_plpm(jax.random.key(spec.seed), size, spec.predictor_widths)
      state["predictor"] = {
        "params": d_params,
        "opt_state": spec.predictor_optimizer().init(d_params),
      }
    return state

  return jax.jit(init, out_shardings=parallel.replicated(mesh))


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
  predictor, d_optimizer = spec.predictor(), spec.predictor_optimizer()
  augment_options = dict(spec.augment)

  def step(state, images_u8, key):
    step_key = jax.random.fold_in(key, state["step"])
    k_aug, k_mask = jax.random.split(step_key)
    images = augmentation.augment_batch(k_aug, images_u8, model.img_size, **augment_options)
    noise = masking.random_noise(k_mask, images.shape[:1], model.num_patches)
    d_state = state.get("predictor")
    d_params = None if d_state is None else d_state["params"]
    (loss, (terms, recon)), grads = jax.value_and_grad(
      reconstruction_loss, argnums=1, has_aux=True
    )(model, state["params"], images, noise, loss_config, d_params, predictor)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": loss,
      "learning_rate": schedule(state["step"]),
      "grad_norm": optax.tree.norm(grads),
    }
    if len(terms) > 1:
      metrics.update({f"loss_{name}": value for name, value in terms.items()})
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if d_state is not None:
      # The predictor learns to tell originals (0) from these reconstructions (1).
      n = spec.predictor_batch
      d_loss, d_grads = jax.value_and_grad(plpm.discriminator_loss)(
        d_params, predictor, _to_unit(images[:n]), recon[:n]
      )
      d_updates, d_opt = d_optimizer.update(d_grads, d_state["opt_state"], d_params)
      new_state["predictor"] = {
        "params": optax.apply_updates(d_params, d_updates),
        "opt_state": d_opt,
      }
      metrics["loss_predictor"] = d_loss
    return new_state, metrics

  whole, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(
    step,
    in_shardings=(whole, data, whole),
    out_shardings=(whole, whole),
    donate_argnums=0,
  )
