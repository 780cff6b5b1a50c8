"""Batches (fields, padding, sharding, prefetch) and the few-shot selection."""

import threading

import numpy as np
import pytest

from maeday_jax import data, resizing
from maeday_jax.data import images


def _record(i: int, mask: bool = False) -> dict:
  rng = np.random.default_rng(i)
  hw = (10 + i % 9, 30 - i % 11)
  m = np.zeros(hw, np.uint8)
  if mask:
    m[2:6, 3:9] = 1
  return {
    "image": images.encode_png(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)),
    "mask": images.encode_png(m) if mask else b"",
    "label": int(mask),
    "defect_type": "anomaly" if mask else "good",
    "file_name": f"img_{i:02d}.png",
  }


class CountingSource(list):
  """Records, counting reads so tests can see how far ahead the pipeline reads."""

  def __init__(self, records):
    super().__init__(records)
    self.reads = 0
    self.lock = threading.Lock()

  def __getitem__(self, index):
    with self.lock:
      self.reads += 1
    return super().__getitem__(index)


def _split(n: int = 7, **kwargs) -> data.Split:
  records = [_record(i, mask=i % 3 == 1) for i in range(n)]
  return data.Split("memory", "things", "test", CountingSource(records), **kwargs)


def test_batch_fields_and_padding():
  split = _split(7)
  got = list(data.batches(split, 3, 16, shard_index=0, shard_count=1, num_workers=2))
  assert len(got) == 3
  last = got[-1]
  assert last["valid"].tolist() == [True, False, False]
  assert last["index"].tolist() == [6, -1, -1] and last["file_name"] == ["img_06.png", "", ""]
  assert last["label"].tolist()[1:] == [-1, -1] and not last["image"][1:].any()
  for batch in got:
    assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (3, 16, 16) and batch["mask"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    assert batch["valid"].dtype == bool and batch["original_size"].dtype == np.int32
    for row in np.flatnonzero(batch["valid"]):
      example = split[int(batch["index"][row])]
      np.testing.assert_allclose(
        batch["image"][row], data.preprocess_image(example["image"], 16), rtol=1e-6
      )
      np.testing.assert_array_equal(
        batch["mask"][row], resizing.resize_mask_pillow(example["mask"], 16)
      )
      assert batch["label"][row] == example["label"]
      assert batch["file_name"][row] == example["file_name"]
      assert batch["original_size"][row].tolist() == list(example["image"].shape[:2])
  assert got[0]["mask"][1].any() and set(np.unique(got[0]["mask"])) == {0, 1}


@pytest.mark.parametrize("shard_count", [2, 3, 10])
def test_shards_cover_every_example_once_in_lock_step(shard_count):
  split = _split(7)
  seen, lengths = [], set()
  for shard in range(shard_count):
    shard_batches = list(
      data.batches(split, 2, 8, shard_index=shard, shard_count=shard_count, num_workers=1)
    )
    lengths.add(len(shard_batches))
    for batch in shard_batches:
      seen += batch["index"][batch["valid"]].tolist()
      assert (batch["index"][~batch["valid"]] == -1).all()
  assert sorted(seen) == list(range(7))
  assert lengths == {data.batches_per_shard(7, 2, shard_count)}


def test_default_shard_is_this_jax_process():
  import jax

  assert jax.process_count() == 1
  got = list(data.batches(_split(5), 4, 8))
  assert sum(int(b["valid"].sum()) for b in got) == 5


def test_indices_subset_keeps_their_order():
  got = list(data.batches(_split(7), 2, 8, shard_index=0, shard_count=1, indices=[5, 0, 3]))
  assert [i for b in got for i in b["index"].tolist()] == [5, 0, 3, -1]


def test_prefetch_bounds_memory_and_early_stop_is_clean():
  split = _split(40)
  iterator = data.batches(split, 4, 8, shard_index=0, shard_count=1, num_workers=2, prefetch=1)
  next(iterator)
  assert split.source.reads <= (1 + 1) * 4  # The batch given out plus one ahead.
  iterator.close()  # Stops the workers; must not read the rest of the split.
  assert split.source.reads <= 3 * 4


def test_example_that_fails_to_decode_is_reported_and_invalid():
  split = _split(3)
  split.source[1] = {**split.source[1], "image": b"garbage"}
  batch = next(data.batches(split, 3, 8, shard_index=0, shard_count=1))
  assert batch["valid"].tolist() == [True, False, True]
  assert batch["index"].tolist() == [0, 1, 2]
  ((where, reason),) = split.skipped
  assert "img_01.png" in reason and "not an image" in reason


def test_bad_arguments():
  with pytest.raises(ValueError, match="shard_index"):
    list(data.batches(_split(3), 2, 8, shard_index=2, shard_count=2))
  with pytest.raises(ValueError, match="batch_size"):
    list(data.batches(_split(3), 0, 8, shard_index=0, shard_count=1))


def test_shots_are_deterministic_per_seed_and_independent_of_order():
  split = _split(12)
  shots = data.select_shots(split, 3, seed=0)
  assert shots == data.select_shots(split, 3, seed=0) and len(set(shots)) == 3
  selections = {tuple(sorted(data.select_shots(split, 3, seed=s))) for s in range(5)}
  assert len(selections) > 1
  # The same files are chosen whatever order the split lists them in.
  reversed_split = data.Split("memory", "things", "test", list(reversed(split.source)))
  names = {split.file_name(i) for i in shots}
  assert {reversed_split.file_name(i) for i in data.select_shots(reversed_split, 3, 0)} == names
  # A smaller k is a prefix of a larger one: 1-shot uses one of the 2-shot images.
  assert data.select_shots(split, 2, 7)[:1] == data.select_shots(split, 1, 7)
  assert data.select_shots(split, 0, 0) == []


def test_too_many_shots_is_a_clear_error():
  with pytest.raises(
    ValueError, match="cannot choose 13 shots from memory/things/test: it has only 12"
  ):
    data.select_shots(_split(12), 13, 0)
