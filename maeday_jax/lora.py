"""Low-rank adaptation (LoRA) over plain parameter trees.

A LoRA tree mirrors the model's parameter tree, but only at the targeted kernels, and
holds a pair of matrices there instead of the kernel::

  params["blocks_0"]["attn"]["qkv"]["kernel"]          (D, 3D)
  lora["blocks_0"]["attn"]["qkv"]["kernel"]["A"]       (D, r)
  lora["blocks_0"]["attn"]["qkv"]["kernel"]["B"]       (r, 3D)

The effective kernel is `W + (alpha / r) * A @ B`. Kernels with more than two axes are
seen as matrices (prod(all but last axis), last axis): the patch-embedding convolution
(p, p, 3, D) becomes (p*p*3, D), whose row order (row in patch, column, channel) is the
`patchify` order, so the update is a Dense layer on flattened patches.

The tree holds arrays only, so it can be optimised, sharded and checkpointed like any
parameter tree. The rank is read from the shapes; `alpha` is a hyperparameter passed to
`apply` and `merge` (the training config keeps it). `alpha=None` means `alpha = rank`,
i.e. scale 1: the LoRA paper sets alpha to the first rank tried and does not tune it, and
with scale 1 the learning rate acts on A @ B as on an ordinary weight.

    delta = lora.init(key, params, rank=32)          # B = 0: the model is unchanged
    loss = loss_fn(lora.apply(params, delta))        # differentiate w.r.t. `delta`
    merged = lora.merge(params, delta)               # plain parameters for inference

For training, `on_activations` computes the same model differently: the frozen layer plus
`(x @ A) @ B` on the layer's input, inside `model.apply`. Differentiating `apply(params,
delta)` makes the backward pass form the gradient of every full kernel (x^T dy, as costly
as the layer's forward matmul) only to project it onto A and B; on the activations, the
frozen kernels get no gradient at all, which saves about a quarter of a LoRA step's
matmul work for ViT-B/L (rank 32):

    with lora.on_activations(delta):
      loss = loss_fn(params)                         # same value and gradients
"""

import contextlib
import functools
import re
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from maeday_jax.models import mixed_matmul
from maeday_jax.settings import few_shot as few_shot_settings

# Every weight matrix of the MAE (spec §1); see `maeday_jax.settings.few_shot.LORA_TARGETS`.
DEFAULT_RANK = few_shot_settings.LORA_RANK
DEFAULT_TARGETS: tuple[str, ...] = few_shot_settings.LORA_TARGETS


def _path_str(path: tuple[str, ...]) -> str:
  return "/".join(path)


def _as_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  return int(np.prod(shape[:-1])), int(shape[-1])


def target_paths(params, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
  """The '/'-joined paths of the leaves of `params` that `targets` select, sorted.

  Raises:
    ValueError: a pattern selects nothing (a typo would otherwise silently train nothing),
      or selects a leaf that is not at least a matrix.
  """
  flat = traverse_util.flatten_dict(params)
  paths = sorted(_path_str(p) for p in flat)
  compiled = [re.compile(t) for t in targets]
  selected = []
  for pattern in compiled:
    hits = [p for p in paths if pattern.fullmatch(p)]
    if not hits:
      raise ValueError(
        f"LoRA target pattern {pattern.pattern!r} matches no parameter. Patterns must match "
        f"a whole path such as {paths[0]!r}; available paths include {paths[:6]}."
      )
    selected.extend(hits)
  selected = sorted(set(selected))
  shapes = {_path_str(p): np.shape(v) for p, v in flat.items()}
  for path in selected:
    if len(shapes[path]) < 2:
      raise ValueError(f"LoRA target {path!r} has shape {shapes[path]}; only matrices qualify.")
  return selected


def init(
  key: jax.Array,
  params,
  rank: int = DEFAULT_RANK,
  targets: Sequence[str] = DEFAULT_TARGETS,
) -> dict:
  """Creates LoRA pairs {A, B} for the kernels of `params` selected by `targets`.

  A (fan_in, rank) is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the Kaiming-uniform
  initialisation of the reference `loralib`), so `x @ A` has the scale of the layer's
  input; B (rank, fan_out) is zero, so the adapted model starts equal to the base model.

  Args:
    key: PRNG key.
    params: the model's parameter tree (arrays or `jax.ShapeDtypeStruct`s).
    rank: inner dimension r of the update.
    targets: regular expressions, each matching whole '/'-joined parameter paths.

  Returns:
    A nested dict of float32 arrays with `A` and `B` under each targeted path.
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be a positive integer, got {rank}.")
  flat = {_path_str(p): v for p, v in traverse_util.flatten_dict(params).items()}
  paths = target_paths(params, targets)
  shapes = tuple(_as_matrix_shape(np.shape(flat[path])) for path in paths)
  pairs = _init_pairs(key, shapes, rank)
  lora = {}
  for path, (a, b) in zip(paths, pairs, strict=True):
    lora[(*path.split("/"), "A")] = a
    lora[(*path.split("/"), "B")] = b
  return traverse_util.unflatten_dict(lora)


# One compiled call and one random draw for all pairs: drawn op by op (or one draw per
# shape), every distinct shape would compile its own random-bits program.
@functools.partial(jax.jit, static_argnames=("shapes", "rank"))
def _init_pairs(key, shapes, rank):
  sizes = [fan_in * rank for fan_in, _ in shapes]
  unit = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  offsets = np.cumsum([0, *sizes])
  pairs = []
  for (fan_in, fan_out), lo, hi in zip(shapes, offsets[:-1], offsets[1:], strict=True):
    a = unit[lo:hi].reshape(fan_in, rank) / np.sqrt(fan_in)
    pairs.append((a, jnp.zeros((rank, fan_out), jnp.float32)))
  return pairs


def _pairs(lora) -> dict[tuple[str, ...], tuple[jax.Array, jax.Array]]:
  flat = traverse_util.flatten_dict(lora)
  paths = {p[:-1] for p in flat}
  pairs = {}
  for path in sorted(paths):
    if (*path, "A") not in flat or (*path, "B") not in flat or len(path) == 0:
      raise ValueError(f"LoRA tree entry {_path_str(path)!r} must hold exactly 'A' and 'B'.")
    pairs[path] = (flat[(*path, "A")], flat[(*path, "B")])
  if len(flat) != 2 * len(pairs):
    raise ValueError("A LoRA tree holds only {'A', 'B'} pairs under parameter paths.")
  return pairs


def scale(rank: int, alpha: float | None) -> float:
  """The factor alpha / rank in front of A @ B (1 when `alpha` is None)."""
  return 1.0 if alpha is None else float(alpha) / rank


def apply(params, lora, alpha: float | None = None):
  """The effective parameters `W + (alpha / r) * A @ B` at every LoRA path.

  A pure function, differentiable with respect to both trees; other leaves are passed
  through untouched. Use it inside the loss; use `merge` once after training.

  Args:
    params: the base parameter tree.
    lora: a tree from `init` (or a trained one).
    alpha: LoRA alpha; None means alpha = rank (scale 1).
  """
  flat = traverse_util.flatten_dict(params)
  out = dict(flat)
  for path, (a, b) in _pairs(lora).items():
    if path not in flat:
      raise ValueError(
        f"LoRA entry {_path_str(path)!r} has no parameter in the model; the LoRA tree was "
        "made for a different model."
      )
    w = flat[path]
    fan_in, fan_out = _as_matrix_shape(w.shape)
    if a.shape[0] != fan_in or b.shape[1] != fan_out or a.shape[1] != b.shape[0]:
      raise ValueError(
        f"LoRA pair at {_path_str(path)!r} has A {a.shape} and B {b.shape}, which do not "
        f"fit the kernel {w.shape} (viewed as ({fan_in}, {fan_out}))."
      )
    # HIGHEST: accelerators would otherwise round this float32 product to bf16/tf32 inputs,
    # and the merged weights would then differ from the trained ones.
    delta = jnp.matmul(
      a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    update = scale(a.shape[1], alpha) * delta.reshape(w.shape)
    out[path] = (w.astype(jnp.float32) + update).astype(w.dtype)
  return traverse_util.unflatten_dict(out)


_merge = jax.jit(apply, static_argnames="alpha")


def merge(params, lora, alpha: float | None = None):
  """Folds the LoRA updates into the base weights: plain parameters for inference.

  Same values as `apply`, computed once in one compiled call; the result has the model's
  own parameter tree, so scoring code needs no LoRA support and pays nothing extra.
  """
  return _merge(params, lora, alpha=alpha)


def num_params(lora) -> int:
  """Number of trainable LoRA values: sum of rank * (fan_in + fan_out)."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(lora)))


def _low_rank(module: nn.Module, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """The layer's low-rank update applied to its input: x -> (x A) B, in the layer's dtype."""
  dtype = getattr(module, "dtype", None) or x.dtype
  a, b = a.astype(dtype), b.astype(dtype)
  matmul = mixed_matmul.flat_matmul
  if isinstance(module, nn.Dense):
    return matmul(matmul(x.astype(dtype), a), b)
  # Convolution: A is the (*window, in, rank) kernel of a convolution with the layer's own
  # strides and padding (the clone below), and B mixes its rank channels: by linearity the
  # same as convolving with the kernel A @ B.
  window = module.kernel_size if isinstance(module.kernel_size, Sequence) else (module.kernel_size,)
  kernel = a.reshape(*window, -1, a.shape[-1])
  low = module.clone(parent=None, features=a.shape[-1], use_bias=False, name=None)
  return matmul(low.apply({"params": {"kernel": kernel}}, x), b)


@contextlib.contextmanager
def on_activations(lora, alpha: float | None = None) -> Iterator[None]:
  """Within this context, `model.apply` runs every LoRA-targeted layer as `layer(x) +
  (alpha / r) * (x A) B`: the model of `apply(params, lora)`, computed on activations.

  Values equal those of `apply` (up to float rounding), and so do the gradients with
  respect to `lora`; the frozen kernels get no gradient, which is what makes this the
  cheaper way to train (see the module docstring). Use it around the loss, inside the
  differentiated function. Targets must be the `kernel` of `nn.Dense` or `nn.Conv`
  layers (the defaults are).

  Raises:
    ValueError: when leaving the context, if a LoRA pair's layer was never called, or is
      not a Dense or Conv layer: its update would silently be missing.
  """
  pairs = _pairs(lora)
  for path in pairs:
    if path[-1] != "kernel":
      raise ValueError(
        f"LoRA entry {_path_str(path)!r} is not a layer kernel; use `lora.apply` for it."
      )
  by_layer = {path[:-1]: pair for path, pair in pairs.items()}
  called: set[tuple[str, ...]] = set()

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
      return out
    layer = tuple(module.path)
    if layer not in by_layer:
      return out
    if not isinstance(module, nn.Dense | nn.Conv):
      raise ValueError(
        f"LoRA target {_path_str(layer)}/kernel belongs to a {type(module).__name__}; "
        "on_activations handles nn.Dense and nn.Conv only: use `lora.apply`."
      )
    called.add(layer)
    a, b = by_layer[layer]
    update = _low_rank(module, args[0], a, b)
    return out + (scale(a.shape[1], alpha) * update).astype(out.dtype)

  with nn.intercept_methods(interceptor):
    yield
  missing = sorted(_path_str((*p, "kernel")) for p in by_layer if p not in called)
  if missing:
    raise ValueError(
      f"LoRA targets {missing} were never called inside on_activations: the LoRA tree was "
      "made for a different model, or the model was not applied inside the context."
    )
