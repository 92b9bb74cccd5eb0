"""Tests for fedjax_prune.models: specs, presets, conv impls, BatchNorm modes, transforms."""
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_prune import models

TINY_SPECS = {
    'mlp': models.mlp(input_shape=(6, 6, 1), hidden=(8, 4), num_classes=3),
    'leaf_femnist_cnn': models.leaf_femnist_cnn(widths=(2, 4), dense_width=8),
    'asp_femnist_cnn': models.asp_femnist_cnn(widths=(2, 4)),
    'asp_celeba_cnn': models.asp_celeba_cnn(widths=(2, 2, 2, 2)),
    'vgg11': models.vgg11(widths=(2, 2, 4, 4, 4, 4, 4, 4)),
    'vgg11_static': models.vgg11(widths=(2, 2, 4, 4, 4, 4, 4, 4), norm='batch_static'),
    'vgg11_none': models.vgg11(widths=(2, 2, 4, 4, 4, 4, 4, 4), norm='none'),
    'resnet18': models.resnet18(width_multiplier=1 / 32, input_shape=(8, 8, 3)),
    'resnet18_static': models.resnet18(width_multiplier=1 / 32, norm='batch_static',
                                       input_shape=(8, 8, 3)),
    'asp_resnet': models.asp_resnet(widths=(2, 3, 4), input_shape=(28, 28, 1), num_classes=62),
    # Two conv -> BN -> ReLU layers: a cheap-to-compile BN ConvNet.
    'convnet_bn': models.ConvNetSpec(
        input_shape=(8, 8, 3), convs=(models.ConvSpec(features=4, pool=2, norm=True, bias=False),
                                      models.ConvSpec(features=6, stride=2, norm=True)),
        head='gap', hidden=(5,), num_classes=3, norm='batch_running'),
    # Stem + 2 stages of one block (identity and conv shortcut): cheap to compile.
    'resnet_small': models.ResNetSpec(input_shape=(8, 8, 3), num_classes=5, stem_width=4,
                                      stage_widths=(4, 8), stage_strides=(1, 2),
                                      inner_widths=((3,), (6,)), norm='batch_running'),
}


def _normal(seed: int, shape) -> np.ndarray:
  """Test data from numpy (N-d jax.random draws compile slowly on CPU)."""
  return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _params_size(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _xent(logits, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


# ----------------------------------------------------------------------------
# Specs and presets.


@pytest.mark.parametrize('name', sorted(TINY_SPECS))
def test_every_preset_has_the_right_output_shapes(name, key):
  spec = TINY_SPECS[name]
  apply_fn, params, batch_stats = models.build(spec, key)
  x = jnp.ones((2, *spec.input_shape), jnp.uint8)
  for train in (True, False):  # abstract evaluation: traces everything, compiles nothing
    logits, new_stats = jax.eval_shape(lambda p, s, x: apply_fn(p, s, x, train=train),
                                       params, batch_stats, x)
    assert logits.shape == (2, spec.num_classes) and logits.dtype == jnp.float32
    chex.assert_trees_all_equal_shapes(new_stats, batch_stats)
  assert (batch_stats != {}) == (getattr(spec, 'norm', 'none') == 'batch_running')


def test_one_preset_runs_under_jit(key):
  spec = TINY_SPECS['leaf_femnist_cnn']
  apply_fn, params, batch_stats = models.build(spec, key)
  x = _normal(0, (2, *spec.input_shape))
  logits, _ = jax.jit(lambda p, x: apply_fn(p, {}, x, train=False))(params, x)
  chex.assert_shape(logits, (2, 62))
  assert np.all(np.isfinite(logits))


@pytest.mark.parametrize('spec, trainable, running', [
    (models.leaf_femnist_cnn(), 6_603_710, 0),
    (models.asp_femnist_cnn(), 56_126, 0),
    (models.asp_femnist_cnn(widths=(17, 43)), 21_488, 0),
    (models.asp_celeba_cnn(), 80_930, 0),
    (models.asp_celeba_cnn(widths=(14, 9, 14, 9)), 10_998, 0),
    (models.asp_resnet(), 30_626 - 352, 352),
    (models.vgg11(), 9_228_362, 5_504),
    (models.vgg11(norm='batch_static'), 9_228_362, 0),
    (models.resnet18(), 11_173_962, 9_600),
    (models.resnet18(num_classes=100), 11_220_132, 9_600),
    (models.mlp(), 199_210, 0),
])
def test_full_size_parameter_counts(spec, trainable, running):
  params, batch_stats = models.param_shapes(spec)  # abstract: no memory, no FLOPs
  assert _params_size(params) == trainable
  assert _params_size(batch_stats) == running


def test_resnet18_maskable_and_bn_counts():
  params, _ = models.param_shapes(models.resnet18())
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  is_bn = lambda path: any('bn' in str(getattr(k, 'key', k)) for k in path)
  assert sum(math.prod(l.shape) for p, l in flat if not is_bn(p)) == 11_164_362
  assert sum(math.prod(l.shape) for p, l in flat if is_bn(p)) == 9_600


def test_param_names_convnet_and_resnet():
  params, stats = models.param_shapes(models.vgg11(widths=(2,) * 8))
  assert set(params) == {f'conv_{i}' for i in range(8)} | {f'bn_{i}' for i in range(8)} | {
      'dense_0'}
  assert set(params['conv_0']) == {'kernel'}  # BN replaces the conv bias
  assert set(params['bn_3']) == {'scale', 'bias'} and set(stats['bn_3']) == {'mean', 'var'}
  params, stats = models.param_shapes(models.leaf_femnist_cnn())
  assert params['conv_1']['kernel'].shape == (5, 5, 32, 64)
  assert params['dense_0']['kernel'].shape == (7 * 7 * 64, 2048) and stats == {}

  params, stats = models.param_shapes(models.resnet18())
  assert set(params) == {'stem', 'head'} | {f'stage{s}_block{b}' for s in (1, 2, 3, 4)
                                             for b in (0, 1)}
  assert set(params['stem']) == {'conv', 'bn'}
  assert set(params['stage1_block0']) == {'conv1', 'bn1', 'conv2', 'bn2'}  # identity shortcut
  assert set(params['stage2_block0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'shortcut_conv',
                                          'shortcut_bn'}
  assert params['stage2_block0']['shortcut_conv']['kernel'].shape == (1, 1, 64, 128)
  assert set(params['stage3_block1']['conv1']) == {'kernel'}  # no conv bias
  assert set(params['head']) == {'kernel', 'bias'}
  assert set(stats['stage4_block1']['bn2']) == {'mean', 'var'}


def test_resnet_inner_widths_are_independent_of_stage_widths():
  spec = models.resnet18(width_multiplier=1 / 16)
  inner = ((3, 4), (5, 8), (16, 2), (32, 1))
  small = dataclasses.replace(spec, inner_widths=inner)
  params, _ = models.param_shapes(small)
  assert params['stage3_block0']['conv1']['kernel'].shape == (3, 3, 8, 16)
  assert params['stage3_block1']['conv1']['kernel'].shape == (3, 3, 16, 2)
  assert params['stage3_block1']['conv2']['kernel'].shape == (3, 3, 2, 16)
  assert params['stage4_block1']['bn1']['scale'].shape == (1,)


def test_specs_are_hashable_static_args_and_dict_keys(key):
  a = models.asp_femnist_cnn(widths=[4, 8])
  b = models.asp_femnist_cnn(widths=(4, 8))
  assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
  assert a != models.asp_femnist_cnn(widths=(4, 7))

  out = jax.jit(lambda x, spec: x * spec.num_classes, static_argnums=1)(jnp.ones(()), a)
  assert float(out) == 62.0


@pytest.mark.parametrize('make, field', [
    (lambda: models.asp_femnist_cnn(widths=(-1, 8)), 'features'),
    (lambda: models.mlp(hidden=(8, 0)), 'hidden[1]'),
    (lambda: models.ConvSpec(features=4, padding='same'), 'padding'),
    (lambda: models.ConvSpec(features=4, pool=0), 'pool'),
    (lambda: models.ConvNetSpec(input_shape=(28, 28), convs=(), num_classes=2), 'input_shape'),
    (lambda: models.ConvNetSpec(input_shape=(8, 8, 1), convs=(models.ConvSpec(
        features=2, norm=True),), num_classes=2), 'norm'),
    (lambda: models.ConvNetSpec(input_shape=(4, 4, 1), convs=(models.ConvSpec(
        features=2, kernel=5, padding='VALID'),), num_classes=2), 'convs[0]'),
    (lambda: models.resnet18(norm='batch'), 'norm'),
    (lambda: models.resnet18(width_multiplier=0), 'width_multiplier'),
    (lambda: dataclasses.replace(models.resnet18(), inner_widths=((64, 64),)), 'inner_widths'),
    (lambda: models.asp_celeba_cnn(widths=(32,) * 8), 'spatial size'),
])
def test_bad_specs_raise_value_errors_naming_the_field(make, field):
  with pytest.raises(ValueError, match=field.replace('[', r'\[').replace(']', r'\]')):
    make()


def test_celeba_pool_floor_and_feature_shapes():
  spec = models.asp_celeba_cnn()
  assert [s[:2] for s in spec.feature_shapes()] == [(42, 42), (21, 21), (10, 10), (5, 5)]
  assert spec.head_features() == 800


# ----------------------------------------------------------------------------
# Layers.


@pytest.mark.parametrize('shape, kernel, stride, padding', [
    ((2, 7, 6, 3), (3, 3), (1, 1), 'SAME'),
    ((2, 7, 6, 3), (3, 3), (2, 2), 'SAME'),
    ((2, 8, 8, 3), (3, 3), (2, 2), 'SYMMETRIC'),
    ((2, 7, 6, 3), (5, 3), (1, 2), 'VALID'),
    ((2, 8, 9, 2), (5, 5), (2, 2), 'VALID'),
    ((2, 8, 8, 3), (1, 1), (2, 2), 'SAME'),
])
def test_conv_impls_match_lax_forward_and_gradients(shape, kernel, stride, padding, key):
  x = _normal(0, shape)
  w = _normal(1, (*kernel, shape[-1], 4))
  hw = models.conv_output_hw(shape[1:3], kernel, stride, padding)
  cotangent = _normal(2, (shape[0], *hw, 4))

  def run(impl):
    f = lambda x, w: models.conv2d(x, w, stride, padding, impl)
    return f(x, w), jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), argnums=(0, 1))(x, w)

  (out_lax, grads_lax), *others = jax.jit(lambda: (run('lax'), run('im2col'), run('tapgrad')))()
  chex.assert_shape(out_lax, (shape[0], *hw, 4))
  for out, grads in others:
    np.testing.assert_allclose(out, out_lax, rtol=1e-5, atol=1e-5)
    for g, g_lax in zip(grads, grads_lax):
      np.testing.assert_allclose(g, g_lax, rtol=1e-5, atol=1e-5)


def test_auto_conv_impl_is_tapgrad_on_cpu_and_lax_elsewhere():
  assert models.resolve_conv_impl('auto', 'cpu') == 'tapgrad'
  assert models.resolve_conv_impl('auto', 'gpu') == 'lax'
  assert models.resolve_conv_impl('auto', 'tpu') == 'lax'
  for impl in ('lax', 'im2col', 'tapgrad'):
    assert models.resolve_conv_impl(impl, 'gpu') == impl
  with pytest.raises(ValueError, match="conv_impl must be one of .*'auto'.*got 'fft'"):
    models.resolve_conv_impl('fft')
  with pytest.raises(ValueError, match='conv_impl must be one of'):
    models.make_apply(TINY_SPECS['vgg11'], conv_impl='fft')


def test_default_conv_impl_is_the_resolved_auto_one(key):
  # build/make_apply default to 'auto': on this backend the same program as the
  # resolved implementation (tapgrad on CPU: its custom VJP appears in the jaxpr).
  spec = TINY_SPECS['vgg11']
  params, batch_stats = models.init_params(spec, key)
  x = _normal(1, (2, *spec.input_shape))
  resolved = models.resolve_conv_impl('auto')

  def grad_jaxpr(apply_fn):
    return str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(apply_fn(p, batch_stats, x, train=False)[0])))(params))

  default = grad_jaxpr(models.build(spec, key)[0])
  assert default == grad_jaxpr(models.make_apply(spec, conv_impl=resolved))
  other = 'lax' if resolved == 'tapgrad' else 'tapgrad'
  assert default != grad_jaxpr(models.make_apply(spec, conv_impl=other))


def test_symmetric_padding_is_torch_padding(key):
  x = _normal(0, (1, 8, 8, 2))
  w = _normal(1, (3, 3, 2, 3))
  torch_style = lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(models.conv2d(x, w, (2, 2), 'SYMMETRIC', 'im2col'), torch_style,
                             rtol=1e-5, atol=1e-5)


def test_max_pool_floor_semantics_matches_reduce_window(key):
  x = _normal(0, (2, 21, 9, 3))
  expected = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
  out = models.max_pool(x, 2)
  chex.assert_shape(out, (2, 10, 4, 3))
  np.testing.assert_array_equal(out, expected)
  # Gradients agree without ties (continuous random input).
  g = jax.grad(lambda x: jnp.sum(models.max_pool(x, 2) ** 2))(x)
  g_ref = jax.grad(lambda x: jnp.sum(lax.reduce_window(
      x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID') ** 2))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6)


def _assert_close_relative_to_scale(actual, expected, rtol=1e-5):
  """Leafwise |a - e| <= rtol * max|e|: BN amplifies rounding in small entries."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(e))))


@pytest.mark.parametrize('name', ['vgg11', 'resnet18', 'asp_resnet'])
def test_whole_model_conv_impls_match_lax(name, key):
  spec = TINY_SPECS[name]
  params, batch_stats = models.init_params(spec, key)
  x = _normal(1, (3, *spec.input_shape))
  y = jnp.array([0, 1, 1])

  def loss_and_grad(impl):
    apply_fn = models.make_apply(spec, conv_impl=impl)

    def loss(p):  # eval mode: train-mode BN over few values amplifies rounding
      logits, stats = apply_fn(p, batch_stats, x, train=False)
      return _xent(logits, y), (logits, stats)

    return jax.value_and_grad(loss, has_aux=True)(params)

  out_lax, out_im2col, out_tapgrad = jax.jit(
      lambda: (loss_and_grad('lax'), loss_and_grad('im2col'), loss_and_grad('tapgrad')))()
  _assert_close_relative_to_scale(out_im2col, out_lax)
  _assert_close_relative_to_scale(out_tapgrad, out_lax)


# ----------------------------------------------------------------------------
# BatchNorm modes and example masks.


@pytest.mark.parametrize('name, norm', [('convnet_bn', 'batch_running'),
                                        ('convnet_bn', 'batch_static'),
                                        ('resnet_small', 'batch_running'),
                                        ('resnet_small', 'batch_static')])
def test_masked_batchnorm_equals_the_real_examples_alone(name, norm, key):
  spec = dataclasses.replace(TINY_SPECS[name], norm=norm)
  apply_fn, params, batch_stats = models.build(spec, key)
  real = _normal(1, (5, *spec.input_shape))
  padding = 100.0 * jnp.ones((3, *spec.input_shape))  # garbage that would wreck the statistics
  padded = jnp.concatenate([real, padding])
  mask = jnp.arange(8) < 5

  @jax.jit
  def run(x, mask):
    train = apply_fn(params, batch_stats, x, train=True, example_mask=mask)
    evaluate = apply_fn(params, batch_stats, x, train=False, example_mask=mask)
    return train, evaluate

  (lg_pad, st_pad), (ev_pad, _) = run(padded, mask)
  (lg_real, st_real), (ev_real, _) = run(real, None)
  np.testing.assert_allclose(lg_pad[:5], lg_real, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ev_pad[:5], ev_real, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(st_pad, st_real, rtol=1e-5, atol=1e-6)
  if batch_stats:  # the padding must have had an effect without the mask
    _, st_unmasked = apply_fn(params, batch_stats, padded, train=True)
    assert not np.allclose(jax.tree.leaves(st_unmasked)[0], jax.tree.leaves(st_real)[0])


def test_all_padding_batch_leaves_running_stats_unchanged(key):
  spec = TINY_SPECS['convnet_bn']
  apply_fn, params, batch_stats = models.build(spec, key)
  x = _normal(0, (4, *spec.input_shape))
  _, new_stats = jax.jit(lambda x, m: apply_fn(params, batch_stats, x, train=True,
                                               example_mask=m))(x, jnp.zeros(4, bool))
  chex.assert_trees_all_equal(new_stats, batch_stats)


def test_batch_running_mode(key):
  spec = models.ConvNetSpec(input_shape=(4, 4, 2), convs=(models.ConvSpec(
      features=3, kernel=1, bias=False, norm=True),), head='gap', num_classes=2,
                            norm='batch_running')
  apply_fn, params, batch_stats = models.build(spec, key)
  x = _normal(0, (6, 4, 4, 2))
  conv_out = jnp.einsum('bhwc,co->bhwo', x, params['conv_0']['kernel'][0, 0])
  channel = lambda v: v[None, None, None, :]
  logits, stats = jax.jit(lambda x: apply_fn(params, batch_stats, x, train=True))(x)
  # Running statistics move 10% towards the (biased) batch statistics.
  np.testing.assert_allclose(stats['bn_0']['mean'], 0.1 * conv_out.mean(axis=(0, 1, 2)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['bn_0']['var'], 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2)),
                             rtol=1e-5)
  # Eval uses the running statistics: per-example outputs, stats unchanged.
  eval_fn = jax.jit(lambda x: apply_fn(params, stats, x, train=False))
  full, stats_after_eval = eval_fn(x)
  np.testing.assert_allclose(eval_fn(x[:2])[0], full[:2], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(stats_after_eval, stats)
  normalised = (conv_out - channel(stats['bn_0']['mean'])) / channel(
      jnp.sqrt(stats['bn_0']['var'] + 1e-5))
  pooled = jax.nn.relu(normalised).mean(axis=(1, 2))
  expected = pooled @ params['dense_0']['kernel'] + params['dense_0']['bias'][None, :]
  np.testing.assert_allclose(full, expected, rtol=1e-4, atol=1e-5)
  # Train mode normalises with batch statistics: output depends on the other examples.
  assert not np.allclose(apply_fn(params, batch_stats, x[:2], train=True)[0], logits[:2])


def test_batch_static_mode(key):
  spec = dataclasses.replace(TINY_SPECS['convnet_bn'], norm='batch_static')
  apply_fn, params, batch_stats = models.build(spec, key)
  assert batch_stats == {}
  x = _normal(0, (4, *spec.input_shape))
  run = jax.jit(lambda x, train: apply_fn(params, {}, x, train=train), static_argnums=1)
  (train_logits, train_stats), (eval_logits, eval_stats) = run(x, True), run(x, False)
  np.testing.assert_allclose(eval_logits, train_logits, rtol=1e-6)  # batch stats in both modes
  assert train_stats == {} and eval_stats == {}
  other = np.concatenate([x[:1], _normal(2, (3, *spec.input_shape))])
  assert not np.allclose(run(other, False)[0][0], eval_logits[0])  # depends on the batch


# ----------------------------------------------------------------------------
# Function transformations.


def test_jit_vmap_grad_with_per_client_params_matches_a_loop(key):
  spec = TINY_SPECS['resnet_small']
  apply_fn = models.make_apply(spec, conv_impl='im2col')
  num_clients = 3
  keys = jax.random.split(key, num_clients)
  params_C, stats_C = jax.jit(jax.vmap(lambda k: models.init_params(spec, k)))(keys)
  x_C = _normal(1, (num_clients, 4, *spec.input_shape))
  y_C = jnp.array([[0, 1, 2, 3]] * num_clients) % spec.num_classes
  mask_C = jnp.array([[True, True, True, False]] * num_clients)

  def loss(params, stats, x, y, mask):
    logits, new_stats = apply_fn(params, stats, x, train=True, example_mask=mask)
    per_example = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(mask, per_example, 0)) / jnp.sum(mask), new_stats

  grad_fn = jax.grad(loss, has_aux=True)
  grads_C, new_stats_C = jax.jit(jax.vmap(grad_fn))(params_C, stats_C, x_C, y_C, mask_C)
  single = jax.jit(grad_fn)
  for c in range(num_clients):
    take = lambda tree: jax.tree.map(lambda leaf: leaf[c], tree)
    grads, new_stats = single(take(params_C), take(stats_C), x_C[c], y_C[c], mask_C[c])
    _assert_close_relative_to_scale(take(grads_C), grads, rtol=1e-4)
    _assert_close_relative_to_scale(take(new_stats_C), new_stats, rtol=1e-5)


def test_vmapped_im2col_is_matmuls_not_grouped_convolutions():
  spec = models.asp_femnist_cnn(widths=(4, 8))
  params_C, stats_C = jax.eval_shape(
      jax.vmap(lambda k: models.init_params(spec, k)), jax.random.split(jax.random.key(0), 3))
  x_C = jax.ShapeDtypeStruct((3, 2, 28, 28, 1), jnp.float32)
  programs = {}
  for impl in ('lax', 'im2col'):
    apply_fn = models.make_apply(spec, conv_impl=impl)
    grad_fn = jax.grad(lambda p, s, x: jnp.sum(apply_fn(p, s, x, train=True)[0]))
    programs[impl] = str(jax.make_jaxpr(jax.vmap(grad_fn))(params_C, stats_C, x_C))
  assert 'feature_group_count=3' in programs['lax']  # per-client kernels -> grouped conv
  assert 'conv_general_dilated' not in programs['im2col']


def test_scan_and_map_over_steps(key):
  spec = TINY_SPECS['convnet_bn']
  apply_fn, params, batch_stats = models.build(spec, key)
  x_S = _normal(0, (3, 2, *spec.input_shape))
  y_S = jnp.zeros((3, 2), jnp.int32)

  def step(carry, batch):
    params, stats = carry
    x, y = batch
    loss = lambda p: (lambda out: (_xent(out[0], y), out[1]))(apply_fn(p, stats, x, train=True))
    grads, stats = jax.grad(loss, has_aux=True)(params)
    return (jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), stats), None

  (new_params, new_stats), _ = jax.jit(lambda c: lax.scan(step, c, (x_S, y_S)))(
      (params, batch_stats))
  chex.assert_trees_all_equal_shapes(new_params, params)
  assert not np.allclose(new_stats['bn_0']['mean'], batch_stats['bn_0']['mean'])
  logits_S = jax.jit(lambda xs: lax.map(lambda x: apply_fn(params, batch_stats, x,
                                                           train=False)[0], xs))(x_S)
  chex.assert_shape(logits_S, (3, 2, spec.num_classes))


def test_inputs_are_cast_and_reshaped(key):
  spec = models.asp_femnist_cnn(widths=(2, 4))
  apply_fn, params, batch_stats = models.build(spec, key)
  x = np.random.default_rng(0).integers(0, 255, (2, 28, 28), dtype=np.uint8)  # no channel
  logits, _ = apply_fn(params, batch_stats, x, train=False)
  expected, _ = apply_fn(params, batch_stats, x.astype(jnp.float32)[..., None], train=False)
  np.testing.assert_allclose(logits, expected, rtol=1e-6)


def test_mismatched_params_and_masks_raise(key):
  spec = models.asp_femnist_cnn(widths=(2, 4))
  apply_fn, params, batch_stats = models.build(spec, key)
  x = jnp.zeros((2, 28, 28, 1))
  smaller, _ = models.init_params(models.asp_femnist_cnn(widths=(2, 3)), key)
  with pytest.raises(ValueError, match='conv_1/'):
    apply_fn(smaller, batch_stats, x, train=False)
  with pytest.raises(ValueError, match='missing'):
    apply_fn({'conv_0': params['conv_0']}, batch_stats, x, train=False)
  with pytest.raises(ValueError, match='example_mask'):
    apply_fn(params, batch_stats, x, train=True, example_mask=jnp.ones(3, bool))
  with pytest.raises(ValueError, match='conv_impl'):
    models.make_apply(spec, conv_impl='fft')


def test_init_is_deterministic_and_follows_the_documented_scheme(key):
  spec = models.vgg11(widths=(4,) * 8)
  p1, s1 = models.init_params(spec, key)
  p2, _ = models.init_params(spec, key)
  p3, _ = models.init_params(spec, jax.random.fold_in(key, 1))
  chex.assert_trees_all_equal(p1, p2)
  assert not np.allclose(p1['conv_3']['kernel'], p3['conv_3']['kernel'])
  bound = 1.0 / math.sqrt(3 * 3 * 4)  # torch default U(+-1/sqrt(fan_in))
  assert float(jnp.max(jnp.abs(p1['conv_3']['kernel']))) <= bound
  np.testing.assert_array_equal(p1['bn_0']['scale'], 1.0)
  np.testing.assert_array_equal(p1['bn_0']['bias'], 0.0)
  np.testing.assert_array_equal(p1['dense_0']['bias'], 0.0)
  np.testing.assert_array_equal(s1['bn_0']['var'], 1.0)
  zeros, _ = models.init_params(spec, key, kernel_init_fn=jax.nn.initializers.zeros)
  np.testing.assert_array_equal(zeros['conv_3']['kernel'], 0.0)
