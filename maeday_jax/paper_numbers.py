"""The MAEDAY paper's numbers (Schwartz et al. 2022) that this project must reproduce.

All values are ROC-AUC in percent on MVTec AD (spec section 2). Only the zero-shot setting
has per-category numbers; the other settings have summary rows.

Other methods' published MVTec AD figures, shown when their detector is reported
(`METHOD_ROWS`): APRIL-GAN (Chen et al. 2023, VAND 2023 challenge winner).
"""

from __future__ import annotations

import dataclasses

# Paper Table 1, MAEDAY 0-shot image AUROC (%) per category.
ZERO_SHOT_IMAGE_AUROC = {
  "bottle": 74.3,
  "cable": 53.0,
  "capsule": 64.0,
  "hazelnut": 97.1,
  "metal_nut": 43.6,
  "pill": 63.4,
  "screw": 69.9,
  "toothbrush": 77.5,
  "transistor": 48.3,
  "zipper": 82.0,
  "carpet": 74.6,
  "grid": 97.9,
  "leather": 92.9,
  "tile": 84.3,
  "wood": 94.8,
}


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One summary row of the paper (percent; None where the paper gives no number).

  Attributes:
    label: the row's name as the paper writes it.
    image_auroc: mean image AUROC over all 15 categories.
    image_auroc_objects: mean over the 10 object categories.
    image_auroc_textures: mean over the 5 texture categories.
    pixel_auroc: mean pixel AUROC over all categories.
    per_category_image_auroc: per-category image AUROC, when the paper lists it.
    aupro: mean AUPRO (PRO up to a false-positive rate of 0.3), when the paper gives it.
    source: who published the row.
  """

  label: str
  image_auroc: float
  image_auroc_objects: float | None
  image_auroc_textures: float | None
  pixel_auroc: float | None
  per_category_image_auroc: dict[str, float] | None = None
  aupro: float | None = None
  source: str = "Schwartz et al. 2022"

  def image_auroc_for(self, group: str) -> float | None:
    """The image AUROC mean of group 'all', 'objects' or 'textures'."""
    return {
      "all": self.image_auroc,
      "objects": self.image_auroc_objects,
      "textures": self.image_auroc_textures,
    }.get(group)


APRIL_GAN_SOURCE = "Chen et al. 2023, arXiv:2305.17382"

SUMMARY_ROWS = {
  "maeday_zero_shot": PaperRow("MAEDAY 0-shot", 74.5, 67.3, 88.9, 69.4, ZERO_SHOT_IMAGE_AUROC),
  "maeday_one_shot_lora": PaperRow("MAEDAY 1-shot (LoRA)", 76.0, 69.3, 89.3, 71.6),
  "patchcore_one_shot": PaperRow("PatchCore 1-shot", 81.9, None, None, 91.4),
  "patchcore_x2_ensemble": PaperRow("2 x PatchCore ensemble", 82.2, None, None, 91.7),
  "maeday_patchcore_ensemble": PaperRow("MAEDAY + PatchCore ensemble", 85.3, 80.1, 95.9, 92.2),
  "maeday_one_shot_full_finetune": PaperRow(
    "MAEDAY 1-shot, full fine-tune (Table 4)", 75.4, None, None, 70.9
  ),
  # APRIL-GAN (Chen et al. 2023, arXiv:2305.17382), MVTec AD: zero-shot (adapters trained
  # on VisA) and 1-shot. Only the figures a detector's report compares with.
  "april_gan_zero_shot": PaperRow(
    "APRIL-GAN 0-shot", 86.1, None, None, 87.6, aupro=44.0, source=APRIL_GAN_SOURCE
  ),
  "april_gan_one_shot": PaperRow(
    "APRIL-GAN 1-shot", 92.0, None, None, None, source=APRIL_GAN_SOURCE
  ),
}

# The published rows of a detector other than MAEDAY, per setting: its reports compare
# with them instead of MAEDAY's.
METHOD_ROWS = {"april_gan": {"zero_shot": "april_gan_zero_shot", "few_shot": "april_gan_one_shot"}}

# Which paper row a report compares against by default, per setting.
DEFAULT_ROW_FOR_SETTING = {"zero_shot": "maeday_zero_shot", "few_shot": "maeday_one_shot_lora"}


def row_key(setting: str, method: str | None = None) -> str:
  """The `SUMMARY_ROWS` key a report of `method` (None: MAEDAY) in `setting` compares with."""
  return METHOD_ROWS.get(method or "", {}).get(setting) or DEFAULT_ROW_FOR_SETTING[setting]


# Zero-shot foreign-object detection (the paper's own dataset), image AUROC %.
FOREIGN_OBJECT_ZERO_SHOT_AUROC = {"indoor": 95.6, "outdoor": 85.6}

# Paper Table 3, A100 timings in seconds.
TIMING_SECONDS = {
  "maeday_scoring_per_image": 0.15,
  "maeday_finetune_50_iterations": 100.0,
  "patchcore_scoring_per_image": 0.07,
  "patchcore_fit": 4.0,
}
