"""Pictures for looking rather than reading: per-image panels, ROC curves, reconstructions.

Panels are composed pixel-exactly with NumPy and Pillow (each tile keeps the image's own
size, tiles are separated by `PANEL_GAP` pixels, with a caption strip above), so a panel of
n tiles of width w is `n * w + (n - 1) * PANEL_GAP` wide. Plots use Matplotlib's Agg canvas
directly (no pyplot, no screen, no global backend switch). Every picture is written
atomically (`atomic_files`): a run killed half way never leaves a truncated PNG.
"""

from __future__ import annotations

import io
import pathlib
import textwrap

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from maeday_jax import atomic_files, metrics
from maeday_jax.resizing import resize_maps_bilinear, resize_masks_bool
from maeday_jax.thresholds import Threshold

PANEL_GAP = 4
CAPTION_HEIGHT = 18
TITLE_HEIGHT = 22
HEATMAP_ALPHA = 0.5
GT_COLOUR = (0, 255, 0)
_BACKGROUND = (255, 255, 255)


def as_rgb_uint8(image) -> np.ndarray:
  """(h, w), (h, w, 1) or (h, w, 3) uint8 -> (h, w, 3) uint8."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"images must be uint8 (0-255), got {image.dtype}; convert before drawing.")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"images must be (h, w) or (h, w, 3), got shape {image.shape}.")
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _fit_map(anomaly_map, size: tuple[int, int]) -> np.ndarray:
  anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
  if anomaly_map.ndim != 2:
    raise ValueError(f"anomaly maps must be (h, w), got shape {anomaly_map.shape}.")
  if anomaly_map.shape != size:
    anomaly_map = resize_maps_bilinear(anomaly_map, size)
  return anomaly_map


def colorize(values, vmin: float | None = None, vmax: float | None = None, cmap: str = "jet"):
  """Maps (h, w) values to (h, w, 3) uint8 colours; the range defaults to the values' own."""
  values = np.asarray(values, dtype=np.float64)
  lo = float(values.min()) if vmin is None else float(vmin)
  hi = float(values.max()) if vmax is None else float(vmax)
  # A constant map (hi == lo) is drawn in the colormap's lowest colour, not divided by zero.
  scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
  rgba = matplotlib.colormaps[cmap](scaled)
  return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def overlay_heatmap(image, anomaly_map, vmin=None, vmax=None, alpha: float = HEATMAP_ALPHA):
  """The image blended with the jet-coloured anomaly map (resized to the image)."""
  image = as_rgb_uint8(image)
  heat = colorize(_fit_map(anomaly_map, image.shape[:2]), vmin, vmax)
  blend = (1.0 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
  return (blend + 0.5).astype(np.uint8)


def mask_contour(mask, thickness: int = 1) -> np.ndarray:
  """Boolean outline of a mask's regions (pixels inside a region that touch its outside)."""
  mask = np.asarray(mask) > 0
  inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
  return mask & ~inner


def _draw_contour(image: np.ndarray, mask) -> np.ndarray:
  thickness = max(1, round(min(image.shape[:2]) / 256))
  out = image.copy()
  out[mask_contour(mask, thickness)] = GT_COLOUR
  return out


def compose_row(tiles: list[np.ndarray], captions: list[str], title: str = "") -> Image.Image:
  """Tiles (h, w, 3) uint8 side by side with captions above and an optional title on top."""
  h = max(t.shape[0] for t in tiles)
  width = sum(t.shape[1] for t in tiles) + PANEL_GAP * (len(tiles) - 1)
  top = TITLE_HEIGHT if title else 0
  canvas = Image.new("RGB", (width, top + CAPTION_HEIGHT + h), _BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  if title:
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
  x = 0
  for tile, caption in zip(tiles, captions, strict=True):
    draw.text((x + 2, top + 2), caption, fill=(0, 0, 0), font=font)
    canvas.paste(Image.fromarray(tile), (x, top + CAPTION_HEIGHT))
    x += tile.shape[1] + PANEL_GAP
  return canvas


def _save(image: Image.Image, path) -> pathlib.Path:
  """Saves atomically, in the format the path's extension names (PNG for any other)."""
  path = pathlib.Path(path)
  image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
  with atomic_files.replace_when_done(path) as tmp, open(tmp, "xb") as f:
    image.save(f, format=image_format)
  return path


def save_panel(
  path,
  image_uint8,
  anomaly_map,
  gt_mask=None,
  threshold: Threshold | float | None = None,
  title: str = "",
  vmin: float | None = None,
  vmax: float | None = None,
) -> pathlib.Path:
  """PNG: image | image + ground-truth contour | heatmap overlay | predicted mask.

  The ground-truth tile is left out when `gt_mask` is None and the predicted-mask tile
  (`map >= threshold`, white, with the ground-truth outline in green) when `threshold` is
  None. The map is resized bilinearly and the mask by nearest neighbour to the image. Pass
  one `vmin`/`vmax` for a whole category so colours compare across images.
  """
  image = as_rgb_uint8(image_uint8)
  size = image.shape[:2]
  anomaly_map = _fit_map(anomaly_map, size)
  gt = None if gt_mask is None else resize_masks_bool(gt_mask, size)
  tiles, captions = [image], ["image"]
  if gt is not None:
    tiles.append(_draw_contour(image, gt))
    captions.append("ground truth")
  tiles.append(overlay_heatmap(image, anomaly_map, vmin, vmax))
  captions.append("anomaly map")
  if threshold is not None:
    value = float(threshold.value if isinstance(threshold, Threshold) else threshold)
    predicted = np.repeat(((anomaly_map >= value) * np.uint8(255))[..., None], 3, axis=-1)
    tiles.append(predicted if gt is None else _draw_contour(predicted, gt))
    captions.append(f"map >= {value:.3g}")
  return _save(compose_row(tiles, captions, title), path)


def save_comparison_panel(path, image_uint8, gt_mask, maps: dict, title: str = "") -> pathlib.Path:
  """PNG: image | ground truth | one heatmap overlay per detector, e.g. of several methods.

  `maps`: {caption: anomaly map}; each map is drawn on its own scale (its minimum to its
  maximum), since detectors' values are not comparable. `gt_mask` None leaves out the
  ground-truth tile.
  """
  image = as_rgb_uint8(image_uint8)
  size = image.shape[:2]
  tiles, captions = [image], ["image"]
  if gt_mask is not None:
    tiles.append(_draw_contour(image, resize_masks_bool(gt_mask, size)))
    captions.append("ground truth")
  for caption, anomaly_map in maps.items():
    fitted = _fit_map(anomaly_map, size)
    tiles.append(overlay_heatmap(image, fitted, float(fitted.min()), float(fitted.max())))
    captions.append(caption)
  return _save(compose_row(tiles, captions, title), path)


def overlay_png(
  image_uint8, anomaly_map, vmin=None, vmax=None, gt_mask=None, max_side: int | None = None
) -> bytes:
  """PNG bytes of the heatmap overlay (with the ground-truth outline when `gt_mask` has
  one), shrunk to at most `max_side` pixels on its longer side, e.g. to embed in a page."""
  image = as_rgb_uint8(image_uint8)
  tile = overlay_heatmap(image, anomaly_map, vmin, vmax)
  if gt_mask is not None and np.any(gt_mask):
    tile = _draw_contour(tile, resize_masks_bool(gt_mask, image.shape[:2]))
  picture = Image.fromarray(tile)
  if max_side is not None and max(picture.size) > max_side:
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
  buffer = io.BytesIO()
  picture.save(buffer, format="PNG", optimize=True)
  return buffer.getvalue()


def save_overlay(path, image_uint8, anomaly_map, vmin=None, vmax=None) -> pathlib.Path:
  """PNG of the image with the heatmap overlaid, at the image's size."""
  return _save(Image.fromarray(overlay_heatmap(image_uint8, anomaly_map, vmin, vmax)), path)


def save_reconstruction_panel(
  path, image_uint8, masked_uint8_list, recon_uint8_list, error_map, title: str = ""
) -> pathlib.Path:
  """PNG: original | masked input 1 | reconstruction 1 | ... | error map (jet).

  Shows what the MAE "thinks" normal looks like: where the reconstruction departs from the
  original, the error map lights up.
  """
  if len(masked_uint8_list) != len(recon_uint8_list):
    raise ValueError(
      f"{len(masked_uint8_list)} masked inputs but {len(recon_uint8_list)} reconstructions; "
      "pass one reconstruction per mask."
    )
  image = as_rgb_uint8(image_uint8)
  tiles, captions = [image], ["original"]
  for i, (masked, recon) in enumerate(zip(masked_uint8_list, recon_uint8_list, strict=True)):
    tiles += [as_rgb_uint8(masked), as_rgb_uint8(recon)]
    captions += [f"masked {i + 1}", f"reconstruction {i + 1}"]
  tiles.append(colorize(_fit_map(error_map, image.shape[:2])))
  captions.append("error map")
  return _save(compose_row(tiles, captions, title), path)


def save_roc_curve(path, scores, labels, title: str = "") -> float | None:
  """PNG of the image-level ROC curve; returns the AUROC, or None when it is undefined.

  An undefined curve (one class only) still gives a picture, saying why.
  """
  fig = Figure(figsize=(4, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
  try:
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    auroc = metrics.image_auroc(scores, labels)
  except metrics.MetricUndefinedError as error:
    auroc = None
    message = "ROC undefined:\n" + textwrap.fill(error.reason, 40)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=8)
  else:
    ax.plot(fpr, tpr, color="tab:red", linewidth=1.5, label=f"AUROC = {100 * auroc:.1f} %")
    ax.legend(loc="lower right")
  ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate")
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  path = pathlib.Path(path)
  with atomic_files.replace_when_done(path) as tmp, open(tmp, "xb") as f:
    fig.savefig(f, format=path.suffix[1:].lower() or "png")
  return auroc
