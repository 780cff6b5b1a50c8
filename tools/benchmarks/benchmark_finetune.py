"""The few-shot side of `tools/benchmark.py`: LoRA fine-tuning steps, JAX against PyTorch.

One step of spec section 1's adaptation on both sides: `--batch` (32) copies of the k
shots, each with its own random crop + rotation (bilinear, reflected borders, on device)
and its own random mask (ratio 0.75); the MAE reconstructs every patch; the loss is the
MSE over all patches; gradients flow into rank-`--rank` LoRA factors on every weight
matrix (patch embedding, qkv/proj/fc1/fc2 of every encoder and decoder block, decoder
embedding and prediction) with the base weights frozen; SGD with learning rate 1e-2,
momentum 0.9 and weight decay 0.05 (PyTorch semantics) updates them.

- JAX runs `maeday_jax.few_shot`'s compiled, donated train step itself, with LoRA on the
  activations (`--lora-compute activations`, the library default) or on the weights
  (`weights`: the model run on W + A B).
- PyTorch runs the reference model with LoRA written the way PyTorch users write it
  (peft/loralib style: a frozen layer plus `x @ A @ B` on the activations; the patch
  embedding's update as a stride-p convolution), `torch.optim.SGD`, and the same crop and
  rotation with `F.grid_sample`.

The random numbers of the two sides differ (each draws its own masks and crops), so the
timed steps are compared for speed only. For correctness both sides first run a check on
one fixed batch (the shots repeated without augmentation, shared NumPy masks) from the
same LoRA factors (NumPy): the loss before and after one and two SGD updates. The three
losses must agree between the sides.

The fine-tune of the paper is `--iterations` (50) such steps; the report projects its
duration as the one-time cost (JAX: tracing + compilation; PyTorch: the first
iteration's excess over a steady step) plus `iterations` x the median step, and
`--steps 50 --warmup 0` measures every step of it instead.
"""

from __future__ import annotations

import numpy as np
from benchmark_common import (
  SIDE_ARGS,
  agreement,
  arrays_digest,
  block_flops,
  compile_line,
  flops_per_mask,
  inputs_warning,
  jax_header,
  log,
  num_patches,
  num_visible,
  ratio_line,
  run_line,
  timing_words,
  torch_header,
)
from benchmark_jax import JaxSide
from benchmark_torch import TorchSide

# Spec section 1; the JAX side checks that `few_shot.get_train_config()` agrees.
LEARNING_RATE = 1e-2
MOMENTUM = 0.9
WEIGHT_DECAY = 0.05
MAX_ROTATION_DEG = 15.0
CROP_SCALE = (0.8, 1.0)
# Updates of the correctness check (losses before, after one and after two updates).
CHECK_UPDATES = 2
WORKER_ARGS = (*SIDE_ARGS, "shots", "rank", "mask_ratio", "torch_attention")


# ----------------------------------------------------------------------------------------
# Work description shared by both sides (NumPy only).
# ----------------------------------------------------------------------------------------


def lora_targets(arch: dict, mask_ratio: float = 0.75) -> list[tuple[str, int, int, int]]:
  """(official module name, fan_in, fan_out, tokens it sees) of every adapted matrix."""
  d, dd, p = arch["embed_dim"], arch["decoder_embed_dim"], arch["patch_size"]
  length, patch_dim = num_patches(arch), p * p * 3
  enc, dec = num_visible(arch, mask_ratio) + 1, length + 1
  targets = [("patch_embed.proj", patch_dim, d, length)]
  for prefix, count, width, tokens in (
    ("blocks", arch["depth"], d, enc),
    ("decoder_blocks", arch["decoder_depth"], dd, dec),
  ):
    for i in range(count):
      targets += [
        (f"{prefix}.{i}.attn.qkv", width, 3 * width, tokens),
        (f"{prefix}.{i}.attn.proj", width, width, tokens),
        (f"{prefix}.{i}.mlp.fc1", width, 4 * width, tokens),
        (f"{prefix}.{i}.mlp.fc2", 4 * width, width, tokens),
      ]
  targets += [("decoder_embed", d, dd, enc), ("decoder_pred", dd, patch_dim, dec)]
  return targets


def flops_per_copy(arch: dict, mask_ratio: float, rank: int) -> dict[str, int]:
  """Analytic matmul FLOPs of one training copy (2 per multiply-add).

  forward: as `flops_per_mask`. backward: what a LoRA step needs, no more: input
  gradients of every matmul (once the forward cost for a linear layer, twice for the two
  attention products, none for the patch embedding, whose input is the image) and no
  gradients of the frozen weights. lora: the low-rank products x A and (x A) B forward,
  their backward (dB, d(xA), dA and the input gradient d(xA) A^T). An implementation
  that also forms the frozen weights' gradients (e.g. differentiating W + A B) does
  more work than counted.
  """
  d, dd = arch["embed_dim"], arch["decoder_embed_dim"]
  enc, dec = num_visible(arch, mask_ratio) + 1, num_patches(arch) + 1
  forward = flops_per_mask(arch, mask_ratio)

  def block_backward(tokens, width):
    parts = block_flops(tokens, width)
    linear = parts["qkv"] + parts["proj"] + parts["fc1"] + parts["fc2"]
    return linear + 2 * (parts["attn_scores"] + parts["attn_values"])

  backward = (
    arch["depth"] * block_backward(enc, d)
    + arch["decoder_depth"] * block_backward(dec, dd)
    + forward["decoder_embed"]
    + forward["decoder_pred"]
  )
  lora = 0
  for name, fan_in, fan_out, tokens in lora_targets(arch, mask_ratio):
    products = 2 * tokens * rank * (fan_in + fan_out)  # x A and (x A) B
    lora += 3 * products  # forward, then dB + d(xA) and dA + input gradient
    if name == "patch_embed.proj":
      lora -= 2 * tokens * rank * fan_in  # no input gradient for the image
  return {
    "forward": forward["total"],
    "backward": backward,
    "lora": lora,
    "total": forward["total"] + backward + lora,
  }


def lora_parameter_count(arch: dict, rank: int) -> int:
  return sum(rank * (fan_in + fan_out) for _, fan_in, fan_out, _ in lora_targets(arch))


def make_check_inputs(arch: dict, shots: int, batch: int, seed: int):
  """The shots (k, H, W, 3) ~ N(0, 1), and the check batch's mask noise (batch, L)."""
  rng = np.random.default_rng([seed, 3])
  size = arch["img_size"]
  images = rng.standard_normal((shots, size, size, 3), dtype=np.float32)
  noise = rng.random((batch, num_patches(arch)), dtype=np.float32)
  return images, noise


def random_lora_a(arch: dict, rank: int, seed: int) -> dict[str, np.ndarray]:
  """A factors (fan_in, rank) ~ U(-1, 1) / sqrt(fan_in), keyed by official module name.

  Rows follow the JAX kernel layout; for the patch embedding that is the `patchify`
  order (row in patch, column, channel). B factors start at zero on both sides.
  """
  rng = np.random.default_rng([seed, 4])
  factors = {}
  for name, fan_in, _, _ in lora_targets(arch):
    a = rng.uniform(-1.0, 1.0, size=(fan_in, rank)) / np.sqrt(fan_in)
    factors[name] = a.astype(np.float32)
  return factors


def describe_work(args, arch: dict) -> dict:
  return {
    "counted": "matmuls only, 2 FLOPs per multiply-add; forward + input gradients + LoRA",
    "per_copy": flops_per_copy(arch, args.mask_ratio, args.rank),
    "lora_parameters": lora_parameter_count(arch, args.rank),
  }


def compare(jx: dict, pt: dict) -> dict:
  """How closely the two sides' check losses agree."""
  return agreement(jx, pt, "check_losses", "check_loss_max_rel_diff")


# ----------------------------------------------------------------------------------------
# PyTorch side (runs in the worker subprocess: no JAX, no maeday_jax).
# ----------------------------------------------------------------------------------------


def _lora_modules(torch):
  nn, F = torch.nn, torch.nn.functional

  class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus the low-rank path `(x @ A) @ B` (scale 1)."""

    def __init__(self, base, a):
      super().__init__()
      self.base = base
      self.a = nn.Parameter(a.clone())
      self.b = nn.Parameter(torch.zeros(a.shape[1], base.out_features, device=a.device))

    def forward(self, x):
      return self.base(x) + (x @ self.a) @ self.b

  class LoraPatchConv(nn.Module):
    """The frozen patch-embedding convolution plus a rank-r update of its kernel.

    A (p*p*3, r) in patchify row order becomes an (r, 3, p, p) stride-p convolution;
    B (r, D) then mixes its r channels: the same update as a Dense layer on patches.
    """

    def __init__(self, base, a):
      super().__init__()
      self.base, self.p = base, base.kernel_size[0]
      self.a = nn.Parameter(a.clone())
      self.b = nn.Parameter(torch.zeros(a.shape[1], base.out_channels, device=a.device))

    def forward(self, x):
      p, rank = self.p, self.a.shape[1]
      kernel = self.a.view(p, p, x.shape[1], rank).permute(3, 2, 0, 1)
      low = F.conv2d(x, kernel, stride=p)  # (N, r, h, w)
      return self.base(x) + torch.einsum("nrhw,rd->ndhw", low, self.b)

  return LoraLinear, LoraPatchConv


class TorchFinetune(TorchSide):
  """The LoRA fine-tuning step in PyTorch (autograd, `torch.optim.SGD`)."""

  def __init__(self, args, arch: dict):
    super().__init__(args, arch, flops_per_copy(arch, args.mask_ratio, args.rank)["total"])
    torch = self.torch
    for param in self.model.parameters():
      param.requires_grad_(False)
    self.shots_np, self.check_noise_np = make_check_inputs(arch, args.shots, args.batch, args.seed)
    self.shots = torch.from_numpy(self.shots_np).permute(0, 3, 1, 2).contiguous().to(self.device)
    self.check_noise = torch.from_numpy(self.check_noise_np).to(self.device)
    size = arch["img_size"]
    offsets = torch.arange(size, dtype=torch.float32, device=self.device) - (size - 1) / 2
    self.dy, self.dx = torch.meshgrid(offsets, offsets, indexing="ij")
    factors = random_lora_a(arch, args.rank, args.seed)
    self.lora_a = {k: torch.from_numpy(v).to(self.device) for k, v in factors.items()}
    self.check_losses = self._check()
    log(f"[torch] check losses {self.check_losses}")
    self._reset_lora()

  def _reset_lora(self) -> None:
    """Fresh LoRA factors (B = 0) in every target and a fresh optimiser."""
    torch = self.torch
    linear, patch_conv = _lora_modules(torch)
    for name, _, _, _ in lora_targets(self.arch):
      parent_name, _, child = name.rpartition(".")
      parent = self.model.get_submodule(parent_name) if parent_name else self.model
      layer = getattr(parent, child)
      base = getattr(layer, "base", layer)  # unwrap an earlier LoRA layer
      wrapper = patch_conv if name == "patch_embed.proj" else linear
      setattr(parent, child, wrapper(base, self.lora_a[name]))
    params = [p for p in self.model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.SGD(
      params, lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )

  def _loss(self, images, noise):
    with self.autocast():
      latent, _, ids_restore = self.model.forward_encoder(images, self.args.mask_ratio, noise)
      pred = self.model.forward_decoder(latent, ids_restore)
    return (pred.float() - self.model.patchify(images)).square().mean()

  def _update(self, images, noise) -> float:
    self.optimizer.zero_grad(set_to_none=True)
    loss = self._loss(images, noise)
    loss.backward()
    self.optimizer.step()
    return loss.item()

  def _check(self) -> list[float]:
    self._reset_lora()
    self.set_attention("unfused")
    k = self.args.shots
    images = self.shots[self.torch.arange(self.args.batch, device=self.device) % k]
    return [self._update(images, self.check_noise) for _ in range(CHECK_UPDATES + 1)]

  def training_batch(self):
    """The shots repeated to `batch` copies, each cropped, rotated and masked anew."""
    torch, F = self.torch, self.torch.nn.functional
    batch, size = self.args.batch, self.arch["img_size"]
    copies = self.shots[torch.arange(batch, device=self.device) % self.args.shots]
    u = torch.rand(batch, 4 + num_patches(self.arch), device=self.device)
    angle = (2 * u[:, 0] - 1) * np.deg2rad(MAX_ROTATION_DEG)
    lo, hi = CROP_SCALE
    side = torch.sqrt(lo + (hi - lo) * u[:, 1])
    extent = size - 1
    center = extent / 2 + (1 - side)[:, None] * extent * (u[:, 2:4] - 0.5)  # (row, col)
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    dy, dx = self.dy * side[:, None, None], self.dx * side[:, None, None]
    rows = center[:, 0, None, None] + cos * dy + sin * dx
    cols = center[:, 1, None, None] - sin * dy + cos * dx
    # Pixel centres at (2i + 1) / size - 1 (align_corners=False), so "reflection"
    # mirrors about the image edge, like the JAX side's half-sample symmetric fill.
    grid = torch.stack([(2 * cols + 1) / size - 1, (2 * rows + 1) / size - 1], dim=-1)
    images = F.grid_sample(
      copies, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    return images, u[:, 4:]

  def _run(self, mode: str) -> None:
    self.last_loss = self._update(*self.training_batch())

  def extra_summary(self) -> dict:
    return {
      "check_losses": self.check_losses,
      "last_loss": self.last_loss,
      "lora_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
      "inputs_digest": arrays_digest(self.shots_np, self.check_noise_np),
    }


# ----------------------------------------------------------------------------------------
# JAX side.
# ----------------------------------------------------------------------------------------


class JaxFinetune(JaxSide):
  """`maeday_jax.few_shot`'s compiled, donated LoRA train step."""

  def __init__(self, args, arch: dict):
    super().__init__(args, arch, flops_per_copy(arch, args.mask_ratio, args.rank)["total"])
    jax = self.jax
    from maeday_jax import few_shot, lora, parallel, training

    self.config = config = few_shot.get_train_config()
    config.batch_size, config.lora.rank, config.mask_ratio = args.batch, args.rank, args.mask_ratio
    config.lora.compute = args.lora_compute
    expected = dict(
      learning_rate=(few_shot.learning_rate(config), LEARNING_RATE),
      momentum=(config.momentum, MOMENTUM),
      weight_decay=(config.weight_decay, WEIGHT_DECAY),
      max_rotation_deg=(config.augment.max_rotation_deg, MAX_ROTATION_DEG),
      crop_scale=((config.augment.min_crop_scale, config.augment.max_crop_scale), CROP_SCALE),
      lora_targets=(
        len(lora.target_paths(self.params, tuple(config.lora.targets))),
        len(lora_targets(arch)),
      ),
    )
    differ = {k: v for k, v in expected.items() if v[0] != v[1]}
    if differ or config.lora.alpha is not None:
      raise RuntimeError(f"The benchmark's settings disagree with few_shot's: {differ}")

    mesh = self.mesh
    self.settings = few_shot.StepSettings.from_config(config)
    self.optimizer = few_shot.make_optimizer(config)
    self.shots_np, self.check_noise_np = make_check_inputs(arch, args.shots, args.batch, args.seed)
    shots = parallel.replicate(jax.numpy.asarray(self.shots_np), mesh)
    self.check_losses = self._check(shots)
    log(f"[jax] check losses {self.check_losses}")

    state = parallel.replicate(training.init_state(self._lora_tree(), self.optimizer), mesh)
    key = parallel.replicate(jax.random.key(args.seed), mesh)
    compiled = self.compile(
      lambda: few_shot.lower_train_step(
        self.model, self.optimizer, mesh, self.settings, state, self.params, shots, key
      )
    )
    self.state, self.last_loss = state, None

    def run():
      # As `few_shot.adapt` runs it: the state is donated, the loss read back.
      self.state, loss = compiled(self.state, self.params, shots, key)
      self.last_loss = float(loss)

    self._run = run
    self.warm_up()

  def _lora_tree(self) -> dict:
    """The NumPy A factors (B = 0) as a `maeday_jax.lora` tree."""
    import re

    from flax import traverse_util

    flat = {}
    for name, a in random_lora_a(self.arch, self.args.rank, self.args.seed).items():
      path = (*re.sub(r"blocks\.(\d+)", r"blocks_\1", name).split("."), "kernel")
      flat[(*path, "A")] = a
      flat[(*path, "B")] = np.zeros((a.shape[1], _fan_out(self.params, path)), np.float32)
    return traverse_util.unflatten_dict(flat)

  def _check(self, shots) -> list[float]:
    """Losses on the fixed batch before and after each of `CHECK_UPDATES` SGD updates."""
    jax = self.jax
    import optax

    strategy, mask_ratio = self.settings.strategy, self.settings.mask_ratio
    copies = np.arange(self.args.batch) % self.args.shots
    images, noise = shots[copies], jax.numpy.asarray(self.check_noise_np)

    # Weights and data are arguments, not closed-over constants, which XLA would try to
    # constant-fold (minutes for the patch-embedding convolution of a ViT-B batch).
    @jax.jit
    def update(trainable, opt_state, base, images, noise):
      def loss_fn(t):
        return strategy.loss(self.model, base, t, images, noise, mask_ratio)

      loss, grads = jax.value_and_grad(loss_fn)(trainable)
      updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, loss

    trainable = self._lora_tree()
    opt_state = self.optimizer.init(trainable)
    losses = []
    for _ in range(CHECK_UPDATES + 1):
      trainable, opt_state, loss = update(trainable, opt_state, self.params, images, noise)
      losses.append(float(loss))
    return losses

  def extra_summary(self) -> dict:
    from maeday_jax.models import num_params

    return {
      "lora_compute": self.args.lora_compute,
      "check_losses": self.check_losses,
      "last_loss": self.last_loss,
      "lora_parameters": num_params(self.state["params"]),
      "inputs_digest": arrays_digest(self.shots_np, self.check_noise_np),
    }


def _fan_out(params, path) -> int:
  leaf = params
  for part in path:
    leaf = leaf[part]
  return int(leaf.shape[-1])


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------


def _projected(one_time_s: float, median_s: float, iterations: int) -> str:
  one_time_s = max(one_time_s, 0.0)  # A first step faster than the median costs nothing.
  total = one_time_s + iterations * median_s
  return (
    f"{iterations}-iteration fine-tune: {one_time_s:.2f} s once + {iterations} x "
    f"{median_s:.3f} s = {total:.1f} s"
  )


def report_lines(result: dict) -> list[str]:
  """The fine-tuning part of the printed summary (after the machine and architecture)."""
  cfg, work = result["config"], result["work"]
  jx, pt = result.get("jax"), result.get("pytorch")
  flops, iterations = work["per_copy"], cfg["iterations"]
  lines = [
    f"work per step: {cfg['batch']} augmented, masked copies of {cfg['shots']} shot(s) (ratio "
    f"{cfg['mask_ratio']}), LoRA rank {cfg['rank']} on {len(lora_targets(result['arch']))} "
    f"matrices ({work['lora_parameters']:,} parameters), SGD, {cfg['dtype']}, {timing_words(cfg)}",
    f"analytic FLOPs per copy: {flops['total'] / 1e9:.4g} GFLOP (forward "
    f"{flops['forward'] / 1e9:.4g}, backward without frozen-weight gradients "
    f"{flops['backward'] / 1e9:.4g}, LoRA {flops['lora'] / 1e9:.4g})",
  ]
  if jx:
    lines += [
      jax_header(jx) + f", few_shot's train step (donated state), LoRA on {jx['lora_compute']}",
      run_line("", jx, "copy"),
      compile_line(jx),
      "  " + _projected(jx["lower_s"] + jx["compile_s"], jx["step_median_s"], iterations),
    ]
  if pt:
    lines.append(torch_header(pt, "autograd + torch.optim.SGD, LoRA on activations"))
    for mode, run in pt["attention_runs"].items():
      lines.append(run_line(mode, run, "copy"))
    best = pt["attention_runs"][pt["attention"]]
    lines.append(
      "  "
      + _projected(
        best["first_iteration_s"] - best["step_median_s"], best["step_median_s"], iterations
      )
    )
  if "ratio_jax_over_torch" in result:
    lines.append(ratio_line(result))
  if "check_loss_max_rel_diff" in result:
    lines.append(
      f"check losses (before, after 1 and {CHECK_UPDATES} updates) JAX {jx['check_losses']} vs "
      f"PyTorch {pt['check_losses']}: max relative difference "
      f"{result['check_loss_max_rel_diff']:.2e}" + inputs_warning(result)
    )
  return lines
