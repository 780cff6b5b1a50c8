"""Shared test set-up: 8 simulated CPU devices before JAX initialises, and the fixtures
several test files use: configs with fields set, the tiny model and its parameters, a
local HTTP server and a generated magnetic-tile dataset.

The config factories are plain functions here too (`make_*_config`), for code that runs
outside pytest: the multi-process tests' worker scripts import them from this module.
JAX and `maeday_jax` are imported inside the functions, so that loading this file costs
nothing to the tests that need neither.
"""

import importlib.util
import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA cache for the whole session, fresh each run: the jobs the tests start
# as subprocesses (two-process runs, the command line) compile what an earlier test of the
# session compiled already. MAEDAY_TEST_COMPILATION_CACHE=0 turns it off.
if os.environ.get("MAEDAY_TEST_COMPILATION_CACHE", "1") != "0":
  os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="maeday_jax_tests_xla_cache_")
  )
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# The parity fixtures' random-weight MAE (32 px, patch 8): the model of the jobs' tests.
FIXTURE_MAE = FIXTURES / "mae_ref_a.pth"


def override(config, **fields):
  """Sets `fields` on an `ml_collections.ConfigDict` and returns it.

  A dotted name sets a nested field (`**{"outputs.maps": "uint8"}`); a dict for a section
  sets those of its fields (`data={"path": ..., "num_workers": 2}`), leaving the others;
  a path is stored as its string, as config fields hold strings. An unknown name raises.
  """
  import ml_collections

  for key, value in fields.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if isinstance(value, dict) and isinstance(node[name], ml_collections.ConfigDict):
      override(node[name], **value)
    else:
      node[name] = os.fspath(value) if isinstance(value, os.PathLike) else value
  return config


def make_data_config(**fields):
  """`maeday_jax.data.get_data_config()` with `fields` set (see `override`)."""
  from maeday_jax import data

  return override(data.get_data_config(), **fields)


def make_job_config(name: str, arg: str | None, **fields):
  """`configs/<name>.py`'s `get_config(arg)` (e.g. "runlocal": the tiny variant) with
  `fields` set (see `override`)."""
  spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return override(module.get_config(arg), **fields)


def make_train_config(**fields):
  """`maeday_jax.few_shot.get_train_config()` (the paper's fine-tune) with `fields` set."""
  from maeday_jax import few_shot

  return override(few_shot.get_train_config(), **fields)


def random_params(model, seed: int = 0) -> dict:
  """Random parameters of `model` drawn in NumPy: no per-shape initialiser compilations
  in tests."""
  import jax
  import numpy as np

  from maeday_jax import models

  rng = np.random.default_rng(seed)

  def draw(path, shape):
    name = path[-1].key
    if name == "scale":
      return np.ones(shape.shape, np.float32)
    if name == "bias":
      return np.zeros(shape.shape, np.float32)
    fan_in = int(np.prod(shape.shape[:-1])) if name == "kernel" else 50
    return rng.normal(0, fan_in**-0.5, shape.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, models.param_shapes(model))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return FIXTURES


@pytest.fixture(scope="session")
def mt_sample_dir() -> pathlib.Path:
  """The real magnetic-tile sample, when ../shared is beside the checkout."""
  path = SHARED_DATA / "mt_sample"
  if not path.is_dir():
    pytest.skip(f"{path} not found (only present on developer/CI machines)")
  return path


@pytest.fixture(scope="session")
def data_config():
  """`make_data_config`: `data_config(name="folder", path=..., data_dir=...)`."""
  return make_data_config


@pytest.fixture(scope="session")
def job_config():
  """`make_job_config`: `job_config("score", "runlocal", data={"path": ...})`."""
  return make_job_config


@pytest.fixture(scope="session")
def train_config():
  """`make_train_config`: `train_config(steps=2, batch_size=8)`."""
  return make_train_config


@pytest.fixture(scope="session")
def tiny_mae():
  """The `test` MAE: 32 px, patch 8 (16 patches), width 64 (2 blocks, 2 heads), decoder
  32 (1 block)."""
  from maeday_jax import models

  return models.create("test")


@pytest.fixture(scope="session")
def tiny_params(tiny_mae) -> dict:
  """`random_params(tiny_mae)`, drawn once for every test that only reads them."""
  return random_params(tiny_mae)


@pytest.fixture
def file_server():
  """Starts `tests.http_server.FileServer(files, ranges=...)` on 127.0.0.1 and returns it
  (`.url`, `.requests`); every server started is closed after the test."""
  from tests.http_server import FileServer

  servers = []

  def start(files: dict[str, bytes], ranges: bool = True) -> FileServer:
    servers.append(FileServer(files, ranges=ranges))
    return servers[-1]

  yield start
  for server in servers:
    server.close()


@pytest.fixture(scope="session")
def fake_tiles(tmp_path_factory) -> pathlib.Path:
  """A generated magnetic-tile dataset (`data_makers.make_magnetic_tile`, 10 normal
  tiles), written once: its root."""
  from tests import data_makers

  root = tmp_path_factory.mktemp("tiles")
  data_makers.make_magnetic_tile(root, num_free=10)
  return root


def kill_at_step(monkeypatch, step: int, run) -> None:
  """Calls `run()` with the training batch of `step` raising KeyboardInterrupt (a kill
  after the previous checkpoint), then restores the batch function."""
  from maeday_jax.pretrain import inputs

  real = inputs.batch_indices

  def killed(num, batch, at, seed):
    if at == step:
      raise KeyboardInterrupt("simulated kill")
    return real(num, batch, at, seed)

  monkeypatch.setattr(inputs, "batch_indices", killed)
  with pytest.raises(KeyboardInterrupt):
    run()
  monkeypatch.setattr(inputs, "batch_indices", real)


# XLA emits this event once per program it compiles (cache hits emit nothing).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compile_counter():
  """A list that grows by one name per backend compilation while the test runs (the
  session's persistent cache is off meanwhile: its hits would compile nothing)."""
  import jax

  compiled: list[str] = []

  def listen(event: str, duration: float, **kwargs):
    if event == COMPILE_EVENT:
      compiled.append(str(kwargs.get("fun_name", "")))

  cached = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield compiled
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
    jax.config.update("jax_enable_compilation_cache", cached)
