"""Anomaly detectors behind one interface, by name, and their saved artifacts.

    from maeday_jax import detectors
    detector = detectors.create(config)                   # config.detector = "patchcore"
    normals, _ = detectors.normal_images(config, "bottle")
    detectors.fit_with_statistics(detector, normals, key)
    detectors.save(detector, "runs/bottle/detector")
    detector = detectors.load("runs/bottle/detector")    # anywhere, same scores

Every detector (`base.Detector`) is built from a job config's sections, `fit` on zero
or more normal images, and scores with a pure, jittable batch function
`score(state, images, ids, key) -> (maps, scores)` (`scoring.compile_step` runs it over
every device). Methods: `registry.names()`.

Adding a method: write one file here with a `Detector` subclass (its `SECTIONS`: the
config fields it reads with their defaults; `fit`, `score_function`, `record`,
`restore`), add one line to `registry.METHODS`, and every job takes it: `configs/fit.py`,
`configs/evaluate.py`, `configs/score.py`, ensembles as a member. (`registry.register`
does the same at run time, e.g. for a notebook's own detector.) Detector modules import
JAX models, training code and Orbax inside their methods: the job configs read every
method's `SECTIONS` and must stay cheap to load.
"""

import importlib

# Imported on first use: the job configs import `registry` and must not load JAX.
_EXPORTS = {
  "ArtifactError": "maeday_jax.detectors.weights_ref",
  "Detector": "maeday_jax.detectors.base",
  "NormalImages": "maeday_jax.detectors.base",
  "create": "maeday_jax.detectors.fitting",
  "fit_with_statistics": "maeday_jax.detectors.fitting",
  "normal_images": "maeday_jax.detectors.fitting",
  "is_artifact": "maeday_jax.detectors.artifact",
  "load": "maeday_jax.detectors.artifact",
  "read_manifest": "maeday_jax.detectors.artifact",
  "save": "maeday_jax.detectors.artifact",
}

__all__ = [*sorted(_EXPORTS), "registry"]


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  if name == "registry":
    return importlib.import_module("maeday_jax.detectors.registry")
  raise AttributeError(f"module 'maeday_jax.detectors' has no attribute {name!r}")
