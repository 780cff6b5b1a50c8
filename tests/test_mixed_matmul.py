"""Half-precision products with float32 accumulation (`models.mixed_matmul`).

Values and gradients are checked against float64 NumPy products of the same
bfloat16-rounded operands; the compiled programs are checked to hold no product that
returns bfloat16 (the slow path on CPUs), forward or backward; the MAE in bfloat16 on the
CPU stays within the accelerators' tolerance of the PyTorch fixture.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maeday_jax import checkpoints, lora, model_builder
from maeday_jax.models import mixed_matmul, vit_layers

BF16 = jnp.bfloat16
# One rounding to bfloat16 (8 significant bits) of a float32 sum: half an ulp, 2^-9,
# relative to the largest term's scale; 2^-7 leaves room for the float32 accumulation.
ROUNDING = 2.0**-7
BFLOAT16_TOLERANCE = 0.05  # as tests/test_attention.py: the accelerators' tolerance


def _bf16(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), BF16)


def _close(actual, expected, scale):
  """Within ROUNDING of `scale` (the magnitude of the terms summed)."""
  err = np.abs(np.asarray(actual, np.float64) - expected)
  assert err.max() <= ROUNDING * scale, (err.max(), scale)


def test_einsum_and_its_gradient_equal_float64_products_of_the_operands():
  rng = np.random.default_rng(0)
  a, b, g = _bf16(rng, 2, 3, 5, 16), _bf16(rng, 2, 3, 7, 16), _bf16(rng, 2, 3, 5, 7)
  spec = "bhqd,bhkd->bhqk"
  out, vjp = jax.vjp(lambda x, y: mixed_matmul.einsum(spec, x, y), a, b)
  da, db = vjp(g)
  a64, b64, g64 = (np.asarray(x, np.float64) for x in (a, b, g))
  assert out.dtype == da.dtype == db.dtype == BF16
  _close(out, np.einsum(spec, a64, b64), np.abs(np.einsum(spec, abs(a64), abs(b64))).max())
  _close(
    da,
    np.einsum("bhqk,bhkd->bhqd", g64, b64),
    np.einsum("bhqk,bhkd->bhqd", abs(g64), abs(b64)).max(),
  )
  _close(
    db,
    np.einsum("bhqd,bhqk->bhkd", a64, g64),
    np.einsum("bhqd,bhqk->bhkd", abs(a64), abs(g64)).max(),
  )


def test_einsum_returns_float32_when_asked_and_rounds_a_float32_cotangent():
  rng = np.random.default_rng(1)
  a, b = _bf16(rng, 6, 8), _bf16(rng, 8, 4)
  g = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
  out, vjp = jax.vjp(lambda x, y: mixed_matmul.einsum("mk,kn->mn", x, y, jnp.float32), a, b)
  assert out.dtype == jnp.float32
  # Exact products of bfloat16 values summed in float32: float32 rounding only.
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(out, a64 @ b64, rtol=0, atol=1e-5 * (np.abs(a64) @ np.abs(b64)).max())
  da, _ = vjp(g)
  g_rounded = np.asarray(g.astype(BF16), np.float64)
  _close(da, g_rounded @ b64.T, (np.abs(g_rounded) @ np.abs(b64.T)).max())


@pytest.mark.parametrize("spec", ["ab,cd->ac", "ab,bc->a", "ab,bc->aa"])
def test_einsum_refuses_what_is_not_a_matrix_product(spec):
  a = jnp.ones((2, 2), BF16)
  with pytest.raises(ValueError, match="einsum"):
    mixed_matmul.einsum(spec, a, a)


def _products(fn, *args) -> list[str]:
  """'operand x operand -> result' element types of every product of `fn`, as traced."""
  text = jax.jit(fn).lower(*args).as_text()
  found = re.findall(
    r"stablehlo.dot_general.*: \(tensor<\S*x(\w+)>, tensor<\S*x(\w+)>\) -> tensor<\S*x(\w+)>", text
  )
  return [f"{a} x {b} -> {out}" for a, b, out in found]


def test_dense_layers_and_their_gradients_multiply_into_float32_on_cpus():
  x = jnp.ones((2, 5, 16), jnp.float32)
  products = {}
  for name, layer in (("library", vit_layers.dense(24, BF16)), ("flax", nn.Dense(24, dtype=BF16))):
    params = layer.init(jax.random.key(0), x)

    def loss(params, x, layer=layer):
      return jnp.sum(layer.apply(params, x).astype(jnp.float32) ** 2)

    products[name] = _products(jax.grad(loss, argnums=(0, 1)), params, x)
  # Forward, input gradient, kernel gradient: bfloat16 operands, float32 results (what
  # XLA:CPU runs on its bfloat16 instructions).
  assert products["library"] == ["bf16 x bf16 -> f32"] * 3
  # Flax's own layer returns bfloat16, which XLA:CPU computes in float32, at half speed.
  assert products["flax"] == ["bf16 x bf16 -> bf16"] * 3


def test_no_product_of_a_bfloat16_block_returns_bfloat16_on_cpus():
  """A transformer block, forward and backward: the dense layers multiply bfloat16 into
  float32 and attention runs in float32 (XLA:CPU would convert its bfloat16 operands)."""
  block = vit_layers.Block(num_heads=2, dtype=BF16)
  x = jnp.ones((2, 5, 16), jnp.float32)
  params = block.init(jax.random.key(0), x)
  grad = jax.grad(lambda p, x: jnp.sum(block.apply(p, x) ** 2), argnums=(0, 1))
  products = _products(grad, params, x)
  assert products.count("bf16 x bf16 -> f32") == 3 * 4  # qkv, proj, fc1, fc2
  assert products.count("f32 x f32 -> f32") == 3 * 2  # the two attention products
  assert len(products) == 3 * 6


def test_only_half_precision_on_cpus_takes_this_path():
  assert mixed_matmul.applies(BF16, backend="cpu")
  assert mixed_matmul.applies(jnp.float16, backend="cpu")
  assert not mixed_matmul.applies(jnp.float32, backend="cpu")
  assert not mixed_matmul.applies(BF16, backend="gpu")
  assert not mixed_matmul.applies(BF16, backend="tpu")
  assert vit_layers.dense(4, jnp.float32).dot_general is None


def test_lora_gradients_in_bfloat16_follow_float32(fixtures_dir):
  """The few-shot step's gradient in bfloat16 points where float32's does."""
  io = np.load(fixtures_dir / "mae_ref_a_io.npz")
  grads = {}
  for dtype in (jnp.float32, BF16):
    model, params = checkpoints.load_mae(fixtures_dir / "mae_ref_a.pth", dtype=dtype)
    delta = lora.init(jax.random.key(0), params, rank=4)
    delta = jax.tree.map(lambda x: x + 0.01, delta)  # B != 0: every factor gets a gradient

    def loss(delta, model=model, params=params):
      with lora.on_activations(delta):
        pred = model.apply({"params": params}, io["images"], noise=io["noise"])
      return jnp.mean(pred**2)

    grads[dtype] = jax.tree.leaves(jax.jit(jax.grad(loss))(delta))
  g32, g16 = (np.concatenate([np.ravel(g) for g in grads[d]]) for d in (jnp.float32, BF16))
  assert np.dot(g32, g16) / np.linalg.norm(g32) / np.linalg.norm(g16) > 0.99
  assert np.linalg.norm(g16) == pytest.approx(np.linalg.norm(g32), rel=0.05)


def test_the_bfloat16_model_on_cpus_stays_within_the_accelerators_tolerance(fixtures_dir):
  io = np.load(fixtures_dir / "mae_ref_a_io.npz")
  model, params = checkpoints.load_mae(fixtures_dir / "mae_ref_a.pth", dtype=BF16)
  pred = jax.jit(lambda p: model.apply({"params": p}, io["images"], noise=io["noise"]))(params)
  error = np.abs(np.asarray(pred) - io["pred"]).mean() / np.abs(io["pred"]).mean()
  assert error < BFLOAT16_TOLERANCE


def test_auto_is_bfloat16_on_cpus_with_bfloat16_instructions(tmp_path):
  with_flag, without = tmp_path / "with", tmp_path / "without"
  with_flag.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512vl\n")
  without.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
  assert model_builder.cpu_multiplies_bfloat16(str(with_flag))
  assert not model_builder.cpu_multiplies_bfloat16(str(without))
  assert not model_builder.cpu_multiplies_bfloat16(str(tmp_path / "missing"))
  expected = BF16 if model_builder.cpu_multiplies_bfloat16() else jnp.float32
  assert model_builder.compute_dtype("auto", backend="cpu") == expected
