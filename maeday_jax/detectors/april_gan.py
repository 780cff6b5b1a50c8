"""APRIL-GAN (VAND 2023 winner): CLIP with one trained linear adapter per layer.

Zero-shot: the text features `F_t` and the image score are `clip_zero_shot`'s. The maps
take the raw outputs of the blocks `clip.layers` (ViT-L/14-336: 5, 11, 17, 23), each
through its own linear adapter (width -> the joint space; the only trained parameters,
CLIP frozen) and compare them with `F_t`; the per-layer abnormal probabilities
(logits upsampled bilinearly, align_corners=True, then softmaxed) are summed.

Training (`fit`): focal (gamma 2) + Dice loss of every layer's map against the masks of
an AUXILIARY dataset (`april_gan.aux_data`: the method trains on VisA's test set to
evaluate MVTec AD and the reverse), Adam (lr 1e-3, betas 0.5, 0.999 as the released
code), each aux image prompted with its own category's name. It is refused when the aux
source has no masks, and when it is the dataset being evaluated unless
`april_gan.allow_same_dataset` (then the record says `"zero_shot": false`).

Mosaic (`april_gan.mosaic_prob`, `mosaic_probability`): with that probability a training
sample is replaced, on the host, by four images of its category (drawn with replacement)
and their masks tiled 2 x 2 and shrunk back to the input size (2 x 2 box means; a mask
pixel is a defect where more than half of its 4 source pixels are), as the released code
does on MVTec AD (probability 0.2). Which samples and images: a pure function of the seed
and the step, like the batch order (`inputs.batch_indices`).

Resumable (`april_gan.checkpoint_every`): with a work directory (the fit job's
`<workdir>/training`), the adapters' training state is saved with Orbax under
`april_gan/checkpoints` every that many steps and at the end; a rerun of the same fit
resumes from the newest checkpoint (refused when its seed differs) and, the batches being
a function of (seed, step), ends with the adapters an uninterrupted run gets.

Few-shot (`april_gan.few_shot`, the fit job's `--config.shots=k`): per layer, a memory
bank of the shots' raw patch tokens; the map adds, per layer, every patch's cosine
distance to its nearest bank token (upsampled the same way), the image score adds the
map's maximum. No adapter is fine-tuned on the shots.

Not `trains_on_sources`: that flag makes the fit job skip the shots and take several
categories at once (the training data being `config.data`), while this detector trains on
its own `aux_data` and keeps one category's shots; `config.data` (`normals.data`) only
tells it which dataset is evaluated.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from maeday_jax.config_errors import ConfigError, require
from maeday_jax.detectors import clip_zero_shot as zs
from maeday_jax.settings import clip as clip_settings
from maeday_jax.settings.data import training_source

log = logging.getLogger("maeday_jax")
_PUBLIC = ("mvtec_ad", "visa")  # One dataset whatever the copy or its path.


def aux_source(section, data):
  """The aux data source: `aux_data`, or for an empty name the evaluated `data`'s test
  split."""
  aux = section.aux_data
  if aux.name:
    return aux
  require(data is not None, "april_gan.aux_data.name", "is empty and no data is evaluated.")
  fields = {k: v for k, v in data.to_dict().items() if k != "splits"}
  return training_source(aux.get("splits") or "test", **fields)


def same_dataset(aux, data) -> bool:
  """Whether the aux source is the evaluated dataset (public ones by name; folders and
  magnetic tiles by their resolved path)."""
  if data is None or aux.name != data.name:
    return False
  if aux.name in _PUBLIC:
    return True

  def where(source):
    return os.path.realpath(os.path.expanduser(str(source.path)))

  return where(aux) == where(data)


def check_aux(section, data) -> bool:
  """Checks `april_gan.aux_data` (`aux_source`) against the evaluated `data`; returns
  whether the fit stays zero-shot.

  Raises:
    ConfigError: a folder without masks, or the evaluated dataset without
      `allow_same_dataset`.
  """
  aux = aux_source(section, data)
  require(
    aux.name != "folder" or bool(aux.get("mask_path")),
    "april_gan.aux_data.mask_path",
    "is empty: the adapters learn from defect masks; give the folder of masks paired with "
    "aux_data.path (or use a dataset with masks, e.g. visa or mvtec_ad).",
  )
  same = same_dataset(aux, data)
  require(
    not same or bool(section.allow_same_dataset),
    "april_gan.aux_data",
    f"is the dataset being evaluated ({aux.name}): training on it is not zero-shot. Train "
    "on another dataset (VisA for MVTec AD and the reverse), or set "
    "--config.april_gan.allow_same_dataset=true (the record then says not zero-shot).",
  )
  return not same


def load_masked(aux, size: int, num_workers: int = 4):
  """(uint8 images (N, S, S, 3), uint8 masks (N, S, S), category index (N,), categories)
  of every image of the aux source's categories and splits.

  Raises:
    ConfigError: the source holds no defect mask at all.
  """
  import numpy as np

  from maeday_jax import data
  from maeday_jax.pretrain import inputs

  images, masks, index, names = [], [], [], []
  for source in inputs.training_sources([aux]):
    if source.category not in names:
      names.append(source.category)
    split = data.load_split(source.data_config, source.category, source.split)
    for batch in data.batches(
      split, 32, size, shard_index=0, shard_count=1, num_workers=num_workers
    ):
      keep = batch["valid"]
      images.append(data.denormalize(batch["image"][keep]))
      masks.append(batch["mask"][keep])
      index.append(np.full(int(keep.sum()), names.index(source.category), np.int32))
  masks = np.concatenate(masks) if masks else np.zeros((0, size, size), np.uint8)
  if not masks.any():
    raise ConfigError(
      f"--config.april_gan.aux_data: {aux.name} ({aux.path or 'default path'}, splits "
      f"{aux.splits}) has no defect masks; the adapters learn from masked defects."
    )
  return np.concatenate(images), masks, np.concatenate(index), names


def init_adapters(key, stages: int, width: int, dim: int) -> dict:
  """{"kernel" (stages, width, dim), "bias" (stages, dim)}: PyTorch's `nn.Linear` init."""
  import jax

  bound = width**-0.5
  k1, k2 = jax.random.split(key)
  return {
    "kernel": jax.random.uniform(k1, (stages, width, dim), minval=-bound, maxval=bound),
    "bias": jax.random.uniform(k2, (stages, dim), minval=-bound, maxval=bound),
  }


def stage_logits(adapters, tokens: dict, layers, text, scale, size):
  """Per layer, the (B, H, W, 2) upsampled logits of the adapted raw tokens."""
  import jax

  return [
    zs.upsampled_logits(
      jax.numpy.matmul(tokens[layer], adapters["kernel"][s], precision=jax.lax.Precision.HIGHEST)
      + adapters["bias"][s],
      text,
      scale,
      size,
    )
    for s, layer in enumerate(layers)
  ]


def adapter_loss(adapters, net, layers, images, masks, text, scale):
  """Sum over layers of focal (gamma 2) + Dice loss of the maps against `masks`; `images`
  uint8 (B, S, S, 3), `text` (B, 2, C) per image. CLIP gets no gradient."""
  import jax

  from maeday_jax.models import clip
  from maeday_jax.objectives import losses

  tokens = jax.lax.stop_gradient(net.patch_tokens(clip.normalize(images), layers=layers))
  total = 0.0
  for logits in stage_logits(adapters, tokens, layers, text, scale, tuple(images.shape[1:3])):
    # focal_loss wants channel 0 = anomaly; the logits are (normal, abnormal).
    total += losses.focal_loss(logits[..., ::-1], masks, gamma=2.0)
    total += losses.dice_loss(jax.nn.softmax(logits, axis=-1)[..., 1], masks)
  return total


MOSAIC_PROB_MVTEC = 0.2  # The released code's `aug_rate` when it trains on MVTec AD.
CHECKPOINT_DIR = "april_gan/checkpoints"  # Under the fit's work directory.
_MOSAIC_STREAM = 0x6D6F73  # Keeps the mosaic draws apart from the batch order's.


def mosaic_probability(section) -> float:
  """`april_gan.mosaic_prob`, its default (-1) resolved: 0.2 when the aux data is MVTec AD
  (the method's recipe), else 0 (the released code mosaics VisA never)."""
  prob = float(section.get("mosaic_prob", -1.0))
  if prob < 0:
    return MOSAIC_PROB_MVTEC if section.aux_data.name == "mvtec_ad" else 0.0
  return prob


def mosaic(images, masks):
  """One 2 x 2 mosaic of four uint8 images (4, S, S, 3) and {0, 1} masks (4, S, S): image 0
  top left, 1 top right, 2 bottom left, 3 bottom right, shrunk to (S, S) by 2 x 2 box
  means (even S); a mask pixel is 1 where more than half of its 4 pixels are."""
  import numpy as np

  size = images.shape[1]
  if size % 2:
    raise ValueError(f"a mosaic needs an even input size, got {size}.")

  def shrink(tiles):  # (4, S, S, ...) -> (S, S, ...): 2 x 2 tiles, box-averaged.
    top, bottom = (np.concatenate([tiles[i], tiles[i + 1]], axis=1) for i in (0, 2))
    whole = np.concatenate([top, bottom], axis=0).astype(np.float64)
    half = whole.reshape(size, 2, size, 2, *whole.shape[2:])
    return half.mean(axis=(1, 3))

  image = np.clip(np.rint(shrink(images)), 0, 255).astype(np.uint8)
  return image, (shrink(masks) > 0.5).astype(masks.dtype)


def mosaic_batch(images, masks, groups, rows, prob: float, seed: int, step: int):
  """The batch `images[rows]`, `masks[rows]`, each sample replaced with probability
  `prob` by a `mosaic` of 4 images of its group (`groups`: the category index per
  image), drawn with replacement. A pure function of (seed, step); `prob` 0: the
  batch as it is, no random draw."""
  import numpy as np

  batch_images, batch_masks = images[rows], masks[rows]
  if prob <= 0:
    return batch_images, batch_masks
  batch_images, batch_masks = batch_images.copy(), batch_masks.copy()
  rng = np.random.default_rng([int(seed), int(step), _MOSAIC_STREAM])
  chosen = rng.random(len(rows)) < prob
  for i in np.flatnonzero(chosen):
    members = np.flatnonzero(groups == groups[rows[i]])
    picks = rng.choice(members, 4, replace=True)
    batch_images[i], batch_masks[i] = mosaic(images[picks], masks[picks])
  return batch_images, batch_masks


def train_adapters(
  net, layers, images, masks, texts, scale, section, key, groups=None, workdir=None
):
  """Adapters trained on (images, masks), each image prompted with `texts[i]` (N, 2, C);
  returns (adapters, losses of this run's steps, the step it resumed from).

  `groups`: each image's category index (mosaics tile one category's images; None: one
  category). `workdir`: where the resumable checkpoints go (`CHECKPOINT_DIR`; None: no
  checkpoints, `april_gan.checkpoint_every` 0 neither).

  Raises:
    FloatingPointError: the loss diverged.
    ValueError: the checkpoints there are another run's (seed or shapes).
  """
  import dataclasses
  import pathlib

  import jax
  import numpy as np
  import optax

  from maeday_jax import training
  from maeday_jax.pretrain import inputs

  batch = int(section.batch_size)
  steps = int(section.steps) or int(section.epochs) * inputs.steps_per_epoch(len(images), batch)
  width, dim = net.model.vision_width, net.model.embed_dim
  optimizer = optax.adam(float(section.lr), b1=float(section.betas[0]), b2=float(section.betas[1]))
  state = training.init_state(init_adapters(key, len(layers), width, dim), optimizer)
  groups = np.zeros(len(images), np.int32) if groups is None else np.asarray(groups)
  prob = mosaic_probability(section)
  every = int(section.get("checkpoint_every", 0))
  manager, start, key_data = None, 0, np.asarray(jax.random.key_data(key))
  if workdir is not None and every > 0:
    manager = training.checkpoint_manager(pathlib.Path(workdir) / CHECKPOINT_DIR, max_to_keep=2)
    start = int(manager.latest_step() or 0)
    if start > steps:
      raise ValueError(
        f"{manager.directory}: a checkpoint at step {start}, beyond this fit's {steps} "
        "steps: it is another run's; use a new workdir."
      )
    if start:
      state = training.restore(manager, start, state, key_data)
      log.info("april_gan: resumed the adapters' training at step %d/%d", start, steps)

  @jax.jit
  def step(state, params, images, masks, text):
    frozen = dataclasses.replace(net, params=params)
    loss, grads = jax.value_and_grad(adapter_loss)(
      state["params"], frozen, layers, images, masks, text, scale
    )
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

  history, seed = [], int(jax.random.randint(key, (), 0, 2**31 - 1))
  for t in range(start, steps):
    rows = inputs.batch_indices(len(images), batch, t, seed)
    batch_images, batch_masks = mosaic_batch(images, masks, groups, rows, prob, seed, t)
    state, loss = step(state, net.params, batch_images, batch_masks, texts[rows])
    history.append(float(loss))
    if not np.isfinite(history[-1]):
      raise FloatingPointError(f"april_gan adapter training diverged at step {t} (loss {loss}).")
    if t % int(section.log_every) == 0 or t == steps - 1:
      log.info("april_gan step %d/%d: loss %.4f", t + 1, steps, history[-1])
    if manager is not None and ((t + 1) % every == 0 or t == steps - 1):
      training.save(manager, t + 1, state, key_data)
  if manager is not None:
    manager.close()
  return state["params"], history, start


def shot_banks(model, layers, params, shots):
  """(stages, K * h * w, width) L2-normalised raw patch tokens of the shots, through the
  CLIP `model` with `params`, at `layers`."""
  import jax.numpy as jnp

  from maeday_jax import nearest_neighbors
  from maeday_jax.models import features

  net = features.ClipFeatures(model, params)
  tokens = net.patch_tokens(zs.imagenet_to_clip(shots), layers=layers)
  return jnp.stack(
    [nearest_neighbors.l2_normalize(tokens[i]).reshape(-1, tokens[i].shape[-1]) for i in layers]
  )


@functools.cache
def _compiled_banks(model, layers: tuple[int, ...]):
  """`shot_banks` jitted once per CLIP and layers for the whole process: each category's
  few-shot fit reuses its compilation."""
  import jax

  return jax.jit(functools.partial(shot_banks, model, layers))


class AprilGan(zs.ClipZeroShot):
  """CLIP + per-layer linear adapters trained on an auxiliary masked dataset (+ shots)."""

  method = "april_gan"
  summary = "APRIL-GAN: CLIP + linear adapters trained on another dataset's masks"
  SECTIONS = {"clip": clip_settings.clip_section, "april_gan": clip_settings.april_gan_section}

  def __init__(self, settings):
    super().__init__(settings)
    self.zero_shot = True
    self.aux: dict = {}  # The aux source the adapters were trained on.
    self.training: dict = {}

  @classmethod
  def validate(cls, config) -> None:
    zs.check_clip_section(config.clip)
    section = config.april_gan
    from maeday_jax.data import DATASETS

    require(
      section.aux_data.name in ("", *DATASETS),
      "april_gan.aux_data.name",
      f"{section.aux_data.name!r}: choose one of {', '.join(DATASETS)} ('' = the evaluated "
      "dataset's test split, with allow_same_dataset).",
    )
    check_aux(section, config.get("data"))
    require(section.batch_size >= 1, "april_gan.batch_size", "must be >= 1.")
    require(section.lr > 0, "april_gan.lr", "must be > 0.")
    require(section.steps > 0 or section.epochs > 0, "april_gan.epochs", "and steps are both 0.")
    require(section.chunk_size >= 1, "april_gan.chunk_size", "must be >= 1.")
    require(section.log_every >= 1, "april_gan.log_every", "must be >= 1.")
    prob = float(section.get("mosaic_prob", -1.0))
    require(
      prob == -1.0 or 0.0 <= prob <= 1.0,
      "april_gan.mosaic_prob",
      f"{prob}: give a probability in [0, 1], or -1 for the recipe's (0.2 on MVTec AD, else 0).",
    )
    every = int(section.get("checkpoint_every", 0))
    require(every >= 0, "april_gan.checkpoint_every", "must be >= 0 (0: no checkpoints).")

  def requires_shots(self) -> bool:
    return bool(self.settings.april_gan.few_shot)

  def fit(self, normals, key) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    section = self.settings.april_gan
    if normals.data is None:
      raise ConfigError(
        "--config.detector=april_gan trains adapters on --config.april_gan.aux_data: fit it "
        "first with configs/fit.py and score with its <workdir>/detector folder."
      )
    self.zero_shot = check_aux(section, normals.data)
    if not self.zero_shot:
      log.warning("april_gan trains on the evaluated dataset: its results are NOT zero-shot.")
    if self._net is None:
      self.build()
    key = jax.random.key(self.settings.seed) if key is None else key
    aux = aux_source(section, normals.data)
    self.aux = {k: aux.get(k) for k in ("name", "path", "categories", "splits", "mask_path")}
    images, masks, index, names = load_masked(aux, self.input_size, int(aux.num_workers))
    # Each aux image is prompted with its category's name, as the released training does;
    # a folder's pseudo-category is no name: it keeps `clip.class_name`.
    default = str(self.settings.clip.class_name).strip()
    names = [n.replace("_", " ") if aux.name in _PUBLIC else default for n in names]
    texts = np.stack([np.asarray(zs.text_features(self._net, n)) for n in names])[index]
    adapters, history, start = train_adapters(
      self._net,
      self.layers,
      images,
      masks,
      texts,
      self.state["scale"],
      section,
      key,
      groups=index,
      workdir=normals.workdir,
    )
    self.training = {"steps": start + len(history), "images": len(images)}
    self.training["mosaic_prob"] = mosaic_probability(section)
    if start:
      self.training["resumed_from_step"] = start
    if history:
      self.training.update(first_loss=history[0], last_loss=history[-1])
    self.state = {**self.state, "adapters": adapters}
    if section.few_shot:
      shots, _ = normals.images(self.input_size)
      if len(shots) == 0:
        raise ConfigError("--config.april_gan.few_shot: no shots; set --config.shots=k >= 1.")
      banks = _compiled_banks(self._net.model, self.layers)
      self.state["banks"] = banks(self.state["clip"], jnp.asarray(shots))

  def step_signature(self):
    chunk = int(self.settings.april_gan.chunk_size)
    return (self.method, self._net.model, self.layers, "banks" in self.state, chunk)

  def score_function(self, mesh, local_batch: int):
    import jax
    import jax.numpy as jnp

    from maeday_jax import memory_budget, nearest_neighbors

    layers, chunk = self.layers, int(self.settings.april_gan.chunk_size)
    if "banks" in self.state:  # The search holds (local patches x chunk) float32 distances.
      patches = (self.input_size // self._net.model.patch_size) ** 2
      memory_budget.require_fits(
        f"{local_batch} images per device at {self.input_size} px, chunks of {chunk} bank rows",
        4 * local_batch * patches * min(chunk, int(self.state["banks"].shape[1])),
        "april_gan.chunk_size",
        mesh.devices.flat[0],
      )

    def score(state, images, ids, key):
      del ids, key  # Deterministic.
      net, size = self._with(state["clip"]), tuple(images.shape[1:3])
      images = zs.imagenet_to_clip(images)
      tokens = net.patch_tokens(images, layers=layers)
      logits = stage_logits(state["adapters"], tokens, layers, state["text"], state["scale"], size)
      maps = sum(jax.nn.softmax(x, axis=-1)[..., 1] for x in logits)
      scores = zs.image_probability(net, images, state["text"], state["scale"])
      if "banks" in state:
        for s, layer in enumerate(layers):
          batch, rows, cols, width = tokens[layer].shape
          queries = nearest_neighbors.l2_normalize(tokens[layer]).reshape(-1, width)
          d2, _ = nearest_neighbors.k_nearest(queries, state["banks"][s], 1, chunk)
          # |a - b|^2 = 2 - 2 cos for unit vectors: the cosine distance is half of it.
          distance = jnp.clip(d2[:, 0] / 2.0, 0.0, 2.0).reshape(batch, rows, cols, 1)
          maps = maps + zs.upsample_corners(distance, size)[..., 0]
        scores = scores + jnp.max(maps, axis=(1, 2))
      return maps, scores

    return score

  def record(self) -> dict:
    return {
      **super().record(),
      "zero_shot": self.zero_shot,
      "aux_data": self.aux,
      "few_shot": "banks" in self.state,
      "training": self.training,
    }

  def restore(self, record: dict, state: Any) -> None:
    super().restore(record, state)
    self.zero_shot = bool(record.get("zero_shot", True))
    self.aux = dict(record.get("aux_data", {}))
    self.training = dict(record.get("training", {}))
