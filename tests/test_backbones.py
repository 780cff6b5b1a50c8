"""ResNet backbones: parity with an independent PyTorch ResNet, inference of the
architecture, safe loading, downloads of known names, timm safetensors."""

import hashlib
import io
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maeday_jax import backbones, imagenet
from maeday_jax.backbones import convert

KINDS = {"basic": "test_resnet", "bottleneck": "test_wide"}


def _rel_error(got, expected) -> float:
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  return float(np.abs(got - expected).max() / np.abs(expected).max())


def _leaves_equal(a, b) -> bool:
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


@pytest.fixture(scope="module")
def reference(fixtures_dir):
  with np.load(fixtures_dir / "resnet_ref_io.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def images(reference):
  return imagenet.normalize(reference["pixels"])  # (2, 224, 224, 3) float32


@pytest.fixture(scope="module", params=list(KINDS))
def loaded(request, fixtures_dir, images):
  """(kind, path, model, variables, features of every stage), jitted once per kind."""
  kind = request.param
  path = fixtures_dir / f"resnet_ref_{kind}.pth"
  model, variables = backbones.load_backbone(path)
  apply = jax.jit(model.apply, static_argnames="stages")
  features = apply(variables, images, stages=backbones.STAGES)
  return kind, path, model, variables, apply, features


def test_every_stage_matches_the_pytorch_reference(loaded, reference):
  kind, _, _, _, _, features = loaded
  assert set(features) == set(backbones.STAGES)
  for stage in backbones.STAGES:
    expected = reference[f"{kind}_{stage}"]
    assert features[stage].shape == expected.shape, stage
    assert features[stage].dtype == jnp.float32
    assert _rel_error(features[stage], expected) <= 1e-4, (kind, stage)


def test_the_architecture_is_inferred(loaded, reference):
  kind, _, model, _, _, features = loaded
  assert model == backbones.create(KINDS[kind])
  assert model.block == kind
  assert model.layers == tuple(reference[f"{kind}_layers"])
  assert model.width == reference[f"{kind}_width"]
  assert (model.width_per_group or model.width) == reference[f"{kind}_width_per_group"]
  for stage, value in features.items():
    assert value.shape[-1] == model.channels(stage)
    assert value.shape[1] == 224 // backbones.STAGE_STRIDES[stage]


def test_random_variables_have_the_loaded_structure(loaded):
  _, _, model, variables, _, _ = loaded
  fresh = backbones.init_variables(model, jax.random.key(0))
  assert jax.tree.structure(fresh) == jax.tree.structure(variables)
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, variables)
  assert "downsample_0" in variables["params"]["layer2_0"]
  assert set(variables["batch_stats"]["bn1"]) == {"mean", "var"}


def test_stages_returns_exactly_the_requested_ones(loaded):
  _, _, model, variables, apply, _ = loaded
  small = jnp.zeros((1, 64, 64, 3))
  assert set(apply(variables, small, stages=("layer3", "layer1"))) == {"layer3", "layer1"}
  assert list(model.apply(variables, small, stages="stem")) == ["stem"]
  # Nothing past the deepest stage is computed: layer3/layer4 variables are not needed.
  shallow = {
    c: {k: v for k, v in tree.items() if k.split("_")[0] not in ("layer3", "layer4")}
    for c, tree in variables.items()
  }
  out = apply(shallow, small, stages=("layer2",))
  assert out["layer2"].shape == (1, 8, 8, model.channels("layer2"))
  with pytest.raises(ValueError, match="layer5"):
    model.apply(variables, small, stages=("layer5",))
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(variables, jnp.zeros((1, 3, 64, 64)))


def test_bfloat16_compute(fixtures_dir, images):
  path = fixtures_dir / "resnet_ref_bottleneck.pth"
  model, variables = backbones.load_backbone(path)
  model16, variables16 = backbones.load_backbone(path, dtype=jnp.bfloat16)
  assert model16.dtype == jnp.bfloat16
  assert _leaves_equal(variables16, variables)  # float32 parameters either way.
  small = images[:1, :64, :64]
  got = jax.jit(model16.apply, static_argnames="stages")(variables16, small, stages="layer4")
  assert got["layer4"].dtype == jnp.bfloat16
  expected = jax.jit(model.apply, static_argnames="stages")(variables, small, stages="layer4")
  assert _rel_error(got["layer4"], expected["layer4"]) < 0.1


def test_the_fixture_carries_what_is_skipped(fixtures_dir):
  state = backbones.read_state_dict(fixtures_dir / "resnet_ref_basic.pth")
  assert "fc.weight" in state and "bn1.num_batches_tracked" in state


@pytest.fixture(scope="module")
def basic_state(fixtures_dir):
  return backbones.read_state_dict(fixtures_dir / "resnet_ref_basic.pth")


def test_a_missing_key_is_named(basic_state):
  state = dict(basic_state)
  del state["layer1.1.bn2.running_var"]
  with pytest.raises(backbones.CheckpointError, match=r"missing keys: layer1\.1\.bn2\.running_var"):
    backbones.from_state_dict(state, source="cut.pth")
  state = {k: v for k, v in basic_state.items() if k != "conv1.weight"}
  with pytest.raises(backbones.CheckpointError, match=r"cut\.pth.*'conv1\.weight' is missing"):
    backbones.from_state_dict(state, source="cut.pth")


def test_an_extra_key_is_named(basic_state):
  state = {**basic_state, "layer2.0.se.fc1.weight": np.zeros((4, 16, 1, 1), np.float32)}
  with pytest.raises(backbones.CheckpointError, match=r"extra\.pth") as e:
    backbones.from_state_dict(state, source="extra.pth")
  assert "unexpected keys: layer2.0.se.fc1.weight" in str(e.value)


def test_a_wrong_shape_is_named(basic_state):
  state = {**basic_state, "layer3.0.bn1.weight": np.ones(5, np.float32)}
  with pytest.raises(backbones.CheckpointError, match=r"layer3\.0\.bn1\.weight \(5,\)"):
    backbones.from_state_dict(state, source="bad.pth")


def test_inference_reads_counts_and_widths(basic_state, fixtures_dir):
  arch = convert.infer_architecture(basic_state)
  assert arch == dict(block="basic", layers=(2, 1, 1, 1), width=8)
  state = backbones.read_state_dict(fixtures_dir / "resnet_ref_bottleneck.pth")
  arch = convert.infer_architecture(state)
  assert arch == dict(block="bottleneck", layers=(1, 2, 1, 1), width=4, width_per_group=8)
  # A deeper layer1 is read from the keys: copy layer1.1 to layer1.2.
  deeper = {**basic_state}
  deeper.update(
    {
      k.replace("layer1.1.", "layer1.2."): v
      for k, v in basic_state.items()
      if k.startswith("layer1.1.")
    }
  )
  model, _ = backbones.from_state_dict(deeper)
  assert model.layers == (3, 1, 1, 1)
  # A block numbered far past the others is a gap, not a huge layer to build.
  gap = {**basic_state, "layer4.99999999999.conv1.weight": basic_state["layer4.0.conv2.weight"]}
  with pytest.raises(backbones.CheckpointError, match=r"gap\.pth: blocks are missing.*layer4\.1"):
    backbones.from_state_dict(gap, source="gap.pth")


class _RunsACommand:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pth_is_refused_without_running(tmp_path):
  marker = tmp_path / "was_run"
  buffer = io.BytesIO()
  pickle.dump({"conv1.weight": _RunsACommand(marker)}, buffer, protocol=2)
  path = tmp_path / "evil_resnet.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buffer.getvalue())
    z.writestr("archive/byteorder", "little")
  assert b"system" in buffer.getvalue()
  with pytest.raises(backbones.CheckpointError, match="refusing to load the global") as e:
    backbones.load_backbone(path)
  assert "evil_resnet.pth" in str(e.value)
  assert not marker.exists(), "the pickle's payload ran"


def test_unreadable_files_and_unknown_names(tmp_path):
  notes = tmp_path / "notes.pth"
  notes.write_text("not a checkpoint")
  with pytest.raises(backbones.CheckpointError, match=r"notes\.pth: not a backbone checkpoint"):
    backbones.load_backbone(notes)
  with pytest.raises(backbones.CheckpointError, match="resnet18, resnet50, wide_resnet50_2"):
    backbones.load_backbone("resnet19")


def _prefix(payload: bytes) -> str:
  return hashlib.sha256(payload).hexdigest()[:8]


@pytest.fixture
def server(fixtures_dir, file_server):
  payload = (fixtures_dir / "resnet_ref_basic.pth").read_bytes()
  junk = b"<html>not a checkpoint</html>"
  files = {
    f"test_resnet-{_prefix(payload)}.pth": payload,
    "test_resnet-0badc0de.pth": payload,  # The name's prefix is not the file's.
    f"junk-{_prefix(junk)}.pth": junk,
  }
  s = file_server(files)
  s.payload, s.junk = payload, junk
  return s


def test_a_known_name_downloads_once_and_is_cached(server, monkeypatch, tmp_path, fixtures_dir):
  name = f"test_resnet-{_prefix(server.payload)}.pth"
  monkeypatch.setitem(backbones.KNOWN_BACKBONES, "resnet18", f"{server.url}/{name}")
  server.requests.clear()
  model, variables = backbones.load_backbone("resnet18", cache_dir=tmp_path)
  assert (tmp_path / "backbones" / name).read_bytes() == server.payload
  assert len(server.requests) == 1
  again, cached = backbones.load_backbone("resnet18", cache_dir=tmp_path)
  assert len(server.requests) == 1  # From the cache.
  direct, expected = backbones.load_backbone(fixtures_dir / "resnet_ref_basic.pth")
  assert model == again == direct
  assert _leaves_equal(variables, expected) and _leaves_equal(cached, expected)


def test_a_wrong_sha256_prefix_is_refused(server, monkeypatch, tmp_path):
  monkeypatch.setitem(
    backbones.KNOWN_BACKBONES, "resnet18", f"{server.url}/test_resnet-0badc0de.pth"
  )
  with pytest.raises(backbones.DownloadError, match="prefix 0badc0de"):
    backbones.load_backbone("resnet18", cache_dir=tmp_path)
  assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_downloaded_non_checkpoint_is_deleted(server, monkeypatch, tmp_path):
  url = f"{server.url}/junk-{_prefix(server.junk)}.pth"
  monkeypatch.setitem(backbones.KNOWN_BACKBONES, "wide_resnet50_2", url)
  with pytest.raises(backbones.CheckpointError, match="was deleted"):
    backbones.load_backbone("wide_resnet50_2", cache_dir=tmp_path)
  assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_offline_error_names_the_url_and_a_local_copy(monkeypatch, tmp_path):
  url = "http://127.0.0.1:9/resnet18-f37072fd.pth"  # Port 9 (discard): refused.
  monkeypatch.setitem(backbones.KNOWN_BACKBONES, "resnet18", url)
  with pytest.raises(backbones.DownloadError) as e:
    backbones.load_backbone("resnet18", cache_dir=tmp_path)
  message = str(e.value)
  assert url in message and "load_backbone('/path/resnet18-f37072fd.pth')" in message
  assert str(tmp_path / "backbones" / "resnet18-f37072fd.pth") in message


def test_known_names_are_torchvision_weights():
  assert backbones.KNOWN_BACKBONES == {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
  }
  for name in backbones.KNOWN_BACKBONES:
    assert backbones.create(name) == backbones.ResNet(**backbones.VARIANTS[name])


def test_timm_safetensors_give_the_same_outputs(loaded, images, reference, tmp_path):
  safetensors_numpy = pytest.importorskip(
    "safetensors.numpy", reason="the safetensors package is not installed"
  )
  kind, path, model, variables, apply, features = loaded
  state = backbones.read_state_dict(path)
  # timm's ResNets use torchvision's key names; their files carry no num_batches_tracked.
  state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
  target = tmp_path / "model.safetensors"
  safetensors_numpy.save_file(state, str(target), metadata={"format": "pt"})
  timm_model, timm_variables = backbones.load_backbone(target)
  assert timm_model == model
  assert _leaves_equal(timm_variables, variables)
  out = apply(timm_variables, images, stages=backbones.STAGES)  # Compiled already.
  for stage in backbones.STAGES:
    np.testing.assert_array_equal(out[stage], features[stage])
    assert _rel_error(out[stage], reference[f"{kind}_{stage}"]) <= 1e-4
