"""Engine throughput: every client-execution strategy vs a Python loop of jitted steps.

Prints a table and writes JSON. All ratios come from one run on one machine.

  python benchmarks/engine.py                       # LEAF FEMNIST CNN + MLP + logistic, cohorts 1,8,32,128
  python benchmarks/engine.py --smoke               # tiny shapes, seconds (CI)
  python benchmarks/engine.py --models leaf_femnist_cnn,resnet18 --cohorts 8,32,128,512,1024   # GPU
  python benchmarks/engine.py --models shakespeare_lstm,shakespeare_transformer --tag _text   # text, ~20 min

Workload: FedAvg, plain SGD (lr 0.01), batch B, S local steps per client on
random data (every step real), one round = all cohort clients + aggregation.
Image models: S 4, B 32 (cohorts 1, 8, 32, 128 on CPU, 8 ... 1024 on accelerators).
Text models (issue 27), LEAF's Shakespeare setting: B 10 windows of 80 token ids
(uniform in the 81-token vocabulary: the loader's shapes; throughput does not depend
on the values), S 26 (one local epoch over the 256 windows per client that
experiments/configs/fedavg_shakespeare.py keeps; 26 full batches here), cohorts 1 and
10 on CPU (LEAF's 10 clients per round), 10, 64, 256 on accelerators; no unrolled
candidate. `--steps`, `--batch`, `--cohorts` set them for every model. Text rows also
give tokens/s (B x 80 per step), and the JSON's `models` the training FLOPs per token
(accounting.training_flops / (B x 80), the head at the last position as the models are
trained): GFLOP/s = tokens/s x FLOPs per token, and its % of the matmul ceiling, read
as for the CNN.
The per-client loop baseline is what the papers' code does: for each client,
copy the server model and call a jitted SGD step S times from Python (data
already on device and pre-sliced, so the loop pays only dispatch), then
average; it is run with each conv lowering in `--loop-impls` and the fastest
is a baseline. That loop trains on fixed, unshuffled batches: it skips the
shuffling an FL round does. The '+shuffled' loops do the engine's whole round
(each client's batches drawn from its shuffled examples with the engine's keys;
the same result, tests/test_benchmarks.py) as the same loop of jitted steps;
`--no-shuffled-loop` skips them. "vs loop" is against the fastest loop of either
kind, "vs shuf" against the fastest shuffled one. Achieved GFLOP/s = 3 x forward FLOPs
(accounting.training_flops) / time, next to a large matmul measured in the same
run under the same matmul precision (and under 'highest', true f32).

Knobs (GPU): `--precision` (matmul precision while tracing: default,
highest, tensorfloat32, bfloat16), `--donate` (donate the server state to the
round), `--remat` (jax.checkpoint around the model: fewer saved activations).
Rounds are chained (each round gets the previous round's state), as in training.
At each cohort size every entry (loops and strategies) is compiled first, then
all are timed in turns, ~20 ms of back-to-back rounds each per turn, until each
has run for 0.3 s (and at least `--repeats` rounds): load that drifts during the
run slows every entry alike, so the "vs loop" ratios are fair on a shared machine.
`first_s - round_s` is the compile time of that entry. An entry that runs out
of device memory is recorded with `status: "oom"` instead of a time.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
from _common import matmul_ceiling  # noqa: E402,F401  (kept: tests and callers import it from here)
from fedjax_prune import accounting, federated, models, performance  # noqa: E402
from fedjax_prune.federated import _local  # noqa: E402
from fedjax_prune.data import ClientData, client_slice  # noqa: E402


def make_data(spec, cohort: int, steps: int, batch: int, num_classes: int) -> ClientData:
  """Random data of `cohort` clients with exactly `steps` full batches each (text models:
  uniform token ids in [0, vocab_size), windows of the model's context, int32)."""
  n = steps * batch
  if isinstance(spec, models.TEXT_SPECS):
    x = jax.random.randint(jax.random.key(1), (cohort, n) + tuple(spec.input_shape), 0,
                           spec.vocab_size, jnp.int32)
  else:
    x = jax.random.uniform(jax.random.key(1), (cohort, n) + tuple(spec.input_shape))
  y = jax.random.randint(jax.random.key(2), (cohort, n), 0, num_classes)
  return ClientData(x, y, jnp.full((cohort,), n, jnp.int32))


def loop_round(spec, params, data: ClientData, steps: int, batch: int, conv_impl: str,
               batch_stats=None, compute_dtype=None) -> Callable[[], object]:
  """One FedAvg round as a Python loop over clients: a closure running it."""
  apply_fn = models.make_apply(spec, conv_impl=conv_impl, compute_dtype=compute_dtype)
  opt = optax.sgd(0.01)
  batch_stats = {} if batch_stats is None else batch_stats

  @jax.jit
  def step(p, s, o, x, y):
    def loss(p):
      logits, new_s = apply_fn(p, s, x, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), new_s
    g, s = jax.grad(loss, has_aux=True)(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), s, o

  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  scale = jax.jit(lambda a, s: jax.tree.map(lambda x: x * s, a))
  cohort = data.x.shape[0]
  batches = [[(data.x[c, s * batch:(s + 1) * batch], data.y[c, s * batch:(s + 1) * batch])
              for s in range(steps)] for c in range(cohort)]
  jax.block_until_ready(batches)

  def run():
    total = None
    for c in range(cohort):
      p, s, o = params, batch_stats, opt.init(params)
      for x, y in batches[c]:
        p, s, o = step(p, s, o, x, y)
      total = (p, s) if total is None else add(total, (p, s))
    return scale(total, 1.0 / cohort)

  return run


def shuffled_loop_round(spec, params, data: ClientData, steps: int, batch: int, conv_impl: str,
                        batch_stats=None, compute_dtype=None) -> Callable[[], object]:
  """The loop doing the engine round's work: each client's batches come from its
  own shuffled examples under the engine's keys (`federated._local.step_batch`, the
  gather inside the jitted step), the loss is masked per example and the
  clients are averaged by example count. Same result as `engine_round`'s first
  round up to float order; one more dispatch per client (its keys and
  permutation) than `loop_round`."""
  del steps  # one epoch of full batches, as the engine's schedule
  apply_fn = models.make_apply(spec, conv_impl=conv_impl, compute_dtype=compute_dtype)
  opt = optax.sgd(0.01)
  schedule = federated.LocalSchedule(batch_size=batch)
  batch_stats = {} if batch_stats is None else batch_stats
  max_examples = data.x.shape[1]

  @jax.jit
  def client_setup(client_root, client_id, num_examples):
    # the engine's own key derivations (bit-identical to jax.random's, faster on CPU)
    shuffle_key, augment_key = federated.keys.split(federated.keys.fold_in(client_root, client_id))
    return shuffle_key, augment_key, _local.plan_step_batches(shuffle_key, num_examples, max_examples,
                                                              schedule)

  @jax.jit
  def step(p, s, o, client: ClientData, keys, real_step):
    shuffle_key, augment_key, plan = keys
    x, y, mask, _ = _local.step_batch(client, real_step, shuffle_key, augment_key, schedule, plan)

    def loss(p):
      logits, new_s = apply_fn(p, s, x, train=True, example_mask=mask)
      return _local.masked_batch_loss(federated.softmax_cross_entropy, logits, y, mask)[0], new_s

    g, s = jax.grad(loss, has_aux=True)(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), s, o

  # FedAvg's example-weighted mean (server learning rate 1), one dispatch per client
  accumulate = jax.jit(lambda total, a, w: jax.tree.map(lambda t, x: t + w * x, total, a))
  zeros = jax.tree.map(jnp.zeros_like, (params, batch_stats))
  cohort = data.x.shape[0]
  clients = [client_slice(data, c) for c in range(cohort)]
  client_root, _ = federated.split_round_key(jax.random.key(3))  # the engine rounds' key
  ids = [jnp.int32(c) for c in range(cohort)]
  weights = [jnp.float32(n / np.sum(data.num_examples)) for n in np.asarray(data.num_examples)]
  # each client runs its own real steps only (a client with fewer examples, fewer batches)
  real_steps = [[jnp.int32(i) for i in range(int(_local.num_real_steps(n, max_examples, schedule)))]
                for n in np.asarray(data.num_examples)]
  jax.block_until_ready((clients, client_root, ids, real_steps, weights, zeros))

  def run():
    total = zeros
    for c in range(cohort):
      p, s, o = params, batch_stats, opt.init(params)
      keys = client_setup(client_root, ids[c], clients[c].num_examples)
      for i in real_steps[c]:
        p, s, o = step(p, s, o, clients[c], keys, i)
      total = accumulate(total, (p, s), weights[c])
    return total

  return run


def flax_linen_loop_round(data: ClientData, steps: int, batch: int) -> Callable[[], object]:
  """The flax.linen reference: a jitted flax.linen LEAF CNN step (nn.Conv +
  nn.max_pool) called from a Python loop over clients, as a user would write it
  (a closure running one round)."""
  import flax.linen as nn

  class LeafCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.max_pool(nn.relu(nn.Conv(32, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
      x = nn.max_pool(nn.relu(nn.Conv(64, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
      x = nn.relu(nn.Dense(2048)(x.reshape(x.shape[0], -1)))
      return nn.Dense(62)(x)

  model = LeafCNN()
  params = model.init(jax.random.key(0), data.x[0, :batch])
  opt = optax.sgd(0.01)

  @jax.jit
  def step(p, o, x, y):
    g = jax.grad(lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y)))(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o

  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  batches = [[(data.x[c, s * batch:(s + 1) * batch], data.y[c, s * batch:(s + 1) * batch])
              for s in range(steps)] for c in range(data.x.shape[0])]

  def run():
    total = None
    for client_batches in batches:
      p, o = params, opt.init(params)
      for x, y in client_batches:
        p, o = step(p, o, x, y)
      total = p if total is None else add(total, p)
    return total

  return run


def engine_round(spec, params, data, steps, batch, strategy, *, batch_stats=None,
                 donate: bool = False, remat: bool = False, mesh=None,
                 compute_dtype=None) -> Callable[[], object]:
  """A closure running one compiled engine round; rounds are chained.

  With `mesh`, the cohort is sharded over its devices (on CPU: one device per core,
  see `performance.split_cpu_into_devices`)."""
  del steps  # the schedule (1 epoch of `steps` full batches) follows from the data
  apply_fn = models.make_apply(spec, conv_impl=strategy.conv_impl, compute_dtype=compute_dtype)
  if remat:
    apply_fn = _common.remat_apply(apply_fn)
  alg = _common.fedavg_for(strategy, apply_fn, params, federated.LocalSchedule(batch_size=batch),
                          data.x.shape[1])
  round_fn = federated.make_round(alg, execution=strategy.execution, donate=donate, mesh=mesh,
                                  compiler_options=performance.round_compiler_options())
  state = alg.init(params, jax.random.key(0), batch_stats=batch_stats)
  if donate:  # the round deletes what it is given: never hand it the shared initial params
    state = jax.tree.map(jnp.copy, state)
  # The round's inputs are made (and put on the device) outside the timed call, as the
  # loop's batches are pre-sliced: an eager `jax.random.key` here cost ~20 us of
  # dispatch per call, passing the cohort's three numpy arrays ~9 us of transfers.
  cohort = jax.device_put(federated.make_cohort(np.arange(data.x.shape[0])))
  key = jax.random.key(3)
  holder = [state]

  def run():
    holder[0], _ = round_fn(holder[0], data, cohort, key)
    return holder[0]

  return run


# Per-model workload defaults: (local steps S, batch B, CPU cohorts, accelerator cohorts).
IMAGE_WORKLOAD = (4, 32, (1, 8, 32, 128), (8, 32, 128, 512, 1024))
# LEAF Shakespeare (experiments/configs/fedavg_shakespeare.py): batch 10, 1 local epoch over a
# client's 256 capped windows = 26 steps (here all full); 10 clients per round. On a loaded
# 2-core CPU a 10-client round of the LSTM took ~20 s (that config's docstring), so larger
# cohorts are left to accelerators.
TEXT_WORKLOAD = (26, 10, (1, 10), (10, 64, 256))


def default_workload(spec, backend: str) -> tuple[int, int, tuple[int, ...]]:
  """(local steps, batch, cohorts) a model is measured at unless the flags say otherwise."""
  steps, batch, cpu, accel = TEXT_WORKLOAD if isinstance(spec, models.TEXT_SPECS) else IMAGE_WORKLOAD
  return steps, batch, cpu if backend == "cpu" else accel


def workload_info(spec, steps: int, batch: int) -> dict:
  """What one local step of `spec` costs: params, training FLOPs per step (3 x forward,
  accounting.training_flops); text models also tokens per step (B x seq_len) and training
  FLOPs per token (per step / tokens: the head at the last position only, as trained)."""
  info = dict(params=accounting.param_count(spec), steps=steps, batch=batch,
              train_flops_per_step=accounting.training_flops(spec, batch))
  if isinstance(spec, models.TEXT_SPECS):
    tokens = batch * spec.seq_len
    info.update(seq_len=spec.seq_len, vocab_size=spec.vocab_size, tokens_per_step=tokens,
                train_flops_per_token=info["train_flops_per_step"] / tokens)
  return info


def _strategies(arg: str, cohort: int, has_conv: bool, unroll: int = 1) -> list[performance.Strategy]:
  if arg == "auto":
    return performance.candidate_strategies(cohort_size=cohort, has_conv=has_conv, unroll=unroll)
  out = []
  for name in arg.split(","):
    s = performance.Strategy.from_name(name)
    if not has_conv and s.conv_impl != "lax":
      continue  # conv lowerings mean nothing without convs
    if isinstance(s.execution, federated.Chunked) and s.execution.size >= cohort and cohort > 1:
      continue  # same program as vmap
    if s not in out:
      out.append(s)
  return out


def _failure(e: Exception) -> str:
  return "oom" if _common.is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}"


def _first_call(make_run: Callable[[], Callable[[], object]]):
  """Builds an entry's round closure and runs it once (compiling it).

  Returns (run, first-call seconds, status); run is None when building or the
  first call failed (an OOM or an error in one entry must not end the run)."""
  now = _common.clock()
  try:
    t = now()
    run = make_run()
    jax.block_until_ready(run())
    return run, now() - t, "ok"
  except Exception as e:  # noqa: BLE001
    return None, None, _failure(e)


def time_entries(makers: dict, repeats: int, over: Callable[[], bool]) -> dict:
  """{label: (first_s, median_s, status)} of round closures built by `makers`.

  Every entry is compiled first; then all are timed in turns (bursts of about
  20 ms each, `_common.interleaved_medians`), so the ratios between entries do
  not depend on load that drifts while the benchmark runs. An entry not started
  before `over()` is recorded as skipped."""
  firsts, runs, status = {}, {}, {}
  for label, make_run in makers.items():
    if over():
      status[label] = "skipped: time budget"
      continue
    run, firsts[label], status[label] = _first_call(make_run)
    if run is not None:
      runs[label] = run
  medians = _common.interleaved_medians(list(runs.values()), repeats, min_total_s=0.3, burst_s=0.02,
                                        catch=True)
  out = {}
  for label in makers:
    median = medians[list(runs).index(label)] if label in runs else None
    if isinstance(median, Exception):
      out[label] = (firsts[label], None, _failure(median))
    else:
      out[label] = (firsts.get(label), median, status[label])
  return out


def bench_model(name, spec, cohorts, steps, batch, repeats, num_classes, log, *, strategies="auto",
                loop_impls=None, max_loop_cohort=None, donate=False, remat=False, deadline=None,
                ceiling=None, on_rows=None, flax_ref=True, meshes=(None,), shuffled_loop=True,
                compute_dtype=None):
  """`meshes`: run every engine strategy once per entry (None = unsharded).
  `shuffled_loop`: also time `shuffled_loop_round` for each loop lowering.
  `compute_dtype`: the models' (engine and loops alike) GEMM dtype, e.g. bfloat16;
  the flax.linen reference stays float32 and is then skipped."""
  _, params, batch_stats = models.build(spec, jax.random.key(0))
  info = workload_info(spec, steps, batch)
  step_flops = info["train_flops_per_step"]
  is_text = isinstance(spec, models.TEXT_SPECS)
  has_conv = not isinstance(spec, (models.MLPSpec,) + models.TEXT_SPECS)
  log(f"# {name}: {info['params']:,} params, {steps} local steps x batch {batch}"
      + (f" windows of {spec.seq_len} tokens, {info['train_flops_per_token'] / 1e6:.3f} MFLOP "
         "per token trained" if is_text else f", {step_flops / 1e9:.3f} GFLOP per step"))
  if loop_impls is None:
    loop_impls = ("lax", "im2col", "tapgrad") if has_conv else ("lax",)
  loop_impls = [i for i in loop_impls if has_conv or i == "lax"]
  with_flax_ref = (flax_ref and name == "leaf_femnist_cnn" and spec == models.leaf_femnist_cnn()
                   and "lax" in loop_impls and compute_dtype is None)
  rows = []
  for cohort in cohorts:
    data = make_data(spec, cohort, steps, batch, num_classes)
    client_steps = cohort * steps
    makers = {}
    if max_loop_cohort is None or cohort <= max_loop_cohort:
      for impl in loop_impls:
        makers[f"loop+{impl}"] = functools.partial(loop_round, spec, params, data, steps, batch, impl,
                                                   batch_stats, compute_dtype)
        if shuffled_loop:
          makers[f"loop+{impl}+shuffled"] = functools.partial(shuffled_loop_round, spec, params, data, steps,
                                                              batch, impl, batch_stats, compute_dtype)
      if with_flax_ref:
        makers["loop_flax_linen_ref"] = functools.partial(flax_linen_loop_round, data, steps, batch)
    # 'auto' also tries the steps written out (every client here has `steps` of them); not
    # for text models: a local step (the LSTM: an 80-step scan, 0.1-0.2 s on a loaded 2-core
    # CPU) dwarfs the loop's per-step overhead, and 4 written-out steps only add compile time.
    unroll = 1 if is_text else federated.waste_free_unroll(np.asarray(data.num_examples),
                                                           federated.LocalSchedule(batch_size=batch))
    for strategy in _strategies(strategies, cohort, has_conv, unroll):
      for mesh in meshes:
        label = strategy.name + (f"@{mesh.size}dev" if mesh is not None else "")
        makers[label] = functools.partial(engine_round, spec, params, data, steps, batch, strategy,
                                          batch_stats=batch_stats, donate=donate, remat=remat, mesh=mesh,
                                          compute_dtype=compute_dtype)
    entries = time_entries(makers, repeats, lambda: deadline is not None and time.time() > deadline)
    ok = {k: v[1] for k, v in entries.items() if v[2] == "ok"}
    # "vs loop": the fastest loop of any kind (the strictest baseline; the shuffled one
    # does more work but was at times the faster, e.g. the MLP at 8+ clients)
    loops = [v for k, v in ok.items() if k.startswith("loop+")]
    loop_best = min(loops) if loops else None
    shuffled = [v for k, v in ok.items() if k.startswith("loop+") and k.endswith("+shuffled")]
    shuffled_best = min(shuffled) if shuffled else None
    flax_ref_s = ok.get("loop_flax_linen_ref")
    engine_ok = [k for k in ok if not k.startswith("loop")]
    engine_best_name = min(engine_ok, key=ok.get) if engine_ok else None
    for k, (first, t, status) in entries.items():
      row = dict(model=name, cohort=cohort, strategy=k, status=status, round_s=t,
                 first_s=first, compile_s=(first - t) if (first is not None and t) else None,
                 steps=steps, batch=batch, rounds_per_s=(1 / t) if t else None,
                 client_steps_per_s=(client_steps / t) if t else None,
                 tokens_per_s=(client_steps * info["tokens_per_step"] / t) if (t and is_text) else None,
                 gflops=(step_flops * client_steps / t / 1e9) if t else None,
                 speedup_vs_best_loop=(loop_best / t) if (t and loop_best) else None,
                 speedup_vs_best_shuffled_loop=(shuffled_best / t) if (t and shuffled_best) else None,
                 speedup_vs_flax_linen_loop=(flax_ref_s / t) if (t and flax_ref_s) else None,
                 best_engine=(k == engine_best_name))
      row["pct_of_ceiling"] = (100 * row["gflops"] / ceiling) if (row["gflops"] and ceiling) else None
      rows.append(row)
      if t:
        tokens = f"{row['tokens_per_s'] / 1e3:9.1f}" if row["tokens_per_s"] else f"{'-':>9s}"
        log(f"{name:18s} {cohort:5d} {k:40s} {t * 1e3:10.2f} {client_steps / t:12.1f} {tokens} "
            f"{row['gflops']:9.1f} {row['pct_of_ceiling'] or 0:6.1f}% "
            f"{row['speedup_vs_best_loop'] or float('nan'):8.2f} "
            f"{row['speedup_vs_best_shuffled_loop'] or float('nan'):8.2f} {row['compile_s'] or 0:7.1f}s"
            f"{'  *' if row['best_engine'] else ''}")
      else:
        log(f"{name:18s} {cohort:5d} {k:40s} {status}")
    if on_rows is not None:
      on_rows(rows)
  return rows


def model_specs(smoke: bool) -> dict:
  """The benchmark's models by name (tiny versions in smoke mode)."""
  return {
      "leaf_femnist_cnn": (models.leaf_femnist_cnn() if not smoke
                           else models.leaf_femnist_cnn(widths=(4, 8), dense_width=32)),
      # CIFAR ResNet-18 (11.2 M params, BatchNorm with running statistics).
      "resnet18": (models.resnet18() if not smoke
                   else models.resnet18(width_multiplier=1 / 16, input_shape=(16, 16, 3))),
      "mlp": models.mlp(input_shape=(28, 28, 1), hidden=(200, 200), num_classes=62),
      # Dispatch-bound: FedProx Synthetic-sized logistic regression (60 features, 10 classes).
      "logistic": models.mlp(input_shape=(60,), hidden=(), num_classes=10),
      # Text (issue 27): LEAF's Shakespeare char-LSTM (2 x 256, 80-character windows, a
      # sequential lax.scan of 80 steps) and the 4 x d 128 causal transformer, on token ids.
      "shakespeare_lstm": (models.leaf_shakespeare_lstm() if not smoke
                           else models.leaf_shakespeare_lstm(hidden=(16,), seq_len=8)),
      "shakespeare_transformer": (models.shakespeare_transformer() if not smoke
                                  else models.shakespeare_transformer(num_layers=1, d_model=16,
                                                                      num_heads=2, seq_len=8)),
  }


def _per_model(arg: str) -> dict[str, str]:
  """'a=1,2;b=3' -> {'a': '1,2', 'b': '3'}."""
  out = {}
  for part in filter(None, arg.split(";")):
    name, _, value = part.partition("=")
    out[name.strip()] = value.strip()
  return out


COLUMNS = f"{'model':18s} {'C':>5s} {'strategy':40s} {'ms/round':>10s} {'cl-steps/s':>12s} " \
          f"{'ktok/s':>9s} {'GFLOP/s':>9s} {'%ceil':>7s} {'vs loop':>8s} {'vs shuf':>8s} {'compile':>8s}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="leaf_femnist_cnn,mlp,logistic")
  parser.add_argument("--cohorts", default="", help="cohort sizes for every model (default: per model, "
                      "the module docstring)")
  parser.add_argument("--steps", type=int, default=None,
                      help="local steps per client, every model (default: 4; text models 26)")
  parser.add_argument("--batch", type=int, default=None, help="every model (default: 32; text models 10)")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--strategies", default="auto",
                      help="'auto' (performance.candidate_strategies) or names like vmap+lax,chunked32+lax")
  parser.add_argument("--loop-impls", default="", help="conv lowerings of the loop baseline (default: all on "
                      "CPU, lax on accelerators)")
  parser.add_argument("--max-loop-cohort", type=int, default=0, help="skip the loop baseline above this")
  parser.add_argument("--precision", default="default", choices=_common.PRECISIONS)
  parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                      help="models' GEMM/conv dtype (mixed precision: float32 params and "
                           "gradients); the ceiling is then a matmul in that dtype")
  parser.add_argument("--donate", action="store_true", help="donate the server state to the round")
  parser.add_argument("--remat", action="store_true", help="jax.checkpoint around the model")
  parser.add_argument("--no-flax-ref", action="store_true", help="skip the flax.linen loop reference")
  parser.add_argument("--no-shuffled-loop", action="store_true",
                      help="skip the loop baselines that shuffle like the engine ('+shuffled')")
  parser.add_argument("--model-cohorts", default="", help="per-model cohorts, e.g. 'resnet18=8,64;mlp=8'")
  parser.add_argument("--model-strategies", default="",
                      help="per-model strategies, e.g. 'resnet18=vmap+lax,chunked16+lax'")
  parser.add_argument("--time-budget", type=float, default=0,
                      help="seconds per model; entries not started by then are skipped (recorded as such)")
  parser.add_argument("--cpu-devices", type=int, default=0,
                      help="CPU only: split the host into this many JAX devices (0 = one per usable "
                      "core) and also run every engine strategy sharded over them ('@Ndev' rows); "
                      "1 = unsharded only. The loop baseline always runs on one device.")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes for CI")
  parser.add_argument("--out", default="")
  parser.add_argument("--out-dir", default="")
  parser.add_argument("--tag", default="", help="suffix of the default output name")
  args = parser.parse_args(argv)
  if args.cpu_devices < 0:
    parser.error(f"--cpu-devices must be >= 0, got {args.cpu_devices}")
  for flag in ("steps", "batch"):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  names = args.models.split(",")
  performance.split_cpu_into_devices(args.cpu_devices or None)  # before JAX starts; no-op on GPU
  backend = jax.default_backend()
  cpu_meshes = [None]
  if backend == "cpu" and jax.device_count() > 1 and args.cpu_devices != 1:
    cpu_meshes.append(federated.client_mesh())
  cohorts = [int(c) for c in args.cohorts.split(",")] if args.cohorts else None  # None: per model
  if args.smoke:
    cohorts, args.steps, args.batch, args.repeats = [2], 2, 8, 1
  loop_impls = args.loop_impls.split(",") if args.loop_impls else (None if backend == "cpu" else ["lax"])
  specs = model_specs(args.smoke)
  unknown = [n for n in names if n not in specs]
  if unknown:
    parser.error(f"--models: unknown {unknown}; known: {sorted(specs)}")
  with _common.precision_scope(args.precision):
    size = _common.default_ceiling_size(args.smoke)
    compute_dtype = None if args.compute_dtype == "float32" else jnp.dtype(args.compute_dtype)
    ceiling = matmul_ceiling(size, precision=args.precision,
                             dtype=jnp.float32 if compute_dtype is None else compute_dtype)
    ceiling_f32 = matmul_ceiling(size, precision="highest") if (
        args.precision != "highest" or compute_dtype is not None) else ceiling
    print(f"backend={backend} devices={jax.devices()} jax={jax.__version__}")
    print(f"matmul ceiling: {ceiling:.1f} GFLOP/s ({args.precision}, {args.compute_dtype}); "
          f"{ceiling_f32:.1f} GFLOP/s (f32 highest)")
    print(COLUMNS)
    out = _common.out_path(f"engine{args.tag}", args.smoke, args.out, args.out_dir)
    # steps/batch: the flags' values (None: each model's default; every row and `models` has its own)
    result = dict(
        benchmark="engine", **_common.device_info(), steps=args.steps, batch=args.batch, models={},
        matmul_ceiling_gflops=ceiling, matmul_ceiling_f32_gflops=ceiling_f32, precision=args.precision,
        compute_dtype=args.compute_dtype,
        donate=args.donate, remat=args.remat, cpu_devices=jax.device_count() if backend == "cpu" else None,
        command="python benchmarks/engine.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        rows=[])
    done: list = []

    def save(model_rows):
      result["rows"] = done + model_rows
      _common.write_json(out, result)  # after every cohort: a killed run keeps what it measured

    model_cohorts = _per_model(args.model_cohorts)
    model_strategies = _per_model(args.model_strategies)
    for name in names:
      deadline = time.time() + args.time_budget if args.time_budget else None
      steps, batch, these = default_workload(specs[name], backend)
      steps, batch = args.steps or steps, args.batch or batch
      these = cohorts or list(these)
      if name in model_cohorts and not args.smoke:
        these = [int(c) for c in model_cohorts[name].split(",")]
      result["models"][name] = workload_info(specs[name], steps, batch)
      done += bench_model(name, specs[name], these, steps, batch, args.repeats,
                          specs[name].num_classes, print,
                          strategies=model_strategies.get(name, args.strategies),
                          loop_impls=loop_impls, max_loop_cohort=args.max_loop_cohort or None,
                          donate=args.donate, remat=args.remat, deadline=deadline, ceiling=ceiling,
                          on_rows=save, flax_ref=not args.no_flax_ref, meshes=cpu_meshes,
                          shuffled_loop=not args.no_shuffled_loop, compute_dtype=compute_dtype)
  result["rows"] = done
  _common.write_json(out, result)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
