"""Why a CAVP local step costs more than a FedAvg step: compiled cost, not wall clock.

Prints a table and writes JSON (benchmarks/results/cavp_step_cost_<backend>.json).

  python benchmarks/cavp_step_cost.py --time      # FEMNIST CNN + ResNet-20 x0.5, ~4 min on 2 cores
  python benchmarks/cavp_step_cost.py --models femnist          # compiled cost only, ~1 min
  python benchmarks/cavp_step_cost.py --smoke     # tiny widths, ~2 min (compiles dominate)

Workload: one client's local training as the experiments compile it (`run_local`'s loop
over the real steps, `LocalSchedule(unroll=1)`, 'tapgrad' convolutions,
`performance.round_compiler_options()`), on random data of the real shapes:
  * femnist: `models.asp_femnist_cnn()` (28x28x1, batch 32, Adam 1e-3 on the weights;
    `experiments/configs/cavp_femnist_converged.py`: unit gates);
  * resnet: `models.resnet20(width_multiplier=0.5)` (32x32x3, batch 128, SGD 0.05
    momentum 0.9; `experiments/configs/cavp_cifar10_centralised.py`: unit + layer gates).
CAVP: θ by SGD 0.1, straight-through estimators, one gate sample per batch (the configs'
options), against `federated.make_local_train` with the same model and weight optimizer.

Rows (ablations patch `pruning.cavp`'s module functions for the one compile, then restore):
  fedavg              plain FedAvg local training
  cavp                the experiments' CAVP local training
  cavp_fixed_gates    `sample_gates` returns the alive flags (no Bernoulli draw)
  cavp_opt_barrier    the draws behind `lax.optimization_barrier` (XLA:CPU drops it: no effect)
  cavp                the experiments' CAVP: since 2026-12-06 the draws by `jax.random.bernoulli`
                      (a rolled threefry loop, materialised once per step)
  cavp_fused_uniform  the draws as before that fix (`keys.uniform`'s inline hash, same numbers),
                      fused into every consumer of the gates: the 1.65x
  cavp_reduce_barrier those draws through a reduction, max(ξ, 0) = ξ (another fix: same draws)
  cavp_predrawn       cost model of drawing every step's uniforms before the loop (a fix)
  cavp_fixed_gates_no_dtheta / _no_penalty   and θ kept out of the loss gradient / no penalty
  cavp_reinforce, cavp_per_example(_reduce_barrier)   the configs' other options
Columns, per compiled program (`compile().cost_analysis()`, which counts the while body
once: one step plus the set-up before the loop) and per loop body (= one local step, read
from the optimised HLO):
  GFLOP, MB: XLA's flops and bytes accessed;
  thunks: operations the loop body runs (fusions, convolutions, dots, copies, ...; a
    nested loop, such as jax.random's threefry, counts once);
  conv: convolutions in the loop body, fused or not;
  Mops, int Mops: elementwise work of the body's loop fusions, counted as XLA:CPU's
    elemental emitter does it: every fused operation whose value depends on the element
    once per element of the fusion's largest shape (a [units]-shaped value broadcast into
    a [B, H, W, units] fusion is recomputed for each of its elements; scalar chains, which
    the compiler can hoist out of the element loop, are not counted); 'int' = integer
    operations (a counter-based hash).
  ms: (with --time) median ms per local step, the rows timed in turns; a cross-check only.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
from fedjax_prune import federated, models, performance  # noqa: E402
from fedjax_prune.data import ClientData  # noqa: E402
from fedjax_prune.federated import keys  # noqa: E402
from fedjax_prune.pruning import cavp as cavp_lib  # noqa: E402

# ----------------------------------------------------------------------------
# Reading the optimised HLO text.

_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
# Index arithmetic only: no per-element work of their own in a loop fusion.
_NO_WORK = _FREE | {"broadcast", "reshape", "iota", "slice", "concatenate", "dynamic-slice",
                    "transpose", "copy"}


def _opcode(rhs: str) -> str:
  """The opcode of an instruction's right-hand side `<type> opcode(...)`."""
  if rhs.startswith("("):  # tuple type: skip the balanced parentheses
    depth = 0
    for i, ch in enumerate(rhs):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        break
    rhs = rhs[i + 1:].lstrip()
  else:
    rhs = rhs.split(" ", 1)[1] if " " in rhs else rhs
  return rhs.split("(", 1)[0]


def parse_hlo(text: str) -> tuple[dict, str]:
  """({computation: [(opcode, type, line)]}, entry computation name) of optimised HLO text."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    s = line.strip()
    head = re.match(r"(ENTRY )?%?([\w.\-]+) \(.*\{$", s)
    if head and " = " not in s.split("(")[0]:
      cur = head.group(2)
      comps[cur] = []
      entry = cur if head.group(1) else entry
    elif s == "}":
      cur = None
    elif cur is not None and " = " in s:
      rhs = s.split(" = ", 1)[1]
      comps[cur].append((_opcode(rhs), rhs.split(" ")[0], s))
  return comps, entry


def _called(line: str, kinds: tuple[str, ...]) -> list[str]:
  names = []
  for kind in kinds:
    for group in re.findall(rf"{kind}=\{{?([^}}]*?)(?:\}}|, \w+=|$)", line):
      names += re.findall(r"%([\w.\-]+)", group)
  return names


def loop_body(comps: dict, entry: str) -> str:
  """The largest while-loop body reachable from the entry (the local step loop)."""
  bodies, todo, seen = [], [entry], {entry}
  while todo:
    comp = todo.pop()
    for op, _, line in comps[comp]:
      for name in _called(line, ("body", "condition", "branch_computations")) + (
          _called(line, ("to_apply",)) if op == "call" else []):
        if name in comps and name not in seen:
          seen.add(name)
          todo.append(name)
          if op == "while" and f"body=%{name}" in line:
            bodies.append(name)
  if not bodies:
    raise ValueError("no while loop in the program: compile with LocalSchedule(unroll=1)")
  return max(bodies, key=lambda b: len(comps[b]))


def _elements(typ: str) -> tuple[int, str]:
  m = re.match(r"\(?(\w+)\[([\d,]*)\]", typ)
  if not m:
    return 0, ""
  n = 1
  for d in m.group(2).split(","):
    n *= int(d) if d else 1
  return n, m.group(1)


def _name(line: str) -> str:
  return line.split(" = ")[0].replace("ROOT ", "").strip().strip("%")


def _varying(fused: list) -> list:
  """The instructions of a loop fusion computed once per element of its output: those
  reached from the root through values of more than one element. A scalar (or a slice to
  one element) is read at a fixed index whatever the output element, so what only feeds
  scalars is loop-invariant (the compiler can hoist it out of the element loop)."""
  by_name = {_name(line): (op, typ, line) for op, typ, line in fused}
  root = next(_name(line) for _, _, line in fused if line.startswith("ROOT"))
  seen, todo = {root}, [root]
  while todo:
    op, typ, line = by_name[todo.pop()]
    if _elements(typ)[0] <= 1:
      continue  # a fixed index into every operand
    args = line.split(f"{op}(", 1)[1]
    for operand in re.findall(r"%([\w.\-]+)", args.split("), ")[0]):
      if operand in by_name and operand not in seen:
        seen.add(operand)
        todo.append(operand)
  return [by_name[n] for n in seen if _elements(by_name[n][1])[0] > 1]


def step_stats(text: str) -> dict:
  """Per-step counts of the local-step loop body of optimised HLO `text` (module docstring)."""
  comps, entry = parse_hlo(text)
  body = loop_body(comps, entry)
  ops = collections.Counter(op for op, _, _ in comps[body] if op not in _FREE)
  convs = sum(op == "convolution" for op, _, _ in comps[body])
  work = int_work = 0
  worst = []
  for op, _, line in comps[body]:
    if op != "fusion":
      continue
    fused = comps[_called(line, ("calls",))[0]]
    convs += sum(o == "convolution" for o, _, _ in fused)
    if "kind=kCustom" in line:  # a library call (convolution, GEMM, reduction)
      continue
    space = max(_elements(t)[0] for _, t, _ in fused)
    arith = [t for o, t, _ in _varying(fused) if o not in _NO_WORK]
    ints = sum(_elements(t)[1][:1] in ("u", "s") for t in arith)
    work += space * len(arith)
    int_work += space * ints
    worst.append((space * len(arith), _name(line), space, len(arith), ints))
  worst.sort(reverse=True)
  return dict(thunks=sum(ops.values()), conv=convs, fusions=ops["fusion"],
              elementwise_mops=work / 1e6, int_mops=int_work / 1e6,
              largest_fusions=[dict(name=n, elements=s, ops=a, int_ops=i)
                               for _, n, s, a, i in worst[:4]])


# ----------------------------------------------------------------------------
# The programs.

MODELS = {
    # name: (spec, batch, weight optimizer, gate structures), as the converged configs
    "femnist": (lambda smoke: models.asp_femnist_cnn(widths=(4, 8) if smoke else (32, 64)),
                32, lambda: optax.adam(1e-3), "units"),
    "resnet": (lambda smoke: models.resnet20(width_multiplier=0.125 if smoke else 0.5),
               128, lambda: optax.sgd(0.05, momentum=0.9), "both"),
}
STEPS = {"femnist": 25, "resnet": 3}  # local steps of the timed client (~0.2 s / ~1 s a call)


def _opt_barrier(sample):
  """The sampled gates behind `lax.optimization_barrier` (XLA:CPU removes it before fusion)."""
  return lambda *a, **k: jax.lax.optimization_barrier(sample(*a, **k))


def _reduce_barrier(sample):
  """The sampled gates ξ in {0, 1} through a reduction, max(ξ, 0) = ξ: XLA:CPU does not fuse a
  reduction into its consumers, so the draw is computed once, as a [units] buffer."""
  return lambda *a, **k: jax.tree.map(
      lambda s: jnp.max(jnp.stack([s, jnp.zeros_like(s)]), axis=0), sample(*a, **k))


def _fused_uniform(theta, alive, key, *, batch_size=None):
  """`sample_gates` before the fix (2026-12-06): the draws by the key module's inline hash
  (`keys.uniform` < θ, the same numbers as `jax.random.bernoulli`), which XLA:CPU fuses into
  every consumer of the broadcast gates."""
  leaves, treedef = jax.tree.flatten(theta)
  leaf_keys = keys.split(key, max(len(leaves), 1))
  lead = () if batch_size is None else (batch_size,)
  samples = jax.tree.unflatten(treedef, [
      keys.uniform(k, lead + t.shape) < jnp.broadcast_to(t, lead + t.shape)
      for k, t in zip(leaf_keys, leaves)])
  return jax.tree.map(lambda s, a: (s & jnp.broadcast_to(a, s.shape)).astype(jnp.float32),
                      samples, alive)


def _predrawn(theta, alive, key, *, batch_size=None):
  """Cost model of drawing every step's uniforms before the step loop: the step reads its
  row of a loop-invariant [8, ...] array of uniforms and compares it with θ (other draws
  than `sample_gates`': for the cost only)."""
  lead = () if batch_size is None else (batch_size,)
  row = jax.random.key_data(key)[0] % 8
  rng = np.random.default_rng(0)

  def one(t, a):
    u = jnp.asarray(rng.random((8,) + lead + t.shape, dtype=np.float32))
    return ((jax.lax.dynamic_index_in_dim(u, row, keepdims=False) < t) & a).astype(jnp.float32)

  return jax.tree.map(one, theta, alive)


def _fixed_gates(theta, alive, key, *, batch_size=None):
  del key
  lead = () if batch_size is None else (batch_size,)
  return jax.tree.map(lambda t, a: jnp.broadcast_to(a, lead + t.shape).astype(jnp.float32),
                      theta, alive)


_SAMPLERS = {"opt_barrier": _opt_barrier, "reduce_barrier": _reduce_barrier,
             "fused_uniform": lambda _: _fused_uniform, "predrawn": lambda _: _predrawn,
             "fixed_gates": lambda _: _fixed_gates}


def _patches(name: str) -> dict:
  """Module attributes of `pruning.cavp` replaced for the row `name`."""
  patches = {}
  for tag, make in _SAMPLERS.items():
    if tag in name:
      patches["sample_gates"] = make(cavp_lib.sample_gates)
  if "no_dtheta" in name:  # θ enters the gates without a gradient (the penalty keeps one)
    patches["_broadcast"] = lambda t, shape: jnp.broadcast_to(jax.lax.stop_gradient(t), shape)
  if "no_penalty" in name:
    patches["penalty"] = lambda *a, **k: jnp.zeros((), jnp.float32)
  return patches


@contextlib.contextmanager
def patched(name: str):
  saved = {k: getattr(cavp_lib, k) for k in _patches(name)}
  try:
    for k, v in _patches(name).items():
      setattr(cavp_lib, k, v)
    yield
  finally:
    for k, v in saved.items():
      setattr(cavp_lib, k, v)


def program(model: str, row: str, steps: int, smoke: bool):
  """(jitted fn, args) of one client's local training of `row` (module docstring)."""
  spec_fn, batch, weight_opt, structures = MODELS[model]
  spec = spec_fn(smoke)
  apply_fn, params, stats = models.build(spec, jax.random.key(0), conv_impl="tapgrad")
  n = steps * batch
  x = jax.random.uniform(jax.random.key(1), (n,) + tuple(spec.input_shape))
  y = jax.random.randint(jax.random.key(2), (n,), 0, spec.num_classes)
  data = ClientData(x, y, jnp.asarray(n, jnp.int32))
  schedule = federated.LocalSchedule(batch_size=batch, num_epochs=1)  # unroll=1: the loop
  key = jax.random.key(3)
  jit = lambda f: jax.jit(f, compiler_options=performance.round_compiler_options())
  if row == "fedavg":
    local_train = federated.make_local_train(apply_fn, weight_opt(), schedule)
    return jit(local_train), (params, stats, data, key)
  options = cavp_lib.Options(
      structures=structures,
      unit_estimator="reinforce" if "reinforce" in row else "straight_through",
      layer_estimator="reinforce" if "reinforce" in row else "straight_through",
      per_example="per_example" in row)
  local_train = cavp_lib.make_local_train(apply_fn, weight_opt(), optax.sgd(0.1), schedule, options)
  theta = cavp_lib.init_theta(spec, options)
  alive = jax.tree.map(lambda t: jnp.ones(t.shape, bool), theta)
  lam = cavp_lib.penalty_weights(spec, cavp_lib.CostWeights(), structures=structures)
  baseline = jnp.full((), jnp.nan, jnp.float32)

  def fn(*args):
    with patched(row):  # at trace time: the patch is in the compiled program
      return local_train(*args)

  return jit(fn), (params, stats, theta, alive, lam, baseline, data, key)


ROWS = {
    "femnist": ("fedavg", "cavp", "cavp_fixed_gates", "cavp_opt_barrier", "cavp_reduce_barrier",
                "cavp_fused_uniform", "cavp_predrawn", "cavp_fixed_gates_no_dtheta",
                "cavp_fixed_gates_no_penalty", "cavp_reinforce", "cavp_per_example",
                "cavp_per_example_reduce_barrier"),
    "resnet": ("fedavg", "cavp", "cavp_fixed_gates", "cavp_reduce_barrier", "cavp_fused_uniform",
               "cavp_predrawn", "cavp_per_example"),
}
SAME_DRAWS = ("cavp_reduce_barrier", "cavp_fused_uniform")  # the same draws as 'cavp' 


def same_results(model: str, row: str, steps: int, smoke: bool) -> bool:
  """Whether `row` trains to bit-identical weights, θ, baseline and metrics as `cavp`."""
  a, args = program(model, "cavp", steps, smoke)
  b, _ = program(model, row, steps, smoke)
  equal = jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a(*args), b(*args))
  return all(jax.tree.leaves(equal))


COLUMNS = [("model", "model", ""), ("row", "row", ""), ("gflop", "GFLOP", ".3f"),
           ("mbytes", "MB", ".1f"), ("thunks", "thunks", "d"), ("conv", "conv", "d"),
           ("elementwise_mops", "Mops", ".1f"), ("int_mops", "int Mops", ".1f"),
           ("step_ms", "ms", ".1f"), ("vs_fedavg", "vs fedavg", ".2f")]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="femnist,resnet")
  parser.add_argument("--rows", default="", help="comma-separated rows (default: each model's)")
  parser.add_argument("--steps", type=int, default=0,
                      help="local steps of the timed client (default: femnist 25, resnet 3)")
  parser.add_argument("--time", action="store_true", help="also time the rows (a cross-check)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-check", action="store_true",
                      help="skip the bit-identity checks of the rows with cavp's draws")
  parser.add_argument("--smoke", action="store_true", help="tiny widths, few steps")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  names = args.models.split(",")
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    parser.error(f"--models: unknown {unknown}; known: {sorted(MODELS)}")
  if args.steps < 0:
    parser.error(f"--steps must be >= 1 (or 0: each model's default), got {args.steps}")
  known_rows = {r for rows in ROWS.values() for r in rows}
  bad_rows = [r for r in args.rows.split(",") if args.rows and r not in known_rows]
  if bad_rows:
    parser.error(f"--rows: unknown {bad_rows}; known: {sorted(known_rows)}")
  out = _common.out_path("cavp_step_cost", args.smoke, args.out)
  result = dict(benchmark="cavp_step_cost", **_common.device_info(), steps={},
                load_average_1min=os.getloadavg()[0],
                command="python benchmarks/cavp_step_cost.py " + " ".join(
                    argv if argv is not None else sys.argv[1:]), rows=[], identical={})
  for model in names:
    steps = 2 if args.smoke else (args.steps or STEPS[model])
    result["steps"][model] = steps
    rows = args.rows.split(",") if args.rows else ROWS[model]
    compiled = []
    for row in rows:
      fn, fn_args = program(model, row, steps, args.smoke)
      exe = fn.lower(*fn_args).compile()
      cost = exe.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      stats = step_stats(exe.as_text())
      result["rows"].append(dict(model=model, row=row, gflop=cost.get("flops", 0.0) / 1e9,
                                 mbytes=cost.get("bytes accessed", 0.0) / 1e6, **stats))
      compiled.append((exe, fn_args))
      print(f"compiled {model} {row}", flush=True)
    if args.time:
      for exe, fn_args in compiled:
        jax.block_until_ready(exe(*fn_args))
      times = _common.interleaved_medians([lambda e=e, a=a: e(*a) for e, a in compiled],
                                          args.repeats)
      mine = result["rows"][-len(rows):]
      for r, t in zip(mine, times):
        r["steps"], r["step_ms"] = steps, 1e3 * t / steps
      base = next((r["step_ms"] for r in mine if r["row"] == "fedavg"), None)
      for r in mine:
        r["vs_fedavg"] = r["step_ms"] / base if base else None
    if not args.no_check:
      result["identical"][model] = {r: same_results(model, r, 3, args.smoke)
                                    for r in SAME_DRAWS if r in rows}
      print(f"{model}: bit-identical to cavp after 3 steps: {result['identical'][model]}")
    _common.write_json(out, result)
  _common.print_table(result["rows"], COLUMNS)
  if args.time:
    print(f"ms: median per local step of a {result['steps']}-step client, rows timed in turns "
          f"({result['clock']} clock)")
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
