"""Server-side cost of the robust aggregators on one round's stacked client updates.

  python benchmarks/robust_aggregators.py                 # LEAF FEMNIST CNN (6.6 M), 10 clients
  python benchmarks/robust_aggregators.py --clients 20
  python benchmarks/robust_aggregators.py --smoke         # tiny MLP, seconds

What the robust round adds over FedAvg's mean happens once per round on the server: each
aggregator's statistic over the [C, ...] stack of the cohort's updates (every client holds
every coordinate; random normal updates). Rows, timed in turns in one process
(`_common.interleaved_medians`), each one jitted call on the whole model:

  mean, median, trimmed_mean (beta 0.3), norm_bound (inner mean), krum (f = (C - 3) // 2)
      `federated.<aggregator>()`'s statistic, as its `finish` computes it;
  sort: network / xla      the client-axis sort alone (`_robust.sort_clients`, a Batcher
                           merge network of elementwise min / max, vs `jnp.sort`; the median's);
  ranks: counted / xla argsort   each entry's stable rank (`_robust.stable_ranks`, C^2
                           comparisons, vs the inverse of a stable argsort; the trimmed mean's);
  client sum: row adds / jnp.sum   the sum over the client axis (`tree.sum_leading`, a
                           chain of row adds, vs `jnp.sum(x, axis=0)`; every statistic's
                           holder counts and weighted sums).

Columns: ms (median), x mean (the row over the mean's time). Prints a table and writes
benchmarks/results/robust_aggregators_<backend>[_smoke].json.

XLA:CPU lowers a reduction over the major (client) axis with that axis innermost, striding
a whole row per element: `jnp.sum(x, axis=0)` over [10, 3136, 2048] took seconds where the
row adds take a fraction of one (the `client sum` rows). The statistics sum with
`tree.sum_leading`, and so does this harness for the mean's in-graph sums (a round's
sequential strategy adds the clients up in its scan). See docs/results/robust.md, "Cost".
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _common  # noqa: E402
from fedjax_prune import federated, models  # noqa: E402
from fedjax_prune import tree as tree_lib  # noqa: E402
from fedjax_prune.federated import _robust  # noqa: E402


def stacked_updates(spec, clients: int, seed: int = 0):
  """[C, ...] random normal updates of the model's shapes, every coordinate held."""
  params, _ = models.param_shapes(spec)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  stacked = [0.01 * jax.random.normal(k, (clients,) + tuple(l.shape), jnp.float32)
             for k, l in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, stacked)


def aggregator_fns(update_C, clients: int) -> dict:
  """{row: jitted fn() -> aggregate} for every aggregator's statistic."""
  weight = jnp.linspace(1.0, 2.0, clients, dtype=jnp.float32)
  info = federated.ClientInfo(jnp.arange(clients, dtype=jnp.int32),
                              jnp.full((clients,), 8, jnp.int32), jnp.ones((clients,), bool),
                              jnp.ones((clients,), jnp.float32))
  zeros = jax.tree.map(lambda u: jnp.zeros(u.shape[1:], u.dtype), update_C)
  f = max((clients - 3) // 2, 0)
  aggregators = {"mean": federated.mean(), "median": federated.coordinate_median(),
                 "trimmed_mean": federated.trimmed_mean(0.3),
                 "norm_bound": federated.norm_bound(1.0), "krum": federated.krum(f, 1)}
  fns = {}
  for name, agg in aggregators.items():

    def aggregate(update_C, agg=agg):
      contribute = jax.vmap(lambda u, w, i: agg.contribute((), u, w, None, i, jax.random.key(0)))
      out = contribute(update_C, weight, info)
      summed = federated.Contribution(jax.tree.map(tree_lib.sum_leading, out.sums),
                                      out.per_client)
      return agg.finish((), summed, zeros, jax.random.key(1))[0]

    jitted = jax.jit(aggregate)
    fns[name] = lambda jitted=jitted: jitted(update_C)
  flat = jnp.concatenate([u.reshape(clients, -1) for u in jax.tree.leaves(update_C)], axis=1)
  sorts = {"sort: network": jax.jit(_robust.sort_clients),
           "sort: xla": jax.jit(lambda x: jnp.sort(x, axis=0)),
           "ranks: counted": jax.jit(_robust.stable_ranks),
           "ranks: xla argsort": jax.jit(lambda x: jnp.argsort(
               jnp.argsort(x, axis=0, stable=True), axis=0).astype(jnp.int32)),
           "client sum: row adds": jax.jit(tree_lib.sum_leading),
           "client sum: jnp.sum": jax.jit(lambda x: jnp.sum(x, axis=0))}
  for name, fn in sorts.items():
    fns[name] = lambda fn=fn: fn(flat)
  return fns


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--smoke", action="store_true", help="tiny MLP: seconds")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  spec = (models.mlp(input_shape=(16,), hidden=(32,), num_classes=4) if args.smoke
          else models.leaf_femnist_cnn())
  update_C = stacked_updates(spec, args.clients)
  fns = aggregator_fns(update_C, args.clients)
  outs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}  # compile first
  # the network is exact: the same values (and stable order) as XLA's sort
  np.testing.assert_array_equal(np.asarray(outs["sort: network"]), np.asarray(outs["sort: xla"]))
  np.testing.assert_array_equal(np.asarray(outs["ranks: counted"]),
                                np.asarray(outs["ranks: xla argsort"]))
  # the same sum up to rounding (XLA may reduce in another order; the row adds are numpy's)
  np.testing.assert_allclose(np.asarray(outs["client sum: row adds"]),
                             np.asarray(outs["client sum: jnp.sum"]), rtol=1e-5, atol=1e-6)
  times = _common.interleaved_medians(list(fns.values()), args.repeats)
  params = sum(int(np.prod(u.shape[1:])) for u in jax.tree.leaves(update_C))
  rows = [dict(row=name, ms=1e3 * t, x_mean=t / times[0]) for name, t in zip(fns, times)]
  print(f"robust aggregators: {params:,} coordinates x {args.clients} clients, "
        f"{jax.default_backend()}")
  _common.print_table(rows, [("row", "row", ""), ("ms", "ms", ".1f"), ("x_mean", "x mean", ".2f")])
  command = "python benchmarks/robust_aggregators.py" + "".join(
      " " + a for a in (argv if argv is not None else sys.argv[1:]))
  result = dict(benchmark="robust_aggregators", command=command,
                date=datetime.date.today().isoformat(), device=_common.device_info(),
                clients=args.clients, coordinates=params, rows=rows)
  _common.write_json(_common.out_path("robust_aggregators", args.smoke, args.out), result)
  return result


if __name__ == "__main__":
  main()
