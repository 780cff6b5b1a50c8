"""The official checkpoints: where they are downloaded from and where they are cached.

Transfers go through `maeday_jax.download.fetch` (a `.part` file renamed once complete,
resumed on a rerun, size and SHA-256 checks); this module adds the registry of known
names, the cache folder and the advice on using a local copy instead.
"""

import os
import pathlib

from maeday_jax.download import DownloadError, RemoteFile, fetch

__all__ = ["KNOWN_CHECKPOINTS", "DownloadError", "RemoteFile", "default_cache_dir", "download"]

_MAE_URL = "https://dl.fbaipublicfiles.com/mae/visualize/"

# The official pixel-target MAE checkpoints that include the decoder.
KNOWN_CHECKPOINTS: dict[str, RemoteFile] = {
  "mae_vit_base": RemoteFile(_MAE_URL + "mae_visualize_vit_base.pth"),
  "mae_vit_large": RemoteFile(_MAE_URL + "mae_visualize_vit_large.pth"),
  "mae_vit_huge": RemoteFile(_MAE_URL + "mae_visualize_vit_huge.pth"),
  "mae_vit_large_ganloss": RemoteFile(_MAE_URL + "mae_visualize_vit_large_ganloss.pth"),
}


def default_cache_dir() -> pathlib.Path:
  """`$MAEDAY_CACHE_DIR`, else `~/.cache/maeday_jax`."""
  root = os.environ.get("MAEDAY_CACHE_DIR") or os.path.join("~", ".cache", "maeday_jax")
  return pathlib.Path(root).expanduser()


def _local_copy_hint(remote: RemoteFile, dest: pathlib.Path) -> str:
  name = remote.filename
  return (
    f"If this machine is offline, download the file elsewhere and either pass its local "
    f"path (load_mae('/path/{name}') or --config.model.checkpoint=/path/{name}) or copy it "
    f"to {dest}."
  )


def download(remote: RemoteFile, dest: pathlib.Path, progress: bool = True) -> pathlib.Path:
  """Fetches a checkpoint to `dest` unless it is already there; returns `dest`.

  Raises:
    DownloadError: the URL is unreachable, or the transfer is truncated or corrupt (the
      partial file is deleted).
  """
  dest = pathlib.Path(dest)
  return fetch(
    remote,
    dest,
    hint=_local_copy_hint(remote, dest),
    progress=progress,
  )
