"""The text-prompted CLIP detectors (`clip_zero_shot`, `april_gan`) against NumPy written
here: prompt features, similarity softmax, bilinear (align_corners) upsampling with SciPy,
the sum over layers, the few-shot memory term by brute-force cosine distances; focal +
Dice against hand-computed values; adapter training on a tiny masked folder; the artifact
round trip; the refusals. The CLIP itself is the port's, proven in tests/test_clip.py."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from maeday_jax import defaults, detectors
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import april_gan, scoring
from maeday_jax.detectors import clip_zero_shot as zs
from maeday_jax.imagenet import IMAGENET_MEAN, IMAGENET_STD
from maeday_jax.models import clip
from maeday_jax.objectives import losses

SIZE = 32  # The tiny CLIP's 4 x 4 grid of 8-px patches.


def _images(count: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(count, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def aux_folder(tmp_path_factory) -> dict:
  """A folder source of 8 textures, every other one with a bright square and its mask."""
  root = tmp_path_factory.mktemp("clip_aux")
  rng = np.random.default_rng(0)
  for i in range(8):
    image = np.clip(rng.normal(120, 15, (40, 40, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    if i % 2:
      image[8:20, 10:24], mask[8:20, 10:24] = 250, 255
    for folder, array in (("images", image), ("masks", mask)):
      (root / folder).mkdir(exist_ok=True)
      Image.fromarray(array).save(root / folder / f"t{i}.png")
  return {
    "name": "folder",
    "path": str(root / "images"),
    "mask_path": str(root / "masks"),
    "data_dir": str(root / "tfds"),
    "num_workers": 2,
  }


def _config(method: str, aux: dict | None = None, **fields):
  config = defaults.fit_config("runlocal")
  config.detector = method
  if aux is not None:  # runlocal trains on the evaluated data itself (aux name '').
    config.april_gan.aux_data.update(aux)
    config.april_gan.allow_same_dataset = False
  for name, value in fields.items():
    config.april_gan[name] = value
  return config


@pytest.fixture(scope="module")
def zero_shot():
  detector = detectors.create(_config("clip_zero_shot"))
  detector.fit(detectors.NormalImages.from_arrays(np.zeros((0, SIZE, SIZE, 3))), None)
  return detector


@pytest.fixture(scope="module")
def shots():
  return _images(2, 5)


@pytest.fixture(scope="module")
def few_shot(aux_folder, shots):
  config = _config("april_gan", aux_folder, steps=3, batch_size=4, few_shot=True)
  detector = detectors.create(config)
  detector.fit(detectors.NormalImages.from_arrays(shots, data=config.data), None)
  return detector


# ------------------------------------------------------------------ NumPy reference


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _upsample(x, size):
  """(B, h, w) -> (B, size, size): bilinear with the corners aligned (order-1 spline)."""
  grid = np.arange(size) * (x.shape[1] - 1) / (size - 1)
  rows, cols = np.meshgrid(grid, grid, indexing="ij")
  return np.stack([ndimage.map_coordinates(m, [rows, cols], order=1) for m in x])


def _to_clip(images):
  pixels = images * IMAGENET_STD + IMAGENET_MEAN
  return ((pixels - np.array(clip.MEAN)) / np.array(clip.STD)).astype(np.float32)


def _np_text(net, class_name="object"):
  rows = []
  for states in (zs.NORMAL_STATES, zs.ABNORMAL_STATES):
    prompts = [t.format(s.format(class_name)) for s in states for t in zs.TEMPLATES]
    rows.append(_unit(_unit(net.encode_text(prompts)).mean(axis=0)))
  return np.stack(rows)


def _np_prob_maps(joint, text, scale):
  """Per-class logits upsampled, then the abnormal softmax probability (B, S, S)."""
  logits = scale * _unit(joint) @ text.T  # (B, h, w, 2)
  up = np.stack([_upsample(logits[..., k], SIZE) for k in range(2)], axis=-1)
  return _softmax(up)[..., 1]


def _np_image_probability(net, images, text, scale):
  return _softmax(scale * _unit(net.encode_image(images)) @ text.T)[:, 1]


def test_zero_shot_equals_a_numpy_reference(zero_shot):
  tests = _images(3, 1)
  maps, scores = scoring.score_images(zero_shot, tests)
  net, scale = zero_shot._net, float(zero_shot.state["scale"])
  text = _np_text(net)
  np.testing.assert_allclose(zero_shot.state["text"], text, rtol=1e-4, atol=1e-5)
  images = _to_clip(tests)
  tokens = net.patch_tokens(images, layers=(0, 1, 2), project=True)
  expected = np.mean([_np_prob_maps(tokens[i], text, scale) for i in (0, 1, 2)], axis=0)
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(scores, _np_image_probability(net, images, text, scale), rtol=1e-4)


def test_april_gan_maps_and_memory_term_equal_a_numpy_reference(few_shot, shots):
  tests = _images(3, 2)
  maps, scores = scoring.score_images(few_shot, tests)
  net, state = few_shot._net, jax.tree.map(np.asarray, few_shot.state)
  scale, layers = float(state["scale"]), (0, 1, 2)
  kernel, bias = state["adapters"]["kernel"], state["adapters"]["bias"]
  images = _to_clip(tests)
  tokens = {i: np.asarray(t, np.float64) for i, t in net.patch_tokens(images, layers).items()}
  bank = net.patch_tokens(_to_clip(shots), layers)
  expected = 0.0
  for s, layer in enumerate(layers):
    expected = expected + _np_prob_maps(tokens[layer] @ kernel[s] + bias[s], state["text"], scale)
  text_only = expected
  for layer in layers:
    rows = _unit(np.asarray(bank[layer]).reshape(-1, tokens[layer].shape[-1]))
    distance = 1.0 - np.max(_unit(tokens[layer]) @ rows.T, axis=-1)  # (B, h, w)
    expected = expected + _upsample(distance, SIZE)
  assert np.abs(expected - text_only).max() > 1e-3  # The memory term counts.
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)
  probability = _np_image_probability(net, images, state["text"], scale)
  np.testing.assert_allclose(scores, probability + expected.max(axis=(1, 2)), rtol=1e-4)
  # A shot's own patches are in the bank: its memory term is (almost) zero.
  shot_maps, _ = scoring.score_images(few_shot, shots)
  assert shot_maps.max() < len(layers) + 1e-4


# --------------------------------------------------------------------------- losses


def test_focal_and_dice_losses_equal_hand_computed_values():
  # Two pixels: anomaly probability 0.8 on a defect, 0.8 on a normal pixel.
  logits = np.log(np.array([[[0.8, 0.2], [0.8, 0.2]]], np.float32))
  mask = np.array([[1.0, 0.0]], np.float32)
  # -(1 - 0.8)^2 ln 0.8 = 0.0089257, -(1 - 0.2)^2 ln 0.2 = 1.0300385: mean 0.5194821.
  assert float(losses.focal_loss(logits, mask, gamma=2.0)) == pytest.approx(0.5194821, rel=1e-5)
  p = np.array([[0.5, 0.5, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]], np.float32)
  m = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]], np.float32)
  # Image 1: (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3; image 2: (4 + 1) / (2 + 2 + 1) = 1.
  assert float(losses.dice_loss(p, m)) == pytest.approx(1.0 - (2 / 3 + 1) / 2, rel=1e-6)
  assert float(losses.dice_loss(np.zeros((1, 4)), np.zeros((1, 4)))) == pytest.approx(0.0)


def test_adapter_training_decreases_the_loss(few_shot, aux_folder):
  section = few_shot.settings.april_gan
  images, masks, index, names = april_gan.load_masked(few_shot.settings.april_gan.aux_data, SIZE, 2)
  assert images.shape == (8, SIZE, SIZE, 3) and masks.any() and names == ["images"]
  text = np.broadcast_to(np.asarray(few_shot.state["text"]), (8, 2, 24))
  net, layers, scale = few_shot._net, (0, 1, 2), few_shot.state["scale"]
  section = section.copy_and_resolve_references()
  section.batch_size, section.steps = 8, 10  # Full batches: every step sees the same data.
  key = jax.random.key(3)
  trained, history, start = april_gan.train_adapters(
    net, layers, images, masks, text, scale, section, key
  )
  assert start == 0
  start = april_gan.init_adapters(key, 3, 32, 24)
  before = april_gan.adapter_loss(start, net, layers, images, masks, text, scale)
  after = april_gan.adapter_loss(trained, net, layers, images, masks, text, scale)
  assert len(history) == 10 and history[0] == pytest.approx(float(before), rel=1e-5)
  assert float(after) < float(before) - 1e-3
  assert history[-1] < history[0]


# ------------------------------------------------------------------------ artifacts


@pytest.mark.parametrize("which", ["zero_shot", "few_shot"])
def test_artifact_round_trip_scores_identically(request, tmp_path, which):
  fitted = request.getfixturevalue(which)
  loaded = detectors.load(detectors.save(fitted, tmp_path / "det"))
  tests = _images(2, 4)
  maps_a, scores_a = scoring.score_images(fitted, tests)
  maps_b, scores_b = scoring.score_images(loaded, tests)
  np.testing.assert_array_equal(maps_a, maps_b)
  np.testing.assert_array_equal(scores_a, scores_b)
  if which == "few_shot":
    record = loaded.record()
    assert record["zero_shot"] is True and record["few_shot"] is True
    assert record["training"]["steps"] == 3


# ------------------------------------------------------------------------- refusals


def test_aux_data_without_masks_is_refused(aux_folder, tmp_path):
  with pytest.raises(ConfigError, match="aux_data.mask_path: is empty"):
    detectors.create(_config("april_gan", {**aux_folder, "mask_path": ""}))
  # Masks that mark no defect anywhere: refused when the data is read.
  blank = tmp_path / "blank"
  blank.mkdir()
  for name in (pathlib.Path(aux_folder["mask_path"])).iterdir():
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(blank / name.name)
  config = _config("april_gan", {**aux_folder, "mask_path": str(blank)})
  config.april_gan.aux_data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(ConfigError, match="has no defect masks"):
    april_gan.load_masked(config.april_gan.aux_data, SIZE, 2)


def test_training_on_the_evaluated_dataset_is_refused_unless_allowed(aux_folder):
  config = _config("april_gan", {"name": "mvtec_ad"})  # config.data is MVTec AD too.
  with pytest.raises(ConfigError, match="is the dataset being evaluated"):
    detectors.create(config)
  config.april_gan.allow_same_dataset = True
  detectors.create(config)
  assert april_gan.check_aux(config.april_gan, config.data) is False
  folder = _config("april_gan", aux_folder)
  folder.data.update({k: aux_folder[k] for k in ("name", "path")})
  with pytest.raises(ConfigError, match="is the dataset being evaluated"):
    detectors.create(folder)
  folder.data.path = aux_folder["mask_path"]  # Another folder: zero-shot.
  assert april_gan.check_aux(folder.april_gan, folder.data) is True


def test_bad_clip_settings_are_refused():
  config = _config("clip_zero_shot")
  config.clip.class_name = "  "
  with pytest.raises(ConfigError, match="class_name: is empty"):
    detectors.create(config)
  config = _config("clip_zero_shot")
  config.clip.layers = (0, 3)
  with pytest.raises(ConfigError, match="this CLIP has layers 0 to 2"):
    detectors.create(config).fit(detectors.NormalImages.from_arrays(np.zeros((0, 32, 32, 3))), None)


def test_allowed_same_dataset_fit_is_recorded_as_not_zero_shot(aux_folder):
  """runlocal's aux_data.name '' trains on the evaluated data's own test split."""
  config = _config("april_gan", steps=1)
  config.data.update(aux_folder)
  assert config.april_gan.aux_data.name == "" and config.april_gan.allow_same_dataset
  detector = detectors.create(config)
  detector.fit(detectors.NormalImages.from_arrays(_images(1, 6), data=config.data), None)
  record = detector.record()
  assert record["zero_shot"] is False and record["aux_data"]["path"] == aux_folder["path"]
  assert record["training"]["steps"] == 1 and record["training"]["images"] == 8


def test_few_shot_banks_compile_once_per_clip_and_layers(few_shot, shots, compile_counter):
  """The shots' banks of every fit (each category of an evaluation) reuse one compiled
  step; what it computes is the unjitted `shot_banks`."""
  model, layers, params = few_shot._net.model, few_shot.layers, few_shot.state["clip"]
  april_gan._compiled_banks.cache_clear()
  first = april_gan._compiled_banks(model, layers)(params, shots)
  compiled = len(compile_counter)
  assert compiled >= 1
  april_gan._compiled_banks(model, layers)(params, shots[::-1] * 0.5)
  assert len(compile_counter) == compiled, compile_counter[compiled:]
  np.testing.assert_allclose(first, few_shot.state["banks"], rtol=1e-6)
  unjitted = april_gan.shot_banks(model, layers, params, shots)
  np.testing.assert_allclose(first, unjitted, rtol=1e-5, atol=1e-6)
