"""Zero-shot MAEDAY figures of an MAE on the magnetic-tile sample (or any dataset split).

    python tools/studies/evaluate_mt.py /work/runs/pretrain_mt/model
    python tools/studies/evaluate_mt.py /work/runs/pretrain_mt/model --num_masks 64 --mask_ratio 0.5
    python tools/studies/evaluate_mt.py mae_vit_base --data_path ../shared/data/mt_sample

Scores the `test` split of `magnetic_tile` at `--data_path` (default the shared
`mt_sample`: 24 normal and 40 defective tiles) with `--num_masks` random masks and prints
image AUROC, pixel AUROC and AUPRO (pixel metrics at 224 x 224) as JSON.
"""

import argparse
import json
import sys

from study_common import MT_SAMPLE, data_config, load_model

from maeday_jax.pretrain import evaluate


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "checkpoint", help="anything load_mae accepts (e.g. <workdir>/model), or 'fixture'"
  )
  parser.add_argument("--data_name", default="magnetic_tile")
  parser.add_argument("--data_path", default=str(MT_SAMPLE))
  parser.add_argument("--split", default="test")
  parser.add_argument("--num_masks", type=int, default=32)
  parser.add_argument("--mask_ratio", type=float, default=0.75)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--eval_size", type=int, default=224)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  model, params = load_model(args.checkpoint)
  result = evaluate.evaluate_zero_shot(
    model,
    params,
    data_config(args.data_name, args.data_path),
    args.split,
    num_masks=args.num_masks,
    mask_ratio=args.mask_ratio,
    batch_size=args.batch_size,
    eval_size=args.eval_size,
    seed=args.seed,
    progress=True,
  )
  result["settings"] = vars(args)
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
