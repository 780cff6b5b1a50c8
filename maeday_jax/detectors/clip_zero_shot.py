"""Text-prompted zero-shot detection with CLIP (WinCLIP-style, no adapters, no training).

The prompts cross state-level phrases (normal: "flawless {}", abnormal: "damaged {}", ...,
with `clip.class_name`) with CLIP ImageNet templates that suit inspection ("a close-up
photo of a {}.", ...): APRIL-GAN's lists. Each prompt's text embedding is L2-normalised,
averaged per state and normalised again -> `F_t` (2, C), rows (normal, abnormal),
computed once when the detector is built and kept in its state (and artifact).

  image score  softmax(logit_scale * unit(f_img) . F_t^T)[abnormal]
  map          for each of `clip.layers`: the patch tokens through `ln_post` and `proj`
               (the joint space), L2-normalised, logits logit_scale * t . F_t^T,
               upsampled to the input (bilinear, align_corners=True) and softmaxed
               (APRIL-GAN's order: the logits are interpolated, then normalised); the
               abnormal probability, averaged over the layers.

It needs no image of the product at all, but CLIP's intermediate tokens were never trained
to match text: its maps are coarse. `april_gan` trains one linear adapter per layer on an
auxiliary dataset with masks and is the stronger choice when such data exists.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from maeday_jax.config_errors import require
from maeday_jax.detectors import weights_ref
from maeday_jax.detectors.base import Detector
from maeday_jax.settings import clip as clip_settings

log = logging.getLogger("maeday_jax")

# APRIL-GAN's prompt ensemble (prompt_ensemble.py of the released code).
NORMAL_STATES = (
  "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
  "{} without damage",
)  # fmt: skip
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
  "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
  "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.",
  "a photo of my {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
  "a black and white photo of the {}.", "a bright photo of the {}.",
  "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
  "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
  "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.",
  "a photo of a large {}.", "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.",
  "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
  "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
  "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
  "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)  # fmt: skip


def prompts(class_name: str) -> tuple[list[str], list[str]]:
  """(normal, abnormal) prompts: every state phrase in every template."""
  return tuple(
    [template.format(state.format(class_name)) for state in states for template in TEMPLATES]
    for states in (NORMAL_STATES, ABNORMAL_STATES)
  )


@functools.cache
def _text_encoder(model):
  """One compiled text pass per CLIP (eager Flax would run each op separately; a fit
  encodes the prompts of every aux category)."""
  import jax

  return jax.jit(lambda params, ids: model.apply({"params": params}, ids, method="encode_text"))


def text_features(net, class_name: str):
  """F_t (2, C): the normalised mean of the normalised embeddings of each state's prompts."""
  import jax.numpy as jnp

  from maeday_jax.models import clip
  from maeday_jax.nearest_neighbors import l2_normalize

  normal, abnormal = prompts(class_name)
  ids = clip.check_ids(net.tokenizer(normal + abnormal), net.model.vocab_size)
  embeddings = l2_normalize(_text_encoder(net.model)(net.params, ids))
  states = (embeddings[: len(normal)], embeddings[len(normal) :])
  return jnp.stack([l2_normalize(jnp.mean(e, axis=0)) for e in states])


def imagenet_to_clip(images):
  """ImageNet-normalised images (the detectors' input) -> CLIP's normalisation."""
  import jax.numpy as jnp

  from maeday_jax.imagenet import IMAGENET_MEAN, IMAGENET_STD
  from maeday_jax.models import clip

  pixels = images * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN)
  return (pixels - jnp.asarray(clip.MEAN)) / jnp.asarray(clip.STD)


def upsample_corners(x, size: tuple[int, int]):
  """(B, h, w, C) -> (B, H, W, C), torch's bilinear `interpolate(align_corners=True)`."""
  import numpy as np

  def taps(n_in, n_out):
    src = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, 1.0 - lam, lam

  h0, h1, hw0, hw1 = taps(x.shape[1], size[0])
  w0, w1, ww0, ww1 = taps(x.shape[2], size[1])
  x = x[:, :, w0] * ww0[:, None] + x[:, :, w1] * ww1[:, None]
  return x[:, h0] * hw0[:, None, None] + x[:, h1] * hw1[:, None, None]


def upsampled_logits(joint_tokens, text, scale, size: tuple[int, int]):
  """(B, H, W, 2) similarity logits of tokens in the joint space (B, h, w, C) with `text`
  ((2, C), or (B, 2, C) per image), scaled, upsampled to `size` (before any softmax)."""
  import jax
  import jax.numpy as jnp

  from maeday_jax.nearest_neighbors import l2_normalize

  text = jnp.broadcast_to(text, (joint_tokens.shape[0], *text.shape[-2:]))
  logits = scale * jnp.einsum(
    "bhwc,bkc->bhwk", l2_normalize(joint_tokens), text, precision=jax.lax.Precision.HIGHEST
  )
  return upsample_corners(logits, size)


def abnormal_map(joint_tokens, text, scale, size: tuple[int, int]):
  """(B, H, W) abnormal probability: the softmax of `upsampled_logits`."""
  import jax

  return jax.nn.softmax(upsampled_logits(joint_tokens, text, scale, size), axis=-1)[..., 1]


def image_probability(net, images, text, scale):
  """(B,) softmax(scale * unit(f_img) . F_t^T)[abnormal] of CLIP-normalised images."""
  import jax

  from maeday_jax.nearest_neighbors import l2_normalize

  return jax.nn.softmax(scale * l2_normalize(net.encode_image(images)) @ text.T, axis=-1)[:, 1]


def check_clip_section(section, field: str = "clip") -> None:
  """Checks a `clip_section` before anything is loaded.

  Raises:
    ConfigError: naming the field.
  """
  require(int(section.image_size) >= 1, f"{field}.image_size", "must be >= 1.")
  require(bool(tuple(section.layers)), f"{field}.layers", "give at least one layer.")
  require(
    bool(str(section.class_name).strip()),
    f"{field}.class_name",
    "is empty; name the object (e.g. bottle) or keep the default 'object'.",
  )


class ClipZeroShot(Detector):
  """CLIP text-prompt similarity of the image and its patch tokens (training-free)."""

  method = "clip_zero_shot"
  summary = "CLIP zero-shot: patch tokens vs. normal/abnormal prompts (no training)"
  SECTIONS = {"clip": clip_settings.clip_section}

  def __init__(self, settings):
    super().__init__(settings)
    self._net = None
    self._weights: weights_ref.PublicWeights | None = None

  @classmethod
  def validate(cls, config) -> None:
    check_clip_section(config.clip)

  @property
  def input_size(self) -> int:
    return int(self.settings.clip.image_size)

  @property
  def layers(self) -> tuple[int, ...]:
    """The chosen layers, 0-based and checked against the loaded CLIP."""
    from maeday_jax.config_errors import ConfigError

    depth = self._net.num_layers
    layers = tuple(depth + int(i) if int(i) < 0 else int(i) for i in self.settings.clip.layers)
    if any(not 0 <= i < depth for i in layers):
      raise ConfigError(f"--config.clip.layers: {layers}; this CLIP has layers 0 to {depth - 1}.")
    return layers

  def describe(self) -> str:
    return f"{self.method} ({self.settings.clip.backbone})"

  def build(self) -> None:
    """Loads CLIP and computes the prompts' text features (once: they are state)."""
    import jax

    from maeday_jax import models
    from maeday_jax.config_errors import ConfigError
    from maeday_jax.models import clip, features

    section = self.settings.clip
    checkpoint = section.checkpoint or section.backbone
    patch = clip.VARIANTS.get(section.backbone.removeprefix("clip_"), {}).get("patch_size", 1)
    if int(section.image_size) % patch:
      raise ConfigError(
        f"--config.clip.image_size: {section.image_size} is not a multiple of "
        f"{section.backbone}'s {patch}-px patches."
      )
    key = jax.random.key(self.settings.seed)
    if checkpoint == "random":
      log.warning("%s with a RANDOM CLIP: its figures are meaningless.", self.method)
      # With CLIP's full vocabulary: the tiny test variant's 512 ids cannot hold prompts.
      model = clip.create(section.backbone.removeprefix("clip_"), vocab_size=clip.VOCAB_SIZE)
      self._net = features.ClipFeatures(model, clip.init_params(model, key))
    else:
      self._net = models.load(section.backbone, checkpoint, key=key)
    self._weights = weights_ref.PublicWeights.of(checkpoint, "clip")
    _ = self.layers  # Checked now, before any scoring.
    text = text_features(self._net, str(section.class_name).strip())
    self.state = {"clip": self._net.params, "text": text, "scale": self._net.logit_scale}

  def fit(self, normals, key) -> None:
    del normals, key  # Zero-shot: the prompts are the only reference.
    if self._net is None:
      self.build()

  def _with(self, params):
    import dataclasses

    return dataclasses.replace(self._net, params=params)

  def step_signature(self):
    return (self.method, self._net.model, self.layers)

  def score_function(self, mesh, local_batch: int):
    import jax.numpy as jnp

    del mesh, local_batch
    layers = self.layers

    def score(state, images, ids, key):
      del ids, key  # Deterministic.
      net, size = self._with(state["clip"]), tuple(images.shape[1:3])
      images = imagenet_to_clip(images)
      tokens = net.patch_tokens(images, layers=layers, project=True)
      maps = [abnormal_map(tokens[i], state["text"], state["scale"], size) for i in layers]
      scores = image_probability(net, images, state["text"], state["scale"])
      return jnp.mean(jnp.stack(maps), axis=0), scores

    return score

  def saved_state(self) -> Any:
    return weights_ref.without_public(self.state, self._weights, "clip")

  def record(self) -> dict:
    from maeday_jax.models import clip

    return weights_ref.network_record(self._weights, clip.architecture(self._net.model))

  def restore(self, record: dict, state: Any) -> None:
    from maeday_jax.models import clip, features

    def wrap(architecture, params):
      return features.ClipFeatures(clip.CLIP(**architecture), params)

    self._weights, self._net, self.state = weights_ref.restore_network(
      record, state, "clip", self.settings.clip.backbone, wrap
    )
