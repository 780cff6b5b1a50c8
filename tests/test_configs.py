"""Config files: light to load, every field in one place, overrides that take effect.

Also the package's layering: the library never imports `maeday_jax.jobs`, and no job
imports another job.
"""

import ast
import subprocess
import sys

import pytest

from maeday_jax import defaults, few_shot

from .conftest import REPO_ROOT

CONFIGS = ("zero_shot", "few_shot", "pretrain", "pretrain_mt", "score", "mala", "mala_mt")

# Parses the command line the way `maeday_jax.main` does and prints the fields asked for.
_PARSE = """
import json, sys
from absl import flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config", None, "")
flags.FLAGS(sys.argv[:1] + sys.argv[2:])
config = flags.FLAGS.config
fields = {name: eval("config." + name) for name in sys.argv[1].split(",")}
heavy = sorted(m for m in ("jax", "optax", "orbax", "flax", "tensorflow") if m in sys.modules)
print(json.dumps({"fields": fields, "heavy": heavy}))
"""


def _parse(fields: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", _PARSE, fields, *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )


def _load(name: str, arg=None):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_files_load_without_jax(name):
  import json

  out = _parse("job", f"--config=configs/{name}.py")
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["heavy"] == []


@pytest.mark.parametrize(
  "flags",
  [
    ("--config.train.lora.rank=8", "--config.finetune=full"),
    ("--config.lora.rank=8", "--config.train.finetune=full"),
  ],
)
def test_few_shot_overrides_take_effect_under_either_spelling(flags):
  import json

  fields = "lora.rank,train.lora.rank,finetune,train.finetune"
  out = _parse(fields, "--config=configs/few_shot.py", *flags)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["fields"] == {
    "lora.rank": 8,
    "train.lora.rank": 8,
    "finetune": "full",
    "train.finetune": "full",
  }


def test_a_misspelt_override_fails_naming_the_field():
  out = _parse("job", "--config=configs/few_shot.py", "--config.train.lora.rnk=8")
  assert out.returncode != 0
  assert "rnk" in out.stderr and "rank" in out.stderr


def test_the_training_step_sees_the_override():
  """What the job hands to `few_shot.adapt` (`config.train`) carries the new rank."""
  config = _load("few_shot")
  config.train.lora.rank = 8
  config.lora.compute = "weights"
  strategy = few_shot.StepSettings.from_config(config.train).strategy
  assert (strategy.rank, strategy.compute) == (8, "weights")
  assert config.lora.rank == 8 and config.train.lora.compute == "weights"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_with_one_random_weights_spelling(name):
  for arg in (None, "runlocal"):
    config = _load(name, arg)
    assert config.model.checkpoint in (defaults.RANDOM_WEIGHTS, "mae_vit_large")
  with pytest.raises(ValueError, match="runlocal"):
    _load(name, "fast")


def _imports(path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_the_library_never_imports_a_job_and_jobs_never_import_each_other():
  package = REPO_ROOT / "maeday_jax"
  jobs = {p.stem for p in (package / "jobs").glob("*.py")} - {"__init__"}
  job_modules = {"zero_shot", "few_shot", "score"}  # The jobs; the rest are their helpers.
  assert job_modules <= jobs
  for path in package.rglob("*.py"):
    imported = _imports(path)
    if path.parent.name == "jobs":
      others = {f"maeday_jax.jobs.{j}" for j in job_modules - {path.stem}}
      assert not imported & others, f"{path} imports another job: {imported & others}"
    elif path.name != "main.py":  # The command line dispatches to the jobs.
      assert not any(m.startswith("maeday_jax.jobs") for m in imported), path
