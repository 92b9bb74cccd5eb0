"""describe / client_stats / label_counts on a hand-checkable dataset."""
import os

import numpy as np
import pytest

from fedjax_prune import data as fdata


def _tiny():
  # Client a: labels 0,1,1 ; b: 2,2,2,2,0 ; c: 1. Test: a: 1 ; b: (none) ; c: 0,2.
  train = {"a": (np.zeros((3, 2), np.uint8), np.array([0, 1, 1])),
           "b": (np.zeros((5, 2), np.uint8), np.array([2, 2, 2, 2, 0])),
           "c": (np.zeros((1, 2), np.uint8), np.array([1]))}
  test = {"a": (np.zeros((1, 2), np.uint8), np.array([1])),
          "c": (np.zeros((2, 2), np.uint8), np.array([0, 2]))}
  return fdata._federated.assemble(train, test, num_classes=4, input_shape=(2,), description="tiny set",
                                   normalize_fn=fdata.normalize_unit, empty_clients="error", source="tiny")


def test_label_counts_ignores_padding():
  ds = _tiny()
  np.testing.assert_array_equal(fdata.label_counts(ds.train, 4), [[1, 2, 0, 0], [1, 0, 4, 0], [0, 1, 0, 0]])
  np.testing.assert_array_equal(fdata.label_counts(ds.test, 4), [[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]])


def test_client_stats_numbers():
  ds = _tiny()
  s = fdata.client_stats(ds.train, 4)
  assert (s.num_clients, s.num_examples) == (3, 9)
  assert (s.examples_min, s.examples_median, s.examples_max) == (1, 3.0, 5)
  assert (s.classes_min, s.classes_median, s.classes_max) == (1, 2.0, 2)
  assert s.classes_present == 3 and s.num_empty_clients == 0
  t = fdata.client_stats(ds.test, 4)
  assert (t.num_examples, t.examples_min, t.examples_max, t.num_empty_clients) == (3, 0, 2, 1)
  assert (t.classes_min, t.classes_max) == (0, 2)


def test_describe_text_and_png(tmp_path):
  ds = _tiny()
  path = str(tmp_path / "labels.png")
  text = fdata.describe(ds, plot_path=path)
  assert "tiny set" in text
  assert "train: 3 clients, 9 examples" in text
  assert "examples per client: min 1 / median 3 / max 5" in text
  assert "classes per client:  min 1 / median 2 / max 2; classes present 3/4" in text
  assert "test: 3 clients, 3 examples, 1 clients without examples" in text
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 1000


def test_describe_heatmap_and_bare_client_data(tmp_path):
  rng = np.random.default_rng(0)
  ys = [rng.integers(0, 30, size=n) for n in (4, 7, 2)]
  cd = fdata.from_client_lists([np.zeros((len(y), 1), np.float32) for y in ys], ys)
  path = tmp_path / "heat.png"
  text = fdata.describe(cd, plot_path=path, num_classes=30)  # 30 classes -> heatmap
  assert "train: 3 clients, 13 examples" in text and path.stat().st_size > 1000
  assert "num_classes 30" in fdata.describe(cd, num_classes=30)
  with pytest.raises(TypeError, match="FederatedDataset or ClientData"):
    fdata.describe({"x": 1})


def test_describe_real_cifar10(shared_data_dir, tmp_path):
  ds = fdata.load_pfllib_npz(os.path.join(shared_data_dir, "cifar10", "fedlore_pfllib_dir0.3_100clients"))
  text = fdata.describe(ds, plot_path=tmp_path / "cifar.png")
  assert "train: 20 clients, 8,265 examples" in text and "test: 20 clients, 2,767 examples" in text
  assert (tmp_path / "cifar.png").stat().st_size > 1000
