"""fedjax_prune.checkpoint: round trip, atomicity, pruning, corrupt and incompatible files."""
import errno
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import checkpoint, federated


def _state(scale=1.0):
  params = {"dense": {"kernel": scale * jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
  masks = {"dense": {"kernel": jnp.array([[True, False, True]] * 2), "bias": jnp.ones((), bool)}}
  opt = optax.adam(0.1)
  opt_state = opt.update(params, opt.init(params), params)[1]  # non-trivial moments, count=1
  server = federated.ServerState(params, {}, opt_state, masks, jnp.asarray(7, jnp.int32))
  return {"server": server, "key": jax.random.key(42), "host": np.float64(0.5)}


def _bits_equal(a, b):
  def leaf(x, y):
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    x, y = np.asarray(x), np.asarray(y)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
  return all(jax.tree.leaves(jax.tree.map(leaf, a, b)))


def test_round_trip_is_bit_exact_with_namedtuples_optax_state_and_typed_keys(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  state = _state()
  ckpt.save(7, state, {"spec": "MLPSpec(...)", "sampler": [1, 2]})
  step, restored, meta = ckpt.restore(lambda meta: _state(scale=0.0))
  assert step == 7 and meta == {"spec": "MLPSpec(...)", "sampler": [1, 2]}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert isinstance(restored["server"], federated.ServerState)
  assert _bits_equal(restored, state)
  # The restored key is a typed key that draws the same numbers.
  assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.uniform(restored["key"], (3,)),
                                jax.random.uniform(state["key"], (3,)))


def test_template_may_be_abstract(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  device_only = lambda: {k: v for k, v in _state().items() if k != "host"}
  ckpt.save(1, device_only(), {})
  _, restored, _ = ckpt.restore(lambda meta: jax.eval_shape(device_only))
  assert _bits_equal(restored, device_only())


def test_template_is_built_from_meta_first(tmp_path):
  """Structured pruning: the saved spec decides the shapes of the template."""
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(5, {"w": jnp.ones((4, 3))}, {"width": 3})
  seen = []

  def template_fn(meta):
    seen.append(meta)
    return {"w": jnp.zeros((4, meta["width"]))}

  _, restored, _ = ckpt.restore(template_fn)
  assert seen == [{"width": 3}] and restored["w"].shape == (4, 3)


def test_keeps_the_last_n_and_restores_the_latest(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3, 4):
    ckpt.save(step, {"x": jnp.asarray(float(step))}, {"step": step})
  assert ckpt.steps() == [3, 4]
  assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000004"]
  step, state, meta = ckpt.restore(lambda meta: {"x": jnp.zeros(())})
  assert step == 4 and float(state["x"]) == 4.0 and meta == {"step": 4}


def test_no_checkpoint_gives_none(tmp_path):
  assert checkpoint.Checkpointer(str(tmp_path / "absent")).restore(lambda m: {}) is None
  assert checkpoint.read_arrays(str(tmp_path / "absent")) is None


def test_an_interrupted_save_is_invisible_and_cleaned_up(tmp_path):
  """What a kill -9 mid-save leaves (a hidden temporary) is never restored."""
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, {"x": jnp.asarray(3.0)}, {})
  partial = tmp_path / ".tmp-step_00000006-12345"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
  step, state, _ = ckpt.restore(lambda meta: {"x": jnp.zeros(())})
  assert step == 3 and float(state["x"]) == 3.0
  ckpt.save(6, {"x": jnp.asarray(6.0)}, {})
  assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000006"]


def test_resaving_a_step_replaces_it(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, {"x": jnp.asarray(1.0)}, {})
  ckpt.save(3, {"x": jnp.asarray(2.0)}, {})
  assert ckpt.steps() == [3]
  assert float(ckpt.restore(lambda m: {"x": jnp.zeros(())})[1]["x"]) == 2.0


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, {"x": jnp.asarray(3.0)}, {})

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match=r"cannot save checkpoint 6 in .*No space left on device"):
    ckpt.save(6, {"x": jnp.asarray(6.0)}, {})
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["step_00000003"]  # no temporary left behind
  assert float(ckpt.restore(lambda m: {"x": jnp.zeros(())})[1]["x"]) == 3.0


def test_unwritable_directory_is_named(tmp_path):
  if os.geteuid() == 0:
    pytest.skip("root ignores directory permissions")
  tmp_path.chmod(0o500)
  try:
    with pytest.raises(OSError, match="cannot save checkpoint 1 in"):
      checkpoint.Checkpointer(str(tmp_path / "ckpt")).save(1, {"x": jnp.ones(())}, {})
  finally:
    tmp_path.chmod(0o700)


def test_meta_that_is_not_json_fails_before_writing(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  with pytest.raises(TypeError):
    ckpt.save(1, {"x": jnp.ones(())}, {"bad": object()})
  assert not (tmp_path / "ckpt").exists()


def test_corrupt_meta_json_is_named(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(2, {"x": jnp.ones(3)}, {})
  (tmp_path / "step_00000002" / "meta.json").write_text('{"step": 2, "met')
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoint file .*step_00000002/meta.json.* is corrupt"):
    ckpt.restore(lambda m: {"x": jnp.zeros(3)})


def test_missing_meta_json_is_named(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(2, {"x": jnp.ones(3)}, {})
  os.remove(tmp_path / "step_00000002" / "meta.json")
  with pytest.raises(checkpoint.CheckpointError, match=r"step_00000002.*meta.json is missing"):
    ckpt.restore(lambda m: {"x": jnp.zeros(3)})


def test_corrupt_array_files_are_detected(tmp_path):
  """Overwrite every array data file with noise: an orbax error or a CRC mismatch, named."""
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(2, {"x": jnp.arange(1000.0)}, {})
  files = [f for f in glob.glob(str(tmp_path / "step_00000002" / "state" / "**" / "*"),
                                recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  assert files, os.listdir(tmp_path / "step_00000002" / "state")
  rng = np.random.default_rng(0)
  for f in files:
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
      fh.seek(size // 2)
      fh.write(rng.bytes(max(1, size - size // 2)))
  with pytest.raises(checkpoint.CheckpointError, match=r"step_00000002.*(corrupt|unreadable)"):
    ckpt.restore(lambda m: {"x": jnp.zeros(1000)})


def test_flipped_bit_in_the_manifest_crc_is_detected(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(2, {"x": jnp.arange(10.0)}, {})
  path = tmp_path / "step_00000002" / "meta.json"
  record = json.loads(path.read_text())
  record["manifest"][0]["crc32"] ^= 1
  path.write_text(json.dumps(record))
  with pytest.raises(checkpoint.CheckpointError, match=r"leaf x fails its CRC32 check"):
    ckpt.restore(lambda m: {"x": jnp.zeros(10)})


def test_template_with_other_shape_is_refused_naming_leaf_and_shapes(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(2, {"dense": {"kernel": jnp.ones((4, 16))}}, {})
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"meta.json.*does not match this run: leaf dense/kernel has "
                           r"shape \[4, 16\] in the checkpoint but \[4, 8\] in the run"):
    ckpt.restore(lambda m: {"dense": {"kernel": jnp.ones((4, 8))}})


def test_template_with_other_structure_or_dtype_is_refused(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(2, {"a": jnp.ones(2), "b": jnp.ones(2)}, {})
  with pytest.raises(checkpoint.CheckpointError, match=r"has 2 arrays, the run's state has 1.*missing"):
    ckpt.restore(lambda m: {"a": jnp.ones(2)})
  with pytest.raises(checkpoint.CheckpointError, match=r"leaf b has dtype 'float32'.*'int32'"):
    ckpt.restore(lambda m: {"a": jnp.ones(2), "b": jnp.ones(2, jnp.int32)})


def test_template_fn_may_refuse_the_meta(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(2, {"a": jnp.ones(2)}, {"spec": "A"})

  def template_fn(meta):
    raise checkpoint.CheckpointError(f"saved with spec {meta['spec']}, this run builds B")

  with pytest.raises(checkpoint.CheckpointError,
                     match=r"step_00000002/meta.json.*does not match this run: saved with spec A"):
    ckpt.restore(template_fn)


def test_keep_must_be_positive():
  with pytest.raises(ValueError, match="keep must be an integer >= 1"):
    checkpoint.Checkpointer("x", keep=0)
