"""The PatchCore side of `tools/benchmark.py`: fit a memory bank, score images, JAX vs PyTorch.

Both sides do the same work with the same random ResNet weights (torchvision layout,
`benchmark_common.random_resnet_state_dict`, drawn from `--seed` by NumPy in each
process) on the same seeded images (224 px, ImageNet-normalised space). One step is:

- fit: the `--shots` (1) normal images through the backbone (`--arch`: wide_resnet50_2,
  resnet18, or the tiny test_wide), layer2 and layer3 features 3x3 average-pooled, layer3
  resized bilinearly onto layer2's grid and concatenated (1536-D for WideResNet-50-2, 28 x
  28 per image), then a greedy k-center coreset of `--coreset-ratio` (0.1) of the rows,
  chosen on a sparse random projection: the memory bank;
- scoring: `--batch` (8) images through the backbone, each patch's distance to its
  nearest bank row, the image score re-weighted over the 9 bank neighbours of that row,
  and the pixel map (nearest-neighbour upsampling, Gaussian blur sigma 4, 33 taps).

The JAX side runs `maeday_jax.patchcore.fit` (the bank) and the compiled, data-parallel
`patchcore.make_scorer(model, mesh)` step on state `(variables, bank)`, with the backbone
from `maeday_jax.backbones.from_state_dict`. The PyTorch side runs anomalib's
`PatchcoreModel(backbone=..., layers=["layer2", "layer3"], pre_trained=False)` with the
same weights loaded into its timm feature extractor when anomalib can be imported in the
`--torch-python` interpreter and knows the architecture (`--torch-model auto`, the
default; `anomalib` insists on it): the fit is its training-mode forward (which stores
the embeddings) plus `subsample_embedding(ratio)` (anomalib's `KCenterGreedy`), the
scoring its eval-mode forward. Otherwise (`plain`, and always for test_wide) the worker
runs the same computation written the anomalib way in plain PyTorch: the ResNet of
`tools/references/torch_resnet_reference.py`, `AvgPool2d(3, 1, 1)`, `F.interpolate(bilinear,
align_corners=False)`, the greedy k-center loop on anomalib's sparse random projection,
`torch.cdist` nearest neighbours, the 9-neighbour re-weighting and the 33 x 33 Gaussian
blur with reflect borders. The report names the implementation that ran.

The random choices of the coreset differ between the sides (each draws its own
projection and start row), so the timed steps are compared for speed and bank size only.
For correctness both sides first fit a bank with coreset ratio 1.0 on the same shots
(every embedding is kept: no randomness in what the bank holds) and score the same
images with it; the image scores must agree (the maximum relative difference is
reported).

Reported: the fit time (median; the first fit, which includes JAX's compilation, apart),
scoring images/s and GFLOP/s against an analytic count (the backbone's convolutions and
the nearest-neighbour matmul), the JAX/PyTorch ratio of both, the bank size (rows x dim),
each side's peak resident memory (`getrusage` of the JAX process and of the PyTorch
worker) and device memory where the backend reports it (JAX `memory_stats()`, CUDA
`max_memory_allocated`), the machine and its load.

CPU (anomalib in its own virtual environment; `--torch-python /work/venv-torch/bin/python`
runs the plain PyTorch version instead):

    python tools/benchmark.py --task patchcore --arch wide_resnet50_2 --shots 1 --batch 8 \\
        --steps 3 --warmup 1 --interleave --torch-python /work/venv-anomalib/bin/python

GPU: a CUDA jaxlib (`pip install -U "jax[cuda12]"`) and a CUDA build of torch (and
anomalib) in the PyTorch environment, then the same command with `--torch-device cuda`
(`--dtype bfloat16` runs both backbones in bfloat16; distances stay float32). On a GPU
the worker lets cuDNN use TF32 for the convolutions, as XLA does by default, and keeps
the distance matmuls in full float32, as `maeday_jax.patchcore` computes them
(`precision=HIGHEST`). TPU: `pip install -U "jax[tpu]"` and the same command with
`--no-torch`. JAX splits the scoring batch over all local devices (`--batch` must be a
multiple of their number) and the coreset rows over the same mesh.
"""

from __future__ import annotations

import os

import benchmark_bank
import numpy as np
from benchmark_bank import BLUR_SIGMA, BLUR_SIZE, JaxBankSide, TorchBankSide, blurred_map, nchw
from benchmark_common import (
  RESNET_EXPANSION,
  RESNET_NUM_CLASSES,
  SIDE_ARGS,
  arrays_digest,
  import_reference,
  log,
  random_resnet_state_dict,
  resnet_stage_channels,
  timing_words,
)
from benchmark_jax import data_mesh

# What `benchmark.py` asks of a task module besides its sides: the memory-bank frame's.
compare = benchmark_bank.compare
TORCH_MODES = benchmark_bank.TORCH_MODES
TORCH_MODULES = benchmark_bank.TORCH_MODULES

IMAGE_SIZE = 224
LAYERS = ("layer2", "layer3")
# anomalib's PatchCore: `PatchcoreModel(num_neighbors=9)`, `KCenterGreedy`'s
# `SparseRandomProjection(eps=0.9)` (its `AnomalyMapGenerator`: `benchmark_bank`).
NUM_NEIGHBORS = 9
PROJECTION_EPS = 0.9
# The coreset ratio of the agreement check: every embedding is kept.
CHECK_CORESET_RATIO = 1.0
# Architectures anomalib's timm feature extractor can build (test_wide is ours alone).
ANOMALIB_ARCHS = ("wide_resnet50_2", "resnet18")
# What the PyTorch worker needs from the command line.
WORKER_ARGS = (*SIDE_ARGS, "shots", "coreset_ratio", "torch_model")


# ----------------------------------------------------------------------------------------
# Work description shared by both sides (NumPy only).
# ----------------------------------------------------------------------------------------


def feature_grid(size: int = IMAGE_SIZE) -> int:
  """Side of layer2's grid (stride 8): 28 at 224 px."""
  return size // 8


def embedding_dim(arch: dict) -> int:
  return sum(resnet_stage_channels(arch, int(name[-1])) for name in LAYERS)


def bank_rows(shots: int, ratio: float, size: int = IMAGE_SIZE) -> int:
  """`int(n * ratio)` of the n = shots x h x w embeddings (anomalib and maeday_jax)."""
  return int(shots * feature_grid(size) ** 2 * ratio)


def johnson_lindenstrauss_dim(num_samples: int, eps: float = PROJECTION_EPS) -> int:
  """sklearn's / anomalib's `johnson_lindenstrauss_min_dim` (164 for 784 rows, eps 0.9)."""
  return int(4 * np.log(num_samples) / (eps**2 / 2 - eps**3 / 3))


def backbone_flops(arch: dict, size: int = IMAGE_SIZE, last_layer: int = 3) -> int:
  """Convolution FLOPs (2 per multiply-add) of one image through `layer{last_layer}`."""
  total = 0

  def conv(side, cin, cout, k, stride):
    nonlocal total
    out = (side + 2 * (k // 2) - k) // stride + 1
    total += 2 * out * out * cout * cin * k * k
    return out

  width, block = arch["width"], arch["block"]
  side = conv(size, 3, width, 7, 2)
  side = (side + 2 - 3) // 2 + 1  # 3x3/2 max-pool, padding 1
  inplanes = width
  for k in range(last_layer):
    planes, inner = width * 2**k, arch["width_per_group"] * 2**k
    out = planes * RESNET_EXPANSION[block]
    for i in range(arch["layers"][k]):
      stride = 2 if k > 0 and i == 0 else 1
      if block == "basic":
        new = conv(side, inplanes, planes, 3, stride)
        conv(new, planes, planes, 3, 1)
      else:
        conv(side, inplanes, inner, 1, 1)
        new = conv(side, inner, inner, 3, stride)
        conv(new, inner, out, 1, 1)
      if stride != 1 or inplanes != out:
        conv(side, inplanes, out, 1, stride)
      side, inplanes = new, out
  return total


def describe_work(args, arch: dict) -> dict:
  """Bank size and analytic FLOPs of a fit and of one scored image, for the report."""
  dim, patches = embedding_dim(arch), feature_grid() ** 2
  rows = bank_rows(args.shots, args.coreset_ratio)
  candidates = args.shots * patches
  projected = johnson_lindenstrauss_dim(candidates)
  backbone = backbone_flops(arch)
  return {
    "counted": "convolutions through layer3 and the distance matmuls, 2 FLOPs per multiply-add",
    "image_size": IMAGE_SIZE,
    "layers": list(LAYERS),
    "embedding_dim": dim,
    "patches_per_image": patches,
    "candidates": candidates,
    "bank_rows": rows,
    "projected_dim": projected,
    "backbone_per_image": backbone,
    "per_fit": args.shots * backbone + 2 * candidates * dim * projected,
    "per_image": backbone + 2 * patches * rows * dim,
  }


def make_inputs(shots: int, batch: int, seed: int):
  """Seeded shots (K, H, W, 3) and test images (B, H, W, 3) at `IMAGE_SIZE`."""
  return benchmark_bank.seeded_images(shots, batch, IMAGE_SIZE, seed, 7)


# ----------------------------------------------------------------------------------------
# PyTorch side (runs in the worker subprocess: no JAX, no maeday_jax).
# ----------------------------------------------------------------------------------------


class _PlainPatchcore:
  """anomalib's `PatchcoreModel` computation written out in plain PyTorch.

  The backbone is `torch_resnet_reference.ResNet` (torchvision's layout) run through
  layer3; everything after it follows anomalib 2.x line by line, except the nearest
  neighbours, which use `torch.cdist` (the same |x|^2 - 2 x.y + |y|^2 expansion for
  these sizes).
  """

  name = "plain PyTorch (anomalib's computation)"

  def __init__(self, torch, arch: dict, state: dict, device, autocast):
    ref = import_reference("torch_resnet_reference")

    self.torch, self.F, self.device, self.autocast = torch, torch.nn.functional, device, autocast
    fields = {k: arch[k] for k in ("block", "layers", "width", "width_per_group")}
    net = ref.ResNet(**fields, num_classes=RESNET_NUM_CLASSES)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    self.net = net.to(device).eval()
    self.pool = torch.nn.AvgPool2d(3, 1, 1)  # count_include_pad=True, the default
    self.generator = torch.Generator(device="cpu")
    self.bank = None

  def _features(self, images):
    net = self.net
    with self.torch.no_grad(), self.autocast():
      x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
      layer2 = net.layer2(net.layer1(x))
      layer3 = net.layer3(layer2)
    return {"layer2": layer2.float(), "layer3": layer3.float()}

  def embed(self, images):
    """(B * h * w, D) embeddings, anomalib's `generate_embedding` + `reshape_embedding`."""
    features = {name: self.pool(f) for name, f in self._features(images).items()}
    embedding = features[LAYERS[0]]
    for name in LAYERS[1:]:
      resized = self.F.interpolate(
        features[name], size=embedding.shape[-2:], mode="bilinear", align_corners=False
      )
      embedding = self.torch.cat((embedding, resized), 1)
    return embedding, embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])

  def _projection(self, num_samples: int, num_features: int):
    """anomalib's `SparseRandomProjection._sparse_random_matrix` (density 1 / sqrt(D))."""
    torch, g = self.torch, self.generator
    k = johnson_lindenstrauss_dim(num_samples)
    density = 1 / np.sqrt(num_features)
    components = torch.zeros((k, num_features), dtype=torch.float32)
    for i in range(k):
      count, prob = torch.tensor(float(num_features)), torch.tensor(float(density))
      nnz = int(torch.binomial(count, prob, g))
      cols = torch.randperm(num_features, generator=g)[:nnz]
      components[i, cols] = torch.randint(0, 2, (nnz,), generator=g).float() * 2 - 1
    components *= np.sqrt(1 / density) / np.sqrt(k)
    return components.to(self.device)

  def _coreset(self, embedding, ratio: float):
    """anomalib's `KCenterGreedy.sample_coreset` (the start row included, as in 2.x)."""
    torch = self.torch
    n = embedding.shape[0]
    size = int(n * ratio)
    features = embedding @ self._projection(n, embedding.shape[1]).T
    idx = torch.randint(high=n, size=(1,), generator=self.generator).squeeze().to(self.device)
    selected = [idx]
    min_distances = None
    for _ in range(size - 1):
      distances = torch.linalg.norm(features - features[idx], ord=2, dim=1, keepdim=True)
      min_distances = (
        distances if min_distances is None else torch.minimum(min_distances, distances)
      )
      _, idx = torch.max(min_distances.squeeze(1), dim=0)
      min_distances[idx] = 0.0
      selected.append(idx)
    return embedding[torch.stack(selected).cpu().tolist()]

  def fit(self, shots, ratio: float) -> None:
    _, flat = self.embed(shots)
    self.bank = flat if ratio == 1.0 else self._coreset(flat, ratio)

  def score(self, images):
    """(scores (B,), maps (B, 1, H, W)), anomalib's eval-mode `forward`."""
    torch, F, bank = self.torch, self.F, self.bank
    grid, flat = self.embed(images)
    batch, _, h, w = grid.shape
    patch_scores, locations = torch.cdist(flat, bank).min(1)
    patch_scores, locations = patch_scores.reshape(batch, -1), locations.reshape(batch, -1)
    # compute_anomaly_score
    rows = torch.arange(batch, device=self.device)
    max_patches = torch.argmax(patch_scores, dim=1)
    features = flat.reshape(batch, h * w, -1)[rows, max_patches]
    score = patch_scores[rows, max_patches]
    nn_sample = bank[locations[rows, max_patches]]
    k = min(NUM_NEIGHBORS, bank.shape[0])
    _, support = torch.cdist(nn_sample, bank).topk(k=k, largest=False, dim=1)
    distances = torch.cdist(features.unsqueeze(1), bank[support])
    weights = (1 - F.softmax(distances.squeeze(1), 1))[..., 0]
    scores = weights * score
    maps = blurred_map(torch, patch_scores.reshape(batch, 1, h, w), tuple(images.shape[-2:]))
    return scores, maps

  @property
  def bank_shape(self):
    return tuple(self.bank.shape)


class _AnomalibPatchcore:
  """anomalib's own `PatchcoreModel`, its feature extractor loaded with the benchmark weights."""

  def __init__(self, torch, arch_name: str, state: dict, device, autocast):
    import anomalib
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    self.torch, self.device, self.autocast = torch, device, autocast
    self.name = f"anomalib {anomalib.__version__} PatchcoreModel"
    self.model = PatchcoreModel(backbone=arch_name, layers=list(LAYERS), pre_trained=False)
    extractor = self.model.feature_extractor.feature_extractor
    wanted = extractor.state_dict()
    missing = [k for k in wanted if k not in state]
    misshapen = [k for k in wanted if k in state and tuple(state[k].shape) != wanted[k].shape]
    if missing or misshapen:
      raise SystemExit(
        f"anomalib's {arch_name} feature extractor does not fit the benchmark weights: "
        f"missing {missing[:5]}, wrong shapes {misshapen[:5]}"
      )
    extractor.load_state_dict({k: torch.from_numpy(state[k]) for k in wanted}, strict=True)
    self.model = self.model.to(device).eval()
    # Only the backbone in the compute dtype (under `--dtype bfloat16`); the embeddings
    # and the bank stay float32, as on the JAX side.
    extract = self.model.feature_extractor.forward

    def features(images):
      with autocast():
        return {name: f.float() for name, f in extract(images).items()}

    self.model.feature_extractor.forward = features

  def fit(self, shots, ratio: float) -> None:
    """Training-mode forward (stores the embeddings), then `subsample_embedding`."""
    model = self.model
    model.train()
    model(shots)
    model.subsample_embedding(sampling_ratio=ratio)
    model.eval()

  def score(self, images):
    with self.torch.no_grad():
      out = self.model(images)
    return out.pred_score, out.anomaly_map

  @property
  def bank_shape(self):
    return tuple(self.model.memory_bank.shape)


class TorchPatchcore(TorchBankSide):
  """PatchCore in PyTorch: anomalib's `PatchcoreModel`, or its computation in plain torch."""

  def __init__(self, args, arch: dict):
    # The progress bar of anomalib's coreset loop would fill the log.
    os.environ.setdefault("TQDM_DISABLE", "1")
    super().__init__(args)
    torch = self.torch
    self.arch = arch
    self.flops_per_item = describe_work(args, arch)["per_image"]
    if self.cuda:
      # As XLA on GPUs: TF32 convolutions; distances in full float32 (maeday_jax's HIGHEST).
      torch.backends.cudnn.allow_tf32 = True
      torch.backends.cuda.matmul.allow_tf32 = False
    state = random_resnet_state_dict(arch, args.seed)
    self.impl = self._implementation(state)
    log(f"[torch] PatchCore: {self.impl.name}")
    shots, images = make_inputs(args.shots, args.batch, args.seed)
    self.digest = arrays_digest(shots, images, *state.values())
    self.shots, self.images = nchw(torch, shots, self.device), nchw(torch, images, self.device)

  def _implementation(self, state: dict):
    """anomalib's `PatchcoreModel` if `--torch-model` and the environment allow, else plain."""
    torch, arch = self.torch, self.args.arch
    return benchmark_bank.choose_implementation(
      self.args,
      "PatchCore",
      ANOMALIB_ARCHS,
      lambda: _AnomalibPatchcore(torch, arch, state, self.device, self.autocast),
      lambda: _PlainPatchcore(torch, self.arch, state, self.device, self.autocast),
    )

  def _fit(self, ratio: float | None = None) -> None:
    self.impl.fit(self.shots, self.args.coreset_ratio if ratio is None else ratio)
    self._sync()

  def _check(self) -> list[float]:
    """Image scores with the full bank (ratio 1.0), then the timed bank again."""
    self._fit(CHECK_CORESET_RATIO)
    self._score()
    scores = self.scores.float().cpu().numpy().astype(np.float64).tolist()
    self.check_bank_shape = self.impl.bank_shape
    self._fit()
    return scores


# ----------------------------------------------------------------------------------------
# JAX side.
# ----------------------------------------------------------------------------------------


class JaxPatchcore(JaxBankSide):
  """`maeday_jax.patchcore.fit` and the compiled `patchcore.make_scorer` step, the
  backbone built from the benchmark weights (`backbones.from_state_dict`)."""

  def __init__(self, args, arch: dict):
    import jax
    import jax.numpy as jnp

    from maeday_jax import backbones, parallel, patchcore

    super().__init__(args, describe_work(args, arch)["per_image"])
    self.arch, self.patchcore, self.parallel = arch, patchcore, parallel
    expected = dict(
      layers=(patchcore.LAYERS, LAYERS),
      num_neighbors=(patchcore.NUM_NEIGHBORS, NUM_NEIGHBORS),
      projection_eps=(patchcore.PROJECTION_EPS, PROJECTION_EPS),
      blur=((patchcore.BLUR_SIZE, patchcore.BLUR_SIGMA), (BLUR_SIZE, BLUR_SIGMA)),
    )
    differ = {k: v for k, v in expected.items() if v[0] != v[1]}
    if differ:
      raise RuntimeError(f"The benchmark's PatchCore settings disagree with maeday_jax: {differ}")

    # The library's PatchCore runs its backbone in float32 unless told otherwise.
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    state = random_resnet_state_dict(arch, args.seed)
    self.model, variables = backbones.from_state_dict(
      state, source="benchmark weights", dtype=dtype
    )
    if self.model != backbones.create(args.arch, dtype=dtype):
      raise RuntimeError(
        f"RESNET_ARCHS[{args.arch!r}] disagrees with maeday_jax: {self.model} vs "
        f"{backbones.create(args.arch, dtype=dtype)}"
      )
    self.mesh = mesh = data_mesh(args.batch)
    self.variables = parallel.replicate(jax.tree.map(jnp.asarray, variables), mesh)
    shots, images = make_inputs(args.shots, args.batch, args.seed)
    self.digest = arrays_digest(shots, images, *state.values())
    self.shots = jnp.asarray(shots)
    self.images = parallel.shard_batch(images, mesh)
    self.key = jax.random.key(args.seed)
    self.scorer = patchcore.make_scorer(self.model, mesh)
    self.first_fit()  # The scoring step is lowered for this bank's shape.
    self.compiled = self.compile(lambda: self.scorer.lower(self.state, self.images))
    self.start()

  @property
  def state(self):
    return (self.variables, self.bank)

  @property
  def bank_shape(self) -> tuple[int, ...]:
    return tuple(self.bank.rows.shape)

  def _fit(self, ratio: float | None = None) -> None:
    """A bank from the shots, placed on every device, as `maeday_jax`'s few-shot run does."""
    jax, patchcore = self.jax, self.patchcore
    ratio = self.args.coreset_ratio if ratio is None else ratio
    bank = patchcore.fit(self.model, self.variables, self.shots, self.key, coreset_ratio=ratio)
    self.bank = jax.block_until_ready(self.parallel.replicate(bank, self.mesh))

  def _run(self) -> None:
    _, self.scores = self.jax.block_until_ready(self.compiled(self.state, self.images))

  def _check(self) -> tuple[list[float], tuple[int, ...]]:
    """Image scores with the full bank (ratio 1.0; the jitted scorer, another bank shape)."""
    self._fit(CHECK_CORESET_RATIO)
    shape = self.bank_shape
    _, scores = self.jax.block_until_ready(self.scorer(self.state, self.images))
    self._fit()
    return np.asarray(scores, np.float64).tolist(), shape


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------


def arch_line(cfg: dict, arch: dict) -> str:
  layers = "/".join(str(n) for n in arch["layers"])
  return (
    f"backbone {cfg['arch']}: {arch['block']} blocks {layers}, width {arch['width']}, inner "
    f"width {arch['width_per_group']}; features {' + '.join(LAYERS)} at {IMAGE_SIZE} px"
  )


def report_lines(result: dict) -> list[str]:
  """The PatchCore part of the printed summary (after the machine and backbone)."""
  cfg, work = result["config"], result["work"]
  work_lines = [
    f"work per step: fit on {cfg['shots']} shot(s) ({work['candidates']} embeddings of "
    f"{work['embedding_dim']}-D, coreset ratio {cfg['coreset_ratio']} on a "
    f"{work['projected_dim']}-D projection -> {work['bank_rows']} rows), then score "
    f"{cfg['batch']} images ({work['patches_per_image']} patches each, {NUM_NEIGHBORS}-neighbour "
    f"re-weighting, {BLUR_SIZE}-tap blur); {cfg['dtype']}, {timing_words(cfg)}",
    f"analytic FLOPs (convolutions + distance matmuls): backbone "
    f"{work['backbone_per_image'] / 1e9:.4g} GFLOP per image, fit {work['per_fit'] / 1e9:.4g} "
    f"GFLOP, scoring {work['per_image'] / 1e9:.4g} GFLOP per image",
  ]
  return benchmark_bank.report_lines(
    result,
    work_lines,
    "patchcore.fit + make_scorer (compiled)",
    f"coreset ratio {CHECK_CORESET_RATIO}: every embedding kept",
  )
