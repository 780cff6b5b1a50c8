"""`adapt`: fine-tune the MAE on the normal shots, resumably, and return the merged model."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from ml_collections import config_dict

from maeday_jax import parallel, training
from maeday_jax.config_errors import ConfigError
from maeday_jax.few_shot.loss import as_model_input
from maeday_jax.few_shot.optimizer import learning_rate, make_optimizer
from maeday_jax.few_shot.step import StepSettings, initial_state, lower_train_step
from maeday_jax.models import MaskedAutoencoder, num_params
from maeday_jax.settings.few_shot import few_shot_train_config

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MERGED_DIR = "merged"
SETTINGS_FILE = "training_settings.json"
# Settings a resumed run may change: how long it trains and how often it saves.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "max_checkpoints")


def _settings_record(config) -> dict:
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  record = {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}
  return {k: v for k, v in sorted(record.items()) if k not in _RESUMABLE_CHANGES}


def check_same_settings(workdir: pathlib.Path, config) -> None:
  """Refuses to resume a run in `workdir` that was trained with other settings.

  The first run records its training settings (all but `_RESUMABLE_CHANGES`) in
  `SETTINGS_FILE`; a later run with checkpoints there must have the same ones.

  Raises:
    ConfigError (a ValueError): naming every field that differs, with both values.
  """
  path = workdir / SETTINGS_FILE
  current = _settings_record(config)
  if not path.is_file():
    if jax.process_index() == 0:
      workdir.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(current, indent=2, sort_keys=True))
    return
  saved = json.loads(path.read_text())
  differ = {
    k: (saved.get(k), current.get(k))
    for k in sorted(saved.keys() | current.keys())
    if saved.get(k) != current.get(k)
  }
  if differ:
    fields = "; ".join(f"train.{k}: was {a!r}, now {b!r}" for k, (a, b) in differ.items())
    raise ConfigError(
      f"{workdir} holds a few-shot run trained with other settings ({fields}). Resuming "
      "it would report the old adapter under the new settings; use a new workdir, or "
      "the old settings."
    )


class AdaptationDiverged(FloatingPointError):
  """The few-shot training loss became NaN or infinite; the message says at which step
  and what to change.

  A step's loss is computed before its update: at the first step a run takes, no update
  of this run has happened, so the weights it started from (or the shots) are at fault,
  not the learning rate; later, the updates diverged.

  Attributes:
    step: the (1-based) step whose loss was not finite; steps: the run's total.
  """

  def __init__(self, loss: float, step: int, steps: int, start_step: int, rate: float):
    self.loss, self.step, self.steps = loss, step, steps
    if step == start_step + 1:
      started = "the resumed checkpoint" if start_step else "the pre-trained weights"
      cause = (
        f"before any update of this run, so {started} or the shots give non-finite "
        "values, not the learning rate: check the checkpoint (or use "
        "--config.model.dtype=float32)"
      )
    else:
      cause = (
        f"the training diverged at learning rate {rate:g}: lower "
        "--config.train.learning_rate (e.g. 10 times)"
      )
    super().__init__(f"the few-shot loss became {loss} at step {step} of {steps}, {cause}.")


def _typed_key(key: jax.Array) -> jax.Array:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def _resume(manager, state, key_data, steps: int, mesh, workdir) -> tuple[dict, int]:
  """The newest checkpoint's state on `mesh` and its step, or (`state`, 0) when none."""
  latest = manager.latest_step()
  if latest is None:
    return state, 0
  state = parallel.replicate(training.restore(manager, latest, state, key_data), mesh)
  start_step = int(state["step"])
  if start_step > steps:
    raise ConfigError(
      f"{workdir} holds a run that is already at step {start_step}, beyond steps="
      f"{steps}; use a new workdir or at least {start_step} steps."
    )
  logger.info("Resuming few-shot adaptation from step %d in %s.", start_step, workdir)
  return state, start_step


def adapt(
  model: MaskedAutoencoder,
  params: Any,
  shots,
  key: jax.Array,
  config: config_dict.ConfigDict | None = None,
  mesh=None,
  workdir: str | os.PathLike | None = None,
) -> tuple[Any, dict]:
  """Fine-tunes `params` on the normal `shots`; returns (merged parameters, history).

  Args:
    model: the MAE.
    params: its pre-trained parameters (not modified).
    shots: (k, S, S, 3) normal images at the model size, normalised float or uint8 RGB.
    key: PRNG key of the run (LoRA initialisation, augmentation, masks).
    config: `settings.few_shot.few_shot_train_config()` (`few_shot.get_train_config()`) or a
      modified copy.
    mesh: device mesh (default: all devices); `batch_size` must divide over it.
    workdir: where to keep resumable checkpoints (`checkpoints/<step>`: the trained tree,
      i.e. the LoRA tree or the fine-tuned weights, the optimiser state, the step and the
      key) and the final merged model (`merged/`, loadable by `checkpoints.load_mae`). A
      run finds its latest checkpoint there and continues from it. None: no files.

  Returns:
    merged: plain parameters of the adapted model (same tree as `params`).
    history: `step` and `loss` (the training loss of each step run here, before its
      update), `step_time_s`, `compile_time_s`, `total_time_s`, `start_step` (> 0 after a
      resume) and `trainable_params`.
  """
  config = few_shot_train_config() if config is None else config
  mesh = parallel.data_mesh() if mesh is None else mesh
  settings = StepSettings.from_config(config)
  if settings.batch_size % mesh.devices.size:
    raise ValueError(
      f"batch_size={settings.batch_size} must be a multiple of the number of devices "
      f"({mesh.devices.size})."
    )
  start = time.perf_counter()
  shots = parallel.replicate(as_model_input(model, shots), mesh)
  init_key, run_key = jax.random.split(_typed_key(key))
  key_data = np.asarray(jax.random.key_data(run_key))  # Checkpointed, to check resumes.
  run_key = parallel.replicate(run_key, mesh)
  optimizer = make_optimizer(config)
  base, state = initial_state(
    params, init_key, strategy=settings.strategy, optimizer=optimizer, mesh=mesh
  )

  manager, start_step = None, 0
  if workdir is not None:
    workdir = pathlib.Path(workdir).expanduser().absolute()
    check_same_settings(workdir, config)
    manager = training.checkpoint_manager(workdir / CHECKPOINT_DIR, config.max_checkpoints)
    state, start_step = _resume(manager, state, key_data, config.steps, mesh, workdir)

  t0 = time.perf_counter()
  if start_step < config.steps:  # A finished run only needs merging.
    lowered = lower_train_step(model, optimizer, mesh, settings, state, base, shots, run_key)
    compiled = lowered.compile()
  history = {
    "step": [],
    "loss": [],
    "step_time_s": [],
    "compile_time_s": time.perf_counter() - t0,
    "start_step": start_step,
    "trainable_params": num_params(state["params"]),
  }
  every = config.checkpoint_every
  for step in range(start_step, config.steps):
    t0 = time.perf_counter()
    state, loss = compiled(state, base, shots, run_key)
    loss = float(loss)  # Waits for the step: honest per-step timing.
    history["step"].append(step + 1)
    history["loss"].append(loss)
    history["step_time_s"].append(time.perf_counter() - t0)
    if not np.isfinite(loss):
      raise AdaptationDiverged(loss, step + 1, config.steps, start_step, learning_rate(config))
    done = step + 1
    if manager is not None and (done == config.steps or (every and done % every == 0)):
      training.save(manager, done, state, key_data)
    if done % 10 == 0 or done == config.steps:
      logger.info("few-shot step %d/%d: loss %.5f", done, config.steps, loss)

  merged = settings.strategy.merge(base, state["params"])
  if manager is not None:
    manager.close()
    source = f"few-shot {settings.strategy.name} adaptation, {config.steps} steps"
    training.export_model(workdir / MERGED_DIR, model, merged, source=source)
  history["total_time_s"] = time.perf_counter() - start
  return merged, history
