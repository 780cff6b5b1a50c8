"""Converts an official MAE checkpoint (.pth or safetensors) to the fast Orbax format.

    python tools/convert_checkpoint.py mae_visualize_vit_large.pth ~/mae_large_orbax
    python tools/convert_checkpoint.py model.safetensors out_dir --num_heads 16

The output directory then loads anywhere a checkpoint is accepted
(`load_mae(out_dir)`, `--config.model.checkpoint=out_dir`). Head counts are inferred
(official widths use the official counts); pass them when a custom model differs.
"""

import argparse
import sys

from maeday_jax import checkpoints


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("src", help="official .pth or Hugging Face .safetensors file")
  parser.add_argument("dst", help="output directory (must not exist or be empty)")
  parser.add_argument("--num_heads", type=int, default=None)
  parser.add_argument("--decoder_num_heads", type=int, default=None)
  args = parser.parse_args(argv)
  try:
    out = checkpoints.convert(args.src, args.dst, args.num_heads, args.decoder_num_heads)
  except (checkpoints.CheckpointError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  model, params = checkpoints.load_mae(out)
  print(
    f"Converted {args.src} -> {out}: img {model.img_size}, patch {model.patch_size}, "
    f"encoder {model.embed_dim}x{model.depth} ({model.num_heads} heads), decoder "
    f"{model.decoder_embed_dim}x{model.decoder_depth} ({model.decoder_num_heads} heads)."
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
