"""The MALA segmenter: an MAE whose decoder predicts a two-channel defect map.

The image goes through the (frozen) MAE encoder unmasked. The Token Balance Module
(equation 5 of the paper) joins the first and the last encoder layer's tokens, projects
them to the decoder width, joins that with the decoder's last layer and projects every
patch token to a p x p x 2 map: channel 0 = defect, channel 1 = normal (softmax over
the two).

    segmenter = Segmenter(mae)
    params = segmenter_params(segmenter, mae_params, key)     # {"mae": ..., TBM layers}
    logits = segmenter.apply({"params": params}, images)      # (B, H, W, 2)

Saving and loading a trained one: `maeday_jax.mala.segmenter_io`. Scoring with it
(pooled maximum, the data-parallel scorer): `maeday_jax.mala.segmenter`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from maeday_jax.models import patches
from maeday_jax.models.vit_mae import MaskedAutoencoder

__all__ = [
  "ENCODER_PARAMS",
  "Segmenter",
  "is_frozen",
  "merge",
  "segmenter_params",
  "split_frozen",
]

# Parameters of the MAE encoder: frozen in stage 2 (the decoder and the TBM train).
ENCODER_PARAMS = ("patch_embed", "cls_token", "pos_embed", "norm")


class Segmenter(nn.Module):
  """MAE encoder + decoder + Token Balance Module -> (B, H, W, 2) defect logits.

  Attributes:
    mae: the MAE (its parameters live under "mae").
  """

  mae: MaskedAutoencoder

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    mae = self.mae
    batch, length = images.shape[0], mae.num_patches
    order = jnp.broadcast_to(jnp.arange(length), (batch, length))  # Every patch, in place.
    first, last = mae.encode_tokens(images, order)
    # The encoder is frozen: no gradient flows into it (and none is computed).
    first, last = jax.lax.stop_gradient(first), jax.lax.stop_gradient(last)
    decoded = mae.decode_tokens(last, order)  # (B, 1 + L, decoder width)
    width = mae.decoder_embed_dim
    balanced = nn.Dense(width, dtype=mae.dtype, name="token_balance_encoder")(
      jnp.concatenate([first, last], axis=-1)
    )
    logits = nn.Dense(mae.patch_size**2 * 2, dtype=mae.dtype, name="token_balance_head")(
      jnp.concatenate([balanced, decoded.astype(balanced.dtype)], axis=-1)
    )
    return patches.unpatchify(logits[:, 1:].astype(jnp.float32), mae.patch_size, 2)


def segmenter_params(segmenter: Segmenter, mae_params, key: jax.Array) -> dict:
  """The segmenter's parameters: `mae_params` under "mae", fresh Token Balance layers."""
  mae = segmenter.mae
  images = jnp.zeros((1, mae.img_size, mae.img_size, mae.in_chans), jnp.float32)
  initialised = jax.jit(lambda k: segmenter.init(k, images)["params"])(key)
  return {"mae": mae_params, **{k: v for k, v in initialised.items() if k != "mae"}}


def is_frozen(path: tuple[str, ...]) -> bool:
  """Whether a flattened parameter path belongs to the frozen encoder (or a fixed table)."""
  if path[0] != "mae":
    return False
  name = path[1]
  return name in ENCODER_PARAMS or name.startswith("blocks_") or name == "decoder_pos_embed"


def split_frozen(params) -> tuple[dict, dict]:
  """(frozen, trainable) trees: the MAE encoder and fixed tables, and everything else."""
  flat = traverse_util.flatten_dict(params)
  frozen = {p: v for p, v in flat.items() if is_frozen(p)}
  trainable = {p: v for p, v in flat.items() if not is_frozen(p)}
  return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(trainable)


def merge(frozen, trainable) -> dict:
  """The inverse of `split_frozen`."""
  flat = {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)}
  return traverse_util.unflatten_dict(flat)
