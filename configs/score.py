"""Bulk zero-shot scoring: one MAEDAY score for every image of a folder, glob or manifest.

  python -m maeday_jax.main --config configs/score.py --workdir runs/photos \
    --config.data.path=/photos --config.model.checkpoint=mae_vit_large

`data.path` is a folder (searched recursively for image files), a glob
(`'/photos/**/*.jpg'`) or a manifest: a `.txt` of paths, one a line, or a `.csv` with the
columns `path[,label][,mask]` (relative paths are read from the manifest's folder). On
several hosts run the same command on each with `--distributed`: each host scores its
own contiguous share of the sorted list.

Outputs: `scores.csv` (file as listed, score, label when the manifest gives one),
`summary.json` (images, skipped files with reasons, images/s per process), and the
committed parts under `shards/`. Anomaly maps, overlays and other pictures are NOT
written: this job is for scores at scale (use `configs/zero_shot.py` for pictures).

The run commits every `commit_every` batches; rerunning the same command on the same
--workdir resumes after the last commit, and a finished run does nothing again. A rerun
after the file list changed, or with another number of processes, is refused.

Fields (besides those of `maeday_jax.defaults.zero_shot_config`):
  data.path              what to score (see above).
  commit_every           batches between commits (default 50): fewer lose less work to a
                         kill, more write fewer files.
  compilation_cache_dir  JAX's persistent compilation cache (default <workdir>/jax_cache,
                         '' = none): reruns and resumed runs skip recompiling.
  batch_size, num_masks, mask_ratio, mask_batch_size, seed, model.*, data.num_workers,
  data.prefetch          as for zero-shot scoring. An image's score depends only on its
                         pixels, the model and `seed`.

`configs/score.py:runlocal`: the tiny random-weight `test` model and 4 masks (a smoke
test; the scores are meaningless).
"""

import ml_collections
from ml_collections import config_dict

from maeday_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = defaults.zero_shot_config(arg)
  config.job = "score"
  config.data.name = "folder"
  config.commit_every = 50
  config.compilation_cache_dir = config_dict.placeholder(str)  # None: <workdir>/jax_cache.
  # Scores only: no threshold, no pictures.
  config.threshold.method = "none"
  del config.outputs
  return config
