"""Mixed precision (`models.make_apply(..., compute_dtype=jnp.bfloat16)`).

The GEMMs and convolutions must really run in bf16 (checked on the jaxpr: a cast
that promoted back to float32 would pass a closeness test and buy nothing), while
logits, gradients, BatchNorm statistics and parameters stay float32, the values
stay close to float32, and FedAvg still learns.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import federated, models
from fedjax_prune.data import from_client_lists, to_device

CONVNET = models.ConvNetSpec(input_shape=(8, 8, 1), convs=(models.ConvSpec(features=4, pool=2),),
                             hidden=(16,), num_classes=5)
RESNET = models.cifar_resnet(depth=8, num_classes=3, width_multiplier=0.25)
MLP = models.mlp(input_shape=(10,), hidden=(16,), num_classes=4)
GEMMS = ("dot_general", "conv_general_dilated")


def _gemm_input_dtypes(jaxpr) -> set[str]:
  """dtypes of the operands of every matmul/convolution in `jaxpr`, sub-jaxprs included."""
  out = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in GEMMS:
      out |= {str(v.aval.dtype) for v in eqn.invars}
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out |= _gemm_input_dtypes(inner)
  return out


def _loss_and_grads(apply_fn, params, stats, x):
  def loss(p):
    logits, new_stats = apply_fn(p, stats, x, train=True)
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), (logits, new_stats)
  return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("spec", [MLP, CONVNET, RESNET], ids=["mlp", "convnet", "resnet"])
@pytest.mark.parametrize("conv_impl", ["lax", "im2col", "tapgrad"])
def test_bf16_compute_runs_every_gemm_in_bf16_and_keeps_float32_outside(spec, conv_impl):
  apply32, params, stats = models.build(spec, jax.random.key(0), conv_impl=conv_impl)
  apply16 = models.make_apply(spec, conv_impl=conv_impl, compute_dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (6,) + tuple(spec.input_shape))

  grad_jaxpr = jax.make_jaxpr(lambda p: _loss_and_grads(apply16, p, stats, x))(params).jaxpr
  assert _gemm_input_dtypes(grad_jaxpr) == {"bfloat16"}  # forward and backward
  grad_jaxpr32 = jax.make_jaxpr(lambda p: _loss_and_grads(apply32, p, stats, x))(params).jaxpr
  assert _gemm_input_dtypes(grad_jaxpr32) == {"float32"}

  # Jitted: op-by-op dispatch compiles every primitive of the ResNet on its own (slow).
  values = jax.jit(_loss_and_grads, static_argnums=0)
  (loss16, (logits16, stats16)), grads16 = values(apply16, params, stats, x)
  (loss32, (logits32, stats32)), grads32 = values(apply32, params, stats, x)
  assert logits16.dtype == jnp.float32
  for tree16, tree32 in ((grads16, grads32), (stats16, stats32)):
    assert jax.tree.structure(tree16) == jax.tree.structure(tree32)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(tree16))
  # bf16 keeps 8 mantissa bits: logits within ~1 %, the loss within ~1 %.
  np.testing.assert_allclose(logits16, logits32, rtol=0.05, atol=0.03)
  assert abs(float(loss16) - float(loss32)) < 0.02 * abs(float(loss32)) + 1e-3
  # BatchNorm running statistics come from float32 moments of bf16 activations.
  for a, b in zip(jax.tree.leaves(stats16), jax.tree.leaves(stats32)):
    np.testing.assert_allclose(a, b, rtol=0.03, atol=0.01)


def test_early_exit_resnet_bf16_runs_every_gemm_in_bf16():
  spec = models.resnet18(width_multiplier=1 / 16, norm="batch_static", input_shape=(8, 8, 3))
  apply32, params, stats = models.build_early_exit(spec, (1, 2, 3), jax.random.key(0))
  apply16 = models.make_early_exit_apply(spec, (1, 2, 3), compute_dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  loss = lambda apply: lambda p: jnp.mean(apply(p, stats, x, train=True)[0] ** 2)
  assert _gemm_input_dtypes(jax.make_jaxpr(jax.grad(loss(apply16)))(params).jaxpr) == {"bfloat16"}
  # Jitted: op-by-op dispatch compiles every primitive of the ResNet-18 on its own (slow).
  logits = jax.jit(lambda apply, p, xs: apply(p, stats, xs, train=True)[0], static_argnums=0)
  logits16, logits32 = logits(apply16, params, x), logits(apply32, params, x)
  assert logits16.dtype == jnp.float32 and logits16.shape == logits32.shape == (4, 4, 10)
  # This 4-channel, 18-layer net with BatchNorm on 4 examples is sensitive: rounding only
  # its float32 inputs and weights to bf16 moves its logits ~2 %. bf16 compute must stay
  # within twice that, and differ from float32 at all (the jaxpr check above covers the dtypes).
  rounded = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), t)
  logits_rounded = logits(apply32, rounded(params), rounded(x))
  rel = lambda a: float(jnp.linalg.norm(a - logits32) / jnp.linalg.norm(logits32))
  assert 0 < rel(logits16) < 2 * rel(logits_rounded)
  grads = jax.jit(jax.grad(loss(apply16)))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_float32_compute_dtype_is_the_default_model_bit_for_bit():
  apply_default, params, stats = models.build(RESNET, jax.random.key(0))
  apply32 = models.make_apply(RESNET, compute_dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(1), (4,) + tuple(RESNET.input_shape))
  a = apply_default(params, stats, x, train=True)
  b = apply32(params, stats, x, train=True)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)


def test_bf16_fedavg_learns_like_float32():
  """Ten FedAvg rounds of a small ConvNet on separable data: bf16 compute reaches the
  float32 run's loss (both far below the starting loss)."""
  rng = np.random.default_rng(0)
  templates = rng.normal(size=(CONVNET.num_classes,) + tuple(CONVNET.input_shape)).astype(np.float32)
  ys = [rng.integers(0, CONVNET.num_classes, 24).astype(np.int32) for _ in range(4)]
  xs = [templates[y] + 0.3 * rng.normal(size=(24,) + templates.shape[1:]).astype(np.float32)
        for y in ys]
  data = to_device(from_client_lists(xs, ys))
  cohort = federated.make_cohort(np.arange(4))

  def train(compute_dtype):
    apply_fn, params, stats = models.build(CONVNET, jax.random.key(0), conv_impl="im2col",
                                           compute_dtype=compute_dtype)
    alg = federated.fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=8))
    state = alg.init(params, jax.random.key(1), batch_stats=stats)
    round_fn = federated.make_round(alg)
    losses = []
    for r in range(10):
      state, metrics = round_fn(state, data, cohort, jax.random.key(r))
      losses.append(float(metrics["train_loss"]))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.params))
    return losses

  losses32, losses16 = train(None), train(jnp.bfloat16)
  assert losses32[-1] < 0.25 * losses32[0]
  assert losses16[-1] < 0.25 * losses16[0]
  assert abs(losses16[-1] - losses32[-1]) < 0.1 * losses32[0]


def test_compute_dtype_must_be_floating():
  with pytest.raises(ValueError, match="compute_dtype must be a floating dtype"):
    models.make_apply(MLP, compute_dtype=jnp.int32)
