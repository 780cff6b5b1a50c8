"""The official MAE checkpoints by name, and the cache they are downloaded into.

The table and the resolver are `maeday_jax.models.weights` (one for every network) and
the MAE names' view of it is `maeday_jax.models.mae_import.KNOWN_CHECKPOINTS`; this
module keeps the names checkpoint code imported from here.
"""

from maeday_jax.download import DownloadError, RemoteFile
from maeday_jax.models.mae_import import KNOWN_CHECKPOINTS
from maeday_jax.models.weights import default_cache_dir

__all__ = ["KNOWN_CHECKPOINTS", "DownloadError", "RemoteFile", "default_cache_dir"]
