"""The categories of the public benchmarks, in their usual order (no dependencies).

One list for everything that names them: the tfds builders, the paper's numbers and the
reports' object/texture groups.
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
