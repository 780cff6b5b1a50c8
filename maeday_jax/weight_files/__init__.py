"""The file formats weights come in, below every network that loads them.

  torch_zip      PyTorch `torch.save` archives (`.pth`), read without PyTorch and
                 without running code from the file
  state_dicts    a state dict from a `.pth` or safetensors file (`read_state_dict`)
  orbax_format   the project's converted format: an Orbax tree plus the architecture
                 (imported by name: it pulls in JAX and Orbax, the rest needs NumPy only)
  errors         `CheckpointError`, raised for every unusable file

Nothing here knows a network: renaming keys and checking shapes is the job of the
importers beside each network (`maeday_jax.models.mae_import`,
`maeday_jax.models.resnet_import`).
"""

from maeday_jax.weight_files import state_dicts, torch_zip
from maeday_jax.weight_files.errors import CheckpointError
from maeday_jax.weight_files.state_dicts import is_safetensors, is_state_dict_file, read_state_dict

__all__ = [
  "CheckpointError",
  "is_safetensors",
  "is_state_dict_file",
  "read_state_dict",
  "state_dicts",
  "torch_zip",
]
