"""LoRA over plain parameter trees: initialisation, apply/merge, targets, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from maeday_jax import few_shot, lora, parallel
from maeday_jax.models.vit_mae import PatchEmbed

# The model is `tiny_mae` (32 px, patch 8, width 64 (2 blocks), decoder 32 (1 block)), its
# parameters `tiny_params` (tests/conftest.py).
RANK = 4


@pytest.fixture(scope="module")
def forward(tiny_mae):
  """One compiled forward pass shared by the tests: (params, images, noise) -> (B, L, P)."""
  return jax.jit(lambda p, x, n: tiny_mae.apply({"params": p}, x, noise=n))


@pytest.fixture(scope="module")
def forward_with_lora(tiny_mae):
  """The model run on `lora.apply(params, delta)` inside the compiled function, as in
  training: (params, delta, images, noise) -> (B, L, P)."""
  return jax.jit(lambda p, d, x, n: tiny_mae.apply({"params": lora.apply(p, d)}, x, noise=n))


def _inputs(model, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
  noise = rng.uniform(size=(batch, model.num_patches)).astype(np.float32)
  return images, noise


def _random_b(delta, seed=1):
  """The same LoRA tree with every B drawn at random (as after some training)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(delta)
  return traverse_util.unflatten_dict(
    {
      p: (0.1 * rng.normal(size=v.shape).astype(np.float32) if p[-1] == "B" else v)
      for p, v in flat.items()
    }
  )


def test_default_targets_are_every_weight_matrix(tiny_params):
  kernels = sorted(
    "/".join(p) for p in traverse_util.flatten_dict(tiny_params) if p[-1] == "kernel"
  )
  assert lora.target_paths(tiny_params) == kernels
  assert "patch_embed/proj/kernel" in kernels and "decoder_pred/kernel" in kernels


def test_init_shapes_and_parameter_count(tiny_params):
  delta = lora.init(jax.random.key(1), tiny_params, rank=RANK)
  qkv = delta["blocks_0"]["attn"]["qkv"]["kernel"]
  assert qkv["A"].shape == (64, RANK) and qkv["B"].shape == (RANK, 192)
  patch = delta["patch_embed"]["proj"]["kernel"]  # conv (8, 8, 3, 64) seen as (192, 64)
  assert patch["A"].shape == (8 * 8 * 3, RANK) and patch["B"].shape == (RANK, 64)
  assert all(not np.any(b) for p, b in traverse_util.flatten_dict(delta).items() if p[-1] == "B")
  # rank x (fan_in + fan_out) per matrix, from the architecture (D=64, Dd=32, P=192).
  encoder_block = (64 + 192) + (64 + 64) + (64 + 256) + (256 + 64)  # qkv, proj, fc1, fc2
  decoder_block = (32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)
  others = (192 + 64) + (64 + 32) + (32 + 192)  # patch_embed, decoder_embed, decoder_pred
  expected = RANK * (2 * encoder_block + 1 * decoder_block + others)
  assert lora.num_params(delta) == expected


def test_targets_by_regex(tiny_params):
  delta = lora.init(
    jax.random.key(1), tiny_params, rank=2, targets=(r"blocks_\d+/attn/qkv/kernel",)
  )
  assert sorted(delta) == ["blocks_0", "blocks_1"]  # decoder_blocks_0 needs the prefix
  with pytest.raises(ValueError, match="matches no parameter"):
    lora.init(jax.random.key(1), tiny_params, targets=(r"attn/qkv/kernel",))  # not a whole path
  with pytest.raises(ValueError, match="only matrices"):
    lora.init(jax.random.key(1), tiny_params, targets=(r"norm/bias",))


def test_zero_initialised_lora_leaves_the_model_unchanged(
  tiny_params, forward, forward_with_lora, tiny_mae
):
  delta = lora.init(jax.random.key(1), tiny_params, rank=RANK)
  jax.tree.map(np.testing.assert_array_equal, lora.merge(tiny_params, delta), tiny_params)
  images, noise = _inputs(tiny_mae)
  np.testing.assert_allclose(
    forward_with_lora(tiny_params, delta, images, noise),
    forward(tiny_params, images, noise),
    rtol=1e-6,
    atol=1e-6,
  )


def test_merge_equals_the_unmerged_low_rank_path(tiny_params, forward, forward_with_lora, tiny_mae):
  delta = _random_b(lora.init(jax.random.key(1), tiny_params, rank=RANK))
  merged = lora.merge(tiny_params, delta)
  x = np.random.default_rng(2).normal(size=(5, 64)).astype(np.float32)
  # A Dense layer: x (W + A B) == x W + (x A) B.
  w = tiny_params["blocks_1"]["mlp"]["fc1"]["kernel"]
  pair = delta["blocks_1"]["mlp"]["fc1"]["kernel"]
  np.testing.assert_allclose(
    x @ merged["blocks_1"]["mlp"]["fc1"]["kernel"],
    x @ w + (x @ pair["A"]) @ pair["B"],
    rtol=1e-5,
    atol=1e-5,
  )
  # The patch-embedding conv: the same update applied to flattened (patchified) patches.
  images, noise = _inputs(tiny_mae)
  embed = PatchEmbed(8, 64)
  pair = delta["patch_embed"]["proj"]["kernel"]
  patches = tiny_mae.patchify(images)
  base_out = embed.apply({"params": tiny_params["patch_embed"]}, images)
  expected = base_out + (patches @ pair["A"]) @ pair["B"]
  got = embed.apply({"params": merged["patch_embed"]}, images)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # Whole model: merged parameters give the outputs of the LoRA-applied ones.
  np.testing.assert_allclose(
    forward(merged, images, noise),
    forward_with_lora(tiny_params, delta, images, noise),
    rtol=1e-6,
    atol=1e-6,
  )
  assert not np.allclose(forward(merged, images, noise), forward(tiny_params, images, noise))


def test_alpha_scales_the_update(tiny_params):
  delta = _random_b(lora.init(jax.random.key(1), tiny_params, rank=RANK))
  path = ("decoder_embed", "kernel")
  w = tiny_params["decoder_embed"]["kernel"]
  unit = lora.merge(tiny_params, delta)["decoder_embed"]["kernel"] - w  # alpha = rank: scale 1
  double = lora.merge(tiny_params, delta, alpha=2 * RANK)["decoder_embed"]["kernel"] - w
  np.testing.assert_allclose(double, 2 * unit, rtol=1e-5, atol=1e-7)
  pair = traverse_util.flatten_dict(delta)
  np.testing.assert_allclose(unit, pair[(*path, "A")] @ pair[(*path, "B")], rtol=1e-5, atol=1e-7)
  assert lora.scale(32, None) == 1.0 and lora.scale(32, 16.0) == 0.5


def test_apply_rejects_a_tree_for_another_model(tiny_params):
  # decoder_embed is (64, 32) here; a model of width 32 would have (32, 32).
  delta = {"decoder_embed": {"kernel": {"A": jnp.zeros((32, 2)), "B": jnp.zeros((2, 32))}}}
  with pytest.raises(ValueError, match="do not fit the kernel"):
    lora.apply(tiny_params, delta)
  with pytest.raises(ValueError, match="no parameter in the model"):
    lora.apply(tiny_params, {"head": {"kernel": delta["decoder_embed"]["kernel"]}})


def test_only_lora_leaves_receive_updates(tiny_params, tiny_mae, train_config):
  """A few training steps change exactly the targeted kernels of the merged model."""
  config = train_config(steps=2)
  shots = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(np.float32)
  placed = parallel.replicate(tiny_params, parallel.data_mesh())  # as a caller would hold them
  merged, history = few_shot.adapt(tiny_mae, placed, shots, jax.random.key(5), config)
  assert history["trainable_params"] == lora.num_params(
    lora.init(jax.random.key(0), tiny_params, rank=config.lora.rank)
  )
  targets = set(lora.target_paths(tiny_params))
  before = {"/".join(p): v for p, v in traverse_util.flatten_dict(tiny_params).items()}
  after = {"/".join(p): v for p, v in traverse_util.flatten_dict(merged).items()}
  assert before.keys() == after.keys()
  for path, value in before.items():
    if path in targets:
      assert not np.allclose(after[path], value), path
    else:
      np.testing.assert_array_equal(after[path], value, err_msg=path)
  # The caller's parameters are alive and untouched (never donated to the step).
  assert not any(x.is_deleted() for x in jax.tree.leaves(placed))
  jax.tree.map(np.testing.assert_array_equal, placed, tiny_params)


def _loss_with_lora(model, on_activations: bool, alpha: float):
  """Reconstruction MSE as a function of (delta, params, images, noise), with the LoRA
  update either folded into the weights (`apply`) or run on the activations."""

  def loss(delta, p, x, n):
    if on_activations:
      with lora.on_activations(delta, alpha):
        out = model.apply({"params": p}, x, noise=n)
    else:
      out = model.apply({"params": lora.apply(p, delta, alpha)}, x, noise=n)
    return jnp.mean((out - model.patchify(x)) ** 2)

  return loss


def test_on_activations_gives_the_values_and_gradients_of_apply(tiny_params, tiny_mae):
  """x (W + s A B) and x W + s (x A) B: same loss, same gradients for every A and B
  (Dense layers and the patch-embedding convolution), and less work for the gradient."""
  delta = _random_b(lora.init(jax.random.key(1), tiny_params, rank=RANK))
  images, noise = _inputs(tiny_mae, 3)
  alpha = 2.0 * RANK  # scale 2, so that a missing scale would show
  grad_fns = {
    mode: jax.jit(jax.value_and_grad(_loss_with_lora(tiny_mae, mode, alpha)))
    for mode in (False, True)
  }
  (want, want_grads), (got, got_grads) = (
    fn(delta, tiny_params, images, noise) for fn in grad_fns.values()
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  flat_want, flat_got = (traverse_util.flatten_dict(g) for g in (want_grads, got_grads))
  assert flat_got.keys() == flat_want.keys()
  for path, value in flat_want.items():
    assert np.any(value), path  # every factor of every layer gets a gradient
    np.testing.assert_allclose(flat_got[path], value, rtol=2e-4, atol=1e-6, err_msg=str(path))
  # No gradient of the frozen kernels is formed: fewer FLOPs for the same result.
  cost = {
    mode: fn.lower(delta, tiny_params, images, noise).cost_analysis()
    for mode, fn in grad_fns.items()
  }
  if all(cost.values()):
    assert cost[True]["flops"] < 0.8 * cost[False]["flops"]


def test_on_activations_rejects_trees_it_cannot_apply(tiny_params, tiny_mae):
  images, noise = _inputs(tiny_mae)
  pair = {"A": jnp.zeros((64, 2)), "B": jnp.zeros((2, 64))}

  def trace(delta):  # Traces the model without running it.
    with lora.on_activations(delta):
      return jax.eval_shape(lambda: tiny_mae.apply({"params": tiny_params}, images, noise=noise))

  # A kernel path of no layer the model calls: the update would silently be missing.
  with pytest.raises(ValueError, match=r"\['head/kernel'\] were never called"):
    trace({"head": {"kernel": pair}})
  with pytest.raises(ValueError, match="not a layer kernel"):
    trace({"cls_token": pair})
