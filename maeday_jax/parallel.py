"""Data parallelism over every device of every host with one 1-D `Mesh`.

Each process feeds its own slice of the global batch; `jax.jit` with `NamedSharding`
splits it over the local devices and replicates parameters. Results come back to each
process for its own examples only; `allgather_arrays` then pools what every process
found (scores, metric tables) where a report needs all of them.
"""

import io

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

try:  # JAX >= 0.7
  from jax import shard_map as _shard_map

  _UNCHECKED = {"check_vma": False}
except ImportError:  # pragma: no cover - older JAX
  from jax.experimental.shard_map import shard_map as _shard_map

  _UNCHECKED = {"check_rep": False}


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def require_divides_devices(batch_size: int, field: str) -> None:
  """Checks that a global batch splits evenly over every device of every host.

  Raises:
    ConfigError: naming `field` and the multiple to use.
  """
  from maeday_jax.config_errors import require

  devices = jax.device_count()
  require(
    batch_size % devices == 0,
    field,
    f"{batch_size} is not a multiple of the number of devices ({devices}); use a "
    f"multiple of {devices}.",
  )


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share of the global batch; checks it divides over the devices."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise ValueError(
      f"batch_size={global_batch_size} must be a multiple of the number of devices "
      f"({devices}); set --config.batch_size to a multiple of {devices}."
    )
  return global_batch_size // jax.process_count()


def replicate(tree, mesh: Mesh):
  """Places a parameter tree on every device of `mesh` (of every process).

  With several processes every process must call this with the same values (JAX checks):
  arrays already on one local device (including PRNG keys) go through the host, since
  `device_put` cannot move a committed local array onto other hosts' devices.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and x.is_fully_addressable:
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = put(jax.random.key_data(x))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
      x = np.asarray(x)
    return jax.device_put(x, sharding)

  return jax.tree.map(put, tree)


def per_shard(fn, mesh: Mesh, in_specs, out_specs):
  """`fn` run by each device on its own block (`shard_map` over `mesh`, unchecked
  replication): what a step computes row by row, e.g. a data-augmentation pipeline,
  stays on the device that holds the rows instead of being partitioned by XLA."""
  return _shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **_UNCHECKED)


def shard_batch(tree, mesh: Mesh):
  """Assembles global arrays from each process's local batch (leading axis)."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def to_local_numpy(tree, mesh: Mesh):
  """The rows of batch-sharded global arrays that belong to this process, as NumPy (NumPy
  arrays, already this process's rows, are returned as they are)."""
  if jax.process_count() == 1 or all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree)):
    return jax.tree.map(np.asarray, tree)
  local = multihost_utils.global_array_to_host_local_array(tree, mesh, PartitionSpec(DATA_AXIS))
  return jax.tree.map(np.asarray, local)


def allgather_arrays(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """Every process's `arrays`, one dict per process in process order, on every process.

  Arrays may differ in shape and dtype between processes (ragged results such as one
  shard's scores, 64-bit keys, or strings), so they travel as one `.npz` payload per
  process, padded to the longest; nothing is pickled. A collective: every process must
  call it. With a single process it returns `[arrays]` without communicating.
  """
  if jax.process_count() == 1:
    return [dict(arrays)]
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  payload = np.frombuffer(buffer.getvalue(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: payload.size] = payload
  rows = np.asarray(multihost_utils.process_allgather(padded))
  gathered = []
  for row, size in zip(rows, sizes.reshape(-1), strict=True):
    with np.load(io.BytesIO(row[:size].tobytes()), allow_pickle=False) as npz:
      gathered.append({name: npz[name] for name in npz.files})
  return gathered


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier called `name` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
