"""Running an exported detector: StableHLO (`exporting.export_stablehlo`) with JAX alone,
ONNX (`exporting_onnx.export_onnx`) in onnxruntime; `load` reads either.

    net = exported.load("runs/line3/exported")
    maps, scores = net.score(images)   # (B, S, S, 3) float32 ImageNet-normalised at net.input_size

No model code and no config: the module(s), the state and the manifest are all it reads.
Content ids are computed here as the library computes them (`content_ids`), and an ONNX
model's masks from them by its `masks.stablehlo` (the library's own draws, with JAX), so
the scores equal the library's for the same images.
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
MASKS_FILE = "masks.stablehlo"


class ExportError(ValueError):
  """An exported folder cannot be used; the message names it and what to do."""


class _Exported:
  """What both formats share: the manifest, normalisation and the input check."""

  manifest: dict

  @property
  def input_size(self) -> int:
    return int(self.manifest["input_size"])

  def normalize(self, rgb_uint8: np.ndarray) -> np.ndarray:
    """uint8 RGB (B, S, S, 3) at the input size -> the normalised float32 input."""
    norm = self.manifest["normalization"]
    return ((rgb_uint8 / 255.0 - np.asarray(norm["mean"])) / np.asarray(norm["std"])).astype(
      np.float32
    )

  def _checked(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    size = self.input_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ExportError(f"images of shape {images.shape}: expected (B, {size}, {size}, 3).")
    return images


@dataclasses.dataclass
class ExportedDetector(_Exported):
  """A deserialized StableHLO export and its state."""

  manifest: dict
  exported: object  # jax.export.Exported
  state: object

  def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps (B, S, S), scores (B,)) of normalised images (B, S, S, 3); a transductive
    detector scores them as one group."""
    images = self._checked(images)
    args = [self.state, images, image_ids(images)]
    if self.manifest.get("transductive"):
      args.append(np.ones(len(images), bool))
    maps, scores = self.exported.call(*args)
    return np.asarray(maps), np.asarray(scores)


@dataclasses.dataclass
class OnnxDetector(_Exported):
  """An ONNX export in an onnxruntime session, with its masks module (if it draws any)."""

  manifest: dict
  session: object  # onnxruntime.InferenceSession
  masks: object  # jax.export.Exported of (ids) -> random inputs, or None

  def inputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """The ONNX model's inputs for normalised images (B, S, S, 3): the images, `valid`
    (transductive) and the random inputs (MAEDAY's masks) drawn as the library draws
    them from the artifact's seed and the images' content ids; for another runtime."""
    images = self._checked(images)
    values = [images]
    if self.manifest.get("transductive"):
      values.append(np.ones(len(images), bool))
    if self.masks is not None:
      values += [np.asarray(x) for x in self.masks.call(image_ids(images))]
    names = [i["name"] for i in self.manifest["inputs"]]
    return dict(zip(names, values, strict=True))

  def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps (B, S, S), scores (B,)) of normalised images (B, S, S, 3), in onnxruntime."""
    maps, scores = self.session.run(["maps", "scores"], self.inputs(images))
    return np.asarray(maps), np.asarray(scores)


def load(path: str | os.PathLike) -> ExportedDetector | OnnxDetector:
  """The exported detector in `path` (StableHLO or ONNX, as its manifest says).

  Raises:
    ExportError: a file is missing or unreadable, the export was lowered for other
      platforms than this machine's, or onnxruntime is missing for an ONNX export.
  """
  from jax import export

  folder = pathlib.Path(path).expanduser()
  try:
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") == "onnx":
      return _load_onnx(folder, manifest)
    exported = export.deserialize(bytearray((folder / MODULE_FILE).read_bytes()))
    with np.load(folder / STATE_FILE) as f:
      leaves = [f[f"leaf_{i}"] for i in range(int(manifest["state_leaves"]))]
  except ExportError:
    raise
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


def _load_onnx(folder: pathlib.Path, manifest: dict) -> OnnxDetector:
  from jax import export

  try:
    import onnxruntime
  except ImportError as e:
    raise ExportError(
      f'{folder} is an ONNX export: install onnxruntime (pip install -e ".[export]").'
    ) from e
  masks = None
  if manifest.get("masks_module"):
    masks = export.deserialize(bytearray((folder / manifest["masks_module"]).read_bytes()))
  try:
    session = onnxruntime.InferenceSession(
      str(folder / manifest["onnx_file"]), providers=onnxruntime.get_available_providers()
    )
  except Exception as e:  # noqa: BLE001  (onnxruntime's own errors: a broken file)
    raise ValueError(str(e)) from e
  return OnnxDetector(manifest, session, masks)
