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

from maeday_jax import atomic_files, data, defaults, evaluation, pictures, reports
from maeday_jax.detectors import ensemble as detector_ensemble
from maeday_jax.detectors import fitting, registry
from maeday_jax.jobs import category_run, common, detector_choice, run_report
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
  names = methods(config)
  for detector in {DETECTORS[n](config) for n in names} - {"ensemble", "patchcore_x2"}:
    registry.get(detector).validate(config)
  if _needs(names, "patchcore", "patchcore_x2", "ensemble"):
    registry.get("patchcore").validate(config)


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


# The paper's method names -> the detectors that compute them.
DETECTORS = {
  "maeday": lambda config: f"maeday_{config.train.finetune}",
  "patchcore": lambda config: "patchcore",
  "patchcore_x2": lambda config: "patchcore_x2",
  "ensemble": lambda config: "ensemble",
}


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


class Detectors:
  """The detectors of a few-shot run: networks loaded once, fitted per category and seed
  on the same shots, ensembles built from the fitted members (nothing fitted twice)."""

  def __init__(self, config, names: list[str]):
    self.config, self.names = config, names
    self.maeday = self.patchcore = None
    if _needs(names, "maeday", "ensemble"):
      self.maeday = registry.create(DETECTORS["maeday"](config), config)
      self.maeday.build()
    if _needs(names, "patchcore", "patchcore_x2", "ensemble"):
      self.patchcore = registry.create("patchcore", config)
      self.patchcore.build()
    if "ensemble" in names and self.patchcore.input_size != self.maeday.input_size:
      common.require(
        False,
        "patchcore.image_size",
        f"the ensemble sums maps of one input size: set it to the MAE's {self.maeday.input_size}.",
      )

  def fit(self, normals, seed: int, notes: dict) -> tuple[dict, dict]:
    """({method: fitted detector}, {part: fitted detector}) for one category and seed;
    `notes` gets the ensembles' standardisations."""
    key = jax.random.key(seed)
    parts = {}
    if self.maeday is not None:
      parts["maeday"] = fitting.fit_with_statistics(self.maeday.with_seed(seed), normals, key)
    if self.patchcore is not None:
      parts["patchcore"] = fitting.fit_with_statistics(self.patchcore.with_seed(seed), normals, key)
    if "patchcore_x2" in self.names:
      second = self.patchcore.with_seed(seed).with_bank(1)
      parts["patchcore_b"] = fitting.fit_with_statistics(second, normals, key)
    combos = {
      "ensemble": (detector_ensemble.Ensemble, ("maeday", "patchcore")),
      "patchcore_x2": (detector_ensemble.PatchCoreX2, ("patchcore", "patchcore_b")),
    }
    fitted = {}
    for name in self.names:
      if name not in combos:
        fitted[name] = parts[name]
        continue
      cls, members = combos[name]
      settings = registry.settings_of(cls, self.config)
      settings.seed = seed
      if "members" in settings:
        settings.members = ",".join(parts[m].method for m in members)
      combined = cls.from_fitted(settings, [parts[m] for m in members])
      for member, norm in zip(members, combined.norms, strict=True):
        notes[f"{name}/{member}"] = norm or (
          "raw sum: normalize is off"
          if not self.config.ensemble.normalize
          else "raw sum: fewer than two held-out normal images (or no spread) to standardise"
        )
      fitted[name] = combined
    return fitted, parts

  def scoring(self, detector) -> evaluation.Scoring:
    return detector_choice.scoring(detector, self.config)


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
  detectors = Detectors(config, names)

  per_seed = {name: [] for name in names}
  adaptation = []
  for seed in config.seeds:
    seed_dir = workdir / f"seed_{seed}"
    outcomes = {name: {} for name in names}
    for category in categories:
      normals, record = fitting.normal_images(
        config, category, seed_dir / "adapt" / category, seed=seed
      )
      notes = {}
      fitted, parts = detectors.fit(normals, seed, notes)
      if "maeday" in parts:
        record.update(parts["maeday"].history)
      record.pop("category")
      if notes:
        record["ensemble_normalization"] = notes
      adaptation.append({"category": category, **record})
      for name in names:
        out_dir = _method_dir(seed_dir, names, name)
        outcomes[name][category] = run_category(
          detectors.scoring(fitted[name]), category, config, out_dir, seed=seed
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
