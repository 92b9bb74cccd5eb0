"""The federated engine: one round = one compiled program over a client axis.

`make_round(alg)` maps `alg.client_update` over the sampled cohort with a chosen
client-execution strategy, reduces the clients' outputs in-graph and calls
`alg.server_update`; the whole round is jitted once.

Client outputs are split in two (`ClientOutput`): `sums`, which the engine adds up
over the cohort inside the compiled round (every FedAvg-family aggregate,
partial/count averaging, gradient votes and metrics are sums), and `per_client`,
which comes back stacked along the client axis. Summing in-graph lets the
sequential strategy keep a running total instead of C copies of the model, and
lets the sharded round reduce with one `psum`. Padding clients (inactive) add
exactly zero: the engine masks their sums with `where`, so NaNs cannot leak.

Client execution strategies (all give the same result up to float summation order):
  * `Vmap()`: `jax.vmap` over all clients (best on GPU/TPU; on CPU convolutions
    with per-client kernels become grouped convolutions unless the model uses
    im2col convolutions, `conv_impl='im2col'`).
  * `Sequential()`: `lax.scan` over clients inside the program (no Python loop,
    no per-client dispatch; padding clients hold no examples and train zero steps).
  * `Chunked(size)`: `lax.scan` over chunks of `size` clients, `vmap` inside.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_prune.data import ClientData, client_slice, pad_cohort
from fedjax_prune.federated import _keys
from fedjax_prune.types import BatchStats, Metrics, Params, PRNGKey, PyTree

CLIENT_AXIS = "clients"


class ClientInfo(NamedTuple):
  """Per-client scalars handed to `client_update` (vmapped with the client)."""
  client_id: jax.Array     # [] int32, index into the federated dataset
  num_examples: jax.Array  # [] int32, real examples of this client
  active: jax.Array        # [] bool, False for padding clients
  capacity: jax.Array      # [] float32 in (0, 1], relative model size (FIARSE/HeteroFL)


class Cohort(NamedTuple):
  """The clients of one round (built on the host, a few ints per round).

  Attributes:
    client_ids: [C] int32 indices into the dataset's client axis.
    active: [C] bool, False for padding clients (weight 0).
    capacity: [C] float32 relative model capacity per client (1.0 = full model).
  """
  client_ids: Any
  active: Any
  capacity: Any


def make_cohort(client_ids, *, capacity=None, multiple: int = 1, size: int | None = None
                ) -> Cohort:
  """Builds a host-side Cohort, padded with inactive clients to a multiple.

  Args:
    client_ids: [C] sampled client indices: integers, distinct (each client's key
      is derived from its id, so a repeated id would train the same client twice
      with the same key).
    capacity: optional [C] capacities (default all 1.0).
    multiple: pad C up to a multiple of this (e.g. the device count).
    size: pad to exactly this many slots first (then to `multiple`): a fixed shape for
      cohorts of varying size (Poisson sampling); with it the cohort may be empty
      (padding only: the round changes nothing but what the server adds itself).

  Raises:
    ValueError: empty cohort without `size`, more ids than `size`, non-integer or
      repeated ids, capacity of another shape.
  """
  raw = np.asarray(client_ids).reshape(-1)
  if size is not None:
    if isinstance(size, bool) or int(size) != size or size < 1 or raw.size > size:
      raise ValueError(f"size must be an integer >= max(1, number of ids {raw.size}), "
                       f"got {size!r}")
    if raw.size == 0:
      raw = np.zeros(0, np.int32)
  elif raw.size == 0:
    raise ValueError("empty cohort: a round needs at least one client")
  if raw.dtype == bool or not np.issubdtype(raw.dtype, np.integer):
    raise ValueError(f"cohort client ids must be integers, got dtype {raw.dtype} "
                     f"({raw[:8].tolist()}); a float id would be truncated to another client")
  ids = raw.astype(np.int32)
  values, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"cohort client ids {values[counts > 1].tolist()} appear more than once: "
                     "each client trains once per round with a key derived from its id "
                     "(sample without replacement)")
  cap = np.ones(ids.shape, np.float32) if capacity is None else np.asarray(capacity, np.float32)
  if cap.shape != ids.shape:
    raise ValueError(f"capacity has shape {cap.shape}, expected {ids.shape} (one per client)")
  real = ids.size
  if size is not None and size > real:  # the fixed slots: padding repeats a valid id
    ids = np.concatenate([ids, np.full(int(size) - real, ids[0] if real else 0, np.int32)])
  padded_ids, active = pad_cohort(ids, multiple)
  active = active & (np.arange(padded_ids.size) < real)
  cap = np.concatenate([cap, np.ones(padded_ids.size - real, np.float32)])
  return Cohort(padded_ids, active, cap)


class ClientOutput(NamedTuple):
  """What one client returns.

  Attributes:
    sums: pytree summed over the cohort in-graph (pre-weight it yourself, e.g.
      `n_k * delta_k` and `n_k`); padding clients contribute exactly zero. A
      leaf with methods `dense()` and `sum_over_clients()` is summed its own way:
      `performance.LowRankSum(left, right)` as the dense matrix left^T right (under
      `Vmap` one GEMM over every client's rows).
    per_client: pytree returned stacked along the client axis [C, ...].
  """
  sums: PyTree
  per_client: PyTree = ()


class InitFn(Protocol):
  """`init(params, key, batch_stats=None, **kwargs) -> ServerState`.

  The server state is the algorithm's own pytree (a NamedTuple of arrays). Keyword
  arguments beyond `batch_stats` are the algorithm's own (e.g. `fedavg`'s `masks`).
  """

  def __call__(self, params: Params, key: PRNGKey, /, batch_stats: BatchStats | None = None,
               **kwargs: Any) -> PyTree: ...


class ClientUpdateFn(Protocol):
  """`client_update(server_state, data, info, key) -> ClientOutput`, for ONE client.

  `data` is the client's `ClientData` slice (x [E, ...], y [E], num_examples []),
  `info` its `ClientInfo`, `key` = fold_in(client_root, client_id).
  """

  def __call__(self, server_state: PyTree, data: ClientData, info: ClientInfo, key: PRNGKey,
               /) -> ClientOutput: ...


class ServerUpdateFn(Protocol):
  """`server_update(server_state, outputs, key) -> (ServerState, Metrics)`.

  `outputs.sums` are summed over the cohort and `outputs.per_client` leaves are [C, ...].
  """

  def __call__(self, server_state: PyTree, outputs: ClientOutput, key: PRNGKey,
               /) -> tuple[PyTree, Metrics]: ...


class FedAlgorithm(NamedTuple):
  """A federated algorithm as three pure functions (the optax pattern).

  Attributes:
    init: `init(params, key, batch_stats=None) -> ServerState` (`InitFn`).
    client_update: `client_update(server_state, data, info, key) -> ClientOutput`
      for ONE client: `data` is its `ClientData` slice (x [E, ...], y [E],
      num_examples []), `info` its `ClientInfo`, `key` = fold_in(client_root, client_id)
      (`ClientUpdateFn`).
    server_update: `server_update(server_state, outputs, key) -> (ServerState, Metrics)`
      where `outputs.sums` are summed over the cohort and `outputs.per_client`
      leaves are [C, ...] (`ServerUpdateFn`).
  """
  init: InitFn
  client_update: ClientUpdateFn
  server_update: ServerUpdateFn


@dataclasses.dataclass(frozen=True)
class Vmap:
  """All clients at once with `jax.vmap`."""


@dataclasses.dataclass(frozen=True)
class Sequential:
  """Clients one after another with `lax.scan`, inside the compiled round."""


@dataclasses.dataclass(frozen=True)
class Chunked:
  """`lax.scan` over chunks of `size` clients, `jax.vmap` within a chunk."""
  size: int

  def __post_init__(self):
    if not isinstance(self.size, int) or self.size < 1:
      raise ValueError(f"Chunked.size must be an int >= 1, got {self.size!r}")


Execution = Vmap | Sequential | Chunked


def split_round_key(round_key: PRNGKey) -> tuple[PRNGKey, PRNGKey]:
  """(client_root, server_key). Client k's key is fold_in(client_root, k)."""
  client_root, server_key = _keys.split(round_key)
  return client_root, server_key


@jax.jit
def round_key(root_key: PRNGKey, round_idx) -> PRNGKey:
  """The key of round `round_idx` from the run's root key: `fold_in(root_key, round_idx)`.

  Jitted because it runs on the host once per round: an eager `fold_in` costs
  about as much dispatch on CPU as a whole round of a small model, the jitted call
  about a tenth of that (docs/results/engine.md, "Earlier: status at 2026-11-23, 04:00
  UTC", item 1). Same keys either way.
  """
  return _keys.fold_in(root_key, round_idx)


def _zeros_like_struct(struct):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), struct)


def _sums_its_own_way(x: Any) -> bool:
  """A `ClientOutput.sums` leaf that adds up as a dense array it does not hold (e.g.
  `performance.LowRankSum`): it has `dense()` (one client's value) and
  `sum_over_clients()` (the sum over the leading client axis of stacked leaves)."""
  return hasattr(x, "sum_over_clients") and hasattr(x, "dense")


def _densify_sums(sums: Any) -> Any:
  """One client's `sums` with each leaf that sums its own way replaced by its dense value."""
  return jax.tree.map(lambda x: x.dense() if _sums_its_own_way(x) else x, sums,
                      is_leaf=_sums_its_own_way)


def _sum_stacked(sums_C: Any) -> Any:
  """The sum over the leading client axis of stacked `sums` [C, ...]."""
  return jax.tree.map(lambda x: x.sum_over_clients() if _sums_its_own_way(x) else jnp.sum(x, axis=0),
                      sums_C, is_leaf=_sums_its_own_way)


def _masked_sums(active, sums):
  return jax.tree.map(lambda x: jnp.where(active, x, jnp.zeros((), x.dtype)), sums)


def _run_local_cohort(client_update, server_state, dataset: ClientData, client_root: PRNGKey,
                      ids_C, active_C, capacity_C, execution: Execution) -> ClientOutput:
  """Runs the clients of one device's share of the cohort; sums are reduced locally."""

  def one_client(client_id, active, capacity, key):
    data = client_slice(dataset, client_id)
    # A padding client holds no examples, so its local step loop runs zero times:
    # it costs next to nothing without a branch, and its sums are masked below.
    data = data._replace(num_examples=jnp.where(active, data.num_examples, 0))
    info = ClientInfo(client_id, data.num_examples.astype(jnp.int32), active, capacity)
    out = client_update(server_state, data, info, key)
    if not isinstance(out, ClientOutput):
      raise TypeError(f"client_update must return a ClientOutput, got {type(out).__name__}")
    return ClientOutput(_masked_sums(active, out.sums), out.per_client)

  num_clients = ids_C.shape[0]
  # All the cohort's keys in one batched hash, not one hash loop per client in the scan.
  keys_C = jax.vmap(lambda i: _keys.fold_in(client_root, i))(ids_C)
  if isinstance(execution, Vmap):
    outs = jax.vmap(one_client)(ids_C, active_C, capacity_C, keys_C)
    return ClientOutput(_sum_stacked(outs.sums), outs.per_client)

  if isinstance(execution, Sequential):
    sums_struct = jax.eval_shape(lambda *xs: _densify_sums(one_client(*xs).sums),
                                 ids_C[0], active_C[0], capacity_C[0], keys_C[0])

    def body(total, xs):
      # No branch on `active`: a lax.cond here cost a copy of every summed leaf per
      # client and kept the masking, weighting and running sum from fusing into one
      # pass (with the per-step branches, a measurable share of an 8-client LEAF CNN
      # round in an XLA:CPU profile: docs/results/engine.md, "Figures moved out of
      # the library's docstrings"). Padding clients train zero steps.
      out = one_client(*xs)
      return jax.tree.map(jnp.add, total, _densify_sums(out.sums)), out.per_client

    total, per_client = jax.lax.scan(body, _zeros_like_struct(sums_struct),
                                     (ids_C, active_C, capacity_C, keys_C))
    return ClientOutput(total, per_client)

  if isinstance(execution, Chunked):
    size = min(execution.size, num_clients)
    if num_clients % size:
      raise ValueError(f"cohort of {num_clients} is not a multiple of the chunk size {size}")
    chunks = lambda a: a.reshape((num_clients // size, size) + a.shape[1:])
    vmapped = jax.vmap(one_client)
    sums_struct = jax.eval_shape(lambda *xs: _sum_stacked(vmapped(*xs).sums),
                                 ids_C[:size], active_C[:size], capacity_C[:size], keys_C[:size])
    zero_sums = _zeros_like_struct(sums_struct)

    def body(total, xs):
      out = vmapped(*xs)
      chunk_sum = _sum_stacked(out.sums)
      return jax.tree.map(jnp.add, total, chunk_sum), out.per_client

    total, per_client = jax.lax.scan(body, zero_sums,
                                     (chunks(ids_C), chunks(active_C), chunks(capacity_C),
                                      chunks(keys_C)))
    per_client = jax.tree.map(lambda x: x.reshape((num_clients,) + x.shape[2:]), per_client)
    return ClientOutput(total, per_client)

  raise TypeError(f"unknown execution strategy {execution!r}; use Vmap(), Sequential() or Chunked(size)")


def _pad_cohort(cohort: Cohort, multiple: int) -> Cohort:
  """Pads the cohort arrays (traced) with inactive clients to a multiple."""
  num = cohort.client_ids.shape[0]
  pad = (-num) % multiple
  if pad == 0:
    return cohort
  return Cohort(jnp.concatenate([cohort.client_ids, jnp.broadcast_to(cohort.client_ids[0], (pad,))]),
                jnp.concatenate([cohort.active, jnp.zeros((pad,), bool)]),
                jnp.concatenate([cohort.capacity, jnp.ones((pad,), cohort.capacity.dtype)]))


def run_clients(client_update: ClientUpdateFn, server_state, dataset: ClientData, cohort: Cohort,
                client_root: PRNGKey, *, execution: Execution | None = None,
                mesh: Mesh | None = None) -> ClientOutput:
  """Runs `client_update` for every cohort member and reduces their sums.

  Args:
    client_update: one-client update (see FedAlgorithm).
    server_state: broadcast to every client.
    dataset: the full federated dataset on device (clients gathered in-graph).
    cohort: Cohort of [C] arrays.
    client_root: client k gets fold_in(client_root, k).
    execution: Vmap(), Sequential() or Chunked(size); None = `default_execution()`.
    mesh: optional 1-D mesh with axis 'clients'; the cohort is split over its
      devices (padded to a multiple of the device count with inactive clients)
      and the sums are reduced with one psum.

  Returns:
    ClientOutput with summed `sums` and [C', ...] `per_client` (C' >= C when padded;
    the first C rows belong to the cohort in order).
  """
  if execution is None:
    execution = default_execution(_mesh_platform(mesh))
  cohort = Cohort(jnp.asarray(cohort.client_ids, jnp.int32), jnp.asarray(cohort.active, bool),
                  jnp.asarray(cohort.capacity, jnp.float32))
  num_clients = cohort.client_ids.shape[0]
  chunk = execution.size if isinstance(execution, Chunked) else 1
  if mesh is None:
    if isinstance(execution, Chunked):
      cohort = _pad_cohort(cohort, min(chunk, num_clients))
    out = _run_local_cohort(client_update, server_state, dataset, client_root, *cohort, execution)
    return ClientOutput(out.sums, jax.tree.map(lambda x: x[:num_clients], out.per_client))

  if CLIENT_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh must have an axis named {CLIENT_AXIS!r}, got {mesh.axis_names}")
  num_devices = mesh.shape[CLIENT_AXIS]
  per_device = -(-num_clients // num_devices)
  if isinstance(execution, Chunked):
    per_device = -(-per_device // min(chunk, per_device)) * min(chunk, per_device)
  cohort = _pad_cohort(cohort, per_device * num_devices)  # per_device * D >= C: pads to exactly that

  def local(state, data, root, ids, active, capacity):
    out = _run_local_cohort(client_update, state, data, root, ids, active, capacity, execution)
    return ClientOutput(jax.lax.psum(out.sums, CLIENT_AXIS), out.per_client)

  sharded = jax.shard_map(local, mesh=mesh,
                          in_specs=(P(), P(), P(), P(CLIENT_AXIS), P(CLIENT_AXIS), P(CLIENT_AXIS)),
                          out_specs=ClientOutput(P(), P(CLIENT_AXIS)), check_vma=False)
  out = sharded(server_state, dataset, client_root, *cohort)
  return ClientOutput(out.sums, jax.tree.map(lambda x: x[:num_clients], out.per_client))


def spread_over_coordinates(per_client: PyTree, mesh: Mesh) -> PyTree:
  """Reshards [C, ...] per-client leaves from the client axis to a coordinate axis.

  The clients' outputs come back split over the mesh by client. A server statistic
  taken across clients per coordinate (the robust aggregators' median, trimmed mean,
  Krum distances) on that layout makes XLA gather every client onto every device and
  compute the whole statistic on each: on a 2-device CPU the FEMNIST trimmed-mean round
  took 5.1 s against 3.3 s unsharded (docs/results/robust.md, "Cost"). Split instead
  along each leaf's largest non-client dimension that the device count divides, every
  device computes the statistic on its share of the coordinates (an all-to-all, then
  elementwise work; the values are those of the unsharded statistic). Leaves with no
  such dimension (per-client scalars, odd shapes) keep their layout; a statistic that
  ignores `per_client` (FedAvg's mean) compiles the constraint away.
  """
  devices = mesh.shape[CLIENT_AXIS]

  def spread(x):
    if not hasattr(x, "ndim") or x.ndim < 2:
      return x
    dims = [d for d in range(1, x.ndim) if x.shape[d] % devices == 0]
    if not dims:
      return x
    axis = max(dims, key=lambda d: x.shape[d])
    spec = [None] * x.ndim
    spec[axis] = CLIENT_AXIS
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))

  return jax.tree.map(spread, per_client)


def _mesh_platform(mesh: Mesh | None) -> str | None:
  """The platform of the mesh's devices; None (JAX's default backend) without a mesh."""
  return mesh.devices.flat[0].platform if mesh is not None else None


def default_execution(platform: str | None = None) -> Execution:
  """The client-execution strategy `make_round` uses when given none, for `platform`
  (default: JAX's default backend).

  CPU: `Sequential()` (a loop over clients in the compiled round; on 2 cores it
  beat vmap and chunked strategies for conv nets and MLPs, docs/results/engine.md).
  GPU/TPU: `Chunked(128)`, i.e. `vmap` over up to 128 clients at a time: on an H100
  it ran close to a full `vmap` at 512 clients, with a quarter of its activation
  memory, while `Sequential()` was several times slower there
  (docs/results/engine.md, "Figures moved out of the library's docstrings"). For the fastest
  strategy of a given workload, time the candidates (`performance.select_strategy`; the
  experiments' `strategy='auto'`).
  """
  platform = jax.default_backend() if platform is None else platform
  return Sequential() if platform == "cpu" else Chunked(128)


def make_round(alg: FedAlgorithm, *, execution: Execution | None = None, mesh: Mesh | None = None,
               donate: bool = False, compiler_options: dict | None = None) -> Callable:
  """Builds the jitted round of `alg`.

  Args:
    alg: the FedAlgorithm.
    execution: client-execution strategy (module docstring); None = `default_execution()`
      for the mesh's platform (Sequential on CPU, Chunked(128) on accelerators);
      `performance.select_strategy` times candidates.
    mesh: optional 1-D device mesh with axis 'clients' to shard the cohort.
    donate: donate the server state's buffers to the round (saves a model copy;
      the state passed in is then deleted, so never reuse it, nor the params
      given to `alg.init`, which the first state holds as is).
    compiler_options: XLA options for the round's jit (None: JAX's defaults). On CPU
      `performance.round_compiler_options()` makes the sequential round faster with
      the same results; `performance.Strategy.make_round` passes them.

  Returns:
    `round_fn(server_state, dataset, cohort, round_key) -> (server_state, metrics)`,
    jitted; it compiles once per (state structure, dataset shape, cohort size).
  """

  platform = _mesh_platform(mesh)
  if execution is None:
    execution = default_execution(platform)

  def round_fn(server_state, dataset: ClientData, cohort: Cohort, round_key: PRNGKey):
    client_root, server_key = split_round_key(round_key)
    outputs = run_clients(alg.client_update, server_state, dataset, cohort, client_root,
                          execution=execution, mesh=mesh)
    if mesh is not None:
      outputs = outputs._replace(per_client=spread_over_coordinates(outputs.per_client, mesh))
    return alg.server_update(server_state, outputs, server_key)

  donate_argnums = (0,) if donate else ()
  nestable = jax.jit(round_fn, donate_argnums=donate_argnums)
  options = compiler_options
  if not options:
    jitted = nestable
  else:
    # JAX takes compiler options on a top-level jit only: called inside a caller's
    # jit, vmap or scan (vmap over seeds, a scan over rounds), the round is the plain
    # jit and the caller's own jit sets the options.
    top_level = jax.jit(round_fn, donate_argnums=donate_argnums, compiler_options=options)

    def jitted(server_state, dataset, cohort, round_key):
      # Tried top-level first: JAX itself tells a nested call apart (checking the
      # arguments for tracers here cost host time every round: docs/results/engine.md,
      # "Current status").
      try:
        return top_level(server_state, dataset, cohort, round_key)
      except ValueError as err:
        if "compiler_options" not in str(err) or "top-level" not in str(err):
          raise
      return nestable(server_state, dataset, cohort, round_key)

    jitted.lower = top_level.lower
    jitted._cache_size = top_level._cache_size
  compiled = jitted
  checked_counts: list = []  # the dataset's num_examples array last checked (by identity)

  def checked_round(server_state, dataset, cohort, round_key):
    # Inside jit an out-of-range index is clamped, not an error: a bad client id or an
    # example count above the padded length would silently train the wrong data. So
    # both are checked here on the host, where they are concrete: the cohort's ids
    # when they are a numpy array (make_cohort's; cheap: docs/results/engine.md, "Figures
    # moved out of the library's docstrings"), the counts once per dataset.
    check_cohort_ids(cohort, dataset.x.shape[0])
    counts = dataset.num_examples
    if not (checked_counts and checked_counts[0] is counts) and not isinstance(counts, jax.core.Tracer):
      check_example_counts(counts, dataset.x.shape[1])
      checked_counts[:] = [counts]
    return compiled(server_state, dataset, cohort, round_key)

  checked_round.lower = compiled.lower
  checked_round._cache_size = compiled._cache_size
  jitted = checked_round
  if mesh is None:
    return jitted
  replicated = NamedSharding(mesh, P())

  placed_data: dict = {}

  def place_dataset(dataset):
    # The dataset is copied to every device once, not once per round: the replicated
    # copy is kept for as long as the same arrays are passed in.
    leaves = jax.tree.leaves(dataset)
    held = placed_data.get("source")
    if held is None or len(held) != len(leaves) or any(a is not b for a, b in zip(held, leaves)):
      placed_data.update(source=leaves, placed=jax.device_put(dataset, replicated))
    return placed_data["placed"]

  def place_state(server_state):
    # The round returns the server state replicated over the mesh; placing round 1's
    # (single-device) state the same way keeps one compilation for every round.
    # A state that is already replicated (every later round's) is passed as is: a
    # device_put of it copies nothing but costs host time every round, far more than
    # the sharding check (docs/results/engine.md, "Earlier: status at 2026-11-23,
    # 04:00 UTC", item 3, and "Figures moved out of the library's docstrings").
    leaves = jax.tree.leaves(server_state)
    if all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
           and x.sharding == replicated for x in leaves):
      return server_state
    return jax.device_put(server_state, replicated)

  def placed_round(server_state, dataset, cohort, round_key):
    return jitted(place_state(server_state), place_dataset(dataset), cohort, round_key)

  placed_round.lower = lambda server_state, dataset, *args: jitted.lower(
      place_state(server_state), place_dataset(dataset), *args)
  placed_round._cache_size = jitted._cache_size
  return placed_round


def check_cohort_ids(cohort: Cohort, num_clients: int) -> None:
  """Raises IndexError when a host-side cohort names a client outside [0, num_clients).

  Traced or device arrays (a caller's jit, `jax.vmap` over seeds) are not checked:
  reading them would cost a device-to-host copy every round.
  """
  ids = cohort.client_ids
  if type(ids) is np.ndarray and ids.size:
    lo, hi = ids.min(), ids.max()
    if lo < 0 or hi >= num_clients:
      bad = ids[(ids < 0) | (ids >= num_clients)]
      raise IndexError(f"cohort client ids {bad.tolist()} are outside the dataset's "
                       f"{num_clients} clients: allowed [0, {num_clients - 1}]")


def check_example_counts(num_examples: Any, max_examples: int) -> None:
  """Raises ValueError when a client's num_examples is negative or above the padded
  example axis (`max_examples` = E of x [N, E, ...]); `num_examples` concrete [N]."""
  counts = np.asarray(jax.device_get(num_examples))
  bad = np.flatnonzero((counts < 0) | (counts > max_examples))
  if bad.size:
    raise ValueError(f"dataset.num_examples of clients {bad[:8].tolist()} "
                     f"({counts[bad[:8]].tolist()}) are outside [0, {max_examples}], the "
                     f"padded example axis of dataset.x {max_examples} long")


def client_mesh(devices=None) -> Mesh:
  """A 1-D mesh ('clients',) over `devices` (default: all devices, all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (CLIENT_AXIS,))
