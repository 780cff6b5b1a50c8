"""The command line restarts once with glibc's malloc keeping its memory, on huge pages."""

import os
import pathlib
import resource
import subprocess
import sys

import pytest

from maeday_jax import cpu_memory

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools" / "benchmarks"))
import benchmark_common  # noqa: E402

GLIBC = (2, 36)
ROOT = str(pathlib.Path(__file__).resolve().parents[1])


def test_wanted_on_glibc_unless_the_user_set_malloc_or_opted_out(monkeypatch):
  assert cpu_memory.wanted({}, GLIBC)
  assert cpu_memory.wanted({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, GLIBC)
  assert not cpu_memory.wanted({}, (2, 34))  # glibc without the huge-page tunable.
  monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("", ""))  # musl, macOS
  assert not cpu_memory.wanted({})
  # The user's own malloc settings stand.
  assert not cpu_memory.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC)
  assert not cpu_memory.wanted({cpu_memory.KEEP_MALLOC_ENV: "1"}, GLIBC)


def test_the_tunables_join_the_users_own():
  env = cpu_memory.environment({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "A": "b"})
  assert env["A"] == "b"
  assert env["GLIBC_TUNABLES"].split(":") == ["glibc.pthread.rseq=0", *cpu_memory.TUNABLES]
  assert cpu_memory.environment({})["GLIBC_TUNABLES"] == ":".join(cpu_memory.TUNABLES)


# Prints its process id before and after the call, then the tunables and arguments it
# runs with: a restart keeps the arguments and the process (exec, not a child).
PROBE = """
import os, sys
sys.path.insert(0, {root!r})
from maeday_jax import cpu_memory
print("before", os.getpid(), flush=True)
cpu_memory.reexec_with_kept_memory()
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
"""


def _clean_environment() -> dict[str, str]:
  return {
    k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", cpu_memory.KEEP_MALLOC_ENV)
  }


@pytest.mark.skipif(not cpu_memory.wanted({}), reason="not glibc 2.35 or later")
def test_a_command_restarts_once_as_the_same_process_with_the_tunables(tmp_path):
  script = tmp_path / "probe.py"
  script.write_text(PROBE.format(root=ROOT))
  out = subprocess.run(
    [sys.executable, str(script), "x", "--y=é"],
    env=_clean_environment(),
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  befores = [line for line in out if line.startswith("before")]
  assert len(befores) == 2 and befores[0] == befores[1]  # Started twice, one process.
  tunables = ":".join(cpu_memory.TUNABLES)
  assert [line for line in out if line.startswith("after")] == [
    f"after {befores[0].split()[1]} {tunables} ['x', '--y=é']"
  ]


# Allocates and frees 64 MiB blocks (what XLA:CPU does with its buffers at every call)
# and prints the page faults of the second round: with the tunables, none.
REUSE = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def round_trip():
  blocks = [libc.malloc(64 << 20) for _ in range(4)]
  for b in blocks:
    ctypes.memset(b, 1, 64 << 20)
  for b in blocks:
    libc.free(b)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not cpu_memory.wanted({}), reason="not glibc 2.35 or later")
def test_freed_blocks_are_reused_without_page_faults():
  def faults(env):
    run = subprocess.run([sys.executable, "-c", REUSE], env=env, capture_output=True, text=True)
    return int(run.stdout)

  plain = faults({**_clean_environment(), cpu_memory.KEEP_MALLOC_ENV: "1"})
  kept = faults(cpu_memory.environment(_clean_environment()))
  assert plain >= (256 << 20) // resource.getpagesize() // 2  # Every page faulted again.
  assert kept < 100


def test_the_pytorch_worker_runs_without_them_unless_asked():
  env = cpu_memory.environment({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "A": "b"})
  plain = benchmark_common.torch_environment(env, same_malloc=False)
  assert plain == {"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "A": "b"}
  only_ours = cpu_memory.environment({})
  assert "GLIBC_TUNABLES" not in benchmark_common.torch_environment(only_ours, False)
  assert benchmark_common.torch_environment(env, same_malloc=True) == env
