"""Saving and loading a trained MALA segmenter (`maeday_jax.models.segmenter.Segmenter`).

    save_segmenter(directory, segmenter, params, source="MALA stage 2: runs/x/stage2")
    segmenter, params = load_segmenter(directory)

A saved segmenter is a directory with `mae/` (a converted MAE, loadable on its own by
`checkpoints.load_mae`) and `token_balance/` (an Orbax tree of the Token Balance layers).
It lives in `mala/`, above the network, because saving is the trainer's export
(`training.export_model`) and loading honours the job's dtype setting (`model_builder`).
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

from maeday_jax import model_builder, parallel, training
from maeday_jax.models import mae_import
from maeday_jax.models.segmenter import Segmenter, segmenter_params
from maeday_jax.weight_files import CheckpointError

__all__ = ["load_segmenter", "save_segmenter"]


def save_segmenter(directory: pathlib.Path, segmenter: Segmenter, params, source: str) -> None:
  """Writes the trained segmenter: `mae/` (a converted MAE) and `token_balance/`."""
  directory = pathlib.Path(directory)
  training.export_model(directory / "mae", segmenter.mae, params["mae"], source)
  tbm = training.to_host({k: v for k, v in params.items() if k != "mae"})
  target = (directory / "token_balance").absolute()
  if target.exists() and jax.process_index() == 0:
    shutil.rmtree(target)
  parallel.barrier("maeday_jax: cleared the token balance directory")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, tbm)
  checkpointer.wait_until_finished()


def load_segmenter(directory, dtype="auto", attention: str = "auto") -> tuple[Segmenter, dict]:
  """The segmenter `save_segmenter` wrote: (Segmenter, params).

  Args:
    directory: the saved segmenter.
    dtype: the compute dtype setting (`model_builder.compute_dtype`: 'auto', ...).
    attention: the attention implementation (`models.resolve_attention`).

  Raises:
    CheckpointError: the directory is not a saved segmenter.
  """
  directory = pathlib.Path(directory).expanduser()
  mae, mae_params = mae_import.load_mae(
    directory / "mae", dtype=model_builder.compute_dtype(dtype), attention=attention
  )
  segmenter = Segmenter(mae)
  shapes = jax.eval_shape(lambda: segmenter_params(segmenter, mae_params, jax.random.key(0)))
  abstract = {k: v for k, v in shapes.items() if k != "mae"}
  try:
    tbm = ocp.StandardCheckpointer().restore((directory / "token_balance").absolute(), abstract)
  except Exception as e:  # Orbax raises many types; all mean the same to a user.
    raise CheckpointError(
      f"{directory}: not a segmenter written by the MALA job ({type(e).__name__}: {e})."
    ) from e
  return segmenter, {"mae": mae_params, **tbm}
