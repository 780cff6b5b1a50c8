"""What every training loop here shares: state, resumable checkpoints, host copies, export.

Few-shot adaptation (`maeday_jax.few_shot`) and MAE pre-training (`maeday_jax.pretrain`)
both keep a state `{"params", "opt_state", "step"}`, save it with Orbax every few steps
together with the run's PRNG key, resume from the newest checkpoint only when the key
matches, and export the final model in the converted format `checkpoints.load_mae` reads.

    manager = training.checkpoint_manager(workdir / "checkpoints", max_to_keep=2)
    if (step := manager.latest_step()) is not None:
      state = parallel.replicate(training.restore(manager, step, state, key_data), mesh)
    ...
    training.save(manager, step, state, key_data)
    training.export_model(workdir / "model", model, params, source="...")
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util

from maeday_jax import models, parallel
from maeday_jax.weight_files import orbax_format

# Parameters no training here changes: the MAE's position tables are fixed sin-cos (the
# official model sets requires_grad=False). The model stop-gradients them, but weight
# decay would still shrink them, so they are kept out of every optimiser.
FIXED_PARAMS = ("pos_embed", "decoder_pos_embed")


def is_fixed(path: tuple[str, ...]) -> bool:
  """Whether the parameter at `path` (a flattened-tree key) is one of `FIXED_PARAMS`."""
  return path[-1] in FIXED_PARAMS


def split_fixed(params) -> tuple[dict, dict]:
  """(fixed, trainable): the `FIXED_PARAMS` leaves and every other leaf, as two trees."""
  flat = traverse_util.flatten_dict(params)
  fixed = {p: v for p, v in flat.items() if is_fixed(p)}
  rest = {p: v for p, v in flat.items() if not is_fixed(p)}
  return traverse_util.unflatten_dict(fixed), traverse_util.unflatten_dict(rest)


def init_state(params: Any, optimizer: optax.GradientTransformation) -> dict:
  """The training state: the trained tree, its optimiser state and the step counter."""
  return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def to_host(tree):
  """NumPy copies of replicated arrays (one local replica each; works on every host).

  Saving host copies lets the next step donate the device buffers, and spares Orbax a
  per-device slicing program for every replicated array shape.
  """
  return jax.tree.map(
    lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x), tree
  )


def checkpoint_manager(directory: pathlib.Path, max_to_keep: int) -> ocp.CheckpointManager:
  """An Orbax manager for resumable training checkpoints under `directory`.

  Saves are synchronous: a checkpoint that `save` returned from is on disk, so a run
  killed right after it resumes from there.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(pathlib.Path(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: dict, key_data: np.ndarray) -> None:
  """Saves host copies of the (replicated) `state` and the run's key as checkpoint `step`."""
  payload = {"state": to_host(state), "key_data": np.asarray(key_data)}
  manager.save(step, args=ocp.args.StandardSave(payload))


def restore(manager: ocp.CheckpointManager, step: int, state: dict, key_data: np.ndarray):
  """Checkpoint `step` as host arrays shaped like `state`, checked against the run's key.

  Raises:
    ValueError: the checkpoint holds another model or configuration (shapes differ), or
      another run (its PRNG key differs): resuming would mix two runs.
  """
  target = {"state": to_host(state), "key_data": np.asarray(key_data)}
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as e:  # Orbax raises many types; all mean the same to a user.
    raise ValueError(
      f"{manager.directory}: could not resume from step {step} ({type(e).__name__}: {e}). "
      "The checkpoint was written with a different model or training configuration; "
      "use a new workdir."
    ) from e
  if not np.array_equal(np.asarray(restored["key_data"]), key_data):
    raise ValueError(
      f"{manager.directory}: the checkpointed run used a different PRNG key (seed) than "
      "this one; resuming would mix two runs. Use the same seed or a new workdir."
    )
  return restored["state"]


def export_model(
  directory: pathlib.Path, model: models.MaskedAutoencoder, params, source: str
) -> pathlib.Path:
  """Writes `params` as a converted model at `directory`, replacing an earlier export.

  Every process calls this (Orbax saves collectively). A directory that exists but is not
  an exported model is never deleted.
  """
  directory = pathlib.Path(directory)
  if directory.exists() and not orbax_format.is_converted(directory):
    raise FileExistsError(f"{directory} exists and is not an exported model; move it away.")
  parallel.barrier(f"maeday_jax: checked {directory} for replacement")
  if directory.exists() and jax.process_index() == 0:
    shutil.rmtree(directory)  # Our own output of an earlier run of the same command.
  parallel.barrier(f"maeday_jax: cleared {directory}")
  return orbax_format.save(directory, models.architecture(model), to_host(params), source=source)
