"""Models: frozen width specs, NNX modules inside, pure functions outside.

A model is a spec (a frozen, hashable dataclass of widths; a smaller model is a
smaller spec) plus

    apply_fn, params, batch_stats = models.build(spec, key)   # conv_impl='auto'
    logits, new_batch_stats = apply_fn(params, batch_stats, x, train=True,
                                       example_mask=mask_B)

`params` and `batch_stats` are plain nested dicts of float32 arrays (the
`nnx.State.to_pure_dict()` form; `batch_stats == {}` unless the spec's norm
is 'batch_running'). NNX never leaves this package.

Parameter names (stable; structured pruning slices by them). Kernels are
HWIO for convs and [in, out] for denses; ci/co = input/output channels.

MLPSpec:
    dense_{i}: {kernel [in, out], bias [out]}   i = 0 .. len(hidden); the last
                                                 one gives the logits.
ConvNetSpec:
    conv_{i}:  {kernel [kh, kw, ci, co], bias [co]}   (bias only if convs[i].bias)
    bn_{i}:    {scale [co], bias [co]}                (only if convs[i].norm)
    dense_{j}: {kernel [in, out], bias [out]}         j = 0 .. len(hidden); last = logits
ResNetSpec (blocks named stage{s}_block{b}, s from 1 like torch's layer1..4, b from 0):
    stem:              {conv: {kernel [k, k, C, w0], (bias)}, bn: {scale, bias}}
    stage{s}_block{b}: {conv1: {kernel [3, 3, w_in, m]},  bn1: {scale [m], bias [m]},
                        conv2: {kernel [3, 3, m, w]},     bn2: {scale [w], bias [w]},
                        shortcut_conv: {kernel [1, 1, w_in, w]}, shortcut_bn: {...}}
                       (shortcut_* only when stride != 1 or w_in != w; conv biases
                        only if spec.conv_bias; bn* absent when norm='none')
    head:              {kernel [features, classes], bias [classes]}
InceptionSpec (ASP Inception-style, models/_inception.py):
    stem, inception{m}: {conv1x1, conv3x3, conv5x5}, conv_{i}, dense_{j}
batch_stats ('batch_running' only): the same paths as every BN, with leaves
    {mean [C], var [C]} instead of {scale, bias}, e.g. {'bn_0': {'mean', 'var'}}
    or {'stage1_block0': {'bn1': {'mean', 'var'}, ...}}.

Presets: `mlp`, `leaf_femnist_cnn`, `asp_femnist_cnn`, `asp_celeba_cnn`,
`vgg11`, `resnet18`, `cifar_resnet` (`resnet20`, `resnet56`), `asp_resnet`,
`asp_inception`; text (models/_text.py, token ids [B, T] in, next-token logits
[B, V] out): `leaf_shakespeare_lstm` (LSTMSpec), `shakespeare_transformer`
(TransformerSpec). Initialisation, conv implementations and
BatchNorm conventions are documented in `_layers` (module docstring).
"""
from fedjax_prune.models._build import ApplyFn
from fedjax_prune.models._build import build
from fedjax_prune.models._build import init_params
from fedjax_prune.models._build import make_apply
from fedjax_prune.models._build import param_shapes
from fedjax_prune.models._early_exit import build_early_exit
from fedjax_prune.models._early_exit import init_early_exit_params
from fedjax_prune.models._early_exit import make_early_exit_apply
from fedjax_prune.models._inception import asp_inception
from fedjax_prune.models._inception import InceptionSpec
from fedjax_prune.models._layers import BN_EPSILON
from fedjax_prune.models._layers import BN_MOMENTUM
from fedjax_prune.models._layers import conv2d
from fedjax_prune.models._layers import default_kernel_init
from fedjax_prune.models._layers import global_avg_pool
from fedjax_prune.models._layers import masked_moments
from fedjax_prune.models._layers import max_pool
from fedjax_prune.models._layers import resolve_conv_impl
from fedjax_prune.models._specs import asp_celeba_cnn
from fedjax_prune.models._specs import asp_femnist_cnn
from fedjax_prune.models._specs import asp_resnet
from fedjax_prune.models._specs import block_has_shortcut_conv
from fedjax_prune.models._specs import cifar_resnet
from fedjax_prune.models._specs import conv_output_hw
from fedjax_prune.models._specs import ConvNetSpec
from fedjax_prune.models._specs import ConvSpec
from fedjax_prune.models._specs import leaf_femnist_cnn
from fedjax_prune.models._specs import mlp
from fedjax_prune.models._specs import MLPSpec
from fedjax_prune.models._specs import ModelSpec
from fedjax_prune.models._specs import NORM_MODES
from fedjax_prune.models._specs import padding_pairs
from fedjax_prune.models._specs import pool_output_hw
from fedjax_prune.models._specs import resnet18
from fedjax_prune.models._specs import resnet20
from fedjax_prune.models._specs import resnet56
from fedjax_prune.models._specs import ResNetSpec
from fedjax_prune.models._specs import vgg11
from fedjax_prune.models._text import check_text_inputs
from fedjax_prune.models._text import leaf_shakespeare_lstm
from fedjax_prune.models._text import LSTMSpec
from fedjax_prune.models._text import shakespeare_transformer
from fedjax_prune.models._text import TEXT_SPECS
from fedjax_prune.models._text import TextSpec
from fedjax_prune.models._text import TransformerSpec

__all__ = [
    'InceptionSpec', 'asp_inception',
    'build_early_exit', 'init_early_exit_params', 'make_early_exit_apply',
    'ApplyFn', 'BN_EPSILON', 'BN_MOMENTUM', 'ConvNetSpec', 'ConvSpec', 'MLPSpec', 'ModelSpec',
    'NORM_MODES', 'ResNetSpec', 'asp_celeba_cnn', 'asp_femnist_cnn', 'asp_resnet',
    'block_has_shortcut_conv', 'build', 'cifar_resnet', 'conv2d', 'conv_output_hw', 'default_kernel_init',
    'global_avg_pool', 'init_params', 'leaf_femnist_cnn', 'make_apply', 'masked_moments',
    'max_pool', 'mlp', 'padding_pairs', 'param_shapes', 'pool_output_hw', 'resnet18', 'resnet20', 'resnet56', 'vgg11',
    'resolve_conv_impl',
    'LSTMSpec', 'TEXT_SPECS', 'TextSpec', 'TransformerSpec', 'check_text_inputs',
    'leaf_shakespeare_lstm', 'shakespeare_transformer',
]
