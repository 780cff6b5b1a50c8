"""Loading MAE checkpoints: official `.pth`, Hugging Face safetensors, converted Orbax.

    from maeday_jax import checkpoints
    model, params = checkpoints.load_mae("mae_vit_large")   # or a local path
    pred = model.apply({"params": params}, images, noise=noise)  # (B, L, p*p*3)

The loading lives beside the network, `maeday_jax.models.mae_import` (known names,
`resolve`, `convert`, `load_mae`) with `models.mae_state_dict` (`checkpoints.state_dict`);
the file formats below it, `maeday_jax.weight_files` (`torch_zip`, `orbax_format`,
`CheckpointError`). This package gathers their names in one place, as `backbones` does
for ResNets; `checkpoints.download` is the known names and the cache folder.
"""

from maeday_jax.checkpoints import download
from maeday_jax.download import DownloadError, RemoteFile
from maeday_jax.models import mae_state_dict as state_dict
from maeday_jax.models.mae_import import (
  KNOWN_CHECKPOINTS,
  convert,
  load_mae,
  read_state_dict,
  resolve,
)
from maeday_jax.models.weights import sha256_of
from maeday_jax.weight_files import CheckpointError, is_safetensors, orbax_format, torch_zip

__all__ = [
  "KNOWN_CHECKPOINTS",
  "CheckpointError",
  "DownloadError",
  "RemoteFile",
  "convert",
  "download",
  "is_safetensors",
  "load_mae",
  "orbax_format",
  "read_state_dict",
  "resolve",
  "sha256_of",
  "state_dict",
  "torch_zip",
]
