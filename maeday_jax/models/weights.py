"""Known weights by name, and the one resolver from a name or a path to a local file.

    from maeday_jax.models import weights
    path = weights.resolve("wide_resnet50_2")    # downloaded once, its SHA-256 checked
    path = weights.resolve("/data/my_mae.pth")   # a path: checked to exist
    digest = weights.sha256_of(path)             # fingerprint of a file or a directory

`KNOWN` maps every name to a `Weights` entry: the URL, the expected SHA-256 (or the
SHA-256 prefix torchvision writes into its file names), the cached file's name and the
kind of network ('mae', 'backbone', 'dinov2', 'clip' or 'dvae'). Names download once into
the cache (`$MAEDAY_CACHE_DIR`, default `~/.cache/maeday_jax`; backbones in its `backbones/`
folder) through `maeday_jax.download.fetch`: resumed, size- and hash-checked, never kept
when corrupt. `known(kind, ...)` gives one kind's names as a live dict-like view
(`checkpoints.KNOWN_CHECKPOINTS`, `backbones.KNOWN_BACKBONES`): writing to a view writes
into `KNOWN`, so registering a name there makes `resolve` find it.

Only the standard library, `maeday_jax.download` and `maeday_jax.weight_files` (for
`CheckpointError`) are imported here, so every loader (`models.mae_import`,
`models.resnet_import`) can use this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

from maeday_jax import download
from maeday_jax.weight_files.errors import CheckpointError

__all__ = [
  "KINDS",
  "KNOWN",
  "CheckpointError",
  "Weights",
  "default_cache_dir",
  "discard_download",
  "is_known",
  "known",
  "resolve",
  "sha256_of",
]


@dataclasses.dataclass(frozen=True)
class Kind:
  """How the names of one kind of network are cached and explained.

  Attributes:
    label: what a path of this kind is called in messages ('Checkpoint').
    subdir: the cache sub-folder its downloads go to ('' for the cache root).
    loader: the Python loader named in the offline hint ('load_mae').
    option: a command-line option that takes a path instead, or None.
    directories: whether a local path may be a directory (converted Orbax MAEs).
  """

  label: str
  subdir: str
  loader: str
  option: str | None
  directories: bool


KINDS: dict[str, Kind] = {
  "mae": Kind("Checkpoint", "", "load_mae", "--config.model.checkpoint", True),
  "backbone": Kind("Backbone", "backbones", "load_backbone", None, False),
  "dinov2": Kind("DINOv2 checkpoint", "dinov2", "models.load", "--config.dinov2.checkpoint", True),
  "clip": Kind("CLIP checkpoint", "clip", "models.load", None, True),
  "dvae": Kind("dVAE encoder", "dvae", "dvae_import.load", None, False),
}


@dataclasses.dataclass(frozen=True)
class Weights:
  """One known name: where its file is published and what the file must look like.

  Attributes:
    url: http(s) or file URL.
    kind: a key of `KINDS` ('mae', 'backbone').
    sha256: the expected hex SHA-256 of the whole file, or None where none is published.
    sha256_prefix: the expected first hex digits of the SHA-256 (torchvision's file
      names carry them), or None.
    filename: the cached file's name; default the last part of the URL.
    size: the expected size in bytes, or None.
  """

  url: str
  kind: str
  _: dataclasses.KW_ONLY
  sha256: str | None = None
  sha256_prefix: str | None = None
  filename: str | None = None
  size: int | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Weights({self.url!r}): kind {self.kind!r} is not one of {list(KINDS)}")
    # RemoteFile checks and lower-cases the digests; keep its normalised values.
    remote = self.remote
    object.__setattr__(self, "sha256", remote.sha256)
    object.__setattr__(self, "sha256_prefix", remote.sha256_prefix)
    if self.filename is None:
      object.__setattr__(self, "filename", remote.filename)

  @property
  def remote(self) -> download.RemoteFile:
    """What `download.fetch` downloads and checks."""
    return download.RemoteFile(
      self.url, sha256=self.sha256, sha256_prefix=self.sha256_prefix, size=self.size
    )


def _torchvision(filename: str) -> Weights:
  url = "https://download.pytorch.org/models/" + filename
  return Weights(url, "backbone", sha256_prefix=download.sha256_prefix_from_name(url))


_MAE_URL = "https://dl.fbaipublicfiles.com/mae/visualize/"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/"
_HUGGINGFACE_URL = "https://huggingface.co/{}/resolve/main/model.safetensors"

KNOWN: dict[str, Weights] = {
  # The official pixel-target MAE checkpoints that include the decoder (no digest is
  # published for them; the download still checks the size the server announces).
  "mae_vit_base": Weights(_MAE_URL + "mae_visualize_vit_base.pth", "mae"),
  "mae_vit_large": Weights(_MAE_URL + "mae_visualize_vit_large.pth", "mae"),
  "mae_vit_huge": Weights(_MAE_URL + "mae_visualize_vit_huge.pth", "mae"),
  "mae_vit_large_ganloss": Weights(_MAE_URL + "mae_visualize_vit_large_ganloss.pth", "mae"),
  # torchvision's ImageNet weights (IMAGENET1K_V1); the file names carry the first hex
  # digits of each file's SHA-256.
  "resnet18": _torchvision("resnet18-f37072fd.pth"),
  "resnet50": _torchvision("resnet50-0676ba61.pth"),
  "wide_resnet50_2": _torchvision("wide_resnet50_2-95faca4d.pth"),
  # The official DINOv2 backbones (facebookresearch/dinov2 hub; no digest is published).
  **{
    f"dinov2_{size}{suffix}": Weights(
      f"{_DINOV2_URL}dinov2_{size}/dinov2_{size}{file_suffix}_pretrain.pth", "dinov2"
    )
    for size in ("vits14", "vitb14", "vitl14", "vitg14")
    for suffix, file_suffix in (("", ""), ("_reg", "_reg4"))
  },
  # OpenAI's CLIP as Hugging Face `CLIPModel` safetensors (OpenAI's own .pt files are
  # TorchScript, which is not read here). The Hub shows each file's SHA-256 (its LFS
  # object id), but it could not be read where this table was written (no network): as
  # for DINOv2, no digest yet; the download checks the size the server announces. Every
  # file is called model.safetensors, so each is cached under its name.
  **{
    name: Weights(_HUGGINGFACE_URL.format(repo), "clip", filename=f"{name}.safetensors")
    for name, repo in (
      ("clip_vit_b16", "openai/clip-vit-base-patch16"),
      ("clip_vit_l14", "openai/clip-vit-large-patch14"),
      ("clip_vit_l14_336", "openai/clip-vit-large-patch14-336"),
    )
  },
  # OpenAI's DALL-E dVAE encoder (PMAD's visual tokenizer): `torch.save` of the whole
  # `dall_e.Encoder` module, read by `dvae_import.load` without running its pickle. No
  # digest is published and none could be computed where this table was written (no
  # network): as for MAE and DINOv2, the download checks the size the server announces.
  "dalle_encoder": Weights("https://cdn.openai.com/dall-e/encoder.pkl", "dvae"),
}
"""Every known name -> its `Weights`; the views of `known` read and write this dict."""


class KnownView(MutableMapping):
  """The names of one kind in `KNOWN`, with values in the form a caller used before
  the table was shared (a URL string for backbones, a `RemoteFile` for MAEs).

  Reads and writes go through to `KNOWN`, so `view[name] = value` registers a name that
  `resolve` then finds, and `del view[name]` removes it again.
  """

  def __init__(
    self,
    kind: str,
    to_value: Callable[[Weights], Any],
    from_value: Callable[[Any], Weights],
  ):
    self.kind = kind
    self._to_value, self._from_value = to_value, from_value

  def __getitem__(self, name: str):
    entry = KNOWN.get(name)
    if entry is None or entry.kind != self.kind:
      raise KeyError(name)
    return self._to_value(entry)

  def __setitem__(self, name: str, value) -> None:
    entry = self._from_value(value)
    if entry.kind != self.kind:
      raise ValueError(f"{name!r}: a {entry.kind!r} entry in the {self.kind!r} names")
    KNOWN[name] = entry

  def __delitem__(self, name: str) -> None:
    self[name]  # noqa: B018  (KeyError for a name of another kind: it is not ours)
    del KNOWN[name]

  def __iter__(self) -> Iterator[str]:
    return iter([name for name, entry in KNOWN.items() if entry.kind == self.kind])

  def __len__(self) -> int:
    return sum(entry.kind == self.kind for entry in KNOWN.values())

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.kind!r}, {dict(self.items())!r})"


def known(
  kind: str,
  to_value: Callable[[Weights], Any] = lambda entry: entry,
  from_value: Callable[[Any], Weights] | None = None,
) -> KnownView:
  """A live view of the names of `kind` in `KNOWN` (values converted both ways)."""
  if kind not in KINDS:
    raise ValueError(f"kind {kind!r} is not one of {list(KINDS)}")
  return KnownView(kind, to_value, from_value or (lambda entry: entry))


def is_known(name: str | os.PathLike, kind: str | None = None) -> bool:
  """Whether `name` is a known name (of `kind`, when given) rather than a path."""
  entry = KNOWN.get(os.fspath(name))
  return entry is not None and (kind is None or entry.kind == kind)


def default_cache_dir() -> pathlib.Path:
  """`$MAEDAY_CACHE_DIR`, else `~/.cache/maeday_jax`."""
  root = os.environ.get("MAEDAY_CACHE_DIR") or os.path.join("~", ".cache", "maeday_jax")
  return pathlib.Path(root).expanduser()


def cached_path(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where the known `name` is (or will be) downloaded to."""
  entry = KNOWN[name]
  root = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  return root / KINDS[entry.kind].subdir / entry.filename


def _local_copy_hint(name: str, entry: Weights, dest: pathlib.Path) -> str:
  kind = KINDS[entry.kind]
  ways = f"{kind.loader}('/path/{entry.filename}')"
  if kind.option:
    ways += f" or {kind.option}=/path/{entry.filename}"
  return (
    f"If this machine is offline, download {entry.url} elsewhere and either pass its "
    f"local path instead of {name!r} ({ways}) or copy it to {dest}."
  )


def resolve(
  name_or_path: str | os.PathLike,
  cache_dir: str | os.PathLike | None = None,
  *,
  kind: str | None = None,
  progress: bool = True,
) -> pathlib.Path:
  """Maps a known name or a path to a local file, downloading a name once.

  Args:
    name_or_path: a name in `KNOWN` or a local path.
    cache_dir: the cache root for known names; default `default_cache_dir()`.
    kind: only names of this kind are known, and a path must be what this kind loads
      (a file; MAEs also accept a converted directory). Default: every name.
    progress: show a progress bar while downloading.

  Returns:
    The downloaded file (a known name; unchanged when already cached) or the path.

  Raises:
    CheckpointError: neither a known name nor an existing path (the message lists the
      known names).
    DownloadError: the download failed or arrived corrupt (nothing is kept).
  """
  text = os.fspath(name_or_path)
  if is_known(text, kind):
    entry = KNOWN[text]
    dest = cached_path(text, cache_dir)
    return download.fetch(
      entry.remote,
      dest,
      what=f"the {text} {KINDS[entry.kind].label.lower()}",
      hint=_local_copy_hint(text, entry, dest),
      progress=progress,
    )
  path = pathlib.Path(text).expanduser()
  directories = KINDS[kind].directories if kind else True
  if not (path.exists() if directories else path.is_file()):
    label = KINDS[kind].label if kind else "Weights"
    names = sorted(name for name, entry in KNOWN.items() if kind in (None, entry.kind))
    what = "path" if directories else "file"
    raise CheckpointError(
      f"{label} {text!r} is neither an existing {what} nor a known name ({', '.join(names)})."
    )
  return path


def discard_download(path: pathlib.Path, error: Exception) -> CheckpointError:
  """Deletes a downloaded file that failed to load; returns the error to raise.

  A file that does not load is never kept in the cache, so that the next call downloads
  it again instead of failing the same way.
  """
  pathlib.Path(path).unlink(missing_ok=True)
  return CheckpointError(f"{error}\nThe downloaded file {path} was deleted; try again.")


def sha256_of(path: str | os.PathLike) -> str:
  """The hex SHA-256 of a file, or of a directory's files: a checkpoint's fingerprint.

  A directory (a converted Orbax checkpoint, a saved segmenter) is hashed as the
  sequence, in sorted order of their relative POSIX paths, of each file's path, size and
  contents, so the digest changes when a file is renamed, added, removed or edited, and
  never depends on the order the file system lists them in. Empty folders do not count.

  Raises:
    FileNotFoundError: `path` does not exist.
  """
  path = pathlib.Path(path).expanduser()
  if path.is_file():
    return download.sha256_of(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: no such file or directory to fingerprint.")
  digest = hashlib.sha256()
  files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
  for relative, file in files:
    # Length-prefixed fields: no two different trees hash the same bytes.
    name = relative.encode()
    digest.update(len(name).to_bytes(8, "little") + name)
    digest.update(file.stat().st_size.to_bytes(8, "little"))
    with open(file, "rb") as f:
      while block := f.read(1 << 20):
        digest.update(block)
  return digest.hexdigest()
