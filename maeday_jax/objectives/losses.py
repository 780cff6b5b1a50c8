"""Training losses: MAE reconstruction errors, MALA's (L1, SSIM, segmentation focal and L1), BCE,
Dice (APRIL-GAN's adapters: focal + Dice).

Stage 1 (the MAE) minimises `a1 * l1 + a2 * ssim_loss + a3 * CE`, CE being the pseudo-label
predictor's verdict (`plpm.adversarial_loss`); stage 2 (the segmenter) minimises
`b1 * segmentation_l1 + b2 * focal_loss` against the synthetic defect mask.

Segmenter outputs are 2-channel logits (B, H, W, 2): channel 0 = anomaly, channel 1 =
normal, a softmax over the channels. Every loss is a mean (a scalar), pure `jax.numpy`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from maeday_jax.objectives import ssim as ssim_lib


def l1(pred: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean absolute error; with `weights` (broadcastable to pred), the weighted mean.

  The weighted mean is sum(w |pred - target|) / sum(w) over the broadcast shape, and 0
  where every weight is 0.
  """
  error = jnp.abs(pred - target)
  if weights is None:
    return error.mean()
  weights = jnp.broadcast_to(jnp.asarray(weights, error.dtype), error.shape)
  total = weights.sum()
  # The guarded division keeps the value and the gradient finite for all-zero weights.
  return jnp.where(total > 0, (weights * error).sum() / jnp.where(total > 0, total, 1), 0.0)


def patch_targets(model, images: jax.Array, norm_pix_loss: bool) -> jax.Array:
  """Pixel targets (B, L, p*p*C) of an MAE, optionally normalised per patch (eps 1e-6, official)."""
  target = model.patchify(images)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def reconstruction_errors(
  model,
  params,
  images: jax.Array,
  noise: jax.Array,
  mask_ratio: float,
  *,
  norm_pix_loss: bool = False,
  pixel_loss: str = "mse",
) -> tuple[jax.Array, jax.Array]:
  """An MAE's reconstruction of every patch and its error per value, before any mean.

  `model` is a `models.MaskedAutoencoder` (anything with its `apply` and `patchify`);
  `images` (B, H, W, C) normalised, `noise` (B, L) sets the masks. Returns the prediction
  `pred` (B, L, p*p*C) and `(pred - target)**2` ('mse') or `|pred - target|` ('l1') of
  the same shape, the target being `patch_targets` of the images in float32. The MAE
  pre-training loss and the few-shot loss reduce these errors their own ways.
  """
  pred = model.apply({"params": params}, images, noise=noise, mask_ratio=mask_ratio)
  target = patch_targets(model, images.astype(jnp.float32), norm_pix_loss)
  error = (pred - target) ** 2 if pixel_loss == "mse" else jnp.abs(pred - target)
  return pred, error


def ssim_loss(pred: jax.Array, target: jax.Array, data_range, **options) -> jax.Array:
  """Mean over the batch of 1 - SSIM (`ssim.ssim`, scikit-image's Gaussian SSIM).

  `pred`, `target`: (B, H, W, C); `data_range`: their value range, scalar or (B,);
  `options`: `ssim.ssim`'s window settings (win_size, sigma, k1, k2).
  """
  return jnp.mean(1.0 - ssim_lib.ssim(pred, target, data_range=data_range, **options))


def _two_channels(logits: jax.Array, target_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  logits = jnp.asarray(logits)
  if logits.shape[-1] != 2:
    raise ValueError(f"Segmentation logits need 2 channels (anomaly, normal), got {logits.shape}.")
  if jnp.shape(target_mask) != logits.shape[:-1]:
    raise ValueError(
      f"The mask {jnp.shape(target_mask)} must be the logits' shape {logits.shape} without "
      "the channel axis."
    )
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return logits, jnp.asarray(target_mask, logits.dtype)


def focal_loss(
  logits: jax.Array,
  target_mask: jax.Array,
  *,
  gamma: float = 2.0,
  alpha: float | Sequence[float] | None = None,
) -> jax.Array:
  """Focal loss (Lin et al. 2017, as DRAEM trains its segmenter), mean over pixels.

  Per pixel, with p = softmax(logits) and the target distribution q = [mask, 1 - mask]
  (channel 0 = anomaly): `-sum_k alpha_k q_k (1 - p_k)^gamma log p_k`. For a binary mask
  this is `-alpha_t (1 - p_t)^gamma log p_t`; gamma 0 and no alpha is the cross-entropy.
  (DRAEM binarises the mask and clamps the one-hot target at 1e-5; neither is done here.)

  Args:
    logits: (..., 2) segmentation logits.
    target_mask: (...) in [0, 1], 1 = anomalous.
    gamma: the focusing exponent (>= 0): well-classified pixels count less.
    alpha: None (no class weights); a float: weight alpha on the anomaly class and
      1 - alpha on the normal class (Lin et al.'s alpha-balancing); or the two class
      weights (anomaly, normal).
  """
  logits, mask = _two_channels(logits, target_mask)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  target = jnp.stack([mask, 1.0 - mask], axis=-1)
  # With two classes 1 - p_k is the other class's probability, so (1 - p_k)^gamma is
  # exp(gamma * log p_other): exact where p_k rounds to 1, and with a finite gradient.
  modulating = jnp.exp(gamma * log_p[..., ::-1])
  per_class = target * modulating * log_p
  if alpha is not None:
    weights = [alpha, 1.0 - alpha] if isinstance(alpha, (int, float)) else list(alpha)
    if len(weights) != 2:
      raise ValueError(f"focal_loss alpha needs 2 class weights, got {alpha!r}.")
    per_class = per_class * jnp.asarray(weights, logits.dtype)
  return -per_class.sum(axis=-1).mean()


def segmentation_l1(logits: jax.Array, target_mask: jax.Array) -> jax.Array:
  """Mean |softmax(logits)[..., 0] - mask|: the anomaly probability's L1 error per pixel."""
  logits, mask = _two_channels(logits, target_mask)
  return jnp.abs(jax.nn.softmax(logits, axis=-1)[..., 0] - mask).mean()


def binary_cross_entropy_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean binary cross-entropy of sigmoid(logits) against labels in [0, 1].

  Written as max(z, 0) - z y + log(1 + exp(-|z|)), which never overflows and is exact for
  hard labels at large |z|.
  """
  logits = jnp.asarray(logits)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  labels = jnp.asarray(labels, logits.dtype)
  per_item = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return per_item.mean()


def dice_loss(probabilities: jax.Array, target_mask: jax.Array, smooth: float = 1.0) -> jax.Array:
  """Binary Dice loss, per image then averaged (APRIL-GAN's `BinaryDiceLoss`).

  1 - mean_b (2 sum(p m) + smooth) / (sum p + sum m + smooth), sums over each image's
  pixels; `smooth` keeps an image without defect pixels (and a near-zero prediction) from
  dividing by zero, and gives it a loss near 0 rather than 1.

  Args:
    probabilities: (B, ...) predicted defect probabilities in [0, 1].
    target_mask: (B, ...) in [0, 1], 1 = anomalous.
  """
  p = jnp.asarray(probabilities)
  p = p.astype(jnp.promote_types(p.dtype, jnp.float32)).reshape(p.shape[0], -1)
  m = jnp.asarray(target_mask, p.dtype).reshape(p.shape[0], -1)
  dice = (2.0 * (p * m).sum(axis=1) + smooth) / (p.sum(axis=1) + m.sum(axis=1) + smooth)
  return 1.0 - dice.mean()
