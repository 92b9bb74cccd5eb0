"""Tests for fedjax_prune.accounting: exact paper numbers, masked counts, bytes, memory."""
import dataclasses
import math

import jax
import numpy as np
import pytest

from fedjax_prune import accounting
from fedjax_prune import models

# conv3x3 SAME (2 filters) -> ReLU -> pool2 -> flatten (2*2*2 = 8) -> dense 3 -> ReLU -> dense 2.
# Params: conv 18 + 2, dense_0 24 + 3, dense_1 6 + 2 = 55.
# FLOPs: conv 2*16*9*2 = 576 + bias 32; pool 8*4 = 32; dense_0 2*8*3 = 48 + 3;
# dense_1 2*3*2 = 12 + 2; softmax 5*2 = 10; total 715.
TINY = models.ConvNetSpec(
    input_shape=(4, 4, 1), convs=(models.ConvSpec(features=2, kernel=3, pool=2),),
    head='flatten', hidden=(3,), num_classes=2)


def _prefix_channel_masks(big_spec, small_spec):
  """Channel masks on the big model that keep the filters the small model has (prefixes).

  Every leaf's last (output) axis keeps its first `small` entries: kernels get
  `(1, ..., out)` masks, biases and BN parameters `(out,)` masks.
  """
  big, _ = models.param_shapes(big_spec)
  small, _ = models.param_shapes(small_spec)

  def mask(b, s):
    keep = np.arange(b.shape[-1]) < s.shape[-1]
    return keep.reshape((1,) * (len(b.shape) - 1) + (b.shape[-1],))

  return jax.tree.map(mask, big, small)


# ----------------------------------------------------------------------------
# Exact numbers from the papers (METHODS.md §1.6 and §4.7).


@pytest.mark.parametrize('spec, params, flops', [
    (models.asp_femnist_cnn((32, 64)), 56_126, 7_529_588),
    (models.asp_femnist_cnn((17, 43)), 21_488, 2_860_280),
    (models.asp_celeba_cnn((32, 32, 32, 32)), 80_930, 152_485_804),
    (models.asp_celeba_cnn((14, 9, 14, 9)), 10_998, 29_582_906),
])
def test_asp_cnn_numbers_match_the_paper_exactly(spec, params, flops):
  assert accounting.param_count(spec) == params
  assert accounting.flops(spec) == flops


@pytest.mark.parametrize('widths, keras_params, flops', [
    ((16, 32, 64), 30_626, 5_234_332),
    ((9, 11, 22), 6_791, 1_610_012),
])
def test_asp_resnet_numbers_match_the_paper_exactly(widths, keras_params, flops):
  # Keras counts BN moving statistics as (non-trainable) parameters; TF's
  # profiler counts no FLOPs for FusedBatchNorm and 1 per element for the add.
  spec = models.asp_resnet(widths)
  assert accounting.param_count(spec, include_batch_stats=True) == keras_params
  assert accounting.flops(spec) == flops


def test_resnet18_counts():
  spec = models.resnet18()
  params, _ = models.param_shapes(spec)
  maskable = {name: {k: v for k, v in layer.items() if 'bn' not in k} if name != 'head' else layer
              for name, layer in params.items()}
  maskable = {name: layer for name, layer in maskable.items() if layer}
  assert accounting.param_count(None, params=maskable) == 11_164_362
  assert accounting.param_count(spec) == 11_173_962
  assert accounting.param_count(models.resnet18(num_classes=100)) == 11_220_132
  # BN affine = total - maskable.
  assert accounting.param_count(spec) - accounting.param_count(None, params=maskable) == 9_600
  # ~0.56 GMACs, the usual figure for CIFAR ResNet-18.
  macs = sum(row.mac_flops for row in accounting.layer_costs(spec)) // 2
  assert 0.555e9 < macs < 0.558e9


def test_leaf_femnist_training_flops():
  # PERFORMANCE.md: one SGD step at batch 32 = 3.30 GFLOP (3 x forward MACs).
  macs = 28 * 28 * 32 * 25 + 14 * 14 * 64 * 25 * 32 + 3136 * 2048 + 2048 * 62
  assert accounting.training_flops(models.leaf_femnist_cnn(), 32) == 3 * 2 * macs * 32
  assert round(accounting.training_flops(models.leaf_femnist_cnn(), 32) / 1e9, 2) == 3.30


def test_bn_flops_option():
  spec = models.asp_resnet((16, 32, 64))
  bn_elements = sum(math.prod(r.output_shape) for r in accounting.layer_costs(spec)
                    if r.op == 'bn')
  assert accounting.flops(spec, bn_flops_per_element=2) == 5_234_332 + 2 * bn_elements
  assert accounting.flops(spec, include_softmax=False) == 5_234_332 - 10


# ----------------------------------------------------------------------------
# Masked counts against hand computations.


def test_tiny_dense_counts():
  assert accounting.param_count(TINY) == 55
  assert accounting.flops(TINY) == 715


def test_unstructured_masks():
  kernel_mask = np.zeros((3, 3, 1, 2), bool)
  kernel_mask[0, :3, 0, 0] = True  # filter 0 keeps 3 taps
  kernel_mask[1, :2, 0, 1] = True  # filter 1 keeps 2 taps
  masks = {'conv_0': {'kernel': kernel_mask}}
  assert accounting.param_count(TINY, masks) == 55 - 13
  # conv MACs: 16 positions x 5 kept taps; both filters stay alive.
  assert accounting.flops(TINY, masks) == 715 - 576 + 2 * 16 * 5
  # Unpruned leaves may be given as scalar True masks.
  masks['dense_0'] = {'kernel': np.array(True), 'bias': np.array(True)}
  assert accounting.param_count(TINY, masks) == 42


def test_channel_masks_remove_filters_and_the_next_layer_inputs():
  masks = {'conv_0': {'kernel': np.array([True, False]).reshape(1, 1, 1, 2),
                      'bias': np.array([True, False])}}
  # conv 2*16*9 + 16 bias; pool 2*2*1*4; dense_0 sees 4 alive inputs: 2*4*3 + 3;
  # dense_1 14; softmax 10.
  assert accounting.flops(TINY, masks) == 304 + 16 + 27 + 14 + 10
  assert accounting.param_count(TINY, masks) == 55 - 10
  small = dataclasses.replace(TINY, convs=(dataclasses.replace(TINY.convs[0], features=1),))
  assert accounting.flops(small) == accounting.flops(TINY, masks)
  # Removing the dead inputs of dense_0 as well gives the small model's param count.
  masks['dense_0'] = {'kernel': np.tile([True, False], 4)[:, None]}
  assert accounting.param_count(TINY, masks) == accounting.param_count(small) == 33
  # A hidden unit removed by a channel mask on dense_0 also removes dense_1's input row.
  hidden_masks = {'dense_0': {'kernel': np.array([[True, True, False]]),
                              'bias': np.array([True, True, False])}}
  assert accounting.flops(TINY, hidden_masks) == 715 - (2 * 8 + 1) - 2 * 2


def test_fully_masked_bias_only_filter_is_dead():
  # A filter whose kernel is all masked costs nothing even if its bias is kept.
  masks = {'conv_0': {'kernel': np.array([True, False]).reshape(1, 1, 1, 2)}}
  assert accounting.flops(TINY, masks) == 304 + 16 + 27 + 14 + 10


@pytest.mark.parametrize('big, small', [
    (models.asp_celeba_cnn((32, 32, 32, 32)), models.asp_celeba_cnn((14, 9, 14, 9))),
    (models.asp_femnist_cnn((32, 64)), models.asp_femnist_cnn((17, 43))),
    (models.vgg11(widths=(8, 8, 16, 16, 16, 16, 16, 16)),
     models.vgg11(widths=(5, 8, 3, 16, 7, 16, 1, 9))),
    (models.resnet18(width_multiplier=1 / 16),
     dataclasses.replace(models.resnet18(width_multiplier=1 / 16),
                         inner_widths=((1, 4), (8, 3), (5, 16), (32, 7)))),
    (models.asp_resnet((16, 32, 64)), models.asp_resnet((9, 11, 22))),
])
def test_smaller_spec_flops_equal_channel_masked_flops(big, small):
  masks = _prefix_channel_masks(big, small)
  assert accounting.flops(big, masks) == accounting.flops(small)
  assert accounting.flops(big, masks, bn_flops_per_element=2) == accounting.flops(
      small, bn_flops_per_element=2)


def test_resnet_residual_width_needs_every_producer_masked():
  big = models.ResNetSpec(input_shape=(8, 8, 3), num_classes=5, stem_width=4,
                          stage_widths=(4, 8), stage_strides=(1, 2), inner_widths=((3,), (6,)))
  small = dataclasses.replace(big, stem_width=3, stage_widths=(3, 8))
  keep3 = np.arange(4) < 3
  out_mask = lambda: keep3.reshape(1, 1, 1, 4)
  masks = {'stem': {'conv': {'kernel': out_mask()}},
           'stage1_block0': {'conv2': {'kernel': out_mask()}}}
  assert accounting.flops(big, masks) == accounting.flops(small)
  # With only the block's conv2 masked the channel still carries the stem's output.
  partial = {'stage1_block0': {'conv2': {'kernel': out_mask()}}}
  assert accounting.flops(small) < accounting.flops(big, partial) < accounting.flops(big)


def test_channel_masked_celeba_param_count_equals_the_small_model():
  small_widths = (14, 9, 14, 9)
  big = models.asp_celeba_cnn()
  masks, prev = {}, np.ones(3, bool)
  for i, width in enumerate(small_widths):
    out = np.arange(32) < width
    masks[f'conv_{i}'] = {'kernel': (prev[:, None] & out[None, :])[None, None], 'bias': out}
    prev = out
  masks['dense_0'] = {'kernel': np.tile(prev, 25)[:, None]}  # flatten index (h*5 + w)*32 + c
  assert accounting.param_count(big, masks) == 10_998
  assert accounting.flops(big, masks) == 29_582_906


# ----------------------------------------------------------------------------
# Communication and memory.


def test_communication_bytes_unstructured():
  kernel_mask = np.zeros((3, 3, 1, 2), bool)
  kernel_mask.flat[:5] = True
  masks = {'conv_0': {'kernel': kernel_mask}}
  rest = 4 * (55 - 18)
  assert accounting.communication_bytes(TINY) == 4 * 55
  assert accounting.communication_bytes(TINY, masks) == 4 * 55  # dense sends the zeros
  assert accounting.communication_bytes(TINY, masks, encoding='bitmap') == 4 * 5 + 3 + rest
  # index: nnz * (4 + ceil(log2(18) / 8)) = 5 * 5.
  assert accounting.communication_bytes(TINY, masks, encoding='index') == 5 * 5 + rest
  assert accounting.communication_bytes(TINY, masks, encoding='bitmap', dtype_bytes=2) == (
      2 * 5 + 3 + 2 * (55 - 18))


def test_communication_bytes_channel_masks_send_one_bit_per_channel():
  masks = {'conv_0': {'kernel': np.array([True, False]).reshape(1, 1, 1, 2),
                      'bias': np.array([True, False])}}
  rest = 4 * (55 - 20)
  assert accounting.communication_bytes(TINY, masks, encoding='bitmap') == (4 * 9 + 1) + (
      4 + 1) + rest
  assert accounting.communication_bytes(TINY, masks, encoding='index') == (4 * 9 + 1) + (
      4 + 1) + rest


def test_index_bytes_grow_with_leaf_size():
  spec = models.mlp(input_shape=(256,), hidden=(256,), num_classes=2)  # dense_0: 65,536 weights
  mask = np.zeros((256, 256), bool)
  mask.flat[:10] = True
  masks = {'dense_0': {'kernel': mask}}
  rest = 4 * (256 + 512 + 2)
  assert accounting.communication_bytes(spec, masks, encoding='index') == 10 * (4 + 2) + rest
  spec = models.mlp(input_shape=(257,), hidden=(256,), num_classes=2)  # 65,792: 3-byte indices
  mask = np.zeros((257, 256), bool)
  mask.flat[:10] = True
  assert accounting.communication_bytes(spec, {'dense_0': {'kernel': mask}},
                                        encoding='index') == 10 * (4 + 3) + rest


def test_round_bytes_and_pytree_inputs(key):
  params, batch_stats = models.init_params(models.vgg11(widths=(2,) * 8), key)
  spec = models.vgg11(widths=(2,) * 8)
  n = accounting.param_count(spec)
  running = sum(x.size for x in jax.tree.leaves(batch_stats))
  assert accounting.round_bytes(spec) == accounting.RoundBytes(upload=4 * n, download=4 * n)
  assert accounting.communication_bytes(params) == 4 * n
  with_stats = accounting.communication_bytes({'params': params, 'batch_stats': batch_stats})
  assert with_stats == accounting.communication_bytes(spec, include_batch_stats=True) == (
      4 * (n + running))
  download = {'dense_0': {'kernel': np.array([[True] * 5 + [False] * 5])}}
  upload = {'dense_0': {'kernel': np.array([[True] * 2 + [False] * 8])}}
  out = accounting.round_bytes(spec, download, upload_masks=upload, encoding='bitmap')
  assert out.download == 4 * (n - 2 * 5) + 2
  assert out.upload == 4 * (n - 2 * 8) + 2


def test_training_memory_tiny_mlp():
  spec = models.MLPSpec(input_shape=(3,), hidden=(4,), num_classes=2)  # 26 params
  estimate = accounting.training_memory(spec, 2, optimizer_slots=2)
  # activations per example: input 3 + dense_0 4 + relu 4 + logits 2 = 13.
  assert estimate == accounting.MemoryEstimate(params=104, grads=104, optimizer=208, masks=0,
                                               activations=2 * 4 * 13, total=520)
  masks = {'dense_0': {'kernel': np.array([[True, True, False, False]]),
                       'bias': np.array([True, True, False, False])}}
  masked = accounting.training_memory(spec, 2, optimizer_slots=2, masks=masks)
  kept = 26 - 6 - 2
  assert masked.params == 4 * kept and masked.optimizer == 8 * kept
  assert masked.masks == 2  # two 4-bit bitmaps, one byte each
  assert masked.activations == 2 * 4 * (3 + 2 + 2 + 2)
  assert accounting.training_memory_bytes(spec, 2, optimizer_slots=2, masks=masks) == (
      masked.total)


def test_training_memory_counts_running_stats():
  spec = models.vgg11(widths=(2,) * 8)
  estimate = accounting.training_memory(spec, 1)
  assert estimate.params == 4 * (accounting.param_count(spec) + 2 * 8 * 2)
  assert estimate.grads == 4 * accounting.param_count(spec)


def test_summary_lists_layers_and_totals():
  text = accounting.summary(models.asp_femnist_cnn())
  assert 'conv_1' in text and 'gap' in text and 'dense_0' in text
  assert '56,126' in text and '7,529,588' in text
  assert 'relu' not in text


# ----------------------------------------------------------------------------
# Errors.


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match='conv_0/kernel'):
    accounting.param_count(TINY, {'conv_0': {'kernel': np.ones((3, 3, 2, 2), bool)}})
  with pytest.raises(ValueError, match='conv_7'):
    accounting.flops(TINY, {'conv_7': {'kernel': np.array(True)}})
  with pytest.raises(ValueError, match='encoding'):
    accounting.communication_bytes(TINY, encoding='csr')
  with pytest.raises(ValueError, match='batch_size'):
    accounting.training_flops(TINY, 0)
  with pytest.raises(ValueError, match='optimizer_slots'):
    accounting.training_memory(TINY, 1, optimizer_slots=-1)
  with pytest.raises(ValueError, match='spec'):
    accounting.flops('resnet18')
