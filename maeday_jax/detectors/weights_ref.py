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


class PublicWeights:
  """A public checkpoint a detector is built on: its name and kind at once, its SHA-256
  only when an artifact records it (`record`), so building a detector to score never
  reads the whole file again."""

  def __init__(self, name: str, kind: str, cache_dir=None, recorded: dict | None = None):
    self.name, self.kind, self.cache_dir, self._recorded = name, kind, cache_dir, recorded

  @classmethod
  def of(cls, name: str, kind: str, cache_dir=None) -> PublicWeights | None:
    """The public weights `name` stands for (a known name of `kind`), else None: weights
    that are not public must be stored in the artifact."""
    from maeday_jax.models import weights

    return cls(name, kind, cache_dir) if weights.is_known(name, kind) else None

  @classmethod
  def from_record(cls, record: dict) -> PublicWeights:
    """The weights an artifact references (`record()` of the detector that was saved)."""
    return cls(record["name"], record["kind"], recorded=dict(record))

  def record(self) -> dict:
    """`{"kind", "name", "sha256"}`, the file downloaded (once) and hashed on first use."""
    if self._recorded is None:
      from maeday_jax.models import weights

      path = weights.resolve(self.name, self.cache_dir, kind=self.kind)
      self._recorded = {"kind": self.kind, "name": self.name, "sha256": weights.sha256_of(path)}
    return self._recorded


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


def without_public(state: dict, weights: PublicWeights | None, key: str) -> dict:
  """The state an artifact stores: without `state[key]` (a network's parameters) when
  those are public weights, which the record references by name and hash instead."""
  return state if weights is None else {k: v for k, v in state.items() if k != key}


def network_record(weights: PublicWeights | None, architecture: dict) -> dict:
  """A feature-network detector's record: the network's architecture and its public
  weights' reference (None: the parameters are in the state)."""
  return {"architecture": architecture, "weights": None if weights is None else weights.record()}


def restore_network(record: dict, state: dict, key: str, backbone: str, wrap):
  """(weights, network, state) of a feature-network detector's `network_record`: the public
  weights fetched by name and checked by hash (their parameters put back at `state[key]`),
  or the stored ones wrapped by `wrap(architecture, params)`.

  Raises:
    ArtifactError: the referenced weights' SHA-256 differs from the recorded one.
  """
  from maeday_jax.models import features

  if not record.get("weights"):
    return None, wrap(record["architecture"], state[key]), state
  weights = PublicWeights.from_record(record["weights"])
  check(record["weights"])
  loaded = features.load(backbone, weights.name)
  return weights, loaded, {**state, key: loaded.params}


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
