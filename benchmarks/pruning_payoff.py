"""Pruning pay-off: round time of a masked model vs the dense model vs a structurally smaller one.

  python benchmarks/pruning_payoff.py                          # LEAF FEMNIST CNN, CPU
  python benchmarks/pruning_payoff.py --model resnet18 --cohort 64   # GPU
  python benchmarks/pruning_payoff.py --smoke                  # tiny (CI)

At each density d in 1 ... 0.05, three FedAvg rounds are timed in one process:
  * dense: the full model, no masks;
  * masked: the full model under unstructured random masks keeping d of every
    kernel (the engine masks gradients and weights every step, so the dense
    arrays are still computed: masking saves no time, it costs a little);
  * smaller: the model rebuilt from a smaller width spec with about d of the
    parameters, built directly from the presets' `widths` (every width scaled by
    sqrt(d), since a layer's parameters grow with in x out width) -- what
    structured pruning's surgery between phases produces.
Ratios `vs_dense` are dense time / variant time (> 1 = faster than dense), with
the dense round re-timed in turns with the two variants at each density, so a
load change on a shared machine hits all three alike.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
from engine import make_data  # noqa: E402
from fedjax_prune import accounting, federated, models, performance  # noqa: E402

DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)


def scaled_spec(model: str, scale: float, smoke: bool):
  """The model preset with every hidden width multiplied by `scale` (at least 1)."""
  w = lambda x: max(1, int(round(x * scale)))
  if model == "leaf_femnist_cnn":
    base = ((4, 8), 32) if smoke else ((32, 64), 2048)
    return models.leaf_femnist_cnn(widths=(w(base[0][0]), w(base[0][1])), dense_width=w(base[1]))
  if model == "resnet18":
    base = 1 / 16 if smoke else 1.0
    return models.resnet18(width_multiplier=base * scale,
                           input_shape=(16, 16, 3) if smoke else (32, 32, 3))
  raise ValueError(f"unknown model {model!r}; use leaf_femnist_cnn or resnet18")


def make_runner(spec, strategy, data, batch, masks=None):
  """A closure running one chained FedAvg round of `spec` on `data` (compiles on first call)."""
  apply_fn, params, batch_stats = models.build(spec, jax.random.key(0), conv_impl=strategy.conv_impl)
  alg = federated.fedavg(apply_fn, optax.sgd(0.01), federated.LocalSchedule(batch_size=batch))
  round_fn = federated.make_round(alg, execution=strategy.execution,
                                  compiler_options=performance.round_compiler_options())
  state = alg.init(params, jax.random.key(1), batch_stats=batch_stats, masks=masks)
  cohort = federated.make_cohort(np.arange(data.x.shape[0]))
  holder = [state]
  key = jax.random.key(2)  # made once, outside the timed call

  def run():
    holder[0], _ = round_fn(holder[0], data, cohort, key)
    return holder[0]

  return run


def _first_call(run) -> float:
  t = time.perf_counter()
  jax.block_until_ready(run())
  return time.perf_counter() - t


def default_strategy(has_conv=True) -> performance.Strategy:
  if jax.default_backend() == "cpu":
    return performance.Strategy(federated.Sequential(), "tapgrad" if has_conv else "lax")
  return performance.Strategy(federated.Vmap(), "lax")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="leaf_femnist_cnn", choices=("leaf_femnist_cnn", "resnet18"))
  parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
  parser.add_argument("--cohort", type=int, default=0, help="clients per round (default 4 CPU, 64 GPU)")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--strategy", default="auto")
  parser.add_argument("--precision", default="default", choices=_common.PRECISIONS)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--out", default="")
  parser.add_argument("--out-dir", default="")
  args = parser.parse_args(argv)
  cohort = args.cohort or (4 if jax.default_backend() == "cpu" else 64)
  densities = [float(d) for d in args.densities.split(",")]
  if args.smoke:
    cohort, args.steps, args.batch, args.repeats, densities = 2, 2, 8, 1, [1.0, 0.25]
  strategy = default_strategy() if args.strategy == "auto" else performance.Strategy.from_name(args.strategy)
  dense_spec = scaled_spec(args.model, 1.0, args.smoke)
  data = make_data(dense_spec, cohort, args.steps, args.batch, dense_spec.num_classes)
  _, dense_params, _ = models.build(dense_spec, jax.random.key(0))
  dense_flops = accounting.flops(dense_spec)
  dense_count = accounting.param_count(dense_spec)
  result = dict(benchmark="pruning_payoff", **_common.device_info(), model=args.model, cohort=cohort,
                steps=args.steps, batch=args.batch, strategy=strategy.name, precision=args.precision,
                timing="dense, masked and smaller timed in turns at each density (ratios robust to load drift)",
                command="python benchmarks/pruning_payoff.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                rows=[])
  rows = result["rows"]
  out = _common.out_path(f"pruning_payoff_{args.model}", args.smoke, args.out, args.out_dir)
  # Trace, compile and time under one precision (the jit cache is keyed on it).
  with _common.precision_scope(args.precision):
    dense_run = make_runner(dense_spec, strategy, data, args.batch)
    dense_first = _first_call(dense_run)
    for d in densities:
      if d >= 1.0:
        continue
      masks = _common.random_masks(dense_params, d, jax.random.key(7))
      small = scaled_spec(args.model, math.sqrt(d), args.smoke)
      masked_run = make_runner(dense_spec, strategy, data, args.batch, masks=masks)
      small_run = make_runner(small, strategy, data, args.batch)
      masked_first, small_first = _first_call(masked_run), _first_call(small_run)
      t_dense, t_masked, t_small = _common.interleaved_medians([dense_run, masked_run, small_run], args.repeats)
      if not rows:
        rows.append(dict(variant="dense", density=1.0, params=dense_count, flops_ratio=1.0, round_s=t_dense,
                         compile_s=dense_first - t_dense, vs_dense=1.0))
      kept = accounting.param_count(dense_spec, masks)
      rows.append(dict(variant="masked", density=d, params=kept,
                       flops_ratio=accounting.flops(dense_spec, masks) / dense_flops, round_s=t_masked,
                       compile_s=masked_first - t_masked, dense_round_s=t_dense, vs_dense=t_dense / t_masked))
      rows.append(dict(variant="smaller", density=accounting.param_count(small) / dense_count,
                       target_density=d, params=accounting.param_count(small),
                       flops_ratio=accounting.flops(small) / dense_flops, round_s=t_small,
                       compile_s=small_first - t_small, dense_round_s=t_dense, vs_dense=t_dense / t_small,
                       spec=str(small)))
      _common.write_json(out, result)  # after every density: a run cut short keeps what it measured
    if not rows:  # only density 1 asked for
      (t_dense,) = _common.interleaved_medians([dense_run], args.repeats)
      rows.append(dict(variant="dense", density=1.0, params=dense_count, flops_ratio=1.0, round_s=t_dense,
                       compile_s=dense_first - t_dense, vs_dense=1.0))
  print(f"backend={result['backend']} device={result['device']} model={args.model} cohort={cohort} "
        f"strategy={strategy.name}")
  _common.print_table(rows, [("variant", "variant", ""), ("density", "density", ".3f"),
                             ("params", "params", ","), ("flops_ratio", "FLOPs/dense", ".3f"),
                             ("round_s", "s/round", ".4f"), ("vs_dense", "speedup vs dense", ".2f")])
  _common.write_json(out, result)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
