"""PMAD: the detector's score against a NumPy composition of its parts, training, the
visual-token targets, the protocols through the job, and refused settings.

The parts (masking strategies, the flow, the abnormality and proposal selection) have their
own tests in test_pmad_parts.py; the fit/save/load/bulk round trip is in
test_detectors.py.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage

from maeday_jax import defaults, models
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import pmad as pmad_detector
from maeday_jax.detectors import registry
from maeday_jax.jobs import pmad as pmad_job
from maeday_jax.models import pmad_vit
from maeday_jax.pmad import flow, training
from maeday_jax.settings import pmad as pmad_settings
from maeday_jax.weight_files.errors import CheckpointError
from tests import data_makers

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _settings(**fields) -> ml_collections.ConfigDict:
  config = defaults.fit_config("runlocal")
  config.detector = "pmad"
  for key, value in fields.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return registry.settings_of(pmad_detector.Pmad, config)


# ---------------------------------------------------------------- the score, by hand


def _numpy_score(detector, state, images, how="entropy"):
  """The method's score recomputed in NumPy from the detector's networks' outputs:
  nearest prototypes by brute force, the abnormality and the proposal masks by hand, the
  entropy, nearest upsampling and SciPy's Gaussian (sigma 4, 33 taps, mirrored)."""
  net = models.load("test_wide", "random", key=jax.random.key(0))
  tokens = net.patch_tokens(jnp.asarray(images), layers=(1, 2))
  grid = detector._model.grid_size
  feats = []
  for layer in (1, 2):
    t = np.asarray(tokens[layer], np.float64)
    b, h, w, c = t.shape
    if h % grid == 0:  # Average pooling to the grid.
      f = h // grid
      t = t.reshape(b, grid, f, grid, f, c).mean(axis=(2, 4))
    else:  # The 2 x 2 stage to 4 x 4: bilinear, as jax.image.resize (upsampling).
      t = np.asarray(
        jax.image.resize(jnp.asarray(t, jnp.float32), (b, grid, grid, c), "linear"), np.float64
      )
    feats.append(t.reshape(b, grid * grid, c))
  feats = np.concatenate(feats, axis=-1)
  protos = np.asarray(state["prototypes"], np.float64)
  d2 = ((feats[:, :, None, :] - protos[None, None]) ** 2).sum(-1)
  residuals = feats - protos[d2.argmin(-1)]
  z = residuals @ np.asarray(state["projection"], np.float64)
  module = detector._flow_module()
  ll = np.asarray(
    flow.log_likelihood(state["flow"], module, jnp.asarray(z.reshape(-1, z.shape[-1]), jnp.float32))
  ).reshape(len(images), -1)
  ll = ll.astype(np.float64)
  abnormality = -np.expm1(ll - ll.max(axis=1, keepdims=True))
  count = max(int(round(detector._mask_ratio * ll.shape[1])), 1)
  masked = np.zeros_like(ll, bool)
  for row, order in enumerate(np.argsort(ll, axis=1, kind="stable")):
    masked[row, order[:count]] = True
  logits = np.asarray(
    detector._model.apply({"params": state["reconstructor"]}, jnp.asarray(images), masked),
    np.float64,
  )
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  if how == "surprise":  # -log p of each patch's own code (its nearest codebook row).
    book = np.asarray(state["codebook"], np.float64)
    codes = ((feats[:, :, None, :] - book[None, None]) ** 2).sum(-1).argmin(-1)
    term = -np.take_along_axis(logp, codes[..., None], axis=-1)[..., 0]
  else:
    term = -(np.exp(logp) * logp).sum(-1)
  patch = np.where(masked, term * abnormality, 0.0)
  if how == "flow":
    patch = -ll
  patch = patch.reshape(len(images), grid, grid)
  size = images.shape[1]
  up = np.repeat(np.repeat(patch, size // grid, axis=1), size // grid, axis=2)
  maps = np.stack([scipy.ndimage.gaussian_filter(m, 4.0, mode="mirror", truncate=4.0) for m in up])
  return maps, maps.reshape(len(images), -1).max(axis=1), masked


@pytest.mark.parametrize("how", ["entropy", "surprise", "flow"])
def test_score_is_entropy_times_abnormality_on_the_proposal_masks(how):
  detector = pmad_detector.Pmad(_settings())
  detector._load_features()
  detector._model = pmad_vit.create("test", 32, 16)
  detector._target, detector._mask_ratio = "codebook", 0.25
  key = jax.random.key(3)
  params = pmad_vit.init_params(detector._model, key)
  # Larger head weights: entropies that differ between patches.
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: x * 30 if "head" in str(path) else x, params
  )
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  feats = training.features_of(
    detector._net, rng.integers(0, 255, (6, 32, 32, 3), np.uint8), (1, 2), 4, 0
  )
  prototypes = feats.reshape(-1, feats.shape[-1])[::3]
  width = prototypes.shape[1]
  projection = np.linalg.qr(rng.normal(size=(width, 8)))[0].astype(np.float32)
  detector._flow_dim = 8
  _, flow_params = flow.init_flow(key, 8, num_couplings=2, hidden=16)
  flow_params = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), flow_params)
  state = {
    "reconstructor": params,
    "features": detector._net.params,
    "prototypes": jnp.asarray(prototypes),
    "projection": jnp.asarray(projection),
    "flow": flow_params,
    "codebook": jnp.asarray(feats.reshape(-1, feats.shape[-1])[1::5][:16]),
  }
  detector.state = state
  detector.set_scoring(how)
  score = jax.jit(detector.score_function(None, 3))
  maps, scores = score(state, jnp.asarray(images), None, None)
  want_maps, want_scores, masked = _numpy_score(detector, state, images, how)
  assert masked.sum(axis=1).tolist() == [4, 4, 4]  # 25 % of 16 patches.
  assert np.ptp(want_scores) > 0
  np.testing.assert_allclose(np.asarray(maps), want_maps, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=2e-4)


# --------------------------------------------------------------------------- training


def _folder_source(tmp_path, count=16, size=32) -> ml_collections.ConfigDict:
  rng = np.random.default_rng(1)
  folder = tmp_path / "normals"
  folder.mkdir()
  from PIL import Image

  base = np.linspace(40, 200, size)[None, :, None]
  for i in range(count):
    image = np.clip(base + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(folder / f"n{i}.png")
  return defaults.training_source(
    "test", name="folder", path=str(folder), data_dir=str(tmp_path / "tfds"), num_workers=1
  )


def test_a_few_training_steps_decrease_the_loss(tmp_path):
  section = _settings().pmad
  section.target = "pixels"
  section.train.update(steps=30, batch_size=8, lr=3e-3, warmup_steps=2, strategies="random=1")
  section.log_every, section.checkpoint_every = 1, 100
  summary = training.train(
    section,
    0,
    [_folder_source(tmp_path)],
    tmp_path / "run",
    lambda images, grid: (training.Frozen("pixels"), 8 * 8 * 3),
  )
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  losses = [r["loss"] for r in records]
  assert len(losses) == 30 and np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
  model, params, record = training.load_reconstructor(summary["reconstructor_dir"])
  assert record["target"] == "pixels" and model.out_dim == 192
  # A rerun resumes at the end: nothing more to train, the same model.
  again = training.train(
    section,
    0,
    [_folder_source_again(tmp_path)],
    tmp_path / "run",
    lambda images, grid: (training.Frozen("pixels"), 192),
  )
  assert again["resumed_from_step"] == 30
  _, params_again, _ = training.load_reconstructor(again["reconstructor_dir"])
  jax.tree.map(np.testing.assert_array_equal, params, params_again)


def test_tiled_training_fits_the_codebook_on_the_tiles_it_predicts(tmp_path):
  """With `load_size` > `image_size` the targets come from tiles at the images' own
  resolution, so the codebook (built by `frozen_parts`) must see those tiles, whole pixels,
  not the images resized to the model's size."""
  section = _settings().pmad
  size = int(section.image_size)
  section.target = "pixels"
  section.train.update(steps=1, batch_size=8, load_size=2 * size + 8, strategies="random=1")
  seen = []

  def frozen_parts(images, grid):
    seen.append(np.asarray(images))
    return training.Frozen("pixels"), (size // grid) ** 2 * 3

  training.train(
    section, 0, [_folder_source(tmp_path, size=2 * size + 8)], tmp_path / "r", frozen_parts
  )
  from maeday_jax.pretrain import inputs

  source = inputs.training_sources([_folder_source_again(tmp_path)])
  loaded, _ = inputs.load_images(source, 2 * size + 8, True)
  # Starts along a side: 0, size and the last flush with the border (size + 8).
  want = [
    image[y : y + size, x : x + size]
    for image in loaded
    for y in (0, size, size + 8)
    for x in (0, size, size + 8)
  ]
  np.testing.assert_array_equal(seen[0], np.stack(want))


def _folder_source_again(tmp_path):
  return defaults.training_source(
    "test",
    name="folder",
    path=str(tmp_path / "normals"),
    data_dir=str(tmp_path / "tfds"),
    num_workers=1,
  )


def test_visual_token_targets_come_from_the_dvae_and_its_vocabulary_is_checked(tmp_path):
  tokenizer = str(FIXTURES / "dvae_ref_encoder.pkl")
  detector = pmad_detector.Pmad(
    _settings(**{"pmad.target": "dvae", "pmad.tokenizer": tokenizer, "pmad.tokenizer_vocab": 64})
  )
  images = np.random.default_rng(2).integers(0, 255, (2, 32, 32, 3), np.uint8)
  frozen, out_dim = detector._frozen_parts(images, 4)
  assert out_dim == 64
  x = (jnp.asarray(images, jnp.float32) / 255.0 - jnp.array([0.485, 0.456, 0.406])) / jnp.array(
    [0.229, 0.224, 0.225]
  )
  codes = np.asarray(frozen.targets(frozen.arrays, x, 4, 8))
  # The tokenizer sees the image at 8 px per grid cell (32 px here), as the fixture's
  # 32 px images: the same codes as the reference PyTorch encoder's argmax.
  reference = np.load(FIXTURES / "dvae_ref_io.npz")
  ref_x = (jnp.asarray(reference["images_32"]) - jnp.array([0.485, 0.456, 0.406])) / jnp.array(
    [0.229, 0.224, 0.225]
  )
  ref_codes = np.asarray(frozen.targets(frozen.arrays, ref_x, 4, 8))
  np.testing.assert_array_equal(ref_codes, reference["tokens_32"].reshape(2, -1))
  assert codes.shape == (2, 16) and codes.dtype == np.int32
  wrong = pmad_detector.Pmad(_settings(**{"pmad.target": "dvae", "pmad.tokenizer": tokenizer}))
  with pytest.raises(CheckpointError, match="8192.*64|vocab"):
    wrong._frozen_parts(images, 4)


# -------------------------------------------------------------------------- protocols


def _job_config(root, tfds_dir, **protocol) -> ml_collections.ConfigDict:
  config = defaults.pmad_config("runlocal")
  config.data.update(name="mvtec_ad", path=str(root), data_dir=str(tfds_dir), num_workers=1)
  config.eval.data.update(name="mvtec_ad", path=str(root), data_dir=str(tfds_dir))
  config.eval.data.num_workers = 1
  config.eval.eval_size = 32
  config.eval.outputs.overlays = False
  config.eval.outputs.panels = 0
  config.eval.outputs.roc = False
  config.protocol.update(protocol)
  return config


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
  root = tmp_path_factory.mktemp("mvtec")
  data_makers.make_mvtec(root, ("bottle", "carpet"))
  return root


def test_cross_class_reuses_the_seen_reconstructor_for_an_unseen_category(mvtec, tmp_path):
  config = _job_config(mvtec, tmp_path / "tfds", name="cross", unseen="carpet")
  config.data.categories = "bottle"
  config.eval.data.categories = "bottle,carpet"
  result = pmad_job.run(config, tmp_path / "run")
  run = tmp_path / "run"
  assert set(result["per_category"]) == {"carpet"}
  assert np.isfinite(result["per_category"]["carpet"]["image_auroc"])
  assert (run / "seen" / "training" / "pmad_training" / "reconstructor").is_dir()
  assert not (run / "carpet" / "training" / "pmad_training").exists()  # Nothing retrained.
  seen = json.loads((run / "seen" / "detector" / "manifest.json").read_text())
  unseen = json.loads((run / "carpet" / "detector" / "manifest.json").read_text())
  assert unseen["record"]["reconstructor"] == seen["record"]["reconstructor"]
  assert "steps" not in unseen["record"]["training"]  # Only the flow was fitted.
  assert (run / "pmad_table.md").read_text().startswith("PMAD, cross protocol")
  metrics = json.loads((run / "metrics.json").read_text())
  assert metrics["protocol"] == "cross" and metrics["published"] is None
  # The unseen line's detector exports (StableHLO and ONNX) and scores as the library.
  from maeday_jax import detectors, exported, exporting
  from maeday_jax.detectors import scoring

  detector = detectors.load(run / "carpet" / "detector")
  images = np.random.default_rng(5).normal(size=(3, 32, 32, 3)).astype(np.float32)
  want_maps, want_scores = scoring.score_images(detector, images)
  folders = [exporting.export_stablehlo(detector, tmp_path / "shlo")]
  if importlib.util.find_spec("jax2onnx") and importlib.util.find_spec("onnxruntime"):
    from maeday_jax import exporting_onnx

    folders.append(exporting_onnx.export_onnx(detector, tmp_path / "onnx"))
  for folder in folders:
    maps, scores = exported.load(folder).score(images)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps, want_maps, rtol=1e-4, atol=1e-5)


def test_multi_class_fits_one_detector_for_every_category(mvtec, tmp_path):
  config = _job_config(mvtec, tmp_path / "tfds", name="multi")
  config.data.categories = "bottle,carpet"
  config.eval.data.categories = "bottle,carpet"
  result = pmad_job.run(config, tmp_path / "run")
  assert set(result["per_category"]) == {"bottle", "carpet"}
  assert (tmp_path / "run" / "detector" / "manifest.json").is_file()
  assert result["published"] == {"image_auroc": 94.5, "pixel_auroc": 95.6}


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("pmad.mask_ratio", 0.0, "pmad.mask_ratio"),
    ("pmad.mask_ratio", 1.5, "pmad.mask_ratio"),
    ("pmad.mask_ratios", "bottle=1.2", "pmad.mask_ratios"),
    ("pmad.mask_ratios", "bottle", "pmad.mask_ratios"),
    ("pmad.train.mask_ratio", 1.0, "pmad.train.mask_ratio"),
    ("pmad.train.strategies", "random=1,zigzag=1", "zigzag"),
    ("pmad.train.strategies", "random=0", "not all 0"),
    ("pmad.target", "edges", "pmad.target"),
    ("pmad.image_size", 36, "pmad.image_size"),
    ("pmad.reconstructor", "/no/such/folder", "pmad.reconstructor"),
    ("pmad.flow.projection_dim", -1, "projection_dim"),
    ("pmad.scoring", "loudness", "pmad.scoring"),
  ],
)
def test_bad_settings_are_refused_before_anything_runs(field, value, message):
  config = defaults.fit_config("runlocal")
  *parents, name = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[name] = value
  with pytest.raises(ConfigError, match=message):
    pmad_detector.Pmad.validate(config)


def test_cross_class_protocol_refuses_overlap_and_empty_unseen(mvtec, tmp_path):
  config = _job_config(mvtec, tmp_path / "tfds", name="cross", unseen="")
  with pytest.raises(ConfigError, match="protocol.unseen"):
    pmad_job.run(config, tmp_path / "a")
  config = _job_config(mvtec, tmp_path / "tfds", name="cross", unseen="bottle")
  config.data.categories = "bottle"
  with pytest.raises(ConfigError, match="never saw"):
    pmad_job.run(config, tmp_path / "b")


def test_a_category_without_normal_images_is_refused_by_name(tmp_path):
  from maeday_jax import data
  from maeday_jax.detectors.base import NormalImages

  folder = tmp_path / "line7"
  folder.mkdir()
  for i in range(2):  # Nothing readable: no normal image for the prototypes.
    (folder / f"d{i}.png").write_bytes(b"not a picture")
  source = defaults.training_source(
    "test", name="folder", path=str(folder), data_dir=str(tmp_path / "tfds")
  )
  detector = pmad_detector.Pmad(_settings())
  normals = NormalImages(read=lambda size: (None, None), data=source, workdir=tmp_path / "w")
  with pytest.raises(data.DataError, match="line7"):
    detector.fit(normals, jax.random.key(0))
  assert not (tmp_path / "w").exists()  # Refused before any training.


def test_ratio_overrides_parse():
  assert pmad_settings.parse_ratios("bottle=0.3, cable = 0.2,") == {"bottle": 0.3, "cable": 0.2}
  with pytest.raises(ValueError, match="not name=number"):
    pmad_settings.parse_ratios("bottle:0.3")


def test_a_resumed_training_keeps_the_codebook_it_started_with(tmp_path):
  first = training.Frozen("codebook", codebook=np.arange(6, dtype=np.float32).reshape(3, 2))
  training._keep_codebook(first, tmp_path)
  again = training.Frozen("codebook", codebook=np.zeros((3, 2), np.float32))
  training._keep_codebook(again, tmp_path)
  np.testing.assert_array_equal(np.asarray(again.arrays["codebook"]), np.arange(6).reshape(3, 2))
  other = training.Frozen("codebook", codebook=np.zeros((4, 2), np.float32))
  with pytest.raises(ConfigError, match="new workdir"):
    training._keep_codebook(other, tmp_path)


def test_the_mask_ratio_can_be_changed_for_scoring_but_only_within_0_and_1():
  detector = pmad_detector.Pmad(_settings())
  detector.set_mask_ratio(0.5)
  assert detector.mask_ratio == 0.5
  for bad in (0.0, 1.0, -0.1, float("nan")):
    with pytest.raises(ValueError, match="must be in"):
      detector.set_mask_ratio(bad)


def test_surprise_scoring_needs_the_patches_own_codes():
  config = defaults.fit_config("runlocal")
  config.pmad.update(target="dvae", scoring="surprise")
  with pytest.raises(ConfigError, match="tokenizer at scoring"):
    pmad_detector.Pmad.validate(config)
  detector = pmad_detector.Pmad(_settings())  # A codebook target, but no codebook held.
  with pytest.raises(ConfigError, match="codebook"):
    detector.set_scoring("surprise")


def test_a_reused_reconstructor_must_share_the_feature_network_of_its_codes():
  detector = pmad_detector.Pmad(_settings())
  same = detector.settings.pmad.features.to_dict()
  record = {"target": "codebook", "features": same, "architecture": {"img_size": 32}}
  detector._check_reconstructor(record, "r")  # The same network: accepted.
  for target in ("codebook", "features"):
    other = {**record, "target": target, "features": {**same, "layers": [3]}}
    with pytest.raises(ConfigError, match="trained on the features of"):
      detector._check_reconstructor(other, "r")
  pixels = {**record, "target": "pixels", "features": {**same, "layers": [3]}}
  detector._check_reconstructor(pixels, "r")  # Pixels do not depend on it.
  with pytest.raises(ConfigError, match="pmad.image_size"):
    detector._check_reconstructor({**record, "architecture": {"img_size": 64}}, "r")


def test_the_reconstructor_trains_on_visual_tokens(tmp_path):
  section = _settings(
    **{
      "pmad.target": "dvae",
      "pmad.tokenizer": str(FIXTURES / "dvae_ref_encoder.pkl"),
      "pmad.tokenizer_vocab": 64,
    }
  ).pmad
  section.train.update(steps=2, batch_size=8)
  summary = training.train(
    section,
    0,
    [_folder_source(tmp_path)],
    tmp_path / "run",
    lambda images, grid: training.frozen_networks(section, None, images, grid, 0),
  )
  model, _, record = training.load_reconstructor(summary["reconstructor_dir"])
  assert record["target"] == "dvae" and model.out_dim == 64 and record["codebook"] is None
  assert np.isfinite(summary["final_loss"]) and summary["final_loss"] > 0


def test_a_feature_network_trained_first_on_the_normal_images(mvtec, tmp_path):
  """`pmad.features.checkpoint=pretrain`: the fit pre-trains an MAE on the normal images
  (the `model` and `pretrain` sections), resumably, and the detector's feature network is
  that MAE, weight for weight; the artifact scores without the training folder."""
  from maeday_jax import checkpoints, detectors
  from maeday_jax.jobs import fit as fit_job

  config = defaults.fit_config("runlocal")
  config.detector = "pmad"
  config.data.update(name="mvtec_ad", path=str(mvtec), data_dir=str(tmp_path / "tfds"))
  config.data.categories, config.data.num_workers = "bottle", 1
  config.pmad.features.update(backbone="mae_test", checkpoint="pretrain", layers=(1,))
  config.pretrain.train.steps = 2
  fit_job.run(config, tmp_path / "fit")
  trained = tmp_path / "fit" / "training" / pmad_detector.FEATURES_DIR / "model"
  _, mae_params = checkpoints.load_mae(str(trained))
  detector = detectors.load(tmp_path / "fit" / fit_job.ARTIFACT_DIR)
  assert detector.training["features"]["steps"] == 2
  flat = dict(jax.tree_util.tree_leaves_with_path(detector._net.params))
  for path, value in jax.tree_util.tree_leaves_with_path(mae_params):
    np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(value))
  config.pretrain.train.steps = 0
  config.pretrain.train.epochs = -1.0
  with pytest.raises(ConfigError, match="pretrain.train"):
    pmad_detector.Pmad.validate(config)
