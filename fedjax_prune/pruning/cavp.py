"""Complexity-aware training: variational Bernoulli unit and layer pruning.

Guenter & Sideris, "Complexity-Aware Training of Deep Neural Networks for
Optimal Structure Discovery", arXiv 2411.09127 (METHODS.md §3). No code of the
paper exists and its method sections were not readable; this module follows
the design of METHODS.md §3.3, and every choice not stated in the abstract is
an option below with a documented default.

From the paper (abstract, METHODS.md §3.1):
  * 0/1 random variables ξ ~ Bern(θ) scale units/filters and whole layers
    (residual branches) during training; no pre-trained network is needed;
  * the cost combines prediction accuracy with network pruning, aware of
    computational and parameter complexity, balanced by three user parameters
    (accuracy vs pruning, layer vs unit, FLOPs vs params), with the many
    per-structure regularisation constants derived automatically;
  * θ is optimised jointly with the weights (stochastic optimisation over W
    and the variational parameters); a structure whose θ reaches 0 is removed
    permanently, and the solution is a deterministic network (θ in {0, 1}).

Ours (inferred; each an option, METHODS.md §3.3/§3.7 ambiguities A3.1-A3.6):
  * the cost `J = E_ξ[mean loss] + Σ_g λ_g θ_g (+ ρ/2 Σ_g θ_g ||W_g||²)` with
    `λ_g = γ [β ΔFLOPs_g / FLOPs_ref + (1 − β) ΔParams_g / Params_ref] · (α if
    g is a layer else 1)`; ΔFLOPs/ΔParams from `fedjax_prune.accounting` (the
    exact change when structure g is removed: a filter's own kernel plus the
    consumer's input slice; a block's whole branch), recomputed after every
    rebuild against the ORIGINAL model's totals. γ is in units of the mean
    per-example loss (the template's 1/N is folded into γ). (`CostWeights`)
  * unit gates ξ_1 on the inner channels of every ResNet BasicBlock (after
    ReLU(BN(conv1))) and on the filters of every conv of a ConvNetSpec; no
    ξ_2 on the residual-stream channels (A3.5: removing one removes no
    computation of the stream); layer gates ξ_B on the residual branch of
    the blocks with an identity shortcut only (the others carry the stride /
    width change and cannot be deleted; `structured.drop_blocks`).
  * text models (our extension: the paper has no sequence model), through the
    models' structure gates (`models.make_apply`) and the text surgery
    (`structured.text_shrink`): unit gates on every LSTM layer's hidden units
    (h_t, fed to the recurrence and the next layer), on every transformer
    block's attention heads and FFN units (after the GELU); layer gates on
    whole transformer blocks (pre-norm residual blocks: a block gated to 0 is
    the identity, as the deleted block). An LSTM layer has no layer gate: it
    has no residual path, so removing it is not the identity of anything
    (`structures='layers'` is refused for an LSTMSpec). The residual stream
    (d_model), embeddings and head are not gated.
  * θ-gradient estimators (A3.2, `Options.unit_estimator`/`layer_estimator`):
    'straight_through' (default; ∂loss/∂ξ at the sample, one pass),
    'reinforce' (score function with a running-mean loss baseline), and
    'two_point' for layer gates (exact E[loss(ξ_g=1) − loss(ξ_g=0)] given the
    other gates, 2 extra forward passes per layer gate).
  * θ initialised at `theta_init` = 0.9; one gate sample per minibatch
    (`per_example=False`); projection onto [0, 1] after every θ step, snapping
    θ ≥ 1 − `one_epsilon` to exactly 1 (ξ then deterministic 1); pruning when
    θ ≤ `prune_threshold` (A3.6: the paper's ODE-derived conditions are
    unknown), never the last unit of a layer; the final network keeps
    structures with θ ≥ `final_threshold`.
  * weights and θ have separate optax optimizers (the caller picks both). The
    client optimizer states restart every round by default; with
    `persist_theta_optimizer` the θ optimizer's state (e.g. Adam's moments) is
    part of the server state instead: clients start from it, the server
    averages their final states like θ, and a rebuild slices it like θ (without
    it every round's first Adam step on θ is lr · sign(g)).
  * the federated mode (`cavp` with many clients) is OUR EXTENSION: clients
    sample gates locally and return (W, θ); the server averages both
    (example-weighted), projects, prunes; the driver rebuilds the smaller
    model between rounds. The paper's centralised setting is the same code
    with one client holding all data. The weights' optimizer state restarts
    every round (θ's too unless `persist_theta_optimizer`).
  * gates are not rescaled (unlike inverted dropout): BatchNorm running
    statistics are collected under the stochastic gates, so evaluating with
    the deterministic gates is exact only once θ is binary (A3.1: the paper's
    BN handling is unknown). `cavp_method` can re-estimate them on training
    inputs for the deterministic network (`recalibrate_batch_stats`) after
    every rebuild and after `finalize`, and fine-tune the finalised network
    for a few steps (`FineTune`, `finetune`; extra training steps a
    comparison must count).

Gate trees (same structure as `apply_fn`'s `gates`, see `models.make_apply`):
  ConvNetSpec: {'conv_{i}': [co]};  ResNetSpec: {'stage{s}_block{b}': {'unit':
  [m], 'layer': []}} ('unit' absent for `structures='layers'`, 'layer' absent
  for 'units' and for blocks with a projection shortcut);  LSTMSpec:
  {'lstm_{l}': [H]};  TransformerSpec: {'block_{l}': {'heads': [n], 'ffn': [F],
  'layer': []}} ('heads' / 'ffn' absent for 'layers' and where the block has
  none, 'layer' absent for 'units'). A unit leaf ('unit', 'heads', 'ffn', a
  ConvNet or LSTM layer) always keeps one unit (`prune`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_prune import accounting, models
from fedjax_prune import tree as tree_lib
from fedjax_prune.data import ClientData
from fedjax_prune import federated
from fedjax_prune.federated import keys
from fedjax_prune.federated import (ClientInfo, ClientOutput, FedAlgorithm, LocalMetrics,
                                    LocalSchedule, count_correct, round_train_metrics,
                                    softmax_cross_entropy)
from fedjax_prune.federated._local import (LocalVariant, StepInput, masked_batch_loss,
                                           optimizer_step, run_local)
from fedjax_prune import structured
from fedjax_prune.structured import _drop_blocks, _text_shrink
from fedjax_prune.types import BatchStats, Params, PRNGKey

STRUCTURES = ('both', 'units', 'layers')
ESTIMATORS = ('straight_through', 'reinforce', 'two_point')

Gates = dict  # a gate tree (module docstring)


@dataclasses.dataclass(frozen=True)
class Options:
  """The inferred choices of the method (module docstring), with their defaults.

  Attributes:
    structures: 'both' (units and layers, the paper's combined pruning),
      'units' or 'layers' (the ablations).
    theta_init: initial keep-probability of every gate, in (0, 1].
    unit_estimator: θ-gradient estimator of unit gates: 'straight_through' or 'reinforce'.
    layer_estimator: of layer gates: 'straight_through', 'reinforce' or 'two_point'.
    per_example: sample a gate per example instead of one per minibatch.
    prune_threshold: θ at or below it prunes the structure permanently.
    one_epsilon: θ at or above 1 - one_epsilon is set to exactly 1.
    final_threshold: the final deterministic network keeps θ >= this.
    baseline_decay: decay of the running loss baseline (REINFORCE).
    rho: coefficient of the θ-weighted weight prior ρ/2 Σ_g θ_g ||W_g||² (0 = off).
    persist_theta_optimizer: keep the θ optimizer's state across rounds in the
      server state (`CavpState.theta_opt`) instead of restarting it every round.
  """
  structures: str = 'both'
  theta_init: float = 0.9
  unit_estimator: str = 'straight_through'
  layer_estimator: str = 'straight_through'
  per_example: bool = False
  prune_threshold: float = 0.05
  one_epsilon: float = 0.02
  final_threshold: float = 0.5
  baseline_decay: float = 0.9
  rho: float = 0.0
  persist_theta_optimizer: bool = False

  def __post_init__(self):
    if self.structures not in STRUCTURES:
      raise ValueError(f'Options.structures must be one of {STRUCTURES}, got {self.structures!r}')
    if self.unit_estimator not in ESTIMATORS[:2]:
      raise ValueError(f'Options.unit_estimator must be one of {ESTIMATORS[:2]}, got '
                       f'{self.unit_estimator!r}')
    if self.layer_estimator not in ESTIMATORS:
      raise ValueError(f'Options.layer_estimator must be one of {ESTIMATORS}, got '
                       f'{self.layer_estimator!r}')
    if not 0.0 < self.theta_init <= 1.0:
      raise ValueError(f'Options.theta_init must be in (0, 1], got {self.theta_init!r}')
    if not 0.0 <= self.prune_threshold < 0.5:
      raise ValueError(f'Options.prune_threshold must be in [0, 0.5), got {self.prune_threshold!r}')
    if not 0.0 <= self.one_epsilon < 0.5:
      raise ValueError(f'Options.one_epsilon must be in [0, 0.5), got {self.one_epsilon!r}')
    if not 0.0 < self.final_threshold <= 1.0:
      raise ValueError(f'Options.final_threshold must be in (0, 1], got {self.final_threshold!r}')
    if not 0.0 <= self.baseline_decay < 1.0:
      raise ValueError(f'Options.baseline_decay must be in [0, 1), got {self.baseline_decay!r}')
    if self.rho < 0:
      raise ValueError(f'Options.rho must be >= 0, got {self.rho!r}')
    if not isinstance(self.persist_theta_optimizer, bool):
      raise ValueError('Options.persist_theta_optimizer must be True or False, got '
                       f'{self.persist_theta_optimizer!r}')


class CostWeights(NamedTuple):
  """The three user parameters of the complexity-aware cost.

  Attributes:
    gamma: accuracy vs pruning, >= 0: the loss (mean nats per example) traded
      for removing structures worth the whole model's complexity.
    alpha: layer vs unit, >= 0: multiplies the penalty of layer gates.
    beta: FLOPs vs params, in [0, 1]: 1 = only FLOPs count, 0 = only params.
  """
  gamma: float = 1.0
  alpha: float = 1.0
  beta: float = 0.5


def _check_weights(weights: CostWeights) -> None:
  if not weights.gamma >= 0:
    raise ValueError(f'CostWeights.gamma must be >= 0, got {weights.gamma!r}')
  if not weights.alpha >= 0:
    raise ValueError(f'CostWeights.alpha must be >= 0, got {weights.alpha!r}')
  if not 0.0 <= weights.beta <= 1.0:
    raise ValueError(f'CostWeights.beta must be in [0, 1], got {weights.beta!r}')


# ----------------------------------------------------------------------------
# Gate layout and costs (host side).


def gate_template(spec, structures: str = 'both', *, allow_empty: bool = False) -> dict:
  """Shapes of the gates of `spec`: a gate tree of shape tuples.

  Args:
    spec: a ConvNetSpec, ResNetSpec, LSTMSpec or TransformerSpec.
    structures: 'both', 'units' or 'layers'.
    allow_empty: return {} instead of raising when nothing is gateable (after a
      rebuild removed every gated block).

  Raises:
    ValueError: the spec has no gateable structure of the requested kind.
  """
  if structures not in STRUCTURES:
    raise ValueError(f'structures must be one of {STRUCTURES}, got {structures!r}')
  units, layers = structures in ('both', 'units'), structures in ('both', 'layers')
  if isinstance(spec, models.LSTMSpec):
    if not units:
      raise ValueError(f"structures={structures!r}: an LSTMSpec has unit (hidden unit) gates "
                       "only; an LSTM layer has no residual path, so layer gates need a "
                       "ResNetSpec or a TransformerSpec")
    return {f'lstm_{l}': (h,) for l, h in enumerate(spec.hidden)}
  if isinstance(spec, models.TransformerSpec):
    template = {}
    for l, (heads, _, ffn) in enumerate(spec.blocks):
      entry = {}
      if units and heads:  # a branch already without heads / FFN units has nothing to gate
        entry['heads'] = (heads,)
      if units and ffn:
        entry['ffn'] = (ffn,)
      if layers:
        entry['layer'] = ()
      if entry:
        template[f'block_{l}'] = entry
    if not template and not allow_empty:
      raise ValueError(f'structures={structures!r}: the TransformerSpec has no block to gate')
    return template
  if isinstance(spec, models.ConvNetSpec):
    if not units or not spec.convs:
      raise ValueError(f"structures={structures!r}: a ConvNetSpec has unit (filter) gates only; "
                       "layer gates need a ResNetSpec")
    return {f'conv_{i}': (conv.features,) for i, conv in enumerate(spec.convs)}
  if isinstance(spec, models.ResNetSpec):
    droppable = set(_drop_blocks.droppable_blocks(spec))
    template = {}
    for name, _, inner, _, _ in spec.blocks():
      entry = {}
      if units:
        entry['unit'] = (inner,)
      if layers and name in droppable:
        entry['layer'] = ()
      if entry:
        template[name] = entry
    if not template and not allow_empty:
      raise ValueError(f'structures={structures!r}: the ResNetSpec has no identity-shortcut '
                       'block to gate')
    return template
  raise ValueError('cavp gates ConvNetSpec, ResNetSpec, LSTMSpec and TransformerSpec models, '
                   f'got {type(spec).__name__}')


def _is_layer(path) -> bool:
  return str(getattr(path[-1], 'key', path[-1])) == 'layer'


def _map_with_kind(fn: Callable, *trees):
  """tree.map with `fn(is_layer, *leaves)`."""
  return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(_is_layer(p), *xs), *trees)


def init_theta(spec, options: Options = Options()) -> Gates:
  """θ = options.theta_init for every gate of `spec` (float32 arrays)."""
  template = gate_template(spec, options.structures)
  return jax.tree.map(lambda shape: jnp.full(shape, options.theta_init, jnp.float32), template,
                      is_leaf=lambda x: isinstance(x, tuple))


def _with_inner(spec, name: str, delta: int):
  if isinstance(spec, models.ConvNetSpec):
    i = int(name.split('_')[1])
    convs = list(spec.convs)
    convs[i] = dataclasses.replace(convs[i], features=convs[i].features + delta)
    return dataclasses.replace(spec, convs=tuple(convs))
  s, b = (int(part) for part in name.replace('stage', '').split('_block'))
  inner = [list(w) for w in spec.inner_widths]
  inner[s - 1][b] += delta
  return dataclasses.replace(spec, inner_widths=tuple(tuple(w) for w in inner))


def structure_costs(spec, structures: str = 'both', *, bn_flops_per_element: int = 0,
                    include_softmax: bool = True, allow_empty: bool = False
                    ) -> tuple[dict, dict]:
  """FLOPs and parameters removed by removing each gated structure alone.

  A unit's cost is `cost(spec with one more unit there) - cost(spec)`: every
  count is linear in one layer's width, so this is exactly what removing one
  unit saves (its filter, BN entries and the consumer's input slice), and it
  is defined for a width-1 layer too. A layer's cost is that of its residual
  branch plus the residual add (`accounting.layer_costs` rows), i.e.
  `cost(spec) - cost(spec without the block)`. Conventions as `accounting.flops`.
  For a ResNetSpec a block's inner width enters only that block's rows, so one
  `layer_costs` of the spec with every inner width + 1 gives every block's unit
  cost at once (the same numbers as one wider spec per block, at two accountings).

  Text models (`_text_structure_costs`): a head's or FFN unit's cost is
  `cost(spec) - cost(spec with one fewer in that block)` (linear in both), an
  LSTM unit's `cost(spec) - cost(spec with one fewer in that layer)` (the
  recurrent kernel makes a layer's cost quadratic in its width: this is what
  removing one of its H units saves), a block's `cost(spec) - cost(spec
  without it)`.

  Returns:
    (dflops, dparams): gate trees of float numpy arrays, one entry per gate
    element (unit leaves [m], layer leaves []).
  """
  template = gate_template(spec, structures, allow_empty=allow_empty)
  if isinstance(spec, models.TEXT_SPECS):
    return _text_structure_costs(spec, template, include_softmax=include_softmax)
  count_flops = lambda s: accounting.flops(s, bn_flops_per_element=bn_flops_per_element,
                                           include_softmax=include_softmax)
  base_flops, base_params = count_flops(spec), accounting.param_count(spec)
  base_rows = accounting.layer_costs(spec, bn_flops_per_element=bn_flops_per_element,
                                     include_softmax=include_softmax)

  def costs(name, kind, shape):
    if kind == 'layer':
      # The branch's ops and the residual add (an identity block's final ReLU costs 0).
      rows = [r for r in base_rows if r.name.startswith(f'{name}/')
              and not r.name.startswith(f'{name}/shortcut')]
      return (np.full(shape, sum(r.flops for r in rows), np.float64),
              np.full(shape, sum(r.params for r in rows), np.float64))
    wider = _with_inner(spec, name, 1)
    return (np.full(shape, count_flops(wider) - base_flops, np.float64),
            np.full(shape, accounting.param_count(wider) - base_params, np.float64))

  if isinstance(spec, models.ResNetSpec) and any('unit' in e for e in template.values()):
    wider_rows = accounting.layer_costs(
        dataclasses.replace(spec, inner_widths=tuple(tuple(w + 1 for w in ws)
                                                     for ws in spec.inner_widths)),
        bn_flops_per_element=bn_flops_per_element, include_softmax=include_softmax)
    block_sum = lambda rows, name, field: sum(getattr(r, field) for r in rows
                                              if r.name.startswith(f'{name}/'))
    unit_cost = lambda name, shape: tuple(
        np.full(shape, block_sum(wider_rows, name, f) - block_sum(base_rows, name, f), np.float64)
        for f in ('flops', 'params'))
  else:
    unit_cost = lambda name, shape: costs(name, 'unit', shape)

  dflops, dparams = {}, {}
  for name, entry in template.items():
    if isinstance(entry, dict):
      pairs = {kind: costs(name, kind, shape) if kind == 'layer' else unit_cost(name, shape)
               for kind, shape in entry.items()}
      dflops[name] = {k: v[0] for k, v in pairs.items()}
      dparams[name] = {k: v[1] for k, v in pairs.items()}
    else:
      dflops[name], dparams[name] = costs(name, 'unit', entry)
  return dflops, dparams


def _text_structure_costs(spec, template: dict, *, include_softmax: bool) -> tuple[dict, dict]:
  """`structure_costs` of an LSTMSpec / TransformerSpec (its docstring): what removing one
  gated structure alone saves, from `accounting.flops` / `param_count` of the smaller spec.

  The one unit of a width-1 LSTM layer (which `prune` never removes: a layer keeps a unit)
  costs its whole layer and the consumer's input rows: the accounting of the model with
  those weights masked.
  """
  def cost(s, masks=None):
    return np.array([accounting.flops(s, masks, include_softmax=include_softmax),
                     accounting.param_count(s, masks)], np.float64)

  base = cost(spec)
  dflops, dparams = {}, {}
  if isinstance(spec, models.LSTMSpec):
    for l, h in enumerate(spec.hidden):
      name = f'lstm_{l}'
      if h > 1:
        hidden = tuple(w - (i == l) for i, w in enumerate(spec.hidden))
        saved = base - cost(dataclasses.replace(spec, hidden=hidden))
      else:
        off = np.zeros((), bool)
        consumer = f'lstm_{l + 1}' if l + 1 < len(spec.hidden) else 'head'
        saved = base - cost(spec, {name: dict.fromkeys(('kernel', 'recurrent_kernel', 'bias'), off),
                                   consumer: {'kernel': off}})
      dflops[name], dparams[name] = (np.full(template[name], v) for v in saved)
    return dflops, dparams
  for name, entry in template.items():
    l = int(name.split('_')[1])
    heads, head_dim, ffn = spec.blocks[l]
    smaller = {'layer': None, 'heads': (heads - 1, head_dim, ffn),
               'ffn': (heads, head_dim, ffn - 1)}
    dflops[name], dparams[name] = {}, {}
    for kind, shape in entry.items():
      blocks = [b for i, b in enumerate(spec.blocks) if i != l or smaller[kind] is not None]
      if smaller[kind] is not None:
        blocks[l] = smaller[kind]
      saved = base - cost(dataclasses.replace(spec, blocks=tuple(blocks)))
      dflops[name][kind], dparams[name][kind] = (np.full(shape, v) for v in saved)
  return dflops, dparams


def penalty_weights(spec, weights: CostWeights, *, structures: str = 'both',
                    reference: Optional[tuple[int, int]] = None, bn_flops_per_element: int = 0,
                    include_softmax: bool = True, allow_empty: bool = False) -> Gates:
  """λ_g for every gate (module docstring): a gate tree of float32 arrays.

  Args:
    spec: the current model spec.
    weights: the three user parameters.
    structures: 'both', 'units' or 'layers'.
    reference: (FLOPs, params) the fractions are taken of; default the
      current spec's. Pass the original model's after a rebuild so that γ keeps
      its meaning.
    bn_flops_per_element, include_softmax: FLOPs conventions (`accounting.flops`).
    allow_empty: return {} when no gate is left (see `gate_template`).
  """
  _check_weights(weights)
  if reference is None:
    reference = (accounting.flops(spec, bn_flops_per_element=bn_flops_per_element,
                                  include_softmax=include_softmax),
                 accounting.param_count(spec))
  ref_flops, ref_params = reference
  dflops, dparams = structure_costs(spec, structures, bn_flops_per_element=bn_flops_per_element,
                                    include_softmax=include_softmax, allow_empty=allow_empty)

  def lam(is_layer, df, dp):
    value = weights.gamma * (weights.beta * df / ref_flops + (1.0 - weights.beta) * dp / ref_params)
    return jnp.asarray(value * (weights.alpha if is_layer else 1.0), jnp.float32)

  return _map_with_kind(lam, dflops, dparams)


# ----------------------------------------------------------------------------
# Gates, projection, pruning (pure, jittable).


def sample_gates(theta: Gates, alive: Gates, key: PRNGKey, *,
                 batch_size: Optional[int] = None) -> Gates:
  """ξ ~ Bern(θ) for alive gates, 0 for pruned ones (float32).

  Args:
    theta, alive: gate trees (float θ in [0, 1], bool alive).
    key: PRNG key.
    batch_size: None for one sample per gate; B for per-example samples
      (leaves [B, *gate_shape]).
  """
  leaves, treedef = jax.tree.flatten(theta)
  leaf_keys = keys.split(key, max(len(leaves), 1))
  lead = () if batch_size is None else (batch_size,)
  # jax.random's draw, not `keys.uniform` (the same numbers): XLA:CPU fuses the latter's
  # inline hash into every op that reads the broadcast gates and recomputes it per
  # activation element, ~340 M integer ops per FEMNIST CNN step, 1.65x the step
  # (docs/results/cavp_step_cost.md); jax.random's hash is a loop XLA materialises once.
  samples = [jax.random.bernoulli(k, jnp.broadcast_to(t, lead + t.shape))
             for k, t in zip(leaf_keys, leaves)]
  samples = jax.tree.unflatten(treedef, samples)
  return jax.tree.map(lambda s, a: (s & jnp.broadcast_to(a, s.shape)).astype(jnp.float32),
                      samples, alive)


def project(theta: Gates, alive: Gates, options: Options = Options()) -> Gates:
  """Π: clip θ to [0, 1], set θ >= 1 - ε to 1 and pruned gates to 0."""

  def one(t, a):
    t = jnp.clip(t, 0.0, 1.0)
    t = jnp.where(t >= 1.0 - options.one_epsilon, 1.0, t)
    return jnp.where(a, t, 0.0)

  return jax.tree.map(one, theta, alive)


def prune(theta: Gates, alive: Gates, options: Options = Options(), *,
          threshold: Optional[float] = None) -> tuple[Gates, Gates]:
  """Marks gates with θ <= threshold as pruned (permanently), θ set to 0.

  A unit leaf always keeps at least one unit (the one with the largest θ): a
  layer of width 0 is not a model; whole blocks go through their layer gate.

  Returns:
    (theta, alive).
  """
  threshold = options.prune_threshold if threshold is None else threshold

  def one(is_layer, t, a):
    keep = a & (t > threshold)
    if not is_layer:
      best = jnp.argmax(jnp.where(a, t, -1.0))
      keep = keep | ((jnp.arange(t.shape[0]) == best) & ~jnp.any(keep))
    return keep

  new_alive = _map_with_kind(one, theta, alive)
  return jax.tree.map(lambda t, a: jnp.where(a, t, 0.0), theta, new_alive), new_alive


def deterministic_gates(theta: Gates, alive: Gates, threshold: float = 0.5) -> Gates:
  """The deterministic network's gates: 1 where alive and θ >= threshold, else 0."""
  return jax.tree.map(lambda t, a: (a & (t >= threshold)).astype(jnp.float32), theta, alive)


def _structure_sq_norms(params: Params, theta: Gates) -> Gates:
  """||W_g||² of each gated structure's own weights (a filter's kernel column,
  bias and BN entries; a block's whole residual branch; an LSTM unit's four gate
  columns of its kernels and bias; a head's query/key/value columns and biases; an FFN
  unit's dense_0 column and bias)."""

  def out_slice(node):
    total = 0.0
    for k, v in node.items():
      axes = tuple(range(v.ndim - 1))
      total = total + (jnp.sum(jnp.square(v), axis=axes) if axes else jnp.square(v))
    return total

  norms = {}
  for name, entry in theta.items():
    if isinstance(entry, dict):
      block = params[name]
      out = {}
      if 'unit' in entry:
        out['unit'] = out_slice(block['conv1']) + (out_slice(block['bn1']) if 'bn1' in block else 0.0)
      if 'heads' in entry:  # columns head * head_dim + e
        cols = sum(out_slice(block['attn'][k]) for k in ('query', 'key', 'value'))
        out['heads'] = cols.reshape(entry['heads'].shape[0], -1).sum(axis=1)
      if 'ffn' in entry:
        out['ffn'] = out_slice(block['ffn']['dense_0'])
      if 'layer' in entry:
        out['layer'] = sum(tree_lib.squared_norm(block[k]) for k in block
                           if not k.startswith('shortcut'))
      norms[name] = out
    elif name.startswith('lstm_'):  # columns gate * H + unit
      norms[name] = out_slice(params[name]).reshape(4, entry.shape[0]).sum(axis=0)
    else:
      i = name.split('_')[1]
      norm = out_slice(params[name])
      if f'bn_{i}' in params:
        norm = norm + out_slice(params[f'bn_{i}'])
      norms[name] = norm
  return norms


def penalty(theta: Gates, alive: Gates, lam: Gates, params: Params,
            options: Options = Options()) -> jax.Array:
  """Σ_g λ_g θ_g (+ ρ/2 Σ_g θ_g ||W_g||²) over alive gates: [] float32."""
  live = jax.tree.map(lambda t, a: jnp.where(a, t, 0.0), theta, alive)
  total = jnp.zeros((), jnp.float32)
  for l, t in zip(jax.tree.leaves(lam), jax.tree.leaves(live)):
    total = total + jnp.sum(l * t)
  if options.rho > 0:
    norms = _structure_sq_norms(params, theta)
    total = total + 0.5 * options.rho * sum(
        jnp.sum(t * n) for t, n in zip(jax.tree.leaves(live), jax.tree.leaves(norms)))
  return total


# ----------------------------------------------------------------------------
# Local training and the federated algorithm.


class LocalResult(NamedTuple):
  """What one client's local training returns."""
  params: Params
  batch_stats: BatchStats
  theta: Gates
  baseline: jax.Array  # [] running mean of the training loss
  theta_opt: Any = ()  # the θ optimizer's state after the last step


class CavpState(NamedTuple):
  """Server state.

  Attributes:
    params, batch_stats: global model (current, possibly rebuilt, architecture).
    theta: gate keep-probabilities (gate tree, float32 in [0, 1]).
    alive: gate tree of bool; False = pruned permanently (θ = 0).
    lam: penalty weights λ_g (gate tree), recomputed at every rebuild.
    baseline: [] running mean loss (REINFORCE baseline); NaN until the first step.
    round_idx: [] int32 completed rounds.
    theta_opt: the θ optimizer's state (θ-shaped moments, step count) with
      `Options.persist_theta_optimizer`, else () (clients restart it every round).
    aggregator: the state of `cavp`'s `aggregator` (the adaptive DP clip norm, the
      error-feedback memory [num_clients, ...params]); () without one and for stateless
      ones. A rebuild slices its params-shaped trees like the params (`slice_params_trees`).
  """
  params: Params
  batch_stats: BatchStats
  theta: Gates
  alive: Gates
  lam: Gates
  baseline: jax.Array
  round_idx: jax.Array
  theta_opt: Any = ()
  aggregator: Any = ()


class CavpSums(NamedTuple):
  """One client's pre-weighted contribution (summed over the cohort by the engine)."""
  params: Params
  batch_stats: BatchStats
  theta: Gates
  baseline: jax.Array
  weight: jax.Array
  num_clients: jax.Array
  metrics: LocalMetrics
  theta_opt: Any = ()  # weighted θ optimizer state (float32 leaves), or ()


def _broadcast(t, shape):
  return jnp.broadcast_to(t, shape)


def make_local_train(apply_fn: Callable, weight_optimizer: optax.GradientTransformation,
                     theta_optimizer: optax.GradientTransformation, schedule: LocalSchedule,
                     options: Options = Options(), *,
                     loss_fn: Callable = softmax_cross_entropy,
                     train_transform: Optional[Callable] = None) -> Callable:
  """Builds one client's joint (W, θ) training loop (a loop over the client's real steps).

  Each step samples ξ ~ Bern(θ), takes an optimizer step on W with ∇_W of the
  sampled loss (+ prior), and a step on θ with the chosen estimator of
  ∇_θ J, then projects θ (`project`): a variant (`LocalVariant`) of the one
  local-training loop (`federated._local.run_local`), so batching, padding
  (padded steps never run) and metrics are `federated.make_local_train`'s.

  Returns:
    `local_train(params, batch_stats, theta, alive, lam, baseline, data, key, *,
    theta_opt_state=None, weight_lr_scale=None) -> (LocalResult, LocalMetrics)`; the θ
    optimizer starts from `theta_opt_state` (None: `theta_optimizer.init(theta)`);
    `weight_lr_scale` ([] float or None = 1) multiplies every weight update (the
    weight optimizer's learning rate times it, for SGD with or without momentum and
    for Adam alike); θ's updates are not scaled.
  """
  estimator = lambda is_layer: options.layer_estimator if is_layer else options.unit_estimator

  def batch_loss(params, theta, stats, x, y, mask, b, alive, lam, baseline):
    def gate(is_layer, t, s):
      if estimator(is_layer) == 'straight_through':
        tb = _broadcast(t, s.shape)
        return tb + jax.lax.stop_gradient(s - tb)
      return s

    gates = _map_with_kind(gate, theta, b)
    logits, new_stats = apply_fn(params, stats, x, train=True, example_mask=mask, gates=gates)
    per_example = loss_fn(logits, y)
    weights = mask.astype(per_example.dtype)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(per_example * weights) / count
    objective = loss + penalty(theta, alive, lam, params, options)
    # REINFORCE: E[(loss - baseline) ∇_θ log q(ξ | θ)].
    logq = []
    for is_layer_, t, s in zip(*_kind_leaves(theta, b)):
      if estimator(is_layer_) == 'reinforce':
        tc = jnp.clip(_broadcast(t, s.shape), 1e-6, 1.0 - 1e-6)
        lq = s * jnp.log(tc) + (1.0 - s) * jnp.log1p(-tc)
        axes = tuple(range(1 if options.per_example else 0, lq.ndim))
        logq.append(jnp.sum(lq, axis=axes) if axes else lq)
    if logq:
      base = jnp.where(jnp.isnan(baseline), jax.lax.stop_gradient(loss), baseline)
      total_logq = sum(logq)
      if options.per_example:
        advantage = jax.lax.stop_gradient(per_example - base)
        objective = objective + jnp.sum(advantage * total_logq * weights) / count
      else:
        objective = objective + jax.lax.stop_gradient(loss - base) * total_logq
    correct = count_correct(logits, y, weights)
    return objective, (new_stats, loss, jnp.sum(per_example * weights), correct)

  grad_fn = jax.grad(batch_loss, argnums=(0, 1), has_aux=True)

  def two_point_grads(params, theta, stats, x, y, mask, b):
    """E[loss | ξ_g = 1] - E[loss | ξ_g = 0] for every 'two_point' layer gate, given the others."""
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(b)[0]
             if _is_layer(p) and options.layer_estimator == 'two_point']
    if not paths:
      return None
    diffs = {}
    for path in paths:
      losses = []
      for value in (1.0, 0.0):
        gates = jax.tree_util.tree_map_with_path(
            lambda p, s, path=path, value=value: jnp.full_like(s, value) if p == path else s, b)
        logits, _ = apply_fn(params, stats, x, train=True, example_mask=mask, gates=gates)
        losses.append(masked_batch_loss(loss_fn, logits, y, mask)[0])
      diffs[path] = losses[0] - losses[1]
    return jax.tree_util.tree_map_with_path(lambda p, t: diffs.get(p, jnp.zeros_like(t)), theta)

  def client_init(fixed):
    inputs, _ = fixed
    t_opt = theta_optimizer.init(inputs.theta) if inputs.theta_opt is None else inputs.theta_opt
    return (inputs.params, inputs.batch_stats, inputs.theta, inputs.baseline,
            weight_optimizer.init(inputs.params), t_opt)

  def client_step(fixed, state, batch: StepInput):
    inputs, weight_lr_scale = fixed
    params, stats, theta, baseline, w_opt, t_opt = state
    x, y, mask, alive = batch.x, batch.y, batch.mask, inputs.alive
    b = sample_gates(theta, alive, batch.key, batch_size=x.shape[0] if options.per_example else None)
    (g_w, g_t), (new_stats, loss, loss_sum, correct) = grad_fn(
        params, theta, stats, x, y, mask, b, alive, inputs.lam, baseline)
    exact = two_point_grads(params, theta, stats, x, y, mask, b)
    if exact is not None:
      g_t = jax.tree_util.tree_map_with_path(
          lambda p, g, e: e + g if _is_layer(p) else g, g_t, exact)
    g_t = jax.tree.map(lambda g, a: jnp.where(a, g, 0.0), g_t, alive)
    # weight_lr_scale: the round's learning-rate multiplier (`cavp(weight_lr_scale=...)`)
    params, w_opt = optimizer_step(weight_optimizer, g_w, w_opt, params, weight_lr_scale)
    theta, t_opt = optimizer_step(theta_optimizer, g_t, t_opt, theta)
    theta = project(theta, alive, options)
    baseline = jnp.where(jnp.isnan(baseline), loss,
                         options.baseline_decay * baseline + (1 - options.baseline_decay) * loss)
    return (params, new_stats, theta, baseline, w_opt, t_opt), loss_sum, correct

  def client_final(fixed, state, num_steps) -> LocalResult:
    del fixed, num_steps
    params, stats, theta, baseline, _, t_opt = state
    return LocalResult(params, stats, theta, baseline, t_opt)

  # One gate sample per step, keyed by the step (`StepInput.key`).
  variant = LocalVariant(client_init, client_step, client_final, step_keys=True)

  def local_train(params, batch_stats, theta, alive, lam, baseline, data: ClientData,
                  key: PRNGKey, *, theta_opt_state: Any = None,
                  weight_lr_scale: Optional[jax.Array] = None
                  ) -> tuple[LocalResult, LocalMetrics]:
    # The server state's fields are the loop's fixed inputs (round_idx unused: no leaf).
    inputs = CavpState(params, batch_stats, theta, alive, lam, baseline, round_idx=None,
                       theta_opt=theta_opt_state)
    return run_local(variant, (inputs, weight_lr_scale), data, key, schedule, train_transform)

  return local_train


def _kind_leaves(theta, b):
  flat_t = jax.tree_util.tree_flatten_with_path(theta)[0]
  kinds = [_is_layer(p) for p, _ in flat_t]
  return kinds, [t for _, t in flat_t], jax.tree.leaves(b)


def gate_stats(theta: Gates, alive: Gates, options: Options = Options()) -> dict:
  """Counts for logging (jittable): alive units/layers, mean θ, fraction of θ in {0, 1}.

  A gate counts as converged when pruned, θ <= prune_threshold or θ >= 1 - one_epsilon.
  """
  out = {}
  for kind, is_layer in (('units', False), ('layers', True)):
    pairs = [(t, a) for k, t, a in zip(_kind_leaves(theta, alive)[0], jax.tree.leaves(theta),
                                       jax.tree.leaves(alive)) if k == is_layer]
    if not pairs:
      continue
    t = jnp.concatenate([jnp.ravel(t) for t, _ in pairs])
    a = jnp.concatenate([jnp.ravel(a) for _, a in pairs])
    binary = ~a | (t <= options.prune_threshold) | (t >= 1.0 - options.one_epsilon)
    out[f'{kind}_alive'] = jnp.sum(a).astype(jnp.float32)
    out[f'{kind}_total'] = jnp.asarray(a.size, jnp.float32)
    out[f'{kind}_theta_mean'] = jnp.sum(jnp.where(a, t, 0.0)) / jnp.maximum(jnp.sum(a), 1)
    out[f'{kind}_binary_frac'] = jnp.mean(binary.astype(jnp.float32))
  return out


def cavp(apply_fn: Callable, weight_optimizer: optax.GradientTransformation,
         theta_optimizer: optax.GradientTransformation, schedule: LocalSchedule,
         options: Options = Options(), *, loss_fn: Callable = softmax_cross_entropy,
         train_transform: Optional[Callable] = None,
         uniform_weights: bool = False, spec=None, weights: Optional[CostWeights] = None,
         reference: Optional[tuple[int, int]] = None,
         aggregator: Optional[federated.Aggregator] = None,
         weight_lr_scale: Optional[optax.Schedule] = None) -> FedAlgorithm:
  """Complexity-aware variational unit/layer pruning as a `FedAlgorithm`.

  Centralised (the paper): a dataset with ONE client holding all the data and
  a cohort of that client; a round = `schedule`'s local epochs/steps.
  Federated (our extension): clients train (W, θ) locally from the global
  state; the server averages W, BatchNorm statistics, θ and the baseline with
  example weights, then projects and prunes θ. Structural rebuilds happen
  outside the round (`rebuild`).

  Args:
    apply_fn: gated `apply_fn(params, batch_stats, x, *, train, example_mask, gates)`.
    weight_optimizer: optax optimizer of the weights (client side).
    theta_optimizer: optax optimizer of θ (client side).
    schedule: local batch size and epochs/steps.
    options: the inferred choices (`Options`).
    loss_fn: per-example loss `(logits [B, K], y [B]) -> [B]`.
    train_transform: per-batch augmentation `(x, key) -> x`.
    uniform_weights: average clients equally instead of by example count.
    spec, weights, reference: the model spec, cost weights and reference (FLOPs,
      params) that give `init` its default θ (`init_theta(spec, options)`) and λ
      (`penalty_weights(spec, weights, structures=options.structures,
      reference=reference)`), so that `init(params, key, batch_stats)` needs nothing
      else, as every algorithm's init does.
    aggregator: None: the example-weighted mean of the weights. A `federated.Aggregator`
      (robust, DP, compressed) aggregates each client's weight update w - w_k (every
      coordinate held; `federated.weighted_view('params')`) in place of that mean; θ,
      the statistics and the baseline keep their example-weighted means. Its state (the
      adaptive clip norm, the error-feedback memory) is `CavpState.aggregator`: part of
      the checkpoints, sliced at a rebuild (`rebuild`).
    weight_lr_scale: optional schedule over rounds, `round_idx [] int32 -> [] float`,
      multiplying the weights' updates in every step of round `round_idx` (the state's
      completed rounds): a learning-rate decay across rounds although each round starts
      a fresh weight optimizer, e.g. `optax.cosine_decay_schedule(1.0, num_rounds)`.
      θ's learning rate is not scaled. None: no scaling (bit-identical to a schedule of 1).

  Returns:
    FedAlgorithm with `init(params, key, batch_stats=None, *, theta=None, lam=None,
    alive=None) -> CavpState` (θ, λ given explicitly override the defaults; without
    `spec`/`weights` they are required). With `options.persist_theta_optimizer` the
    state's `theta_opt` is `theta_optimizer.init(theta)`; every client starts from it
    and the server keeps the example-weighted mean of the clients' final θ optimizer
    states (integer leaves such as Adam's step count rounded back to integers).

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, models, testing
    >>> from fedjax_prune.pruning import cavp as cavp_lib
    >>> spec = models.ConvNetSpec(input_shape=(8, 8, 1), convs=(models.ConvSpec(features=4),),
    ...                           num_classes=3, head='gap')
    >>> apply_fn, params, stats = models.build(spec, jax.random.key(0))
    >>> alg = cavp_lib.cavp(apply_fn, optax.sgd(0.1), optax.sgd(0.1),
    ...                     federated.LocalSchedule(batch_size=4), spec=spec,
    ...                     weights=cavp_lib.CostWeights(gamma=0.1))
    >>> state = alg.init(params, jax.random.key(1), stats)
    >>> sorted(state.theta)
    ['conv_0']
  """
  local_train = make_local_train(apply_fn, weight_optimizer, theta_optimizer, schedule, options,
                                 loss_fn=loss_fn, train_transform=train_transform)
  persist = options.persist_theta_optimizer

  def init(params: Params, key: PRNGKey, batch_stats: Optional[BatchStats] = None, *,
           theta: Optional[Gates] = None, lam: Optional[Gates] = None,
           alive: Optional[Gates] = None) -> CavpState:
    del key  # deterministic: the model's init and θ_init hold all the state
    if theta is None:
      if spec is None:
        raise ValueError("cavp init needs theta=, or cavp(..., spec=) for the default θ")
      theta = init_theta(spec, options)
    if lam is None:
      if spec is None or weights is None:
        raise ValueError("cavp init needs lam=, or cavp(..., spec=, weights=) for the default λ")
      lam = penalty_weights(spec, weights, structures=options.structures, reference=reference)
    alive = jax.tree.map(lambda t: jnp.ones(jnp.shape(t), bool), theta) if alive is None else alive
    theta = project(theta, alive, options)
    theta_opt = theta_optimizer.init(theta) if persist else ()
    return CavpState(params, {} if batch_stats is None else batch_stats, theta, alive, lam,
                     jnp.full((), jnp.nan, jnp.float32), jnp.zeros((), jnp.int32), theta_opt)

  def client_update(state: CavpState, data: ClientData, info: ClientInfo,
                    key: PRNGKey) -> ClientOutput:
    local, metrics = local_train(state.params, state.batch_stats, state.theta, state.alive,
                                 state.lam, state.baseline, data, key,
                                 theta_opt_state=state.theta_opt if persist else None,
                                 weight_lr_scale=(None if weight_lr_scale is None else
                                                  jnp.asarray(weight_lr_scale(state.round_idx),
                                                              jnp.float32)))
    weight = jnp.ones((), jnp.float32) if uniform_weights else info.num_examples.astype(jnp.float32)
    scale = lambda t: tree_lib.scale(t, weight)
    baseline = jnp.where(jnp.isnan(local.baseline), 0.0, local.baseline) * weight
    # Integer leaves (a step count) are averaged as floats and rounded back on the server.
    theta_opt = (jax.tree.map(lambda a: a.astype(jnp.float32) * weight, local.theta_opt)
                 if persist else ())
    return ClientOutput(CavpSums(scale(local.params), scale(local.batch_stats), scale(local.theta),
                                 baseline, weight, jnp.ones((), jnp.float32), metrics, theta_opt))

  def server_update(state: CavpState, outputs: ClientOutput, key: PRNGKey):
    del key
    sums: CavpSums = outputs.sums
    has_weight = sums.weight > 0
    inv = jnp.where(has_weight, 1.0 / jnp.where(has_weight, sums.weight, 1.0), 0.0)
    mean = lambda s, old: jax.tree.map(lambda a, b: jnp.where(has_weight, a * inv, b), s, old)
    params = mean(sums.params, state.params)
    batch_stats = mean(sums.batch_stats, state.batch_stats)
    theta = project(mean(sums.theta, state.theta), state.alive, options)
    theta, alive = prune(theta, state.alive, options)
    baseline = jnp.where(has_weight, sums.baseline * inv, state.baseline)
    theta_opt = jax.tree.map(
        lambda a, old: jnp.where(has_weight, _cast_like(a * inv, old), old),
        sums.theta_opt, state.theta_opt)
    metrics = {
        **round_train_metrics(sums.metrics, sums.num_clients),
        'penalty': penalty(theta, alive, state.lam, params, options),
        'finite': tree_lib.all_finite(params) & tree_lib.all_finite(theta) & jnp.isfinite(sums.metrics.loss_sum),
        **gate_stats(theta, alive, options),
    }
    return CavpState(params, batch_stats, theta, alive, state.lam, baseline,
                     state.round_idx + 1, theta_opt), metrics

  alg = FedAlgorithm(init, client_update, server_update)
  if aggregator is None:
    return alg
  return federated.with_aggregator(alg, aggregator, federated.weighted_view("params"))


def _cast_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """`x` in `like`'s dtype; rounded to the nearest integer for integer dtypes."""
  if jnp.issubdtype(like.dtype, jnp.integer):
    return jnp.round(x).astype(like.dtype)
  return x.astype(like.dtype)


# ----------------------------------------------------------------------------
# Structural rebuild (host side, between rounds; never jitted).


class Rebuilt(NamedTuple):
  """What a rebuild removed."""
  units_removed: int
  blocks_removed: tuple[str, ...]


def _removal_plan(alive: Gates) -> tuple[dict, int, list]:
  """(keep, units_removed, drop) of host gate tree `alive`: the unit keep-masks of the
  leaves that lose units ({name: mask} for a leaf entry, {name: {kind: mask}} for a
  block's 'unit' / 'heads' / 'ffn'), how many units go, and the blocks whose layer gate
  is off."""
  keep, units_removed, drop = {}, 0, []
  for name, entry in alive.items():
    if isinstance(entry, dict):
      if 'layer' in entry and not entry['layer']:
        drop.append(name)
        continue  # its units go with the block
      cut = {kind: a for kind, a in entry.items() if kind != 'layer' and not a.all()}
      if cut:
        keep[name] = cut
        units_removed += sum(int((~a).sum()) for a in cut.values())
    elif not entry.all():
      keep[name] = entry
      units_removed += int((~entry).sum())
  return keep, units_removed, drop


def _block_renames(spec, drop: list) -> tuple[dict, list]:
  """(renames, block names) of deleting the blocks `drop` of `spec` (ResNet or transformer):
  the survivors renumbered as the surgery renumbers them."""
  if isinstance(spec, models.TransformerSpec):
    return (_text_shrink._renames(spec, set(drop)),
            [f'block_{l}' for l in range(len(spec.blocks))])
  return _drop_blocks.drop_blocks_spec(spec, drop)[1], [row[0] for row in spec.blocks()]


def _gate_tree_surgery(spec, keep: dict, drop: list) -> Callable[[Gates], Gates]:
  """`fn(gate_tree) -> gate_tree` sliced to the units in `keep` and without the blocks in
  `drop`, the survivors renamed as the surgery renames them (`spec`: before)."""
  renames, names = _block_renames(spec, drop) if drop else ({}, [])

  def fn(tree):
    out = {}
    for name, entry in tree.items():
      if name not in keep:
        out[name] = entry
      elif isinstance(entry, dict):
        out[name] = {kind: np.asarray(v)[keep[name][kind]] if kind in keep[name] else v
                     for kind, v in entry.items()}
      else:
        out[name] = np.asarray(entry)[keep[name]]
    return _drop_blocks.rename_blocks(out, renames, names) if drop else out

  return fn


def _text_groups(keep: dict) -> dict:
  """`keep` of `_removal_plan` as `structured.text_shrink`'s groups: 'lstm_{l}',
  'block_{l}/attn' (heads), 'block_{l}/ffn'."""
  groups = {}
  for name, cut in keep.items():
    if isinstance(cut, dict):
      groups.update({f"{name}/{'attn' if kind == 'heads' else kind}": mask
                     for kind, mask in cut.items()})
    else:
      groups[name] = cut
  return groups


def remove_pruned(spec, params: Params, batch_stats: BatchStats, theta: Gates, alive: Gates
                  ) -> tuple[Any, Params, BatchStats, Gates, Gates, Rebuilt]:
  """Physically removes every pruned structure (alive False).

  The returned model computes exactly what the gated model computes with the
  pruned gates at 0 (and the other gates unchanged): removed units contributed
  0 to their consumer, removed identity blocks (ResNet, transformer) are the
  identity. Text models go through `structured.text_shrink`.

  Returns:
    (spec, params, batch_stats, theta, alive, Rebuilt) with the gate trees
    sliced/renamed to the new spec.
  """
  theta = jax.tree.map(np.asarray, jax.device_get(theta))
  alive = jax.tree.map(lambda a: np.asarray(a, bool), jax.device_get(alive))
  params = jax.device_get(params)
  batch_stats = jax.device_get(batch_stats)
  keep, units_removed, drop = _removal_plan(alive)
  surgery = _gate_tree_surgery(spec, keep, drop)
  theta, alive = surgery(theta), surgery(alive)
  if isinstance(spec, models.TEXT_SPECS):
    if keep or drop:  # units, heads, FFN units and whole blocks in one surgery
      shrunk = structured.text_shrink(spec, params, _text_groups(keep), drop_blocks=drop)
      spec, params = shrunk.spec, shrunk.params
    to_jnp = lambda tree: jax.tree.map(jnp.asarray, tree)
    return (spec, to_jnp(params), batch_stats, to_jnp(theta), to_jnp(alive),
            Rebuilt(units_removed, tuple(drop)))
  if keep:
    # Channel surgery of the library: a ConvNet filter group is named by its
    # conv, a ResNet block's inner width by its conv1.
    producer = lambda name: name if isinstance(spec, models.ConvNetSpec) else f'{name}/conv1'
    unit = lambda k: k['unit'] if isinstance(k, dict) else k
    shrunk = structured.shrink(spec, params, {producer(n): unit(k) for n, k in keep.items()},
                               batch_stats=batch_stats)
    spec, params, batch_stats = shrunk.spec, shrunk.params, shrunk.batch_stats
  if drop:
    names = [row[0] for row in spec.blocks()]
    spec, renames = _drop_blocks.drop_blocks_spec(spec, drop)
    rename = lambda tree: _drop_blocks.rename_blocks(tree, renames, names)
    params, batch_stats = rename(params), rename(batch_stats)
  to_jnp = lambda tree: jax.tree.map(jnp.asarray, tree)
  return (spec, to_jnp(params), to_jnp(batch_stats), to_jnp(theta), to_jnp(alive),
          Rebuilt(units_removed, tuple(drop)))


def slice_gate_trees(trees: Any, theta: Gates, alive: Gates, spec) -> Any:
  """`trees` (e.g. an optax state over θ) as `remove_pruned` leaves θ: every subtree with
  θ's tree structure (θ-shaped leaves: moments) is sliced/renamed like θ, every other
  leaf (a step count) is kept.

  Args:
    trees: a pytree.
    theta, alive: the gate trees `remove_pruned` is given.
    spec: the spec `remove_pruned` is given (before removal).
  """
  treedef = jax.tree.structure(theta)
  alive = jax.tree.map(lambda a: np.asarray(a, bool), jax.device_get(alive))
  keep, _, drop = _removal_plan(alive)
  surgery = _gate_tree_surgery(spec, keep, drop)
  is_gate_tree = lambda node: isinstance(node, dict) and jax.tree.structure(node) == treedef
  return jax.tree.map(lambda node: jax.tree.map(jnp.asarray, surgery(jax.device_get(node)))
                      if is_gate_tree(node) else node, trees, is_leaf=is_gate_tree)


def slice_params_trees(trees: Any, spec, alive: Gates) -> Any:
  """`trees` (e.g. `CavpState.aggregator`: error-feedback residuals stacked
  [num_clients, ...]) as `remove_pruned` leaves the params: every subtree with the params'
  tree structure (leading axes allowed) is sliced and its blocks renamed / removed like
  the params; every other leaf (a clip norm) is kept.

  Args:
    trees: a pytree.
    spec: the spec `remove_pruned` is given (before removal).
    alive: the gate tree `remove_pruned` is given.
  """
  alive = jax.tree.map(lambda a: np.asarray(a, bool), jax.device_get(alive))
  keep, _, drop = _removal_plan(alive)
  if not keep and not drop:
    return trees
  if isinstance(spec, models.TEXT_SPECS):  # units, heads, FFN units and blocks at once
    return structured.text_slice_like(trees, spec, _text_groups(keep), drop_blocks=drop)
  if keep:  # as `remove_pruned`'s channel surgery
    producer = lambda name: name if isinstance(spec, models.ConvNetSpec) else f'{name}/conv1'
    unit = lambda k: k['unit'] if isinstance(k, dict) else k
    trees = structured.slice_like(trees, spec, {producer(n): unit(k) for n, k in keep.items()})
  if drop:
    renames, names = _block_renames(spec, drop)
    structure = jax.tree.structure(models.param_shapes(spec)[0])  # slicing keeps the keys
    is_params = lambda node: isinstance(node, dict) and jax.tree.structure(node) == structure
    trees = jax.tree.map(lambda node: _drop_blocks.rename_blocks(node, renames, names)
                         if is_params(node) else node, trees, is_leaf=is_params)
  return trees


def rebuild(spec, state: CavpState, weights: CostWeights, options: Options = Options(), *,
            reference: tuple[int, int], bn_flops_per_element: int = 0,
            include_softmax: bool = True) -> tuple[Any, CavpState, Rebuilt]:
  """Removes the pruned structures of `state` and recomputes λ for the new spec.

  Args:
    spec: current spec.
    state: server state of `cavp`.
    weights: the three user parameters.
    options: as given to `cavp`.
    reference: (FLOPs, params) of the ORIGINAL model (keeps γ's meaning).

  Returns:
    (new_spec, new_state, Rebuilt). Rebuild the apply function and the round
    for new_spec (shapes changed: one re-jit). A persistent θ optimizer state
    (`state.theta_opt`) is sliced like θ (`slice_gate_trees`), the aggregator's state
    (`state.aggregator`: each client's error-feedback residual) like the params
    (`slice_params_trees`): a residual row keeps its values on the surviving weights.
  """
  new_spec, params, stats, theta, alive, report = remove_pruned(
      spec, state.params, state.batch_stats, state.theta, state.alive)
  if not report.units_removed and not report.blocks_removed:
    return spec, state, report
  lam = penalty_weights(new_spec, weights, structures=options.structures, reference=reference,
                        bn_flops_per_element=bn_flops_per_element, include_softmax=include_softmax,
                        allow_empty=True)
  theta_opt = slice_gate_trees(state.theta_opt, state.theta, state.alive, spec)
  aggregator = slice_params_trees(state.aggregator, spec, state.alive)
  return new_spec, state._replace(params=params, batch_stats=stats, theta=theta, alive=alive,
                                  lam=lam, theta_opt=theta_opt, aggregator=aggregator), report


def finalize(spec, state: CavpState, options: Options = Options()
             ) -> tuple[Any, Params, BatchStats, Rebuilt]:
  """The final deterministic network: keep θ >= final_threshold (θ := 1), remove the rest.

  Returns:
    (spec, params, batch_stats, Rebuilt): an ungated model equal to the gated
    one with `deterministic_gates(theta, alive, options.final_threshold)`
    (up to the one unit per layer that `prune` always keeps).
  """
  theta, alive = prune(state.theta, state.alive, options,
                       threshold=math.nextafter(options.final_threshold, 0.0))
  new_spec, params, stats, _, _, report = remove_pruned(spec, state.params, state.batch_stats,
                                                        theta, alive)
  return new_spec, params, stats, report


def recalibrate_batch_stats(apply_fn: Callable, params: Params, batch_stats: BatchStats,
                            x: jax.Array, *, gates: Optional[Gates] = None, batch_size: int = 256,
                            num_steps: int = 100, transform: Optional[Callable] = None,
                            key: Optional[PRNGKey] = None) -> BatchStats:
  """BatchNorm running statistics re-estimated on inputs `x` [N, ...] (params unchanged).

  During training the statistics were collected with units on only with probability θ;
  the deterministic network (every gate with θ >= final_threshold fully on, `finalize`)
  sees other activations. `num_steps` train-mode forward passes over batches of `x`
  (cycled) move the momentum averages to the new distribution: the old values keep a
  weight of BN_MOMENTUM ** num_steps (0.9 ** 100 ~ 3e-5).

  Args:
    apply_fn: the model's apply (with `gates=` when `gates` is given).
    params, batch_stats: the model.
    x: [N, ...] training inputs (on the server: a sample the clients' statistics stand for).
    gates: optional gate values (e.g. `deterministic_gates`); None = ungated.
    batch_size: examples per pass (<= N).
    num_steps: passes.
    transform: optional per-pass augmentation `(x_batch, key) -> x_batch` (the training
      transform: statistics of the inputs the network was trained on); pass i uses
      `fold_in(key, i)`. None: the inputs as given.
    key: the transform's key (required with `transform`).

  Returns:
    The recalibrated batch statistics ({} when the model has none).
  """
  if not jax.tree.leaves(batch_stats):
    return batch_stats
  x = jnp.asarray(x)
  size = min(int(batch_size), x.shape[0])
  num_batches = x.shape[0] // size
  batches = x[:num_batches * size].reshape((num_batches, size) + x.shape[1:])
  extra = {} if gates is None else {"gates": gates}
  if transform is not None and key is None:
    raise ValueError("recalibrate_batch_stats(transform=...) needs key=")

  @jax.jit
  def run(stats):
    def step(stats, i):
      xb = batches[i % num_batches]
      if transform is not None:
        xb = transform(xb, jax.random.fold_in(key, i))
      return apply_fn(params, stats, xb, train=True, **extra)[1], None
    return jax.lax.scan(step, stats, jnp.arange(num_steps))[0]

  return run(batch_stats)


class FineTune(NamedTuple):
  """A short fine-tune of the finalised (fixed-gate, physically pruned) network.

  Attributes:
    num_steps: SGD steps (0 = off).
    learning_rate: SGD learning rate, > 0.
    momentum: SGD momentum in [0, 1) (0 = plain SGD).
    batch_size: examples per step.
  """
  num_steps: int = 0
  learning_rate: float = 0.01
  momentum: float = 0.9
  batch_size: int = 128


def _check_finetune(config: FineTune) -> None:
  if int(config.num_steps) != config.num_steps or config.num_steps < 0:
    raise ValueError(f'FineTune.num_steps must be an integer >= 0, got {config.num_steps!r}')
  if not config.learning_rate > 0:
    raise ValueError(f'FineTune.learning_rate must be > 0, got {config.learning_rate!r}')
  if not 0.0 <= config.momentum < 1.0:
    raise ValueError(f'FineTune.momentum must be in [0, 1), got {config.momentum!r}')
  if int(config.batch_size) != config.batch_size or config.batch_size < 1:
    raise ValueError(f'FineTune.batch_size must be an integer >= 1, got {config.batch_size!r}')


def finetune(apply_fn: Callable, params: Params, batch_stats: BatchStats, x: jax.Array,
             y: jax.Array, key: PRNGKey, config: FineTune, *,
             loss_fn: Callable = softmax_cross_entropy,
             train_transform: Optional[Callable] = None) -> tuple[Params, BatchStats]:
  """`config.num_steps` SGD steps on (x, y) [N, ...], [N]: the library's local training
  (`federated.make_local_train`: batches from reshuffled epochs, BatchNorm statistics
  updated in train mode) of one client holding the data.

  Used on the finalised network (`finalize`: every kept gate fixed at 1, the rest
  removed), whose weights were trained under stochastic gates.

  Args:
    apply_fn: the (ungated) model's apply.
    params, batch_stats: the model.
    x, y: training inputs [N, ...] and integer labels [N].
    key: PRNG key (batch order, augmentation).
    config: steps, learning rate, momentum, batch size (`FineTune`).
    loss_fn: per-example loss `(logits [B, K], y [B]) -> [B]`.
    train_transform: per-batch augmentation `(x, key) -> x`.

  Returns:
    (params, batch_stats); the inputs themselves when `config.num_steps` is 0.
  """
  _check_finetune(config)
  if config.num_steps == 0:
    return params, batch_stats
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.shape[0] != y.shape[0] or x.shape[0] == 0:
    raise ValueError(f'finetune needs as many labels as inputs (> 0), got x {x.shape} and '
                     f'y {y.shape}')
  optimizer = optax.sgd(config.learning_rate, momentum=config.momentum or None)
  schedule = LocalSchedule(batch_size=min(int(config.batch_size), x.shape[0]),
                           num_steps=int(config.num_steps))
  local_train = federated.make_local_train(apply_fn, optimizer, schedule, loss_fn=loss_fn,
                                           train_transform=train_transform)
  data = ClientData(x, y, jnp.asarray(x.shape[0], jnp.int32))
  state, _ = jax.jit(local_train)(params, batch_stats, data, key)
  return state.params, state.batch_stats


def gated_apply(apply_fn: Callable) -> Callable:
  """`apply_fn` taking `(params, gates)` as its params, so that one compiled evaluation
  serves every gate value."""

  def fn(params_and_gates, batch_stats, x, *, train, example_mask=None):
    params, gates = params_and_gates
    return apply_fn(params, batch_stats, x, train=train, example_mask=example_mask, gates=gates)

  return fn


def _text_widths(prefix: str, spec) -> dict:
  """A text model's prunable widths for the summary ({} for the CNNs): LSTM hidden
  widths, or every transformer block's (num_heads, head_dim, ffn_width)."""
  if isinstance(spec, models.LSTMSpec):
    return {f"{prefix}_hidden": list(spec.hidden)}
  if isinstance(spec, models.TransformerSpec):
    return {f"{prefix}_blocks": [list(b) for b in spec.blocks]}
  return {}


def cavp_method(*, spec, params: Params, batch_stats: BatchStats, key: PRNGKey,
                model: federated.ModelFns, weight_optimizer: optax.GradientTransformation,
                theta_optimizer: optax.GradientTransformation, schedule: federated.LocalSchedule,
                options: Options, weights: CostWeights, rebuild_every: int, num_rounds: int,
                recalibration_x: Optional[jax.Array] = None,
                recalibrate_after_rebuild: bool = False, recalibration_steps: int = 100,
                fine_tune: FineTune = FineTune(),
                finetune_data: Optional[tuple[jax.Array, jax.Array]] = None,
                train_transform: Optional[Callable] = None,
                log: Callable[[str], None] = federated.no_log,
                aggregator: Optional[federated.Aggregator] = None,
                weight_lr_scale: Optional[optax.Schedule] = None,
                recalibration_augment: bool = False) -> federated.Method:
  """Complexity-aware training end to end: the joint (W, theta) rounds, a physical rebuild
  without the pruned units/blocks every `rebuild_every` rounds, and the deterministic
  network (theta >= `options.final_threshold`) built and evaluated at the end.

  Args:
    spec, params, batch_stats: the dense starting model (a ConvNetSpec, ResNetSpec,
      LSTMSpec or TransformerSpec; text models have no batch_stats: pass {}).
    key: the init key.
    model: apply function and evaluation per architecture (the apply function must take
      `gates=`, as `models.make_apply`'s does).
    weight_optimizer, theta_optimizer, schedule, options: as `cavp`.
    weights: the cost weights (gamma, alpha, beta) of `penalty_weights`.
    rebuild_every: rounds between rebuilds (none after the last round).
    num_rounds: the run's rounds.
    recalibration_x: optional [N, ...] training inputs: the finalised network's BatchNorm
      statistics are re-estimated on them before it is evaluated
      (`recalibrate_batch_stats`; the summary keeps `eval_before_bn_recalibration`). In the
      federated mode this pooled sample stands for statistics the clients would compute.
    recalibrate_after_rebuild: also re-estimate the server's statistics on
      `recalibration_x` at every rebuild point (every `rebuild_every` rounds, whether or
      not it removed something), for the deterministic network the evaluation runs
      (θ >= final_threshold on); the next round trains from them.
    recalibration_steps: forward passes of each recalibration (`recalibrate_batch_stats`).
    recalibration_augment: recalibrate on `train_transform`ed inputs (the distribution the
      statistics were trained on) instead of the raw `recalibration_x`; the
      recalibration after round r draws from `fold_in(fold_in(key, num_rounds + 1), r)`.
    fine_tune: an optional fine-tune of the finalised network (`FineTune`, `finetune`)
      on `finetune_data` = (x [N, ...], y [N]) before its final recalibration and
      evaluation (the summary keeps `eval_before_finetune` and `finetune_steps`); its
      key is `fold_in(key, num_rounds)`. Extra training steps: a comparison must count them.
    train_transform: per-batch augmentation `(x, key) -> x` of the rounds and the fine-tune.
    log: receives one line per rebuild that removes something.
    aggregator: `cavp`'s (robust, DP, compressed aggregation of the weights; its state is
      part of the server state: checkpointed, sliced at every rebuild).
    weight_lr_scale: `cavp`'s round schedule of the weights' learning rate (e.g.
      `optax.cosine_decay_schedule(1.0, num_rounds)`); the round index carries across
      rebuilds; the fine-tune keeps its own learning rate.

  Raises:
    ValueError: recalibrate_after_rebuild without recalibration_x, recalibration_augment
      without train_transform, a fine-tune without finetune_data, or a bad
      `fine_tune`/`recalibration_steps`.

  Returns:
    The `Method`. Records: the current model's `params` and `flops`; evaluation uses the
    deterministic gates (theta >= final_threshold, alive). Summary: the finalised
    network's size and evaluation (`gated_eval_before_finalize` keeps the gated one),
    gate statistics, widths and the rebuild history.
  """
  _check_finetune(fine_tune)
  if recalibrate_after_rebuild and recalibration_x is None:
    raise ValueError("recalibrate_after_rebuild=True needs recalibration_x (training inputs)")
  if fine_tune.num_steps and finetune_data is None:
    raise ValueError(f"fine_tune.num_steps={fine_tune.num_steps} needs finetune_data=(x, y)")
  if int(recalibration_steps) != recalibration_steps or recalibration_steps < 1:
    raise ValueError(f"recalibration_steps must be an integer >= 1, got {recalibration_steps!r}")
  reference = (accounting.flops(spec), accounting.param_count(spec))
  original_spec = spec
  if recalibration_augment and train_transform is None:
    raise ValueError("recalibration_augment=True needs train_transform (the augmentation)")

  def recalibrate(apply_fn, params, stats, *, round_idx, **kw):
    """The BN recalibration at the end of round `round_idx` (num_rounds: the final one)."""
    extra = {}
    if recalibration_augment:
      extra = dict(transform=train_transform,
                   key=jax.random.fold_in(jax.random.fold_in(key, num_rounds + 1), round_idx))
    return recalibrate_batch_stats(apply_fn, params, stats, recalibration_x,
                                   num_steps=recalibration_steps, **extra, **kw)

  def algorithm(spec):
    return cavp(model.apply_for(spec), weight_optimizer, theta_optimizer, schedule, options,
                train_transform=train_transform, spec=spec, weights=weights, reference=reference,
                aggregator=aggregator, weight_lr_scale=weight_lr_scale)

  def init():
    server = algorithm(spec).init(params, key, batch_stats)
    return federated.MethodState(server, spec, {"rebuilds": []})

  def after_round(state, round_idx, metrics):
    del metrics
    if (round_idx + 1) % rebuild_every or round_idx + 1 >= num_rounds:
      return state
    new_spec, server, report = rebuild(state.spec, state.server, weights, options,
                                       reference=reference)
    if recalibrate_after_rebuild:  # the statistics of the network the evaluation runs
      gates = deterministic_gates(server.theta, server.alive, options.final_threshold)
      server = server._replace(batch_stats=recalibrate(
          model.apply_for(new_spec), server.params, server.batch_stats, gates=gates,
          round_idx=round_idx + 1))
    state = state._replace(server=server)
    if new_spec == state.spec:
      return state
    log(f"round {round_idx + 1}: removed {report.units_removed} units, blocks "
        f"{list(report.blocks_removed)} -> {accounting.param_count(new_spec):,} params")
    rebuilds = state.host["rebuilds"] + [{"round": round_idx + 1,
                                          "units_removed": report.units_removed,
                                          "blocks_removed": list(report.blocks_removed)}]
    return state._replace(spec=new_spec, host={**state.host, "rebuilds": rebuilds})

  sizes = {}  # spec -> (params, FLOPs): the spec changes only at rebuilds

  def record(before, after, round_idx, metrics):
    del before, round_idx, metrics
    if after.spec not in sizes:
      sizes[after.spec] = (accounting.param_count(after.spec), accounting.flops(after.spec))
    return dict(zip(("params", "flops"), sizes[after.spec]))

  def evaluator(spec):
    evaluate = model.evaluate_with(gated_apply(model.apply_for(spec)))

    def deterministic_eval(state, round_idx):
      del round_idx
      s = state.server
      gates = deterministic_gates(s.theta, s.alive, options.final_threshold)
      return evaluate((s.params, gates), s.batch_stats)

    return deterministic_eval

  def template(initial, spec, host):
    """Shapes of the CavpState of the architecture `spec`."""
    del initial, host
    gates = gate_template(spec, options.structures, allow_empty=True)
    shapes = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32), gates,
                          is_leaf=lambda x: isinstance(x, tuple))
    p, b = jax.eval_shape(lambda: models.init_params(spec, jax.random.key(0)))
    return jax.eval_shape(
        lambda p, b, t: algorithm(spec).init(p, jax.random.key(0), b, theta=t, lam=t), p, b, shapes)

  def summary(state, last_eval):
    """The deterministic network (theta >= final_threshold kept), built and evaluated ungated."""
    final_gates = jax.device_get(gate_stats(state.server.theta, state.server.alive, options))
    final_spec, final_params, final_stats, _ = finalize(state.spec, state.server, options)
    final_apply = model.apply_for(final_spec)
    evaluate = model.evaluate_with(final_apply)
    recalibrated = {}
    if recalibration_x is not None:  # BN statistics of the deterministic network
      recalibrated = {"eval_before_bn_recalibration": evaluate(final_params, final_stats)}
      final_stats = recalibrate(final_apply, final_params, final_stats, round_idx=num_rounds)
    if fine_tune.num_steps:
      recalibrated.update(eval_before_finetune=evaluate(final_params, final_stats),
                          finetune_steps=int(fine_tune.num_steps))
      final_params, final_stats = finetune(
          final_apply, final_params, final_stats, *finetune_data,
          jax.random.fold_in(key, num_rounds), fine_tune, train_transform=train_transform)
      if recalibration_x is not None:  # the fine-tune moved the weights
        final_stats = recalibrate(final_apply, final_params, final_stats,
                                  round_idx=num_rounds + 1)
    final_eval = evaluate(final_params, final_stats)
    count, final_flops = accounting.param_count(final_spec), accounting.flops(final_spec)
    return {
        "structures": options.structures,
        "params_initial": reference[1], "flops_initial": reference[0],
        "params": count, "flops": final_flops,
        "params_reduction": 1.0 - count / reference[1],
        "flops_reduction": 1.0 - final_flops / reference[0],
        "gated_eval_before_finalize": last_eval,
        **{f"gates_{k}": float(v) for k, v in final_gates.items()},
        "final_inner_widths": [list(w) for w in getattr(final_spec, "inner_widths", ())],
        "original_inner_widths": [list(w) for w in getattr(original_spec, "inner_widths", ())],
        **_text_widths("final", final_spec), **_text_widths("original", original_spec),
        "final_spec": repr(final_spec), "rebuilds": state.host["rebuilds"],
        "bn_recalibrated": recalibration_x is not None, **recalibrated, **final_eval}

  return federated.Method(init=init, algorithm=algorithm, evaluator=evaluator,
                          after_round=after_round, record=record, summary=summary,
                          template=template)
