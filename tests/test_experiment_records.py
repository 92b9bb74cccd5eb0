"""Sizes in records and summaries of the FedTiny / sparse-baseline / heterogeneous drivers.

Expected values come from the model's shapes and the masks read back from the
final checkpoint, not from the drivers' own accounting.
"""
import json
import math
import os

import jax
import numpy as np
import pytest

from experiments import build, plot, sweep, train
from experiments.configs import fedavg_synthetic, fedtiny_cifar10, fiarse_cifar10
from experiments.methods import hetero
from fedjax_prune.pruning import _hetero as hetero_lib
from fedjax_prune import accounting, checkpoint, federated, models
from tests.pruning import test_hetero, test_sparse_baselines

DENSITY_KEYS = {"density/dense_0/kernel", "density/dense_1/kernel"}
COHORT = 3


def sparse_config(method: str, sparse_method: str = "feddst"):
  """The sparse-baseline tests' tiny MLP run (synthetic data, 4 rounds), checkpointed every round."""
  c = test_sparse_baselines.tiny_config(method, sparse_method)
  assert c.clients_per_round == COHORT
  c.checkpoint_every = 1
  return c


def _read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  _, arrays, _ = checkpoint.read_arrays(os.path.join(workdir, train.CHECKPOINT_DIR))
  return records, summary, arrays


def _final_masks(arrays, *, broadcast=True):
  """{'dense_0/kernel': bool mask} of the final checkpoint's server model, broadcast to the
  parameter's shape or as stored (`()` for an unpruned leaf)."""
  out = {}
  for path, value in arrays.items():
    if path.startswith(".params["):
      keys = path[len(".params["):-1].replace("'", "").split("][")
      mask = np.asarray(arrays[".masks[" + path[len(".params["):]], bool)
      out["/".join(keys)] = np.broadcast_to(mask, value.shape) if broadcast else mask
  return out


def _nested(flat):
  tree = {}
  for path, leaf in flat.items():
    layer, name = path.split("/")
    tree.setdefault(layer, {})[name] = leaf
  return tree


def _bitmap_bytes(arrays):
  """float32 values of the kept entries + one bit per entry of each stored non-scalar mask."""
  full, stored = _final_masks(arrays), _final_masks(arrays, broadcast=False)
  return sum(4 * int(full[k].sum()) + (-(-stored[k].size // 8) if stored[k].size > 1 else 0)
             for k in full)


@pytest.fixture(scope="module")
def fedtiny_run(tmp_path_factory):
  """A finished FedTiny run, in the workdir a sweep over sparse.density would give it."""
  root = tmp_path_factory.mktemp("sweep")
  config = sparse_config("fedtiny")
  workdir = os.path.join(str(root), sweep.run_name({"sparse.density": 0.1}))
  train.train_and_evaluate(config, workdir)
  return config, str(root), workdir


def test_fedtiny_summary_and_records_report_kept_sizes(fedtiny_run):
  config, _, workdir = fedtiny_run
  records, summary, arrays = _read(workdir)
  masks = _final_masks(arrays)
  kept = sum(int(m.sum()) for m in masks.values())
  dense = 784 * 16 + 16 + 16 * 10 + 10
  assert summary["dense_params"] == dense
  assert summary["params"] == kept < 0.2 * dense  # density 0.1: kept, not dense
  assert "kept_params" not in summary and "sparse_flops" not in summary
  spec = models.mlp(input_shape=(28, 28, 1), hidden=(16,), num_classes=10)
  assert summary["dense_flops"] == accounting.flops(spec)
  assert summary["flops"] == accounting.flops(spec, _nested(masks)) < summary["dense_flops"] / 5
  last = records[-1]
  assert last["params"] == summary["params"] and last["flops"] == summary["flops"]
  for r in records:
    assert {k for k in r if k.startswith("density/")} == DENSITY_KEYS
    assert r["params"] < 0.2 * dense
  for key in DENSITY_KEYS:
    assert last[key] == pytest.approx(masks[key[len("density/"):]].mean())
  # No adjustment in the last round: its broadcast masks are the final ones (cohort of 3).
  assert not last["adjusted"]
  assert last["bytes_down"] == last["bytes_up"] == COHORT * _bitmap_bytes(arrays)


def test_plot_and_sweep_read_the_kept_size(fedtiny_run, tmp_path):
  config, root, workdir = fedtiny_run
  _, summary, arrays = _read(workdir)
  kept = sum(int(m.sum()) for m in _final_masks(arrays).values())
  run = plot.load_run(workdir)
  assert plot.final_value(run, "params") == kept
  assert plot.final_value(run, "flops") == summary["flops"] < summary["dense_flops"]
  written = plot.plot_workdirs([workdir], str(tmp_path / "plots"))
  assert os.path.join(str(tmp_path / "plots"), f"layers_{run['name']}.png") in written

  def must_not_train(*args, **kwargs):
    raise AssertionError("the finished run must be read, not trained again")

  rows = sweep.run_sweep(config, lambda add: add(**{"sparse.density": 0.1}), root,
                         log=lambda *_: None, train_fn=must_not_train)
  assert rows[0]["status"] == "skipped (done)"
  assert rows[0]["params"] == kept and rows[0]["flops"] == summary["flops"]


def test_snip_baseline_reports_kept_sizes_and_layer_densities(tmp_path):
  workdir = str(tmp_path / "snip")
  train.train_and_evaluate(sparse_config("sparse", "snip"), workdir)
  records, summary, arrays = _read(workdir)
  masks = _final_masks(arrays)
  assert summary["params"] == sum(int(m.sum()) for m in masks.values())
  assert summary["dense_params"] == sum(m.size for m in masks.values())
  assert summary["params"] < 0.2 * summary["dense_params"]
  for r in records:  # fixed masks: every record has the final sizes and traffic
    assert r["params"] == summary["params"] and r["flops"] == summary["flops"]
    assert r["bytes_up"] == r["bytes_down"] == COHORT * _bitmap_bytes(arrays)
    for key in DENSITY_KEYS:
      assert r[key] == pytest.approx(masks[key[len("density/"):]].mean())


# ----------------------------------------------------------------------------- hetero


def hetero_config(method):
  """The hetero driver tests' tiny MLP run, without the capacity sweep."""
  c = test_hetero._tiny_driver_config(method)
  c.hetero.sweep = ()
  return c


def test_fiarse_summary_has_per_level_sizes(tmp_path):
  summary = train.train_and_evaluate(hetero_config("fiarse"), str(tmp_path / "run"))
  n = 784 * 8 + 8 + 8 * 3 + 3  # every MLP leaf is maskable (no BatchNorm)
  assert summary["params"] == n
  assert tuple(summary["capacities"]) == (1.0, 0.25)
  # Level c keeps the floor(c n) largest |x| (trained weights have no ties).
  assert summary["level_params"] == [n, math.floor(0.25 * n)]
  spec = models.mlp(input_shape=(28, 28, 1), hidden=(8,), num_classes=3)
  full, quarter = summary["level_flops"]
  assert full == accounting.flops(spec)
  assert quarter < 0.5 * full


def _expected_width_params(shapes, ratio):
  """Kept entries of the width-`ratio` submodel: every hidden channel count scaled by
  `ratio` (ceil), the image input channels and the class outputs kept whole."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    top = str(path[0].key)
    shape = tuple(leaf.shape)
    keep = lambda c: math.ceil(ratio * c)
    if len(shape) >= 2:
      ci = shape[-2] if top == "stem" else keep(shape[-2])
      co = shape[-1] if top == "head" else keep(shape[-1])
      total += math.prod(shape[:-2]) * ci * co
    else:
      total += shape[0] if top == "head" else keep(shape[0])
  return total


@pytest.mark.parametrize("method", ["heterofl", "fedrolex"])
def test_width_levels_count_their_submodel(method):
  c = hetero_config(method)
  c.hetero.capacities = (1.0, 0.25)  # width ratios 1 and 1/2
  spec = models.resnet18(width_multiplier=1 / 8, norm="batch_static", input_shape=(8, 8, 3))
  params, batch_stats = models.init_params(spec, jax.random.key(0))
  schedule = federated.LocalSchedule(batch_size=4, num_steps=1)
  method_obj = hetero._method(c, models.make_apply(spec, conv_impl="lax"), params, schedule, None)
  state = method_obj.algorithm.init(params, jax.random.key(0), batch_stats=batch_stats)
  level_params, level_flops = hetero_lib.level_sizes(
      lambda s, cap: hetero_lib.submodel_level_masks(method_obj, s, cap), state, spec, (1.0, 0.25))
  shapes, _ = models.param_shapes(spec)
  full = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert level_params[0] == full
  assert level_params[1] == _expected_width_params(shapes, 0.5)
  assert 0.2 < level_params[1] / full < 0.3  # ~ c = 1/4 (stem input and head output whole)
  assert level_flops[0] == accounting.flops(spec)
  assert 0.2 < level_flops[1] / level_flops[0] < 0.3


def test_repartition_cohort_larger_than_its_clients_is_refused_before_writing(tmp_path):
  c = hetero_config("fiarse")
  c.hetero.repartition = "balanced_dirichlet"
  c.hetero.num_clients = 2
  workdir = tmp_path / "run"
  with pytest.raises(build.ConfigError,
                     match=r"clients_per_round=3 exceeds hetero.num_clients=2: allowed \[1, 2\]"):
    train.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()
  c.clients_per_round = 2
  hetero.validate(c)  # within range: accepted
  c.hetero.repartition = ""
  c.clients_per_round = 3
  hetero.validate(c)  # no re-partition: the dataset's clients bound the cohort (train.py)
