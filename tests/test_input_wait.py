"""The time a scoring loop waits for its input is measured where it waits (evaluation's
`score_split` here; the bulk job's in tests/test_bulk.py), and a loop held up by its input
says what to change."""

from __future__ import annotations

import logging
import time

from maeday_jax import data, evaluation, input_wait
from tests import data_makers


def _slow(items, seconds: float):
  for item in items:
    time.sleep(seconds)
    yield item


def test_timed_iterator_sums_the_waits_and_only_them():
  batches = input_wait.TimedIterator(_slow(range(3), 0.05))
  seen = []
  for item in batches:
    seen.append(item)
    time.sleep(0.1)  # The consumer's own work is not a wait.
  assert seen == [0, 1, 2]
  # 0.15 s of waits; counting the consumer's 0.3 s as well would give at least 0.45 s.
  assert 0.15 <= batches.waited < 0.4


def test_a_watched_source_is_shut_down_when_the_loop_fails():
  stopped = []

  def source():
    try:
      yield from range(10)
    finally:
      stopped.append(True)  # What a reader's pool shutdown runs.

  try:
    with input_wait.watched(source(), num_workers=1) as batches:
      for item in batches:
        if item == 2:
          raise ValueError("a non-finite map")
  except ValueError:
    pass
  assert stopped == [True]  # Although `batches` still holds the generator.


def test_the_warning_says_when_and_what():
  assert input_wait.input_bound_warning(2.0, 10.0, 4) is None  # 20 %
  assert input_wait.input_bound_warning(0.0, 0.0, 4) is None
  assert input_wait.share(1.0, 4.0) == 0.25 and input_wait.share(1.0, 0.0) is None
  # The slowest process (most seconds) sets the job's share: 3 of 12 s, not 9 of 10.
  assert input_wait.slowest_share([(9.0, 10.0), (3.0, 12.0)]) == 0.25
  message = input_wait.input_bound_warning(3.0, 10.0, 4)
  assert "30 %" in message and "(3.0 of 10.0 s)" in message
  assert "--config.data.num_workers (now 4)" in message


def test_a_split_held_up_by_its_input_says_so(
  tmp_path, data_config, tiny_mae, tiny_params, monkeypatch, caplog
):
  folder = tmp_path / "images"
  for i in range(16):
    data_makers.write_image(folder / f"{i:02d}.png")
  config = data_config(name="folder", path=folder, data_dir=tmp_path / "tfds", num_workers=1)
  split = data.load_split(config, data.resolve_categories(config)[0], "test")
  scoring = evaluation.Scoring.create(
    tiny_mae, tiny_params, num_masks=2, batch_size=8, num_workers=1
  )
  batches = data.batches
  monkeypatch.setattr(data, "batches", lambda *a, **k: _slow(batches(*a, **k), 1.0))
  with caplog.at_level(logging.WARNING, logger="maeday_jax"):
    scored = evaluation.score_split(scoring, split, progress=False)
  assert len(scored.indices) == 16
  assert 2.0 <= scored.input_wait_seconds <= scored.seconds
  assert "Raise --config.data.num_workers (now 1)" in caplog.text
  assert str(split) in caplog.text
