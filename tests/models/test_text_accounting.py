"""Accounting of the text models against hand counts (conventions: accounting.py, text section)."""
import math

import numpy as np
import pytest

from fedjax_prune import accounting, models


def test_tiny_lstm_by_hand():
  spec = models.LSTMSpec(vocab_size=5, seq_len=3, embed_dim=2, hidden=(3,))
  # Per step: 2 x 4H x (E + H) = 2*12*5 = 120 MAC FLOPs, + 12 projection adds + 12 bias adds
  # + 12 cell-update FLOPs = 156; 3 steps = 468. Head 2*3*5 + 5 = 35, softmax 5*5 = 25.
  assert accounting.flops(spec) == 468 + 35 + 25 == 528
  assert accounting.param_count(spec) == 5 * 2 + (2 * 12 + 3 * 12 + 12) + (3 * 5 + 5) == 102
  # Every position predicted: head and softmax 3 times; exactly 3 x the per-token cost.
  assert accounting.text_flops(spec, all_positions=True) == 468 + 3 * (35 + 25)
  assert accounting.text_flops_per_token(spec) == 156 + 35 + 25


def test_leaf_lstm_by_hand():
  spec = models.leaf_shakespeare_lstm()
  t, v, e = 80, 81, 8
  step = lambda n_in, h: 2 * 4 * h * (n_in + h) + 3 * 4 * h
  head = 2 * 256 * v + v
  assert accounting.flops(spec) == t * (step(e, 256) + step(256, 256)) + head + 5 * v == 127_673_318
  assert accounting.text_flops_per_token(spec) == step(e, 256) + step(256, 256) + head + 5 * v
  assert accounting.param_count(spec) == 818_137
  assert accounting.communication_bytes(spec) == 4 * 818_137
  macs = t * (2 * 4 * 256 * (e + 256) + 2 * 4 * 256 * 512) + 2 * 256 * v
  assert accounting.training_flops(spec, batch_size=10) == 3 * macs * 10


def test_transformer_by_hand():
  spec = models.shakespeare_transformer()  # 4 blocks, d 128, 4 heads of 32, FFN 512, T 80
  t, d, v, n, dh, f = 80, 128, 81, 4, 32, 512
  dense = lambda n_in, n_out, positions: positions * (2 * n_in * n_out + n_out)
  attention = n * (2 * t * t * dh + t * t + 5 * t * t + 2 * t * t * dh)
  block = (3 * dense(d, n * dh, t) + attention + dense(n * dh, d, t) + dense(d, f, t)
           + dense(f, d, t) + 2 * t * d)
  head = dense(d, v, 1) + 5 * v
  assert accounting.flops(spec) == t * d + 4 * block + head == 140_032_742
  every = accounting.text_flops(spec, all_positions=True)
  assert every == t * d + 4 * block + t * head and every % t == 0
  assert accounting.text_flops_per_token(spec) == every // t
  # LayerNorm counted when asked: 2 per block over T positions, ln_f at the last position.
  with_norm = accounting.text_flops(spec, norm_flops_per_element=4)
  assert with_norm - accounting.flops(spec) == 4 * (4 * 2 * t * d + d)
  block_params = 4 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
  assert accounting.param_count(spec) == v * d + t * d + 4 * block_params + 2 * d + d * v + v
  assert accounting.round_bytes(spec).upload == 4 * accounting.param_count(spec)


def test_unstructured_masks_scale_the_macs_of_a_kernel():
  spec = models.LSTMSpec(vocab_size=5, seq_len=3, embed_dim=2, hidden=(3,))
  kernel = np.ones((2, 12), bool)
  kernel[0, :6] = False  # 6 of 24 input-kernel entries removed; every unit stays alive
  masks = {"lstm_0": {"kernel": kernel}}
  assert accounting.param_count(spec, masks) == 102 - 6
  assert accounting.flops(spec) - accounting.flops(spec, masks) == 3 * 2 * 6
  assert accounting.communication_bytes(spec, masks, encoding="bitmap") == (
      4 * (102 - 6) + math.ceil(24 / 8))


def test_a_unit_without_kept_entries_costs_nothing_downstream():
  spec = models.LSTMSpec(vocab_size=5, seq_len=3, embed_dim=2, hidden=(3,))
  col = np.ones(12, bool)
  col[[1, 4, 7, 10]] = False  # unit 1, all four gates
  unit = np.array([True, False, True])
  masks = {"lstm_0": {"kernel": col[None, :], "recurrent_kernel": unit[:, None] & col[None, :],
                      "bias": col}}
  small = models.LSTMSpec(vocab_size=5, seq_len=3, embed_dim=2, hidden=(2,))
  # The head still holds unit 1's row (no mask on it) but reads a dead input.
  assert accounting.flops(spec, masks) == accounting.flops(small)


def test_bad_input_names_the_problem():
  spec = models.LSTMSpec(vocab_size=5, seq_len=3, embed_dim=2, hidden=(3,))
  with pytest.raises(ValueError, match="names no parameter"):
    accounting.flops(spec, {"lstm_7": {"kernel": np.ones((2, 12), bool)}})
  with pytest.raises(ValueError, match="LSTMSpec or TransformerSpec"):
    accounting.text_flops(models.mlp())
  with pytest.raises(ValueError, match="norm_flops_per_element"):
    accounting.text_flops(spec, norm_flops_per_element=-1)
