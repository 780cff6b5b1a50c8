"""Masks per pass chosen from the device's memory (hand-computed cases)."""

import jax.numpy as jnp
import pytest

from maeday_jax import memory_budget, models


def test_bytes_per_copy_by_hand(tiny_mae):
  # tiny_mae: 32 px, patch 8 -> L = 16; K = 4 visible (+ cls = 5 tokens), width 64,
  # 2 heads; decoder 17 tokens, width 32, 2 heads; float32.
  encoder = 5 * (6 * 64 + 2 * 256) * 4 + 2 * 5 * 5 * 8
  decoder = 17 * (6 * 32 + 2 * 128) * 4 + 2 * 17 * 17 * 8
  pixels = 32 * 32 * 3 * 4 * 3
  assert memory_budget.bytes_per_copy(tiny_mae) == int(2.0 * (max(encoder, decoder) + pixels))
  half = memory_budget.bytes_per_copy(models.create("test", dtype=jnp.bfloat16))
  assert half < memory_budget.bytes_per_copy(tiny_mae)


@pytest.mark.parametrize(
  "budget_copies,expected",
  [(1000, None), (32, None), (31, 16), (16, 16), (15, 8), (9, 8), (5, 4), (3, 2), (1, 1), (0, 1)],
)
def test_largest_divisor_that_fits(budget_copies, expected):
  model = models.create("large")
  per_copy = memory_budget.bytes_per_copy(model)
  images = 8
  # Free memory such that `budget_copies` masks of 8 images fit in MEMORY_FRACTION of it.
  available = int(budget_copies * images * per_copy / memory_budget.MEMORY_FRACTION) + 1
  assert memory_budget.mask_batch_size(model, images, 32, available=available) == expected


def test_vit_large_on_an_80_gib_chip():
  """ViT-L at 32 masks: 8 images in one pass, 256 images in chunks, never OOM-sized."""
  model = models.create("large", dtype=jnp.bfloat16)
  free = 80 * 2**30
  assert memory_budget.mask_batch_size(model, 8, 32, available=free) is None
  chunk = memory_budget.mask_batch_size(model, 256, 32, available=free)
  assert chunk is not None and 1 <= chunk < 32
  assert 256 * chunk * memory_budget.bytes_per_copy(model) <= 0.5 * free


def test_unknown_memory_means_all_masks(tiny_mae):
  class NoStats:
    platform = "tpu"

    def memory_stats(self):
      return None

  assert memory_budget.free_bytes(NoStats()) is None
  assert memory_budget.mask_batch_size(tiny_mae, 8, 32, device=NoStats()) is None


def test_cpu_devices_share_the_host_memory():
  free = memory_budget.free_bytes()
  assert free is None or free > 0
