"""Matmul precision: speed of TF32 / bf16 matmuls vs true f32, checked against f32 accuracy.

  python benchmarks/precision.py                 # GPU: FEMNIST CNN, 64 clients/round
  python benchmarks/precision.py --smoke         # tiny (CI; on CPU the precisions are all f32)

The same FedAvg run (same init, cohorts and keys) is trained under each
`jax.default_matmul_precision` -- 'highest' (true f32), 'tensorfloat32' and
'bfloat16' (one bf16 pass; params, optimizer and accumulation stay f32), plus
'default' (JAX's own, TF32-class on recent NVIDIA GPUs) and 'bf16_compute' (mixed
precision: `models.make_apply(compute_dtype=jnp.bfloat16)` casts activations and
weights to bf16 so XLA runs bf16 GEMMs/convolutions; params, gradients, BatchNorm
statistics and logits stay f32; matmul precision 'default') -- on a learnable
synthetic FEMNIST-like dataset (`data.synthetic_images`). Reported per
precision: ms/round (median over the timed rounds), speedup vs 'highest',
final train loss, held-out accuracy, and the relative L2 distance of the final
params from the 'highest' run. A precision is `accuracy_ok` when its held-out
accuracy is within `--tolerance` of the f32 run's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
from fedjax_prune import data as data_lib, federated, models, performance, tree  # noqa: E402


BF16_COMPUTE = "bf16_compute"  # mixed precision through the model, not a matmul-precision setting


def train(spec, strategy, train_data, test_x, test_y, cohort, rounds, batch, lr, precision):
  """Runs `rounds` FedAvg rounds under `precision`; returns params, per-round times, metrics."""
  compute_dtype = jnp.bfloat16 if precision == BF16_COMPUTE else None
  precision = "default" if precision == BF16_COMPUTE else precision
  apply_fn, params, batch_stats = models.build(spec, jax.random.key(0), conv_impl=strategy.conv_impl,
                                               compute_dtype=compute_dtype)
  norm_apply = lambda p, s, x, **kw: apply_fn(p, s, x.astype(jnp.float32) / 255.0, **kw)
  alg = federated.fedavg(norm_apply, optax.sgd(lr), federated.LocalSchedule(batch_size=batch, num_epochs=1))
  evaluate = federated.make_evaluate(norm_apply, batch_size=256)
  num_clients = train_data.x.shape[0]
  with _common.precision_scope(precision):
    round_fn = federated.make_round(alg, execution=strategy.execution,
                                    compiler_options=performance.round_compiler_options())
    eval_fn = jax.jit(lambda p, s: evaluate(p, s, test_x, test_y).means())
    state = alg.init(params, jax.random.key(1), batch_stats=batch_stats)
    root, times, metrics = jax.random.key(2), [], None
    for r in range(rounds):
      ids = data_lib.sample_uniform(num_clients, cohort, seed=0, round_idx=r)
      t = time.perf_counter()
      state, metrics = round_fn(state, train_data, federated.make_cohort(ids), federated.round_key(root, r))
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)
    ev = eval_fn(state.params, state.batch_stats)
  means = {k: float(v) for k, v in (ev._asdict() if hasattr(ev, "_asdict") else dict(ev)).items()}
  return state.params, times, float(metrics["train_loss"]), means


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--precisions", default=f"highest,tensorfloat32,bfloat16,default,{BF16_COMPUTE}")
  parser.add_argument("--clients", type=int, default=256)
  parser.add_argument("--cohort", type=int, default=0, help="default 8 CPU, 64 GPU")
  parser.add_argument("--rounds", type=int, default=0, help="default 6 CPU, 30 GPU")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--tolerance", type=float, default=0.02, help="allowed held-out accuracy drop")
  parser.add_argument("--strategy", default="auto")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--out", default="")
  parser.add_argument("--out-dir", default="")
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  cpu = backend == "cpu"
  cohort = args.cohort or (8 if cpu else 64)
  rounds = args.rounds or (6 if cpu else 30)
  spec = models.leaf_femnist_cnn(num_classes=10)
  num_clients = args.clients
  if args.smoke:
    spec = models.leaf_femnist_cnn(num_classes=10, widths=(4, 8), dense_width=32)
    num_clients, cohort, rounds = 8, 2, 3
  strategy = (performance.Strategy(federated.Sequential(), "tapgrad") if cpu else
              performance.Strategy(federated.Vmap(), "lax")) if args.strategy == "auto" else \
      performance.Strategy.from_name(args.strategy)
  train_np, test_np = data_lib.synthetic_images(num_clients, seed=0, num_classes=10,
                                                examples_per_client=(64, 64) if not args.smoke else (16, 16),
                                                test_examples_per_client=8)
  train_data = data_lib.to_device(train_np)
  # Held-out set: the clients' local test examples, pooled.
  test_x = jnp.asarray(test_np.x.reshape((-1,) + test_np.x.shape[2:]))
  test_y = jnp.asarray(test_np.y.reshape(-1))
  rows, ref = [], None
  for precision in args.precisions.split(","):
    params, times, loss, ev = train(spec, strategy, train_data, test_x, test_y, cohort, rounds, args.batch,
                                    args.lr, precision)
    timed = times[1:] if len(times) > 1 else times  # round 0 compiles
    row = dict(precision=precision, round_s=statistics.median(timed), compile_s=times[0] - statistics.median(timed),
               final_train_loss=loss, test_accuracy=ev.get("accuracy"), test_loss=ev.get("loss"))
    if precision == "highest":
      ref = (params, row)
    rows.append(row)
    rows[-1]["_params"] = params
  if ref is None:
    raise SystemExit("--precisions must include 'highest' (the f32 reference)")
  ref_params, ref_row = ref
  ref_norm = float(jnp.sqrt(tree.squared_norm(ref_params)))
  for row in rows:
    p = row.pop("_params")
    row["param_rel_diff_vs_f32"] = float(jnp.sqrt(tree.squared_norm(tree.sub(p, ref_params)))) / ref_norm
    row["speedup_vs_f32"] = ref_row["round_s"] / row["round_s"]
    row["accuracy_drop_vs_f32"] = (ref_row["test_accuracy"] - row["test_accuracy"]) if row["test_accuracy"] is not None else None
    row["accuracy_ok"] = row["accuracy_drop_vs_f32"] is not None and row["accuracy_drop_vs_f32"] <= args.tolerance
  result = dict(benchmark="precision", **_common.device_info(), spec=str(spec), strategy=strategy.name,
                clients=num_clients, cohort=cohort, rounds=rounds, batch=args.batch, lr=args.lr,
                tolerance=args.tolerance, data="synthetic_images (learnable FEMNIST-like glyphs), seed 0",
                rows=rows, command="python benchmarks/precision.py " + " ".join(argv if argv is not None else sys.argv[1:]))
  print(f"backend={backend} device={result['device']} strategy={strategy.name} cohort={cohort} rounds={rounds}")
  _common.print_table(rows, [("precision", "precision", ""), ("round_s", "s/round", ".4f"),
                             ("speedup_vs_f32", "speedup", ".2f"), ("final_train_loss", "train loss", ".4f"),
                             ("test_accuracy", "test acc", ".4f"), ("param_rel_diff_vs_f32", "param diff", ".2e"),
                             ("accuracy_ok", "acc ok", "")])
  out = _common.out_path("precision", args.smoke, args.out, args.out_dir)
  _common.write_json(out, result)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
