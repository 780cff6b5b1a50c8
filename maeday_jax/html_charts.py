"""The pieces of `report.html` that are not tables: ROC / PR curves as inline SVG, pictures
as `data:` URIs, and HTML escaping of every value that came from a user.

Nothing here loads anything from the network: a chart is SVG markup written into the page,
a picture is its PNG bytes in base64 in the page. Curves are downsampled to at most
`MAX_CURVE_POINTS` points, so a category of a million images draws as fast as one of ten.
"""

from __future__ import annotations

import base64
import dataclasses
import html

import numpy as np
from sklearn.metrics import precision_recall_curve

from maeday_jax import metrics
from maeday_jax.data import names

MAX_CURVE_POINTS = 200
# Matplotlib's tab10, so the page's lines look like the ROC PNGs the runs already draw.
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")
DASHES = ("", "6 3", "2 2", "8 3 2 3")
_SIZE, _MARGIN = 240, 36  # Pixels: the plot square and the room for the axes' labels.


def escape(value) -> str:
  """`value` as text safe inside HTML elements and quoted attributes.

  A file name that was not valid UTF-8 (lone surrogates, see `maeday_jax.data.names`) is
  shown with `\\xNN` escapes first, so the page always encodes as UTF-8.
  """
  return html.escape(names.to_text(str(value)), quote=True)


def png_data_uri(png: bytes) -> str:
  """A `data:image/png;base64,...` URI: the picture travels inside the page."""
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclasses.dataclass(frozen=True)
class Curves:
  """Image-level ROC and PR curves of one result, or why they are undefined.

  Attributes:
    fpr, tpr: the ROC points (downsampled), from (0, 0) to (1, 1).
    recall, precision: the PR points (downsampled).
    auroc, ap: the areas, as `maeday_jax.metrics` computes them.
    undefined: the reason when the labels hold one class only (the arrays are then empty).
  """

  fpr: np.ndarray
  tpr: np.ndarray
  recall: np.ndarray
  precision: np.ndarray
  auroc: float | None = None
  ap: float | None = None
  undefined: str | None = None


def downsample(x: np.ndarray, y: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> tuple:
  """At most `max_points` points of the curve, evenly spaced along it, ends kept."""
  if len(x) <= max_points:
    return np.asarray(x), np.asarray(y)
  keep = np.unique(np.linspace(0, len(x) - 1, max_points).round().astype(int))
  return np.asarray(x)[keep], np.asarray(y)[keep]


def image_curves(scores, labels, max_points: int = MAX_CURVE_POINTS) -> Curves:
  """The ROC (this library's tie handling) and PR (scikit-learn's) curves of image
  scores; labels -1 are left out, as the metrics leave them out."""
  scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
  empty = np.zeros(0)
  try:
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    auroc, ap = metrics.image_auroc(scores, labels), metrics.image_ap(scores, labels)
  except metrics.MetricUndefinedError as error:
    return Curves(empty, empty, empty, empty, undefined=error.reason)
  known = labels >= 0
  precision, recall, _ = precision_recall_curve(labels[known], scores[known])
  fpr, tpr = downsample(fpr, tpr, max_points)
  recall, precision = downsample(recall, precision, max_points)
  return Curves(fpr, tpr, recall, precision, auroc, ap)


@dataclasses.dataclass(frozen=True)
class Line:
  """One polyline of a chart: x and y in [0, 1], its legend text, colour and dash."""

  x: np.ndarray
  y: np.ndarray
  label: str
  colour: str = PALETTE[0]
  dash: str = ""


def svg_chart(title: str, x_label: str, y_label: str, lines, diagonal: bool = False) -> str:
  """An inline `<svg>` of lines on the unit square, with axes, ticks and labels.

  `diagonal` draws the chance line of a ROC chart. The legend is left to the caller (HTML
  wraps long labels better than SVG text).
  """
  width = height = _SIZE + 2 * _MARGIN

  def px(x, y):
    return _MARGIN + x * _SIZE, _MARGIN + (1.0 - y) * _SIZE

  parts = [
    f'<svg class="chart" width="{width}" height="{height}"'
    f' viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
    f"<title>{escape(title)}</title>",
    f'<rect x="{_MARGIN}" y="{_MARGIN}" width="{_SIZE}" height="{_SIZE}" class="frame"/>',
  ]
  for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
    x0, y0 = px(tick, 0.0)
    x1, y1 = px(0.0, tick)
    parts += [
      f'<line x1="{x0:.1f}" y1="{_MARGIN}" x2="{x0:.1f}" y2="{y0:.1f}" class="grid"/>',
      f'<line x1="{_MARGIN}" y1="{y1:.1f}" x2="{_MARGIN + _SIZE}" y2="{y1:.1f}" class="grid"/>',
      f'<text x="{x0:.1f}" y="{y0 + 13:.1f}" text-anchor="middle">{tick:g}</text>',
      f'<text x="{x1 - 4:.1f}" y="{y1 + 4:.1f}" text-anchor="end">{tick:g}</text>',
    ]
  if diagonal:
    (ax, ay), (bx, by) = px(0, 0), px(1, 1)
    parts.append(f'<line x1="{ax}" y1="{ay}" x2="{bx}" y2="{by}" class="chance"/>')
  for line in lines:
    corners = (px(x, y) for x, y in zip(line.x, line.y, strict=True))
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in corners)
    dash = f' stroke-dasharray="{escape(line.dash)}"' if line.dash else ""
    parts.append(
      f'<polyline points="{points}" fill="none" stroke="{escape(line.colour)}"'
      f' stroke-width="1.8"{dash}><title>{escape(line.label)}</title></polyline>'
    )
  parts += [
    f'<text x="{_MARGIN + _SIZE / 2}" y="{height - 6}" text-anchor="middle">'
    f"{escape(x_label)}</text>",
    f'<text x="12" y="{_MARGIN + _SIZE / 2}" text-anchor="middle"'
    f' transform="rotate(-90 12 {_MARGIN + _SIZE / 2})">{escape(y_label)}</text>',
    f'<text x="{_MARGIN}" y="{_MARGIN - 10}" class="title">{escape(title)}</text>',
    "</svg>",
  ]
  return "".join(parts)
