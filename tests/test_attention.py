"""Every attention implementation computes the PyTorch reference's outputs.

Float32 paths must match the fixtures (written by tools/references/torch_mae_reference.py)
to the parity tolerance; bfloat16 compute stays within the documented relative error.
cuDNN's fused kernel runs only on a GPU (there, `tools/device_check.sh` runs this file).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maeday_jax import checkpoints, model_builder, models
from maeday_jax.models import vit_mae

FIXTURES = [("mae_ref_a.pth", "mae_ref_a_io.npz"), ("mae_ref_b.pth", "mae_ref_b_io.npz")]
ON_GPU = jax.default_backend() == "gpu"
# Mean absolute error over mean absolute output, bfloat16 compute against float32
# PyTorch (`README.md`, "bfloat16"): 8 mantissa bits through a few blocks.
BFLOAT16_TOLERANCE = 0.05


def _relative_error(pred, reference) -> float:
  return float(np.abs(np.asarray(pred) - reference).mean() / np.abs(reference).mean())


@pytest.mark.parametrize("attention", ["einsum", "xla", "auto"])
@pytest.mark.parametrize("ckpt,io_name", FIXTURES, ids=["a", "b"])
def test_float32_paths_match_the_reference(fixtures_dir, attention, ckpt, io_name):
  io = np.load(fixtures_dir / io_name)
  model, params = checkpoints.load_mae(fixtures_dir / ckpt, attention=attention)
  assert model.attention == attention
  pred = model.apply({"params": params}, io["images"], noise=io["noise"])
  np.testing.assert_allclose(pred, io["pred"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_bfloat16_paths_stay_within_tolerance(fixtures_dir, attention):
  io = np.load(fixtures_dir / "mae_ref_a_io.npz")
  model, params = checkpoints.load_mae(
    fixtures_dir / "mae_ref_a.pth", dtype=jnp.bfloat16, attention=attention
  )
  pred = model.apply({"params": params}, io["images"], noise=io["noise"])
  assert pred.dtype == jnp.float32
  assert _relative_error(pred, io["pred"]) < BFLOAT16_TOLERANCE


@pytest.mark.skipif(not ON_GPU, reason="cuDNN fused attention needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cudnn_matches_the_reference_on_gpu(fixtures_dir, dtype):
  io = np.load(fixtures_dir / "mae_ref_a_io.npz")
  model, params = checkpoints.load_mae(
    fixtures_dir / "mae_ref_a.pth", dtype=dtype, attention="cudnn"
  )
  pred = model.apply({"params": params}, io["images"], noise=io["noise"])
  assert _relative_error(pred, io["pred"]) < BFLOAT16_TOLERANCE


def test_auto_choice_per_backend():
  resolve = models.resolve_attention
  assert resolve("auto", jnp.float32, 64, backend="cpu") == "einsum"
  assert resolve("auto", jnp.bfloat16, 64, backend="cpu") == "einsum"
  assert resolve("auto", jnp.bfloat16, 64, backend="gpu") == "cudnn"
  assert resolve("auto", jnp.float16, 128, backend="gpu") == "cudnn"
  # cuDNN's fused kernel wants half precision and a head dim that is a multiple of 8, <= 128.
  assert resolve("auto", jnp.float32, 64, backend="gpu") == "xla"
  assert resolve("auto", jnp.bfloat16, 80 + 4, backend="gpu") == "xla"
  assert resolve("auto", jnp.bfloat16, 160, backend="gpu") == "xla"
  assert resolve("auto", jnp.bfloat16, 64, backend="tpu") == "xla"
  assert resolve("xla", jnp.float32, 64, backend="cpu") == "xla"
  with pytest.raises(ValueError, match="flash"):
    resolve("flash", jnp.float32, 64)


def test_auto_dtype_per_backend():
  # CPUs: bfloat16 where they have its instructions (tests/test_mixed_matmul.py).
  cpu = jnp.bfloat16 if model_builder.cpu_multiplies_bfloat16() else jnp.float32
  assert model_builder.compute_dtype("auto", backend="cpu") == cpu
  assert model_builder.compute_dtype("auto", backend="gpu") == jnp.bfloat16
  assert model_builder.compute_dtype("auto", backend="tpu") == jnp.bfloat16
  assert model_builder.compute_dtype("float32", backend="tpu") == jnp.float32


def test_einsum_and_xla_agree_on_gradients():
  """The few-shot step differentiates through attention: both paths give one gradient."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  grads = {}
  for attention in ("einsum", "xla"):
    layer = vit_mae.Attention(num_heads=2, attention=attention)
    params = layer.init(jax.random.key(1), x)

    def loss(p, layer=layer):
      return jnp.sum(layer.apply(p, x) ** 2)

    grads[attention] = jax.grad(loss)(params)
  for a, b in zip(jax.tree.leaves(grads["einsum"]), jax.tree.leaves(grads["xla"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_settings_are_config_errors():
  import ml_collections

  from maeday_jax import defaults
  from maeday_jax.config_errors import ConfigError

  config = defaults.model_config(checkpoint="random")
  config.attention = "flash"
  with pytest.raises(ConfigError, match="model.attention"):
    model_builder.build_model(config, jax.random.key(0))
  config = ml_collections.ConfigDict(defaults.model_config(checkpoint="random").to_dict())
  config.dtype = "float64"
  with pytest.raises(ConfigError, match="model.dtype"):
    model_builder.build_model(config, jax.random.key(0))
