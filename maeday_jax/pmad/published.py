"""PMAD's published figures (AAAI 2023), image / pixel AUROC in percent, for the tables
the PMAD recipe writes beside its own (`maeday_jax.jobs.pmad`)."""

from __future__ import annotations

# Mean over MVTec AD's 15 categories, and BTAD's 3 products (single-class).
PROTOCOL_MEANS = {
  ("mvtec_ad", "single"): (96.1, 96.8),
  ("mvtec_ad", "multi"): (94.5, 95.6),
  ("btad", "single"): (93.6, 97.4),
}

# Table 2, cross-class (trained on the seen classes, tested on unseen ones), in the order
# the paper lists its four MVTec AD splits. Which categories each split holds is set with
# `protocol.seen` / `protocol.unseen`; `protocol.paper_split` picks the row to compare.
CROSS_CLASS_MVTEC = {
  "textures_1": (94.5, 89.6),
  "textures_2": (89.5, 91.1),
  "objects_1": (99.7, 98.6),
  "objects_2": (84.4, 93.2),
}

# The ablation (MVTec AD, image / pixel AUROC): why the proposal masks and the visual
# tokens matter.
ABLATION = {
  "random masks at inference": (73.0, 66.7),
  "blockwise masks at inference": (74.9, 70.0),
  "raw-pixel targets": (77.3, 71.2),
  "deep-feature targets": (84.4, 86.7),
}


def reference(dataset: str, protocol: str, paper_split: str = "") -> tuple[float, float] | None:
  """The published (image, pixel) AUROC to show beside a run, or None when there is none."""
  if protocol == "cross":
    return CROSS_CLASS_MVTEC.get(paper_split) if dataset == "mvtec_ad" else None
  return PROTOCOL_MEANS.get((dataset, protocol))
