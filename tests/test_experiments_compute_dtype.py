"""`config.model.compute_dtype` in the experiment drivers (mixed precision: bf16 GEMMs).

What bf16 does inside the model is tested in tests/models/test_compute_dtype.py (the
jaxpr's GEMM dtypes); here: each driver passes the field through (a bf16 run differs
from the float32 one by bf16 rounding only, and keeps float32 parameters in its
checkpoints), and bad values are refused before anything is written.
"""
import numpy as np
import pytest

from experiments import build, train
from experiments.configs import fedavg_tiny
from tests import test_cavp_resume, test_method_contract
from tests.test_method_contract import _final_arrays, _records
from tests.pruning import test_hetero


def _params(workdir):
  return {k: v for k, v in _final_arrays(workdir)[1].items() if ".params" in k}


def _losses(workdir):
  return [r["train_loss"] for r in _records(workdir)]


def test_fedavg_bf16_run_is_the_float32_run_up_to_bf16_rounding(tmp_path):
  runs = {}
  for dtype in ("float32", "bfloat16"):
    config = fedavg_tiny.get_config()
    config.model.compute_dtype = dtype
    workdir = str(tmp_path / dtype)
    runs[dtype] = (train.train_and_evaluate(config, workdir), _params(workdir), _losses(workdir))
  (_, p32, loss32), (summary16, p16, loss16) = runs["float32"], runs["bfloat16"]
  assert p32.keys() == p16.keys() and p16
  assert all(v.dtype == np.float32 for v in p16.values())  # parameters stay float32
  diffs = [np.linalg.norm(p16[k] - p32[k]) / (np.linalg.norm(p32[k]) + 1e-12) for k in p32]
  assert max(diffs) > 0, "compute_dtype did not reach the model (bit-identical to float32)"
  assert max(diffs) < 0.05
  np.testing.assert_allclose(loss16, loss32, rtol=0.05, atol=0.02)
  assert np.isfinite(summary16["test_accuracy"])


_BF16_DRIVERS = {
    "fiarse": lambda: test_hetero._tiny_driver_config("fiarse"),
    "cavp": test_cavp_resume.tiny_config,
    "scalefl": lambda: test_method_contract.hetero_config("scalefl"),  # the early-exit ResNet
}


# fiarse in the default suite; cavp and scalefl compile ResNets (~25 s each on 2 cores), and
# their bf16 GEMMs are checked at the model level in tests/models/test_compute_dtype.py.
@pytest.mark.parametrize("name", ["fiarse", pytest.param("cavp", marks=pytest.mark.slow),
                                  pytest.param("scalefl", marks=pytest.mark.slow)])
def test_cavp_fiarse_and_scalefl_accept_bf16(tmp_path, name):
  config = _BF16_DRIVERS[name]()
  config.model.compute_dtype = "bfloat16"
  summary = train.train_and_evaluate(config, str(tmp_path / name))
  losses = _losses(str(tmp_path / name))
  assert len(losses) == config.rounds and np.all(np.isfinite(losses)), name
  assert summary["rounds"] == config.rounds


@pytest.mark.parametrize("value", ["float16", "int8", "bf16"])
def test_unknown_compute_dtype_is_refused_before_writing(tmp_path, value):
  config = fedavg_tiny.get_config()
  config.model.compute_dtype = value
  with pytest.raises(build.ConfigError, match=r"config.model.compute_dtype=.* allowed one of"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


