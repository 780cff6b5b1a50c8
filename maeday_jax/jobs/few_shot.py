"""The few-shot job: per category and seed, adapt or fit on k normal shots, then score.

    python -m maeday_jax.main --config configs/few_shot.py --workdir runs/few_shot
    ... --config.method=maeday,patchcore,patchcore_x2,ensemble   # Table 1/2 side by side

Every method of a run sees the same shots (and the same held-out normals). MAEDAY
adapts the MAE (LoRA or full fine-tuning); PatchCore fits a memory bank on the shots'
backbone features; patchcore_x2 sums two banks from different coreset keys; ensemble sums
MAEDAY and PatchCore (standardised by held-out normal statistics unless
`ensemble.normalize=False`; see `maeday_jax.ensemble`).

Outputs under the work directory:
  seed_<s>/...          the zero-shot outputs (scores.csv, maps, panels, metrics.json...)
                        of shot selection s; with another method than MAEDAY alone, under
                        seed_<s>/<method>/
  seed_<s>/adapt/<category>/   resumable training checkpoints and the merged model
  seed_<s>/comparison/<category>/  several methods: their maps side by side (panels)
  metrics.json, metrics.md     mean ± std over seeds per category and group (several
                        methods: one summary per method, one table with a column each)
  adaptation.json       shots, held-out reconstruction loss before/after, training
                        times, ensemble statistics
"""

import logging

import jax
import ml_collections
import numpy as np

from maeday_jax import (
  atomic_files,
  backbones,
  data,
  defaults,
  ensemble,
  evaluation,
  few_shot,
  parallel,
  patchcore,
  pictures,
  reports,
)
from maeday_jax.jobs import category_run, common, run_report
from maeday_jax.jobs.category_run import run_category
from maeday_jax.jobs.outputs import output_path

log = logging.getLogger("maeday_jax")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the scoring and few-shot settings before any long work starts."""
  common.validate_scoring(config)
  common.require(config.shots >= 1, "shots", f"must be >= 1, got {config.shots}.")
  common.require(len(config.seeds) >= 1, "seeds", "give at least one seed, e.g. 0,1,2.")
  common.require(
    config.train.finetune in defaults.FINETUNE_MODES,
    "train.finetune",
    f"{config.train.finetune!r} is not one of {defaults.FINETUNE_MODES}.",
  )
  common.require(config.train.steps >= 0, "train.steps", "must be >= 0.")
  common.require(config.train.batch_size >= 1, "train.batch_size", "must be >= 1.")
  common.require_divides_devices(config.train.batch_size, "train.batch_size")
  common.require(
    config.train.lora.compute in defaults.LORA_COMPUTE_MODES,
    "train.lora.compute",
    f"{config.train.lora.compute!r} is not one of {defaults.LORA_COMPUTE_MODES}.",
  )
  common.require(config.train.lora.rank >= 1, "train.lora.rank", "must be >= 1.")
  methods(config)  # Checks the method names.
  pc = config.patchcore
  common.require(0.0 < pc.coreset_ratio <= 1.0, "patchcore.coreset_ratio", "must be in (0, 1].")
  common.require(pc.image_size >= 32, "patchcore.image_size", "must be >= 32.")


def methods(config: ml_collections.ConfigDict) -> list[str]:
  """The methods `config.method` names (comma-separated), checked, in the given order."""
  names = config.method if isinstance(config.method, (list, tuple)) else config.method.split(",")
  names = [n.strip() for n in names if n.strip()]
  unknown = [n for n in names if n not in defaults.FEW_SHOT_METHODS]
  common.require(
    bool(names) and not unknown,
    "method",
    f"{', '.join(unknown) or 'nothing'} is not among {', '.join(defaults.FEW_SHOT_METHODS)}.",
  )
  return list(dict.fromkeys(names))


def _needs(names, *wanted) -> bool:
  return any(n in names for n in wanted)


def check_shots(config: ml_collections.ConfigDict, categories) -> None:
  """Checks that every category has at least `shots` normal training images (this reads,
  and on first use prepares, the training splits; the model is not loaded yet)."""
  for category in categories:
    train = data.load_split(config.data, category, "train")
    common.require(
      config.shots <= len(train),
      "shots",
      f"{config.shots} shots, but {config.data.name}/{category} has only {len(train)} "
      "normal training images; use at most that many.",
    )


def _images(split: data.Split, indices, size: int) -> np.ndarray:
  return np.stack([data.load_example(split, int(i), size)["image"] for i in indices])


def heldout_indices(split: data.Split, shots: list[int], count: int, seed: int) -> list[int]:
  """Up to `count` normal training images that are not shots (deterministic from seed)."""
  available = len(split) - len(shots)
  if count <= 0 or available <= 0:
    return []
  ranked = data.select_shots(split, min(len(split), count + len(shots)), seed + 1_000_003)
  return [i for i in ranked if i not in set(shots)][:count]


def select(config, train_split: data.Split, seed: int) -> tuple[list[int], list[int], dict]:
  """The shots and held-out normals of one category and seed (the same for every method)."""
  shots = data.select_shots(train_split, config.shots, seed)
  heldout = heldout_indices(train_split, shots, config.heldout_normals, seed)
  record = {
    "seed": seed,
    "shots": [train_split.file_name(i) for i in shots],
    "heldout": [train_split.file_name(i) for i in heldout],
  }
  return shots, heldout, record


def adapt_category(
  model, params, train_split, shots, heldout, seed, config, mesh, workdir
) -> tuple[dict, dict]:
  """Fine-tunes and merges the MAE on the shots; returns (merged params, its record)."""
  key = jax.random.key(seed)
  record = {}
  heldout_images = _images(train_split, heldout, model.img_size) if heldout else None
  if heldout_images is not None:
    record["heldout_loss_before"] = few_shot.heldout_loss(model, params, heldout_images, key)
  merged, history = few_shot.adapt(
    model,
    params,
    _images(train_split, shots, model.img_size),
    jax.random.fold_in(key, 1),
    config.train,
    mesh=mesh,
    workdir=workdir,
  )
  if heldout_images is not None:
    record["heldout_loss_after"] = few_shot.heldout_loss(model, merged, heldout_images, key)
  record.update(
    train_loss_first=history["loss"][0] if history["loss"] else None,
    train_loss_last=history["loss"][-1] if history["loss"] else None,
    compile_time_s=history["compile_time_s"],
    train_time_s=float(np.sum(history["step_time_s"])),
    trainable_params=history["trainable_params"],
    resumed_from_step=history["start_step"],
  )
  log.info(
    "%s seed %d: held-out loss %s -> %s; %d steps in %.1f s",
    train_split.category,
    seed,
    record.get("heldout_loss_before"),
    record.get("heldout_loss_after"),
    len(history["loss"]),
    record["train_time_s"],
  )
  return merged, record


def _standardization(scoring, images, config, name, notes) -> ensemble.Standardization:
  """The ensemble statistics of one detector on the held-out normals (or the raw sum)."""
  if not config.ensemble.normalize:
    return ensemble.RAW
  norm = None
  if images is not None:
    norm = ensemble.Standardization.fit(*evaluation.score_images(scoring, images))
  if norm is None:
    notes[name] = "raw sum: fewer than two held-out normal images (or no spread) to standardise"
    return ensemble.RAW
  notes[name] = norm.to_dict()
  return norm


class Detectors:
  """The detectors of a few-shot run, built once, and their per-category scorings."""

  def __init__(self, config, scoring: evaluation.Scoring, names: list[str]):
    self.config, self.base, self.names = config, scoring, names
    self.backbone = None
    if _needs(names, "patchcore", "patchcore_x2", "ensemble"):
      self.backbone, variables = load_backbone(config.patchcore, config.seed)
      self.variables = parallel.replicate(variables, scoring.mesh)
      self.patchcore_fn = _patchcore_score_fn(self.backbone, scoring.mesh)
    if "ensemble" in names:
      common.require(
        config.patchcore.image_size == scoring.model.img_size,
        "patchcore.image_size",
        f"the ensemble sums maps of one input size: set it to the MAE's {scoring.model.img_size}.",
      )

  def patchcore(self, train_split, shots, seed: int, bank_index: int = 0):
    """The PatchCore scoring of one bank fitted on the shots (key from seed and index)."""
    size = self.config.patchcore.image_size
    key = jax.random.fold_in(jax.random.key(seed), 100 + bank_index)
    bank = patchcore.fit(
      self.backbone,
      self.variables,
      _images(train_split, shots, size),
      key,
      coreset_ratio=self.config.patchcore.coreset_ratio,
    )
    state = (self.variables, parallel.replicate(bank, self.base.mesh))
    return self.base.with_function(self.patchcore_fn, state, size)

  def scorings(self, train_split, shots, heldout, seed, merged, notes) -> dict:
    """{method: Scoring} for one category and seed."""
    parts = {}
    if merged is not None:
      parts["maeday"] = self.base.with_params(merged, key=jax.random.key(seed))
    if self.backbone is not None:
      parts["patchcore"] = self.patchcore(train_split, shots, seed)
    if "patchcore_x2" in self.names:
      parts["patchcore_b"] = self.patchcore(train_split, shots, seed, bank_index=1)
    combos = {"ensemble": ("maeday", "patchcore"), "patchcore_x2": ("patchcore", "patchcore_b")}
    out = {}
    for name in self.names:
      if name not in combos:
        out[name] = parts[name]
        continue
      members = [parts[m] for m in combos[name]]
      norms = []
      for member_name, member in zip(combos[name], members, strict=True):
        images = _images(train_split, heldout, member.image_size) if heldout else None
        norms.append(_standardization(member, images, self.config, f"{name}/{member_name}", notes))
      score_fn = ensemble.sum_score_fn([m.score_fn for m in members], norms)
      replicated = tuple(m.replicated for m in members)
      first = members[0]
      out[name] = first.with_function(
        score_fn, replicated, first.image_size, model=first.model, params=first.params
      )
    return out


def load_backbone(pc_config, seed: int):
  """The PatchCore backbone and its variables from `config.patchcore`."""
  if pc_config.backbone == defaults.RANDOM_WEIGHTS:
    log.warning("PatchCore backbone with RANDOM weights: its figures are meaningless.")
    model = backbones.create(pc_config.variant)
    return model, backbones.init_variables(model, jax.random.key(seed))
  return backbones.load_backbone(pc_config.backbone, cache_dir=pc_config.cache_dir or None)


def _patchcore_score_fn(model, mesh):
  score = patchcore.make_scorer(model, mesh)

  def score_fn(state, images, ids, key):
    del ids, key  # PatchCore is deterministic given its bank.
    return score(state, images)

  return score_fn


def write_comparisons(seed_dir, names, outcomes: dict, category: str, config) -> None:
  """Side-by-side maps of every method for the category's showcase images (process 0)."""
  first = outcomes[names[0]]
  count = len(first.result.file_names) if config.outputs.panels < 0 else config.outputs.panels
  if len(names) < 2 or count <= 0 or jax.process_index() != 0:
    return
  split = first.splits[0]
  by_name = {split.file_name(i): i for i in range(len(split))}
  for position in category_run.showcase_order(first.result)[:count]:
    name = first.result.file_names[position]
    try:
      example = split[by_name[name]]
      maps = {}
      for method in names:
        path = output_path(_method_dir(seed_dir, names, method), "maps", category, name, ".npz")
        with np.load(path) as f:
          maps[reports.METHOD_TITLES.get(method, method)] = f["map"]
      has_truth = example["label"] >= 0
      target = output_path(seed_dir, "comparison", category, name, ".png")
      pictures.save_comparison_panel(
        target, example["image"], example["mask"] if has_truth else None, maps, title=name
      )
    except (OSError, KeyError, ValueError) as e:  # One picture must not stop the run.
      log.error("Could not draw the method comparison for %s: %s", name, e)


def _method_dir(seed_dir, names: list[str], name: str):
  # A MAEDAY-only run keeps the layout of earlier versions (seed_<s>/scores.csv ...).
  return seed_dir if names == ["maeday"] else seed_dir / name


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Few-shot adaptation and scoring for every category, seed and method; returns the
  summary (with several methods: `{"methods": {method: summary}, ...}`)."""
  validate(config)
  names = methods(config)
  categories = data.resolve_categories(config.data)
  workdir = common.prepare_workdir(workdir, config)
  check_shots(config, categories)
  model, params = common.load_model(config.model, config.seed)
  scoring = evaluation.Scoring.from_config(model, params, config)
  mesh = scoring.mesh
  common.describe_model(model, mesh, categories)
  detectors = Detectors(config, scoring, names)

  per_seed = {name: [] for name in names}
  adaptation = []
  for seed in config.seeds:
    seed_dir = workdir / f"seed_{seed}"
    outcomes = {name: {} for name in names}
    for category in categories:
      train_split = data.load_split(config.data, category, "train")
      shots, heldout, record = select(config, train_split, seed)
      merged = None
      if _needs(names, "maeday", "ensemble"):
        merged, adapt_record = adapt_category(
          model,
          params,
          train_split,
          shots,
          heldout,
          seed,
          config,
          mesh,
          seed_dir / "adapt" / category,
        )
        record.update(adapt_record)
      notes = {}
      scorings = detectors.scorings(train_split, shots, heldout, seed, merged, notes)
      if notes:
        record["ensemble_normalization"] = notes
      adaptation.append({"category": category, **record})
      for name in names:
        out_dir = _method_dir(seed_dir, names, name)
        outcomes[name][category] = run_category(
          scorings[name], category, config, out_dir, seed=seed
        )
        # Each finished category is on disk at once: a later error or a kill loses none.
        summary = run_report.summarize_outcomes(outcomes[name], config.data.name, seed=seed)
        if jax.process_index() == 0:
          run_report.write_scores(out_dir, outcomes[name])
          reports.write_metrics_json(out_dir / "metrics.json", summary)
      write_comparisons(
        seed_dir, names, {n: outcomes[n][category] for n in names}, category, config
      )
    for name in names:
      per_seed[name].append(
        run_report.summarize_outcomes(outcomes[name], config.data.name, seed=seed)
      )

  combined = {name: reports.summarize_seeds(per_seed[name]) for name in names}
  result = combined[names[0]] if len(names) == 1 else {"methods": combined}
  result["adaptation"] = adaptation
  if jax.process_index() == 0:
    reports.write_metrics_json(workdir / "metrics.json", result)
    common.write_json(workdir / "adaptation.json", adaptation)
    if len(names) == 1:
      reports.write_markdown_table(
        workdir / "metrics.md",
        result,
        config.data.name,
        "few_shot",
        shots=config.shots,
        paper_row=reports.METHOD_PAPER_ROWS[names[0]] if names[0] != "maeday" else None,
      )
      print(reports.format_summary_table(result))
    else:
      table = reports.methods_markdown_table(combined, config.data.name, config.shots)
      atomic_files.write_text(workdir / "metrics.md", table)
      print(table)
    print(f"\nOutputs in {workdir}")
  return result
