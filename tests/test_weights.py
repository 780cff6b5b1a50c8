"""The one weights table and resolver: names of every kind, paths, fingerprints, views."""

import hashlib

import pytest

from maeday_jax import backbones, checkpoints, download
from maeday_jax.models import weights

PAYLOAD = b"weights " * 1000


@pytest.fixture
def published(tmp_path):
  """A file served by a file URL whose name carries its SHA-256 prefix (torch.hub style)."""
  digest = hashlib.sha256(PAYLOAD).hexdigest()
  source = tmp_path / "published" / f"tiny-{digest[:8]}.pth"
  source.parent.mkdir()
  source.write_bytes(PAYLOAD)
  return source, digest


def test_one_table_holds_every_kind():
  kinds = {name: entry.kind for name, entry in weights.KNOWN.items()}
  assert {kinds[n] for n in checkpoints.KNOWN_CHECKPOINTS} == {"mae"}
  assert {kinds[n] for n in backbones.KNOWN_BACKBONES} == {"backbone"}
  dinov2 = {n for n, kind in kinds.items() if kind == "dinov2"}
  assert dinov2 == {f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")}
  clip = {n for n, kind in kinds.items() if kind == "clip"}
  assert clip == {"clip_vit_b16", "clip_vit_l14", "clip_vit_l14_336"}
  dvae = {n for n, kind in kinds.items() if kind == "dvae"}
  assert dvae == {"dalle_encoder"}
  known = set(checkpoints.KNOWN_CHECKPOINTS) | set(backbones.KNOWN_BACKBONES) | dinov2 | clip
  known |= dvae
  assert set(kinds) == known
  for name in backbones.KNOWN_BACKBONES:  # torchvision's names carry the SHA-256 prefix.
    entry = weights.KNOWN[name]
    assert entry.sha256_prefix and entry.filename.split("-")[-1].startswith(entry.sha256_prefix)
  assert checkpoints.CheckpointError is weights.CheckpointError is backbones.CheckpointError


def test_views_write_through_to_the_table(published, monkeypatch, tmp_path):
  source, digest = published
  monkeypatch.setitem(backbones.KNOWN_BACKBONES, "tiny", source.as_uri())
  entry = weights.KNOWN["tiny"]
  assert (entry.kind, entry.sha256_prefix, entry.filename) == ("backbone", digest[:8], source.name)
  assert "tiny" not in checkpoints.KNOWN_CHECKPOINTS  # Another kind's view.
  assert weights.is_known("tiny") and weights.is_known("tiny", "backbone")
  assert not weights.is_known("tiny", "mae")
  path = weights.resolve("tiny", tmp_path / "cache")
  assert path == tmp_path / "cache" / "backbones" / source.name
  assert path.read_bytes() == PAYLOAD
  # Only its own kind's names are known to a kind-restricted resolve.
  with pytest.raises(weights.CheckpointError, match="neither an existing path"):
    weights.resolve("tiny", tmp_path / "cache", kind="mae")
  del backbones.KNOWN_BACKBONES["tiny"]
  assert "tiny" not in weights.KNOWN


def test_a_wrong_hash_is_refused_and_nothing_is_kept(published, monkeypatch, tmp_path):
  source, _ = published
  remote = download.RemoteFile(source.as_uri(), sha256="0" * 64)
  monkeypatch.setitem(checkpoints.KNOWN_CHECKPOINTS, "tiny_mae", remote)
  assert weights.KNOWN["tiny_mae"].sha256 == "0" * 64
  with pytest.raises(download.DownloadError, match="SHA-256"):
    weights.resolve("tiny_mae", tmp_path / "cache")
  assert list((tmp_path / "cache").iterdir()) == []


def test_paths_are_checked(tmp_path):
  folder = tmp_path / "converted"
  folder.mkdir()
  assert weights.resolve(folder) == folder  # A converted MAE is a directory.
  assert weights.resolve(folder, kind="mae") == folder
  with pytest.raises(weights.CheckpointError, match="neither an existing file") as e:
    weights.resolve(folder, kind="backbone")  # A backbone is one file.
  assert "resnet18, resnet50, wide_resnet50_2" in str(e.value)
  with pytest.raises(weights.CheckpointError, match="missing.pth' is neither") as e:
    weights.resolve(tmp_path / "missing.pth")
  assert "mae_vit_large" in str(e.value) and "wide_resnet50_2" in str(e.value)


def test_discarding_a_download_that_does_not_load(tmp_path):
  path = tmp_path / "junk.pth"
  path.write_bytes(b"junk")
  error = weights.discard_download(path, ValueError("junk.pth: not a checkpoint"))
  assert isinstance(error, weights.CheckpointError) and not path.exists()
  assert "not a checkpoint" in str(error) and "was deleted" in str(error)


def test_sha256_of_files_and_directories(tmp_path):
  file = tmp_path / "model.pth"
  file.write_bytes(PAYLOAD)
  assert weights.sha256_of(file) == hashlib.sha256(PAYLOAD).hexdigest()

  def tree(root, files):
    for name, content in files.items():
      (root / name).parent.mkdir(parents=True, exist_ok=True)
      (root / name).write_bytes(content)
    return weights.sha256_of(root)

  files = {"mae_config.json": b"{}", "params/a": b"1", "params/b": b"22"}
  first = tree(tmp_path / "one", files)
  assert first == tree(tmp_path / "two", dict(reversed(files.items())))  # Order-free.
  (tmp_path / "two" / "empty").mkdir()
  assert weights.sha256_of(tmp_path / "two") == first  # Empty folders do not count.
  renamed = {"mae_config.json": b"{}", "params/a": b"1", "params/c": b"22"}
  assert tree(tmp_path / "renamed", renamed) != first
  # The same bytes in sequence, split differently between the files.
  moved = {"mae_config.json": b"{}", "params/a": b"12", "params/b": b"2"}
  assert tree(tmp_path / "moved", moved) != first
  with pytest.raises(FileNotFoundError):
    weights.sha256_of(tmp_path / "missing")
