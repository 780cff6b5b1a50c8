"""A fitted detector on disk: a JSON manifest and its learned state, self-contained.

    artifact.save(detector, "runs/line3/detector", threshold=0.42)
    detector = artifact.load("runs/line3/detector")      # on any machine

Layout:

  <dir>/manifest.json   format version, method, its full settings, input size and
                        normalisation, the method's record (architecture, public weights
                        referenced by name + SHA-256, ...), normal statistics, threshold,
                        library versions, the SHA-256 of every state file
  <dir>/state/          the learned arrays (Orbax): stored weights, memory banks,
                        adapted parameters, segmenter weights (absent when empty)

Loading checks everything before it builds anything: a missing or unreadable manifest, a
newer format, an unknown method, or a state file that was truncated, edited, added or
removed is one `ArtifactError` naming the folder and what to do.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil

import jax
import ml_collections

from maeday_jax import parallel
from maeday_jax.detectors import registry
from maeday_jax.detectors.base import Detector
from maeday_jax.detectors.weights_ref import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_DIR = "state"
NORMALIZATION = "imagenet"  # Inputs are RGB, resized, then ImageNet mean/std normalised.
_VERSIONED = ("maeday_jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy")

__all__ = ["FORMAT_VERSION", "ArtifactError", "is_artifact", "load", "read_manifest", "save"]


def is_artifact(path: str | os.PathLike) -> bool:
  """Whether `path` is a folder holding a detector manifest."""
  return (pathlib.Path(path).expanduser() / MANIFEST).is_file()


def _versions() -> dict:
  found = {}
  for name in _VERSIONED:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def _state_digests(folder: pathlib.Path) -> dict[str, str]:
  """SHA-256 of every file under `folder`, by relative path."""
  digests = {}
  if not folder.is_dir():
    return digests
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    digests[str(path.relative_to(folder))] = digest.hexdigest()
  return digests


def _has_arrays(tree) -> bool:
  return bool(jax.tree_util.tree_leaves(tree))


def save(
  detector: Detector,
  directory: str | os.PathLike,
  *,
  threshold: dict | None = None,
  fit_record: dict | None = None,
) -> pathlib.Path:
  """Writes the fitted `detector` to `directory`, replacing an earlier artifact there.

  Written beside the target and renamed into place when whole, so a kill never leaves a
  half artifact under the name. Every process calls it (Orbax saves collectively);
  process 0 writes the manifest. `threshold`: {"method", "value"} when one was fitted;
  `fit_record`: what the fit saw (shots, held-out normals), for the manifest.
  """
  from maeday_jax import training

  target = pathlib.Path(directory).expanduser().absolute()
  if target.exists() and not is_artifact(target):
    raise ArtifactError(f"{target} exists and is not a detector folder; move it away.")
  partial = target.with_name(target.name + ".partial")
  primary = jax.process_index() == 0
  if primary and partial.exists():
    shutil.rmtree(partial)  # A previous save that was killed.
  parallel.barrier(f"maeday_jax: cleared {partial}")
  if primary:
    partial.mkdir(parents=True)
  parallel.barrier(f"maeday_jax: created {partial}")
  state = detector.saved_state()
  if _has_arrays(state):
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(partial / STATE_DIR, training.to_host(state))
    checkpointer.wait_until_finished()
  parallel.barrier(f"maeday_jax: saved the state of {target}")
  if primary:
    manifest = {
      "format_version": FORMAT_VERSION,
      "method": detector.method,
      "settings": detector.settings.to_dict(),
      "input_size": detector.input_size,
      "normalization": NORMALIZATION,
      "record": detector.record(),
      "normal_statistics": detector.normal_statistics,
      "threshold": threshold,
      "fit": fit_record or {},
      "versions": _versions(),
      "state_files": _state_digests(partial / STATE_DIR),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default)
    (partial / MANIFEST).write_text(text)
    old = target.with_name(target.name + ".old")
    if target.exists():
      shutil.rmtree(old, ignore_errors=True)
      target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)
  parallel.barrier(f"maeday_jax: wrote {target}")
  return target


def _json_default(value):
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def read_manifest(directory: str | os.PathLike) -> dict:
  """The checked manifest of an artifact (format version and method known).

  Raises:
    ArtifactError: not an artifact, unreadable, newer format or unknown method.
  """
  folder = pathlib.Path(directory).expanduser()
  path = folder / MANIFEST
  if not folder.is_dir():
    raise ArtifactError(
      f"detector {folder}: no such folder; give a registered detector name "
      f"({', '.join(registry.names())}) or the detector/ folder that a fit wrote."
    )
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise ArtifactError(
      f"{folder}: no {MANIFEST}, so it is not a fitted detector folder (a fit writes "
      "<workdir>/detector/)."
    ) from None
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ArtifactError(f"{path}: unreadable ({e}); refit the detector.") from e
  if not isinstance(manifest, dict) or "format_version" not in manifest:
    raise ArtifactError(f"{path}: not a detector manifest (no format_version); refit it.")
  version = manifest["format_version"]
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise ArtifactError(
      f"{folder}: written in artifact format {version!r}, newer than this maeday_jax reads "
      f"({FORMAT_VERSION}); upgrade maeday_jax (it was written by "
      f"{manifest.get('versions', {}).get('maeday_jax')})."
    )
  method = manifest.get("method")
  if method not in registry.METHODS:
    raise ArtifactError(
      f"{folder}: a detector of method {method!r}, which this maeday_jax does not know "
      f"(known: {', '.join(registry.names())}); install the version that wrote it."
    )
  return manifest


def _check_state(folder: pathlib.Path, manifest: dict) -> None:
  expected = manifest.get("state_files") or {}
  found = _state_digests(folder / STATE_DIR)
  if found == expected:
    return
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  changed = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
  parts = [
    f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
    for label, names in (("missing", missing), ("changed", changed), ("unexpected", extra))
    if names
  ]
  raise ArtifactError(
    f"{folder}: its state differs from what the manifest recorded ({'; '.join(parts)}): "
    "the folder was truncated, edited or copied incompletely. Copy it again, or refit."
  )


def load(directory: str | os.PathLike, *, model_dtype: str | None = None) -> Detector:
  """The fitted detector saved in `directory` (see the module docstring for the checks).

  `model_dtype` ('float32', 'bfloat16', 'auto') replaces the fitted settings' compute
  dtype, `model.dtype` (the weights are float32 either way): e.g. float32 for an ONNX
  export, whose runtime has no bfloat16 convolutions.

  Raises:
    ArtifactError: the folder cannot be used as it is; the message says why.
  """
  folder = pathlib.Path(directory).expanduser().absolute()
  manifest = read_manifest(folder)
  _check_state(folder, manifest)
  settings = ml_collections.ConfigDict(manifest["settings"])
  if model_dtype is not None and settings.get("model") is not None:
    settings.model.dtype = model_dtype
  detector = registry.get(manifest["method"])(settings)
  state = {}
  if manifest.get("state_files"):
    import orbax.checkpoint as ocp

    try:
      state = ocp.StandardCheckpointer().restore(folder / STATE_DIR)
    except Exception as e:  # Orbax raises many types; all mean the same to a user.
      raise ArtifactError(
        f"{folder / STATE_DIR}: could not restore the state ({type(e).__name__}: {e}); "
        "copy the folder again, or refit."
      ) from e
  try:
    detector.restore(manifest["record"], state)
  except (KeyError, TypeError, ValueError) as e:
    raise ArtifactError(
      f"{folder}: the manifest's record does not rebuild a {manifest['method']} detector "
      f"({type(e).__name__}: {e}); refit it."
    ) from e
  detector.normal_statistics = manifest.get("normal_statistics")
  detector.threshold = manifest.get("threshold")
  detector.fit_record = manifest.get("fit", {})
  if detector.input_size != manifest.get("input_size"):
    raise ArtifactError(
      f"{folder}: rebuilt with input size {detector.input_size}, the manifest says "
      f"{manifest.get('input_size')}; refit it."
    )
  return detector
