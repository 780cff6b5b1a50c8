"""One entry point for the feature networks that detectors build on.

    net = models.load("dinov2_vits14")                       # known name: downloaded once
    net = models.load("dinov2_vits14", checkpoint="/path/dinov2_vits14_pretrain.pth")
    net = models.load("dinov2_test", checkpoint="random")    # random weights (tests)
    tokens = net.patch_tokens(images, layers=(11,))          # {11: (B, h, w, C)}

`images` are NHWC float32, normalised as the network expects (ImageNet mean and std for
all of these but CLIP, which has its own: `clip.normalize`). Layers are 0-based block
indices (the output of block i; 11 is the last block of ViT-S/B) for ViTs, stage indices
(0 = `layer1` ... 3 = `layer4`) for ResNets; one out of range is a `ValueError` naming
the valid range. DINOv2 and CLIP take any input whose sides are multiples of their patch
size (the position table is resized as the official code / open_clip does). CLIP's
networks also embed images and prompts (`encode_image`, `encode_text`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from maeday_jax.models import clip, dinov2, resnet

RANDOM = "random"


def _check_layers(layers: Sequence[int], count: int, what: str) -> tuple[int, ...]:
  layers = tuple(int(i) for i in layers)
  bad = [i for i in layers if not 0 <= i < count]
  if bad or not layers:
    raise ValueError(f"layers {list(bad) or '()'}: {what} has layers 0 to {count - 1}.")
  return layers


@dataclasses.dataclass(frozen=True)
class DinoV2Features:
  """A DINOv2 and its parameters (`dinov2.DinoV2`)."""

  model: dinov2.DinoV2
  params: Any

  @property
  def num_layers(self) -> int:
    return self.model.depth

  def _blocks(self, images, last: int):
    return self.model.apply({"params": self.params}, images, last=last)

  def patch_tokens(
    self, images: jax.Array, layers: Sequence[int] = (-1,), norm: bool = False
  ) -> dict[int, jax.Array]:
    """{layer: (B, h, w, C)} patch tokens (registers and the class token left out);
    `norm`: through the final LayerNorm (as `get_intermediate_layers(norm=True)`)."""
    depth = self.model.depth
    layers = tuple(depth + i if i < 0 else i for i in layers)
    layers = _check_layers(layers, depth, f"this DINOv2 ({depth} blocks)")
    blocks = self._blocks(images, max(layers))
    rows, cols = images.shape[1] // self.model.patch_size, images.shape[2] // self.model.patch_size
    start = 1 + self.model.num_register_tokens
    out = {}
    for layer in layers:
      tokens = blocks[layer]
      if norm:
        tokens = self.model.apply({"params": self.params}, tokens, method="normalize")
      out[layer] = tokens[:, start:].reshape(tokens.shape[0], rows, cols, -1)
    return out

  def class_token(self, images: jax.Array, norm: bool = True) -> jax.Array:
    """The last block's class token (B, C), through the final norm by default."""
    tokens = self._blocks(images, self.model.depth - 1)[-1]
    if norm:
      tokens = self.model.apply({"params": self.params}, tokens, method="normalize")
    return tokens[:, 0]


@dataclasses.dataclass(frozen=True)
class ClipFeatures:
  """A CLIP, its parameters and its tokenizer (`clip.CLIP`, `clip_tokenizer`).

  `encode_image` and `encode_text` return the projected embeddings before L2
  normalisation (as open_clip's `encode_image` / Hugging Face's `get_image_features`);
  `logit_scale` is exp of the stored parameter.
  """

  model: clip.CLIP
  params: Any
  vocabulary: str | None = None  # A Hugging Face folder with vocab.json; None: packaged.

  @property
  def num_layers(self) -> int:
    return self.model.vision_layers

  @functools.cached_property
  def tokenizer(self):
    """The checkpoint folder's tokenizer, else the packaged CLIP vocabulary's."""
    from maeday_jax.models.clip_tokenizer import ClipTokenizer

    return ClipTokenizer.load(self.vocabulary, self.model.context_length)

  @property
  def logit_scale(self) -> jax.Array:
    return jnp.exp(self.params["logit_scale"])

  def _apply(self, method: str, *args, **kwargs):
    return self.model.apply({"params": self.params}, *args, method=method, **kwargs)

  def patch_tokens(
    self, images: jax.Array, layers: Sequence[int] = (-1,), norm: bool = False,
    project: bool = False,
  ) -> dict[int, jax.Array]:  # fmt: skip
    """{layer: (B, h, w, C)} outputs of image blocks `layers` (the class token left out);
    `norm`: through `ln_post`; `project`: through `ln_post` and `proj` (C = embed_dim)."""
    depth = self.model.vision_layers
    layers = tuple(depth + i if i < 0 else i for i in layers)
    layers = _check_layers(layers, depth, f"this CLIP's image tower ({depth} blocks)")
    blocks = self._apply("image_blocks", images, max(layers))
    patch = self.model.patch_size
    rows, cols = images.shape[1] // patch, images.shape[2] // patch
    out = {}
    for layer in layers:
      tokens = blocks[layer][:, 1:]
      if project or norm:
        tokens = self._apply("image_project" if project else "image_norm", tokens)
      out[layer] = tokens.reshape(tokens.shape[0], rows, cols, -1)
    return out

  def encode_image(self, images: jax.Array) -> jax.Array:
    """(B, embed_dim) embeddings of NHWC float32 images normalised with CLIP's mean and
    std (`clip.normalize`); any size whose sides are multiples of the patch size."""
    return self._apply("encode_image", images)

  def encode_text(self, texts) -> jax.Array:
    """(N, embed_dim) embeddings of prompts (a str or a sequence of str, tokenized here;
    '' is a valid prompt) or of token ids ((N, L) integers, L <= the context)."""
    if isinstance(texts, str) or (
      isinstance(texts, Sequence) and texts and all(isinstance(t, str) for t in texts)
    ):
      ids = self.tokenizer(texts)
    else:
      ids = texts
    return self._apply("encode_text", clip.check_ids(ids, self.model.vocab_size))


@dataclasses.dataclass(frozen=True)
class ResNetFeatures:
  """A torchvision-layout ResNet and its variables (`resnet.ResNet`)."""

  model: resnet.ResNet
  params: Any  # {"params", "batch_stats"}

  num_layers = 4

  def patch_tokens(self, images: jax.Array, layers: Sequence[int] = (1, 2)) -> dict[int, jax.Array]:
    """{stage: (B, h, w, C)} feature maps of stages `layer1` .. `layer4` (0 .. 3)."""
    layers = _check_layers(layers, 4, "a ResNet (stages layer1 to layer4)")
    stages = self.model.apply(self.params, images, stages=tuple(f"layer{i + 1}" for i in layers))
    return {i: stages[f"layer{i + 1}"] for i in layers}


@dataclasses.dataclass(frozen=True)
class MaeFeatures:
  """An MAE's encoder as a feature network (every patch visible)."""

  model: Any  # vit_mae.MaskedAutoencoder
  params: Any

  @property
  def num_layers(self) -> int:
    return self.model.depth

  def patch_tokens(self, images: jax.Array, layers: Sequence[int] = (-1,)) -> dict[int, jax.Array]:
    """{layer: (B, h, w, D)} encoder block outputs (the class token left out)."""
    depth = self.model.depth
    layers = _check_layers(
      tuple(depth + i if i < 0 else i for i in layers), depth, f"this MAE ({depth} blocks)"
    )
    blocks = self.model.apply({"params": self.params}, images, max(layers), method="block_tokens")
    grid = self.model.grid_size
    return {i: blocks[i][:, 1:].reshape(images.shape[0], grid, grid, -1) for i in layers}


def load(
  name: str,
  checkpoint: str | os.PathLike | None = None,
  *,
  dtype: Any = jnp.float32,
  attention: str = "auto",
  cache_dir: str | os.PathLike | None = None,
  key: jax.Array | None = None,
):
  """A feature network by name: `dinov2_vits14` ... `dinov2_vitg14_reg` (and the tiny
  `dinov2_test`, `dinov2_test_reg`), `mae_vit_base`, `mae_vit_large`, `mae_vit_huge`
  (`mae_<variant>` with checkpoint='random', e.g. `mae_test`), `resnet18`, `resnet50`,
  `wide_resnet50_2` (and the other `resnet.VARIANTS`), `clip_vit_b16`, `clip_vit_l14`,
  `clip_vit_l14_336` (and the tiny `clip_test`).

  Args:
    name: the architecture.
    checkpoint: the weights: a known name, a file (or a Hugging Face folder for DINOv2
      and CLIP),
      or 'random' (initialised from `key`); default: `name` itself, a known public
      checkpoint.
    dtype, attention: compute dtype and attention implementation (ViTs).
    cache_dir: the download cache.

  Raises:
    ValueError: an unknown architecture.
    CheckpointError: the checkpoint cannot be read or is of another architecture (the
      message says what was expected and what was found).
  """
  checkpoint = os.fspath(checkpoint) if checkpoint is not None else name
  key = jax.random.key(0) if key is None else key
  if name.startswith("dinov2_"):
    variant = name.removeprefix("dinov2_")
    if variant not in dinov2.VARIANTS:
      known = ", ".join(f"dinov2_{v}" for v in dinov2.VARIANTS)
      raise ValueError(f"Unknown DINOv2 {name!r}; choose one of {known}.")
    if checkpoint == RANDOM:
      model = dinov2.create(variant, dtype=dtype, attention=attention)
      return DinoV2Features(model, dinov2.init_params(model, key))
    from maeday_jax.models import dinov2_import

    expected = dinov2.architecture(dinov2.create(variant))
    state, arch, source = dinov2_import.read_checkpoint(checkpoint, cache_dir)
    _check_architecture(name, source, expected, arch)
    arch["num_heads"] = expected["num_heads"]  # Not in the shapes: the variant's.
    model, params = dinov2_import.build(state, arch, source, dtype=dtype, attention=attention)
    return DinoV2Features(model, params)
  if name.startswith("clip_"):
    return _load_clip(name, checkpoint, dtype, attention, cache_dir, key)
  if name in resnet.VARIANTS:
    if checkpoint == RANDOM:
      model = resnet.create(name)
      return ResNetFeatures(model, resnet.init_variables(model, key))
    from maeday_jax.models import resnet_import

    model, variables = resnet_import.load_backbone(checkpoint, cache_dir=cache_dir, dtype=dtype)
    return ResNetFeatures(model, variables)
  if name.startswith("mae_"):
    from maeday_jax.models import mae_import, vit_mae

    if checkpoint == RANDOM:
      variant = name.removeprefix("mae_")
      if variant not in vit_mae.VARIANTS:
        raise ValueError(
          f"Unknown MAE {name!r}; choose mae_<variant> of {sorted(vit_mae.VARIANTS)}."
        )
      model = vit_mae.create(variant, dtype=dtype, attention=attention)
      return MaeFeatures(model, vit_mae.init_params(model, key))
    model, params = mae_import.load_mae(
      checkpoint, dtype=dtype, attention=attention, cache_dir=cache_dir
    )
    return MaeFeatures(model, params)
  raise ValueError(
    f"Unknown feature network {name!r}: dinov2_* ({', '.join(dinov2.VARIANTS)}), mae_* "
    f"(mae_vit_base, mae_vit_large, mae_vit_huge, mae_test, ...), clip_* "
    f"({', '.join(clip.VARIANTS)}) or a ResNet ({', '.join(resnet.VARIANTS)})."
  )


def _load_clip(name, checkpoint, dtype, attention, cache_dir, key) -> ClipFeatures:
  variant = name.removeprefix("clip_")
  if variant not in clip.VARIANTS:
    known = ", ".join(f"clip_{v}" for v in clip.VARIANTS)
    raise ValueError(f"Unknown CLIP {name!r}; choose one of {known}.")
  if checkpoint == RANDOM:
    model = clip.create(variant, dtype=dtype, attention=attention)
    return ClipFeatures(model, clip.init_params(model, key))
  from maeday_jax.models import clip_import

  expected = clip.architecture(clip.create(variant))
  state, arch, source, folder = clip_import.read_checkpoint(checkpoint, cache_dir)
  fields = ("image_size", "patch_size", "vision_width", "vision_layers", "embed_dim")
  _check_architecture(name, source, expected, arch, fields + ("text_width", "text_layers"))
  if folder is None:  # Not in the shapes, and no config: the variant's.
    for field in ("vision_heads", "text_heads", "activation"):
      arch[field] = expected[field]
  model, params = clip_import.build(state, arch, source, dtype=dtype, attention=attention)
  return ClipFeatures(model, params, None if folder is None else str(folder))


_DINOV2_FIELDS = ("patch_size", "embed_dim", "depth", "ffn", "num_register_tokens")


def _check_architecture(
  name: str, checkpoint: str, expected: dict, found: dict, fields=_DINOV2_FIELDS
) -> None:
  from maeday_jax.weight_files.errors import CheckpointError

  wrong = {f: (expected[f], found[f]) for f in fields if expected[f] != found[f]}
  if wrong:
    shown = ", ".join(f"{f} expected {e}, found {v}" for f, (e, v) in wrong.items())
    raise CheckpointError(f"{checkpoint}: not a {name} checkpoint ({shown}).")


def _families() -> dict:
  from maeday_jax.models import vit_mae

  return {
    "mae": (MaeFeatures, vit_mae.MaskedAutoencoder),
    "dinov2": (DinoV2Features, dinov2.DinoV2),
    "resnet": (ResNetFeatures, resnet.ResNet),
    "clip": (ClipFeatures, clip.CLIP),
  }


_RUNTIME_FIELDS = ("parent", "name", "dtype", "attention")


def describe(net) -> dict:
  """A JSON-able description of a loaded network's architecture (`rebuild` reads it):
  its family and its module's fields, whatever weights it was loaded from."""
  for family, (wrapper, _) in _families().items():
    if isinstance(net, wrapper):
      fields = {
        f.name: getattr(net.model, f.name)
        for f in dataclasses.fields(net.model)
        if f.name not in _RUNTIME_FIELDS
      }
      return {"family": family, "fields": fields}
  raise ValueError(f"{type(net).__name__} is not a network of `models.load`.")


def rebuild(description: dict, params, dtype: Any = jnp.float32, attention: str = "auto"):
  """The network `describe` described, with `params` (e.g. from a detector artifact)."""
  wrapper, module = _families()[description["family"]]
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in description["fields"].items()}
  names = {f.name for f in dataclasses.fields(module)}
  runtime = {"dtype": dtype, **({"attention": attention} if "attention" in names else {})}
  return wrapper(module(**fields, **runtime), params)
