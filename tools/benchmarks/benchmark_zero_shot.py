"""The zero-shot side of `tools/benchmark.py`: score B images under N masks.

Both sides do the same work on the same inputs: B images (seeded NumPy, 224 px for the
official architectures) x N = 32 random masks (the same masking noise, ratio 0.75), the
full zero-shot computation of spec section 1 (the MAE reconstructs every patch under
each mask, squared error summed over channels, 7-tap sigma 1.4 Gaussian blur with reflect
borders, mean over masks, max = image score), with the same random weights. The two
sides' image scores are compared at the end.
"""

from __future__ import annotations

import numpy as np
from benchmark_common import (
  SIDE_ARGS,
  agreement,
  arrays_digest,
  compile_line,
  flops_per_mask,
  inputs_warning,
  jax_header,
  make_inputs,
  num_patches,
  num_visible,
  ratio_line,
  run_line,
  timing_words,
  torch_header,
)
from benchmark_jax import JaxSide
from benchmark_torch import TorchSide

BLUR_SIZE = 7
BLUR_SIGMA = 1.4
# What the PyTorch worker needs from the command line.
WORKER_ARGS = (*SIDE_ARGS, "num_masks", "mask_ratio", "torch_attention", "torch_mask_chunk")


def describe_work(args, arch: dict) -> dict:
  """The FLOP count of one step (matmuls only), for the report."""
  per_mask = flops_per_mask(arch, args.mask_ratio)
  return {
    "counted": "matmuls only, 2 FLOPs per multiply-add",
    "encoder_tokens": num_visible(arch, args.mask_ratio) + 1,
    "decoder_tokens": num_patches(arch) + 1,
    "per_mask": per_mask,
    "per_image": per_mask["total"] * args.num_masks,
  }


def compare(jx: dict, pt: dict) -> dict:
  """How closely the two sides' image scores agree."""
  return agreement(jx, pt, "scores", "score_max_rel_diff")


# ----------------------------------------------------------------------------------------
# PyTorch side (runs in the worker subprocess: no JAX, no maeday_jax).
# ----------------------------------------------------------------------------------------


class TorchScoring(TorchSide):
  """The zero-shot computation in PyTorch, under `torch.inference_mode`."""

  def __init__(self, args, arch: dict):
    super().__init__(args, arch, flops_per_mask(arch, args.mask_ratio)["total"] * args.num_masks)
    torch = self.torch
    self.images_np, self.noise_np = make_inputs(arch, args.batch, args.num_masks, args.seed)
    self.images = torch.from_numpy(self.images_np).permute(0, 3, 1, 2).contiguous()
    self.images = self.images.to(self.device)
    self.noise = torch.from_numpy(self.noise_np).to(self.device)
    taps = np.exp(-0.5 * ((np.arange(BLUR_SIZE) - BLUR_SIZE // 2) / BLUR_SIGMA) ** 2)
    taps = torch.tensor(taps / taps.sum(), dtype=torch.float32, device=self.device)
    self.kernel_h, self.kernel_w = taps.view(1, 1, -1, 1), taps.view(1, 1, 1, -1)
    self.chunk = args.torch_mask_chunk or args.num_masks
    self.scores = None

  def _score(self):
    """Maps (B, H, W) and scores (B,): spec section 1 written literally, in torch."""
    torch, F = self.torch, self.torch.nn.functional
    batch, num_masks, size = self.args.batch, self.args.num_masks, self.arch["img_size"]
    radius = BLUR_SIZE // 2
    total = torch.zeros(batch, 1, size, size, device=self.device)
    for start in range(0, num_masks, self.chunk):
      m = min(self.chunk, num_masks - start)
      x = self.images.repeat_interleave(m, dim=0)  # (B*m, 3, H, W), image-major
      noise = self.noise[:, start : start + m].reshape(batch * m, -1)
      with self.autocast():
        latent, _, ids_restore = self.model.forward_encoder(x, self.args.mask_ratio, noise)
        pred = self.model.forward_decoder(latent, ids_restore)
      recon = self.model.unpatchify(pred.float())
      err = (x - recon).square().sum(dim=1, keepdim=True)  # (B*m, 1, H, W)
      # Blur every mask's error map (a per-channel blur of the channel sum is the blur of
      # the sum), reflect borders in the numpy sense, as separable 7x1 and 1x7 passes.
      err = F.pad(err, (radius, radius, radius, radius), mode="reflect")
      err = F.conv2d(F.conv2d(err, self.kernel_h), self.kernel_w)
      total += err.view(batch, m, size, size).sum(dim=1, keepdim=True)
    maps = total[:, 0] / num_masks
    return maps, maps.amax(dim=(-2, -1))

  def _run(self, mode: str) -> None:
    with self.torch.inference_mode():
      _, self.scores = self._score()

  def extra_summary(self) -> dict:
    return {
      "mask_chunk": self.chunk,
      "scores": self.scores.float().cpu().numpy().tolist(),
      "inputs_digest": arrays_digest(self.images_np, self.noise_np),
    }


# ----------------------------------------------------------------------------------------
# JAX side.
# ----------------------------------------------------------------------------------------


class JaxScoring(JaxSide):
  """The compiled zero-shot step of `maeday_jax` (the jit and shardings of `make_scorer`)."""

  def __init__(self, args, arch: dict):
    super().__init__(args, arch, flops_per_mask(arch, args.mask_ratio)["total"] * args.num_masks)
    jax = self.jax
    from maeday_jax import parallel, zero_shot

    model, mesh = self.model, self.mesh
    self.images_np, self.noise_np = make_inputs(arch, args.batch, args.num_masks, args.seed)
    images, noise = parallel.shard_batch((self.images_np, self.noise_np), mesh)

    # Fed explicit noise so that PyTorch gets identical masks.
    def score(params, images, noise):
      maps = zero_shot.anomaly_maps_from_noise(
        model, params, images, noise, args.mask_ratio, args.mask_batch_size
      )
      return maps, zero_shot.image_scores(maps)

    data, whole = parallel.batch_sharded(mesh), parallel.replicated(mesh)
    jitted = jax.jit(score, in_shardings=(whole, data, data), out_shardings=(data, data))
    compiled = self.compile(lambda: jitted.lower(self.params, images, noise))
    self.scores = None

    def run():
      _, self.scores = jax.block_until_ready(compiled(self.params, images, noise))

    self._run = run
    self.warm_up()

  def extra_summary(self) -> dict:
    return {
      "mask_batch_size": self.args.mask_batch_size,
      "scores": np.asarray(self.scores, np.float64).tolist(),
      "inputs_digest": arrays_digest(self.images_np, self.noise_np),
    }


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------


def report_lines(result: dict) -> list[str]:
  """The zero-shot part of the printed summary (after the machine and architecture)."""
  cfg, flops = result["config"], result["work"]
  jx, pt = result.get("jax"), result.get("pytorch")
  lines = [
    f"work per step: {cfg['batch']} images x {cfg['num_masks']} masks (ratio "
    f"{cfg['mask_ratio']}: encoder on {flops['encoder_tokens']} tokens, decoder on "
    f"{flops['decoder_tokens']}), {cfg['dtype']}, {timing_words(cfg)}",
    f"analytic FLOPs: {flops['per_mask']['total'] / 1e9:.4g} GFLOP per mask "
    f"(encoder blocks {flops['per_mask']['encoder_blocks'] / 1e9:.4g}, decoder blocks "
    f"{flops['per_mask']['decoder_blocks'] / 1e9:.4g}), "
    f"{flops['per_image'] / 1e9:.4g} GFLOP per image",
  ]
  if jx:
    lines += [
      jax_header(jx) + f", mask_batch_size={jx['mask_batch_size']}",
      run_line("", jx, "image"),
      compile_line(jx),
    ]
  if pt:
    lines.append(torch_header(pt, "inference_mode"))
    lines += [run_line(mode, run, "image") for mode, run in pt["attention_runs"].items()]
  if "ratio_jax_over_torch" in result:
    lines.append(ratio_line(result))
  if "score_max_rel_diff" in result:
    lines.append(
      f"image scores JAX vs PyTorch: max relative difference {result['score_max_rel_diff']:.2e}"
      + inputs_warning(result)
    )
  return lines
