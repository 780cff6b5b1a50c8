"""Running an exported detector (`exporting.export_stablehlo`) with JAX alone.

    net = exported.load("runs/line3/exported")
    maps, scores = net.score(images)   # (B, S, S, 3) float32 ImageNet-normalised at net.input_size

No model code and no config: the StableHLO module, its state and the manifest are all it
reads (`jax.export.deserialize`). Content ids are computed here as the library computes
them (`content_ids`), so the scores equal the library's for the same images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import numpy as np

from maeday_jax.content_ids import image_ids

MODULE_FILE = "model.stablehlo"
STATE_FILE = "state.npz"
MANIFEST = "manifest.json"


class ExportError(ValueError):
  """An exported folder cannot be used; the message names it and what to do."""


@dataclasses.dataclass
class ExportedDetector:
  """A deserialized exported detector and its state."""

  manifest: dict
  exported: object  # jax.export.Exported
  state: object

  @property
  def input_size(self) -> int:
    return int(self.manifest["input_size"])

  def normalize(self, rgb_uint8: np.ndarray) -> np.ndarray:
    """uint8 RGB (B, S, S, 3) at the input size -> the normalised float32 input."""
    norm = self.manifest["normalization"]
    return ((rgb_uint8 / 255.0 - np.asarray(norm["mean"])) / np.asarray(norm["std"])).astype(
      np.float32
    )

  def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps (B, S, S), scores (B,)) of normalised images (B, S, S, 3); a transductive
    detector scores them as one group."""
    images = np.asarray(images, np.float32)
    size = self.input_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ExportError(f"images of shape {images.shape}: expected (B, {size}, {size}, 3).")
    args = [self.state, images, image_ids(images)]
    if self.manifest.get("transductive"):
      args.append(np.ones(len(images), bool))
    maps, scores = self.exported.call(*args)
    return np.asarray(maps), np.asarray(scores)


def load(path: str | os.PathLike) -> ExportedDetector:
  """The exported detector in `path`.

  Raises:
    ExportError: a file is missing or unreadable, or the export was lowered for other
      platforms than this machine's.
  """
  from jax import export

  folder = pathlib.Path(path).expanduser()
  try:
    manifest = json.loads((folder / MANIFEST).read_text())
    exported = export.deserialize(bytearray((folder / MODULE_FILE).read_bytes()))
    with np.load(folder / STATE_FILE) as f:
      leaves = [f[f"leaf_{i}"] for i in range(int(manifest["state_leaves"]))]
  except (OSError, ValueError, KeyError) as e:
    raise ExportError(f"{folder}: not a readable exported detector ({e}); export it again.") from e
  platform = jax.default_backend()
  platform = "cuda" if platform == "gpu" else platform
  if platform not in exported.platforms:
    raise ExportError(
      f"{folder} was exported for {', '.join(exported.platforms)}, this machine runs "
      f"{platform}: export it again with that platform."
    )
  state_tree = exported.in_tree.children()[0].children()[0]
  return ExportedDetector(manifest, exported, jax.tree_util.tree_unflatten(state_tree, leaves))
