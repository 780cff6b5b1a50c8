"""Training curves: one JSON line per logged step, and a PNG plot of them."""

from __future__ import annotations

import json
import os
import pathlib

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"


def read_records(path: str | os.PathLike) -> list[dict]:
  """The records of a JSONL log (empty when the file does not exist)."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
  """Appends records to a JSONL file; on resume, forgets steps after the checkpoint.

  A run killed after logging step 130 but checkpointed at step 100 repeats steps
  101..130 when restarted; dropping their first records keeps one record per step.
  """

  def __init__(self, path: str | os.PathLike, resume_step: int = 0):
    self.path = pathlib.Path(path)
    kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)

  def write(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


# Loss terms besides `loss_*` that a training step may log (MALA stage 2).
_TERMS = ("l1", "focal")


def plot(records: list[dict], path: str | os.PathLike, title: str = "") -> pathlib.Path | None:
  """Plots the loss (and its logged terms), learning rate and throughput into a PNG."""
  if not records:
    return None
  import matplotlib

  matplotlib.use("Agg")  # No display on servers; must precede pyplot.
  import matplotlib.pyplot as plt

  steps = [r["step"] for r in records]
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  panels = (
    ("loss", "training loss", True),
    ("learning_rate", "learning rate", False),
    ("images_per_sec", "throughput (images/s)", False),
  )
  terms = sorted({k for r in records for k in r if k.startswith("loss_") or k in _TERMS})
  for ax, (field, label, log_scale) in zip(axes, panels, strict=True):
    curves = [field, *terms] if field == "loss" else [field]
    values = []
    for name in curves:
      pairs = [(s, r[name]) for s, r in zip(steps, records, strict=True) if r.get(name) is not None]
      if pairs:
        ax.plot(*zip(*pairs, strict=True), lw=1.2 if name == field else 0.9, label=name)
        values += [v for _, v in pairs]
    if len(curves) > 1:
      ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    if log_scale and values and min(values) > 0:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
