"""Exporting a fitted detector as StableHLO (`jax.export`): it then runs with JAX alone.

    exporting.export_stablehlo(detector, "runs/line3/exported", platforms=("cpu", "cuda"))
    net = exported.load("runs/line3/exported")           # no model code, no config
    maps, scores = net.score(images)                      # NHWC, ImageNet-normalised

Written:

  <dir>/model.stablehlo   the serialized `jax.export.Exported` of
                          `score(state, images, ids[, valid]) -> (maps, scores)` with a
                          symbolic batch dimension, lowered for `platforms`
  <dir>/state.npz         the detector's state leaves (`leaf_<i>`, in the export's order)
  <dir>/manifest.json     input size, normalisation, outputs, threshold, method,
                          whether it is transductive, platforms, versions

Randomness: MAEDAY's masks come from the artifact's seed, baked into the export, and each
image's content id (`content_ids.image_ids`: the SHA-256 of the float32 input), a declared
input that `exported.load(...).score` computes the way the library does; so the exported
and the library scores agree for the same images. A transductive detector (MuSc) also
takes `valid` (B,) bool.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax import atomic_files, parallel
from maeday_jax.detectors.base import Detector

FORMAT_VERSION = 1
MODULE_FILE = "model.stablehlo"
STATE_FILE = "state.npz"
MANIFEST = "manifest.json"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_stablehlo(
  detector: Detector,
  directory: str | os.PathLike,
  *,
  platforms: tuple[str, ...] = ("cpu",),
  threshold: dict | None = None,
) -> pathlib.Path:
  """Writes `detector` as a StableHLO module, its state and a manifest into `directory`.

  Raises:
    ValueError: an unknown platform.
  """
  from jax import export

  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms {unknown or '()'}: choose among {', '.join(PLATFORMS)}.")
  directory = pathlib.Path(directory).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  mesh = parallel.data_mesh(jax.local_devices()[:1])  # The export is one device's program.
  score = detector.score_function(mesh, 1)
  key = detector.scoring_key()  # Baked in: the detector's own seed.
  transductive = bool(detector.transductive)

  def run(state, images, ids, *valid):
    return score(state, images, ids, key, *valid)

  batch = export.symbolic_shape("batch")[0]
  size = detector.input_size
  state = jax.tree.map(lambda x: jnp.asarray(x), detector.state)
  specs = [
    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
    jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
    jax.ShapeDtypeStruct((batch, 2), jnp.uint32),
  ]
  if transductive:
    specs.append(jax.ShapeDtypeStruct((batch,), jnp.bool_))
  exported = export.export(jax.jit(run), platforms=tuple(platforms))(*specs)
  leaves = jax.tree_util.tree_leaves(state)
  with atomic_files.replace_when_done(directory / STATE_FILE) as tmp, open(tmp, "wb") as f:
    np.savez(f, **{f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
  with atomic_files.replace_when_done(directory / MODULE_FILE) as tmp:
    pathlib.Path(tmp).write_bytes(exported.serialize())
  manifest = {
    "format_version": FORMAT_VERSION,
    "method": detector.method,
    "description": detector.describe(),
    "input_size": size,
    "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "inputs": ["state", "images", "ids", *(["valid"] if transductive else [])],
    "outputs": ["maps", "scores"],
    "transductive": transductive,
    "threshold": threshold if threshold is not None else getattr(detector, "threshold", None),
    "platforms": list(platforms),
    "state_leaves": len(leaves),
    "versions": {"jax": jax.__version__, "maeday_jax": _version()},
  }
  atomic_files.write_text(directory / MANIFEST, json.dumps(manifest, indent=2))
  return directory


def _version() -> str | None:
  try:
    return importlib.metadata.version("maeday_jax")
  except importlib.metadata.PackageNotFoundError:
    return None
