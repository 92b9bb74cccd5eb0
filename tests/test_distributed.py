"""Multi-process FedAvg through `jax.distributed.initialize`: two CPU processes on localhost.

Each subprocess gets 2 fake CPU devices, so the global mesh has 4 devices over
2 processes; the cohort axis is sharded over all 4 (`make_round(mesh=...)`) and
the clients' sums meet in one cross-process `psum` (gloo collectives on CPU).
The final params must equal a single-process run: the unsharded round of this
process and the same sharded round over this process's 4 fake devices.

Run as a script (`python tests/test_distributed.py --worker ...`) the file is
the worker; the test spawns two of them.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import numpy as np

NUM_ROUNDS = 3
COHORTS = ([0, 3, 5, 1, 4], [2, 5, 0, 1, 3], [4, 1, 2])  # 5 or 3 clients: padded to 8 / 4 over 4 devices
SIZES = (5, 9, 3, 7, 4, 6)
EXECUTIONS = ("sequential", "vmap")


def fedavg_run(mesh=None, execution_name: str = "sequential"):
  """3 FedAvg rounds of the tiny MLP on 6 clients; returns the final params (host numpy).

  With a mesh, state and data are first made global arrays replicated over it
  (`jax.make_array_from_process_local_data`: every process holds the whole,
  small dataset; a process would pass only its own rows for a sharded one).
  """
  import jax
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from fedjax_prune import federated, testing

  execution = {"sequential": federated.Sequential(), "vmap": federated.Vmap(),
               "chunked2": federated.Chunked(2)}[execution_name]
  apply_fn, params = testing.tiny_mlp(jax.random.key(0))
  data = testing.tiny_client_data(seed=1, num_clients=len(SIZES), sizes=SIZES)
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4, num_epochs=2))
  state = alg.init(params, jax.random.key(1))
  if mesh is not None:
    replicated = NamedSharding(mesh, P())
    to_global = lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x))
    state, data = jax.tree.map(to_global, (state, data))
  round_fn = federated.make_round(alg, execution=execution, mesh=mesh)
  root = jax.random.key(7)
  for r, ids in enumerate(COHORTS[:NUM_ROUNDS]):
    state, metrics = round_fn(state, data, federated.make_cohort(ids), federated.round_key(root, r))
  # Replicated outputs: every process can read its own full copy.
  host = lambda x: np.asarray(x.addressable_data(0)) if hasattr(x, "addressable_data") else np.asarray(x)
  return jax.tree.map(host, state.params), {k: host(v) for k, v in metrics.items()}


def _flat(tree) -> dict:
  import jax
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _worker(args) -> None:
  import jax
  # XLA:CPU needs an explicit cross-process collectives backend; gloo ships with jaxlib.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{args.port}", num_processes=args.num_processes,
                             process_id=args.process_id, initialization_timeout=60)
  from fedjax_prune import federated
  assert jax.process_count() == args.num_processes, jax.process_count()
  assert jax.local_device_count() == 2 and jax.device_count() == 2 * args.num_processes
  arrays = {}
  for execution in args.executions.split(","):
    params, metrics = fedavg_run(federated.client_mesh(), execution)  # all devices, all processes
    arrays.update({f"{execution}/{k}": v for k, v in _flat(params).items()})
    arrays.update({f"{execution}/metric/{k}": v for k, v in metrics.items()})
  np.savez(args.out, **arrays)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(tmp_path, executions: str):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  outs = [str(tmp_path / f"proc{i}.npz") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--process-id", str(i),
                             "--num-processes", "2", "--port", str(port), "--executions", executions,
                             "--out", outs[i]],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()  # only the workers this test started
  return procs, logs, outs


def test_two_process_fedavg_equals_single_process(tmp_path):
  import jax
  import pytest

  from fedjax_prune import federated

  if not hasattr(jax.config, "jax_cpu_collectives_implementation"):  # added in jax 0.4.27
    pytest.skip(f"jax {jax.__version__} has no CPU cross-process collectives (jax_cpu_collectives_implementation)")

  procs, logs, outs = _run_two_processes(tmp_path, ",".join(EXECUTIONS))
  if any(p.returncode for p in procs):
    text = "\n".join(logs)
    if "gloo" in text.lower() and ("not supported" in text.lower() or "unimplemented" in text.lower()):
      pytest.skip("this jaxlib was built without gloo CPU collectives:\n" + text[-1500:])
    raise AssertionError("a worker failed:\n" + "\n---\n".join(l[-3000:] for l in logs))

  reference, ref_metrics = fedavg_run(None, "sequential")  # one process, no mesh
  ref = _flat(reference)
  results = [dict(np.load(o)) for o in outs]
  for res in results:  # both processes hold the same replicated result...
    for ex in EXECUTIONS:
      for k, v in ref.items():  # ...equal to one process's, for every client-execution strategy
        np.testing.assert_allclose(res[f"{ex}/{k}"], v, rtol=1e-5, atol=1e-6, err_msg=f"{ex} {k}")
      assert float(res[f"{ex}/metric/num_clients"]) == len(COHORTS[NUM_ROUNDS - 1])
      np.testing.assert_allclose(res[f"{ex}/metric/train_loss"], ref_metrics["train_loss"], rtol=1e-5)
  # And the rounds did something: params moved away from the initial model.
  from fedjax_prune import testing
  _, init = testing.tiny_mlp(jax.random.key(0))
  moved = max(float(np.max(np.abs(ref[k] - v))) for k, v in _flat(jax.tree.map(np.asarray, init)).items())
  assert moved > 1e-3

  if jax.device_count() >= 4:  # the same sharded round on 4 devices of one process agrees too
    sharded, _ = fedavg_run(federated.client_mesh(jax.devices()[:4]), "sequential")
    for k, v in _flat(sharded).items():
      np.testing.assert_allclose(results[0][f"sequential/{k}"], v, rtol=1e-5, atol=1e-6, err_msg=k)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--executions", default="sequential")
  parser.add_argument("--out", default="")
  _args = parser.parse_args()
  if _args.worker:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    _worker(_args)
