"""Pictures open, have the promised layout, and show what they claim."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from maeday_jax import metrics, pictures, thresholds

H, W = 40, 48


def _row_width(num_tiles, width=W):
  return num_tiles * width + (num_tiles - 1) * pictures.PANEL_GAP


def _tile(picture: np.ndarray, index: int, width=W, top=pictures.CAPTION_HEIGHT):
  x = index * (width + pictures.PANEL_GAP)
  return picture[top:, x : x + width]


@pytest.fixture
def scene():
  image = np.full((H, W, 3), 128, dtype=np.uint8)
  anomaly_map = np.zeros((H, W), dtype=np.float32)
  anomaly_map[:, W // 2 :] = 1.0  # the right half is "anomalous"
  gt = np.zeros((H, W), dtype=bool)
  gt[10:30, 30:44] = True
  return image, anomaly_map, gt


def test_panel_layout(tmp_path, scene):
  image, anomaly_map, gt = scene
  full = pictures.save_panel(tmp_path / "a" / "full.png", image, anomaly_map, gt, 0.5, title="x")
  no_threshold = pictures.save_panel(tmp_path / "b.png", image, anomaly_map, gt)
  no_gt = pictures.save_panel(tmp_path / "c.png", image, anomaly_map)
  sizes = [Image.open(p).size for p in (full, no_threshold, no_gt)]
  assert sizes[0] == (_row_width(4), pictures.TITLE_HEIGHT + pictures.CAPTION_HEIGHT + H)
  assert sizes[1] == (_row_width(3), pictures.CAPTION_HEIGHT + H)
  assert sizes[2] == (_row_width(2), pictures.CAPTION_HEIGHT + H)


def test_panel_tiles_show_what_they_claim(tmp_path, scene):
  image, anomaly_map, gt = scene
  path = pictures.save_panel(
    tmp_path / "p.png", image, anomaly_map, gt, thresholds.fixed_threshold(0.5)
  )
  picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
  np.testing.assert_array_equal(_tile(picture, 0), image)
  # Contour = mask pixels with a 4-neighbour outside the mask.
  inner = gt[1:-1, 1:-1] & gt[:-2, 1:-1] & gt[2:, 1:-1] & gt[1:-1, :-2] & gt[1:-1, 2:]
  contour = gt & ~np.pad(inner, 1)
  gt_tile = _tile(picture, 1)
  assert (gt_tile[contour] == pictures.GT_COLOUR).all()
  assert (gt_tile[20, 5] == 128).all()  # outside the contour the image is untouched
  predicted = _tile(picture, 3)
  assert (predicted[:, : W // 2] == 0).all()
  right = predicted[:, W // 2 :][~contour[:, W // 2 :]]
  assert (right == 255).all()


def test_overlay_is_red_where_the_map_is_high(tmp_path, scene):
  image, anomaly_map, _ = scene
  path = pictures.save_overlay(tmp_path / "o.png", image, anomaly_map)
  overlay = np.asarray(Image.open(path).convert("RGB")).astype(int)
  assert overlay.shape == (H, W, 3)
  high, low = overlay[:, W // 2 :], overlay[:, : W // 2]
  assert (high[..., 0] > high[..., 2] + 40).all()  # red dominates where the map is high
  assert (low[..., 2] > low[..., 0] + 40).all()  # blue where it is low
  assert high[..., 0].mean() > low[..., 0].mean() + 40


def test_maps_and_masks_are_resized_to_the_image(tmp_path, scene):
  image, anomaly_map, gt = scene
  small_map = anomaly_map[::4, ::4]
  path = pictures.save_panel(tmp_path / "r.png", image, small_map, gt[::2, ::2], 0.5)
  assert Image.open(path).size == (_row_width(4), pictures.CAPTION_HEIGHT + H)
  overlay = pictures.overlay_heatmap(image, small_map)
  assert (overlay[:, -1, 0] > overlay[:, 0, 0] + 40).all()  # red on the right, as at full size


def test_grayscale_and_bad_images(tmp_path, scene):
  _, anomaly_map, _ = scene
  gray = np.full((H, W), 90, dtype=np.uint8)
  assert Image.open(pictures.save_overlay(tmp_path / "g.png", gray, anomaly_map)).size == (W, H)
  with pytest.raises(ValueError, match="uint8"):
    pictures.save_overlay(tmp_path / "f.png", gray.astype(float), anomaly_map)


def test_constant_map_does_not_crash(tmp_path, scene):
  image, _, _ = scene
  path = pictures.save_panel(tmp_path / "k.png", image, np.ones((H, W)), None, 0.5)
  assert Image.open(path).size == (_row_width(3), pictures.CAPTION_HEIGHT + H)


def test_reconstruction_panel(tmp_path, scene):
  image, anomaly_map, _ = scene
  masked = [image // 2, image // 3]
  recons = [image, image]
  path = pictures.save_reconstruction_panel(
    tmp_path / "rec.png", image, masked, recons, anomaly_map
  )
  picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
  assert picture.shape[1] == _row_width(1 + 2 * 2 + 1)
  np.testing.assert_array_equal(_tile(picture, 1), image // 2)
  error_tile = _tile(picture, 5)
  assert error_tile[:, -1, 0].min() > error_tile[:, 0, 0].max()  # jet: high error is red
  with pytest.raises(ValueError, match="one reconstruction per mask"):
    pictures.save_reconstruction_panel(tmp_path / "bad.png", image, masked, recons[:1], anomaly_map)


def test_roc_curve(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 50)
  scores = rng.normal(size=50) + labels
  auroc = pictures.save_roc_curve(tmp_path / "roc" / "bottle.png", scores, labels, "bottle")
  assert auroc == pytest.approx(metrics.image_auroc(scores, labels))
  picture = Image.open(tmp_path / "roc" / "bottle.png")
  assert picture.size == (400, 400)
  undefined = pictures.save_roc_curve(tmp_path / "none.png", scores, np.zeros(50), "one class")
  assert undefined is None and Image.open(tmp_path / "none.png").size == (400, 400)


def _pictures(tmp_path, scene):
  """Every kind of picture, written under tmp_path / "out"; their paths, in writing order."""
  image, anomaly_map, gt = scene
  out = tmp_path / "out"
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 30)
  paths = [
    pictures.save_panel(out / "p" / "panel.png", image, anomaly_map, gt, 0.5, title="t"),
    pictures.save_overlay(out / "overlay.png", image, anomaly_map),
    pictures.save_reconstruction_panel(
      out / "rec.png", image, [image // 2], [image], anomaly_map, "r"
    ),
  ]
  pictures.save_roc_curve(out / "roc.png", rng.normal(size=30) + labels, labels, "roc")
  return paths + [out / "roc.png"]


def test_pictures_have_the_same_bytes_as_saving_to_a_path(tmp_path, scene, monkeypatch):
  # Each picture is also saved the direct way (Pillow's and Matplotlib's own writers, given
  # a path) just before the real write; the atomic write must give the very same bytes.
  direct: list[pathlib.Path] = []
  in_figure = []  # Matplotlib writes its PNG through Pillow: that inner save is not a picture.
  real_image_save, real_savefig = Image.Image.save, pictures.Figure.savefig

  def reference():
    direct.append(tmp_path / "direct" / f"{len(direct)}.png")
    direct[-1].parent.mkdir(exist_ok=True)
    return direct[-1]

  def image_save(self, fp, *args, **kwargs):
    if not in_figure and not isinstance(fp, str | pathlib.Path):
      real_image_save(self, reference())
    return real_image_save(self, fp, *args, **kwargs)

  def savefig(self, fname, *args, **kwargs):
    in_figure.append(True)
    try:
      real_savefig(self, reference())
      return real_savefig(self, fname, *args, **kwargs)
    finally:
      in_figure.pop()

  monkeypatch.setattr(Image.Image, "save", image_save)
  monkeypatch.setattr(pictures.Figure, "savefig", savefig)
  written = _pictures(tmp_path, scene)
  assert len(direct) == len(written) == 4
  for path, reference_path in zip(written, direct, strict=True):
    assert path.read_bytes() == reference_path.read_bytes(), path
  assert len({p.read_bytes() for p in written}) == 4
  assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_a_picture_write_that_fails_half_way_keeps_the_previous_file(tmp_path, scene, monkeypatch):
  before = {p: p.read_bytes() for p in _pictures(tmp_path, scene)}

  def write_half_then_fail(image, fp, filename, *args):
    fp.write(b"\x89PNG\r\n\x1a\n truncated")
    raise OSError("killed while encoding")

  monkeypatch.setitem(Image.SAVE, "PNG", write_half_then_fail)
  image, anomaly_map, gt = scene
  writes = [
    lambda: pictures.save_panel(tmp_path / "out" / "p" / "panel.png", image, anomaly_map, gt, 0.5),
    lambda: pictures.save_overlay(tmp_path / "out" / "overlay.png", image, 1 - anomaly_map),
    lambda: pictures.save_reconstruction_panel(
      tmp_path / "out" / "rec.png", image, [image], [image], anomaly_map
    ),
    lambda: pictures.save_roc_curve(tmp_path / "out" / "roc.png", [0.1, 0.9], [0, 1]),
  ]
  for write in writes:
    with pytest.raises(OSError, match="killed while encoding"):
      write()
  for path, content in before.items():
    assert path.read_bytes() == content, path
  assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize(
  "scores, value, expected",
  [
    ([0.5, 1.0, 3.0], 2.0, (0.0, 4.0)),  # Positive errors: 0 to twice the threshold.
    ([-3.0, -1.0, 2.0], -0.5, (-3.0, 2.0)),  # Standardised: the threshold still mid-scale.
    ([0.5, 1.0], -1.0, (-3.0, 1.0)),  # Every score above a negative threshold.
  ],
)
def test_the_colour_scale_puts_the_threshold_mid_scale(scores, value, expected):
  from maeday_jax.jobs.category_run import color_range

  threshold = thresholds.Threshold(value=value, method="fixed")
  low, high = color_range(np.asarray(scores), threshold)
  assert (low, high) == expected and low < value < high
