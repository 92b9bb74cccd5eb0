"""Train-step speed-up of a structurally pruned architecture in the vectorised engine.

  python benchmarks/pruned_speed.py                          # ASP FEMNIST CNN [32,64] vs [17,43]
  python benchmarks/pruned_speed.py --summary workdir/asp_femnist/summary.json
  python benchmarks/pruned_speed.py --smoke                  # tiny (CI)

One FedAvg round (Adam, batch B, S local steps per client, C clients, every
step real) is timed for the dense model and for the found architecture, in the
same process, for each client-execution strategy in `--strategies`. The
speed-up (dense time / pruned time) is compared with the training-FLOP ratio
(`accounting.training_flops`, dense / pruned): `efficiency` = speed-up / FLOP
ratio (goal >= 0.8: the smaller model pays off almost as much as its FLOPs say).
Prints a table and writes benchmarks/results/pruned_speed_<backend>[_smoke].json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
from engine import make_data  # noqa: E402
from fedjax_prune import accounting, federated, models, performance  # noqa: E402


def round_time(spec, data, strategy: performance.Strategy, batch: int, steps: int,
               repeats: int) -> tuple[float, float]:
  """(first, median) seconds of one chained FedAvg round of `spec`."""
  params, stats = models.init_params(spec, jax.random.key(0))
  alg = federated.fedavg(models.make_apply(spec, conv_impl=strategy.conv_impl),
                         optax.adam(1e-3), federated.LocalSchedule(batch_size=batch, num_steps=steps))
  round_fn = federated.make_round(alg, execution=strategy.execution,
                                  compiler_options=performance.round_compiler_options())
  cohort = federated.make_cohort(list(range(data.x.shape[0])))
  box = [alg.init(params, jax.random.key(1), batch_stats=stats)]
  key = jax.random.key(2)  # made once, outside the timed call

  def run():
    box[0], metrics = round_fn(box[0], data, cohort, key)
    return metrics

  return _common.time_call(run, repeats)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dense-widths", default="32,64")
  p.add_argument("--widths", default="17,43")
  p.add_argument("--summary", default="", help="an ASP run's summary.json: use its found spec")
  p.add_argument("--cohort", type=int, default=10)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--strategies", default="vmap+im2col,sequential+tapgrad,vmap+lax")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  dense_widths = tuple(int(w) for w in args.dense_widths.split(","))
  if args.smoke:
    dense_widths, args.widths = (8, 16), "4,6"
    args.cohort, args.steps, args.batch, args.repeats = 2, 2, 4, 1
    args.strategies = "vmap+im2col"
  dense, small = _common.asp_dense_and_pruned_specs(dense_widths, args.widths, args.summary)
  data = make_data(dense, args.cohort, args.steps, args.batch, dense.num_classes)
  flop_ratio = (accounting.training_flops(dense, args.batch)
                / accounting.training_flops(small, args.batch))
  rows = []
  for name in args.strategies.split(","):
    strategy = performance.Strategy.from_name(name)
    _, t_dense = round_time(dense, data, strategy, args.batch, args.steps, args.repeats)
    _, t_small = round_time(small, data, strategy, args.batch, args.steps, args.repeats)
    speedup = t_dense / t_small
    rows.append({"strategy": name, "dense_s": t_dense, "pruned_s": t_small, "speedup": speedup,
                 "flop_ratio": flop_ratio, "efficiency": speedup / flop_ratio})
  _common.print_table(rows, [("strategy", "strategy", ""), ("dense_s", "dense s/round", ".3f"),
                             ("pruned_s", "pruned s/round", ".3f"), ("speedup", "speed-up", ".2f"),
                             ("flop_ratio", "FLOP ratio", ".2f"),
                             ("efficiency", "speed-up/FLOP", ".2f")])
  best_dense = min(r["dense_s"] for r in rows)
  best_small = min(r["pruned_s"] for r in rows)
  summary = {"best_dense_s": best_dense, "best_pruned_s": best_small,
             "best_vs_best_speedup": best_dense / best_small,
             "best_vs_best_efficiency": best_dense / best_small / flop_ratio}
  print(json.dumps(summary, indent=1))
  result = {"device": _common.device_info(), "dense": repr(dense), "pruned": repr(small),
            "rows": rows, "summary": summary, "args": vars(args)}
  path = _common.out_path("pruned_speed", args.smoke, args.out)
  _common.write_json(path, result)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
