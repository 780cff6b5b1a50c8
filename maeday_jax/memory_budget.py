"""How many masks to reconstruct at once: images x masks as large a batch as memory holds.

Zero-shot scoring runs every (image, mask) pair of a batch through the MAE; one pass
over all of them fills an accelerator best, but ViT-L at 32 masks and a large batch of
images needs more activation memory than a chip has. `mask_batch_size` estimates the
peak activation memory of one (image, mask) pair from the architecture and picks the
largest number of masks per pass that fits in a share of the device's free memory.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from maeday_jax.models import MaskedAutoencoder, masking

log = logging.getLogger("maeday_jax")

# Share of the free memory the activations may take: XLA's temporaries, fragmentation
# and the input pipeline's buffers need the rest.
MEMORY_FRACTION = 0.5
# The estimate counts the tensors one block holds at its peak; XLA keeps some more
# alive (fusion temporaries, the next block's inputs): a safety factor over it.
_SAFETY = 2.0


def _block_peak_bytes(tokens: int, width: int, heads: int, mlp_ratio: float, itemsize: int):
  """Live bytes of one transformer block at its peak, for one sequence."""
  hidden = int(width * mlp_ratio)
  # residual + LayerNorm output + qkv (3) + attention output, the MLP hidden and its GELU.
  rows = tokens * (6 * width + 2 * hidden) * itemsize
  scores = heads * tokens * tokens * (4 + itemsize)  # float32 logits + probabilities
  return rows + scores


def bytes_per_copy(model: MaskedAutoencoder, mask_ratio: float = 0.75) -> int:
  """Estimated peak activation bytes of scoring one image under one mask."""
  itemsize = jnp.dtype(model.dtype).itemsize
  visible = masking.num_visible(model.num_patches, mask_ratio) + 1
  encoder = _block_peak_bytes(visible, model.embed_dim, model.num_heads, model.mlp_ratio, itemsize)
  decoder = _block_peak_bytes(
    model.num_patches + 1,
    model.decoder_embed_dim,
    model.decoder_num_heads,
    model.mlp_ratio,
    itemsize,
  )
  # Prediction, reconstruction and squared error at full resolution, in float32.
  pixels = model.img_size * model.img_size * model.in_chans * 4 * 3
  return int(_SAFETY * (max(encoder, decoder) + pixels))


def free_bytes(device: jax.Device | None = None) -> int | None:
  """Free memory of `device` (default: the first local device), None when unknown.

  Accelerators report it (`memory_stats`); CPU devices share the host's available
  memory (MemAvailable), split between the local CPU devices.
  """
  device = device or jax.local_devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # Not every backend implements it.
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform == "cpu":
    available = _host_available_bytes()
    if available is not None:
      return available // max(1, len(jax.local_devices(backend="cpu")))
  return None


def _host_available_bytes() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def mask_batch_size(
  model: MaskedAutoencoder,
  images_per_device: int,
  num_masks: int,
  mask_ratio: float = 0.75,
  device: jax.Device | None = None,
  available: int | None = None,
) -> int | None:
  """Masks per pass for `images_per_device` images; None = all `num_masks` at once.

  The largest divisor of `num_masks` whose pass fits in `MEMORY_FRACTION` of the free
  memory (`available` bytes, default `free_bytes(device)`); at least 1. When the free
  memory is unknown, all masks at once.
  """
  available = free_bytes(device) if available is None else available
  if available is None:
    return None
  per_mask = max(1, images_per_device) * bytes_per_copy(model, mask_ratio)
  fitting = int(MEMORY_FRACTION * available // per_mask)
  if fitting >= num_masks:
    return None
  chosen = max(d for d in range(1, num_masks + 1) if num_masks % d == 0 and d <= max(1, fitting))
  log.info(
    "Reconstructing %d of %d masks at a time (%.1f GiB free per device, ~%.0f MiB per "
    "image and mask).",
    chosen,
    num_masks,
    available / 2**30,
    per_mask / max(1, images_per_device) / 2**20,
  )
  return chosen


def require_fits(what: str, needed_bytes: int, field: str, device=None) -> None:
  """Refuses, before anything compiles, a step whose largest array would not fit in
  `MEMORY_FRACTION` of the device's free memory (unknown free memory passes).

  Raises:
    ConfigError: naming `field`, the bytes needed and the bytes free.
  """
  from maeday_jax.config_errors import require

  available = free_bytes(device)
  if available is None:
    return
  require(
    needed_bytes <= MEMORY_FRACTION * available,
    field,
    f"{what} needs {needed_bytes / 2**30:.2f} GiB per device, but {available / 2**30:.2f} GiB "
    f"are free (half of it may be used); lower it.",
  )
