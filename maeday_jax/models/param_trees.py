"""A PyTorch-layout state dict as a Flax parameter tree, checked against the model's shapes:
the step every ViT import shares (`dinov2_import`, `clip_import`).

Each import names its own keys (`flax_name(key) -> (path, how)`); how a tensor is laid
out differs by kind: 'copy' as it is, 'linear' transposed ((out, in) -> (in, out)),
'conv' OIHW -> HWIO.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np
from flax import traverse_util

from maeday_jax.weight_files.errors import CheckpointError

FlaxName = Callable[[str], tuple[tuple[str, ...], str]]


def to_params(
  state: dict[str, np.ndarray],
  shapes: dict,
  source: str,
  flax_name: FlaxName,
  network: str,
  *,
  ignored: Collection[str] = (),
  adjust: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> dict:
  """The Flax tree of `state` (float32), every expected tensor found with its shape.

  Args:
    state: the state dict in the import's layout.
    shapes: the model's parameter shapes (`jax.eval_shape` of its init).
    source: the file, for messages.
    flax_name: the import's key -> (Flax path, 'copy' | 'linear' | 'conv').
    network: its name in messages ('DINOv2', 'CLIP').
    ignored: keys to skip (buffers the model does not hold).
    adjust: `adjust(key, tensor)` after the layout change (e.g. a (1,) scalar as ()).

  Raises:
    CheckpointError: a tensor of another shape, or missing / unused keys (named).
  """
  expected = traverse_util.flatten_dict(shapes)
  found: dict[tuple[str, ...], np.ndarray] = {}
  unused = []
  for key, value in state.items():
    if key in ignored:
      continue
    path, how = flax_name(key)
    if path not in expected:
      unused.append(key)
      continue
    if how == "linear":
      value = value.T
    elif how == "conv":
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    value = np.asarray(value, np.float32)
    if adjust is not None:
      value = adjust(key, value)
    if tuple(value.shape) != tuple(expected[path].shape):
      raise CheckpointError(
        f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
        f"{tuple(expected[path].shape)} for {'/'.join(path)}."
      )
    found[path] = value
  missing = sorted("/".join(p) for p in expected if p not in found)
  if missing or unused:
    raise CheckpointError(
      f"{source}: not the expected {network} layout (missing: "
      f"{', '.join(missing[:5]) or 'none'}; unused: {', '.join(unused[:5]) or 'none'})."
    )
  return traverse_util.unflatten_dict(found)


def build(
  make: Callable, param_shapes: Callable, state, source: str, network: str, flax_name, **to
):
  """(model, params): `make()` the model (a ValueError is the checkpoint's fault: named),
  then `to_params` of `state` against `param_shapes(model)`."""
  try:
    model = make()
    shapes = param_shapes(model)
  except ValueError as e:
    raise CheckpointError(f"{source}: cannot build its {network} ({e}).") from None
  return model, to_params(state, shapes, source, flax_name, network, **to)
