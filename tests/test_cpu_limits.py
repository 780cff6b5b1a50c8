"""CPU threads fitted to a container's CPU quota (fake cgroup files)."""

import os

import pytest

from maeday_jax import cpu_limits


def _cgroup_v2(tmp_path, text):
  tmp_path.mkdir(parents=True, exist_ok=True)
  (tmp_path / "cpu.max").write_text(text)
  return tmp_path


def _cgroup_v1(tmp_path, quota, period):
  (tmp_path / "cpu").mkdir(parents=True)
  (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
  (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
  return tmp_path


def test_quota_is_read_from_cgroup_v2_and_v1(tmp_path):
  assert cpu_limits.cgroup_cpu_quota(_cgroup_v2(tmp_path / "a", "150000 100000\n")) == 1.5
  assert cpu_limits.cgroup_cpu_quota(_cgroup_v2(tmp_path / "b", "max 100000\n")) is None
  assert cpu_limits.cgroup_cpu_quota(_cgroup_v1(tmp_path / "c", 50000, 100000)) == 0.5
  assert cpu_limits.cgroup_cpu_quota(_cgroup_v1(tmp_path / "d", -1, 100000)) is None
  assert cpu_limits.cgroup_cpu_quota(tmp_path / "nothing") is None


@pytest.fixture
def fake_affinity(monkeypatch):
  state = {"cores": {0, 1, 2, 3, 4, 5, 6, 7}}
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(state["cores"]))
  monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: state.update(cores=set(cores)))
  monkeypatch.delenv(cpu_limits.KEEP_AFFINITY_ENV, raising=False)
  return state


def test_affinity_narrowed_to_the_quota(tmp_path, fake_affinity):
  root = _cgroup_v2(tmp_path / "a", "250000 100000")  # 2.5 CPUs of time on 8 visible cores
  assert cpu_limits.usable_cpus(root) == 3
  assert cpu_limits.fit_to_quota(root) == 3
  assert fake_affinity["cores"] == {0, 1, 2}
  assert cpu_limits.fit_to_quota(root) is None  # Already fitted.


def test_unlimited_or_opted_out_keeps_every_core(tmp_path, fake_affinity, monkeypatch):
  assert cpu_limits.fit_to_quota(_cgroup_v2(tmp_path / "a", "max 100000")) is None
  assert len(fake_affinity["cores"]) == 8
  monkeypatch.setenv(cpu_limits.KEEP_AFFINITY_ENV, "1")
  assert cpu_limits.fit_to_quota(_cgroup_v2(tmp_path / "b", "100000 100000")) is None
  assert len(fake_affinity["cores"]) == 8
