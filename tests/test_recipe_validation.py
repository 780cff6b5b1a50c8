"""The validation split for choosing recipes: held-out normals, synthetic defects, masks."""

import numpy as np
import pytest
from PIL import Image

from maeday_jax import recipe_validation


def test_a_defect_changes_exactly_its_masked_pixels():
  image = np.full((64, 64, 3), 128, np.uint8)
  kinds_seen = set()
  for seed in range(30):
    out, mask = recipe_validation.draw_defect(image, np.random.default_rng(seed))
    changed = np.any(out != image, axis=-1)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert mask.any() and not (changed & (mask == 0)).any()
    brighter = out[mask == 255].astype(int).mean() > 128
    kinds_seen.add("bright" if brighter else "dark")
  assert kinds_seen == {"bright", "dark"}  # Scratches brighten, holes and cracks darken.


def test_the_split_holds_out_by_name_and_masks_every_validation_image(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(60, 200, (200, 32, 32, 3), dtype=np.uint8)
  names = [f"tiles/{i:03d}.jpg" for i in range(200)]
  summary = recipe_validation.write_split(images, names, tmp_path, fraction=0.2)
  held = [n for n in names if recipe_validation.is_held_out(n, 0.2)]
  assert summary["train_images"] + len(held) == 200 and 20 < len(held) < 60
  assert summary["validation_normal"] + summary["validation_defective"] == len(held)
  assert summary["validation_defective"] > 0 and summary["validation_normal"] > 0
  masks = sorted((tmp_path / "validation" / "masks").iterdir())
  pictures = sorted((tmp_path / "validation" / "images").iterdir())
  assert [p.name for p in masks] == [p.name for p in pictures]
  defective = sum(bool(np.asarray(Image.open(p)).any()) for p in masks)
  assert defective == summary["validation_defective"]
  assert len(list((tmp_path / "train").iterdir())) == summary["train_images"]
  # The same names are held out whatever else is in the set.
  assert [n for n in names[:50] if recipe_validation.is_held_out(n, 0.2)] == [
    n for n in held if n in names[:50]
  ]


def test_bad_fractions_are_refused(tmp_path):
  images = np.zeros((2, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="fraction"):
    recipe_validation.write_split(images, ["a", "b"], tmp_path, fraction=1.0)
  with pytest.raises(ValueError, match="names"):
    recipe_validation.write_split(images, ["a"], tmp_path)
