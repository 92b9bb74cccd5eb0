"""The benchmark suite runs in smoke size and writes well-formed, self-consistent JSON."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
sys.path.insert(0, BENCH)

import _common  # noqa: E402
import engine  # noqa: E402
import memory  # noqa: E402
import pfl_reference  # noqa: E402
import precision  # noqa: E402
import pruning_payoff  # noqa: E402
import scaling  # noqa: E402
import step_loop  # noqa: E402
import torch_peer  # noqa: E402

from fedjax_prune import accounting, models  # noqa: E402


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_engine_benchmark_smoke(tmp_path):
  out = str(tmp_path / "engine.json")
  # Two engine strategies and one loop lowering: the table's mechanics, not every candidate
  # (each is a compile; `--strategies auto` is what `performance.candidate_strategies` lists).
  result = engine.main(["--smoke", "--models", "leaf_femnist_cnn,logistic", "--out", out,
                        "--strategies", "sequential+tapgrad,vmap+lax", "--loop-impls", "lax",
                        "--no-shuffled-loop"])
  saved = _load(out)
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  strategies = {(r["model"], r["strategy"]) for r in saved["rows"]}
  assert ("leaf_femnist_cnn", "loop+lax") in strategies and ("logistic", "vmap+lax") in strategies
  assert ("leaf_femnist_cnn", "sequential+tapgrad") in strategies
  if jax.device_count() > 1:  # every strategy also runs sharded over the CPU devices
    assert ("leaf_femnist_cnn", f"sequential+tapgrad@{jax.device_count()}dev") in strategies
    assert saved["cpu_devices"] == jax.device_count()
  for row in saved["rows"]:
    assert row["status"] == "ok"
    assert row["round_s"] > 0 and row["client_steps_per_s"] > 0 and row["gflops"] > 0
    assert row["rounds_per_s"] == pytest.approx(1 / row["round_s"])
    # Throughput is exactly the workload's FLOPs over the time: 2 clients x 2 steps.
    spec = engine.model_specs(True)[row["model"]]
    flops = accounting.training_flops(spec, saved["batch"]) * row["cohort"] * saved["steps"]
    assert row["gflops"] == pytest.approx(flops / row["round_s"] / 1e9)
    assert row["pct_of_ceiling"] == pytest.approx(100 * row["gflops"] / saved["matmul_ceiling_gflops"])
  assert saved["matmul_ceiling_gflops"] > 0 and saved["device"] and saved["backend"] == jax.default_backend()
  best = [r for r in saved["rows"] if r["best_engine"]]
  assert len(best) == 2  # one per model, the fastest engine strategy
  for b in best:
    engine_rows = [r for r in saved["rows"] if r["model"] == b["model"] and not r["strategy"].startswith("loop")]
    assert b["round_s"] == min(r["round_s"] for r in engine_rows)


def test_engine_text_workload_is_the_leaf_shakespeare_setting():
  # The text defaults are the dense Shakespeare config's client work: batch 10, one local epoch
  # over a client's capped windows (26 batches of 10 for 256), its clients per round.
  import math

  from experiments.configs import fedavg_shakespeare
  config = fedavg_shakespeare.get_config()
  specs = engine.model_specs(False)
  for name in ("shakespeare_lstm", "shakespeare_transformer"):
    steps, batch, cohorts = engine.default_workload(specs[name], "cpu")
    assert batch == config.client.batch_size and config.client.num_epochs == 1
    assert steps == math.ceil(config.data.max_windows_per_client / batch)
    assert config.clients_per_round in cohorts
    assert config.clients_per_round in engine.default_workload(specs[name], "gpu")[2]
  assert engine.default_workload(specs["leaf_femnist_cnn"], "cpu") == (4, 32, (1, 8, 32, 128))


def test_engine_text_flops_per_token_by_hand():
  # Training FLOPs per token = 3 x 2 x MACs per token: every token passes every recurrent
  # (or attention/FFN) weight once; the head runs at the last position only (1/T per token).
  specs = engine.model_specs(False)
  lstm = engine.workload_info(specs["shakespeare_lstm"], 26, 10)
  macs = 4 * 256 * (8 + 256) + 4 * 256 * (256 + 256) + 256 * 81 / 80
  assert lstm["train_flops_per_token"] == pytest.approx(6 * macs)
  assert (lstm["tokens_per_step"], lstm["params"]) == (800, 818_137)
  tr = engine.workload_info(specs["shakespeare_transformer"], 26, 10)
  d, t = 128, 80  # 4 blocks: q, k, v, o (4 d^2), FFN (2 x d x 4d), scores and weights x v (2 T d)
  macs = 4 * (4 * d * d + 2 * d * 4 * d + 2 * t * d) + d * 81 / t
  assert tr["train_flops_per_token"] == pytest.approx(6 * macs)
  assert "train_flops_per_token" not in engine.workload_info(specs["mlp"], 4, 32)


@pytest.mark.parametrize("model", ["shakespeare_lstm",  # ~3 s of compiling on 2 idle cores
                                   pytest.param("shakespeare_transformer", marks=pytest.mark.slow)])
def test_engine_text_models_quick(tmp_path, model):
  # A text model through the whole benchmark at tiny size: the round vs the per-client loop,
  # tokens/s and the FLOP rate per token consistent with the accounting.
  out = str(tmp_path / "engine_text.json")
  engine.main(["--smoke", "--models", model, "--strategies", "vmap+lax", "--no-shuffled-loop",
               "--cpu-devices", "1", "--out", out])
  saved = _load(out)
  specs = engine.model_specs(True)
  assert {(r["model"], r["strategy"]) for r in saved["rows"]} == {(model, "loop+lax"), (model, "vmap+lax")}
  for row in saved["rows"]:
    spec, info = specs[row["model"]], saved["models"][row["model"]]
    assert row["status"] == "ok" and (row["steps"], row["batch"]) == (2, 8) == (info["steps"], info["batch"])
    tokens = row["cohort"] * row["steps"] * row["batch"] * spec.seq_len
    assert row["tokens_per_s"] == pytest.approx(tokens / row["round_s"])
    assert info["train_flops_per_token"] * tokens == pytest.approx(
        accounting.training_flops(spec, 8) * row["cohort"] * row["steps"])
    assert row["gflops"] == pytest.approx(info["train_flops_per_token"] * row["tokens_per_s"] / 1e9)
    assert row["pct_of_ceiling"] == pytest.approx(100 * row["gflops"] / saved["matmul_ceiling_gflops"])
    loop = next(r for r in saved["rows"] if r["model"] == row["model"] and r["strategy"] == "loop+lax")
    assert row["speedup_vs_best_loop"] == pytest.approx(loop["round_s"] / row["round_s"])
  with pytest.raises(SystemExit):  # a misspelt model is refused by name, before any timing
    engine.main(["--smoke", "--models", "shakespeare_lstn", "--out", out])


@pytest.mark.parametrize("model", ["leaf_femnist_cnn", "mlp"])
def test_shuffled_loop_baseline_computes_the_engine_round(model):
  # The "same work" loop must be the engine's round written as a loop, or its ratio means nothing.
  spec = engine.model_specs(True)[model]
  _, params, batch_stats = models.build(spec, jax.random.key(0))
  data = engine.make_data(spec, 3, 2, 8, spec.num_classes)
  data = data._replace(num_examples=jnp.asarray([16, 11, 5], jnp.int32))  # unequal, a partial batch
  strategy = engine.performance.Strategy.from_name("sequential+lax")
  params_engine = engine.engine_round(spec, params, data, 2, 8, strategy, batch_stats=batch_stats)().params
  params_loop, _ = engine.shuffled_loop_round(spec, params, data, 2, 8, "lax", batch_stats)()
  bare_loop, _ = engine.loop_round(spec, params, data, 2, 8, "lax", batch_stats)()
  for a, b in zip(jax.tree.leaves(params_engine), jax.tree.leaves(params_loop)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # ...whereas the bare loop (fixed, unshuffled batches) is a different round.
  assert not all(np.allclose(a, c, rtol=1e-5, atol=1e-6)
                 for a, c in zip(jax.tree.leaves(params_engine), jax.tree.leaves(bare_loop)))


def test_engine_per_model_overrides_and_budget(tmp_path):
  out = str(tmp_path / "engine.json")
  engine.main(["--models", "logistic", "--cohorts", "2,4", "--model-cohorts", "logistic=4",
               "--strategies", "vmap+lax,chunked4+lax,sequential+lax", "--loop-impls", "lax", "--donate",
               "--repeats", "1", "--steps", "2", "--batch", "4", "--cpu-devices", "1", "--out", out])
  rows = _load(out)["rows"]
  assert {r["cohort"] for r in rows} == {4}
  # chunked4 at C=4 is the same program as vmap: not measured twice; --cpu-devices 1: no
  # sharded ('@Ndev') rows.
  assert {r["strategy"] for r in rows} == {"loop+lax", "loop+lax+shuffled", "vmap+lax", "sequential+lax"}
  for r in rows:  # each ratio is against the right baseline, measured in the same turns
    loops = {q["strategy"]: q["round_s"] for q in rows if q["strategy"].startswith("loop")}
    assert r["speedup_vs_best_loop"] == pytest.approx(min(loops.values()) / r["round_s"])
    assert r["speedup_vs_best_shuffled_loop"] == pytest.approx(loops["loop+lax+shuffled"] / r["round_s"])
  engine.main(["--models", "logistic", "--cohorts", "2", "--time-budget", "1e-9", "--repeats", "1",
               "--steps", "1", "--batch", "4", "--no-shuffled-loop", "--out", out])
  rows = _load(out)["rows"]
  assert all(r["status"].startswith("skipped") and r["round_s"] is None for r in rows)
  assert not any(r["strategy"].endswith("+shuffled") for r in rows)


def test_engine_bf16_compute_smoke(tmp_path):
  out = str(tmp_path / "engine_bf16.json")
  engine.main(["--models", "mlp", "--cohorts", "2", "--strategies", "vmap+lax", "--loop-impls", "lax",
               "--repeats", "1", "--steps", "1", "--batch", "4", "--cpu-devices", "1",
               "--compute-dtype", "bfloat16", "--smoke", "--out", out])
  saved = _load(out)
  assert saved["compute_dtype"] == "bfloat16" and saved["matmul_ceiling_gflops"] > 0
  assert saved["rows"] and all(r["status"] == "ok" and r["round_s"] > 0 for r in saved["rows"])


def test_pfl_reference_smoke(tmp_path):
  out = str(tmp_path / "pfl.json")
  result = pfl_reference.main(["--smoke", "--out", out])
  saved = _load(out)
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  assert "synthetic" in saved["data"]
  spec = pfl_reference.pfl_simple_cnn()
  assert accounting.param_count(spec) == 1_626_442  # pfl-research simple_cnn at 32x32x3, 10 classes
  assert saved["local_steps"] == 50 // 10
  # One scanned block of rounds = the same rounds one by one (same cohorts and keys).
  assert saved["loop_vs_scan_final_loss_equal"] is True
  for row in saved["rows"]:
    assert row["compile_s"] > 0 and row["wall_s"] > 0 and row["extrapolated"] is True
    assert row["wall_s_1500_rounds"] == pytest.approx(1500 / row["rounds_per_s"])


def test_pruning_payoff_smoke(tmp_path):
  out = str(tmp_path / "pruning.json")
  pruning_payoff.main(["--smoke", "--out", out])
  rows = _load(out)["rows"]
  by = {(r["variant"], r.get("target_density", r["density"])): r for r in rows}
  dense, masked, smaller = by[("dense", 1.0)], by[("masked", 0.25)], by[("smaller", 0.25)]
  assert dense["vs_dense"] == 1.0
  assert smaller["params"] < dense["params"] and smaller["flops_ratio"] < 1.0
  assert masked["params"] < dense["params"] and 0.1 < masked["flops_ratio"] < 0.5
  for r in rows:
    # Each variant is compared with the dense round timed in turns with it.
    assert r["round_s"] > 0 and r["vs_dense"] == pytest.approx(r.get("dense_round_s", r["round_s"]) / r["round_s"])


class _FakeClock:
  """A clock that only the timed functions move (exact, machine-independent timings)."""

  def __init__(self):
    self.now = 0.0

  def fn(self, seconds, log, name):
    def run():
      self.now += seconds
      log.append(name)
    return run


def test_interleaved_medians_spreads_bursts_and_reports_failures(monkeypatch):
  clock, log = _FakeClock(), []
  monkeypatch.setattr(_common, "clock", lambda: (lambda: clock.now))
  fast, slow = clock.fn(1 / 1024, log, "fast"), clock.fn(1 / 32, log, "slow")
  medians = _common.interleaved_medians([fast, slow], 2, min_total_s=1 / 8, burst_s=1 / 64)
  assert medians == [1 / 1024, 1 / 32]
  timed = log[2:]  # after one estimate call each
  # fast: 128 calls (1/8 s) in 8 bursts of 16; slow: 4 calls (1/8 s), one per turn, spread over the 8 turns.
  assert timed.count("fast") == 128 and timed.count("slow") == 4
  turns = "".join("f" if n == "fast" else "s" for n in timed).replace("f" * 16, "F")
  assert turns == "FFsFFsFFsFFs"

  def broken():
    raise RuntimeError("out of memory")
  log.clear()
  out = _common.interleaved_medians([fast, broken], 3, catch=True)
  assert out[0] == 1 / 1024 and log.count("fast") == 3
  assert isinstance(out[1], RuntimeError)
  with pytest.raises(RuntimeError, match="out of memory"):
    _common.interleaved_medians([fast, broken], 3)
  assert _common.interleaved_medians([], 3) == []


def test_random_masks_keep_the_density_of_every_kernel():
  params = {"a": {"kernel": jnp.ones((40, 50)), "bias": jnp.ones((50,))}}
  masks = _common.random_masks(params, 0.25, jax.random.key(0))
  assert masks["a"]["bias"].shape == () and bool(masks["a"]["bias"])
  assert abs(float(jnp.mean(masks["a"]["kernel"])) - 0.25) < 0.05


def test_memory_smoke_matches_the_analytic_floor(tmp_path):
  out = str(tmp_path / "memory.json")
  memory.main(["--smoke", "--model", "mlp", "--out", out])
  saved = _load(out)
  summary = {s["strategy"].split("+")[0]: s for s in saved["summary"]}
  floor = saved["floor"]["total"]
  # Under vmap every client holds its own params, grads and activations: about the floor.
  assert 0.5 < summary["vmap"]["per_client_train_bytes"] / floor < 2.0
  # In-graph sequential clients train one at a time: a client adds (almost) only its data.
  assert summary["sequential"]["per_client_train_bytes"] < 0.1 * floor
  assert summary["sequential"]["largest_cohort_that_fits"] > summary["vmap"]["largest_cohort_that_fits"]
  assert "host physical RAM" in saved["memory_limit_source"]  # CPU: said, not pretended


def test_precision_smoke(tmp_path):
  out = str(tmp_path / "precision.json")
  precision.main(["--smoke", "--precisions", "highest,bfloat16,bf16_compute", "--out", out])
  rows = {r["precision"]: r for r in _load(out)["rows"]}
  assert rows["highest"]["param_rel_diff_vs_f32"] == 0.0 and rows["highest"]["speedup_vs_f32"] == 1.0
  assert rows["highest"]["accuracy_ok"] is True
  reference = rows["highest"]["test_accuracy"]
  for r in rows.values():
    assert np.isfinite(r["final_train_loss"])
    # The report's own arithmetic: the drop is against the f32 run, and accuracy_ok says
    # whether it is within the tolerance (a wrong reference or sign fails this).
    assert r["accuracy_drop_vs_f32"] == pytest.approx(reference - r["test_accuracy"])
    assert r["accuracy_ok"] == (r["accuracy_drop_vs_f32"] <= _load(out)["tolerance"])
  # bf16 GEMMs through the model change the run (on CPU, unlike the matmul-precision
  # setting, which XLA:CPU ignores), but only by bf16 rounding.
  assert 0.0 < rows["bf16_compute"]["param_rel_diff_vs_f32"] < 0.05


@pytest.mark.parametrize("model", ["leaf_femnist_cnn", "mlp"])
def test_step_loop_smoke_runs_three_equal_programs(tmp_path, model):
  out = str(tmp_path / "step_loop.json")
  step_loop.main(["--smoke", "--model", model, "--out", out])  # asserts the outputs agree
  saved = _load(out)
  rows = {r["program"]: r for r in saved["rows"]}
  assert set(rows) == {"dispatch", "fori_loop", "unrolled"}
  assert rows["dispatch"]["vs_dispatch"] == 1.0
  assert all(r["ms"] > 0 and np.isfinite(r["vs_dispatch"]) for r in rows.values())
  assert saved["conv_impl"] == models.resolve_conv_impl("auto")


def test_step_loop_programs_compute_the_same_steps():
  # Against a hand-written SGD loop in numpy-checked JAX: all three programs take the
  # same S steps (a wrong step count or batch order would differ by a full step).
  spec = models.mlp(input_shape=(6,), hidden=(5,), num_classes=3)
  params, _ = models.init_params(spec, jax.random.key(0))
  xs = jax.random.normal(jax.random.key(1), (3, 4, 6))
  ys = jax.random.randint(jax.random.key(2), (3, 4), 0, 3)
  apply_fn = models.make_apply(spec)

  def loss(p, x, y):
    logits, _ = apply_fn(p, {}, x, train=True)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  expected = params
  for t in range(3):
    expected = jax.tree.map(lambda w, g: w - 0.01 * g, expected, jax.grad(loss)(expected, xs[t], ys[t]))
  for name, run in step_loop.step_programs(spec, "lax", xs, ys, params).items():
    for a, b in zip(jax.tree.leaves(run()), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
  two_steps = step_loop.step_programs(spec, "lax", xs[:2], ys[:2], params)["fori_loop"]()
  assert not np.allclose(jax.tree.leaves(two_steps)[0], jax.tree.leaves(expected)[0])


@pytest.mark.slow  # ~40 s; the sharded rows of the engine smoke cover the sharded round
def test_scaling_smoke_with_fake_devices(tmp_path):
  out = str(tmp_path / "scaling.json")
  scaling.main(["--smoke", "--out", out])
  saved = _load(out)
  assert [r["cohort"] for r in saved["cohort_sweep"]] == [1, 2]
  weak = saved["weak_scaling"]
  assert [r["devices"] for r in weak] == [1, 2] and all(r["status"] == "ok" for r in weak)
  assert [r["cohort"] for r in weak] == [1, 2] and weak[0]["weak_efficiency"] == 1.0
  with open(str(tmp_path / "scaling.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_remat_apply_gives_the_same_values_and_gradients():
  spec = models.leaf_femnist_cnn(widths=(4, 8), dense_width=16)
  apply_fn, params, stats = models.build(spec, jax.random.key(0))
  remat = _common.remat_apply(apply_fn)
  x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
  loss = lambda f: (lambda p: jnp.sum(f(p, stats, x, train=True)[0] ** 2))
  np.testing.assert_allclose(jax.jit(loss(remat))(params), jax.jit(loss(apply_fn))(params), rtol=1e-6)
  g1, g2 = jax.jit(jax.grad(loss(remat)))(params), jax.jit(jax.grad(loss(apply_fn)))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_run_gpu_script_explains_a_missing_gpu(tmp_path):
  script = os.path.join(BENCH, "run_gpu.sh")
  assert subprocess.run(["bash", "-n", script]).returncode == 0
  if jax.default_backend() != "cpu":
    pytest.skip("an accelerator is present: the script would run the suite")
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
  proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 3
  assert "no Python here has JAX with a GPU backend" in proc.stdout
  assert os.listdir(tmp_path) == ["run_gpu.log"]  # nothing else written, and only under $OUT


def test_torch_peer_counts_the_same_flops_as_the_accounting_module():
  spec = models.leaf_femnist_cnn()
  assert torch_peer.LEAF_CNN_TRAIN_FLOPS_PER_EXAMPLE == accounting.training_flops(spec, 32) / 32


def test_torch_peer_smoke(tmp_path):
  torch = pytest.importorskip("torch")  # not a dependency: runs where PyTorch is installed
  out = str(tmp_path / "torch.json")
  result = torch_peer.main(["--smoke", "--out", out])
  (row,) = _load(out)["rows"]
  assert row["cohort"] == 2 and row["round_s"] > 0
  assert row["client_steps_per_s"] == pytest.approx(2 * 2 / row["round_s"])
  assert result["torch"] == torch.__version__
  # The round really averages: two clients that start from the same state and see
  # the same batches end where one client ends.
  model = torch_peer.leaf_cnn(torch, widths=(2, 2), dense=4)
  state = {k: v.detach().clone() for k, v in model.state_dict().items()}
  batch = [(torch.rand(4, 1, 28, 28), torch.randint(0, 62, (4,)))]
  one = torch_peer.fedavg_round(torch, model, state, [batch], 0.1)
  two = torch_peer.fedavg_round(torch, model, state, [batch, batch], 0.1)
  for k in one:
    assert torch.allclose(one[k], two[k], atol=1e-6)
    assert not torch.equal(one[k], state[k])


def test_paper_scale_script_lists_existing_configs_and_refuses_unknown_names(tmp_path):
  script = os.path.join(BENCH, "paper_scale.sh")
  assert subprocess.run(["bash", "-n", script]).returncode == 0
  listed = subprocess.run(["bash", script, "--list"], capture_output=True, text=True, check=True)
  names = dict(line.split() for line in listed.stdout.splitlines())
  assert set(names) == {"asp", "fiarse", "fedtiny", "cavp"}
  repo = os.path.dirname(BENCH)
  assert all(os.path.isfile(os.path.join(repo, path)) for path in names.values())
  env = dict(os.environ, OUT=str(tmp_path))
  bad = subprocess.run(["bash", script, "nope"], env=env, capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown NAME 'nope'" in bad.stderr
  missing = subprocess.run(["bash", script, "asp"], capture_output=True, text=True,
                           env=dict(env, PACK=str(tmp_path / "absent.tar.gz")))
  assert missing.returncode == 2 and "does not exist" in missing.stderr
  assert os.listdir(tmp_path) == []  # refused before anything was written


@pytest.mark.slow
def test_paper_scale_slices_pack_and_continue_elsewhere(tmp_path):
  """A slice that runs out of time exits 3; a finished sweep is packed into $OUT, and
  unpacked into another workdir (a fresh device lease) the next slice finds it done."""
  script = os.path.join(BENCH, "paper_scale.sh")
  config = os.path.join("experiments", "configs", "fedavg_tiny.py")
  base = dict(os.environ, PYTHON=sys.executable)
  run = lambda env: subprocess.run(["bash", script, config, "--config.rounds=3"],
                                   capture_output=True, text=True, env=dict(base, **env))
  cut = run({"SLICE_S": "1", "WORKDIR": str(tmp_path / "a")})
  assert cut.returncode == 3 and "run the same command again" in cut.stdout, cut.stderr
  out = tmp_path / "out"
  out.mkdir()
  done = run({"SLICE_S": "300", "WORKDIR": str(tmp_path / "a"), "OUT": str(out)})
  assert done.returncode == 0, done.stdout + done.stderr
  assert sorted(os.listdir(out)) == ["paper_fedavg_tiny.tar.gz", "paper_fedavg_tiny_summary.md"]
  again = run({"SLICE_S": "300", "WORKDIR": str(tmp_path / "b"),
               "PACK": str(out / "paper_fedavg_tiny.tar.gz")})
  assert again.returncode == 0, again.stdout + again.stderr
  rows = json.loads((tmp_path / "b" / "sweep_summary.json").read_text())
  assert [r["status"] for r in rows] == ["skipped (done)"] * 2
  assert [r["rounds"] for r in rows] == [3, 3]


@pytest.mark.slow  # ~10 s: nine small programs compiled
def test_robust_aggregators_smoke(tmp_path):
  import robust_aggregators
  out = str(tmp_path / "robust.json")
  result = robust_aggregators.main(["--smoke", "--repeats", "1", "--out", out])
  with open(out) as f:
    assert json.load(f)["rows"] == json.loads(json.dumps(result["rows"]))
  rows = {r["row"]: r for r in result["rows"]}
  assert rows["mean"]["x_mean"] == 1.0 and result["coordinates"] == 16 * 32 + 32 + 32 * 4 + 4
  assert set(rows) >= {"median", "trimmed_mean", "norm_bound", "krum", "sort: network"}


def test_evaluation_smoke(tmp_path):
  import evaluation
  out = str(tmp_path / "evaluation.json")
  result = evaluation.main(["--smoke", "--repeats", "1", "--out", out])
  with open(out) as f:
    assert json.load(f)["rows"] == json.loads(json.dumps(result["rows"]))
  rows = {r["row"]: r for r in result["rows"]}
  assert rows["pooled (now)"]["x_pooled"] == 1.0 and result["central_rows"] == 30
  assert set(rows) == {"per-client (before)", "pooled (now)", "central only"}
