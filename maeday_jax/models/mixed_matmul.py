"""Half-precision matrix products that accumulate in float32, forward and backward.

XLA:CPU multiplies bfloat16 matrices at about twice its float32 rate (AVX512-BF16, AMX)
only when the product is accumulated and returned in float32; a product declared
bfloat16 in, bfloat16 out is computed at float32 speed. And JAX differentiates a product
into products whose output has the operands' dtype, so even a forward product asked for
float32 has a slow backward. `einsum` here is one product with its gradient written
out: every product of the forward and backward pass takes half-precision operands,
accumulates in float32 and rounds its result once, as GPU and TPU matrix units do (the
cotangent is rounded to the operands' dtype first, as in any bfloat16 training).

The models' dense layers use it for half-precision compute dtypes on CPUs
(`dense_dot_general_for`, `vit_layers.dense`; LoRA's low-rank products too); float32
products, and every product on accelerators, stay plain `lax.dot_general`. Batched
products (attention) are not run on the bfloat16 instructions by XLA:CPU at all: there
attention computes in float32 (`vit_layers`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _check_spec(spec: str) -> tuple[str, str, str]:
  inputs, out = spec.replace(" ", "").split("->")
  a, b = inputs.split(",")
  for name, own, others in (("first", a, b + out), ("second", b, a + out)):
    if not set(own) <= set(others):
      raise ValueError(
        f"einsum {spec!r}: every index of the {name} operand must appear in the other "
        "operand or the output (a matrix product); sums over one operand are not supported."
      )
  if not set(out) <= set(a + b) or len(set(out)) != len(out):
    raise ValueError(f"einsum {spec!r}: output indices must be distinct, from the operands.")
  return a, b, out


def _product(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
  """`jnp.einsum(spec, a, b)` of two half-precision operands, accumulated in float32.

  Returns the product in `out_dtype` (default: the operands' dtype). Its gradient is
  computed by two more such products. `spec` must be a matrix product: each index of
  an operand appears in the other operand or in the output.
  """
  _check_spec(spec)
  return _product(spec, a, b, out_dtype or a.dtype)


def _einsum_forward(spec, a, b, out_dtype):
  return einsum(spec, a, b, out_dtype), (a, b)


def _einsum_backward(spec, out_dtype, residuals, grad):
  a, b = residuals
  a_spec, b_spec, out_spec = _check_spec(spec)
  grad = grad.astype(a.dtype)
  return (
    _product(f"{out_spec},{b_spec}->{a_spec}", grad, b, a.dtype),
    _product(f"{a_spec},{out_spec}->{b_spec}", a, grad, b.dtype),
  )


einsum.defvjp(_einsum_forward, _einsum_backward)


def flat_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w` over x's last axis (`w` in x's dtype), computed on x as one (rows, features)
  matrix; in half precision on CPUs as `einsum` here, accumulating in float32.

  The same values as `x @ w`; but the gradient of `w` then contracts one axis of rows
  instead of several (batch, tokens), which spares XLA:CPU a transposed copy of the
  whole output gradient per layer (20 % of a ViT-B LoRA step before this).
  """
  rows, w = x.reshape(-1, x.shape[-1]), w.astype(x.dtype)
  out = einsum("mk,kn->mn", rows, w) if applies(x.dtype) else rows @ w
  return out.reshape(*x.shape[:-1], w.shape[-1])


def dense_dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
  """A `flax.linen.Dense` `dot_general`: its (..., in) x (in, out) product as `flat_matmul`."""
  if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or preferred_element_type:
    return lax.dot_general(x, kernel, dimension_numbers, precision, preferred_element_type)
  return flat_matmul(x, kernel)


def applies(dtype, backend: str | None = None) -> bool:
  """Whether products in `dtype` on `backend` (default: JAX's) should use this module."""
  return jnp.dtype(dtype) in _HALF and (backend or jax.default_backend()) == "cpu"


def dense_dot_general_for(dtype):
  """The `dot_general` for `nn.Dense(dtype=dtype)`: this module's on CPUs in half
  precision, else None (Flax's default, `lax.dot_general`)."""
  return dense_dot_general if applies(dtype) else None
