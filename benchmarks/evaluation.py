"""Cost of one evaluation: the central test set plus each client's local accuracy.

  python benchmarks/evaluation.py            # real FEMNIST (300 writers, ../shared/data), LEAF CNN
  python benchmarks/evaluation.py --smoke    # synthetic clients, tiny CNN: seconds

Every experiment evaluates the global model on the central test set (the union of the
clients' local test sets) and reports the mean and 10th percentile of the clients' local
accuracies. Rows, timed in turns in one process (`_common.interleaved_medians`):

  per-client (before)   `make_evaluate` on the central set, then `make_evaluate_clients` on
                        each client's own set, padded to the largest client (vmapped chunks);
  pooled (now)          `make_evaluate_pooled_clients`: one pass over the central set, the
                        hits split by client (what `experiments.runtime.make_evaluator` runs);
  central only          `make_evaluate` alone (the floor: the pooled row adds scatters).

The pooled row's central sums are checked bit for bit against `make_evaluate`'s, and its
per-client hit counts against `make_evaluate_clients`'. Columns: ms (median), x pooled.
Prints a table and writes benchmarks/results/evaluation_<backend>[_smoke].json.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import _common  # noqa: E402
from experiments import build  # noqa: E402
from fedjax_prune import federated, models  # noqa: E402


def femnist_config(smoke: bool):
  """The robust/DP/compression FEMNIST setting, or a synthetic stand-in for --smoke."""
  if smoke:
    from experiments.configs import fedavg_tiny
    c = fedavg_tiny.get_config()
    c.data.examples_per_client, c.data.test_examples_per_client = (6, 10), 5
    return c
  from experiments.configs import robust_femnist
  c = robust_femnist.get_config("mean,sign_flip,0.0")
  if not all(os.path.isdir(d) for d in c.data.data_dir.split(",") if d):
    raise SystemExit(f"no FEMNIST at {c.data.data_dir} (../shared/data); try --smoke")
  return c


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--conv_impl", default="tapgrad", choices=("tapgrad", "lax", "im2col"))
  parser.add_argument("--smoke", action="store_true", help="synthetic clients, tiny CNN: seconds")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  config = femnist_config(args.smoke)
  data = build.build_data(config)
  spec = build.build_spec(config, data.input_shape, data.num_classes)
  apply_fn = build.build_apply(spec, data.normalize, args.conv_impl)
  batch = config.eval_batch_size
  num_clients = int(data.test_clients.num_examples.shape[0])
  params, stats = models.init_params(spec, jax.random.key(0))

  central = jax.jit(federated.make_evaluate(apply_fn, batch_size=batch))
  per_client = jax.jit(federated.make_evaluate_clients(apply_fn, batch_size=batch))
  pooled = jax.jit(federated.make_evaluate_pooled_clients(apply_fn, batch_size=batch),
                   static_argnames="num_clients")
  fns = {
      "per-client (before)": lambda: (central(params, stats, data.test_x, data.test_y),
                                      per_client(params, stats, data.test_clients)),
      "pooled (now)": lambda: pooled(params, stats, data.test_x, data.test_y,
                                     data.test_client_ids, num_clients=num_clients),
      "central only": lambda: central(params, stats, data.test_x, data.test_y),
  }
  outs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}  # compile first
  (want_central, want_local), (got_central, got_local) = outs["per-client (before)"], outs["pooled (now)"]
  for got, want in zip(got_central, want_central):
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), "central sums differ"
  np.testing.assert_array_equal(got_local.correct_sum, want_local.correct_sum)
  np.testing.assert_array_equal(got_local.num_examples, want_local.num_examples)

  timed = [lambda fn=fn: jax.block_until_ready(fn()) for fn in fns.values()]
  times = _common.interleaved_medians(timed, args.repeats)
  pooled_s = times[1]
  rows = [dict(row=name, ms=1e3 * t, x_pooled=t / pooled_s) for name, t in zip(fns, times)]
  padded_rows = int(np.prod(data.test_clients.y.shape[:2]))
  print(f"evaluation: {int(data.test_x.shape[0]):,} central test rows, {num_clients} clients "
        f"({padded_rows:,} rows padded per client), {args.conv_impl} convolutions, "
        f"{jax.default_backend()}")
  _common.print_table(rows, [("row", "row", ""), ("ms", "ms", ".1f"), ("x_pooled", "x pooled", ".2f")])
  command = "python benchmarks/evaluation.py" + "".join(
      " " + a for a in (argv if argv is not None else sys.argv[1:]))
  result = dict(benchmark="evaluation", command=command, date=datetime.date.today().isoformat(),
                device=_common.device_info(), central_rows=int(data.test_x.shape[0]),
                clients=num_clients, padded_rows=padded_rows, conv_impl=args.conv_impl, rows=rows)
  _common.write_json(_common.out_path("evaluation", args.smoke, args.out), result)
  return result


if __name__ == "__main__":
  main()
