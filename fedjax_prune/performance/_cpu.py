"""CPU-specific speed: devices per core and the compiler options of a compiled round."""
from __future__ import annotations

import os

import jax


def round_compiler_options(platform: str | None = None) -> dict | None:
  """XLA compiler options for a compiled round on `platform` (default: JAX's default backend).

  Pass them to `jax.jit(..., compiler_options=...)` when you jit a round yourself
  (e.g. a `vmap` over seeds); `make_round` already does.

  On CPU: copy insertion with region analysis. Without it XLA:CPU copies every
  loop-carried weight that a matmul or convolution reads, once per local step,
  since it cannot prove the reads come before the in-place update (the LEAF CNN:
  a copy of its dense kernel per step). Without these copies the sequential round is
  faster on 2 cores, with the same results (benchmarks/engine.py, 8 clients:
  docs/results/engine.md, "Earlier on 2026-11-23 (02:12 UTC)", item 1). Elsewhere: None.
  """
  platform = jax.default_backend() if platform is None else platform
  if platform == "cpu":
    return {"xla_cpu_copy_insertion_use_region_analysis": True}
  return None


def usable_cpu_cores() -> int:
  """CPU cores this process may run on (its affinity mask), at least 1."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not Linux
    return max(1, os.cpu_count() or 1)


def split_cpu_into_devices(num_devices: int | None = None) -> int | None:
  """Exposes the host CPU to JAX as `num_devices` devices (default: one per usable core).

  Why: on CPU one client step already spreads each op over all cores, but with
  poor parallel efficiency. Sharding the client axis over one CPU device per core
  runs different clients on different cores at once, and the LEAF CNN round ran
  faster so on 2 cores (benchmarks/engine.py; docs/results/engine.md, "Earlier on
  2026-11-23: the in-graph round beats a loop of jitted steps on CPU", item 1). Results equal
  the unsharded round up to float summation order.

  Must be called before JAX runs anything (it sets `jax_num_cpu_devices`). It
  changes nothing, and returns None, when the backends are already initialised
  or when XLA_FLAGS already forces a host device count (tests do).

  Args:
    num_devices: CPU devices to create (>= 1); None = `usable_cpu_cores()`.

  Returns:
    The CPU device count set, or None when left unchanged.
  """
  if num_devices is None:
    num_devices = usable_cpu_cores()
  if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
    raise ValueError(f"num_devices must be an int >= 1 or None, got {num_devices!r}")
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  try:
    jax.config.update("jax_num_cpu_devices", num_devices)
  except RuntimeError:  # backends already initialised: keep what exists
    return None
  return num_devices
