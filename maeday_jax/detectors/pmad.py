"""PMAD (AAAI 2023): proposal-masked reconstruction, one model for many product lines.

Fit (on data sources, like MALA):
  1. the reconstructor (`models.pmad_vit`: ViT encoder + decoder of the same shape, [M]
     tokens) is trained on the normal images of `data` and `extra_data`
     (`maeday_jax.pmad.training`), or taken from an earlier fit
     (`pmad.reconstructor=<folder>`: the cross-class protocol, nothing retrained);
  2. the prototypes: a greedy coreset (`coreset_ratio`) of the frozen feature network's
     patch features of `data`'s normal images (every category of `data`: one bank);
  3. the flow (`pmad.flow`): affine couplings fitted on residuals (patch feature minus its
     nearest prototype) of half of those images against prototypes of the other half,
     so that the residuals it learns look like a new normal image's (residuals of the
     images the bank was built from would be exactly 0 for the prototypes themselves).
     `flow.projection_dim` > 0 first projects residuals on that many fixed random
     orthogonal directions.
Score (per image, deterministic):
  residuals -> flow log-likelihoods ll -> abnormality a_i = 1 - exp(ll_i - max_j ll_j)
  (`pmad.proposal.abnormality`: the paper's max_j exp(ll_j) - exp(ll_i) without the
  per-image factor exp(max ll), which float32 cannot hold for hundreds of dimensions);
  the round(mask_ratio * N) most abnormal patches are masked and reconstructed; a masked
  patch's term is the entropy of its predicted code distribution (token targets;
  `scoring='entropy'`, the paper's) or -log p of the patch's own code (`'surprise'`), or
  its squared error (feature / pixel targets), times a_i; unmasked patches score 0.
  `scoring='flow'` scores every patch by -ll alone (no reconstruction). Map: the patch
  terms upsampled (nearest) and Gaussian-smoothed (sigma 4, as PatchCore); image score:
  the map's maximum.

The artifact stores the reconstructor, prototypes, projection, flow and codebook, and the
feature network's weights unless they are a public checkpoint (then referenced by name
and SHA-256).
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import tempfile
from typing import Any

from maeday_jax.config_errors import require
from maeday_jax.detectors import weights_ref
from maeday_jax.detectors.base import Detector
from maeday_jax.detectors.mae import pretrain_section, pretraining_config
from maeday_jax.settings import model as model_settings
from maeday_jax.settings import pmad as pmad_settings

log = logging.getLogger("maeday_jax")

FEATURES_DIR = "pmad_features"  # Under the fit's work directory: the feature MAE trained here.


def _fraction(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value < 1.0


def validate_section(section) -> None:
  """Checks PMAD's settings before any data or network is loaded.

  Raises:
    ConfigError: naming the field and what to do.
  """
  from maeday_jax.models import pmad_vit
  from maeday_jax.parallel import require_divides_devices
  from maeday_jax.pmad import training

  require(
    section.target in pmad_settings.TARGETS,
    "pmad.target",
    f"{section.target!r}: use one of {', '.join(pmad_settings.TARGETS)}.",
  )
  require(
    section.variant in pmad_vit.VARIANTS,
    "pmad.variant",
    f"{section.variant!r}: use one of {', '.join(pmad_vit.VARIANTS)}.",
  )
  patch = pmad_vit.VARIANTS[section.variant]["patch_size"]
  size = section.image_size
  require(
    isinstance(size, int) and size >= 2 * patch and size % patch == 0,
    "pmad.image_size",
    f"{size!r} is not a multiple of the {section.variant} model's {patch}-px patches (and "
    "at least two of them); e.g. 224.",
  )
  require(
    _fraction(section.mask_ratio),
    "pmad.mask_ratio",
    f"{section.mask_ratio!r} must be in (0, 1): the fraction of patches masked.",
  )
  try:
    ratios = pmad_settings.parse_ratios(section.mask_ratios)
  except ValueError as e:
    require(False, "pmad.mask_ratios", f"{e}; e.g. 'bottle=0.3,cable=0.2'.")
  for name, ratio in ratios.items():
    require(_fraction(ratio), "pmad.mask_ratios", f"{name}={ratio}: a ratio must be in (0, 1).")
  require(
    _fraction(section.train.mask_ratio),
    "pmad.train.mask_ratio",
    f"{section.train.mask_ratio!r} must be in (0, 1).",
  )
  training.parse_strategies(section.train.strategies)
  check_scoring(section.get("scoring", "entropy"), section.target, True)
  require(
    isinstance(section.coreset_ratio, (int, float)) and 0.0 < section.coreset_ratio <= 1.0,
    "pmad.coreset_ratio",
    f"{section.coreset_ratio!r} must be in (0, 1].",
  )
  require(section.codebook_size >= 2, "pmad.codebook_size", "must be >= 2.")
  from maeday_jax.recipe_checks import check_load_short_side

  check_load_short_side(section.train.get("load_short_side", 0), "pmad.train.load_short_side")
  require(
    section.get("coreset_max_rows", 0) >= 0, "pmad.coreset_max_rows", "must be >= 0 (0 = all)."
  )
  flow = section.flow
  for field in ("couplings", "hidden", "steps", "batch_size"):
    require(flow[field] >= 1, f"pmad.flow.{field}", f"must be >= 1, got {flow[field]}.")
  require(flow.projection_dim >= 0, "pmad.flow.projection_dim", "must be >= 0 (0 = none).")
  require(math.isfinite(flow.lr) and flow.lr > 0, "pmad.flow.lr", f"must be > 0, got {flow.lr}.")
  require(section.train.batch_size >= 1, "pmad.train.batch_size", "must be >= 1.")
  require_divides_devices(section.train.batch_size, "pmad.train.batch_size")
  if section.reconstructor:
    require(
      os.path.isdir(os.path.expanduser(section.reconstructor)),
      "pmad.reconstructor",
      f"{section.reconstructor}: no such folder; give the reconstructor/ folder of an earlier "
      "PMAD fit, or '' to train one.",
    )
  else:
    steps = section.train.get("steps") or 0
    require(
      steps > 0 or section.train.epochs > 0,
      "pmad.train.epochs",
      "and pmad.train.steps are both 0: set either (or give pmad.reconstructor).",
    )


def check_scoring(how: str, target: str, has_codebook: bool) -> None:
  """Checks a way of scoring patches against the target.

  Raises:
    ConfigError: naming `pmad.scoring`.
  """
  require(
    how in pmad_settings.SCORINGS,
    "pmad.scoring",
    f"{how!r}: use one of {', '.join(pmad_settings.SCORINGS)}.",
  )
  require(
    how != "surprise" or target == "codebook" or target in ("features", "pixels"),
    "pmad.scoring",
    "'surprise' needs the patches' own codes at scoring: use it with target=codebook "
    "(dvae would need the tokenizer at scoring), or 'entropy'.",
  )
  require(
    how != "surprise" or target != "codebook" or has_codebook,
    "pmad.scoring",
    "'surprise' needs the codebook, which this reconstructor folder does not hold (it was "
    "trained by an earlier version); retrain it, or use 'entropy'.",
  )


class Pmad(Detector):
  """Proposal-masked reconstruction: entropy (or error) x abnormality of masked patches."""

  method = "pmad"
  summary = "PMAD: proposal-masked reconstruction, cross-class (normal images only)"
  trains_on_sources = True
  SECTIONS = {
    "pmad": pmad_settings.pmad_config,
    "extra_data": lambda: [],
    # Read only with `pmad.features.checkpoint='pretrain'` (the feature MAE trained here).
    "model": model_settings.model_config,
    "pretrain": pretrain_section,
  }

  def __init__(self, settings):
    super().__init__(settings)
    self._net = None  # The feature network (`models.load`).
    self._weights: weights_ref.PublicWeights | None = None
    self._model = None  # The reconstructor.
    self._target = str(settings.pmad.target)
    self._mask_ratio = float(settings.pmad.mask_ratio)
    self._scoring = str(settings.pmad.get("scoring", "entropy"))
    self._flow_dim = 0
    self.training: dict = {}

  @classmethod
  def validate(cls, config) -> None:
    validate_section(config.pmad)
    if config.pmad.features.checkpoint == pmad_settings.PRETRAIN:
      from maeday_jax import recipe_checks

      recipe_checks.validate_pretrain_train(config.pretrain.train, "pretrain.train")

  @property
  def input_size(self) -> int:
    return int(self.settings.pmad.image_size)

  def describe(self) -> str:
    section = self.settings.pmad
    return f"pmad ({section.variant}, {self._target} targets, {section.features.backbone})"

  # ------------------------------------------------------------------------ fitting

  def _load_features(self, checkpoint: str | None = None) -> None:
    """The feature network, from `features.checkpoint` (or `checkpoint`, a folder the fit
    trained it into)."""
    import jax

    from maeday_jax import models
    from maeday_jax.models import weights

    features = self.settings.pmad.features
    checkpoint = checkpoint or features.checkpoint or features.backbone
    if checkpoint == "random":
      log.warning("pmad with a RANDOM %s: its figures are meaningless.", features.backbone)
    self._net = models.load(features.backbone, checkpoint, key=jax.random.key(self.settings.seed))
    known = weights.KNOWN.get(str(checkpoint))
    self._weights = None if known is None else weights_ref.PublicWeights(checkpoint, known.kind)

  def _train_features(self, data, extra, workdir: pathlib.Path) -> str | None:
    """With `features.checkpoint='pretrain'`: trains (or resumes) the feature MAE on the
    normal images, as the `mae` detector pre-trains (`model`, `pretrain` sections), and
    returns its exported folder; otherwise None (the configured checkpoint)."""
    if self.settings.pmad.features.checkpoint != pmad_settings.PRETRAIN:
      return None
    from maeday_jax.pretrain import loop

    config = pretraining_config(self.settings, data, extra, self.settings.pretrain)
    self.training["features"] = loop.train(config, workdir / FEATURES_DIR)
    return str(workdir / FEATURES_DIR / loop.MODEL_DIR)

  def _feature_size(self) -> int:
    return int(self.settings.pmad.features.image_size or 0)

  def _grid(self) -> int:
    return self._model.grid_size

  def fit(self, normals, key) -> None:
    import jax

    from maeday_jax import tiling as tiles
    from maeday_jax.pmad import training
    from maeday_jax.pretrain import inputs

    if normals.data is None:
      raise ValueError("the pmad detector trains on data sources: fit it through a job config.")
    section = self.settings.pmad
    self.training = {}
    # The prototypes' images first: a category without normal images is refused (by
    # name) before anything trains. Tiled, the prototypes are those of the tiles.
    tiling = self.tiling
    size = self.input_size if tiling is None else tiling.image_size
    aspect = None if tiling is None else tiling.aspect
    sources = inputs.training_sources([normals.data])
    images, _ = inputs.load_images(sources, size, True, aspect=aspect)
    if tiling is not None and tiling.native:
      from maeday_jax import tiling_native

      images = tiling_native.tiles_of(images, tiling, tiling.model_size)
    elif tiling is not None:
      images = tiles.cut_arrays(images, tiling)
    extra = list(self.settings.get("extra_data", [])) or normals.extra_data
    with tempfile.TemporaryDirectory() as scratch:
      workdir = pathlib.Path(normals.workdir or scratch)
      self._load_features(self._train_features(normals.data, extra, workdir))
      path = section.reconstructor
      if not path:
        tiles.warn_if_training_reads_differ(
          tiling, section.train.get("load_short_side", 0), "pmad.train.load_short_side"
        )
        summary = training.train(
          section,
          int(self.settings.seed),
          [normals.data, *extra],
          workdir / "pmad_training",
          self._frozen_parts,
        )
        self.training = {**self.training, **summary}  # Beside the feature MAE's, if any.
        path = summary["reconstructor_dir"]
      self._model, params, record = training.load_reconstructor(path)
    self._check_reconstructor(record, path)
    self._target = record["target"]
    ratios = pmad_settings.parse_ratios(section.mask_ratios)
    self._mask_ratio = float(ratios.get(normals.category or "", section.mask_ratio))
    features = training.features_of(
      self._net, images, section.features.layers, self._grid(), self._feature_size()
    )
    k_proto, k_half, k_proj, k_flow = jax.random.split(key, 4)
    prototypes = self._prototypes(features, k_proto)
    projection = self._projection(features.shape[-1], k_proj)
    residuals = self._flow_residuals(features, k_half)
    flow_params = self._fit_flow(residuals @ projection, k_flow)
    self.state = {
      "reconstructor": params,
      "features": self._net.params,
      "prototypes": jax.numpy.asarray(prototypes),
      "projection": jax.numpy.asarray(projection),
      "flow": flow_params,
    }
    if record.get("codebook") is not None:  # The patches' own codes: `surprise` scoring.
      self.state["codebook"] = jax.numpy.asarray(record["codebook"])
    self.fit_record = {"prototype_images": int(len(images)), **self.fit_record}

  def _frozen_parts(self, images_u8, grid: int):
    """The frozen target networks of the training and the output width."""
    from maeday_jax.pmad import training

    section = self.settings.pmad
    return training.frozen_networks(section, self._net, images_u8, grid, int(self.settings.seed))

  def _check_reconstructor(self, record: dict, path) -> None:
    """A reused reconstructor must predict what these settings' networks give."""
    from maeday_jax.config_errors import ConfigError

    features = self.settings.pmad.features.to_dict()
    trained = record.get("features", {})
    # Feature targets and codebook codes live in the feature network's space.
    if record["target"] in ("features", "codebook") and any(
      _plain(trained.get(k)) != _plain(v) for k, v in features.items()
    ):
      raise ConfigError(
        f"--config.pmad.reconstructor: {path} was trained on the features of "
        f"{trained.get('backbone')} ({trained.get('checkpoint') or 'public weights'}) layers "
        f"{trained.get('layers')}; set pmad.features to the same network, or train a "
        "reconstructor here."
      )
    if record["architecture"]["img_size"] != self.input_size:
      raise ConfigError(
        f"--config.pmad.image_size: {path} takes {record['architecture']['img_size']} px "
        f"images, not {self.input_size}; set pmad.image_size to match."
      )

  def _prototypes(self, features, key):
    import jax
    import numpy as np

    from maeday_jax import coreset

    rows = features.reshape(-1, features.shape[-1])
    section = self.settings.pmad
    sample_key, coreset_key = jax.random.split(key)
    limit = int(section.get("coreset_max_rows", 0) or 0)
    if limit and len(rows) > limit:
      # The greedy coreset reads every row once per prototype it picks: a uniform sample
      # first bounds that work (and its memory) on large training sets.
      keep = np.sort(np.asarray(jax.random.choice(sample_key, len(rows), (limit,), False)))
      rows = rows[keep]
    ratio = float(section.coreset_ratio)
    index = np.asarray(coreset.coreset_indices(rows, coreset_key, ratio)) if ratio < 1 else None
    return rows if index is None else rows[index]

  def _projection(self, width: int, key):
    """(C, d): fixed random orthonormal directions, or the identity when off."""
    import jax
    import numpy as np

    dim = int(self.settings.pmad.flow.projection_dim)
    if not dim or dim >= width:
      return np.eye(width, dtype=np.float32)
    gaussian = np.asarray(jax.random.normal(key, (width, dim)), np.float64)
    q, _ = np.linalg.qr(gaussian)
    return q.astype(np.float32)

  def _flow_residuals(self, features, key):
    """(M * N, C) residuals of one half of the images to prototypes of the other half."""
    import jax
    import numpy as np

    from maeday_jax.pmad import proposal

    count = len(features)
    if count < 2:
      log.warning("pmad: one normal image; its flow learns residuals to its own prototypes.")
      bank_rows, fit_rows = features, features
    else:
      order = np.asarray(jax.random.permutation(key, count))
      bank_rows, fit_rows = features[order[: count // 2]], features[order[count // 2 :]]
    bank = self._prototypes(bank_rows, jax.random.fold_in(key, 1))
    out = proposal.residuals(jax.numpy.asarray(fit_rows), jax.numpy.asarray(bank))
    return np.asarray(out).reshape(-1, features.shape[-1])

  def _fit_flow(self, samples, key):
    from maeday_jax.pmad import flow

    settings = self.settings.pmad.flow
    self._flow_dim = int(samples.shape[-1])
    params, losses = flow.fit_flow(
      key,
      samples,
      steps=int(settings.steps),
      batch_size=int(settings.batch_size),
      learning_rate=float(settings.lr),
      num_couplings=int(settings.couplings),
      hidden=int(settings.hidden),
    )
    self.training = {**self.training, "flow_final_nll": float(losses[-1])}
    return params

  # ------------------------------------------------------------------------ scoring

  @property
  def mask_ratio(self) -> float:
    """The fraction of patches masked at scoring (the most abnormal ones)."""
    return self._mask_ratio

  @property
  def scoring(self) -> str:
    """How a patch is scored (`settings.pmad.SCORINGS`)."""
    return self._scoring

  def set_scoring(self, how: str) -> None:
    """Scores patches another way from now on (`settings.pmad.SCORINGS`), e.g. to choose
    it on a validation split without refitting.

    Raises:
      ConfigError: an unknown way, or `surprise` without a codebook.
    """
    check_scoring(how, self._target, "codebook" in self.state)
    self._scoring = how

  def set_mask_ratio(self, ratio: float) -> None:
    """Masks another fraction of patches from now on (e.g. to choose it on a validation
    split without refitting); a score function made before keeps its own.

    Raises:
      ValueError: a ratio outside (0, 1).
    """
    if not _fraction(ratio):
      raise ValueError(f"mask ratio {ratio!r} must be in (0, 1).")
    self._mask_ratio = float(ratio)

  def _flow_module(self):
    from maeday_jax.pmad import flow

    settings = self.settings.pmad.flow
    return flow.CouplingFlow(
      self._flow_dim, num_couplings=int(settings.couplings), hidden=int(settings.hidden)
    )

  def step_signature(self):
    features = self.settings.pmad.features
    return (
      "pmad",
      self._model,
      self._target,
      self._mask_ratio,
      self._scoring,
      self._flow_dim,
      tuple(features.layers),
      self._feature_size(),
      str(self._net.model),
    )

  def score_function(self, mesh, local_batch: int):
    import dataclasses

    import jax.numpy as jnp

    from maeday_jax import patchcore
    from maeday_jax.pmad import features as pmad_features
    from maeday_jax.pmad import flow, proposal, targets

    del mesh, local_batch  # Per image; the prototypes are small.
    model, kind, ratio, how = self._model, self._target, self._mask_ratio, self._scoring
    check_scoring(how, kind, "codebook" in self.state)
    layers, size = tuple(self.settings.pmad.features.layers), self._feature_size()
    grid = self._grid()
    net, flow_module = self._net, self._flow_module()

    def score(state, images, ids, key):
      del ids, key  # Deterministic.
      batch = images.shape[0]
      feats = pmad_features.grid_features(
        dataclasses.replace(net, params=state["features"]), images, layers, grid, size
      )
      residuals = proposal.residuals(feats, state["prototypes"]) @ state["projection"]
      ll = flow.log_likelihood(
        state["flow"], flow_module, residuals.reshape(-1, residuals.shape[-1])
      ).reshape(batch, -1)
      if how == "flow":  # The prototypes' residual density alone, every patch.
        patch_scores = (-ll).reshape(batch, grid, grid)
      else:
        abnormality = proposal.abnormality(ll)
        masked = proposal.proposal_mask(ll, ratio)
        outputs = model.apply({"params": state["reconstructor"]}, images, masked)
        if not targets.is_categorical(kind):
          wanted = targets.regression_values(kind, images, feats, model.patch_size)
          term = targets.patch_losses(kind, outputs, wanted)
        elif how == "surprise":
          codes = targets.nearest_codes(feats, state["codebook"])
          term = targets.patch_losses(kind, outputs, codes)
        else:
          term = targets.entropy(outputs)
        patch_scores = jnp.where(masked, term * abnormality, 0.0).reshape(batch, grid, grid)
      maps = patchcore.anomaly_map(patch_scores, tuple(images.shape[1:3]))
      return maps, maps.reshape(batch, -1).max(axis=1)

    return score

  # ------------------------------------------------------------------------ artifact

  def saved_state(self) -> Any:
    return weights_ref.without_public(self.state, self._weights, "features")

  def record(self) -> dict:
    from maeday_jax.models import features, pmad_vit

    return {
      "reconstructor": pmad_vit.architecture(self._model),
      "target": self._target,
      "mask_ratio": self._mask_ratio,
      "scoring": self._scoring,
      "flow_dim": self._flow_dim,
      "features": weights_ref.network_record(self._weights, features.describe(self._net)),
      "training": self.training,
    }

  def restore(self, record: dict, state: Any) -> None:
    from maeday_jax.models import features, pmad_vit

    self._model = pmad_vit.ProposalReconstructor(**record["reconstructor"])
    self._target, self._mask_ratio = record["target"], float(record["mask_ratio"])
    self._scoring = record.get("scoring", "entropy")
    self._flow_dim = int(record["flow_dim"])
    self._weights, self._net, self.state = weights_ref.restore_network(
      record["features"],
      state,
      "features",
      self.settings.pmad.features.backbone,
      features.rebuild,
    )
    self.training = record.get("training", {})


def _plain(value):
  return list(value) if isinstance(value, (list, tuple)) else value
