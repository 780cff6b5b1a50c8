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
  report.html           the same table with the paper's numbers, every method and seed's
                        ROC / PR curves and thresholds, the first seed's worst cases
  adaptation.json       shots, held-out reconstruction loss before/after, training
                        times, ensemble statistics
"""

import logging

import jax
import ml_collections
import numpy as np

from maeday_jax import atomic_files, data, defaults, evaluation, html_report, pictures, reports
from maeday_jax.detectors import ensemble as detector_ensemble
from maeday_jax.detectors import fitting, registry
from maeday_jax.jobs import category_run, common, detector_choice, run_report
from maeday_jax.jobs.category_run import run_category
from maeday_jax.jobs.outputs import output_path
from maeday_jax.run_errors import RunFailed
from maeday_jax.weight_files import CheckpointError

log = logging.getLogger("maeday_jax")

# What one method may raise for one category and seed without stopping the others: its
# training diverged (`few_shot.adapt.AdaptationDiverged`), or its maps are not finite
# (`evaluation.score_split`).
METHOD_FAILURES = (FloatingPointError, CheckpointError)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the scoring and few-shot settings before any long work starts."""
  common.validate_scoring(config)
  common.require(config.shots >= 1, "shots", f"must be >= 1, got {config.shots}.")
  seeds(config)
  names = methods(config)
  # The ensembles are built from the single methods' fitted detectors: check those.
  parts = {part for name in names for part in PARTS[name]} - {"patchcore_b"}
  for part in sorted(parts):
    registry.get(DETECTORS[part](config)).validate(config)


def seeds(config: ml_collections.ConfigDict) -> list[int]:
  """`config.seeds`, checked: distinct integers 0 <= seed < 2**31, at least one.

  ml_collections parses `--config.seeds=a,b` as the one string 'a,b' and
  `--config.seeds=` as ('',); each seed names a folder (seed_<s>) and keys the shots.
  """
  given = config.seeds
  values = [given] if isinstance(given, (str, int)) else list(given or ())
  shown = ",".join(str(v) for v in values)
  common.require(
    bool(values) and values != [""],
    "seeds",
    "is empty: give at least one shot-selection seed, e.g. --config.seeds=0,1,2.",
  )
  common.require(
    all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in values),
    "seeds",
    f"{shown!r} is not a list of integers from 0 to 2**31 - 1; give e.g. --config.seeds=0,1,2.",
  )
  common.require(
    len(set(values)) == len(values),
    "seeds",
    f"{shown} names a seed twice: each seed is one shot selection (seed_<s>/).",
  )
  return values


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


# The recipe's method names -> the detectors that compute them.
DETECTORS = {
  "maeday": lambda config: f"maeday_{config.train.finetune}",
  "patchcore": lambda config: "patchcore",
  "patchcore_x2": lambda config: "patchcore_x2",
  "ensemble": lambda config: "ensemble",
  "anomalydino": lambda config: "anomalydino",
  "maeday_anomalydino": lambda config: "ensemble",
}
# The single detectors ("parts") each method needs; a method of several parts is their
# standardised sum (`detectors.ensemble`), built from the parts fitted once.
PARTS = {
  "maeday": ("maeday",),
  "patchcore": ("patchcore",),
  "anomalydino": ("anomalydino",),
  "ensemble": ("maeday", "patchcore"),
  "patchcore_x2": ("patchcore", "patchcore_b"),
  "maeday_anomalydino": ("maeday", "anomalydino"),
}


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
    needed = {part for name in names for part in PARTS[name]}
    # One detector per part, its network loaded once; `with_seed` twins share it.
    self.bases = {}
    for part in ("maeday", "patchcore", "anomalydino"):
      if part in needed:
        self.bases[part] = registry.create(DETECTORS[part](config), config)
        self.bases[part].build()
    self.second_bank = "patchcore_b" in needed

  def fit(self, normals, seed: int, notes: dict) -> tuple[dict, dict, dict]:
    """({method: fitted detector}, {part: fitted detector}, {method: why it failed}) for
    one category and seed; `notes` gets the ensembles' standardisations.

    Each part is fitted in its own try: one that diverges (`METHOD_FAILURES`) fails its
    methods (an ensemble fails with its member) and leaves the others fitted."""
    key = jax.random.key(seed)
    parts, broken = {}, {}

    def attempt(part: str, detector) -> None:
      try:
        parts[part] = fitting.fit_with_statistics(detector, normals, key)
      except METHOD_FAILURES as e:
        broken[part] = f"{detector.method}: {e}"

    for part, base in self.bases.items():
      attempt(part, base.with_seed(seed))
    if self.second_bank:
      attempt("patchcore_b", self.bases["patchcore"].with_seed(seed).with_bank(1))
    fitted, failed = {}, {}
    for name in self.names:
      members = PARTS[name]
      if len(members) == 1:
        if name in broken:
          failed[name] = broken[name]
        else:
          fitted[name] = parts[name]
        continue
      cls = detector_ensemble.PatchCoreX2 if name == "patchcore_x2" else detector_ensemble.Ensemble
      lost = [broken[m] for m in members if m in broken]
      if lost:
        failed[name] = "its member " + "; its member ".join(dict.fromkeys(lost))
        continue
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
    return fitted, parts, failed

  def scoring(self, detector) -> evaluation.Scoring:
    return detector_choice.scoring(detector, self.config)


def write_comparisons(seed_dir, names, outcomes: dict, category: str, config) -> None:
  """Side-by-side maps of every method that scored the category (`outcomes`; `names`:
  all the run's methods) for its showcase images (process 0)."""
  shown = [n for n in names if n in outcomes]
  if len(shown) < 2 or jax.process_index() != 0:
    return
  first = outcomes[shown[0]]
  count = len(first.result.file_names) if config.outputs.panels < 0 else config.outputs.panels
  if count <= 0:
    return
  split = first.splits[0]
  by_name = {split.file_name(i): i for i in range(len(split))}
  for position in category_run.showcase_order(first.result)[:count]:
    name = first.result.file_names[position]
    try:
      example = split[by_name[name]]
      maps = {}
      for method in shown:
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


def _summary(outcomes: dict, failed: dict[str, str], dataset: str, seed: int) -> dict:
  """`run_report.summarize_outcomes`, plus a row of undefined metrics for each category
  the method failed on, with the reason (`failed`: {category: why})."""
  summary = run_report.summarize_outcomes(outcomes, dataset, seed=seed)
  if failed:
    per_category = {c: o.metrics for c, o in outcomes.items()}
    for category, reason in failed.items():
      per_category[category] = {
        **dict.fromkeys(reports.METRIC_NAMES),
        "notes": {"failed": reason},
      }
    summary.update(reports.summarize(per_category, dataset, seed=seed))
    summary["failed"] = dict(failed)
  return summary


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Few-shot adaptation and scoring for every category, seed and method; returns the
  summary (with several methods: `{"methods": {method: summary}, ...}`).

  A method that fails on a category and seed (its training diverges, its maps are not
  finite: `METHOD_FAILURES`) is recorded there (adaptation.json, metrics.json) and
  skipped; the other methods go on.

  Raises:
    RunFailed: at the end, after every output is written, when some method failed.
  """
  validate(config)
  names = methods(config)
  seed_list = seeds(config)
  categories = data.resolve_categories(config.data)
  workdir = common.prepare_workdir(workdir, config)
  check_shots(config, categories)
  detectors = Detectors(config, names)

  per_seed = {name: [] for name in names}
  adaptation, failures = [], []
  # report.html: every method and seed's curves and thresholds; the galleries of the first
  # seed only, shared out among the methods, so the page stays small.
  page_runs = []
  gallery_size = max(1, html_report.GALLERY_SIZE // len(names))
  for seed in seed_list:
    seed_dir = workdir / f"seed_{seed}"
    outcomes = {name: {} for name in names}
    failed = {name: {} for name in names}  # {method: {category: why}}
    for category in categories:
      normals, record = fitting.normal_images(
        config, category, seed_dir / "adapt" / category, seed=seed
      )
      notes = {}
      fitted, parts, errors = detectors.fit(normals, seed, notes)
      if "maeday" in parts:
        record.update(parts["maeday"].history)
      if notes:
        record["ensemble_normalization"] = notes
      for name in names:
        out_dir = _method_dir(seed_dir, names, name)
        if name not in errors:
          try:
            outcomes[name][category] = run_category(
              detectors.scoring(fitted[name]), category, config, out_dir, seed=seed
            )
          except METHOD_FAILURES as e:
            errors[name] = f"{fitted[name].method}: {e}"
        if name in errors:
          failed[name][category] = errors[name]
          log.error(
            "%s failed on seed %d, %s (skipped; the other methods go on): %s",
            name,
            seed,
            category,
            errors[name],
          )
        elif jax.process_index() == 0:
          shown = gallery_size if seed == seed_list[0] else None
          page_runs.append(run_report.page_run(outcomes[name][category], out_dir, name, shown))
        # Each finished category is on disk at once: a later error or a kill loses none.
        summary = _summary(outcomes[name], failed[name], config.data.name, seed)
        if jax.process_index() == 0:
          out_dir.mkdir(parents=True, exist_ok=True)
          if outcomes[name]:
            run_report.write_scores(out_dir, outcomes[name])
          reports.write_metrics_json(out_dir / "metrics.json", summary)
      if errors:
        record["failed"] = dict(errors)
        failures += [
          {"method": n, "seed": seed, "category": category, "reason": errors[n]}
          for n in names
          if n in errors
        ]
      adaptation.append(record)
      write_comparisons(
        seed_dir,
        names,
        {n: outcomes[n][category] for n in names if n not in errors},
        category,
        config,
      )
    for name in names:
      per_seed[name].append(_summary(outcomes[name], failed[name], config.data.name, seed))

  combined = {name: reports.summarize_seeds(per_seed[name]) for name in names}
  result = combined[names[0]] if len(names) == 1 else {"methods": combined}
  result["adaptation"] = adaptation
  if failures:
    result["failed"] = failures
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
    run_report.write_page(workdir, "few_shot", config.data.name, combined, page_runs)
    print(f"\nOutputs in {workdir}")
  if failures:
    raise RunFailed(_failure_message(failures, names, workdir))
  return result


def _failure_message(failures: list[dict], names: list[str], workdir) -> str:
  """One line: which methods failed where, why (the first reason of each), and where
  the others' results are."""
  by_method: dict[str, list[dict]] = {}
  for failure in failures:
    by_method.setdefault(failure["method"], []).append(failure)
  parts = []
  for method, items in by_method.items():
    where = ", ".join(f"seed {f['seed']} {f['category']}" for f in items[:3])
    where += f" and {len(items) - 3} more" if len(items) > 3 else ""
    parts.append(f"{method} ({where}): {items[0]['reason']}")
  others = [n for n in names if n not in by_method]
  kept = (
    f"the results of {', '.join(others)} are written in {workdir}"
    if others
    else f"the categories that finished are in {workdir}"
  )
  return (
    f"{len(by_method)} of {len(names)} methods failed, recorded in adaptation.json and "
    f"metrics.json ({kept}): " + "; ".join(parts)
  )
