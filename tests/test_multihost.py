"""Two real JAX processes on this machine (CPU, `jax.distributed`, gloo collectives).

Each process holds its own shard of a category's results, as on a TPU pod; gathering must
give every process the whole category: scores and names in split order, and pixel
metrics equal to scikit-learn's over all pixels of both shards.
"""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests.processes import run_processes
from tests.test_metrics import pooled

NUM_IMAGES = 7

# The data both processes (and this test) build; process p keeps images p, p + 2, ...
DATA = """
import numpy as np

def category_data():
  rng = np.random.default_rng(0)
  maps = rng.random((7, 12, 12))
  masks = np.zeros((7, 12, 12), np.uint8)
  masks[3, 2:7, 4:9] = 1
  masks[4, 0:3, :] = 1
  masks[6, 8:, 8:] = 1
  maps = maps + 0.5 * masks  # anomalies score higher, but not perfectly
  labels = np.asarray([0, 0, 0, 1, 1, 0, 1])
  return maps, masks, labels
"""

WORKER = (
  DATA
  + """
import json, sys
import jax

port, pid, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from maeday_jax import evaluation, metrics, parallel, reports

maps, masks, labels = category_data()
mine = np.arange(pid, len(maps), 2)
pixels = metrics.PixelMetricAccumulator()
pixels.add(maps[mine], masks[mine])
local = evaluation.ScoredSplit(
  reports.CategoryResult(
    category="tiles",
    file_names=[f"tile_{i}.png" for i in mine],
    labels=labels[mine],
    scores=maps[mine].max(axis=(1, 2)),
    pixels=pixels,
  ),
  indices=mine,
  seconds=1.0 + pid,
)
everyone = evaluation.gather_scored(local)
ragged = parallel.allgather_arrays(
  {"keys": np.arange(pid + 1, dtype=np.uint64) + 2**40, "text": np.asarray(["é" * (pid + 1)])}
)
result = everyone.result
json.dump(
  {
    "process_count": jax.process_count(),
    "indices": everyone.indices.tolist(),
    "file_names": result.file_names,
    "labels": result.labels.tolist(),
    "scores": result.scores.tolist(),
    "seconds": everyone.seconds,
    "pixel_auroc": result.pixels.auroc(),
    "pixel_images": result.pixels.num_images,
    "pixel_regions": result.pixels.num_regions,
    "aupro": result.pixels.aupro(),
    "ragged_keys": [p["keys"].tolist() for p in ragged],
    "ragged_text": [p["text"].tolist() for p in ragged],
  },
  open(f"{out_dir}/{pid}.json", "w"),
)
"""
)


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
  """What each of the two processes ended up with."""
  tmp = tmp_path_factory.mktemp("multihost")
  run_processes(WORKER, str(tmp), timeout=240)
  return [json.loads((tmp / f"{pid}.json").read_text()) for pid in (0, 1)]


def _category_data():
  namespace = {}
  exec(DATA, namespace)
  return namespace["category_data"]()


def test_every_process_gets_the_whole_category_in_split_order(gathered):
  maps, _, labels = _category_data()
  first, second = gathered
  assert first == second  # Every process can report, not only process 0.
  assert first["process_count"] == 2
  assert first["indices"] == list(range(NUM_IMAGES))
  assert first["file_names"] == [f"tile_{i}.png" for i in range(NUM_IMAGES)]
  assert first["labels"] == labels.tolist()
  np.testing.assert_allclose(first["scores"], maps.max(axis=(1, 2)))
  assert first["seconds"] == 2.0  # the slower process


def test_pixel_metrics_pool_both_shards(gathered):
  maps, masks, _ = _category_data()
  result = gathered[0]
  assert result["pixel_images"] == NUM_IMAGES and result["pixel_regions"] == 3
  np.testing.assert_allclose(
    result["pixel_auroc"], roc_auc_score(masks.ravel(), maps.ravel()), rtol=1e-12
  )
  # Process 0 holds image 4's region, process 1 those of images 3 and 6: the region
  # overlap curve needs both, and equals the one of a single process seeing everything.
  np.testing.assert_allclose(result["aupro"], pooled(maps, masks).aupro(), rtol=1e-12)
  assert 0.0 < result["aupro"] < 1.0


def test_ragged_arrays_and_text_travel_unchanged(gathered):
  result = gathered[1]
  assert result["ragged_keys"] == [[2**40], [2**40, 2**40 + 1]]
  assert result["ragged_text"] == [["é"], ["éé"]]


NATIVE_WORKER = """
import sys
import jax
import numpy as np

port, pid, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from maeday_jax import batch_step, parallel
from tests.test_multihost import native_detector_and_images

detector, images = native_detector_and_images()
mesh = parallel.data_mesh()
step = batch_step.compile_step(detector, mesh, 2)
# Process 0 scores both images (several passes of one tile per device), process 1 only
# padding (no tile of its own): the passes are a collective, every process runs as many.
mine = images if pid == 0 else [None]
maps, scores = step(parallel.replicate(detector.state, mesh), mine, detector.scoring_key(), mesh)
np.savez(f"{out_dir}/{pid}.npz", maps=maps, scores=scores)
"""


def native_detector_and_images():
  """A zero-shot MAEDAY (the tiny random MAE) tiled at each image's own size, one tile
  per device per pass, and two rectangles of different sizes."""
  from maeday_jax import defaults, detectors

  config = defaults.fit_config("runlocal")
  config.detector = "maeday"
  config.tiling.update(mode="tiles", image_size=48, stride=16, max_tiles=1, resize_short_side=-1)
  detector = detectors.create(config, "maeday")
  detector.fit(None, None)
  rng = np.random.default_rng(5)
  images = [rng.normal(size=shape).astype(np.float32) for shape in [(40, 70, 3), (32, 48, 3)]]
  return detector, images


def test_images_of_their_own_sizes_score_alike_on_two_processes(tmp_path):
  """Host-side tiles on two processes of one device each, one with no image at all:
  both finish, and process 0's maps and scores are those of one process alone."""
  run_processes(NATIVE_WORKER, str(tmp_path), timeout=240)
  from maeday_jax.detectors import scoring

  detector, images = native_detector_and_images()
  maps, scores = scoring.score_images(detector, images)
  first, second = (np.load(tmp_path / f"{pid}.npz") for pid in (0, 1))
  np.testing.assert_allclose(first["maps"], maps, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(first["scores"], scores, rtol=1e-4)
  assert second["maps"].shape == (1, 48, 48) and not second["maps"].any()
