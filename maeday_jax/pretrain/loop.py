"""`run(config, workdir)`: MAE pre-training from a config, with resume and export.

Files under `workdir`:
  checkpoints/<step>/   Orbax training state (params, optimiser state, step); the newest
                        is restored when the same command runs again
  metrics.jsonl         one record per logged step (loss, learning rate, images/s, ...)
  training.png          the same curves, redrawn at every checkpoint
  config.json           the configuration of the latest (re)start
  model/                the final parameters in the converted Orbax format, loadable by
                        `checkpoints.load_mae(workdir / "model")` and
                        `--config.model.checkpoint=<workdir>/model`
  summary.json          what `run` returns
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from maeday_jax import checkpoints, models, parallel
from maeday_jax.checkpoints import orbax_format
from maeday_jax.pretrain import evaluate, inputs, logs, optim
from maeday_jax.pretrain import step as step_lib

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"


def architecture(model: models.MaskedAutoencoder) -> dict:
  return models.architecture(model)


def _overrides(model_config: ml_collections.ConfigDict) -> dict:
  return {f: model_config.get(f) for f in models.ARCH_FIELDS if model_config.get(f) is not None}


# Compiled (once per architecture): op-by-op initialisation is many small dispatches.
_init_params = jax.jit(models.init_params, static_argnums=0)


def build_model(model_config: ml_collections.ConfigDict, key: jax.Array):
  """The model and its initial parameters: a variant from scratch, or a checkpoint.

  Returns `(model, params, source)`, `source` naming where the weights came from.
  """
  dtype = jnp.dtype(model_config.get("dtype") or "float32")
  overrides = _overrides(model_config)
  if model_config.checkpoint:
    loaded, params = checkpoints.load_mae(model_config.checkpoint)
    arch = architecture(loaded)
    conflicts = {f: (v, arch[f]) for f, v in overrides.items() if v != arch[f]}
    if conflicts:
      raise ValueError(
        f"config.model overrides {conflicts} (value, checkpoint's) contradict the checkpoint "
        f"{model_config.checkpoint}; leave them unset (None) when continuing from it."
      )
    return models.MaskedAutoencoder(**arch, dtype=dtype), params, str(model_config.checkpoint)
  model = models.create(model_config.variant, dtype=dtype, **overrides)
  params = _init_params(model, key)
  return model, params, f"scratch:{model_config.variant}"


def _schedule_lengths(config, num_images: int) -> tuple[int, int, int]:
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
  }


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _export(workdir: pathlib.Path, model, params, source: str) -> pathlib.Path:
  target = workdir / MODEL_DIR
  if target.exists():
    if not orbax_format.is_converted(target):
      raise FileExistsError(f"{target} exists but is not an exported model; move it away.")
    shutil.rmtree(target)  # A previous export of this same run (e.g. run twice).
  # Replicated arrays: every device (and host) holds the whole value; read one copy.
  params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), params)
  return orbax_format.save(target, architecture(model), params, source=source)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pre-trains (or continues) an MAE as `config` says; resumes from `workdir`.

  Returns a summary: steps, final loss, training seconds, images/s, the exported model
  directory and, when `config.eval.enabled`, the zero-shot metrics.
  """
  wall_start = time.perf_counter()
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  mesh = parallel.data_mesh()
  train = config.train
  parallel.local_batch_size(train.batch_size, mesh)
  key = jax.random.key(config.seed)
  init_key, data_seed_key, step_key = jax.random.split(key, 3)
  del data_seed_key  # Data order uses NumPy with the integer seed (see inputs.py).

  model, params, source = build_model(config.model, init_key)
  load_size = int(train.get("load_size") or model.img_size)
  sources = inputs.training_sources([config.data, *config.get("extra_data", [])])
  images, _ = inputs.load_images(
    sources, load_size, train.normal_only, num_workers=config.data.num_workers
  )
  per_epoch, total_steps, warmup_steps = _schedule_lengths(config, len(images))
  peak_lr = train.get("lr") or optim.peak_learning_rate(train.base_lr, train.batch_size)
  spec = step_lib.TrainSpec(
    model=model,
    optimizer=optim.OptimizerConfig(
      peak_lr=float(peak_lr),
      total_steps=total_steps,
      warmup_steps=warmup_steps,
      min_lr=float(train.min_lr),
      weight_decay=float(train.weight_decay),
      b1=float(train.b1),
      b2=float(train.b2),
      grad_clip=float(train.get("grad_clip") or 0.0),
    ),
    loss=step_lib.LossConfig(float(train.mask_ratio), train.loss, bool(train.norm_pix_loss)),
    augment=tuple(sorted(_augment_options(train).items())),
  )
  state = step_lib.replicated_init_state(params, spec, mesh)
  del params

  manager = ocp.CheckpointManager(
    workdir / CHECKPOINT_DIR,
    options=ocp.CheckpointManagerOptions(
      max_to_keep=config.get("keep_checkpoints", 2),
      create=True,
      # The state is donated to the next step: write synchronously, never from a buffer
      # the step is about to overwrite.
      enable_async_checkpointing=False,
    ),
  )
  start_step = manager.latest_step() or 0
  if start_step:
    state = manager.restore(start_step, args=ocp.args.StandardRestore(_abstract(state)))
    logger.info("Resumed from %s at step %d", workdir / CHECKPOINT_DIR, start_step)
  log = logs.MetricsLog(workdir / logs.METRICS_FILE, resume_step=start_step)
  logger.info(
    "Pre-training %s (%s, %.1fM parameters) on %d images from %d source(s): %d steps "
    "(%d per epoch), batch %d, peak lr %.3g, warm-up %d",
    type(model).__name__,
    source,
    models.num_params(state["params"]) / 1e6,
    len(images),
    len(sources),
    total_steps,
    per_epoch,
    train.batch_size,
    peak_lr,
    warmup_steps,
  )

  train_step = step_lib.make_train_step(spec, mesh)
  rows = inputs.local_rows(train.batch_size)
  log_every = max(1, int(config.get("log_every", 10)))
  checkpoint_every = max(1, int(config.checkpoint_every))
  bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="pretrain", disable=not is_main)
  train_seconds, last_time, last_step, record = 0.0, None, start_step, None
  for step in range(start_step, total_steps):
    indices = inputs.batch_indices(len(images), train.batch_size, step, config.seed)
    batch = parallel.shard_batch(images[indices[rows]], mesh)
    state, step_metrics = train_step(state, batch, step_key)
    done = step + 1
    if last_time is None:
      # Throughput is measured from the end of the first (compiling) step.
      jax.block_until_ready(step_metrics)
      last_time, last_step = time.perf_counter(), done
    if done % log_every == 0 or done == total_steps:
      values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      now = time.perf_counter()
      rate = (done - last_step) * train.batch_size / (now - last_time) if done > last_step else None
      train_seconds += now - last_time
      last_time, last_step = now, done
      record = {"step": done, "epoch": round(done / per_epoch, 3), **values}
      record["images_per_sec"] = None if rate is None else round(rate, 2)
      if is_main:
        log.write(record)
      bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}")
    bar.update(1)
    if done % checkpoint_every == 0 or done == total_steps:
      jax.block_until_ready(state["step"])
      pause = time.perf_counter()
      manager.save(done, args=ocp.args.StandardSave(state))
      if is_main:
        logs.plot(logs.read_records(log.path), workdir / logs.PLOT_FILE, title=str(workdir.name))
      # Saving is not training: leave its time out of the throughput and train time.
      last_time += time.perf_counter() - pause
  bar.close()
  manager.wait_until_finished()
  manager.close()

  summary = {
    "workdir": str(workdir),
    "steps": total_steps,
    "resumed_from_step": start_step,
    "num_images": len(images),
    "epochs": round(total_steps / per_epoch, 2),
    "final_loss": record["loss"] if record else None,
    # Steady-state step time (first, compiling step excluded) and the whole call so far.
    "train_seconds_this_run": round(train_seconds, 1),
    "wall_seconds_before_eval": round(time.perf_counter() - wall_start, 1),
    "architecture": architecture(model),
  }
  if is_main:
    exported = _export(
      workdir, model, state["params"], f"maeday_jax.pretrain: {workdir} step {total_steps}"
    )
    summary["model_dir"] = str(exported)
    logs.plot(logs.read_records(log.path), workdir / logs.PLOT_FILE, title=str(workdir.name))
  eval_config = config.get("eval")
  if eval_config is not None and eval_config.enabled:
    summary["zero_shot"] = evaluate.evaluate_zero_shot(
      model,
      state["params"],
      eval_config.data,
      eval_config.split,
      num_masks=eval_config.num_masks,
      mask_ratio=eval_config.mask_ratio,
      batch_size=eval_config.batch_size,
      eval_size=eval_config.image_size,
      seed=config.seed,
      mesh=mesh,
      progress=is_main,
    )
  if is_main:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
