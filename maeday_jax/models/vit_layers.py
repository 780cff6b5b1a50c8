"""The transformer layers of the ViTs (the MAE's, DINOv2's and CLIP's), in Flax linen.

Module and parameter names mirror the official PyTorch keys (`attn/qkv`, `mlp/fc1`,
`ls1/gamma`). Parameters are always float32; `dtype` only sets the compute precision;
LayerNorm statistics and the softmax stay float32. CLIP's towers use the same block with
three options: LayerNorm eps 1e-5, quick-GELU (OpenAI's weights) and, in the text tower,
a causal attention mask.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maeday_jax.models import mixed_matmul
from maeday_jax.settings import model as model_settings

Dtype = Any

# Official initialiser of the Linear weights: xavier-uniform with zero bias.
_dense_init = nn.initializers.xavier_uniform()


def dense(features: int, dtype: Dtype, *, kernel_init=_dense_init, **kwargs) -> nn.Dense:
  """`nn.Dense` computing in `dtype`: the models' one linear layer (float32 parameters).

  In half precision on CPUs its products accumulate in float32, which is what lets the
  CPU's bfloat16 instructions run (`mixed_matmul`).
  """
  return nn.Dense(
    features,
    dtype=dtype,
    kernel_init=kernel_init,
    dot_general=mixed_matmul.dense_dot_general_for(dtype),
    **kwargs,
  )


# LayerNorm (eps 1e-6, official) computes its statistics in float32 whatever the compute
# dtype; callers cast the result back to their compute dtype.
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=jnp.float32)


# How attention is computed (`MaskedAutoencoder.attention`); see `resolve_attention`.
ATTENTION_IMPLEMENTATIONS = model_settings.ATTENTION_IMPLEMENTATIONS
# cuDNN's fused (flash) attention: half-precision inputs, head dims a multiple of 8, <= 128.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_attention(attention: str, dtype, head_dim: int, backend: str | None = None) -> str:
  """The implementation `attention` stands for on `backend` (default: JAX's default).

  'auto' is 'einsum' on CPUs (explicit batched matrix products, fastest on XLA:CPU),
  'cudnn' on GPUs when the compute dtype is bfloat16/float16 and the head dimension
  suits cuDNN's fused kernel, and 'xla' (`jax.nn.dot_product_attention`, XLA's own
  fusion; the TPU path) otherwise. Explicit names are returned as given.
  """
  if attention not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention={attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}.")
  if attention != "auto":
    return attention
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return "einsum"
  if backend in ("gpu", "cuda") and _cudnn_suits(dtype, head_dim):
    return "cudnn"
  return "xla"


def _cudnn_suits(dtype, head_dim: int) -> bool:
  return jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES] and (
    head_dim % 8 == 0 and head_dim <= 128
  )


def _einsum_attention(qkv: jax.Array, causal: bool = False) -> jax.Array:
  """Softmax attention of (B, T, 3, heads, head_dim) -> (B, T, heads, head_dim);
  `causal`: token i attends to tokens 0 .. i only (CLIP's text tower)."""
  dtype = qkv.dtype
  if mixed_matmul.applies(dtype):
    # XLA:CPU computes batched half-precision products in float32 after converting their
    # operands, the (B, heads, T, T) weights among them: attention in float32 on CPUs
    # skips those copies (a fifth of a ViT-B LoRA step in bfloat16).
    qkv = qkv.astype(jnp.float32)
  # Heads go before tokens, so that both attention products are plain batched matrix
  # products over (B, heads): on CPUs this layer ran 1.4x faster forward and 1.2x
  # backward than `jax.nn.dot_product_attention` on (B, N, heads, head_dim).
  q, k, v = qkv.transpose(2, 0, 3, 1, 4)
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  scores = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
  if causal:
    # -inf above the diagonal, as the references' additive mask: exactly zero weights.
    tokens = scores.shape[-1]
    scores = jnp.where(jnp.tri(tokens, dtype=bool), scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # float32 softmax
  return jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3).astype(dtype)


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (official layout).

  Attributes:
    num_heads: number of heads; the width must be divisible by it.
    dtype: compute dtype.
    attention: 'auto', 'einsum', 'xla' or 'cudnn' (see `resolve_attention`). 'auto'
      with an explicit cuDNN failure (an unsupported GPU or shape) falls back to 'xla'.
    causal: mask attention to later tokens (CLIP's text tower).
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"Width {width} is not divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads
    qkv = dense(3 * width, self.dtype, name="qkv")(x)
    # The official reshape is (B, N, 3, heads, head_dim): q, k, v are contiguous thirds.
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    out = self._attend(qkv, head_dim)
    return dense(width, self.dtype, name="proj")(out.reshape(batch, tokens, width))

  def _attend(self, qkv: jax.Array, head_dim: int) -> jax.Array:
    implementation = resolve_attention(self.attention, self.dtype, head_dim)
    if implementation == "einsum":
      return _einsum_attention(qkv, self.causal)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attend = functools.partial(jax.nn.dot_product_attention, is_causal=self.causal)
    if implementation == "cudnn" and self.attention == "auto":
      try:  # Checked while tracing: an unsupported GPU or shape raises here.
        return attend(q, k, v, implementation="cudnn")
      except (RuntimeError, ValueError, NotImplementedError, TypeError):
        implementation = "xla"
    return attend(q, k, v, implementation=implementation)


ACTIVATIONS = ("gelu", "quick_gelu")


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x) (its weights were trained with it)."""
  return x * jax.nn.sigmoid(1.702 * x)


class Mlp(nn.Module):
  """Two-layer MLP with exact (erf) GELU, or quick-GELU (`activation='quick_gelu'`)."""

  hidden_dim: int
  dtype: Dtype = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r} is not one of {ACTIVATIONS}.")
    width = x.shape[-1]
    x = dense(self.hidden_dim, self.dtype, name="fc1")(x)
    x = quick_gelu(x) if self.activation == "quick_gelu" else nn.gelu(x, approximate=False)
    return dense(width, self.dtype, name="fc2")(x)


class SwiGLU(nn.Module):
  """The official `SwiGLUFFNFused`: hidden width 2/3 of `hidden_dim`, rounded up to 8."""

  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = (int(self.hidden_dim * 2 / 3) + 7) // 8 * 8
    # Flax's default initialiser, as before: these layers only ever hold imported weights.
    lecun = nn.initializers.lecun_normal()
    gate, value = jnp.split(dense(2 * hidden, self.dtype, kernel_init=lecun, name="w12")(x), 2, -1)
    return dense(x.shape[-1], self.dtype, kernel_init=lecun, name="w3")(nn.silu(gate) * value)


class LayerScale(nn.Module):
  """Per-channel scale `gamma` (the official `LayerScale`)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param("gamma", nn.initializers.constant(1e-5), (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1 x), then + mlp(norm2 x) (timm's `Block`,
  the MAE's), optionally with layer scale on both branches and a SwiGLU MLP (DINOv2's
  `NestedTensorBlock`; ViT-g uses SwiGLU). No drop-path: inference and fine-tuning only.

  Attributes:
    num_heads, mlp_ratio: the attention heads and the MLP's hidden width / the width.
    dtype: compute dtype; the residual stream is float32.
    attention: 'auto', 'einsum', 'xla' or 'cudnn' (`resolve_attention`).
    ffn: 'mlp' (Linear-GELU-Linear) or 'swiglu'.
    layer_scale: scale each branch by a learned per-channel `gamma` (`ls1`, `ls2`).
    norm_eps: the LayerNorms' epsilon (1e-6 timm / DINOv2, 1e-5 CLIP).
    activation: the MLP's 'gelu' or 'quick_gelu' (OpenAI CLIP).
    causal: causal attention (CLIP's text tower).
  """

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  ffn: str = "mlp"
  layer_scale: bool = False
  norm_eps: float = 1e-6
  activation: str = "gelu"
  causal: bool = False

  def _branch(self, name: str, y: jax.Array) -> jax.Array:
    return LayerScale(name=name)(y.astype(jnp.float32)) if self.layer_scale else y

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    y = LayerNorm(epsilon=self.norm_eps, name="norm1")(x).astype(self.dtype)
    attn = Attention(self.num_heads, self.dtype, self.attention, self.causal, name="attn")
    x = x + self._branch("ls1", attn(y))
    y = LayerNorm(epsilon=self.norm_eps, name="norm2")(x).astype(self.dtype)
    hidden = int(width * self.mlp_ratio)
    if self.ffn == "mlp":
      ffn = Mlp(hidden, self.dtype, self.activation, name="mlp")
    else:
      ffn = SwiGLU(hidden, self.dtype, name="mlp")
    return x + self._branch("ls2", ffn(y))
