"""Public weights that an artifact references by name and SHA-256 instead of copying.

A fitted detector built on a public checkpoint (`mae_vit_large`, `wide_resnet50_2`, ...)
records `{"kind", "name", "sha256"}`; where the artifact is loaded, the name is resolved
through the usual download cache and the file's SHA-256 must match, so an artifact never
silently runs on other weights. Weights that are not public (random, local files, adapted)
are stored inside the artifact instead.
"""

from __future__ import annotations

from maeday_jax.config_errors import ConfigError


class ArtifactError(ConfigError):
  """A detector artifact cannot be used; the message names the file and what to do."""


def reference(name: str, kind: str, cache_dir=None) -> dict | None:
  """`{"kind", "name", "sha256"}` when `name` is a known public name of `kind` ('mae' or
  'backbone', `models.weights.KNOWN`), its file downloaded (once) and hashed; None when
  the weights are not public and must be stored in the artifact."""
  from maeday_jax.models import weights

  if not weights.is_known(name, kind):
    return None
  path = weights.resolve(name, cache_dir, kind=kind)
  return {"kind": kind, "name": name, "sha256": weights.sha256_of(path)}


def check(reference: dict, cache_dir=None) -> None:
  """Resolves a referenced public file (downloading it where missing) and checks its
  SHA-256 against the one recorded at fit time.

  Raises:
    ArtifactError: the name is unknown here, or the file under it is another file.
  """
  from maeday_jax.models import weights

  name = reference["name"]
  if not weights.is_known(name, reference["kind"]):
    raise ArtifactError(
      f"the detector references the public weights {name!r}, which this maeday_jax does "
      "not know; install the version that fitted it, or refit."
    )
  path = weights.resolve(name, cache_dir, kind=reference["kind"])
  found = weights.sha256_of(path)
  if found != reference["sha256"]:
    raise ArtifactError(
      f"the detector was fitted on {name} with SHA-256 {reference['sha256'][:16]}..., but "
      f"{path} has {found[:16]}...: another file under the same name. Delete it so it is "
      "downloaded again, or refit the detector on these weights."
    )


def mae_reference(model_config) -> dict | None:
  """The reference of `model_config.checkpoint` when it is a public MAE name."""
  return reference(str(model_config.checkpoint), "mae", model_config.get("cache_dir") or None)


def backbone_reference(name: str, cache_dir=None) -> dict | None:
  """The reference of a public backbone name (torchvision's ImageNet ResNets)."""
  return reference(name, "backbone", cache_dir)


def load_referenced_mae(reference: dict, dtype, attention: str, cache_dir=None):
  """(model, params) of a referenced public MAE, checked against its recorded SHA-256."""
  from maeday_jax import checkpoints

  check(reference, cache_dir)
  return checkpoints.load_mae(
    reference["name"], dtype=dtype, attention=attention, cache_dir=cache_dir
  )


def load_referenced_backbone(reference: dict, cache_dir=None):
  """(model, variables) of a referenced public backbone, checked against its SHA-256."""
  from maeday_jax import backbones

  check(reference, cache_dir)
  return backbones.load_backbone(reference["name"], cache_dir=cache_dir)
