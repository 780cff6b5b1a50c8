"""Bulk zero-shot scoring: one MAEDAY score for every image of a folder, glob or manifest.

  python -m maeday_jax.main --config configs/score.py --workdir runs/photos \
    --config.data.path=/photos --config.model.checkpoint=mae_vit_large

`data.path` is a folder (searched recursively for image files), a glob
(`'/photos/**/*.jpg'`) or a manifest: a `.txt` of paths, one a line, or a `.csv` with the
columns `path[,label]` (UTF-8, a byte-order mark allowed; relative paths are read from the
manifest's folder; a `mask` column with files is refused: use `configs/evaluate.py` for
pixel metrics). A file listed under several spellings (`a/./x.png`, `a//x.png`, a link)
is scored once, under its first name in sorted order; `summary.json` counts the others
(`duplicates`). On several hosts run the same command on each with `--distributed`: each
host scores its own contiguous share of the sorted list.

Outputs: `scores.csv` (file as listed, score, label when the manifest gives one,
predicted_label with a fixed threshold), `scores.parquet` (the same rows; only when
`pyarrow` is installed, it is not a dependency), `summary.json` (images, skipped files
with reasons, images/s per process, image AUROC / AP / F1-max when the manifest has
labels, None with the reason where undefined, e.g. one class only), and the committed
parts under `shards/`. Anomaly maps (model resolution) are stored only with
`outputs.maps`, pictures only with `outputs.top_pictures` (use `configs/zero_shot.py` for
panels, ROC curves and reconstructions).

The run commits every `commit_every` batches; rerunning the same command on the same
--workdir resumes after the last commit, and a finished run scores nothing again. A rerun
after the file list changed, after a scored (or skipped) file changed (size, modification
time, CSV label), or with another number of processes, is refused; `--overwrite` starts
afresh. One run at a time holds the work directory (`<workdir>/.lock`). NaN or infinite
maps or scores stop the run before they are committed; a run that scores no image is an
error. Names that are not valid UTF-8 are written with `\\xNN` escapes.

Fields (besides those of `maeday_jax.defaults.zero_shot_config`):
  detector               '' (default: zero-shot MAEDAY from `model`, `num_masks`, ...), a
                         zero-shot method's name, or a fitted detector folder
                         (`configs/fit.py` writes `<workdir>/detector`), which then
                         decides the model and its settings.
  data.path              what to score (see above).
  commit_every           batches between commits (default 50): fewer lose less work to a
                         kill, more write fewer files.
  group_size             transductive detectors only (an image's score depends on the
                         other images scored with it, e.g. MuSc): how many consecutive
                         images of the sorted listing are scored together (default 0 = not
                         set, an error for such a detector). Rounded up to a multiple of
                         the device count, it replaces batch_size (one global batch per
                         group; on several processes each contributes a consecutive share
                         of its shard), and every group is committed on its own
                         (commit_every does not apply). A rerun forms the same groups; one
                         with another group_size is refused. Other detectors ignore it (a
                         log line says so).
  compilation_cache_dir  JAX's persistent compilation cache (default <workdir>/jax_cache,
                         '' = none): reruns and resumed runs skip recompiling.
  threshold.method       'none' (default) or 'fixed': scores.csv gets predicted_label, 1
                         where score >= threshold.value (other methods are refused here).
  threshold.value        the fixed threshold (a finite number, whatever the method).
  outputs.maps           'none' (default), 'float16' or 'uint8': each commit also stores
                         its images' maps in shards/process_<i>/maps_<n>.npz, listed in
                         maps_index.csv (`maeday_jax.bulk.maps_store.load_map` reads one
                         back). uint8 (per-map scale and offset) is within scale/255,
                         float16 within 1e-3 relative; a 224 x 224 map is 49 KiB as
                         uint8, 98 KiB as float16.
  outputs.top_pictures   draw heatmap overlays of this many highest-scoring images into
                         pictures/<rank>_<name>.png (default 0 = none; needs outputs.maps).
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
  config.group_size = 0  # Transductive detectors only; 0 = not set.
  config.compilation_cache_dir = config_dict.placeholder(str)  # None: <workdir>/jax_cache.
  # Scores by default: no threshold, no maps, no pictures.
  config.threshold.method = "none"
  config.outputs = ml_collections.ConfigDict(dict(maps="none", top_pictures=0))
  # '' = zero-shot MAEDAY from the sections below; a method name or a fitted detector/.
  defaults.detector_sections(config, runlocal=arg == "runlocal")
  config.detector = ""
  return config
