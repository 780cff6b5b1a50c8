"""Config files: light to load, every field in one place, overrides that take effect.

Also the package's layering: the library never imports `maeday_jax.jobs`,
`maeday_jax.main` or the job configs of `maeday_jax.defaults` and holds no job, no job
imports another job, and `maeday_jax.settings` stays light.
"""

import ast
import subprocess
import sys

import pytest

from maeday_jax import defaults, few_shot

from .conftest import REPO_ROOT

CONFIGS = (
  "zero_shot",
  "few_shot",
  "pretrain",
  "pretrain_mt",
  "score",
  "mala",
  "pmad",
  "mala_mt",
  "mt_recipe",
  "pmad_mt",
  "april_gan",
)

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


def test_the_training_step_sees_the_override(job_config):
  """What the job hands to `few_shot.adapt` (`config.train`) carries the new rank."""
  config = job_config("few_shot", None)
  config.train.lora.rank = 8
  config.lora.compute = "weights"
  strategy = few_shot.StepSettings.from_config(config.train).strategy
  assert (strategy.rank, strategy.compute) == (8, "weights")
  assert config.lora.rank == 8 and config.train.lora.compute == "weights"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_with_one_random_weights_spelling(name, job_config):
  for arg in (None, "runlocal"):
    config = job_config(name, arg)
    if "model" in config:  # PMAD's recipe has no MAE.
      assert config.model.checkpoint in (defaults.RANDOM_WEIGHTS, "mae_vit_large")
  with pytest.raises(ValueError, match="runlocal"):
    job_config(name, "fast")


def _module_name(path) -> str:
  return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)


def _imports(path) -> set[str]:
  """Every module `path` imports (relative imports resolved), and `module.name` of each
  name taken from a module (a submodule imported as `from package import sub`); also the
  string arguments of `importlib.import_module` / `__import__` calls."""
  package = _module_name(path).split(".")
  if path.name != "__init__.py":
    package = package[:-1]
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = package[: len(package) - node.level + 1] if node.level else []
      module = ".".join(base + ([node.module] if node.module else []))
      names.add(module)
      names.update(f"{module}.{alias.name}" for alias in node.names)
    elif isinstance(node, ast.Call) and node.args:
      func = node.func
      called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
      first = node.args[0]
      if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
        names.add(str(first.value))
  return names


# Every library package the layering rules must see (a renamed or new one fails here
# until it is listed, so that none is left unchecked by accident).
LIBRARY_PACKAGES = {
  "backbones",
  "bulk",
  "checkpoints",
  "data",
  "detectors",
  "few_shot",
  "mala",
  "models",
  "pmad",
  "objectives",
  "pretrain",
  "serve",
  "settings",
  "weight_files",
}
# The rest of jobs/: helpers.
JOBS = {"zero_shot", "few_shot", "score", "mala", "pretrain", "pmad"}
# The programs users start: `python -m maeday_jax.main` and `python -m maeday_jax.serve`.
COMMAND_LINES = {
  REPO_ROOT / "maeday_jax" / "main.py",
  REPO_ROOT / "maeday_jax" / "serve" / "__main__.py",
}


def _within(module: str, *prefixes: str) -> bool:
  return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _is_entry_point(module: str) -> bool:
  return _within(module, "maeday_jax.jobs", "maeday_jax.main")


def _check_settings_are_light(path, imported: set[str]) -> None:
  """A settings module imports only `ml_collections`, the standard library and other
  settings modules (config files load it, and the heavy packages' `__init__` would pull
  in JAX)."""
  own = sorted(m for m in imported if _within(m, "maeday_jax"))
  outside = [m for m in own if not _within(m, "maeday_jax.settings")]
  assert not outside, f"{path} (settings) imports {outside}; settings import only settings"
  others = {m.split(".")[0] for m in imported} - {"maeday_jax", "ml_collections"}
  heavy = sorted(others - set(sys.stdlib_module_names))
  assert not heavy, f"{path} (settings) imports {heavy}: only ml_collections and the stdlib"


def test_the_library_never_imports_a_job_and_jobs_never_import_each_other():
  """The library (every module outside `jobs/` and `main.py`) never imports a job, a
  job helper or the command line, and holds no job (`run(config, workdir)`: a library
  function a job calls is named for what it does, e.g. `pretrain.loop.train`); a job
  never imports another job (their shared pieces are the helpers in `jobs/`).

  The library also never imports `maeday_jax.defaults` (the job configs, for config
  files and jobs): it reads its settings from `maeday_jax.settings`, whose modules
  import nothing but `ml_collections`, the standard library and each other."""
  package = REPO_ROOT / "maeday_jax"
  jobs = {p.stem for p in (package / "jobs").glob("*.py")} - {"__init__"}
  assert jobs >= JOBS
  packages = {p.parent.name for p in package.glob("*/__init__.py")} - {"jobs"}
  assert packages == LIBRARY_PACKAGES, "list the new package in LIBRARY_PACKAGES"
  checked = set()
  for path in sorted(package.rglob("*.py")):
    imported = _imports(path)
    if path.parent.name == "jobs":
      others = {f"maeday_jax.jobs.{j}" for j in JOBS - {path.stem}}
      crossing = {m for m in imported if m in others or any(m.startswith(o + ".") for o in others)}
      assert not crossing, f"{path} imports another job: {crossing}"
    elif path not in COMMAND_LINES:  # Command lines build what their flags name.
      entry_points = sorted(m for m in imported if _is_entry_point(m))
      assert not entry_points, f"{path} (library) imports {entry_points}"
      tree = ast.parse(path.read_text())
      runs = [n.lineno for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
      assert not runs, f"{path}:{runs[0]}: a job-style run() in the library; move it to jobs/"
      if path != package / "defaults.py":
        uses = sorted(m for m in imported if _within(m, "maeday_jax.defaults"))
        assert not uses, f"{path} (library) imports {uses}; use maeday_jax.settings"
      if path.parent.name == "settings":
        _check_settings_are_light(path, imported)
      if path.parent != package:
        checked.add(path.relative_to(package).parts[0])
  assert checked == LIBRARY_PACKAGES


def test_the_april_gan_recipe_trains_on_the_other_dataset(job_config):
  for arg, target, aux, epochs in ((None, "mvtec_ad", "visa", 15), ("visa", "visa", "mvtec_ad", 3)):
    config = job_config("april_gan", arg)
    assert (config.detector, config.data.name) == ("april_gan", target)
    assert (config.april_gan.aux_data.name, config.april_gan.epochs) == (aux, epochs)
