"""The README's promises: its code example runs, its commands match CI."""

import re

import jax
import numpy as np

from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_three_line_example_runs(fixtures_dir):
  block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
  code = block.replace('"mae_vit_large"', repr(str(fixtures_dir / "mae_ref_a.pth")))
  namespace = {
    "images": np.asarray(jax.random.normal(jax.random.key(0), (2, 32, 32, 3))),
    "key": jax.random.key(1),
  }
  exec(compile(code, "README.md", "exec"), namespace)
  assert namespace["pred"].shape == (2, 16, 8 * 8 * 3)
  assert namespace["maps"].shape == (2, 32, 32)


def test_ci_runs_the_readme_test_command():
  ci = (REPO_ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
  assert ci in commands, "the README's test command and .ci/run differ"
