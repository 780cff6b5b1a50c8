"""The Flax port equals an independent PyTorch implementation (committed fixtures).

The fixtures were written by tools/references/torch_mae_reference.py (timm
Block/PatchEmbed, the official masking and decoder) with random non-trivial weights; see
tests/fixtures/README.md.
"""

import numpy as np
import pytest

from maeday_jax import checkpoints, models

CASES = [
  ("mae_ref_a.pth", "mae_ref_a_io.npz"),  # patch 8, width 128 x 2 blocks, 2 heads
  ("mae_ref_b.pth", "mae_ref_b_io.npz"),  # patch 14, width 64 x 3 blocks, 1 head
  ("mae_ref_b.safetensors", "mae_ref_b_io.npz"),  # Hugging Face names, split q/k/v
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def loaded(request, fixtures_dir):
  ckpt, io = request.param
  model, params = checkpoints.load_mae(fixtures_dir / ckpt)
  return model, params, dict(np.load(fixtures_dir / io))


def test_architecture_is_inferred_from_shapes(loaded):
  model, _, io = loaded
  for field in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
    assert getattr(model, field) == int(io[field]), field
  for field in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
    assert getattr(model, field) == int(io[field]), field


def test_decoder_output_matches_reference(loaded):
  model, params, io = loaded
  pred = model.apply({"params": params}, io["images"], noise=io["noise"])
  assert pred.shape == io["pred"].shape
  assert np.abs(io["pred"]).mean() > 0.1  # Outputs of order 1: the tolerance means something.
  np.testing.assert_allclose(pred, io["pred"], atol=1e-4, rtol=0)


def test_masking_matches_reference(loaded):
  _, _, io = loaded
  m = models.masking.from_noise(io["noise"], float(io["mask_ratio"]))
  np.testing.assert_array_equal(np.asarray(m.mask), io["mask"])
  # Visible = the int(L * 0.25) lowest-noise patches, as argsort does by hand.
  keep = int(io["noise"].shape[1] * (1 - float(io["mask_ratio"])))
  expected = np.sort(np.argsort(io["noise"], axis=1)[:, :keep], axis=1)
  np.testing.assert_array_equal(np.sort(np.asarray(m.ids_keep), axis=1), expected)


def test_patchify_matches_reference(loaded):
  model, _, io = loaded
  np.testing.assert_allclose(model.patchify(io["images"]), io["target"], atol=0)
  np.testing.assert_allclose(model.unpatchify(io["target"]), io["images"], atol=0)


def test_stored_position_tables_are_the_official_sincos(loaded):
  model, params, _ = loaded
  for name, width in (
    ("pos_embed", model.embed_dim),
    ("decoder_pos_embed", model.decoder_embed_dim),
  ):
    table = models.pos_embed.sincos_2d(width, model.grid_size)
    np.testing.assert_allclose(np.asarray(params[name])[0], table, atol=1e-6)


def test_bfloat16_compute_stays_close(fixtures_dir):
  import jax.numpy as jnp

  io = np.load(fixtures_dir / "mae_ref_a_io.npz")
  model, params = checkpoints.load_mae(fixtures_dir / "mae_ref_a.pth", dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in __import__("jax").tree.leaves(params))
  pred = model.apply({"params": params}, io["images"], noise=io["noise"])
  assert pred.dtype == jnp.float32
  rel = np.abs(pred - io["pred"]).mean() / np.abs(io["pred"]).mean()
  assert rel < 0.05, rel


def test_export_round_trip_restores_official_keys(fixtures_dir):
  state = checkpoints.read_state_dict(fixtures_dir / "mae_ref_a.pth")
  _, params = checkpoints.load_mae(fixtures_dir / "mae_ref_a.pth")
  exported = checkpoints.state_dict.from_params(params)
  assert set(exported) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
