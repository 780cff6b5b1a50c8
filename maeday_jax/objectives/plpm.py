"""MALA's pseudo-label prediction module (PLPM): a small convolutional discriminator.

It tells original images (label 0) from the MAE's reconstructions (label 1). Trained
adversarially: the discriminator minimises `discriminator_loss`, and the MAE adds
`adversarial_loss` (the CE term of its stage-1 loss) so that its reconstructions are
predicted to be originals. Parameters are a plain Flax parameter tree; every function
here is pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maeday_jax.objectives.losses import binary_cross_entropy_with_logits

DEFAULT_WIDTHS = (32, 64, 128, 256)


class PseudoLabelPredictor(nn.Module):
  """Stride-2 3x3 convolutions with LeakyReLU, global average pool, Dense(1).

  Takes (B, H, W, 3) images of any size (16 px or more keeps every stage above one pixel
  with the default 4 stages) and returns (B,) logits of the probability that each image
  is a reconstruction. Parameters: `conv_<i>/{kernel,bias}` per stage, `head/{kernel,bias}`.

  Attributes:
    widths: output channels of each convolution (one stage per entry).
    negative_slope: the LeakyReLU slope for negative inputs.
  """

  widths: Sequence[int] = DEFAULT_WIDTHS
  negative_slope: float = 0.2

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = jnp.asarray(images, jnp.float32)
    for i, width in enumerate(self.widths):
      # Explicit symmetric padding of 1 (PyTorch's Conv2d(3, stride=2, padding=1)):
      # 'SAME' would pad stride-2 convolutions on one side only.
      x = nn.Conv(width, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name=f"conv_{i}")(x)
      x = nn.leaky_relu(x, negative_slope=self.negative_slope)
    x = x.mean(axis=(1, 2))
    return nn.Dense(1, name="head")(x)[:, 0]


def init_plpm(
  key: jax.Array, image_size: int | tuple[int, int], widths: Sequence[int] = DEFAULT_WIDTHS
) -> tuple[PseudoLabelPredictor, Any]:
  """A `PseudoLabelPredictor` and its freshly initialised parameters.

  Args:
    key: PRNG key for the initialisation.
    image_size: H (square) or (H, W) of the images it will judge.
    widths: output channels of each convolution stage.
  """
  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  model = PseudoLabelPredictor(widths=tuple(widths))
  # Compiled: one program instead of one dispatch (and compilation) per initialiser op.
  variables = jax.jit(model.init)(key, jnp.zeros((1, height, width, 3), jnp.float32))
  return model, variables["params"]


def discriminator_loss(
  d_params: Any, model: PseudoLabelPredictor, originals: jax.Array, reconstructions: jax.Array
) -> jax.Array:
  """BCE of the discriminator: originals -> 0, reconstructions -> 1 (mean over both sets).

  The reconstructions go through `stop_gradient`: this loss trains the discriminator only,
  never the MAE that produced them.
  """
  reconstructions = jax.lax.stop_gradient(jnp.asarray(reconstructions, jnp.float32))
  images = jnp.concatenate([jnp.asarray(originals, jnp.float32), reconstructions])
  # One forward pass over both sets (one batch, one compiled convolution per stage).
  logits = model.apply({"params": d_params}, images)
  labels = jnp.concatenate([jnp.zeros(len(originals)), jnp.ones(len(reconstructions))])
  return binary_cross_entropy_with_logits(logits, labels)


def adversarial_loss(
  d_params: Any, model: PseudoLabelPredictor, reconstructions: jax.Array
) -> jax.Array:
  """BCE of the reconstructions against label 0 ('original'): MALA's CE term for the MAE.

  Minimising it makes the reconstructions look like originals to the discriminator. The
  discriminator's parameters go through `stop_gradient`, so this term never trains the
  discriminator (its gradient w.r.t. `d_params` is zero), even if taken jointly.
  """
  logits = model.apply({"params": jax.lax.stop_gradient(d_params)}, reconstructions)
  return binary_cross_entropy_with_logits(logits, jnp.zeros(logits.shape))
