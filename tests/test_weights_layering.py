"""Weights loading reads as a pipeline, every import running down it:

  checkpoints/, backbones/   facades: the names users import
  models/                    each network with its importer (`mae_import`, `resnet_import`)
  weight_files/              the file formats (`.pth`, safetensors, converted Orbax)

`weight_files` knows no network, and no module of `models` imports a facade or anything
built on the networks (training, model_builder, mala, ...): otherwise the packages import
each other again and a change to one format reaches every layer.
"""

import ast
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "maeday_jax"

# What each layer may import from maeday_jax: itself and what lies below it.
ALLOWED = {
  "weight_files": {"weight_files", "download", "parallel"},
  "models": {"models", "weight_files", "download", "parallel", "settings"},
}


def _own_imports(path: pathlib.Path) -> set[str]:
  """The maeday_jax modules `path` imports, anywhere in the file (lazy imports too)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      if node.module == "maeday_jax":  # `from maeday_jax import models`
        names.update(f"maeday_jax.{alias.name}" for alias in node.names)
  return {n for n in names if n.startswith("maeday_jax.")}


def test_weight_files_and_models_import_only_what_lies_below_them():
  for layer, allowed in ALLOWED.items():
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files, layer
    for path in files:
      upward = sorted(m for m in _own_imports(path) if m.split(".")[1] not in allowed)
      assert not upward, f"{path.relative_to(REPO_ROOT)} imports {upward} (above {layer}/)"


def test_the_file_formats_load_without_jax():
  """`.pth` and safetensors reading needs NumPy only; Orbax is imported by name."""
  code = (
    "import sys; import maeday_jax.weight_files;"
    "heavy = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'orbax')];"
    "assert not heavy, heavy"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr
