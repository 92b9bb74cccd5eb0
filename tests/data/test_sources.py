"""Real-data sources: LEAF JSON, TFF HDF5, Shakespeare, PFLlib npz, tfds; validation.

Real-data tests read ../shared/data through the `shared_data_dir` fixture and
skip when it is absent; everything else builds tiny files in tmp_path.
"""
import functools
import gzip
import json
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune import data as fdata
from fedjax_prune.data import _shakespeare

FEMNIST_SOURCES = {  # README table: train writers/samples, test writers/samples.
    "wenzhu23333_Federated-Learning": (105, 14_640, 190, 4_170),
    "slz-ai_leaf-torch": (105, 14_708, 184, 4_088),
    "arakotom_flic": (110, 14_697, 198, 4_182),
}
# The source order that reproduces the README's merged statistics.
FEMNIST_MERGE_ORDER = ("wenzhu23333_Federated-Learning", "slz-ai_leaf-torch", "arakotom_flic")
CIFAR_DIR = os.path.join("cifar10", "fedlore_pfllib_dir0.3_100clients")


# ----------------------------------------------------------------------------- fixture writers


def _write_leaf(path, users, *, gz=True):
  """users: {id: (x list, y list)} -> a LEAF JSON shard."""
  obj = {"users": list(users), "num_samples": [len(y) for _, y in users.values()],
         "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()}}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  opener = gzip.open if gz else open
  with opener(path, "wt") as f:
    json.dump(obj, f)


def _femnist_user(rng, n, label=None):
  pix = rng.integers(0, 256, size=(n, 784)) / 255.0
  y = [int(label) if label is not None else int(v) for v in rng.integers(0, 62, size=n)]
  return pix.tolist(), y


def _make_femnist_dir(root, train_users, test_users, *, gz=True):
  ext = ".json.gz" if gz else ".json"
  _write_leaf(os.path.join(root, "train", "all_data_0_train" + ext), train_users, gz=gz)
  _write_leaf(os.path.join(root, "test", "all_data_0_test" + ext), test_users, gz=gz)
  return root


def _write_h5(path, clients):
  """clients: {id: {field: array}} in TFF's examples/<client>/<field> layout."""
  with h5py.File(path, "w") as f:
    g = f.create_group("examples")
    for cid, fields in clients.items():
      c = g.create_group(cid)
      for name, arr in fields.items():
        c.create_dataset(name, data=arr)
  return path


def _write_pfllib(path, x, y):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    np.savez_compressed(f, data=np.array({"x": x, "y": y}, dtype=object))


# ----------------------------------------------------------------------------- FEMNIST (real)


@functools.lru_cache(maxsize=None)
def _femnist_source(path):
  return fdata.load_leaf(path, include_test_only_writers=True)


@pytest.mark.parametrize("source", sorted(FEMNIST_SOURCES))
def test_femnist_single_source_matches_readme(shared_data_dir, source):
  n_train_w, n_train, n_test_w, n_test = FEMNIST_SOURCES[source]
  ds = _femnist_source(os.path.join(shared_data_dir, "femnist", source))
  assert len(ds.client_ids) == n_train_w
  assert int(ds.train.num_examples.sum()) == n_train
  assert len(ds.test_client_ids) == n_test_w
  assert int(ds.test.num_examples.sum()) == n_test
  assert ds.test_client_ids[:n_train_w] == ds.client_ids
  assert ds.train.x.dtype == np.uint8 and ds.train.x.shape[2:] == (28, 28, 1)
  assert ds.num_classes == 62 and ds.input_shape == (28, 28, 1)
  assert int(ds.train.num_examples.min()) >= 2 and int(ds.train.num_examples.max()) <= 320


def test_femnist_pixels_are_lossless_and_leaf_oriented(shared_data_dir):
  src = os.path.join(shared_data_dir, "femnist", "arakotom_flic")
  path = os.path.join(src, "train", "all_data_0_niid_05_keep_0_train_9.json.gz")
  raw = fdata.read_leaf_json(path)
  user = raw["users"][0]
  ds = _femnist_source(src)
  k = ds.client_ids.index(user)
  x_raw = np.asarray(raw["user_data"][user]["x"], np.float32).reshape(-1, 28, 28, 1)
  n = len(x_raw)
  assert int(ds.train.num_examples[k]) == n
  np.testing.assert_allclose(np.asarray(ds.normalize_fn(ds.train.x[k, :n])), x_raw, atol=1e-6)
  np.testing.assert_array_equal(ds.train.y[k, :n], raw["user_data"][user]["y"])
  # LEAF convention: mostly white (1.0) background.
  assert float(np.median(x_raw)) == 1.0


def test_femnist_merged_matches_readme(shared_data_dir):
  dirs = [os.path.join(shared_data_dir, "femnist", s) for s in FEMNIST_MERGE_ORDER]
  ds = fdata.load_leaf(dirs, include_test_only_writers=True)
  n = len(ds.client_ids)
  assert n == 300
  assert int(ds.train.num_examples.sum()) == 41_456
  assert int(ds.test.num_examples[:n].sum()) == 4_759
  assert len(ds.test_client_ids) - n == 240
  assert int(ds.test.num_examples[n:].sum()) == 7_057
  assert len(set(ds.test_client_ids)) == len(ds.test_client_ids)
  # Writers in several sources come from the first one in the given order only.
  counts = dict(zip(ds.client_ids, np.asarray(ds.train.num_examples).tolist()))
  assert counts["f4027_34"] == 131   # wenzhu 131 (first) vs arakotom 149
  assert counts["f2261_76"] == 155   # slz-ai 155 (before arakotom's 25)
  assert counts["f1702_13"] == 158   # wenzhu 158 vs slz-ai 150
  assert (fdata.label_counts(ds.train, 62).sum(0) > 0).all()  # all 62 classes occur
  x_test, y_test = fdata.central_test_set(ds)
  assert x_test.shape == (4_759 + 7_057, 28, 28, 1) and y_test.shape == (4_759 + 7_057,)


# ----------------------------------------------------------------------------- LEAF (fixtures)


def test_leaf_merge_rule_and_test_only_writers(tmp_path):
  rng = np.random.default_rng(0)
  a = _make_femnist_dir(str(tmp_path / "a"), {"w1": _femnist_user(rng, 3, 1), "w2": _femnist_user(rng, 2, 2)},
                        {"w1": _femnist_user(rng, 1, 1), "w2": _femnist_user(rng, 1, 2),
                         "t1": _femnist_user(rng, 2, 5)})
  b = _make_femnist_dir(str(tmp_path / "b"), {"w2": _femnist_user(rng, 4, 3), "w3": _femnist_user(rng, 5, 4)},
                        {"w2": _femnist_user(rng, 2, 3), "t1": _femnist_user(rng, 7, 6),
                         "t2": _femnist_user(rng, 1, 7)}, gz=False)
  ds = fdata.load_leaf([a, b])
  assert ds.client_ids == ("w1", "w2", "w3")
  np.testing.assert_array_equal(ds.train.num_examples, [3, 2, 5])   # w2 from a (first)
  np.testing.assert_array_equal(ds.test.num_examples, [1, 1, 0])    # w3 has no test data
  assert ds.train.y[1, 0] == 2 and ds.test.y[1, 0] == 2              # w2 train+test both from a
  ds2 = fdata.load_leaf([b, a], include_test_only_writers=True)
  np.testing.assert_array_equal(ds2.train.num_examples, [3, 4, 5])  # w2 from b now
  assert ds2.test_client_ids == ("w1", "w2", "w3", "t1", "t2")
  np.testing.assert_array_equal(ds2.test.num_examples, [1, 2, 0, 7, 1])  # t1 from b (first)


def _make_png_dir(root, names, rng):
  from PIL import Image
  os.makedirs(root, exist_ok=True)
  for name in names:
    Image.fromarray(rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)).save(os.path.join(root, name))
  return root


def test_leaf_celeba_images_from_image_dir(tmp_path):
  rng = np.random.default_rng(1)
  names = [f"{i:06d}.png" for i in range(1, 8)]
  img_dir = _make_png_dir(str(tmp_path / "img_align_celeba"), names, rng)
  root = str(tmp_path / "celeba")
  _write_leaf(os.path.join(root, "train", "all_data_niid_0_train_9.json"),
              {"12": (names[:3], [0, 1, 1]), "7": (names[3:5], [1, 0])}, gz=False)
  _write_leaf(os.path.join(root, "test", "all_data_niid_0_test_9.json"),
              {"12": (names[5:6], [1]), "7": (names[6:7], [0])}, gz=False)
  ds = fdata.load_leaf(root, image_dir=img_dir)
  assert ds.client_ids == ("12", "7")
  assert ds.num_classes == 2 and ds.input_shape == (84, 84, 3)
  assert ds.train.x.shape == (2, 3, 84, 84, 3) and ds.train.x.dtype == np.uint8
  np.testing.assert_array_equal(ds.train.y[0], [0, 1, 1])
  np.testing.assert_array_equal(ds.test.num_examples, [1, 1])
  from PIL import Image
  with Image.open(os.path.join(img_dir, names[0])) as img:
    expected = fdata._leaf.resize_image(np.asarray(img), 84)
  np.testing.assert_array_equal(ds.train.x[0, 0], expected)
  small = fdata.load_leaf(root, image_dir=img_dir, image_size=16, center_crop=True)
  assert small.train.x.shape[2:] == (16, 16, 3)
  with pytest.raises(ValueError, match="pass image_dir"):
    fdata.load_leaf(root)
  os.remove(os.path.join(img_dir, names[6]))
  with pytest.raises(FileNotFoundError, match="000007.png"):
    fdata.load_leaf(root, image_dir=img_dir)


def test_leaf_shakespeare_json(tmp_path):
  root = str(tmp_path / "shake")
  text = "To be, or not to be: that is the question~"
  xs = [text[i:i + 10] for i in range(len(text) - 10)]
  ys = [text[i + 10] for i in range(len(text) - 10)]
  _write_leaf(os.path.join(root, "train", "a.json"), {"HAMLET": (xs[:20], ys[:20])}, gz=False)
  _write_leaf(os.path.join(root, "test", "a.json"), {"HAMLET": (xs[20:], ys[20:])}, gz=False)
  ds = fdata.load_leaf(root)
  assert ds.num_classes == fdata.VOCAB_SIZE and ds.input_shape == (10,)
  assert fdata.decode_ids(ds.train.x[0, 3]) == xs[3]
  assert ds.test.y[0, int(ds.test.num_examples[0]) - 1] == fdata.OOV_ID  # '~' is not a LEAF letter


# ----------------------------------------------------------------------------- Shakespeare


def test_leaf_vocabulary():
  assert len(fdata.LEAF_LETTERS) == 80 and len(set(fdata.LEAF_LETTERS)) == 80
  assert fdata.OOV_ID == 80 and fdata.VOCAB_SIZE == 81
  ids = fdata.encode_text("Ab\n}~é")
  np.testing.assert_array_equal(ids, [fdata.LEAF_LETTERS.index("A"), fdata.LEAF_LETTERS.index("b"), 0, 79, 80, 80])
  assert fdata.decode_ids(fdata.encode_text("Hello, world!\n")) == "Hello, world!\n"


def test_char_windows_hand_example():
  ids = fdata.encode_text("abcdef")
  x, y = fdata.char_windows(ids, seq_len=3)
  assert [fdata.decode_ids(r) for r in x] == ["abc", "bcd", "cde"]
  assert fdata.decode_ids(y) == "def" and y.dtype == np.int32
  x, y = fdata.char_windows(ids, seq_len=3, stride=2)
  assert [fdata.decode_ids(r) for r in x] == ["abc", "cde"] and fdata.decode_ids(y) == "df"
  x, y = fdata.char_windows(fdata.encode_text("abcdefghij"), seq_len=2, max_windows=3)
  assert [fdata.decode_ids(r) for r in x] == ["ab", "ef", "hi"] and fdata.decode_ids(y) == "cgj"
  x, y = fdata.char_windows(fdata.encode_text("abc"), seq_len=3)
  assert x.shape == (0, 3) and y.shape == (0,)


def test_shakespeare_from_snippets_hand_example():
  train = {"B": ["ab  c", "d"], "A": ["xy"]}
  test = {"B": ["efgh"], "A": ["z"], "C": ["only test text"]}
  with pytest.warns(UserWarning, match="dropping 1 client"):
    ds = fdata.shakespeare_from_snippets(train, test, seq_len=3)
  # "ab  c" + "\n" + "d" -> spaces collapsed -> "ab c\nd": windows ab_, b_c, _c\n -> targets c, \n, d.
  assert ds.client_ids == ("B",) and ds.test_client_ids == ("B",)
  n = int(ds.train.num_examples[0])
  assert [fdata.decode_ids(r) for r in ds.train.x[0, :n]] == ["ab ", "b c", " c\n"]
  assert fdata.decode_ids(ds.train.y[0, :n]) == "c\nd"
  assert fdata.decode_ids(ds.test.x[0, 0]) == "efg" and fdata.decode_ids(ds.test.y[0, :1]) == "h"
  with pytest.raises(ValueError, match="zero train examples"):
    fdata.shakespeare_from_snippets(train, test, seq_len=3, empty_clients="error")
  kept = fdata.shakespeare_from_snippets(train, test, seq_len=3, empty_clients="keep",
                                        include_test_only_clients=True)
  np.testing.assert_array_equal(kept.train.num_examples, [0, 3])
  assert kept.test_client_ids == ("A", "B", "C")
  np.testing.assert_array_equal(kept.test.num_examples, [0, 1, 11])
  # LEAF's own recipe: every line left-padded with seq_len spaces, every char a target.
  ds = fdata.shakespeare_from_snippets({"A": ["ab"]}, None, seq_len=2, pad_lines=True)
  assert [fdata.decode_ids(r) for r in ds.train.x[0]] == ["  ", " a"] and fdata.decode_ids(ds.train.y[0]) == "ab"


def test_shakespeare_counts_and_windows(shared_data_dir):
  d = os.path.join(shared_data_dir, "shakespeare")
  raw = {s: fdata.read_tff_h5(os.path.join(d, f"shakespeare_{s}.h5")) for s in ("train", "test")}
  assert len(raw["train"]) == 715 and set(raw["train"]) == set(raw["test"])
  assert sum(len(r["snippets"]) for r in raw["train"].values()) == 16_068
  assert sum(len(r["snippets"]) for r in raw["test"].values()) == 2_356
  with pytest.raises(ValueError, match="max_windows_per_client"):
    fdata.load_shakespeare(d)  # all stride-1 windows: ~3.6 GiB padded
  with pytest.warns(UserWarning, match="zero train examples"):
    ds = fdata.load_shakespeare(d, max_windows_per_client=16)
  assert ds.train.x.shape[1:] == (16, 80) and ds.train.x.dtype == np.uint8
  assert ds.num_classes == 81 and int(ds.train.y.max()) < 81
  cid = "ALL_S_WELL_THAT_ENDS_WELL_ADAM"
  k = ds.client_ids.index(cid)
  text = _shakespeare.client_text([s.decode() for s in raw["train"][cid]["snippets"]])
  x, y = fdata.char_windows(fdata.encode_text(text), max_windows=16)
  np.testing.assert_array_equal(ds.train.x[k], x)
  assert fdata.decode_ids(ds.train.x[k, 0]) == text[:80] and fdata.decode_ids(ds.train.y[k, :1]) == text[80]
  leaf = fdata.load_shakespeare(d, max_windows_per_client=4, pad_lines=True)  # no empty clients
  assert len(leaf.client_ids) == 715


# ----------------------------------------------------------------------------- TFF HDF5


def _emnist_clients(rng, sizes, num_classes=62):
  out = {}
  for k, n in enumerate(sizes):
    pix = (255 - rng.integers(0, 256, size=(n, 28, 28))) / 255.0  # 1.0 = background (TFF)
    out[f"f{k:04d}_00"] = {"pixels": pix.astype(np.float32),
                           "label": rng.integers(0, num_classes, size=n).astype(np.int32)}
  return out


def test_tff_h5_emnist_layout(tmp_path):
  rng = np.random.default_rng(2)
  train = _emnist_clients(rng, [3, 5])
  test = _emnist_clients(rng, [1, 2, 4])  # f0002_00 only in test
  tr = _write_h5(str(tmp_path / "fed_emnist_train.h5"), train)
  te = _write_h5(str(tmp_path / "fed_emnist_test.h5"), test)
  ds = fdata.load_tff_h5(tr, te, include_test_only_clients=True)
  assert ds.client_ids == ("f0000_00", "f0001_00")
  assert ds.test_client_ids == ("f0000_00", "f0001_00", "f0002_00")
  assert ds.train.x.dtype == np.uint8 and ds.train.x.shape == (2, 5, 28, 28, 1) and ds.num_classes == 62
  np.testing.assert_allclose(np.asarray(ds.normalize_fn(ds.train.x[1, :5]))[..., 0], train["f0001_00"]["pixels"],
                             atol=1e-6)
  np.testing.assert_array_equal(ds.test.y[2, :4], test["f0002_00"]["label"])
  digits = _write_h5(str(tmp_path / "fed_emnist_digitsonly_train.h5"), _emnist_clients(rng, [2], num_classes=10))
  assert fdata.load_tff_h5(digits).num_classes == 10
  # Non-k/255 pixels stay float32.
  train["f0000_00"]["pixels"] = train["f0000_00"]["pixels"] * 0.999
  ds = fdata.load_tff_h5(_write_h5(str(tmp_path / "float.h5"), train))
  assert ds.train.x.dtype == np.float32


def test_tff_h5_snippets_dispatch_to_shakespeare(tmp_path):
  snippets = [b"Now is the winter of our discontent", b"Made glorious summer by this sun of York;",
              b"And all the clouds that lour'd upon our house"]
  path = _write_h5(str(tmp_path / "shakespeare_train.h5"), {"A_B": {"snippets": np.array(snippets)}})
  ds = fdata.load_tff_h5(path)
  assert ds.num_classes == 81 and ds.input_shape == (80,) and ds.test is None
  text = "\n".join(s.decode() for s in snippets)
  assert int(ds.train.num_examples[0]) == len(text) - 80
  assert fdata.decode_ids(ds.train.x[0, 0]) == text[:80]
  assert fdata.read_tff_h5(path)["A_B"]["snippets"][1] == snippets[1]


def test_tff_h5_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    fdata.read_tff_h5(str(tmp_path / "missing.h5"))
  bad = tmp_path / "bad.h5"
  bad.write_bytes(b"this is not hdf5" * 100)
  with pytest.raises(ValueError, match="not a readable HDF5"):
    fdata.load_tff_h5(str(bad))
  rng = np.random.default_rng(3)
  good = _write_h5(str(tmp_path / "good.h5"), _emnist_clients(rng, [50, 50]))
  with open(good, "rb") as f:
    blob = f.read()
  trunc = tmp_path / "trunc.h5"
  trunc.write_bytes(blob[: len(blob) // 2])
  with pytest.raises(ValueError, match="trunc.h5"):
    fdata.load_tff_h5(str(trunc))
  with h5py.File(str(tmp_path / "nogroup.h5"), "w") as f:
    f.create_dataset("x", data=np.zeros(3))
  with pytest.raises(ValueError, match="no 'examples' group"):
    fdata.load_tff_h5(str(tmp_path / "nogroup.h5"))
  clients = _emnist_clients(rng, [2, 2])
  del clients["f0001_00"]["label"]
  with pytest.raises(ValueError, match="'f0001_00' has no field 'label'"):
    fdata.load_tff_h5(_write_h5(str(tmp_path / "nolabel.h5"), clients))
  clients = _emnist_clients(rng, [2])
  clients["f0000_00"]["pixels"] = np.ones((2, 28, 27), np.float32)
  with pytest.raises(ValueError, match=r"shape \(2, 28, 27\)"):
    fdata.load_tff_h5(_write_h5(str(tmp_path / "shape.h5"), clients))
  clients = _emnist_clients(rng, [2])
  clients["f0000_00"]["label"] = np.array([3, 62], np.int32)
  with pytest.raises(ValueError, match=r"label 62 outside \[0, 62\)"):
    fdata.load_tff_h5(_write_h5(str(tmp_path / "label.h5"), clients))


# ----------------------------------------------------------------------------- PFLlib CIFAR-10


def test_pfllib_cifar10_matches_readme(shared_data_dir):
  d = os.path.join(shared_data_dir, CIFAR_DIR)
  ds = fdata.load_pfllib_npz(d)
  assert len(ds.client_ids) == 20 and ds.client_ids[:3] == ("0", "1", "2")
  assert int(ds.train.num_examples.sum()) == 8_265 and int(ds.test.num_examples.sum()) == 2_767
  assert ds.train.x.dtype == np.uint8 and ds.input_shape == (32, 32, 3) and ds.num_classes == 10
  all_ = fdata.pooled(ds)
  np.testing.assert_array_equal(np.bincount(all_.y, minlength=10),
                                [672, 646, 994, 1857, 550, 971, 1451, 1595, 832, 1464])
  # Per-client label counts agree with PFLlib's own config.json.
  with open(os.path.join(d, "config.json")) as f:
    config = json.load(f)["Size of samples for labels in clients"]
  counts = fdata.label_counts(ds.train, 10) + fdata.label_counts(ds.test, 10)
  for k in range(20):
    expected = np.zeros(10, np.int64)
    for label, n in config[k]:
      expected[label] = n
    np.testing.assert_array_equal(counts[k], expected)
  # Lossless uint8: the raw [-1, 1] floats come back.
  with np.load(os.path.join(d, "train", "3.npz"), allow_pickle=True) as npz:
    raw = npz["data"].item()
  x = np.asarray(ds.train.x[3, :5], np.float32).transpose(0, 3, 1, 2) / 255.0 * 2 - 1
  np.testing.assert_allclose(x, raw["x"][:5], atol=1e-5)
  assert fdata.normalize_cifar10(ds.train.x[:2, :4]).shape == (2, 4, 32, 32, 3)


def test_pfllib_fixture_and_errors(tmp_path):
  rng = np.random.default_rng(4)
  def client(n):
    pix = rng.integers(0, 256, size=(n, 3, 32, 32)).astype(np.float32)
    return ((pix / 255.0 - 0.5) / 0.5).astype(np.float32), rng.integers(0, 10, size=n)
  root = tmp_path / "pfl"
  for k, (ntr, nte) in enumerate([(4, 2), (3, 1)]):
    _write_pfllib(str(root / "train" / f"{k}.npz"), *client(ntr))
    _write_pfllib(str(root / "test" / f"{k}.npz"), *client(nte))
  _write_pfllib(str(root / "test" / "2.npz"), *client(2))
  ds = fdata.load_pfllib_npz(str(root))
  assert ds.client_ids == ("0", "1") and ds.test_client_ids == ("0", "1")
  assert fdata.load_pfllib_npz(str(root), include_test_only_clients=True).test_client_ids == ("0", "1", "2")
  with pytest.raises(FileNotFoundError, match="not found"):
    fdata.load_pfllib_npz(str(tmp_path / "nope"))
  x, y = client(2)
  _write_pfllib(str(tmp_path / "w" / "0.npz"), x * 2.0, y)  # not (p/255-0.5)/0.5
  with pytest.raises(ValueError, match="not PFLlib-normalised"):
    fdata.read_pfllib_npz(str(tmp_path / "w" / "0.npz"))
  _write_pfllib(str(tmp_path / "s" / "0.npz"), x.transpose(0, 2, 3, 1), y)  # NHWC by mistake
  with pytest.raises(ValueError, match="image shape mismatch"):
    fdata.read_pfllib_npz(str(tmp_path / "s" / "0.npz"))
  blob = (root / "train" / "0.npz").read_bytes()
  (root / "train" / "0.npz").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(ValueError, match="0.npz: cannot read npz"):
    fdata.load_pfllib_npz(str(root))
  (root / "train" / "0.npz").write_bytes(b"\x80\x04garbage")
  with pytest.raises(ValueError, match="not an npz"):
    fdata.load_pfllib_npz(str(root))


# ----------------------------------------------------------------------------- tfds (mocked)


def test_tfds_mocked_image_datasets():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    em = fdata.load_tfds("emnist/byclass", "train")
    assert em.x.shape == (6, 28, 28, 1) and em.x.dtype == np.uint8 and em.num_classes == 62
    assert em.normalize_fn is fdata.normalize_unit and em.groups is None
    flipped = fdata.load_tfds("emnist/byclass", "train", match_femnist=True)
    np.testing.assert_array_equal(flipped.x, 255 - em.x.transpose(0, 2, 1, 3))
    c10 = fdata.load_tfds("cifar10", "test", max_examples=4)
    assert c10.x.shape == (4, 32, 32, 3) and c10.num_classes == 10
    assert c10.normalize_fn is fdata.normalize_cifar10
    c100 = fdata.load_tfds("cifar100", "train")
    assert c100.num_classes == 100 and c100.normalize_fn is fdata.normalize_cifar100
    coarse = fdata.load_tfds("cifar100", "train", label_key="coarse_label")
    assert coarse.num_classes == 20 and int(coarse.y.max()) < 20
    with pytest.raises(ValueError, match="label_key='fine'"):
      fdata.load_tfds("cifar100", "train", label_key="fine")
  # Re-partition hook: pooled arrays -> clients.
  fd = fdata.from_partition(c100, [np.arange(3), np.arange(3, 6)])
  assert fd.train.x.shape == (2, 3, 32, 32, 3) and fd.client_ids == ("0", "1")


def test_tfds_mocked_celeb_a():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5):
    ca = fdata.load_tfds("celeb_a", "train", image_size=32)
    assert ca.x.shape == (5, 32, 32, 3) and ca.x.dtype == np.uint8
    assert ca.num_classes == 2 and set(np.unique(ca.y)) <= {0, 1}
    assert ca.groups is not None and ca.groups.shape == (5,)
    smiling = fdata.load_tfds("celeb_a", "train", attribute="Smiling", image_size=8, center_crop=True)
    assert smiling.x.shape == (5, 8, 8, 3)
    with pytest.raises(ValueError, match="not a CelebA attribute"):
      fdata.load_tfds("celeb_a", "train", attribute="male")


def test_tfds_unknown_dataset_error():
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match="'no_such_dataset_xyz'.*cannot be opened"):
    fdata.load_tfds("no_such_dataset_xyz", "train")


# ----------------------------------------------------------------------------- LEAF validation


def test_leaf_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="LEAF directory not found"):
    fdata.load_leaf(str(tmp_path / "missing"))
  (tmp_path / "no_files" / "train").mkdir(parents=True)
  (tmp_path / "no_files" / "test").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no \\*.json or \\*.json.gz files in .*train"):
    fdata.load_leaf(str(tmp_path / "no_files"))
  rng = np.random.default_rng(5)
  _write_leaf(str(tmp_path / "no_test" / "train" / "a.json"), {"w": _femnist_user(rng, 2)}, gz=False)
  with pytest.raises(FileNotFoundError, match="no test/ subdirectory"):
    fdata.load_leaf(str(tmp_path / "no_test"))
  with pytest.raises(FileNotFoundError, match="Shakespeare directory not found"):
    fdata.load_shakespeare(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="shakespeare_train.h5"):
    fdata.load_shakespeare(str(tmp_path))


def test_leaf_corrupt_files(tmp_path):
  rng = np.random.default_rng(6)
  root = _make_femnist_dir(str(tmp_path / "d"), {"w": _femnist_user(rng, 2)}, {"w": _femnist_user(rng, 1)})
  path = os.path.join(root, "train", "all_data_0_train.json.gz")
  with open(path, "rb") as f:
    good = f.read()
  with open(path, "wb") as f:
    f.write(good[: len(good) // 2])  # truncated gzip stream
  with pytest.raises(ValueError, match="all_data_0_train.json.gz: cannot parse LEAF JSON"):
    fdata.load_leaf(root)
  with open(path, "wb") as f:
    f.write(b"not gzip at all")
  with pytest.raises(ValueError, match="cannot parse LEAF JSON"):
    fdata.load_leaf(root)
  with gzip.open(path, "wt") as f:
    f.write('{"users": ["w"], "user_data": {"w": {"x": [[0.1, 0.2')  # truncated JSON
  with pytest.raises(ValueError, match="cannot parse LEAF JSON.*JSONDecodeError"):
    fdata.load_leaf(root)
  with gzip.open(path, "wt") as f:
    json.dump({"users": ["w"]}, f)
  with pytest.raises(ValueError, match="missing field 'user_data'"):
    fdata.load_leaf(root)
  with gzip.open(path, "wt") as f:
    json.dump({"users": ["w"], "num_samples": [3], "user_data": {"w": {"x": [[0.0] * 784], "y": [1]}}}, f)
  with pytest.raises(ValueError, match="num_samples says 3"):
    fdata.load_leaf(root)
  with gzip.open(path, "wt") as f:
    json.dump({"users": ["w", "v"], "user_data": {"w": {"x": [], "y": []}}}, f)
  with pytest.raises(ValueError, match="'v' is listed in 'users' but missing"):
    fdata.load_leaf(root)


def test_leaf_label_and_shape_errors(tmp_path):
  rng = np.random.default_rng(7)
  x, y = _femnist_user(rng, 2)
  root = _make_femnist_dir(str(tmp_path / "label"), {"w": (x, [3, 62])}, {"w": _femnist_user(rng, 1)})
  with pytest.raises(ValueError, match=r"client 'w' \(train\) has label 62 outside \[0, 62\)"):
    fdata.load_leaf(root)
  root = _make_femnist_dir(str(tmp_path / "neg"), {"w": (x, [3, 4])}, {"w": (x[:1], [-1])})
  with pytest.raises(ValueError, match=r"client 'w' \(test\) has label -1"):
    fdata.load_leaf(root)
  bad = [row[:783] for row in x]
  root = _make_femnist_dir(str(tmp_path / "shape"), {"w": _femnist_user(rng, 2), "v": (bad, [1, 2])},
                           {"w": _femnist_user(rng, 1)})
  with pytest.raises(ValueError, match="'v': image shape mismatch"):
    fdata.load_leaf(root)
  root = _make_femnist_dir(str(tmp_path / "frac"), {"w": (x, [1.5, 2])}, {"w": _femnist_user(rng, 1)})
  with pytest.raises(ValueError, match="labels 'y' must be integers"):
    fdata.load_leaf(root)


def test_leaf_empty_client_policies(tmp_path):
  rng = np.random.default_rng(8)
  root = _make_femnist_dir(str(tmp_path / "d"), {"w": _femnist_user(rng, 2), "empty": ([], [])},
                           {"w": _femnist_user(rng, 1), "empty": _femnist_user(rng, 1)})
  with pytest.warns(UserWarning, match="dropping 1 client.*'empty'"):
    ds = fdata.load_leaf(root)
  assert ds.client_ids == ("w",)
  with pytest.raises(ValueError, match="1 client\\(s\\) have zero train examples \\('empty'\\)"):
    fdata.load_leaf(root, empty_clients="error")
  kept = fdata.load_leaf(root, empty_clients="keep")
  assert kept.client_ids == ("empty", "w")
  np.testing.assert_array_equal(kept.train.num_examples, [0, 2])
  with pytest.raises(ValueError, match="empty_clients='skip'"):
    fdata.load_leaf(root, empty_clients="skip")


# ----------------------------------------------------------------------------- pooled views, partition hook


def _tiny_dataset():
  train = {"a": (np.arange(3, dtype=np.uint8).reshape(3, 1), np.array([0, 1, 1])),
           "b": (np.arange(3, 5, dtype=np.uint8).reshape(2, 1), np.array([2, 2]))}
  test = {"a": (np.array([[7]], np.uint8), np.array([1])), "c": (np.array([[8], [9]], np.uint8), np.array([0, 2]))}
  return fdata._federated.assemble(train, test, num_classes=3, input_shape=(1,), description="tiny",
                                   normalize_fn=fdata.normalize_unit, empty_clients="error", source="tiny",
                                   test_only=["c"])


def test_pool_central_test_set_and_pooled():
  ds = _tiny_dataset()
  assert ds.test_client_ids == ("a", "b", "c")
  np.testing.assert_array_equal(ds.test.num_examples, [1, 0, 2])
  x, y = fdata.pool(ds.train)
  np.testing.assert_array_equal(x[:, 0], [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(y, [0, 1, 1, 2, 2])
  x, y = fdata.central_test_set(ds)
  np.testing.assert_array_equal(x[:, 0], [7, 8, 9])
  np.testing.assert_array_equal(y, [1, 0, 2])
  p = fdata.pooled(ds)
  assert p.x.shape == (8, 1) and p.num_classes == 3
  with pytest.raises(ValueError, match="unknown split 'val'"):
    fdata.pooled(ds, splits=("val",))
  with pytest.raises(ValueError, match="no test split"):
    fdata.central_test_set(ds._replace(test=None))


def test_from_partition_validation():
  p = fdata.pooled(_tiny_dataset())
  fd = fdata.from_partition(p, [np.array([0, 7]), np.array([3])], test_parts=[np.array([1]), np.array([])],
                            client_ids=["x", "y"])
  np.testing.assert_array_equal(fd.train.num_examples, [2, 1])
  np.testing.assert_array_equal(fd.train.x[0, :, 0], [0, 9])
  with pytest.raises(ValueError, match="9 clients requested but only 8 examples"):
    fdata.from_partition(p, [np.array([k % 8]) for k in range(9)])
  with pytest.raises(ValueError, match=r"parts\[1\]: index 8 out of range \[0, 8\)"):
    fdata.from_partition(p, [np.array([0]), np.array([8])])
  with pytest.warns(UserWarning, match="dropping 1 client"):
    fd = fdata.from_partition(p, [np.array([0]), np.array([], np.int64)])
  assert fd.client_ids == ("0",)


def test_normalizers_are_pure_and_shape_safe():
  x = np.array([[[[0, 128, 255]]]], np.uint8)  # [1, 1, 1, 3]
  np.testing.assert_allclose(jax.jit(fdata.normalize_unit)(x), x / 255.0, rtol=1e-6)
  expected = (x / 255.0 - np.array(fdata._federated.CIFAR10_MEAN)) / np.array(fdata._federated.CIFAR10_STD)
  np.testing.assert_allclose(jax.jit(fdata.normalize_cifar10)(x), expected, rtol=1e-5)
  batch = np.zeros((2, 3, 32, 32, 3), np.uint8)  # [C, B, H, W, 3] under rank_promotion='raise'
  assert fdata.normalize_cifar100(batch).shape == batch.shape
  assert fdata.normalize_tokens(np.array([1, 80], np.uint8)).dtype == jnp.int32
  f = np.array([0.25], np.float32)
  np.testing.assert_allclose(fdata.normalize_unit(f), f)
