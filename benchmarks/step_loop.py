"""What a compiled step loop costs: S local steps as a loop of dispatches, a `fori_loop`, or unrolled.

Prints a table and writes JSON. All ratios come from one run, timed in turns.

  python benchmarks/step_loop.py                   # LEAF FEMNIST CNN, 4 steps of batch 32
  python benchmarks/step_loop.py --smoke           # tiny (CI)

The same jitted SGD step of one client (pre-sliced batches; no shuffling, masks,
metrics or server update) is run S times in three ways:

  * `dispatch`: a Python loop calling the jitted step S times (the per-client loop);
  * `fori_loop`: one jitted `lax.fori_loop` over the S steps (the engine's local training
    with `LocalSchedule(unroll=1)`; with `round_compiler_options()`, as the engine uses);
  * `unrolled`: one jitted program with the S steps written out (the engine's local
    training with `LocalSchedule(unroll=S)`, strategy names `...+unrollS`).

The three compute the same values. The gap between `fori_loop` and the other two is
the cost of XLA's while loop on this backend: on the 2-core CPU box the loop's
iteration boundary serialises work that the unrolled program (and the dispatch
loop) overlaps (docs/results/engine.md, "Current status").
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
from engine import make_data  # noqa: E402
from fedjax_prune import models, performance  # noqa: E402


def step_programs(spec, conv_impl: str, batches_x, batches_y, params, learning_rate: float = 0.01):
  """{name: zero-argument callable} running the S steps of `batches_[xy]` ([S, B, ...])."""
  apply_fn = models.make_apply(spec, conv_impl=conv_impl)
  steps = batches_x.shape[0]

  def step(p, x, y):
    def loss(p):
      logits, _ = apply_fn(p, {}, x, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return jax.tree.map(lambda w, g: w - learning_rate * g, p, jax.grad(loss)(p))

  jitted_step = jax.jit(step)
  sliced = [(batches_x[t], batches_y[t]) for t in range(steps)]

  def dispatch():
    p = params
    for x, y in sliced:
      p = jitted_step(p, x, y)
    return p

  options = performance.round_compiler_options()
  fori = jax.jit(lambda p, xs, ys: jax.lax.fori_loop(0, steps, lambda t, p: step(p, xs[t], ys[t]), p),
                 compiler_options=options)

  def unrolled_fn(p, xs, ys):
    for t in range(steps):
      p = step(p, xs[t], ys[t])
    return p

  unrolled = jax.jit(unrolled_fn, compiler_options=options)
  return {"dispatch": dispatch,
          "fori_loop": lambda: fori(params, batches_x, batches_y),
          "unrolled": lambda: unrolled(params, batches_x, batches_y)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="leaf_femnist_cnn", help="leaf_femnist_cnn or mlp")
  p.add_argument("--conv-impl", default="auto")
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=21, help="turns (each program once per turn)")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  if args.smoke:
    args.steps, args.batch, args.repeats = 3, 4, 3
  if args.model == "leaf_femnist_cnn":
    spec = (models.leaf_femnist_cnn(widths=(4, 8), dense_width=32) if args.smoke
            else models.leaf_femnist_cnn())
  elif args.model == "mlp":
    spec = models.mlp(input_shape=(28, 28, 1), hidden=(16,) if args.smoke else (200, 200),
                      num_classes=62)
  else:
    raise ValueError(f"--model must be leaf_femnist_cnn or mlp, got {args.model!r}")
  conv_impl = models.resolve_conv_impl(args.conv_impl)
  data = make_data(spec, 1, args.steps, args.batch, spec.num_classes)
  xs = data.x[0].reshape((args.steps, args.batch) + data.x.shape[2:])
  ys = data.y[0].reshape(args.steps, args.batch)
  params, _ = models.init_params(spec, jax.random.key(0))
  programs = step_programs(spec, conv_impl, xs, ys, params)
  outputs = {name: jax.block_until_ready(fn()) for name, fn in programs.items()}  # compiles
  for name, out in outputs.items():  # the same computation, up to float rounding
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(outputs["dispatch"])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  medians = _common.interleaved_medians(list(programs.values()), args.repeats)
  base = medians[0]
  rows = [{"program": name, "ms": t * 1e3, "vs_dispatch": base / t}
          for name, t in zip(programs, medians)]
  _common.print_table(rows, [("program", "program", ""), ("ms", "ms per S steps", ".2f"),
                             ("vs_dispatch", "vs dispatch loop", ".3f")])
  result = {**_common.device_info(), "benchmark": "step_loop", "model": args.model,
            "spec": repr(spec), "conv_impl": conv_impl, "steps": args.steps, "batch": args.batch,
            "rows": rows, "args": vars(args),
            "command": "python benchmarks/step_loop.py " + " ".join(argv if argv is not None else sys.argv[1:])}
  path = _common.out_path(f"step_loop_{args.model}", args.smoke, args.out)
  _common.write_json(path, result)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
