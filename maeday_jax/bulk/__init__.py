"""Bulk zero-shot scoring of very many images on many hosts, exactly once, resumable.

- `source`: list a folder, a glob or a manifest once, sorted, sharded by process.
- `reader`: decode one process's images in fixed-size batches, ahead of the model.
- `engine`: score the batches (or a transductive detector's groups), resume, commit.
- `shards`: each process's committed parts and progress record, the resume agreement.
- `merge`: `scores.csv`, `scores.parquet`, image metrics, pictures, `summary.json`.
- `maps_store`: the optional anomaly-map shards and their index (`load_map`).

The job is `maeday_jax.jobs.score` (`configs/score.py`).
"""

from maeday_jax.bulk import engine, maps_store, merge, reader, shards, source

__all__ = ["engine", "maps_store", "merge", "reader", "shards", "source"]
