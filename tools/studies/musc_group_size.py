"""MuSc's image AUROC against its group size: how many unlabeled images must score each other.

    python tools/studies/musc_group_size.py --data-name mvtec_ad \\
        --data-path /data/mvtec_anomaly_detection --categories bottle,screw \\
        --groups 8,16,32,64,all --repeats 3 --json runs/musc_groups.json

For each category, the test split is shuffled (`--repeats` seeds) and cut into groups of
each size (`all`: the whole split as one group, as the paper scores it; the last group
of a cut takes the remainder); every group is scored by the `musc` detector
(`maeday_jax.detectors.musc`) and the category's image AUROC (and the time per image)
is reported per group size, mean and spread over the repeats. It needs the DINOv2
weights (`--backbone`, downloaded once) and the dataset; `--backbone dinov2_test
--checkpoint random --image-size 56` runs it anywhere as a smoke test (meaningless
figures). `tools/device_check.sh` runs it when `MAEDAY_MVTEC` names an MVTec AD copy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from maeday_jax import data, defaults, detectors, metrics  # noqa: E402
from maeday_jax.detectors import scoring  # noqa: E402


def group_auroc(detector, images, labels, group: int, seed: int) -> tuple[float | None, float]:
  """Image AUROC of the split scored in shuffled groups of `group` images, and s/image."""
  order = np.random.default_rng(seed).permutation(len(images))
  scores = np.zeros(len(images))
  start = time.perf_counter()
  for begin in range(0, len(order), group):
    members = order[begin : begin + group]
    if len(members) < 2:  # A last group of one joins the previous one.
      members = order[begin - group : begin + group]
    _, group_scores = scoring.score_images(detector, images[members])
    scores[members] = group_scores
  seconds = (time.perf_counter() - start) / len(images)
  try:
    return float(metrics.image_auroc(scores, labels)), seconds
  except (metrics.MetricUndefinedError, ValueError):
    return None, seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-name", default="mvtec_ad")
  parser.add_argument("--data-path", default="")
  parser.add_argument("--categories", default="all")
  parser.add_argument("--groups", default="8,16,32,all")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--backbone", default="dinov2_vits14")
  parser.add_argument("--checkpoint", default="")
  parser.add_argument("--image-size", type=int, default=448)
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)

  config = defaults.evaluate_config()
  config.data.name, config.data.path, config.data.categories = (
    args.data_name,
    args.data_path,
    args.categories,
  )
  config.musc.backbone, config.musc.checkpoint = args.backbone, args.checkpoint
  config.musc.image_size = args.image_size
  if args.backbone.startswith("dinov2_test"):
    config.musc.layers = (0, 2)
  detector = detectors.create(config, "musc")
  detector.fit(None, None)
  rows = []
  for category in data.resolve_categories(config.data):
    split = data.load_split(config.data, category, "test")
    examples = [data.load_example(split, i, detector.input_size) for i in range(len(split))]
    images = np.stack([e["image"] for e in examples])
    labels = np.asarray([e["label"] for e in examples])
    for text in args.groups.split(","):
      group = len(images) if text.strip() == "all" else int(text)
      results = [group_auroc(detector, images, labels, group, seed) for seed in range(args.repeats)]
      aurocs = [a for a, _ in results if a is not None]
      row = {
        "category": category,
        "group": text.strip(),
        "images": len(images),
        "image_auroc_mean": statistics.mean(aurocs) if aurocs else None,
        "image_auroc_std": statistics.pstdev(aurocs) if len(aurocs) > 1 else 0.0,
        "seconds_per_image": statistics.mean(s for _, s in results),
      }
      rows.append(row)
      print(json.dumps(row))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
