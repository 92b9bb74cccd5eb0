"""Round time of the width methods: masks over the full-size model vs per-capacity groups.

  python benchmarks/width_groups.py                          # ResNet-18 1/8, CIFAR shapes
  python benchmarks/width_groups.py --model leaf_cnn         # LEAF FEMNIST CNN
  python benchmarks/width_groups.py --quick                  # tiny shapes (seconds, CI-class)

One round of HeteroFL / FedRolex (and ScaleFL with --methods) is timed with the default
execution (every client runs the full-size model under its level's masks) and with
`GroupedExecution` (each capacity level trains its sliced model, one program per level),
in the same process, timed in turns (`_common.interleaved_medians`). The cohort holds the
capacity levels in equal numbers (client i -> level i mod L), every local step is real.
`flop_ratio` is the ideal speed-up: the cohort's training FLOPs at full size over the
sum of its clients' level FLOPs (`accounting.training_flops`, ScaleFL's exits left out).
The two rounds' new global params are compared too (`max_param_diff`, equal up to float
summation order). Prints a table and writes
benchmarks/results/width_groups_<backend>[_smoke].json.
"""
from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
from engine import make_data  # noqa: E402
from fedjax_prune import accounting, federated, models, performance  # noqa: E402
from fedjax_prune.pruning import fedrolex, heterofl, scalefl  # noqa: E402
from fedjax_prune.pruning import _width_submodels  # noqa: E402

LEAF_KEYS = dict(input_keys=r"^conv_0$", output_keys=r"^dense_1$", flatten_keys=r"^dense_0$")


def model_spec(name: str, quick: bool):
  if name == "resnet18":
    if quick:
      return models.resnet18(width_multiplier=1 / 16, norm="batch_static", input_shape=(8, 8, 3))
    return models.resnet18(width_multiplier=1 / 8, norm="batch_static")
  if name == "leaf_cnn":
    if quick:
      return models.leaf_femnist_cnn(num_classes=10, widths=(8, 16), dense_width=64,
                                     input_shape=(12, 12, 1))
    return models.leaf_femnist_cnn()
  raise ValueError(f"--model must be 'resnet18' or 'leaf_cnn', got {name!r}")


def method_for(name: str, spec, strategy, schedule, caps, grouped: bool):
  """(HeteroMethod, params, [level specs for the FLOP count])."""
  key = jax.random.key(0)
  opt = optax.sgd(0.05)
  if name == "scalefl":
    if not isinstance(spec, models.ResNetSpec):
      raise ValueError("scalefl needs --model resnet18 (early exits after ResNet stages)")
    exits = tuple(range(1, len(spec.stage_widths)))
    params, _ = models.init_early_exit_params(spec, exits, key)
    widths, depths = scalefl.scalefl_levels(params, caps)
    g = _width_submodels.GroupedExecution(
        spec, lambda s, e: models.make_early_exit_apply(s, e, conv_impl=strategy.conv_impl))
    method = scalefl.scalefl(models.make_early_exit_apply(spec, exits, conv_impl=strategy.conv_impl),
                             opt, schedule, capacities=caps, widths=widths, depths=depths,
                             num_exits=len(exits) + 1, grouped=g if grouped else None)
    return method, params, _width_submodels.grouped_level_specs(g, widths, depths)
  params, _ = models.init_params(spec, key)
  g = _width_submodels.GroupedExecution(spec, lambda s: models.make_apply(s, conv_impl=strategy.conv_impl))
  keys = LEAF_KEYS if isinstance(spec, models.ConvNetSpec) else {}
  factory = {"heterofl": heterofl.heterofl, "fedrolex": fedrolex.fedrolex}[name]
  method = factory(models.make_apply(spec, conv_impl=strategy.conv_impl), opt, schedule,
                   capacities=caps, grouped=g if grouped else None, **keys)
  return method, params, _width_submodels.grouped_level_specs(g, _width_submodels.sqrt_widths(caps))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="resnet18", help="resnet18 (width 1/8) or leaf_cnn")
  p.add_argument("--methods", default="heterofl,fedrolex", help="any of heterofl,fedrolex,scalefl")
  p.add_argument("--capacities", default="1,1/4,1/16,1/64")
  p.add_argument("--cohort", type=int, default=8, help="clients per round (levels in equal numbers)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--batch", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--strategy", default="sequential+tapgrad",
                 help="client execution (performance.Strategy name); grouped pays off sequentially")
  p.add_argument("--quick", "--smoke", dest="quick", action="store_true",
                 help="tiny model and round (seconds; the mechanics, not a measurement)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  if args.quick:
    args.cohort, args.steps, args.batch, args.repeats = 4, 2, 4, 3
  caps = tuple(float(Fraction(c)) for c in args.capacities.split(","))
  spec = model_spec(args.model, args.quick)
  strategy = performance.Strategy.from_name(args.strategy)
  schedule = strategy.schedule(federated.LocalSchedule(batch_size=args.batch, num_steps=args.steps))
  data = make_data(spec, args.cohort, args.steps, args.batch, spec.num_classes)
  client_caps = np.asarray(caps, np.float32)[np.arange(args.cohort) % len(caps)]
  cohort = federated.make_cohort(np.arange(args.cohort), capacity=client_caps)
  full_flops = accounting.training_flops(spec, args.batch)
  rows = []
  for name in args.methods.split(","):
    rounds, firsts, states = [], [], []
    for grouped in (False, True):
      method, params, level_specs = method_for(name, spec, strategy, schedule, caps, grouped)
      round_fn = strategy.make_round(method.algorithm)
      box = [method.algorithm.init(params, jax.random.key(1))]
      key = jax.random.key(2)
      now = _common.clock()
      t = now()
      box[0], _ = round_fn(box[0], data, cohort, key)
      jax.block_until_ready(box[0])
      firsts.append(now() - t)
      states.append(jax.device_get(box[0].params))

      def run(box=box, round_fn=round_fn, key=key):
        box[0], metrics = round_fn(box[0], data, cohort, key)
        return metrics

      rounds.append(run)
    masked_s, grouped_s = _common.interleaved_medians(rounds, args.repeats)
    level_flops = [accounting.training_flops(s, args.batch) for s in level_specs]
    grouped_flops = sum(level_flops[i % len(caps)] for i in range(args.cohort))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(states[0]),
                                                          jax.tree.leaves(states[1])))
    rows.append({"method": name, "masked_s": masked_s, "grouped_s": grouped_s,
                 "speedup": masked_s / grouped_s,
                 "flop_ratio": full_flops * args.cohort / grouped_flops,
                 "masked_first_s": firsts[0], "grouped_first_s": firsts[1],
                 "max_param_diff": diff, "level_specs": [repr(s) for s in level_specs]})
  _common.print_table(rows, [("method", "method", ""), ("masked_s", "masked s/round", ".3f"),
                             ("grouped_s", "grouped s/round", ".3f"), ("speedup", "speed-up", ".2f"),
                             ("flop_ratio", "FLOP ratio", ".2f"),
                             ("masked_first_s", "masked 1st s", ".1f"),
                             ("grouped_first_s", "grouped 1st s", ".1f"),
                             ("max_param_diff", "max |dparams|", ".1e")])
  result = {"device": _common.device_info(), "model": repr(spec), "capacities": caps,
            "rows": rows, "args": vars(args)}
  path = _common.out_path("width_groups", args.quick, args.out)
  _common.write_json(path, result)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
