"""A fitted tiled detector scored with other reads of the images, without refitting.

    python tools/studies/tiling_variants.py runs/mt_recipe/detector --short-sides 0,224,-1

Scores the `test` split of `magnetic_tile` at `--data_path` (default the shared
`mt_sample`) with the detector's own tiling and with each `--short-sides` value of
`tiling.resize_short_side` (0: square at the tiling's `image_size`; N: aspect kept, short
side N px; -1: each image at its own size), and prints image AUROC, pixel AUROC and AUPRO
(pixel metrics at 224 px) as a table. A detector fitted on square images sees the
textures at another scale along the long side when scored with the aspect kept: this
measures that, for the record; choosing a read belongs on a validation split.
"""

import argparse
import json
import pathlib
import sys

from study_common import MT_SAMPLE, evaluate_detector


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("detector", help="a fitted detector folder (tiled)")
  parser.add_argument("--short-sides", default="0,224,-1")
  parser.add_argument("--data_name", default="magnetic_tile")
  parser.add_argument("--data_path", default=str(MT_SAMPLE))
  parser.add_argument("--out", default="runs/tiling_variants")
  args = parser.parse_args(argv)
  from maeday_jax import detectors

  results = {}
  for side in [int(s) for s in args.short_sides.split(",") if s.strip()]:
    detector = detectors.load(args.detector)
    if detector.tiling is None:
      print(f"error: {args.detector} does not tile; fit it with --config.tiling.mode=tiles")
      return 2
    detector.settings.tiling.resize_short_side = side
    fields = dict(name=args.data_name, path=args.data_path)
    workdir = pathlib.Path(args.out) / f"short_side_{side}"
    results[detector.tiling.describe()] = evaluate_detector(detector, fields, workdir)
  print(json.dumps(results, indent=2))
  print("| tiling | image AUROC | pixel AUROC | AUPRO |\n| --- | --- | --- | --- |")
  for name, metrics in results.items():
    cells = " | ".join("-" if v is None else f"{100 * v:.1f}" for v in metrics.values())
    print(f"| {name} | {cells} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
