"""The AnomalyDINO side of `tools/benchmark.py`: a bank of DINOv2 patches, then scoring.

Both sides do the same work with the same random DINOv2 weights (the official key layout,
`random_dinov2_state_dict`, drawn from `--seed` by NumPy in each process) on the same
seeded images (`--image-size`, 448 px: 32 x 32 patches; ImageNet-normalised space). One
step is:

- fit: the `--shots` (1) normal images, each at 0, 90, 180 and 270 degrees, through
  DINOv2 (`--arch`: dinov2_vits14, the method's default; dinov2_vitb14; the tiny
  dinov2_test); the last block's patch tokens through the final norm, L2-normalised: the
  memory bank (4 x 1,024 rows of 384-D for one shot with ViT-S/14 at 448 px);
- scoring: `--batch` (8) images through DINOv2, each patch's cosine distance to its
  nearest bank row, the image score the mean of the top 1 % patch distances, and the map
  (nearest-neighbour upsampling, Gaussian blur sigma 4, 33 taps). No background masking
  (the method's choice for textures, and anomalib's default).

The JAX side runs `maeday_jax`'s `anomalydino` detector as the jobs do: `fit` on the shots
(it rotates them itself), then its compiled, data-parallel batch step, with the weights
loaded from a safetensors file of the benchmark weights (the library's import path). It
computes in float32, as the library's DINOv2 detectors do. The PyTorch side runs
anomalib's `AnomalyDINOModel(encoder_name=<timm's DINOv2>, masking=False,
coreset_subsampling=False)` with the same weights loaded into its timm backbone (its
`pre_trained=True` is turned off: nothing is downloaded) when anomalib can be imported in
the `--torch-python` interpreter (`--torch-model auto`, the default; `anomalib` insists on
it): the fit is its training-mode forward on the rotated shots plus `fit()`, the scoring
its eval-mode forward. Otherwise (`plain`, and always for dinov2_test) the worker runs the
same computation in plain PyTorch on the independent DINOv2 of
`tools/references/torch_dinov2_reference.py`.

The check: both sides fit a bank on the same shots and score the same two images at the
backbone's training size (518 px for the public models, 56 for dinov2_test), where every
implementation uses the position table as stored. At other sizes the table is resized,
and the implementations differ there: DINOv2's official code (and `maeday_jax`) resizes
by the scale factor `(grid + 0.1) / 37`, timm (and so anomalib) to the output size; the
image scores must agree at the training size (the maximum relative difference is
reported).

CPU (anomalib in its own virtual environment; `--torch-python /work/venv-torch/bin/python`
or `--torch-model plain` runs the plain PyTorch version instead):

    python tools/benchmark.py --task anomalydino --batch 8 --steps 3 --warmup 1 \\
        --interleave --torch-python /work/venv-anomalib/bin/python

GPU: a CUDA jaxlib and a CUDA build of torch (and anomalib) in the PyTorch environment,
then the same command with `--torch-device cuda`.
"""

from __future__ import annotations

import math
import os
import tempfile

import benchmark_bank
import numpy as np
from benchmark_bank import JaxBankSide, TorchBankSide, blurred_map, nchw
from benchmark_common import (
  MLP_RATIO,
  SIDE_ARGS,
  arrays_digest,
  import_reference,
  log,
  timing_words,
)
from benchmark_jax import data_mesh

# What `benchmark.py` asks of a task module besides its sides: the memory-bank frame's.
compare = benchmark_bank.compare
TORCH_MODES = benchmark_bank.TORCH_MODES
TORCH_MODULES = benchmark_bank.TORCH_MODULES

# The official DINOv2 models the benchmark runs, in the fields of both
# `maeday_jax.models.dinov2.DinoV2` (the JAX side checks they agree) and
# `torch_dinov2_reference.DinoVisionTransformer`; dinov2_test is the tests' tiny model.
_ORIGINAL = dict(
  img_size=518,
  patch_size=14,
  ffn="mlp",
  num_register_tokens=0,
  interpolate_offset=0.1,
  interpolate_antialias=False,
)
DINO_ARCHS: dict[str, dict] = {
  "dinov2_vits14": dict(_ORIGINAL, embed_dim=384, depth=12, num_heads=6),
  "dinov2_vitb14": dict(_ORIGINAL, embed_dim=768, depth=12, num_heads=12),
  "dinov2_test": dict(_ORIGINAL, img_size=56, embed_dim=48, depth=3, num_heads=3),
}
# The same models in timm, which anomalib's AnomalyDINO builds.
TIMM_NAMES = {
  "dinov2_vits14": "vit_small_patch14_dinov2",
  "dinov2_vitb14": "vit_base_patch14_dinov2",
}
DEFAULT_IMAGE_SIZE = 448
# AnomalyDINO's few-shot augmentation, its image score and anomalib's defaults.
ROTATIONS = (0, 90, 180, 270)
TOP_FRACTION = 0.01
CHECK_IMAGES = 2
# What the PyTorch worker needs from the command line.
WORKER_ARGS = (*SIDE_ARGS, "shots", "image_size", "torch_model")


# ----------------------------------------------------------------------------------------
# Work description shared by both sides (NumPy only).
# ----------------------------------------------------------------------------------------


def random_dinov2_state_dict(arch: dict, seed: int) -> dict[str, np.ndarray]:
  """Random official-layout DINOv2 weights, the same in every process for one seed: layer
  scales around 0.5, LayerNorm scales around 1, weights ~ N(0, 1 / fan_in), biases,
  position table and class token ~ N(0, 0.2) (every parameter matters)."""
  rng = np.random.default_rng([seed, 14])
  dim, patch, hidden = arch["embed_dim"], arch["patch_size"], MLP_RATIO * arch["embed_dim"]
  positions = (arch["img_size"] // patch) ** 2
  shapes = {
    "cls_token": (1, 1, dim),
    "pos_embed": (1, 1 + positions, dim),
    "mask_token": (1, dim),
    "patch_embed.proj.weight": (dim, 3, patch, patch),
    "patch_embed.proj.bias": (dim,),
  }
  for i in range(arch["depth"]):
    for name, shape in (
      ("norm1.weight", (dim,)),
      ("norm1.bias", (dim,)),
      ("attn.qkv.weight", (3 * dim, dim)),
      ("attn.qkv.bias", (3 * dim,)),
      ("attn.proj.weight", (dim, dim)),
      ("attn.proj.bias", (dim,)),
      ("ls1.gamma", (dim,)),
      ("norm2.weight", (dim,)),
      ("norm2.bias", (dim,)),
      ("mlp.fc1.weight", (hidden, dim)),
      ("mlp.fc1.bias", (hidden,)),
      ("mlp.fc2.weight", (dim, hidden)),
      ("mlp.fc2.bias", (dim,)),
      ("ls2.gamma", (dim,)),
    ):
      shapes[f"blocks.{i}.{name}"] = shape
  shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
  state = {}
  for name, shape in shapes.items():
    if name.endswith("gamma"):
      values = rng.uniform(0.2, 0.8, shape)
    elif name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
      values = rng.uniform(0.5, 1.5, shape)
    elif len(shape) > 1 and name.endswith("weight"):
      values = rng.normal(0.0, 1.0 / math.sqrt(int(np.prod(shape[1:]))), shape)
    else:
      values = rng.normal(0.0, 0.2, shape)
    state[name] = values.astype(np.float32)
  return state


def backbone_flops(arch: dict, size: int) -> int:
  """Matmul FLOPs (2 per multiply-add) of one image through every block: the patch
  embedding, q/k/v, attention, projection and MLP."""
  dim, patch = arch["embed_dim"], arch["patch_size"]
  patches = (size // patch) ** 2
  tokens = 1 + arch["num_register_tokens"] + patches
  per_block = 2 * tokens * dim * (3 * dim + dim + 2 * MLP_RATIO * dim) + 4 * tokens**2 * dim
  return 2 * patches * dim * 3 * patch * patch + arch["depth"] * per_block


def describe_work(args, arch: dict) -> dict:
  """Bank size and analytic FLOPs of a fit and of one scored image, for the report."""
  size, dim = args.image_size, arch["embed_dim"]
  patches = (size // arch["patch_size"]) ** 2
  views = args.shots * len(ROTATIONS)
  bank = views * patches
  backbone = backbone_flops(arch, size)
  return {
    "counted": "DINOv2's matmuls and the cosine-similarity matmul, 2 FLOPs per multiply-add",
    "image_size": size,
    "check_image_size": arch["img_size"],
    "embedding_dim": dim,
    "patches_per_image": patches,
    "views": views,
    "bank_rows": bank,
    "backbone_per_image": backbone,
    "per_fit": views * backbone,
    "per_image": backbone + 2 * patches * bank * dim,
  }


def make_inputs(args, arch: dict, state: dict) -> tuple[tuple[np.ndarray, ...], str]:
  """(shots, images, check shots, check images) of both sides: seeded, at `--image-size`
  and at the backbone's training size; and the digest of them and the weights `state`."""
  timed = benchmark_bank.seeded_images(
    args.shots, args.batch, args.image_size, args.seed, 11, args.image_size
  )
  size = arch["img_size"]
  check = benchmark_bank.seeded_images(args.shots, CHECK_IMAGES, size, args.seed, 11, size)
  inputs = (*timed, *check)
  return inputs, arrays_digest(*inputs, *state.values())


def rotated_views(shots: np.ndarray) -> np.ndarray:
  """The shots at every angle of `ROTATIONS` (counter-clockwise, exact), angle-major."""
  return np.concatenate([np.rot90(shots, r // 90, axes=(1, 2)) for r in ROTATIONS])


# ----------------------------------------------------------------------------------------
# PyTorch side (runs in the worker subprocess: no JAX, no maeday_jax).
# ----------------------------------------------------------------------------------------


class _PlainAnomalyDino:
  """anomalib's `AnomalyDINOModel` computation (no masking, no coreset) in plain PyTorch,
  on the independent DINOv2 of `torch_dinov2_reference` (the official position resizing)."""

  name = "plain PyTorch (anomalib's AnomalyDINO computation)"

  def __init__(self, torch, arch: dict, state: dict, device, autocast):
    ref = import_reference("torch_dinov2_reference")

    self.torch, self.F, self.autocast = torch, torch.nn.functional, autocast
    net = ref.DinoVisionTransformer(arch)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    self.net = net.to(device).eval()
    self.prefix = 1 + arch["num_register_tokens"]
    self.bank = None

  def _features(self, images):
    """(B, N, D) L2-normalised last-block patch tokens through the final norm."""
    with self.torch.no_grad(), self.autocast():
      tokens = self.net.norm(self.net.forward_blocks(images)[-1])
    return self.F.normalize(tokens[:, self.prefix :].float(), p=2, dim=-1)

  def fit(self, views) -> None:
    features = self._features(views)
    self.bank = features.reshape(-1, features.shape[-1])

  def score(self, images):
    """(scores (B,), maps (B, 1, H, W)), anomalib's eval-mode `forward`."""
    torch = self.torch
    features = self._features(images)
    batch, patches, dim = features.shape
    similarity = features.reshape(-1, dim) @ self.bank.T
    distances = (1.0 - similarity).clamp(min=0.0, max=2.0).min(dim=1).values.reshape(batch, -1)
    top = max(int(patches * TOP_FRACTION), 1)
    scores = torch.topk(distances, top, dim=1).values.mean(dim=1)
    side = int(round(patches**0.5))
    maps = blurred_map(torch, distances.reshape(batch, 1, side, side), tuple(images.shape[-2:]))
    return scores, maps

  @property
  def bank_shape(self):
    return tuple(self.bank.shape)


class _AnomalibAnomalyDino:
  """anomalib's own `AnomalyDINOModel`, its timm DINOv2 loaded with the benchmark weights."""

  def __init__(self, torch, arch_name: str, state: dict, device, autocast):
    import anomalib
    from anomalib.models.image.anomaly_dino import torch_model

    if not hasattr(torch_model, "TimmFeatureExtractor"):
      # Other anomalib versions build the backbone otherwise: plain PyTorch instead.
      raise ImportError(
        f"anomalib {anomalib.__version__}'s AnomalyDINO has no timm backbone to load the "
        f"benchmark weights into (written for anomalib 2.7)"
      )
    self.torch = torch
    self.name = f"anomalib {anomalib.__version__} AnomalyDINOModel"
    pretrained = torch_model.TimmFeatureExtractor

    class Untrained(pretrained):
      """anomalib's extractor without the download (the model asks for pre_trained=True)."""

      def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "pre_trained": False})

    torch_model.TimmFeatureExtractor = Untrained
    try:
      model = torch_model.AnomalyDINOModel(
        num_neighbours=1,
        encoder_name=TIMM_NAMES[arch_name],
        masking=False,
        coreset_subsampling=False,
      )
    finally:
      torch_model.TimmFeatureExtractor = pretrained
    backbone = model.feature_encoder.feature_extractor
    wanted = backbone.state_dict()
    misshapen = [k for k in wanted if k not in state or tuple(state[k].shape) != wanted[k].shape]
    if misshapen:
      raise SystemExit(
        f"timm's {TIMM_NAMES[arch_name]} does not fit the benchmark weights: missing or "
        f"wrong shapes {misshapen[:5]}"
      )
    backbone.load_state_dict({k: torch.from_numpy(state[k]) for k in wanted}, strict=True)
    self.model = model.to(device).eval()
    # Only the backbone in the compute dtype (under `--dtype bfloat16`); the features and
    # the bank stay float32.
    extract = self.model.extract_features

    def features(images):
      with autocast():
        return extract(images).float()

    self.model.extract_features = features

  def fit(self, views) -> None:
    """Training-mode forward (stores the embeddings), then `fit()` (the bank)."""
    model = self.model
    model.train()
    model(views)
    model.fit()
    model.eval()

  def score(self, images):
    with self.torch.no_grad():
      out = self.model(images)
    return out.pred_score.reshape(-1), out.anomaly_map

  @property
  def bank_shape(self):
    return tuple(self.model.memory_bank.shape)


class TorchAnomalyDino(TorchBankSide):
  """AnomalyDINO in PyTorch: anomalib's `AnomalyDINOModel`, or its computation in plain
  torch."""

  def __init__(self, args, arch: dict):
    super().__init__(args)
    torch = self.torch
    self.arch = arch
    self.flops_per_item = describe_work(args, arch)["per_image"]
    state = random_dinov2_state_dict(arch, args.seed)
    self.impl = benchmark_bank.choose_implementation(
      args,
      "AnomalyDINO",
      TIMM_NAMES,
      lambda: _AnomalibAnomalyDino(torch, args.arch, state, self.device, self.autocast),
      lambda: _PlainAnomalyDino(torch, arch, state, self.device, self.autocast),
    )
    log(f"[torch] AnomalyDINO: {self.impl.name}")
    (shots, images, check_shots, check_images), self.digest = make_inputs(args, arch, state)
    self.shots = nchw(torch, rotated_views(shots), self.device)
    self.images = nchw(torch, images, self.device)
    self.check_views = nchw(torch, rotated_views(check_shots), self.device)
    self.check_images = nchw(torch, check_images, self.device)

  def _check(self) -> list[float]:
    """Image scores at the training size, then the timed bank again."""
    self.impl.fit(self.check_views)
    with self.torch.inference_mode():
      scores, _ = self.impl.score(self.check_images)
    self.check_bank_shape = self.impl.bank_shape
    self._fit()
    return scores.float().cpu().numpy().astype(np.float64).tolist()


# ----------------------------------------------------------------------------------------
# JAX side.
# ----------------------------------------------------------------------------------------


class JaxAnomalyDino(JaxBankSide):
  """`maeday_jax`'s `anomalydino` detector: `fit`, then its compiled batch step."""

  def __init__(self, args, arch: dict):
    from safetensors.numpy import save_file

    from maeday_jax import parallel
    from maeday_jax.content_ids import image_ids
    from maeday_jax.detectors import anomalydino, scoring
    from maeday_jax.models import dinov2

    super().__init__(args, describe_work(args, arch)["per_image"])
    variant = args.arch.removeprefix("dinov2_")
    library = dinov2.architecture(dinov2.create(variant))
    differ = {k: (library.get(k), v) for k, v in arch.items() if library.get(k) != v}
    settings = anomalydino.anomalydino_section()
    if tuple(settings.rotations) != ROTATIONS or anomalydino.TOP_FRACTION != TOP_FRACTION:
      differ["method"] = ((tuple(settings.rotations), anomalydino.TOP_FRACTION), ROTATIONS)
    if differ:
      raise RuntimeError(f"The benchmark's AnomalyDINO disagrees with maeday_jax: {differ}")
    self.parallel, self.scoring, self.arch = parallel, scoring, arch
    self.model = dinov2.create(variant)  # What the detector builds: float32 (the report's).

    # The weights as a file, read through the library's checkpoint import.
    self._folder = tempfile.TemporaryDirectory(prefix="maeday_bench_")
    self.weights = os.path.join(self._folder.name, f"{args.arch}_benchmark.safetensors")
    state = random_dinov2_state_dict(arch, args.seed)
    save_file(state, self.weights)
    (shots, images, *self.check_inputs), self.digest = make_inputs(args, arch, state)

    self.detector = self._detector(args.image_size)
    self.normals = self._normals(shots)
    self.mesh = mesh = data_mesh(args.batch)
    self.images, self.ids = parallel.shard_batch((images, image_ids(images)), mesh)
    self.key = self.detector.scoring_key()
    self.first_fit()  # The scoring step is lowered for this bank's shape.
    step = scoring.compile_step(self.detector, mesh, args.batch)
    self.compiled = self.compile(lambda: step.lower(self.state, self.images, self.ids, self.key))
    self.start()

  def _detector(self, size: int):
    from maeday_jax import defaults, detectors

    config = defaults.fit_config()
    section = config.anomalydino
    section.backbone, section.checkpoint, section.image_size = self.args.arch, self.weights, size
    section.masking = "false"
    return detectors.create(config, "anomalydino")

  @staticmethod
  def _normals(shots: np.ndarray):
    from maeday_jax import detectors

    return detectors.NormalImages.from_arrays(shots)

  @property
  def bank_shape(self) -> tuple[int, ...]:
    return tuple(self.detector.state["bank"].shape)

  def _fit(self) -> None:
    """The detector's fit, its state then placed on every device (as the jobs do)."""
    self.detector.fit(self.normals, None)
    self.state = self.jax.block_until_ready(self.parallel.replicate(self.detector.state, self.mesh))

  def _run(self) -> None:
    _, self.scores = self.jax.block_until_ready(
      self.compiled(self.state, self.images, self.ids, self.key)
    )

  def _check(self) -> tuple[list[float], tuple[int, ...]]:
    """Image scores at the training size (a second detector, its own compilation)."""
    shots, images = self.check_inputs
    detector = self._detector(self.arch["img_size"])
    detector.fit(self._normals(shots), None)
    _, scores = self.scoring.score_images(detector, images, self.mesh)
    return np.asarray(scores, np.float64).tolist(), tuple(detector.state["bank"].shape)


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------


def arch_line(cfg: dict, arch: dict) -> str:
  return (
    f"backbone {cfg['arch']}: {arch['embed_dim']}-D, {arch['depth']} blocks, "
    f"{arch['num_heads']} heads, patch {arch['patch_size']}, at {cfg['image_size']} px"
  )


def report_lines(result: dict) -> list[str]:
  """The AnomalyDINO part of the printed summary (after the machine and backbone)."""
  cfg, work = result["config"], result["work"]
  work_lines = [
    f"work per step: fit on {cfg['shots']} shot(s) x {len(ROTATIONS)} rotations -> a bank of "
    f"{work['bank_rows']} x {work['embedding_dim']} patch tokens, then score {cfg['batch']} "
    f"images ({work['patches_per_image']} patches each: cosine distance to the nearest bank "
    f"row, top-1 % mean, blurred map); {cfg['dtype']}, {timing_words(cfg)}",
    f"analytic FLOPs (matmuls): backbone {work['backbone_per_image'] / 1e9:.4g} GFLOP per "
    f"image, fit {work['per_fit'] / 1e9:.4g} GFLOP, scoring {work['per_image'] / 1e9:.4g} "
    f"GFLOP per image",
  ]
  return benchmark_bank.report_lines(
    result,
    work_lines,
    "anomalydino detector fit + batch step (compiled)",
    f"{CHECK_IMAGES} images at the training size, {work['check_image_size']} px",
  )
