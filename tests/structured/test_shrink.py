"""Surgery contract: shrunk model == masked dense model, accounting agrees, state slices alike."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import accounting, models, structured

MODELS = {
    "mlp": models.mlp(input_shape=(4, 4, 1), hidden=(8, 6), num_classes=3),
    "asp_femnist_cnn": models.asp_femnist_cnn(widths=(4, 8), num_classes=5),
    "asp_celeba_cnn": models.asp_celeba_cnn(widths=(4, 6, 5), input_shape=(16, 16, 3)),
    "leaf_femnist_cnn": models.leaf_femnist_cnn(num_classes=5, widths=(4, 6), dense_width=8,
                                                input_shape=(12, 12, 1)),
    "vgg11_bn": models.vgg11(num_classes=4, widths=(4, 4, 6, 6, 8, 8, 8, 8)),
    "resnet18_bn": models.resnet18(num_classes=4, width_multiplier=1 / 16, input_shape=(16, 16, 3)),
    "resnet18_static_bn": models.resnet18(num_classes=4, norm="batch_static",
                                          width_multiplier=1 / 16, input_shape=(8, 8, 3)),
    "resnet20": models.cifar_resnet(20, width_multiplier=0.25, input_shape=(8, 8, 3)),
    "asp_resnet": models.asp_resnet(widths=(4, 6, 5), input_shape=(20, 20, 3)),
    "asp_inception": models.asp_inception(widths=(4, 2, 3, 2, 3, 2, 4, 5, 6), num_classes=5,
                                          dense_width=7),
}


def _random_state(spec, seed):
  """Params and running stats with every leaf random (BN scale/bias/mean/var too)."""
  params, stats = models.init_params(spec, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  fan_in = lambda shape: max(int(np.prod(shape[:-1])), 1)
  params = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32) / np.sqrt(fan_in(p.shape))),
      params)
  stats = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, size=s.shape).astype(np.float32)),
                       stats)
  return params, stats


def _random_keep(spec, seed):
  rng = np.random.default_rng(seed)
  keep = {}
  for g in structured.groups(spec):
    n = int(rng.integers(1, g.width)) if g.width > 1 else 1
    keep[g.name] = np.sort(rng.choice(g.width, n, replace=False))
  return keep


def _masked(params, masks):
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, masks)


SLOW_APPLY = ("resnet18_static_bn", "vgg11_bn", "resnet20")  # deep: compiling 4 applies takes ~10 s on 2 cores


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_APPLY else n
                                  for n in sorted(MODELS)])
def test_shrunk_equals_masked_dense(name):
  spec = MODELS[name]
  params, stats = _random_state(spec, 1)
  keep = _random_keep(spec, 2)
  out = structured.shrink(spec, params, keep, batch_stats=stats)
  masks = structured.keep_masks(spec, keep)
  x = jax.random.uniform(jax.random.key(3), (4,) + spec.input_shape)
  dense_apply = jax.jit(models.make_apply(spec), static_argnames="train")
  small_apply = jax.jit(models.make_apply(out.spec), static_argnames="train")
  for train in (False, True):
    want, want_stats = dense_apply(_masked(params, masks), stats, x, train=train)
    got, got_stats = small_apply(out.params, out.batch_stats, x, train=train)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Updated running statistics: the shrunk model's equal the dense model's, sliced.
    sliced = structured.shrink(spec, params, keep, batch_stats=want_stats).batch_stats
    for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(sliced)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The model really is smaller (every group lost channels unless width 1).
  assert accounting.param_count(out.spec) < accounting.param_count(spec)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_accounting_of_shrunk_spec_equals_masked_accounting(name):
  spec = MODELS[name]
  keep = _random_keep(spec, 5)
  params, _ = models.init_params(spec, jax.random.key(0))
  small = structured.shrink(spec, params, keep).spec
  masks = structured.keep_masks(spec, keep)
  assert accounting.param_count(spec, masks) == accounting.param_count(small)
  assert accounting.flops(spec, masks) == accounting.flops(small)
  assert accounting.flops(spec, masks, bn_flops_per_element=2) == accounting.flops(
      small, bn_flops_per_element=2)


def test_paper_femnist_architecture_counts():
  """ASP FEMNIST CNN [32, 64] -> [17, 43]: 21,488 params, 2,860,280 FLOPs (METHODS.md §1.6)."""
  spec = models.asp_femnist_cnn()
  params, _ = models.init_params(spec, jax.random.key(0))
  out = structured.shrink(spec, params, {"conv_0": np.arange(17), "conv_1": np.arange(43)})
  assert out.spec == models.asp_femnist_cnn(widths=(17, 43))
  assert accounting.param_count(out.spec) == 21_488
  assert accounting.flops(out.spec) == 2_860_280


def test_flatten_rows_follow_nhwc_order():
  """conv (2 filters) -> 2x2 map -> flatten: input index (h*W + w)*C + c; keep c=1 -> rows 1,3,5,7."""
  spec = models.ConvNetSpec(input_shape=(2, 2, 1),
                            convs=(models.ConvSpec(features=2, kernel=1),), num_classes=3)
  params, _ = models.init_params(spec, jax.random.key(0))
  params["dense_0"]["kernel"] = jnp.arange(24, dtype=jnp.float32).reshape(8, 3)
  out = structured.shrink(spec, params, {"conv_0": np.array([False, True])})
  np.testing.assert_array_equal(out.params["dense_0"]["kernel"],
                                np.arange(24).reshape(8, 3)[[1, 3, 5, 7]])
  np.testing.assert_array_equal(out.params["conv_0"]["kernel"], params["conv_0"]["kernel"][..., 1:])


def test_inception_concat_rows():
  """Module output = concat(1x1, 3x3, 5x5); the next layer's input rows follow the concat order."""
  spec = MODELS["asp_inception"]  # module 1 widths (3, 2, 4) -> conv_0 reads 9 channels
  params, _ = models.init_params(spec, jax.random.key(0))
  keep = {"inception1/conv1x1": np.array([2]), "inception1/conv5x5": np.array([0, 3])}
  out = structured.shrink(spec, params, keep)
  np.testing.assert_array_equal(out.params["conv_0"]["kernel"],
                                np.asarray(params["conv_0"]["kernel"])[:, :, [2, 3, 4, 5, 8], :])
  assert out.spec.modules == ((2, 3, 2), (1, 2, 2))


def test_resnet_stream_is_one_coupled_group():
  spec = MODELS["resnet18_bn"]
  stream = {g.name: g for g in structured.groups(spec)}["stage2_block0/conv2"]
  assert set(stream.producers) == {("stage2_block0", "conv2"), ("stage2_block0", "shortcut_conv"),
                                   ("stage2_block1", "conv2")}
  params, stats = _random_state(spec, 0)
  out = structured.shrink(spec, params, {"stage2_block1/conv2": np.array([0, 5])},
                          batch_stats=stats)
  assert out.spec.stage_widths == (4, 2, 16, 32)
  assert out.params["stage3_block0"]["conv1"]["kernel"].shape[-2] == 2
  assert out.batch_stats["stage2_block0"]["shortcut_bn"]["mean"].shape == (2,)


def test_optimizer_and_per_client_state_slice_like_params():
  spec = MODELS["asp_resnet"]
  params, stats = _random_state(spec, 0)
  keep = _random_keep(spec, 1)
  opt = optax.adam(1e-3)
  state = opt.init(params)
  # Give the moments the values of the params so the expected slices are known.
  state = (state[0]._replace(mu=params, nu=jax.tree.map(jnp.square, params)),) + tuple(state[1:])
  out = structured.shrink(spec, params, keep, batch_stats=stats, opt_state=state)
  mu, nu = out.opt_state[0].mu, out.opt_state[0].nu
  for a, b in zip(jax.tree.leaves(mu), jax.tree.leaves(out.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(nu), jax.tree.leaves(out.params)):
    np.testing.assert_allclose(a, np.square(b))
  assert int(out.opt_state[0].count) == 0
  # A stacked per-client copy [C, ...] and masks (broadcast shapes) slice the same way.
  stacked = jax.tree.map(lambda p: jnp.stack([p, 2 * p, 3 * p]), params)
  sliced = structured.slice_like(stacked, spec, keep)
  for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(out.params)):
    np.testing.assert_allclose(a[2], 3 * np.asarray(b))
  channel_masks = jax.tree.map(lambda p: jnp.ones((1,) * (p.ndim - 1) + p.shape[-1:], bool), params)
  sliced_masks = structured.slice_like(channel_masks, spec, keep)
  for m, p in zip(jax.tree.leaves(sliced_masks), jax.tree.leaves(out.params)):
    assert m.shape == (1,) * (p.ndim - 1) + p.shape[-1:]


def test_keep_masks_match_shrunk_params_count():
  spec = MODELS["asp_inception"]
  keep = _random_keep(spec, 3)
  m = structured.keep_masks(spec, keep)
  params, _ = models.init_params(spec, jax.random.key(0))
  small = structured.shrink(spec, params, keep)
  kept = sum(int(np.broadcast_to(mm, p.shape).sum())
             for mm, p in zip(jax.tree.leaves(m), jax.tree.leaves(params)))
  assert kept == sum(p.size for p in jax.tree.leaves(small.params))


@pytest.mark.parametrize("keep,message", [
    ({"conv_9": np.array([0])}, "names no prunable layer"),
    ({"dense_0": np.array([0])}, "names no prunable layer"),  # the logits are never pruned
    ({"conv_0": np.ones(3, bool)}, "expected \\(4,\\)"),
    ({"conv_0": np.zeros(4, bool)}, "keeps no channel"),
    ({"conv_0": np.array([0, 4])}, "outside \\[0, 4\\)"),
    ({"conv_0": np.array([1, 1])}, "repeats an index"),
    ({"conv_0": np.array([0.5])}, "bool \\[width\\] or int index vector"),
])
def test_bad_keep_is_named(keep, message):
  spec = MODELS["asp_femnist_cnn"]
  params, _ = models.init_params(spec, jax.random.key(0))
  with pytest.raises(ValueError, match=message):
    structured.shrink(spec, params, keep)


def test_coupled_group_disagreement_and_identity_collapse_raise():
  spec = MODELS["resnet18_bn"]
  params, _ = models.init_params(spec, jax.random.key(0))
  with pytest.raises(ValueError, match="disagree"):
    structured.shrink(spec, params, {"stage2_block0/conv2": np.array([0]),
                                     "stage2_block0/shortcut_conv": np.array([1])})
  wide = models.ResNetSpec(input_shape=(8, 8, 3), num_classes=2, stem_width=4,
                           stage_widths=(6,), stage_strides=(1,), inner_widths=((3,),))
  p, _ = models.init_params(wide, jax.random.key(0))
  with pytest.raises(ValueError, match="projection shortcut into an identity"):
    structured.shrink(wide, p, {"stage1_block0/conv2": np.arange(4)})
  with pytest.raises(ValueError, match="params do not match the spec"):
    structured.shrink(spec, {"conv_0": {}}, {})


def test_spec_json_round_trip():
  text = (models.leaf_shakespeare_lstm(), models.shakespeare_transformer(),
          models.TransformerSpec(vocab_size=7, seq_len=6, d_model=8, blocks=((2, 3, 10), (0, 4, 0))))
  for spec in (*MODELS.values(), *text):
    assert structured.spec_from_json(json.loads(json.dumps(structured.spec_to_json(spec)))) == spec
  with pytest.raises(ValueError, match="unknown"):
    structured.spec_from_json({"type": "Transformer"})
