"""The pfl-research reference workload: CIFAR-10 IID, 2-layer CNN, 1500 rounds x 50 clients.

  python benchmarks/pfl_reference.py                 # full workload (GPU: seconds; CPU: use --rounds)
  python benchmarks/pfl_reference.py --rounds 20     # CPU: time 20 rounds, extrapolate to 1500
  python benchmarks/pfl_reference.py --smoke         # tiny (CI)

Workload (pfl-research `benchmarks/image_classification`, CIFAR-10 IID): 50,000
training images split IID into 1,000 clients of 50 examples, 50 clients per
round, 1 local epoch of batch 10 (5 local SGD steps), FedAvg, 1,500 rounds.
Model: pfl-research's `simple_cnn` (conv3x3 32 valid -> ReLU -> conv3x3 64
valid -> ReLU -> max-pool 2 -> flatten -> dense 128 -> ReLU -> dense 10;
1.63 M params) without its two dropout layers (our model specs have none;
dropout costs little next to the convolutions).

DATA IS SYNTHETIC: CIFAR-shaped uint8 images with random labels, kept on the
device like the real ones would be. That is fine for timing (nothing here
depends on the pixel values), not for accuracy.

Timed separately: compile (ahead-of-time `lower().compile()` of the round,
and of the multi-round program), then wall time of all rounds after compile,
in two modes:
  * `loop`: one jitted round per Python iteration, clients sampled on the host
    each round (what a training script does);
  * `scan`: `--rounds-per-call` rounds inside one compiled `lax.scan` with the
    cohorts pre-sampled on the host (no per-round dispatch at all).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _common  # noqa: E402
from fedjax_prune import accounting, federated, models, performance  # noqa: E402
from fedjax_prune.data import ClientData, sample_uniform  # noqa: E402


def pfl_simple_cnn(num_classes: int = 10, input_shape=(32, 32, 3)) -> models.ConvNetSpec:
  """pfl-research's `simple_cnn` (without dropout) as a width spec."""
  return models.ConvNetSpec(
      input_shape=input_shape,
      convs=(models.ConvSpec(features=32, kernel=3, padding="VALID"),
             models.ConvSpec(features=64, kernel=3, padding="VALID", pool=2)),
      head="flatten", hidden=(128,), num_classes=num_classes, norm="none")


def synthetic_cifar(num_clients: int, examples: int, key, input_shape=(32, 32, 3),
                    num_classes: int = 10) -> ClientData:
  """CIFAR-shaped uint8 images with random labels, [num_clients, examples, ...]."""
  kx, ky = jax.random.split(key)
  x = jax.random.randint(kx, (num_clients, examples) + tuple(input_shape), 0, 256, jnp.int32).astype(jnp.uint8)
  y = jax.random.randint(ky, (num_clients, examples), 0, num_classes, jnp.int32)
  return ClientData(x, y, jnp.full((num_clients,), examples, jnp.int32))


def default_strategy() -> performance.Strategy:
  # CPU: in-graph loop with loop-safe conv gradients; accelerators: one vmap of im2col convs with
  # the dense kernel as factors (one H100: 1500 rounds in 15-17 s vs 50-59 s for vmap+lax).
  if jax.default_backend() == "cpu":
    return performance.Strategy(federated.Sequential(), "tapgrad", lowrank=True)
  return performance.Strategy(federated.Vmap(), "im2col", lowrank=True)


def run(args, save=None) -> dict:
  """Times both modes; `save(partial_result)` is called after the loop mode."""
  spec = pfl_simple_cnn()
  strategy = (default_strategy() if args.strategy == "auto" else performance.Strategy.from_name(args.strategy))
  apply_fn, params, _ = models.build(spec, jax.random.key(0), conv_impl=strategy.conv_impl)
  norm_apply = lambda p, s, x, **kw: apply_fn(p, s, x.astype(jnp.float32) / 255.0, **kw)
  schedule = federated.LocalSchedule(batch_size=args.batch, num_epochs=1)
  # '+lowrank' strategies train the 12544x128 dense kernel as factors (same SGD).
  alg = _common.fedavg_for(strategy, norm_apply, params, schedule, args.examples, args.lr)
  data = synthetic_cifar(args.num_clients, args.examples, jax.random.key(1))
  jax.block_until_ready(data)
  root = jax.random.key(2)
  state0 = alg.init(params, jax.random.key(3))
  cohort_of = lambda r: federated.make_cohort(sample_uniform(args.num_clients, args.cohort, seed=0, round_idx=r))

  with _common.precision_scope(args.precision):
    # --- loop mode: one compiled round per Python iteration (donated state).
    round_fn = federated.make_round(alg, execution=strategy.execution, donate=True,
                                    compiler_options=performance.round_compiler_options())
    t = time.perf_counter()
    compiled = round_fn.lower(state0, data, cohort_of(0), federated.round_key(root, 0)).compile()
    compile_loop = time.perf_counter() - t
    state = jax.tree.map(jnp.copy, state0)
    t = time.perf_counter()
    for r in range(args.rounds):
      state, metrics = compiled(state, data, cohort_of(r), federated.round_key(root, r))
    jax.block_until_ready(state)
    loop_s = time.perf_counter() - t
    loop_loss = float(metrics["train_loss"])
    if save is not None:  # a run cut short in scan mode keeps the loop-mode timing
      save(dict(strategy=strategy.name, loop_mode=dict(rounds=args.rounds, compile_s=compile_loop, wall_s=loop_s,
                                                       rounds_per_s=args.rounds / loop_s)))

    # --- scan mode: K rounds per compiled call, cohorts sampled ahead on the host.
    k = min(args.rounds_per_call, args.rounds)
    plain_round = federated.make_round(alg, execution=strategy.execution)  # the outer jit sets options

    def rounds_block(state, ids_KxC, round_idx_K):
      def body(s, xs):
        ids, r = xs
        cohort = federated.Cohort(ids, jnp.ones(ids.shape, bool), jnp.ones(ids.shape, jnp.float32))
        s, m = plain_round(s, data, cohort, federated.round_key(root, r))
        return s, m["train_loss"]
      return jax.lax.scan(body, state, (ids_KxC, round_idx_K))

    block = jax.jit(rounds_block, donate_argnums=(0,),
                    compiler_options=performance.round_compiler_options())
    ids_all = np.stack([np.asarray(cohort_of(r).client_ids) for r in range(args.rounds)])
    num_blocks = -(-args.rounds // k)
    pad = num_blocks * k - args.rounds  # the last block re-runs rounds: timed rounds >= args.rounds
    ids_all = np.concatenate([ids_all, ids_all[:pad]]) if pad else ids_all
    idx_all = np.arange(num_blocks * k, dtype=np.int32)
    t = time.perf_counter()
    compiled_block = block.lower(state0, ids_all[:k], idx_all[:k]).compile()
    compile_scan = time.perf_counter() - t
    state = jax.tree.map(jnp.copy, state0)
    t = time.perf_counter()
    for b in range(num_blocks):
      state, losses = compiled_block(state, ids_all[b * k:(b + 1) * k], idx_all[b * k:(b + 1) * k])
    jax.block_until_ready(state)
    scan_s = time.perf_counter() - t
    scan_rounds = num_blocks * k
    scan_loss = float(losses[(args.rounds - 1) % k])

  flops_per_round = accounting.training_flops(spec, args.batch) * args.cohort * schedule.total_steps(args.examples)
  full = 1500
  rows = [
      dict(mode="loop", rounds=args.rounds, compile_s=compile_loop, wall_s=loop_s,
           rounds_per_s=args.rounds / loop_s, final_train_loss=loop_loss),
      dict(mode=f"scan{k}", rounds=scan_rounds, compile_s=compile_scan, wall_s=scan_s,
           rounds_per_s=scan_rounds / scan_s, final_train_loss=scan_loss),
  ]
  for row in rows:
    row["gflops"] = flops_per_round * row["rounds_per_s"] / 1e9
    row["wall_s_1500_rounds"] = full / row["rounds_per_s"] if row["rounds"] < full else row["wall_s"] * full / row["rounds"]
    row["extrapolated"] = row["rounds"] < full
  return dict(spec=str(spec), params=accounting.param_count(spec), strategy=strategy.name,
              data="synthetic CIFAR-shaped uint8 images, random labels (timing only)",
              num_clients=args.num_clients, examples_per_client=args.examples, cohort=args.cohort,
              batch=args.batch, local_epochs=1, local_steps=schedule.total_steps(args.examples),
              gflop_per_round=flops_per_round / 1e9, rows=rows,
              # Same cohorts and keys in both modes: the last real round's loss must agree.
              loop_vs_scan_final_loss_equal=bool(abs(loop_loss - scan_loss) <= 1e-3 * max(1.0, abs(loop_loss))))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=1500)
  parser.add_argument("--cohort", type=int, default=50)
  parser.add_argument("--num-clients", type=int, default=1000)
  parser.add_argument("--examples", type=int, default=50)
  parser.add_argument("--batch", type=int, default=10)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--rounds-per-call", type=int, default=50)
  parser.add_argument("--strategy", default="auto", help="'auto' or a name like vmap+lax, sequential+tapgrad")
  parser.add_argument("--precision", default="default", choices=_common.PRECISIONS)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--out", default="")
  parser.add_argument("--out-dir", default="")
  args = parser.parse_args(argv)
  if args.smoke:
    args.rounds, args.cohort, args.num_clients, args.rounds_per_call = 4, 4, 16, 2
  result = dict(benchmark="pfl_reference", **_common.device_info(), precision=args.precision,
                command="python benchmarks/pfl_reference.py " + " ".join(argv if argv is not None else sys.argv[1:]))
  out = _common.out_path("pfl_reference", args.smoke, args.out, args.out_dir)
  result.update(run(args, save=lambda partial: _common.write_json(out, dict(result, **partial))))
  print(f"backend={result['backend']} device={result['device']} strategy={result['strategy']} "
        f"params={result['params']:,} data: {result['data']}")
  _common.print_table(result["rows"], [
      ("mode", "mode", ""), ("rounds", "rounds", "d"), ("compile_s", "compile s", ".2f"),
      ("wall_s", "wall s", ".2f"), ("rounds_per_s", "rounds/s", ".1f"), ("gflops", "GFLOP/s", ".1f"),
      ("wall_s_1500_rounds", "1500 rounds s", ".1f"), ("extrapolated", "extrap.", "")])
  _common.write_json(out, result)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
