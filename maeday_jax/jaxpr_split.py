"""Splitting a traced score function into its random part and its data part (ONNX export).

A detector's `score(state, images, ids, key)` draws its randomness (MAEDAY's masks) from
the key and the content ids only. `split` walks the function's jaxpr and sorts every
equation by what it depends on:

  seed   on the key and the ids alone (and constants): the masks, computed by the library's
         own code (threefry), outside the ONNX graph;
  data   on the state or the images: the network, converted to ONNX;
  const  on nothing (iota, literals): computed wherever it is needed.

The seed values that data equations read are the *residuals*: `seed_part` returns them
and `data_part` takes them as inputs, so `data_part(..., seed_part(ids, key))` computes
exactly the original function. Jitted calls with inputs of both kinds are split inside.

`data_part` also inlines every jitted call and replaces the operations the converter
cannot express by exact equivalents (`REWRITES`), and refuses a random draw that would
land in the data part (it would run differently in ONNX).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

SEED, DATA, CONST = "seed", "data", "const"
# Calls whose body is walked (split or inlined) rather than bound as one equation.
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call")
_RANDOM = ("threefry2x32", "rng_bit_generator", "rng_uniform")


class SplitError(ValueError):
  """The function cannot be split; the message names the primitive."""


def _max_by_slices(
  x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation
):
  """`reduce_window_max` as the maximum of strided slices (the same values): jax2onnx
  lowers it to a MaxPool over every axis, which onnxruntime runs for up to 3 axes only.

  Padding repeats the edge instead of -inf (jax2onnx pads static shapes only): a window
  that reaches into the padding holds the edge element already, so the maxima agree.
  """
  if set(base_dilation) | set(window_dilation) != {1}:
    raise SplitError("primitive reduce_window_max with dilation has no rewrite for ONNX")
  if any(max(lo, hi) >= w for (lo, hi), w in zip(padding, window_dimensions, strict=True)):
    raise SplitError("primitive reduce_window_max padded by its window or more")
  axes = [d for d, w in enumerate(window_dimensions) if (w, window_strides[d]) != (1, 1)]
  for d in axes:
    (lo, hi), n = padding[d], x.shape[d]
    edges = [jax.lax.slice_in_dim(x, 0, 1, axis=d)] * lo
    edges_hi = [jax.lax.slice_in_dim(x, n - 1, n, axis=d)] * hi
    x = jax.lax.concatenate([*edges, x, *edges_hi], d) if lo or hi else x
  windows = []
  for offsets in itertools.product(*(range(window_dimensions[d]) for d in axes)):
    y = x
    for d, o in zip(axes, offsets, strict=True):
      w, s = window_dimensions[d], window_strides[d]
      count = (x.shape[d] - w) // s + 1
      y = jax.lax.slice_in_dim(y, o, o + (count - 1) * s + 1, s, axis=d)
    windows.append(y)
  return functools.reduce(jnp.maximum, windows)


# primitive -> (applies(eqn), equivalent(*inputs, **params)).
REWRITES: dict[str, tuple[Callable, Callable]] = {
  "reduce_window_max": (lambda eqn: eqn.invars[0].aval.ndim > 3, _max_by_slices),
}


def _inner(eqn) -> jcore.ClosedJaxpr | None:
  if eqn.primitive.name not in _CALLS:
    return None
  body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(body, jcore.Jaxpr):
    return jcore.ClosedJaxpr(body, ())
  return body if isinstance(body, jcore.ClosedJaxpr) else None


def _is_random(name: str) -> bool:
  return name.startswith("random_") or name in _RANDOM


def _check_not_random(eqn) -> None:
  names = {eqn.primitive.name}
  stack = list(jcore.jaxprs_in_params(eqn.params))
  while stack:
    inner = stack.pop()
    for sub in inner.eqns:
      names.add(sub.primitive.name)
      stack.extend(jcore.jaxprs_in_params(sub.params))
  random = sorted(n for n in names if _is_random(n))
  if random:
    raise SplitError(
      f"primitive {random[0]}: a random draw that does not come from the seed and the "
      "content ids alone (ONNX would draw other numbers)"
    )


class _Walk:
  """One pass over a jaxpr: mode 'seed' collects residuals, mode 'data' consumes them."""

  def __init__(self, mode: str, residuals: Iterator | None = None):
    self.mode = mode
    self.residuals: list = []
    self.feed = residuals

  def run(self, closed, args, kinds, top: bool = True) -> tuple[list, list]:
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts, strict=True))
    kind = dict.fromkeys(jaxpr.constvars, CONST)
    env.update(zip(jaxpr.invars, args, strict=True))
    kind.update(zip(jaxpr.invars, kinds, strict=True))
    fetched = set()

    def kind_of(v):
      return CONST if isinstance(v, jcore.Literal) else kind[v]

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    def read_for_data(v):
      if isinstance(v, jcore.Literal):
        return v.val
      if kind[v] == SEED and v not in fetched:  # A seed value the data side reads.
        fetched.add(v)
        if self.mode == "seed":
          self.residuals.append(env[v])
        else:
          env[v] = next(self.feed)
      return env[v]

    for eqn in jaxpr.eqns:
      kinds_in = {kind_of(v) for v in eqn.invars}
      inner = _inner(eqn)
      if kinds_in <= {CONST}:
        out_kinds, outs = [CONST] * len(eqn.outvars), self._bind(eqn, [read(v) for v in eqn.invars])
      elif kinds_in <= {SEED, CONST}:
        out_kinds = [SEED] * len(eqn.outvars)
        outs = self._bind(eqn, [read(v) for v in eqn.invars]) if self.mode == "seed" else None
      elif inner is not None and (SEED in kinds_in or self.mode == "data"):
        # Split (seed and data inputs) or inlined (data mode): walk the body.
        # Seed inputs pass unread: they become residuals where the body reads them.
        values = [read(v) for v in eqn.invars]
        outs, out_kinds = self.run(inner, values, [kind_of(v) for v in eqn.invars], top=False)
      else:
        out_kinds = [DATA] * len(eqn.outvars)
        values = [read_for_data(v) for v in eqn.invars]
        outs = self._bind(eqn, values) if self.mode == "data" else None
      for i, v in enumerate(eqn.outvars):
        kind[v] = out_kinds[i]
        env[v] = None if outs is None else outs[i]
    # A call's seed outputs pass unread too; the function's own outputs are read.
    results = [read_for_data(v) if top else read(v) for v in jaxpr.outvars]
    return results, [kind_of(v) for v in jaxpr.outvars]

  def _bind(self, eqn, values) -> list:
    if self.mode == "data":
      _check_not_random(eqn)
    rewrite = REWRITES.get(eqn.primitive.name) if self.mode == "data" else None
    with eqn.ctx.manager:
      if rewrite is not None and rewrite[0](eqn):
        out = rewrite[1](*values, **eqn.params)
      else:
        out = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def seed_part(closed: jcore.ClosedJaxpr, args: Sequence, kinds: Sequence[str]) -> list:
  """The residuals (seed values the data part reads) for `args` (None for data inputs)."""
  walk = _Walk("seed")
  walk.run(closed, list(args), list(kinds))
  return walk.residuals


def data_part(
  closed: jcore.ClosedJaxpr, args: Sequence, kinds: Sequence[str], residuals: Sequence
) -> list:
  """The function's outputs from its data inputs (`args`, None for seed inputs) and the
  residuals `seed_part` returned.

  Raises:
    SplitError: a random primitive outside the seed part, or an unconvertible rewrite.
  """
  feed = iter(residuals)
  outs, _ = _Walk("data", feed).run(closed, list(args), list(kinds))
  if next(feed, None) is not None:
    raise SplitError("the data part read fewer residuals than the seed part gave")
  return outs
