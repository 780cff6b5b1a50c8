"""Tiled scoring at each image's own size (`tiling.resize_short_side`): tile layout on
rectangles, stitching against a NumPy reference written here, chunked passes, equality
with the square tiled path on square images, and fit -> evaluate -> bulk -> serve on a
folder of rectangular images of different sizes."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from maeday_jax import defaults, detectors, exporting, resizing, tiling, tiling_native
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import scoring
from maeday_jax.jobs import detector_choice
from maeday_jax.jobs import evaluate as evaluate_job
from maeday_jax.jobs import fit as fit_job
from maeday_jax.jobs import score as score_job
from maeday_jax.serve import model as served
from tests.test_detectors import _data, _scores  # The folder layout both write.
from tests.test_tiling import _reference_starts


def _grid(**fields) -> tiling.Tiling:
  values = dict(image_size=24, tile_size=20, stride=15, model_size=20, short_side=-1)
  return tiling.Tiling(**{**values, **fields})


def test_rectangles_are_covered_and_small_images_enlarged_to_one_tile():
  grid = _grid()
  assert tiling_native.positions(50, 70, grid) == tuple(
    (y, x) for y in (0, 15, 30) for x in (0, 15, 30, 45, 50)
  )
  assert tiling_native.image_shape(50, 70, grid) == (50, 70)
  # Short side 12 < the 20 px tile: enlarged, aspect kept (12 x 30 -> 20 x 50).
  assert tiling_native.image_shape(12, 30, grid) == (20, 50)
  assert tiling_native.positions(20, 50, grid) == ((0, 0), (0, 15), (0, 30))


class _TileMeans:
  """A detector whose map of a tile is the tile's mean (its score too)."""

  def __init__(self, grid):
    self.tiling = grid

  def refuse_tiling_if_transductive(self):
    pass  # Scores every tile on its own.

  def score_function(self, mesh, local_batch):
    del mesh, local_batch

    def score(state, images, ids, key):
      del state, ids, key
      means = images.mean(axis=(1, 2, 3))
      return jnp.broadcast_to(means[:, None, None], images.shape[:3]), means

    return score

  def tiled_image_scores(self, maps, tile_scores):
    del maps
    return tile_scores.max(axis=1)


def _reference(image: np.ndarray, tile: int, stride: int, combine: str):
  """(stitched map, largest tile mean) of one rectangle, by loops written here."""
  height, width = image.shape[:2]
  total, count = np.zeros((height, width)), np.zeros((height, width))
  best, means = np.full((height, width), -np.inf), []
  for y in _reference_starts(height, tile, stride):
    for x in _reference_starts(width, tile, stride):
      mean = image[y : y + tile, x : x + tile].mean()
      means.append(mean)
      total[y : y + tile, x : x + tile] += mean
      count[y : y + tile, x : x + tile] += 1
      best[y : y + tile, x : x + tile] = np.maximum(best[y : y + tile, x : x + tile], mean)
  return (total / count if combine == "mean" else best), max(means)


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_stitched_rectangles_equal_the_numpy_reference_in_any_number_of_passes(combine):
  rng = np.random.default_rng(0)
  images = [rng.normal(size=shape).astype(np.float32) for shape in [(50, 70, 3), (20, 20, 3)]]
  images.insert(1, None)  # Padding: scored as nothing.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  results = []
  for max_tiles in (64, 2):  # One pass; nine passes of two tiles (the last padded).
    grid = _grid(combine=combine, max_tiles=max_tiles)
    step = tiling_native.compile_step(_TileMeans(grid), mesh)
    results.append(step({}, images, None, mesh))
  maps, scores = results[0]
  # Equal up to the float reduction order of another batch shape.
  np.testing.assert_allclose(maps, results[1][0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(scores, results[1][1], rtol=1e-5, atol=1e-7)
  assert maps.shape == (3, 24, 24) and scores[1] == 0 and not maps[1].any()
  for row in (0, 2):
    stitched, best = _reference(images[row], 20, 15, combine)
    # Handed on at 24 x 24: Pillow's bilinear resize of the stitched map.
    resized = np.asarray(Image.fromarray(stitched.astype(np.float32)).resize((24, 24), 2))
    np.testing.assert_allclose(maps[row], resized, rtol=1e-5, atol=1e-6)
    assert scores[row] == pytest.approx(best, rel=1e-5)
    native = tiling_native.stitch_image(
      np.stack([np.full((20, 20), m) for m in _tile_means(images[row])]),
      images[row].shape[:2],
      _grid(combine=combine),
    )
    np.testing.assert_allclose(native, stitched, rtol=1e-5, atol=1e-6)


def _tile_means(image):
  return [
    image[y : y + 20, x : x + 20].mean()
    for y in _reference_starts(image.shape[0], 20, 15)
    for x in _reference_starts(image.shape[1], 20, 15)
  ]


def _config(method: str, **tiles) -> ml_collections.ConfigDict:
  config = defaults.fit_config("runlocal")
  config.detector = method
  config.tiling.update(tiles)
  return config


@pytest.mark.parametrize("method", ["patchcore", "maeday"])
def test_square_images_at_their_own_size_score_as_the_square_tiled_path(method):
  """The same tiles, the same content ids (MAEDAY's masks), the same maps: read at its
  own size, a square image of `image_size` is the square path's image."""
  config = _config(method, mode="tiles", image_size=64, stride=16)
  # Float32: the two paths batch the tiles differently, which bfloat16 rounds differently.
  config.model.dtype = "float32"
  square = detectors.create(config, method)
  rng = np.random.default_rng(0)
  shots = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  detectors.fit_with_statistics(
    square, detectors.NormalImages.from_arrays(shots, shots[:1]), jax.random.key(0)
  )
  native = square.with_seed(0)
  native.state, native.normal_statistics = square.state, square.normal_statistics
  native.settings.tiling.resize_short_side = -1
  images = rng.normal(size=(3, 64, 64, 3)).astype(np.float32)
  maps_a, scores_a = scoring.score_images(square, images)
  maps_b, scores_b = scoring.score_images(native, list(images))
  np.testing.assert_allclose(maps_b, maps_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores_b, scores_a, rtol=1e-5)


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"resize_short_side": -2}, "tiling.resize_short_side"),
    ({"resize_short_side": -5}, "tiling.resize_short_side"),
    ({"resize_short_side": 224_000}, "at most 16384"),
    ({"mode": "none", "resize_short_side": 224}, "set --config.tiling.mode=tiles too"),
  ],
)
def test_bad_short_sides_are_refused_before_any_work(fields, message):
  with pytest.raises(ConfigError, match=message):
    detector_choice.check(_config("patchcore", **{"mode": "tiles", **fields}))


def test_a_short_side_below_the_tile_is_refused_when_the_detector_is_built():
  config = _config("patchcore", mode="tiles", resize_short_side=16)  # The tile: 32 px.
  with pytest.raises(ConfigError, match="below the tile"):
    _ = detectors.create(config, "patchcore").tiling


def test_an_export_refuses_a_map_size_that_holds_no_tile():
  config = _config("patchcore", mode="tiles", image_size=16, resize_short_side=-1)
  detector = detectors.create(config, "patchcore")  # Native: the 32 px tile may exceed 16.
  assert detector.tiling.tile_size == 32
  with pytest.raises(ConfigError, match="tiling.image_size"):
    exporting.scoring(detector)


# ------------------------------------------------------------ jobs, rectangular images

SHAPES = [(40, 72), (56, 40), (36, 90), (48, 48), (40, 60), (64, 44)]


@pytest.fixture(scope="module")
def rectangles(tmp_path_factory) -> pathlib.Path:
  """normal/ (8 textures of different shapes), images/ (3 normal, 3 with a bright bar)
  and masks/, every file its own size."""
  root = tmp_path_factory.mktemp("rectangles")
  rng = np.random.default_rng(3)

  def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)

  def texture(shape):
    base = np.linspace(60, 180, shape[1], dtype=np.float32)[None, :, None]
    return np.clip(base + rng.normal(0, 12, (*shape, 3)), 0, 255).astype(np.uint8)

  for i in range(8):
    write(root / "normal" / f"n{i}.png", texture(SHAPES[i % len(SHAPES)]))
  for i, shape in enumerate(SHAPES):
    image, mask = texture(shape), np.zeros(shape, np.uint8)
    if i >= 3:
      image[8:16, 5:30] = 250
      mask[8:16, 5:30] = 255
    write(root / "images" / f"t{i}.png", image)
    write(root / "masks" / f"t{i}.png", mask)
  return root


def test_fit_evaluate_bulk_and_serve_agree_on_rectangles_of_their_own_size(rectangles, tmp_path):
  """PatchCore tiled at each image's own size: its bank holds the patches of every
  shot's own tiles, and evaluation, bulk scoring and the service give each file the same
  score (the tiles of one rectangle, wherever it is scored)."""
  tfds = tmp_path / "tfds"
  config = _config("patchcore", mode="tiles", image_size=48, stride=16, resize_short_side=-1)
  config.data.update(_data(rectangles, tfds))
  config.shots, config.heldout_normals = 2, 4
  summary = fit_job.run(config, tmp_path / "fit")
  artifact = tmp_path / "fit" / fit_job.ARTIFACT_DIR
  fitted = detectors.load(artifact)
  assert fitted.tiling.native and "its own size" in fitted.tiling.describe()
  shapes = [Image.open(rectangles / "normal" / name).size[::-1] for name in summary["shots"]]
  tiles = sum(
    len(_reference_starts(h, 32, 16)) * len(_reference_starts(w, 32, 16)) for h, w in shapes
  )
  assert fitted.state["bank"].shape[0] == tiles * 16 // 2  # 4 x 4 patches a tile, half kept.

  evaluate = defaults.evaluate_config("runlocal")
  evaluate.detector = str(artifact)
  evaluate.data.update(_data(rectangles, tfds))
  evaluate.outputs.update(overlays=False, panels=0, reconstructions=0, roc=False)
  evaluate_job.run(evaluate, tmp_path / "eval")
  from configs import score as score_config

  bulk = score_config.get_config("runlocal")
  bulk.detector, bulk.data.path = str(artifact), str(rectangles / "images")
  bulk.data.num_workers, bulk.commit_every, bulk.compilation_cache_dir = 2, 1, ""
  score_job.run(bulk, tmp_path / "bulk")
  evaluated = _scores(tmp_path / "eval" / "scores.csv")
  scored = _scores(tmp_path / "bulk" / "scores.csv")
  assert sorted(evaluated) == sorted(scored) == [f"t{i}.png" for i in range(6)]
  values = np.array([scored[n] for n in sorted(scored)])
  assert np.isfinite(values).all() and np.ptp(values) > 0
  for name, value in evaluated.items():
    assert value == pytest.approx(scored[name], rel=1e-4, abs=1e-6), name

  service = served.load_model(fitted, max_batch=4)
  assert service.aspect == resizing.KeepAspect(-1, 32)
  from maeday_jax.serve import decoding

  inputs = [
    decoding.to_input((rectangles / "images" / f"t{i}.png").read_bytes(), 48, service.aspect)
    for i in (0, 4)
  ]
  assert [x.shape[:2] for x in inputs] == [SHAPES[0], SHAPES[4]]
  maps, served_scores = service.score(inputs)
  assert maps.shape == (2, 48, 48)
  np.testing.assert_allclose(served_scores, [scored["t0.png"], scored["t4.png"]], rtol=1e-4)


def _normal_source(rectangles, tmp_path):
  """The rectangles' normal images as a training source (`pretrain.inputs`)."""
  return defaults.training_source(
    "train",
    name="folder",
    path=str(rectangles / "normal"),
    normal_path=str(rectangles / "normal"),
    data_dir=str(tmp_path / "tfds"),
    num_workers=1,
  )


def test_training_images_read_with_their_aspect_ratio(rectangles, tmp_path):
  """`pretrain.inputs.load_images` with a short side: every normal image, its name, its
  aspect ratio kept (PMAD's prototypes and the validation split read this way)."""
  from maeday_jax.pretrain import inputs

  source = _normal_source(rectangles, tmp_path)
  sources = inputs.training_sources([source])
  square, names = inputs.load_images(sources, 32, True)
  kept, kept_names = inputs.load_images(sources, 32, True, aspect=resizing.KeepAspect(20))
  assert kept_names == names and len(kept) == len(square) == 8
  on_disk = {f"n{i}.png": SHAPES[i % len(SHAPES)] for i in range(8)}
  for image, name in zip(kept, kept_names, strict=True):
    height, width = on_disk[pathlib.PurePath(name).name]
    scale = 20 / min(height, width)
    assert image.shape == (round(height * scale), round(width * scale), 3)
    assert image.dtype == np.uint8


# ------------------------------------------------------- training tiles, aspect kept


def _coordinates(height: int, width: int, ident: int) -> np.ndarray:
  """A uint8 image whose pixels say where they are: (row, column, image id)."""
  rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([rows, columns, np.full_like(rows, ident)], axis=-1).astype(np.uint8)


def test_training_windows_are_whole_pixel_tiles_drawn_alike_on_any_process_count():
  from maeday_jax.pretrain import inputs

  images = inputs.AspectImages([_coordinates(20, 50, 0), _coordinates(36, 24, 1)], 16)
  indices = np.array([0, 1, 1, 0])
  whole = images.windows(indices, slice(0, 4), step=3, seed=0)
  halves = [images.windows(indices, rows, 3, 0) for rows in (slice(0, 2), slice(2, 4))]
  np.testing.assert_array_equal(whole, np.concatenate(halves))
  for window, index in zip(whole, indices, strict=True):
    top, left = int(window[0, 0, 0]), int(window[0, 0, 1])
    height, width = images.images[index].shape[:2]
    assert window[0, 0, 2] == index and 0 <= top <= height - 16 and 0 <= left <= width - 16
    np.testing.assert_array_equal(window, images.images[index][top : top + 16, left : left + 16])
  again = images.windows(indices, slice(0, 4), step=4, seed=0)
  assert not np.array_equal(whole, again)  # Another step, other windows.
  # Every image's non-overlapping tiles, the last flush with the border: rows 0, 4 and
  # columns 0, 16, 32, 34 of the 20 x 50 image; rows 0, 16, 20 and columns 0, 8 of 36 x 24.
  tiles = images.all_tiles()
  assert len(tiles) == 2 * 4 + 3 * 2
  assert [(int(t[0, 0, 0]), int(t[0, 0, 1])) for t in tiles[:4]] == [
    (0, 0),
    (0, 16),
    (0, 32),
    (0, 34),
  ]


def test_pmad_trains_on_tiles_at_the_images_aspect_ratio(rectangles, tmp_path):
  """`pmad.train.load_short_side`: the codebook is fitted on each image's own tiles (the
  images read with their aspect ratio kept, short side 40 px)."""
  from maeday_jax.detectors import pmad as pmad_detector
  from maeday_jax.detectors import registry
  from maeday_jax.pmad import training

  config = defaults.fit_config("runlocal")
  config.detector = "pmad"
  section = registry.settings_of(pmad_detector.Pmad, config).pmad
  size = int(section.image_size)
  section.target = "pixels"
  section.train.update(steps=1, batch_size=8, load_short_side=40, strategies="random=1")
  seen = []

  def frozen_parts(images, grid):
    seen.append(np.asarray(images))
    return training.Frozen("pixels"), (size // grid) ** 2 * 3

  source = _normal_source(rectangles, tmp_path)
  training.train(section, 0, [source], tmp_path / "run", frozen_parts)
  shapes = [SHAPES[i % len(SHAPES)] for i in range(8)]
  expected = 0
  for height, width in shapes:
    scale = 40 / min(height, width)
    height, width = round(height * scale), round(width * scale)
    expected += len(_reference_starts(height, size, size)) * len(
      _reference_starts(width, size, size)
    )
  assert seen[0].shape == (expected, size, size, 3)


def test_non_finite_maps_of_native_tiles_stop_the_bulk_job_before_any_commit(rectangles, tmp_path):
  """A detector whose maps come back non-finite from the host-side tiles is an error
  naming it, never a number, in the bulk job (maps kept or not)."""
  from configs import score as score_config
  from maeday_jax.weight_files import CheckpointError

  config = _config("patchcore", mode="tiles", image_size=48, stride=16, resize_short_side=-1)
  detector = detectors.create(config, "patchcore")
  shots = [np.random.default_rng(0).normal(size=(40, 72, 3)).astype(np.float32)]
  detectors.fit_with_statistics(
    detector, detectors.NormalImages.from_arrays(np.stack(shots)), jax.random.key(0)
  )
  detector.state = {**detector.state, "bank": np.full_like(detector.state["bank"], np.nan)}
  folder = detectors.save(detector, tmp_path / "poisoned")
  for maps in ("none", "float16"):
    bulk = score_config.get_config("runlocal")
    bulk.detector, bulk.data.path = str(folder), str(rectangles / "images")
    bulk.data.num_workers, bulk.compilation_cache_dir = 2, ""
    bulk.outputs.maps = maps
    with pytest.raises(CheckpointError, match="NaN or infinite"):
      score_job.run(bulk, tmp_path / f"bulk_{maps}")
    assert not list((tmp_path / f"bulk_{maps}").rglob("part_*"))


def test_a_strip_that_would_grow_past_the_pixel_budget_is_refused_as_it_is_read(tmp_path):
  """A 2 x 3000 image enlarged to a 224 px short side would hold 75 million pixels: the
  reader refuses it (the bulk job skips the file, the service answers 413) instead of
  allocating it; within the budget it is read at the size the rule gives."""
  from maeday_jax.data import images as image_files
  from maeday_jax.data import preprocess
  from maeday_jax.data.errors import ImageTooLarge

  strip = np.full((2, 3000, 3), 128, np.uint8)
  aspect = resizing.KeepAspect(224, 32)
  assert aspect.size(2, 3000) == (224, 336000)
  assert resizing.KeepAspect(-1, 32).size(20, 50) == (32, 80)  # Enlarged to one tile.
  assert resizing.KeepAspect(16, 32).size(40, 100) == (32, 80)
  image_files.set_pixel_budget(10_000_000)
  try:
    with pytest.raises(ImageTooLarge, match="aspect ratio kept"):
      preprocess.preprocess_image(strip, aspect)
    small = preprocess.preprocess_image(strip[:, :300], resizing.KeepAspect(-1, 32))
    assert small.shape == (32, 4800, 3)
  finally:
    image_files.set_pixel_budget(0)  # Back to the default budget.


def test_an_export_of_a_native_detector_says_what_its_program_computes():
  """The exported program tiles square images: its manifest describes those tiles and
  leaves out the threshold fitted on images read with their aspect ratio kept."""
  config = _config("patchcore", mode="tiles", image_size=64, resize_short_side=-1)
  detector = detectors.create(config, "patchcore")
  manifest = exporting.manifest_of(detector, {"method": "f1", "value": 1.0})
  assert manifest["aspect_kept_by_library_only"] is True and manifest["threshold"] is None
  assert manifest["tiling"].startswith("9 tiles of 32 px") and "own size" not in manifest["tiling"]
  square = exporting.manifest_of(_square(detector), {"method": "f1", "value": 1.0})
  assert square["threshold"] == {"method": "f1", "value": 1.0}
  assert not square["aspect_kept_by_library_only"]


def _square(detector):
  square = detector.with_seed(0)
  square.settings.tiling.resize_short_side = 0
  return square


def test_training_and_scoring_reads_that_differ_are_pointed_out(caplog):
  grid = _grid(short_side=224)
  with caplog.at_level("WARNING", logger="maeday_jax"):
    tiling.warn_if_training_reads_differ(grid, 224, "pmad.train.load_short_side")
    tiling.warn_if_training_reads_differ(None, 0, "mala.stage2.load_short_side")
    assert not caplog.records
    tiling.warn_if_training_reads_differ(grid, 0, "pmad.train.load_short_side")
  assert "pmad.train.load_short_side=0 but tiling.resize_short_side=224" in caplog.text
