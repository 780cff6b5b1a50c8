"""No compilation after the first batches: a bulk run's batches (a padded last batch and a
batch with an unreadable file among them) all reuse the step compiled for the first one.

Compilations are counted with `jax.monitoring`'s backend-compile event, which XLA emits
once per program it compiles (cache hits emit nothing).
"""

from __future__ import annotations

from maeday_jax.bulk import engine
from tests import data_makers


def test_a_bulk_run_compiles_nothing_after_its_first_batches(
  tmp_path, job_config, monkeypatch, compile_counter
):
  from maeday_jax.jobs import score as score_job

  images = tmp_path / "images"
  for i in range(29):  # 8 per batch: 4 batches, the last one padded.
    data_makers.write_image(images / f"{i:03d}.png", "rgb" if i % 2 else "gray")
  data_makers.write_truncated(images / "020_bad.png")  # In the third batch: a skipped row.
  seen: list[tuple[int, int]] = []  # (batch index, compilations so far) as each is read.
  read_batches = engine.reader.read_batches

  def watched(*args, **kwargs):
    for batch in read_batches(*args, **kwargs):
      seen.append((batch.index, len(compile_counter)))
      yield batch

  monkeypatch.setattr(engine.reader, "read_batches", watched)
  config = job_config(
    "score",
    "runlocal",
    data={"path": images, "num_workers": 2},
    batch_size=8,
    commit_every=1,
    compilation_cache_dir="",
  )
  summary = score_job.run(config, tmp_path / "work")
  assert summary["images"] == 29 and [b for b, _ in seen] == [0, 1, 2, 3]
  # Batch 2 is read once batch 0 is scored and committed and batch 1 is on the device.
  after_first = seen[2][1]
  assert after_first > 0  # The step was compiled here, not before the run.
  assert [count for _, count in seen[2:]] == [after_first] * 2
  assert len(compile_counter) == after_first, compile_counter[after_first:]
