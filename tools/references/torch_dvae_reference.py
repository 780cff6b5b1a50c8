"""OpenAI's DALL-E dVAE encoder (the `dall-e` package) and its test-fixture writer.

This is an OPTIONAL tool: it needs PyTorch, NumPy, attrs and OpenAI's `dall-e` package
(`/work/venv-torch/bin/pip install dall-e==0.1 attrs`; `dall-e` imports `attr` without
declaring it), none of which `maeday_jax` imports. The model is the package's own
`dall_e.Encoder`, not a re-implementation, so the fixture is what the public code computes.

The public encoder refuses small sizes (its attrs validators want `n_hid >= 64` and
`vocab_size >= 512`); the validators are switched off while the tiny fixture model is
built (`attr.validators.disabled()`), which changes nothing else: they only check the
arguments. The architecture stays the public one (4 groups, max-pool after the first
three, `post_gain = 1 / (4 * n_blk_per_group) ** 2`), only narrower.

It writes, into `--out` (tests/fixtures):

* `dvae_ref_encoder.pkl`: `torch.save(encoder)` of the WHOLE MODULE OBJECT, as OpenAI
  published `https://cdn.openai.com/dall-e/encoder.pkl`, so the tests read it through
  the same opt-in module reader (`torch_zip.load_module_state_dict`). Tiny architecture:
  n_hid 8, n_blk_per_group 1, vocab_size 64, input_channels 3. Weights are random from
  NumPy: conv weights ~ N(0, 1/fan_in) (the package's own init), biases ~ U(-0.1, 0.1)
  (the package initialises them to zero, which would leave them untested).
* `dvae_ref_io.npz` (`np.savez_compressed`): `images_32` (2, 32, 32, 3) and `images_48`
  (1, 48, 48, 3) float32 NHWC images in [0, 1]; `logits_32` (2, 4, 4, 64) and `logits_48`
  (1, 6, 6, 64) float32 NHWC encoder outputs for `map_pixels(images)`; `tokens_32`,
  `tokens_48` their argmax (int32); and the architecture as int32 scalars.

Regenerate (deterministic: NumPy seeds, single-threaded deterministic torch), then
self-check by reloading the module file with `torch.load(weights_only=False)`, which is
safe here only because this tool wrote the file:

    /work/venv-torch/bin/python tools/references/torch_dvae_reference.py --out tests/fixtures

`--check` only verifies existing fixtures; it also prints how far float32 is from a
float64 recomputation.
"""

from __future__ import annotations

import argparse
import os
import sys

import attr
import numpy as np
import torch
from dall_e import Encoder, map_pixels

ARCH = dict(group_count=4, n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=64)
SIZES = (32, 48)  # Two images at 32 px, one at 48 px: two grids (4x4 and 6x6).
BATCHES = {32: 2, 48: 1}
MODULE_FILE = "dvae_ref_encoder.pkl"
IO_FILE = "dvae_ref_io.npz"


def build(seed: int = 0) -> Encoder:
  """The tiny public encoder with random, non-trivial weights and biases."""
  with attr.validators.disabled():
    # group_count is a plain class attribute of the public Encoder (always 4), not an
    # argument, so it is not passed.
    model = Encoder(
      n_hid=ARCH["n_hid"],
      n_blk_per_group=ARCH["n_blk_per_group"],
      input_channels=ARCH["input_channels"],
      vocab_size=ARCH["vocab_size"],
      device=torch.device("cpu"),
    )
  assert model.group_count == ARCH["group_count"]
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".w"):
        fan_in = p.shape[1] * p.shape[2] * p.shape[3]
        p.copy_(torch.from_numpy(rng.normal(0, 1 / np.sqrt(fan_in), p.shape).astype("f4")))
      else:
        p.copy_(torch.from_numpy(rng.uniform(-0.1, 0.1, p.shape).astype("f4")))
  return model.eval()


def make_images(size: int, batch: int, seed: int) -> np.ndarray:
  """NHWC float32 images in [0, 1]: smooth colour fields plus noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 1, (batch, 4, 4, 3))
  smooth = coarse.repeat(size // 4, axis=1).repeat(size // 4, axis=2)
  return np.clip(smooth + rng.normal(0, 0.1, smooth.shape), 0, 1).astype(np.float32)


def run(model: Encoder, images: np.ndarray) -> np.ndarray:
  """NHWC logits of the encoder for NHWC images in [0, 1] (mapped as the package does)."""
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return model(map_pixels(x)).permute(0, 2, 3, 1).contiguous().numpy()


def run_float64(model: Encoder, images: np.ndarray) -> np.ndarray:
  """The same forward pass in float64, written out from the public code (its modules
  insist on float32): for the float32 error estimate only."""
  state = {k: v.double() for k, v in model.state_dict().items()}
  n_layers = model.group_count * model.n_blk_per_group

  def conv(x, prefix):
    w = state[prefix + ".w"]
    return torch.nn.functional.conv2d(x, w, state[prefix + ".b"], padding=(w.shape[-1] - 1) // 2)

  x = torch.from_numpy(images.astype(np.float64)).permute(0, 3, 1, 2)
  x = conv(0.8 * x + 0.1, "blocks.input")  # map_pixels with logit_laplace_eps = 0.1.
  for g in range(1, model.group_count + 1):
    for i in range(1, model.n_blk_per_group + 1):
      block = f"blocks.group_{g}.block_{i}"
      identity = conv(x, block + ".id_path") if block + ".id_path.w" in state else x
      h = x
      for k in range(1, 5):
        h = conv(torch.relu(h), f"{block}.res_path.conv_{k}")
      x = identity + h / n_layers**2
    if g < model.group_count:
      x = torch.nn.functional.max_pool2d(x, 2)
  x = conv(torch.relu(x), "blocks.output.conv")
  return x.permute(0, 2, 3, 1).contiguous().numpy()


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| / max |b|."""
  return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def write(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  model = build()
  torch.save(model, os.path.join(out_dir, MODULE_FILE))
  arrays: dict[str, np.ndarray] = {k: np.array(v, np.int32) for k, v in ARCH.items()}
  for seed, size in enumerate(SIZES, start=1):
    images = make_images(size, BATCHES[size], seed)
    logits = run(model, images)
    arrays[f"images_{size}"] = images
    arrays[f"logits_{size}"] = logits
    arrays[f"tokens_{size}"] = logits.argmax(-1).astype(np.int32)
  np.savez_compressed(os.path.join(out_dir, IO_FILE), **arrays)


def check(out_dir: str) -> None:
  """Reloads the fixtures and asserts the saved module reproduces the stored outputs."""
  io = np.load(os.path.join(out_dir, IO_FILE))
  # Our own file: unpickling the whole module is fine here (never for downloaded files).
  model = torch.load(os.path.join(out_dir, MODULE_FILE), weights_only=False)
  assert isinstance(model, Encoder), type(model)
  for size in SIZES:
    logits = run(model, io[f"images_{size}"])
    stored = io[f"logits_{size}"]
    err = rel_error(logits, stored)
    assert err == 0.0, (size, err)
    assert (stored.argmax(-1) == io[f"tokens_{size}"]).all()
    # float64: how far float32 itself is from exact.
    exact = run_float64(model, io[f"images_{size}"])
    top2 = np.sort(stored, -1)[..., -2:]
    print(
      f"{size} px: logits {stored.shape} max|x| {np.abs(stored).max():.3f}, "
      f"float32 vs float64 rel err {rel_error(stored, exact):.2e}, "
      f"smallest top-1/top-2 margin {np.min(top2[..., 1] - top2[..., 0]):.2e}, "
      f"{len(np.unique(io[f'tokens_{size}']))} distinct tokens"
    )
  sizes = {name: os.path.getsize(os.path.join(out_dir, name)) for name in (MODULE_FILE, IO_FILE)}
  print("fixture sizes:", sizes, "total", sum(sizes.values()))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="tests/fixtures", help="fixture folder")
  parser.add_argument("--check", action="store_true", help="only verify existing fixtures")
  args = parser.parse_args(argv)
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  if not args.check:
    write(args.out)
  check(args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
