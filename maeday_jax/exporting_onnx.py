"""Exporting a fitted detector as ONNX (jax2onnx), checked in onnxruntime before it is kept.

    exporting_onnx.export_onnx(detector, "runs/line3/exported")   # needs the `export` extra
    net = exported.load("runs/line3/exported")                    # onnxruntime
    maps, scores = net.score(images)                              # NHWC, ImageNet-normalised

Written (only after the check passed; a failed export leaves nothing behind):

  <dir>/model.onnx        `(images[, valid], random_0, ...) -> (maps, scores)`, dynamic
                          batch, the detector's state as initializers
                          (`model.onnx.data` beside it when they are large)
  <dir>/masks.stablehlo   the random inputs as a function of the content ids, `(ids) ->
                          (random_0, ...)` (`jax.export`, every platform; absent when the
                          detector draws nothing: PatchCore)
  <dir>/manifest.json     as for StableHLO (`exporting.manifest_of`), plus the inputs

Masks are a declared input, computed outside the graph: jax2onnx would turn JAX's
threefry draws into ONNX `RandomUniform`, other numbers on every run. The score function
is split (`jaxpr_split`) into what depends on the seed and the content ids alone (MAEDAY's
masks: their visible-patch and restore indices, `random_<i>` (N, B, K, 1) and
(N, B, L, 1) int32, for every MAEDAY member of an ensemble) and the rest, which becomes
the ONNX graph. `masks.stablehlo` is that first part with the artifact's seed baked in,
so `exported.load(dir).score(images)` (or `.inputs(images)` for another runtime) gives
the masks the library draws for the same images (`content_ids.image_ids`) and the same
scores. The export runs the file in onnxruntime on random images at batch sizes 1 and 3
and compares maps and scores with the JAX detector (max |difference| within 1e-4 of
max(1, max |value|)); a conversion error or a mismatch raises `OnnxExportError` naming
the detector and the primitive or operator.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax import atomic_files, content_ids, exporting, jaxpr_split
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors.base import Detector

ONNX_FILE = "model.onnx"
MASKS_FILE = "masks.stablehlo"
EXTRA = ("jax2onnx", "onnx", "onnxruntime")
INSTALL = 'pip install -e ".[export]"'
TOLERANCE = 1e-4
CHECK_BATCHES = (1, 3)
OPSET = 21
# ONNX operators that draw numbers: never in an exported graph (see above).
_RANDOM_OPS = ("RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike")


class OnnxExportError(ConfigError):
  """The detector cannot be exported as ONNX; the message names it and what blocks."""


def require_extra() -> None:
  """Raises `OnnxExportError` naming the install command when the extra is missing."""
  missing = []
  for name in EXTRA:
    try:
      importlib.import_module(name)
    except ImportError:
      missing.append(name)
  if missing:
    raise OnnxExportError(
      f"ONNX export needs {', '.join(missing)} (the `export` extra): {INSTALL}."
    )


class _Split:
  """The detector's score function traced once and split into its seed and data parts."""

  def __init__(self, detector: Detector):
    score, self.key = exporting.scoring(detector)
    state = jax.tree.map(jnp.asarray, detector.state)
    self.leaves, tree = jax.tree.flatten(state)
    self.batch = jax.export.symbolic_shape("batch")[0]
    images, self.ids, *self.valid = exporting.input_specs(detector, self.batch)
    self.images = images

    def run(leaves, images, ids, key, *valid):
      return score(jax.tree.unflatten(tree, leaves), images, ids, key, *valid)

    self.library = jax.jit(run)
    leaf_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self.leaves]
    self.closed = jax.make_jaxpr(run)(leaf_specs, images, self.ids, self.key, *self.valid)
    if re.search(r"\b(bf16|f16)\[", str(self.closed)):
      raise OnnxExportError(
        "it computes in half precision (its model.dtype), which "
        "onnxruntime cannot run: export it in float32 (the export job does; from Python, "
        "`detectors.load(folder, model_dtype='float32')`)"
      )
    seed, data = jaxpr_split.SEED, jaxpr_split.DATA
    self.kinds = [data] * len(self.leaves) + [data, seed, seed] + [data] * len(self.valid)
    self.random_specs = jax.eval_shape(self.masks, self.ids)

  def masks(self, ids) -> list:
    """The random inputs (`random_<i>`) of images with content ids `ids` (B, 2)."""
    unused = [None] * len(self.leaves)
    args = [*unused, None, ids, self.key, *[None] * len(self.valid)]
    return jaxpr_split.seed_part(self.closed, args, self.kinds)

  def graph(self, images, *rest):
    """(maps, scores) from the images, `valid` (transductive) and the random inputs."""
    valid, random = rest[: len(self.valid)], rest[len(self.valid) :]
    args = [*self.leaves, images, None, None, *valid]
    return tuple(jaxpr_split.data_part(self.closed, args, self.kinds, random))

  def input_names(self) -> list[str]:
    names = ["images", *(["valid"] if self.valid else [])]
    return names + [f"random_{i}" for i in range(len(self.random_specs))]

  def input_specs(self) -> list[jax.ShapeDtypeStruct]:
    return [self.images, *self.valid, *self.random_specs]


def export_onnx(
  detector: Detector,
  directory: str | os.PathLike,
  *,
  threshold: dict | None = None,
) -> pathlib.Path:
  """Writes `detector` as ONNX (+ its masks module and a manifest) into `directory`, after
  checking it in onnxruntime against the JAX detector.

  Raises:
    OnnxExportError: the extra is missing, a primitive does not convert, onnxruntime
      cannot run the result or it scores differently; nothing is written then.
  """
  require_extra()
  name = detector.describe()
  directory = pathlib.Path(directory).expanduser()
  partial = directory.parent / f".{directory.name}.onnx-partial"
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  try:
    try:
      split = _Split(detector)
      inputs = _write(split, partial, detector.method)
      checked = _check(split, partial, inputs)
    except jaxpr_split.SplitError as e:
      raise OnnxExportError(f"{name}: cannot be exported as ONNX: {e}.") from e
    except OnnxExportError as e:
      raise OnnxExportError(f"{name}: {e}") from e
    manifest = exporting.manifest_of(
      detector,
      threshold,
      format="onnx",
      onnx_file=ONNX_FILE,
      inputs=inputs,
      masks_module=MASKS_FILE if split.random_specs else None,
      checked=checked,
      opset=OPSET,
    )
    manifest["versions"].update({n: importlib.metadata.version(n) for n in EXTRA})
    atomic_files.write_text(partial / exporting.MANIFEST, json.dumps(manifest, indent=2))
    _move(partial, directory)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return directory


def _dims(shape) -> list:
  return [d if isinstance(d, int) else "batch" for d in shape]


def _write(split: _Split, folder: pathlib.Path, method: str) -> list[dict]:
  """Converts the graph (and exports the masks module); returns the inputs' description."""
  import jax2onnx
  import onnx

  if split.random_specs:
    masks = jax.export.export(jax.jit(split.masks), platforms=exporting.PLATFORMS)(split.ids)
    (folder / MASKS_FILE).write_bytes(masks.serialize())
  names = split.input_names()
  noisy = logging.getLogger("onnx_ir")
  level, noisy.level = noisy.level, logging.ERROR  # Untyped-value warnings on every export.
  try:
    jax2onnx.to_onnx(
      split.graph,
      split.input_specs(),
      model_name=method,
      opset=OPSET,
      input_names=names,
      output_names=["maps", "scores"],
      return_mode="file",
      output_path=str(folder / ONNX_FILE),
    )
  except jaxpr_split.SplitError:
    raise
  except Exception as e:  # noqa: BLE001  (whatever the converter raises names the cause)
    raise OnnxExportError(_conversion_message(e)) from e
  finally:
    noisy.level = level
  model = onnx.load(str(folder / ONNX_FILE), load_external_data=False)
  drawn = sorted({n.op_type for n in model.graph.node} & set(_RANDOM_OPS))
  if drawn:
    raise OnnxExportError(f"the graph draws random numbers ({', '.join(drawn)}); not written.")
  return [
    {"name": n, "shape": _dims(s.shape), "dtype": np.dtype(s.dtype).name}
    for n, s in zip(names, split.input_specs(), strict=True)
  ]


def _conversion_message(error: Exception) -> str:
  version = importlib.metadata.version("jax2onnx")
  text = " ".join(str(error).split())
  found = re.search(r"primitive '([^']+)'|lax\.(\w+)", text)
  if found:
    primitive = found.group(1) or found.group(2)
    return f"jax2onnx {version} cannot convert the JAX primitive {primitive} ({text[:300]})."
  return f"jax2onnx {version} cannot convert it: {type(error).__name__}: {text[:300]}."


def _check(split: _Split, folder: pathlib.Path, inputs: list[dict]) -> dict:
  """Runs the file in onnxruntime on random images; compares with the JAX detector."""
  import onnxruntime

  try:
    session = onnxruntime.InferenceSession(
      str(folder / ONNX_FILE), providers=["CPUExecutionProvider"]
    )
  except Exception as e:  # noqa: BLE001
    raise OnnxExportError(f"onnxruntime cannot load the converted model: {_first(e)}.") from e
  masks = _masks_function(folder)
  size, worst = split.images.shape[1], 0.0
  for count in CHECK_BATCHES:
    rng = np.random.default_rng(count)
    images = rng.normal(size=(count, size, size, 3)).astype(np.float32)
    ids = content_ids.image_ids(images)
    valid = [np.ones(count, bool)] * len(split.valid)
    random = [np.asarray(x) for x in masks(ids)] if masks else []
    feeds = dict(zip([i["name"] for i in inputs], [images, *valid, *random], strict=True))
    try:
      maps, scores = session.run(["maps", "scores"], feeds)
    except Exception as e:  # noqa: BLE001  (names the ONNX node and operator)
      raise OnnxExportError(f"onnxruntime cannot run the converted model: {_first(e)}.") from e
    expected = split.library(split.leaves, images, ids, split.key, *valid)
    for label, got, want in zip(("maps", "scores"), (maps, scores), expected, strict=True):
      want = np.asarray(want)
      diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else np.inf
      scale = max(1.0, float(np.max(np.abs(want))))
      if not diff <= TOLERANCE * scale:
        raise OnnxExportError(
          f"the ONNX model's {label} differ from the JAX detector's by up to {diff:.3g} "
          f"(tolerance {TOLERANCE} of their scale {scale:.3g}, batch of {count}); not written."
        )
      worst = max(worst, diff)
  return {"batches": list(CHECK_BATCHES), "tolerance": TOLERANCE, "max_abs_difference": worst}


def _masks_function(folder: pathlib.Path):
  path = folder / MASKS_FILE
  if not path.exists():
    return None
  return jax.export.deserialize(bytearray(path.read_bytes())).call


def _first(error: Exception) -> str:
  return " ".join(str(error).split())[:400]


def _move(partial: pathlib.Path, directory: pathlib.Path) -> None:
  """The checked files into `directory`, the manifest last; another export's files
  there (StableHLO, an older ONNX) are removed first so they are never mixed."""
  directory.mkdir(parents=True, exist_ok=True)
  stale = [exporting.MANIFEST, exporting.MODULE_FILE, exporting.STATE_FILE, MASKS_FILE]
  for old in [*stale, *(p.name for p in directory.glob(f"{ONNX_FILE}*"))]:
    (directory / old).unlink(missing_ok=True)
  for path in sorted(partial.iterdir(), key=lambda p: p.name == exporting.MANIFEST):
    os.replace(path, directory / path.name)
