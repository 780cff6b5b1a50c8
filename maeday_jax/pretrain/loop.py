"""`train(config, workdir)`: MAE pre-training from a config, with resume and export.

The library entry point that any caller trains an MAE with (the pretrain job
`maeday_jax.jobs.pretrain`, MALA's stage 1, a detector's fit). Files under `workdir`:
  checkpoints/<step>/   Orbax training state (params, optimiser state, step) and the
                        run's key; the newest is restored when `train` runs again
  metrics.jsonl         one record per logged step (loss, learning rate, images/s, ...)
  training.png          the same curves, redrawn at every checkpoint
  model/                the final parameters in the converted Orbax format, loadable by
                        `checkpoints.load_mae(workdir / "model")` and
                        `--config.model.checkpoint=<workdir>/model`
  summary.json          what `train` returns
(The job adds `config.json`, the configuration of the run.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import jax
import ml_collections
import numpy as np
import tqdm

from maeday_jax import models, parallel, training
from maeday_jax.config_errors import ConfigError
from maeday_jax.model_builder import build_model
from maeday_jax.pretrain import evaluate, inputs, logs, optim
from maeday_jax.pretrain import step as step_lib

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class TrainingRun:
  """One (re)start of a training run: what every step below (and `train_loop`) reads."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  mesh: jax.sharding.Mesh
  model: models.MaskedAutoencoder
  source: str
  images: np.ndarray
  per_epoch: int
  total_steps: int
  spec: step_lib.TrainSpec
  step_key: jax.Array

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def schedule_lengths(config, num_images: int) -> tuple[int, int, int]:
  """(steps per epoch, total steps, warm-up steps) from epochs or explicit steps."""
  train = config.train
  per_epoch = inputs.steps_per_epoch(num_images, train.batch_size)
  total = int(train.steps) if train.get("steps") else int(round(train.epochs * per_epoch))
  if total < 1:
    raise ValueError("Set config.train.steps or config.train.epochs to a positive value.")
  if train.get("warmup_steps") is not None:
    warmup = int(train.warmup_steps)
  else:
    warmup = int(round(train.warmup_epochs * per_epoch))
  return per_epoch, total, min(warmup, total)


def _augment_options(train: ml_collections.ConfigDict) -> dict:
  aug = train.augment
  return {
    "crop_scale": tuple(float(v) for v in aug.crop_scale),
    "crop_ratio": tuple(float(v) for v in aug.crop_ratio),
    "hflip": bool(aug.hflip),
    "vflip": bool(aug.vflip),
    "crop": str(aug.get("crop", "resized")),
  }


def _train_spec(config, model, total_steps: int, warmup_steps: int) -> step_lib.TrainSpec:
  train = config.train
  peak_lr = train.get("lr") or optim.peak_learning_rate(train.base_lr, train.batch_size)
  return step_lib.TrainSpec(
    model=model,
    optimizer=optim.OptimizerConfig.from_train(train, peak_lr, total_steps, warmup_steps),
    loss=step_lib.LossConfig(
      float(train.mask_ratio),
      train.loss,
      bool(train.norm_pix_loss),
      pixel_loss=train.get("pixel_loss", "mse"),
      pixel_weight=float(train.get("pixel_weight", 1.0)),
      ssim_weight=float(train.get("ssim_weight", 0.0)),
      adversarial_weight=float(train.get("adversarial_weight", 0.0)),
    ),
    augment=tuple(sorted(_augment_options(train).items())),
    predictor_lr=float(train.get("predictor_lr", 2e-4)),
    seed=int(config.seed),
  )


def _set_up(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """The model, its initial parameters, the training images and the step's spec."""
  mesh = parallel.data_mesh()
  train = config.train
  parallel.local_batch_size(train.batch_size, mesh)
  init_key, _, step_key = jax.random.split(jax.random.key(config.seed), 3)
  # (The middle key is unused: data order uses NumPy with the integer seed, inputs.py.)
  model, params, source = build_model(config.model, init_key)
  load_size = int(train.get("load_size") or model.img_size)
  short_side = int(train.get("load_short_side") or 0)
  if train.augment.get("crop", "resized") == "tile" and load_size < model.img_size:
    raise ConfigError(
      f"--config.train.load_size: {load_size} px images have no {model.img_size} px tiles "
      "(augment.crop='tile'); set it to at least the model's input size."
    )
  sources = inputs.training_sources([config.data, *config.get("extra_data", [])])
  images = inputs.load_training_images(
    sources, load_size, model.img_size, short_side, train.normal_only, config.data.num_workers
  )
  per_epoch, total_steps, warmup_steps = schedule_lengths(config, len(images))
  spec = _train_spec(config, model, total_steps, warmup_steps)
  run = TrainingRun(
    config, workdir, mesh, model, source, images, per_epoch, total_steps, spec, step_key
  )
  logger.info(
    "Pre-training %s (%s, %.1fM parameters) on %d images from %d source(s): %d steps "
    "(%d per epoch), batch %d, peak lr %.3g, warm-up %d",
    type(model).__name__,
    source,
    models.num_params(params) / 1e6,
    len(images),
    len(sources),
    total_steps,
    per_epoch,
    train.batch_size,
    spec.optimizer.peak_lr,
    warmup_steps,
  )
  return run, params


def _restore_or_init(run: TrainingRun, params, manager, key_data) -> tuple[dict, int]:
  """The replicated training state: fresh, or the newest checkpoint's."""
  return resume(
    step_lib.replicated_init_state(params, run.spec, run.mesh), manager, key_data, run.mesh
  )


def resume(state: dict, manager, key_data, mesh) -> tuple[dict, int]:
  """(`state`, 0), or the newest checkpoint's state and step when `manager` has one."""
  start_step = manager.latest_step() or 0
  if start_step:
    state = parallel.replicate(training.restore(manager, start_step, state, key_data), mesh)
    logger.info("Resumed from %s at step %d", manager.directory, start_step)
  return state, start_step


def _train(run: TrainingRun, state: dict, start_step: int, manager, key_data) -> tuple[dict, dict]:
  """Steps from `start_step` to the end, logging and checkpointing; returns (state, stats)."""
  compiled = step_lib.make_train_step(run.spec, run.mesh)
  return train_loop(
    run, state, start_step, manager, key_data, lambda s, b: compiled(s, b, run.step_key)
  )


def train_loop(
  run, state: dict, start_step: int, manager, key_data, train_step, desc: str = "pretrain"
) -> tuple[dict, dict]:
  """The steps of a training run on in-memory images, logged and checkpointed.

  `run` has `config` (`train.batch_size`, `seed`, `log_every`, `checkpoint_every`),
  `workdir`, `mesh`, `images` (N, H, W, 3) uint8, `per_epoch`, `total_steps`, `is_main`;
  `train_step(state, batch) -> (state, metrics)` with metrics including `loss` and
  `learning_rate`. Batches depend only on the seed and the step, so a resumed run
  repeats an uninterrupted one. Returns (state, {"final_loss", "train_seconds"}).
  """
  config, train = run.config, run.config.train
  log = logs.MetricsLog(run.workdir / logs.METRICS_FILE, resume_step=start_step)
  rows = inputs.local_rows(train.batch_size)
  log_every = max(1, int(config.get("log_every", 10)))
  checkpoint_every = max(1, int(config.checkpoint_every))
  bar = tqdm.tqdm(total=run.total_steps, initial=start_step, desc=desc, disable=not run.is_main)
  train_seconds, last_time, last_step, record = 0.0, None, start_step, None
  for step in range(start_step, run.total_steps):
    indices = inputs.batch_indices(len(run.images), train.batch_size, step, config.seed)
    local = inputs.batch_images(run.images, indices, rows, step, config.seed)
    batch = parallel.shard_batch(local, run.mesh)
    state, step_metrics = train_step(state, batch)
    done = step + 1
    if last_time is None:
      # Throughput is measured from the end of the first (compiling) step.
      jax.block_until_ready(step_metrics)
      last_time, last_step = time.perf_counter(), done
    if done % log_every == 0 or done == run.total_steps:
      values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      now = time.perf_counter()
      rate = (done - last_step) * train.batch_size / (now - last_time) if done > last_step else None
      train_seconds += now - last_time
      last_time, last_step = now, done
      record = {"step": done, "epoch": round(done / run.per_epoch, 3), **values}
      record["images_per_sec"] = None if rate is None else round(rate, 2)
      if run.is_main:
        log.write(record)
      bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}")
    bar.update(1)
    if done % checkpoint_every == 0 or done == run.total_steps:
      pause = time.perf_counter()
      training.save(manager, done, state, key_data)
      if run.is_main:
        logs.plot(logs.read_records(log.path), run.workdir / logs.PLOT_FILE, title=run.workdir.name)
      # Saving is not training: leave its time out of the throughput and train time.
      last_time += time.perf_counter() - pause
  bar.close()
  return state, {"final_loss": record["loss"] if record else None, "train_seconds": train_seconds}


def write_summary(
  workdir: pathlib.Path,
  steps: int,
  start_step: int,
  num_images: int,
  stats: dict,
  wall_start: float,
  **extra,
) -> dict:
  """The summary of a training run on top of `train_loop` (MALA's stage 2, PMAD's
  reconstructor): steps, where it resumed, images, final loss, timings and `extra`,
  written to `<workdir>/summary.json` by process 0; returned."""
  summary = {
    "workdir": str(workdir),
    "steps": steps,
    "resumed_from_step": start_step,
    "num_images": num_images,
    "final_loss": stats["final_loss"],
    "train_seconds_this_run": round(stats["train_seconds"], 1),
    "wall_seconds": round(time.perf_counter() - wall_start, 1),
    **extra,
  }
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def _evaluate(run: TrainingRun, params) -> dict | None:
  """Zero-shot metrics of the trained model when `config.eval.enabled`."""
  eval_config = run.config.get("eval")
  if eval_config is None or not eval_config.enabled:
    return None
  return evaluate.evaluate_zero_shot(
    run.model,
    params,
    eval_config.data,
    eval_config.split,
    num_masks=eval_config.num_masks,
    mask_ratio=eval_config.mask_ratio,
    batch_size=eval_config.batch_size,
    eval_size=eval_config.image_size,
    seed=run.config.seed,
    mesh=run.mesh,
    progress=run.is_main,
  )


def train(config: ml_collections.ConfigDict, workdir) -> dict:
  """Pre-trains (or continues) an MAE as `config` says; resumes from `workdir`.

  Args:
    config: a `defaults.pretrain_config()`-shaped config (`model`, `data`, `extra_data`,
      `train`, `seed`, `checkpoint_every`, `eval`).
    workdir: where checkpoints, metrics, `model/` and `summary.json` go (created when
      missing); a rerun resumes from its newest checkpoint.

  Returns:
    The summary: steps, final loss, training seconds, the architecture, the exported
    model directory (`model_dir`, on the main process) and, when `config.eval.enabled`,
    the zero-shot metrics (`zero_shot`).
  """
  wall_start = time.perf_counter()
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  run_, params = _set_up(config, workdir)
  key_data = np.asarray(jax.random.key_data(run_.step_key))  # Checked when resuming.
  manager = training.checkpoint_manager(
    workdir / CHECKPOINT_DIR, max_to_keep=config.get("keep_checkpoints", 2)
  )
  state, start_step = _restore_or_init(run_, params, manager, key_data)
  del params
  state, stats = _train(run_, state, start_step, manager, key_data)
  manager.close()

  summary = {
    "workdir": str(workdir),
    "steps": run_.total_steps,
    "resumed_from_step": start_step,
    "num_images": len(run_.images),
    "epochs": round(run_.total_steps / run_.per_epoch, 2),
    "final_loss": stats["final_loss"],
    # Steady-state step time (first, compiling step excluded) and the whole call so far.
    "train_seconds_this_run": round(stats["train_seconds"], 1),
    "wall_seconds_before_eval": round(time.perf_counter() - wall_start, 1),
    "architecture": models.architecture(run_.model),
  }
  source = f"maeday_jax.pretrain: {workdir} step {run_.total_steps}"
  exported = training.export_model(workdir / MODEL_DIR, run_.model, state["params"], source)
  if run_.is_main:
    summary["model_dir"] = str(exported)
    logs.plot(
      logs.read_records(workdir / logs.METRICS_FILE), workdir / logs.PLOT_FILE, workdir.name
    )
  zero_shot_metrics = _evaluate(run_, state["params"])
  if zero_shot_metrics is not None:
    summary["zero_shot"] = zero_shot_metrics
  if run_.is_main:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
