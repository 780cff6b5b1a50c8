"""The categories of the public benchmarks, in their usual order (no dependencies).

One list for everything that names them: the tfds builders, the paper's numbers and the
reports' category groups (`CATEGORY_GROUPS`, keyed by `canonical_dataset` names). The
MVTec AD groups are those of spec section 4; the means over them are spec section 5's.
"""

MVTEC_OBJECTS = (
  "bottle",
  "cable",
  "capsule",
  "hazelnut",
  "metal_nut",
  "pill",
  "screw",
  "toothbrush",
  "transistor",
  "zipper",
)
MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
MVTEC_CATEGORIES = MVTEC_OBJECTS + MVTEC_TEXTURES

VISA_CATEGORIES = (
  "candle",
  "capsules",
  "cashew",
  "chewinggum",
  "fryum",
  "macaroni1",
  "macaroni2",
  "pcb1",
  "pcb2",
  "pcb3",
  "pcb4",
  "pipe_fryum",
)

# BTAD (Mishra et al. 2021): three products, named as their folders are.
BTAD_CATEGORIES = ("01", "02", "03")
# KolektorSDD2 (Bozic et al. 2021): one category, named after the dataset (like
# magnetic_tile's pseudo-category).
KOLEKTORSDD2_CATEGORIES = ("kolektorsdd2",)

# Category groups per dataset, reported as means next to "all". VisA's are the three
# groups of the VisA paper (Zou et al. 2022).
CATEGORY_GROUPS = {
  "mvtec_ad": {
    "objects": MVTEC_OBJECTS,
    "textures": MVTEC_TEXTURES,
  },
  "visa": {
    "complex_structure": ("pcb1", "pcb2", "pcb3", "pcb4"),
    "multiple_instances": ("candle", "capsules", "macaroni1", "macaroni2"),
    "single_instance": ("cashew", "chewinggum", "fryum", "pipe_fryum"),
  },
}
_DATASET_ALIASES = {
  "mvtec": "mvtec_ad",
  "mvtecad": "mvtec_ad",
  "mvtec_ad": "mvtec_ad",
  "ksdd2": "kolektorsdd2",
  "kolektor_sdd2": "kolektorsdd2",
  "kolektorsdd2": "kolektorsdd2",
}


def canonical_dataset(name: str) -> str:
  """'MVTec-AD', 'mvtec' ... -> 'mvtec_ad'; 'KSDD2', 'Kolektor-SDD2' -> 'kolektorsdd2';
  other names lower-cased with '_' for '-'."""
  key = name.strip().lower().replace("-", "_").replace(" ", "_")
  return _DATASET_ALIASES.get(key, key)
