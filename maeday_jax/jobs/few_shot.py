"""The few-shot job: per category and seed, adapt on k normal shots, then score.

    python -m maeday_jax.main --config configs/few_shot.py --workdir runs/few_shot

Outputs under the work directory:
  seed_<s>/...          the zero-shot outputs (scores.csv, maps, panels, metrics.json...)
                        of the adapted model for shot selection s
  seed_<s>/adapt/<category>/   resumable training checkpoints and the merged model
  metrics.json, metrics.md     mean ± std over seeds per category and group
  adaptation.json       shots, held-out reconstruction loss before/after, training times
"""

import logging

import jax
import ml_collections
import numpy as np

from maeday_jax import data, defaults, evaluation, few_shot, reports
from maeday_jax.jobs import common, run_report
from maeday_jax.jobs.category_run import run_category

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


def adapt_category(model, params, category, seed, config, mesh, seed_dir) -> tuple[dict, dict]:
  """Chooses the shots, fine-tunes and merges; returns (merged params, adaptation record)."""
  train_split = data.load_split(config.data, category, "train")
  shots = data.select_shots(train_split, config.shots, seed)
  heldout = heldout_indices(train_split, shots, config.heldout_normals, seed)
  key = jax.random.key(seed)
  record = {
    "seed": seed,
    "shots": [train_split.file_name(i) for i in shots],
    "heldout": [train_split.file_name(i) for i in heldout],
  }
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
    workdir=seed_dir / "adapt" / category,
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
    "%s seed %d: shots %s; held-out loss %s -> %s; %d steps in %.1f s",
    category,
    seed,
    record["shots"],
    record.get("heldout_loss_before"),
    record.get("heldout_loss_after"),
    len(history["loss"]),
    record["train_time_s"],
  )
  return merged, record


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Few-shot adaptation and scoring for every category and seed; returns the summary."""
  validate(config)
  categories = data.resolve_categories(config.data)
  workdir = common.prepare_workdir(workdir, config)
  check_shots(config, categories)
  model, params = common.load_model(config.model, config.seed)
  scoring = evaluation.Scoring.from_config(model, params, config)
  mesh = scoring.mesh
  common.describe_model(model, mesh, categories)

  per_seed, adaptation = [], []
  for seed in config.seeds:
    seed_dir = workdir / f"seed_{seed}"
    outcomes = {}
    for category in categories:
      merged, record = adapt_category(model, params, category, seed, config, mesh, seed_dir)
      adaptation.append({"category": category, **record})
      adapted = scoring.with_params(merged, key=jax.random.key(seed))
      outcomes[category] = run_category(adapted, category, config, seed_dir, seed=seed)
      # Each finished category is on disk at once: a later error or a kill loses none.
      summary = run_report.summarize_outcomes(outcomes, config.data.name, seed=seed)
      if jax.process_index() == 0:
        run_report.write_scores(seed_dir, outcomes)
        reports.write_metrics_json(seed_dir / "metrics.json", summary)
    per_seed.append(summary)

  combined = reports.summarize_seeds(per_seed)
  combined["adaptation"] = adaptation
  if jax.process_index() == 0:
    reports.write_metrics_json(workdir / "metrics.json", combined)
    common.write_json(workdir / "adaptation.json", adaptation)
    reports.write_markdown_table(
      workdir / "metrics.md", combined, config.data.name, "few_shot", shots=config.shots
    )
    print(reports.format_summary_table(combined))
    print(f"\nOutputs in {workdir}")
  return combined
