"""A validation split for choosing a recipe without touching the test images: held-out
normal training images, half of them given synthetic defects with masks.

    split = recipe_validation.write_split(images, names, "runs/mt_validation")
    # train the candidate recipes on split["train"] (a folder of normal images), then
    # evaluate each fitted detector on split["images"] with masks split["masks"]

The defects are drawn here on purpose unlike the ones MALA trains on (Perlin-shaped
texture blends): dark round holes, thin dark cracks (polylines) and bright scratches, at
random places, sizes and contrasts, with their exact masks. A recipe trained on synthetic
defects of one kind is then not judged on the same kind. They are a proxy: real defects
remain the test split's.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("hole", "crack", "scratch")


def is_held_out(name: str, fraction: float) -> bool:
  """Whether the image `name` is held out: a stable hash of the name below `fraction`
  (the same images whatever their order or how many there are)."""
  digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def draw_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(image with one synthetic defect, its mask (H, W) uint8 0/255) of a uint8 (H, W, 3)
  image: a hole (filled ellipse, darkened), a crack (a polyline 1-3 px wide, darkened)
  or a scratch (a straight line, brightened), sized relative to the image."""
  height, width = image.shape[:2]
  side = min(height, width)
  mask = Image.new("L", (width, height), 0)
  draw = ImageDraw.Draw(mask)
  kind = KINDS[int(rng.integers(len(KINDS)))]
  cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
  if kind == "hole":
    rx, ry = rng.uniform(0.015, 0.05, size=2) * side
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
  elif kind == "crack":
    points = [(cx, cy)]
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(3, 7))):
      angle += rng.normal(0, 0.5)
      step = rng.uniform(0.03, 0.08) * side
      x, y = points[-1]
      points.append((x + step * np.cos(angle), y + step * np.sin(angle)))
    draw.line(points, fill=255, width=int(rng.integers(1, 4)))
  else:
    angle, length = rng.uniform(0, np.pi), rng.uniform(0.1, 0.3) * side
    dx, dy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
    draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(rng.integers(1, 3)))
  m = np.asarray(mask, np.float32)[..., None] / 255.0
  pixels = image.astype(np.float32)
  if kind == "scratch":
    target = pixels + rng.uniform(0.3, 0.6) * (255.0 - pixels)
  else:
    target = pixels * rng.uniform(0.3, 0.7)
  out = pixels * (1.0 - m) + target * m
  return np.clip(np.round(out), 0, 255).astype(np.uint8), np.asarray(mask, np.uint8)


def write_split(
  images: np.ndarray,
  names: list[str],
  directory: str | os.PathLike,
  *,
  fraction: float = 0.1,
  defect_prob: float = 0.5,
  seed: int = 0,
) -> dict:
  """Writes the split of uint8 (N, H, W, 3) normal `images` named `names` into
  `directory`: `train/` (the images kept for training), `validation/images/` (the held
  out, `defect_prob` of them with a defect) and `validation/masks/` (a mask for every
  validation image; all zero for the normal ones). Returns the folders and counts.

  Raises:
    ValueError: a fraction or probability outside (0, 1), or names and images that do
      not pair.
  """
  if not 0.0 < fraction < 1.0 or not 0.0 <= defect_prob <= 1.0:
    raise ValueError(f"fraction {fraction} must be in (0, 1), defect_prob {defect_prob} in [0, 1].")
  if len(images) != len(names):
    raise ValueError(f"{len(images)} images but {len(names)} names.")
  root = pathlib.Path(directory)
  folders = {
    "train": root / "train",
    "images": root / "validation" / "images",
    "masks": root / "validation" / "masks",
  }
  for folder in folders.values():
    folder.mkdir(parents=True, exist_ok=True)
  counts = {"train_images": 0, "validation_normal": 0, "validation_defective": 0}
  for index, (image, name) in enumerate(zip(images, names, strict=True)):
    stem = (
      f"{index:05d}_" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    )
    if not is_held_out(name, fraction):
      Image.fromarray(image).save(folders["train"] / f"{stem}.png")
      counts["train_images"] += 1
      continue
    rng = np.random.default_rng([seed, index])
    mask = np.zeros(image.shape[:2], np.uint8)
    if rng.uniform() < defect_prob:
      image, mask = draw_defect(image, rng)
      counts["validation_defective"] += 1
    else:
      counts["validation_normal"] += 1
    Image.fromarray(image).save(folders["images"] / f"{stem}.png")
    Image.fromarray(mask).save(folders["masks"] / f"{stem}.png")
  return {**{k: str(v) for k, v in folders.items()}, **counts}
