"""Config -> objects. Strings from configs stop here; the library takes typed arguments.

Every value is validated before anything is built or written, with an error
that names the field and its allowed range.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_prune import data as data_lib
from fedjax_prune import federated, models, performance

MODELS = ("mlp", "leaf_femnist_cnn", "asp_femnist_cnn", "asp_celeba_cnn", "vgg11", "resnet18",
          "resnet20", "resnet56", "asp_resnet", "asp_inception",
          "shakespeare_lstm", "shakespeare_transformer")
DATASETS = ("synthetic", "femnist_leaf", "cifar10_pfllib", "shakespeare", "synthetic_text")
# Next-token models (token ids in, next-token logits out) and the datasets that feed them.
TEXT_MODELS = ("shakespeare_lstm", "shakespeare_transformer")
TEXT_DATASETS = ("shakespeare", "synthetic_text")
ALGORITHMS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedprox")
OPTIMIZERS = ("sgd", "adam")
NORMS = ("none", "batch_running", "batch_static")


class ConfigError(ValueError):
  """A config value is out of its allowed range (the message names the field)."""


def _get(config, path: str):
  node = config
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"config field {path!r} is missing")
    node = node[part]
  return node


def _require(ok: bool, path: str, value, allowed: str):
  if not ok:
    raise ConfigError(f"config.{path}={value!r} is invalid: allowed {allowed}")


def _int_in(config, path, lo, hi=None):
  v = _get(config, path)
  ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
  _require(ok, path, v, f"an integer in [{lo}, {'inf' if hi is None else hi}]")
  return int(v)


def _float_in(config, path, lo, hi=None, *, lo_open=False):
  v = _get(config, path)
  ok = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
  ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
  bracket = "(" if lo_open else "["
  _require(ok, path, v, f"a finite number in {bracket}{lo}, {'inf' if hi is None else hi}]")
  return float(v)


def _choice(config, path, choices):
  v = _get(config, path)
  _require(v in choices, path, v, f"one of {choices}")
  return v


def validate(config) -> None:
  """Checks every field used by `train_and_evaluate`; raises ConfigError naming the field."""
  for stream in ("init", "sampling", "training", "data"):
    _int_in(config, f"seeds.{stream}", 0)
  name = _choice(config, "data.name", DATASETS)
  if name == "synthetic":
    n = _int_in(config, "data.num_clients", 1)
    _int_in(config, "data.num_classes", 2)
    epc = _get(config, "data.examples_per_client")
    _require(isinstance(epc, (tuple, list)) and len(epc) == 2 and all(isinstance(e, int) for e in epc)
             and 1 <= epc[0] <= epc[1], "data.examples_per_client", epc, "a pair (lo, hi) with 1 <= lo <= hi")
    _int_in(config, "data.test_examples_per_client", 1)
    _float_in(config, "data.label_skew_alpha", 0.0, lo_open=True)
  elif name == "synthetic_text":
    n = _validate_synthetic_text(config)
  else:
    d = _get(config, "data.data_dir")
    _require(isinstance(d, str) and d != "", "data.data_dir", d,
             "a directory path, or comma-separated paths (non-empty string)")
    for part in d.split(","):
      if not os.path.isdir(part):
        raise ConfigError(f"config.data.data_dir: {part!r} is not an existing directory")
    if name == "shakespeare":
      _validate_shakespeare(config)
    n = None
  _choice(config, "model.name", MODELS)
  _validate_text_model(config)
  _choice(config, "model.norm", NORMS)
  compute_dtype(config)
  _float_in(config, "model.width_multiplier", 0.0, 1.0, lo_open=True)
  alg = _choice(config, "algorithm.name", ALGORITHMS)
  _float_in(config, "algorithm.server_learning_rate", 0.0, lo_open=True)
  _float_in(config, "algorithm.server_momentum", 0.0, 1.0)
  if alg == "fedprox":
    _float_in(config, "algorithm.prox_mu", 0.0)
  _choice(config, "client.optimizer", OPTIMIZERS)
  _float_in(config, "client.learning_rate", 0.0, lo_open=True)
  _float_in(config, "client.momentum", 0.0, 1.0)
  _int_in(config, "client.batch_size", 1)
  _int_in(config, "client.num_epochs", 1)
  _int_in(config, "client.num_steps", 0)
  _int_in(config, "rounds", 1)
  cpr = _int_in(config, "clients_per_round", 1)
  if n is not None and cpr > n:
    raise ConfigError(f"config.clients_per_round={cpr} exceeds data.num_clients={n}: allowed [1, {n}]")
  _int_in(config, "eval_every", 1)
  _int_in(config, "eval_batch_size", 1)
  validate_robust(config)
  validate_cohort_sampling(config)
  strategy = _get(config, "strategy")
  if strategy != "auto":
    try:
      named = performance.Strategy.from_name(strategy)
    except ValueError as e:
      raise ConfigError(f"config.strategy={strategy!r} is invalid: allowed 'auto' or a name like "
                        "'sequential+lax', 'vmap+im2col', 'chunked4+im2col'") from e
    if named.sharded and not config.get("shard_clients", False):
      raise ConfigError(f"config.strategy={strategy!r} shards the cohort over devices, which needs "
                        "config.shard_clients=True: set it, or drop '+sharded'")


class Data(NamedTuple):
  train: data_lib.ClientData          # device arrays
  test_clients: data_lib.ClientData   # per-client local test sets (device)
  test_x: Any                         # central test set (union of the local ones)
  test_y: Any
  test_client_ids: Any                # [M] int32: which client's test set each central row is from
  num_classes: int
  input_shape: tuple
  normalize: Callable                 # raw stored x -> float model input, inside jit
  description: str


def build_data(config) -> Data:
  name = config.data.name
  if name == "synthetic":
    train, test = data_lib.synthetic_images(
        config.data.num_clients, seed=config.seeds.data, num_classes=config.data.num_classes,
        examples_per_client=tuple(config.data.examples_per_client),
        test_examples_per_client=config.data.test_examples_per_client,
        label_skew_alpha=config.data.label_skew_alpha)
    num_classes, input_shape = config.data.num_classes, tuple(train.x.shape[2:])
    normalize = lambda x: x.astype(jnp.float32) / 255.0
    desc = f"synthetic images: {train.num_clients} clients"
  elif name == "synthetic_text":
    fd = synthetic_text(config)
    train, test, num_classes, input_shape = fd.train, fd.test, fd.num_classes, tuple(fd.input_shape)
    normalize, desc = fd.normalize_fn, fd.description
  else:
    dirs = [d for d in config.data.data_dir.split(",") if d]
    if name == "shakespeare":
      fd = load_shakespeare(config, dirs[0])
    elif name == "femnist_leaf":
      # Several LEAF source dirs are merged by writer (each writer from the first source listing it).
      fd = data_lib.load_leaf(dirs if len(dirs) > 1 else dirs[0])
    else:
      fd = data_lib.load_pfllib_npz(dirs[0])
    train, test = fd.train, fd.test
    num_classes, input_shape = fd.num_classes, tuple(fd.input_shape)
    normalize, desc = fd.normalize_fn, fd.description
  test_x, test_y, ids = central_test(test)
  return Data(data_lib.to_device(train), data_lib.to_device(test), test_x, test_y, ids,
              num_classes, input_shape, normalize, desc)


def central_test(test: data_lib.ClientData) -> tuple[Any, Any, Any]:
  """The clients' local test sets pooled into the central one, on device.

  Returns:
    (x [M, ...], y [M], client_ids [M] int32), M = the clients' examples in all; row i is
    from client `client_ids[i]` (`pool` keeps client order).
  """
  test_x, test_y = data_lib.pool(test)
  counts = np.asarray(test.num_examples)
  ids = np.repeat(np.arange(counts.shape[0], dtype=np.int32), counts)
  return jnp.asarray(test_x), jnp.asarray(test_y), jnp.asarray(ids)


def build_spec(config, input_shape, num_classes):
  m = config.model
  if m.name in TEXT_MODELS:
    return text_spec(config, input_shape, num_classes)
  if m.name == "mlp":
    return models.mlp(input_shape=input_shape, hidden=tuple(m.hidden), num_classes=num_classes)
  if m.name == "leaf_femnist_cnn":
    return models.leaf_femnist_cnn(num_classes=num_classes)
  if m.name == "asp_femnist_cnn":
    return models.asp_femnist_cnn(num_classes=num_classes)
  if m.name == "asp_celeba_cnn":
    return models.asp_celeba_cnn(num_classes=num_classes)
  if m.name == "vgg11":
    return models.vgg11(num_classes=num_classes, norm=m.norm)
  if m.name == "asp_resnet":  # the ASP paper's ResNet-style model (BN with running statistics)
    return models.asp_resnet(num_classes=num_classes, input_shape=input_shape, norm="batch_running")
  if m.name == "asp_inception":
    return models.asp_inception(num_classes=num_classes, input_shape=input_shape)
  if m.name in ("resnet20", "resnet56"):
    return models.cifar_resnet(int(m.name[len("resnet"):]), num_classes=num_classes, norm=m.norm,
                               width_multiplier=m.width_multiplier, input_shape=input_shape)
  return models.resnet18(num_classes=num_classes, norm=m.norm, width_multiplier=m.width_multiplier,
                         input_shape=tuple(input_shape))


# ----------------------------------------------------------------------------- text (issue 27)
# Data: 'shakespeare' (TFF's LEAF Shakespeare files in data.data_dir; next character after
# each 80-character window) and 'synthetic_text' (seeded, tiny: tests and smoke runs).
# Models: 'shakespeare_lstm' (LEAF's char-LSTM, widths model.hidden, model.embed_dim) and
# 'shakespeare_transformer' (model.num_layers x model.d_model, model.num_heads heads,
# FFN width model.ffn_width, 0 = 4 d_model); vocabulary and context come from the data.

# The synthetic text: this phrase repeated from a random offset per client, with a fraction
# data.noise of its characters replaced by random letters of the phrase (the next-character
# accuracy a model can reach is about 1 - noise).
SYNTHETIC_PHRASE = "to be, or not to be: that is the question. "


def _opt_int(config, path: str, default: int, lo: int) -> int:
  node, *parts = config, *path.split(".")
  for part in parts[:-1]:
    node = node[part]
  v = node.get(parts[-1], default)
  _require(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo, path, v,
           f"an integer in [{lo}, inf]")
  return int(v)


def _validate_synthetic_text(config) -> int:
  n = _int_in(config, "data.num_clients", 1)
  epc = _get(config, "data.examples_per_client")
  _require(isinstance(epc, (tuple, list)) and len(epc) == 2 and all(isinstance(e, int) for e in epc)
           and 1 <= epc[0] <= epc[1], "data.examples_per_client", epc,
           "a pair (lo, hi) of window counts with 1 <= lo <= hi")
  _int_in(config, "data.test_examples_per_client", 1)
  _int_in(config, "data.seq_len", 1)
  _float_in(config, "data.noise", 0.0, 1.0)
  return n


def _validate_shakespeare(config) -> None:
  _opt_int(config, "data.max_windows_per_client", 0, 0)
  _opt_int(config, "data.max_test_windows_per_client", 0, 0)
  _opt_int(config, "data.stride", 1, 1)


def _validate_text_model(config) -> None:
  """Text models need token data and vice versa; their width fields are checked here."""
  name, data = config.model.name, config.data.name
  if (name in TEXT_MODELS) != (data in TEXT_DATASETS):
    need = (f"token data (data.name in {TEXT_DATASETS})" if name in TEXT_MODELS
            else f"a next-token model (model.name in {TEXT_MODELS})")
    raise ConfigError(f"config.model.name={name!r} and config.data.name={data!r} do not fit: "
                      f"the {'model' if name in TEXT_MODELS else 'data'} needs {need}")
  if name == "shakespeare_lstm":
    hidden = config.model.get("hidden", (256, 256))
    _require(isinstance(hidden, (tuple, list)) and len(hidden) >= 1
             and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden),
             "model.hidden", hidden, "a non-empty tuple of LSTM widths >= 1")
    _opt_int(config, "model.embed_dim", 8, 1)
  elif name == "shakespeare_transformer":
    _opt_int(config, "model.num_layers", 4, 1)
    d_model = _opt_int(config, "model.d_model", 128, 1)
    heads = _opt_int(config, "model.num_heads", 4, 1)
    _opt_int(config, "model.ffn_width", 0, 0)
    _require(d_model % heads == 0, "model.num_heads", heads,
             f"a divisor of model.d_model={d_model} (head_dim = d_model // num_heads)")


def text_spec(config, input_shape, num_classes):
  """The text model of `config.model` for windows of `input_shape` = (T,) over `num_classes`
  token ids (vocabulary = classes: the target is the next token)."""
  m = config.model
  kw = dict(vocab_size=int(num_classes), seq_len=int(input_shape[0]))
  if m.name == "shakespeare_lstm":
    return models.leaf_shakespeare_lstm(hidden=tuple(m.get("hidden", (256, 256))),
                                        embed_dim=int(m.get("embed_dim", 8)), **kw)
  return models.shakespeare_transformer(
      num_layers=int(m.get("num_layers", 4)), d_model=int(m.get("d_model", 128)),
      num_heads=int(m.get("num_heads", 4)), ffn_width=int(m.get("ffn_width", 0)) or None, **kw)


def synthetic_text(config) -> data_lib.FederatedDataset:
  """Seeded next-character data (`SYNTHETIC_PHRASE`), LEAF vocabulary, data.seq_len windows.

  Client k's train text holds U(examples_per_client) windows, its test text
  test_examples_per_client windows; both start at random offsets of the phrase.
  """
  d = config.data
  rng = np.random.default_rng(config.seeds.data)
  phrase = np.array(list(SYNTHETIC_PHRASE))
  letters = np.unique(phrase)

  def text(num_windows: int) -> str:
    length = int(d.seq_len) + num_windows  # one window per character after the first T
    chars = phrase[(rng.integers(len(phrase)) + np.arange(length)) % len(phrase)]
    flip = rng.random(length) < d.noise
    chars[flip] = rng.choice(letters, int(flip.sum()))
    return "".join(chars)

  lo, hi = d.examples_per_client
  train = {f"client_{k:04d}": [text(int(rng.integers(lo, hi + 1)))] for k in range(d.num_clients)}
  test = {cid: [text(int(d.test_examples_per_client))] for cid in train}
  return data_lib.shakespeare_from_snippets(train, test, seq_len=int(d.seq_len),
                                            source=f"synthetic text (noise {d.noise})")


def load_shakespeare(config, directory: str) -> data_lib.FederatedDataset:
  """TFF's Shakespeare (LEAF split by role, its train/test files) with the config's caps:
  data.max_windows_per_client (train) and data.max_test_windows_per_client (test), evenly
  spaced windows, 0 = all; data.stride between window starts (LEAF: 1). Clients whose train
  text is shorter than one window are dropped (72 of 715 at seq_len 80)."""
  d = config.data
  cap, test_cap = d.get("max_windows_per_client", 0), d.get("max_test_windows_per_client", 0)
  kw = dict(stride=int(d.get("stride", 1)), max_padded_bytes=None if cap else 2**31)
  fd = data_lib.load_shakespeare(directory, max_windows_per_client=cap or None, **kw)
  if test_cap != cap:  # the same clients (dropping depends on the train text only)
    other = data_lib.load_shakespeare(directory, max_windows_per_client=test_cap or None, **kw)
    assert other.client_ids == fd.client_ids
    fd = fd._replace(test=other.test, description=f"{fd.description}; test at most "
                     f"{test_cap or 'all'} windows per client")
  return fd


COMPUTE_DTYPES = ("float32", "bfloat16")


def evaluates_per_example(config) -> bool:
  """Whether the model's evaluation treats each example on its own, so that the per-client
  local accuracies can come from one pass over the pooled test set. Not with static BN,
  which normalises with each evaluated batch's statistics: a client's local accuracy is
  then its own examples in their own batches."""
  return config.model.get("norm", "none") != "batch_static"


def compute_dtype(config):
  """`config.model.compute_dtype` as the models' `compute_dtype`: None for float32 (also
  when the field is absent), jnp.bfloat16 for mixed precision (bf16 GEMMs, f32 params)."""
  value = config.model.get("compute_dtype", "float32")
  _require(value in COMPUTE_DTYPES, "model.compute_dtype", value, f"one of {COMPUTE_DTYPES}")
  return None if value == "float32" else jnp.dtype(value)


def build_apply(spec, normalize, conv_impl: str, compute_dtype=None) -> Callable:
  """The model's apply_fn on normalised inputs (`compute_dtype`: see `models.make_apply`)."""
  base = models.make_apply(spec, conv_impl=conv_impl, compute_dtype=compute_dtype)

  def apply_fn(params, batch_stats, x, *, train, example_mask=None, **options):
    # options: the model's own keywords (gates, dense_lowrank), passed through.
    return base(params, batch_stats, normalize(x), train=train, example_mask=example_mask, **options)

  return apply_fn


def build_schedule(config) -> federated.LocalSchedule:
  """The clients' local schedule from `config.client` (apply a strategy's unrolling with
  `strategy.schedule(...)`)."""
  c = config.client
  return federated.LocalSchedule(batch_size=c.batch_size, num_epochs=c.num_epochs,
                                 num_steps=c.num_steps or None)


def build_algorithm(config, apply_fn, schedule=None, lowrank=None, *,
                    data: Data | None = None, plain_mean: bool = False
                    ) -> federated.FedAlgorithm:
  """The FedAvg-family algorithm of `config`; `lowrank` (from `build_lowrank`, used by
  '+lowrank' strategies) trains large dense kernels as factors, same results. With
  config.privacy / config.compression the aggregator is in the algorithm's path (its
  state in `ServerState.aggregator`; `in_path_aggregator`, which needs `data`), unless
  `plain_mean`: the default mean, for a caller that wraps `full_aggregator` around its
  own algorithm (ASP's client votes)."""
  c, a = config.client, config.algorithm
  agg = None if plain_mean else in_path_aggregator(config, data)
  if c.optimizer == "sgd":
    client_opt = optax.sgd(c.learning_rate, momentum=c.momentum or None)
  else:
    client_opt = optax.adam(c.learning_rate)
  if schedule is None:
    schedule = build_schedule(config)
  if lowrank is not None and a.name == "fedprox":
    raise ValueError("a '+lowrank' strategy cannot run FedProx (its proximal term is not low-rank)")
  if a.name == "fedavg":
    return federated.fedavg(apply_fn, client_opt, schedule,
                            server_optimizer=optax.sgd(a.server_learning_rate), lowrank=lowrank,
                            aggregator=agg)
  if a.name == "fedavgm":
    return federated.fedavgm(apply_fn, client_opt, schedule, server_learning_rate=a.server_learning_rate,
                             server_momentum=a.server_momentum, lowrank=lowrank, aggregator=agg)
  if a.name == "fedadam":
    return federated.fedadam(apply_fn, client_opt, schedule, server_learning_rate=a.server_learning_rate,
                             lowrank=lowrank, aggregator=agg)
  if a.name == "fedyogi":
    return federated.fedyogi(apply_fn, client_opt, schedule, server_learning_rate=a.server_learning_rate,
                             lowrank=lowrank, aggregator=agg)
  return federated.fedprox(apply_fn, client_opt, schedule, mu=a.prox_mu, aggregator=agg)


# ----------------------------------------------------------------------------- cohort sampling
# config.cohort_sampling (absent: 'uniform'): 'uniform' draws exactly clients_per_round
# clients without replacement; 'poisson' draws each client independently with probability
# q = clients_per_round / num_clients (DP-FedAvg's sampling, what `dp_epsilon`'s accountant
# assumes) into config.max_cohort fixed slots (absent or None: `poisson_slots`).

COHORT_SAMPLINGS = ("uniform", "poisson")
# Methods whose rounds take a cohort of any size, empty included (FedAvg's server step
# leaves the model as it was when nobody trained; ASP and L1 filter decide on the host).
_POISSON_METHODS = ("fedavg", "asp", "l1_filter")
POISSON_TAIL = 1e-4  # the default slots leave P(more clients drawn than slots) below this


def cohort_sampling(config) -> str:
  return config.get("cohort_sampling", "uniform")


def validate_cohort_sampling(config) -> None:
  """config.cohort_sampling and config.max_cohort; ConfigError names the field."""
  sampling = cohort_sampling(config)
  _require(sampling in COHORT_SAMPLINGS, "cohort_sampling", sampling,
           f"one of {COHORT_SAMPLINGS}")
  if sampling != "poisson":
    return
  method = config.get("method", "fedavg")
  if method not in _POISSON_METHODS:
    raise ConfigError(f"config.cohort_sampling='poisson' is not supported with method "
                      f"{method!r} (its round assumes a cohort of clients_per_round clients); "
                      f"allowed with {_POISSON_METHODS}, or cohort_sampling='uniform'")
  if config.get("max_cohort") is not None:
    _int_in(config, "max_cohort", int(config.clients_per_round))


def poisson_slots(config, num_clients: int) -> int:
  """The round's client slots under Poisson sampling: config.max_cohort, else the smallest
  k with P(Binomial(num_clients, q) > k) < POISSON_TAIL (q = clients_per_round /
  num_clients), so a drop (`data.sample_poisson`) is rare; padding slots cost compute."""
  if config.get("max_cohort") is not None:
    return int(config.max_cohort)
  return _binomial_slots(int(num_clients), min(1.0, config.clients_per_round / num_clients))


@functools.lru_cache(maxsize=64)
def _binomial_slots(n: int, q: float) -> int:
  """The smallest k >= 1 with P(Binomial(n, q) > k) < POISSON_TAIL (asked every round: cached)."""
  if q >= 1.0:
    return n
  log_pmf = lambda k: (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                       + k * math.log(q) + (n - k) * math.log1p(-q))
  below = 0.0  # P(K <= k)
  for k in range(n + 1):
    below += math.exp(log_pmf(k))
    if 1.0 - below < POISSON_TAIL:
      return max(k, 1)
  return n


# ----------------------------------------------------------------------------- robust FL (issue 28)
# config.robust: aggregator ('mean', 'median', 'trimmed_mean', 'norm_bound', 'krum') and its
# parameters; config.attack: kind, fraction of malicious clients, parameters. Both optional.

ROBUST_AGGREGATORS = ("mean", "median", "trimmed_mean", "norm_bound", "krum")
ATTACKS = ("none", "sign_flip", "scaled", "gaussian", "label_flip", "backdoor")
# The view of each driver's sums (`federated.with_aggregator`).
_FEDAVG_METHODS = ("fedavg", "asp", "l1_filter")
_HETERO_METHODS = ("fiarse", "heterofl", "fedrolex", "scalefl")
_MASKED_METHODS = ("fedtiny", "sparse")


def robust_active(config) -> bool:
  """Whether the run aggregates with something other than the mean or has attackers."""
  r, a = config.get("robust"), config.get("attack")
  return bool((r is not None and r.get("aggregator", "mean") != "mean")
              or (a is not None and a.get("kind", "none") != "none" and a.get("fraction", 0.0) > 0))


def validate_robust(config) -> None:
  """Checks config.robust and config.attack (when present); ConfigError names the field."""
  cpr = config.clients_per_round
  if config.get("robust") is not None:
    name = _choice(config, "robust.aggregator", ROBUST_AGGREGATORS)
    if name == "trimmed_mean":
      beta = _get(config, "robust.trim_fraction")
      _require(isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 <= beta < 0.5,
               "robust.trim_fraction", beta, "a number in [0, 0.5) (trimmed from EACH end)")
    if name == "norm_bound":
      _float_in(config, "robust.max_norm", 0.0, lo_open=True)
    if name == "krum":
      f = _int_in(config, "robust.krum_f", 0)
      if cpr < 2 * f + 3:
        raise ConfigError(f"config.robust.krum_f={f} is too large for clients_per_round={cpr}: "
                          f"Krum needs clients_per_round >= 2 * krum_f + 3 (allowed krum_f in "
                          f"[0, {max((cpr - 3) // 2, 0)}])")
      _int_in(config, "robust.krum_m", 1, max(cpr - f, 1))
  if config.get("attack") is not None:
    kind = _choice(config, "attack.kind", ATTACKS)
    fraction = _get(config, "attack.fraction")
    _require(isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
             and 0 <= fraction <= 1, "attack.fraction", fraction,
             "a number in [0, 1] (the fraction of clients that attack; more attackers than "
             "clients is impossible)")
    _int_in(config, "attack.seed", 0)
    if kind == "scaled":
      _float_in(config, "attack.scale", -1e30)
    if kind == "gaussian":
      _float_in(config, "attack.sigma", 0.0)
    if kind == "backdoor":
      _int_in(config, "attack.target", 0, (config.data.num_classes - 1)
              if config.data.name == "synthetic" else None)
      _int_in(config, "attack.trigger_size", 1)
      _float_in(config, "attack.poison_fraction", 0.0, 1.0, lo_open=True)
  if robust_active(config):
    method = config.get("method", "fedavg")
    known = _FEDAVG_METHODS + _HETERO_METHODS + _MASKED_METHODS + ("cavp",)
    _require(method in known, "method", method, f"one of {known} with config.robust / config.attack")
  validate_private(config)


def build_aggregator(config) -> federated.Aggregator:
  """The `federated.Aggregator` of config.robust (the mean without it)."""
  r = config.get("robust")
  name = "mean" if r is None else r.aggregator
  if name == "median":
    return federated.coordinate_median()
  if name == "trimmed_mean":
    return federated.trimmed_mean(float(r.trim_fraction))
  if name == "norm_bound":
    return federated.norm_bound(float(r.max_norm))
  if name == "krum":
    return federated.krum(int(r.krum_f), int(r.krum_m))
  return federated.mean()


def build_attack(config, num_classes: int) -> federated.Attack:
  a = config.attack
  if a.kind == "sign_flip":
    return federated.sign_flip()
  if a.kind == "scaled":
    return federated.scaled_update(float(a.scale))
  if a.kind == "gaussian":
    return federated.gaussian_noise(float(a.sigma))
  if a.kind == "label_flip":
    return federated.label_flip(num_classes)
  if a.kind == "backdoor":
    return federated.backdoor(backdoor_trigger(config), int(a.target), float(a.poison_fraction))
  return federated.no_attack()


def backdoor_trigger(config) -> federated.Trigger:
  return federated.Trigger(size=int(config.attack.trigger_size))


def attackers(config, num_clients: int):
  """[num_clients] bool: the run's malicious clients (a fixed set, from attack.seed)."""
  a = config.get("attack")
  if a is None or a.kind == "none":
    return np.zeros(num_clients, bool)
  return federated.choose_attackers(num_clients, float(a.fraction), int(a.seed))


def robust_algorithm(config, data: Data, alg: federated.FedAlgorithm) -> federated.FedAlgorithm:
  """`alg` (the method's round algorithm) with config.robust's aggregator, config.attack's
  attackers, config.privacy's DP and config.compression's compression; `alg` itself when
  none is set. With privacy / compression every method has its aggregator in its path
  already (`in_path_aggregator`, given by `build_algorithm` and the method drivers, its
  state in the server state): only the data side of an attack is added here."""
  private = aggregation_active(config)
  if not robust_active(config) and not private:
    return alg
  from fedjax_prune.pruning import _hetero, base  # the views of the pruning paths
  method = config.get("method", "fedavg")
  attacked = config.get("attack") is not None and config.attack.kind != "none"
  if private:
    if attacked:
      alg = federated.poison_data(alg, build_attack(config, data.num_classes),
                                  attackers(config, data.train.num_clients))
    return alg
  if method in _FEDAVG_METHODS:
    view = federated.fedavg_view()
  elif method in _HETERO_METHODS:
    view = _hetero.counted_view()
  elif method in _MASKED_METHODS:
    view = base.aggregation_view()
  else:  # cavp: sums of n_k * params
    view = federated.weighted_view("params")
  aggregator = build_aggregator(config)
  if config.get("attack") is not None and config.attack.kind != "none":
    attack = build_attack(config, data.num_classes)
    bad = attackers(config, data.train.num_clients)
    alg = federated.poison_data(alg, attack, bad)
    aggregator = federated.with_attack(aggregator, attack, bad)
  return federated.with_aggregator(alg, aggregator, view)


# ----------------------------------------------------------------------------- DP and compression (issue 28)
# config.privacy: DP-FedAvg (noise_multiplier, clip_norm, delta; adaptive clipping with
# target_quantile, clip_learning_rate, count_stddev (None: clients_per_round / 20)).
# config.compression: bits (None: no quantisation), topk_fraction (None: every held
# coordinate), error_feedback. Both optional; the records get `dp_epsilon` / `bytes_up`.
# config.privacy.denominator (absent: 'fixed'): 'fixed' divides the noised sum by m;
# 'expected_counts' (the width submodel methods) divides each coordinate by its expected
# holder count m x (share of the clients whose capacity level holds it), public data only.

DENOMINATORS = ("fixed", "expected_counts")
_WIDTH_METHODS = ("heterofl", "fedrolex", "scalefl")  # capacities and submodels are public
# Every method family runs them, each with the aggregator (and its state) in its path.
_PRIVATE_METHODS = _FEDAVG_METHODS + _HETERO_METHODS + _MASKED_METHODS + ("cavp",)


def aggregation_active(config) -> bool:
  """Whether config.privacy or config.compression is set."""
  return config.get("privacy") is not None or config.get("compression") is not None


def _optional(config, path, check):
  if _get(config, path) is not None:
    check()


def validate_private(config) -> None:
  """Checks config.privacy and config.compression (when present) and the method they run
  with; ConfigError names the field."""
  method = config.get("method", "fedavg")
  if config.get("privacy") is not None:
    _float_in(config, "privacy.noise_multiplier", 0.0)
    _float_in(config, "privacy.clip_norm", 0.0, lo_open=True)
    delta = _float_in(config, "privacy.delta", 0.0, 1.0, lo_open=True)
    _require(delta < 1.0, "privacy.delta", delta, "a number in (0, 1)")
    adaptive = _get(config, "privacy.adaptive")
    _require(isinstance(adaptive, bool), "privacy.adaptive", adaptive, "True or False")
    if adaptive:
      _float_in(config, "privacy.target_quantile", 0.0, 1.0)
      _float_in(config, "privacy.clip_learning_rate", 0.0)
      _optional(config, "privacy.count_stddev",
                lambda: _float_in(config, "privacy.count_stddev", 0.0))
      try:
        build_dp(config)
      except ValueError as e:
        raise ConfigError(f"config.privacy.count_stddev={config.privacy.count_stddev!r} is "
                          f"invalid for privacy.noise_multiplier="
                          f"{config.privacy.noise_multiplier}: {e}") from None
    denominator = dp_denominator(config)
    _require(denominator in DENOMINATORS, "privacy.denominator", denominator,
             f"one of {DENOMINATORS}")
    if denominator == "expected_counts" and method not in _WIDTH_METHODS:
      why = ("its submodels are the coordinates each client's update touched, which depend "
             "on the client's data: no per-coordinate count is public" if method == "fiarse"
             else "per-coordinate counts need submodels whose levels are public")
      raise ConfigError(f"config.privacy.denominator='expected_counts' is invalid with method "
                        f"{method!r}: {why}; allowed 'fixed' (the expected_counts denominator "
                        f"is for {_WIDTH_METHODS})")
    r = config.get("robust")
    if r is not None and r.get("aggregator", "mean") != "mean":
      raise ConfigError(f"config.robust.aggregator={r.aggregator!r} cannot be combined with "
                        "config.privacy (DP's noise is calibrated to a clipped sum): allowed "
                        "'mean' with privacy")
  if config.get("compression") is not None:
    bits = _get(config, "compression.bits")
    _require(bits is None or (isinstance(bits, int) and not isinstance(bits, bool)
                              and 1 <= bits <= 32),
             "compression.bits", bits, "an integer in [1, 32] or None (no quantisation)")
    fraction = _get(config, "compression.topk_fraction")
    _require(fraction is None or (isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
                                  and 0 < fraction <= 1),
             "compression.topk_fraction", fraction, "a number in (0, 1] or None (send all)")
    ef = _get(config, "compression.error_feedback")
    _require(isinstance(ef, bool), "compression.error_feedback", ef, "True or False")
  if aggregation_active(config):
    _require(method in _PRIVATE_METHODS, "method", method,
             f"one of {_PRIVATE_METHODS} with config.privacy / config.compression")
    # Each carries the aggregator in its algorithm's path and its state (the adaptive
    # clip norm, the error-feedback memory) in its server state (`in_path_aggregator`).


def dp_denominator(config) -> str:
  """config.privacy.denominator: 'fixed' without privacy or where the block predates it."""
  p = config.get("privacy")
  return "fixed" if p is None else p.get("denominator", "fixed")


def dp_release_all(config) -> bool:
  """Whether config.privacy's DP mean releases every coordinate: where a client holds
  depends on its data, so noise (and, for FIARSE, the server step: `fiarse(...,
  release_all=True)`) goes on every coordinate of the public server model. FedDST's
  clients prune and regrow on their own data; FIARSE's submodels are the coordinates each
  client's update touched."""
  if config.get("privacy") is None:
    return False
  method = config.get("method", "fedavg")
  return method == "fiarse" or (method == "sparse" and config.sparse.get("method") == "feddst")


def build_dp(config, noise_on_present: bool = True) -> federated.Aggregator:
  """`federated.dp_mean` of config.privacy (m = clients_per_round)."""
  p = config.privacy
  adaptive = bool(p.adaptive)
  return federated.dp_mean(
      float(p.noise_multiplier), float(p.clip_norm), expected_clients=config.clients_per_round,
      target_quantile=float(p.target_quantile) if adaptive else None,
      clip_learning_rate=float(p.clip_learning_rate) if adaptive else 0.2,
      count_stddev=(None if not adaptive or p.count_stddev is None else float(p.count_stddev)),
      noise_on_present=noise_on_present)


def build_compression(config) -> federated.Compression:
  c = config.compression
  return federated.Compression(bits=None if c.bits is None else int(c.bits),
                               topk_fraction=None if c.topk_fraction is None else float(c.topk_fraction))


def full_aggregator(config, data: Data) -> federated.Aggregator:
  """config.robust's aggregator, or config.privacy's DP mean, behind config.compression,
  behind config.attack's update attack: an attacker transforms its update, compresses it,
  then (DP) clips it."""
  if config.get("privacy") is not None:
    # Where FedDST's and FIARSE's clients hold depends on their data: noise on every
    # coordinate (FIARSE's server step applies it everywhere: `dp_release_all`).
    agg = build_dp(config, noise_on_present=not dp_release_all(config))
  else:
    agg = build_aggregator(config)
  if config.get("compression") is not None:
    agg = federated.compressed(agg, build_compression(config),
                               error_feedback=bool(config.compression.error_feedback),
                               num_clients=data.train.num_clients)
  if config.get("attack") is not None and config.attack.kind != "none":
    agg = federated.with_attack(agg, build_attack(config, data.num_classes),
                                attackers(config, data.train.num_clients))
  return agg


def in_path_aggregator(config, data: Data | None) -> federated.Aggregator | None:
  """The aggregator `build_algorithm` puts in the FedAvg family's path, and the method
  drivers in theirs (experiments/methods/sparse.py, fedtiny.py: the masked family;
  hetero.py: the submodel family; cavp.py): `full_aggregator` with config.privacy /
  config.compression, else None (the default mean; config.robust alone runs through
  `robust_algorithm`)."""
  if not aggregation_active(config) or config.get("method", "fedavg") not in _PRIVATE_METHODS:
    return None
  if data is None:
    raise ValueError("build_algorithm needs data= (the clients and classes) with "
                     "config.privacy / config.compression")
  return full_aggregator(config, data)


def dp_epsilons(config, num_clients: int, *, fixed_cohort: bool = False) -> list[float] | None:
  """[rounds] epsilon after each round at config.privacy.delta, or None without
  config.privacy. The records' `dp_epsilon`: the DP-FedAvg convention (RDP accountant,
  Poisson sampling at q = clients_per_round / num_clients, add/remove-one adjacency);
  with `fixed_cohort` their `dp_epsilon_fixed_cohort`: what the experiments' fixed-size
  cohorts guarantee under replace-one adjacency (`federated.fixed_cohort_epsilon_per_round`,
  sensitivity 2C)."""
  if config.get("privacy") is None:
    return None
  return _epsilons(config, num_clients, config.privacy.noise_multiplier, config.privacy.delta,
                   fixed_cohort=fixed_cohort, sensitivity_ratio=2.0)


def _epsilons(config, num_clients: int, noise_multiplier, delta, *, fixed_cohort: bool,
              sensitivity_ratio: float) -> list[float]:
  """[config.rounds] RDP epsilon at `delta` after each round of a Gaussian mechanism of
  `noise_multiplier`: Poisson sampling at q = clients_per_round / num_clients, or with
  `fixed_cohort` cohorts of exactly clients_per_round under replace-one adjacency."""
  if fixed_cohort:
    eps = federated.fixed_cohort_epsilon_per_round(
        float(noise_multiplier), int(num_clients), min(int(config.clients_per_round),
                                                       int(num_clients)),
        int(config.rounds), float(delta), sensitivity_ratio=sensitivity_ratio)
  else:
    q = min(1.0, config.clients_per_round / num_clients)
    eps = federated.epsilon_per_round(float(noise_multiplier), q, int(config.rounds), float(delta))
  return [float(e) for e in eps]


VOTE_DELTA = 1e-3  # config.asp.vote_delta's default: < 1 / num_clients for FEMNIST's 300


def vote_epsilons(config, num_clients: int, *, fixed_cohort: bool = False) -> list[float] | None:
  """[rounds] epsilon of ASP's noised vote tallies after each round at config.asp.vote_delta
  (config.asp.decision='client_votes' with vote_noise_multiplier z > 0), else None.

  A client's votes move each count by at most 1, so the tallies of one round are a Gaussian
  mechanism of noise multiplier z (`pruning.client_votes`). Every round releases its
  tallies (the records carry them after the search too), so round r composes r of them;
  the same accountant and sampling conventions as `dp_epsilons` (`fixed_cohort`: the
  records' `vote_epsilon_fixed_cohort`, sensitivity ratio 1: replacing a voter moves each
  count by at most 1, as adding one does)."""
  if config.get("method") != "asp" or config.get("asp") is None:
    return None
  asp = config.asp
  if asp.get("decision", "server") != "client_votes" or not asp.get("vote_noise_multiplier", 0.0):
    return None
  return _epsilons(config, num_clients, asp.vote_noise_multiplier,
                   asp.get("vote_delta", VOTE_DELTA), fixed_cohort=fixed_cohort,
                   sensitivity_ratio=1.0)


def with_measured_bytes(config, method: federated.Method) -> federated.Method:
  """With config.compression: `method` whose records carry the round's measured `bytes_up`
  (the compressed aggregator's metric, plus the record's `vote_bytes_up`: ASP's client
  votes travel beside the compressed update) and the method's own count of the
  uncompressed upload as `bytes_up_uncompressed`; `method` itself otherwise."""
  if config.get("compression") is None:
    return method
  record_fn = method.record

  def record(before, after, round_idx, metrics):
    out = dict(record_fn(before, after, round_idx, metrics))
    if "bytes_up" in metrics:
      if "bytes_up" in out:
        out["bytes_up_uncompressed"] = out["bytes_up"]
      out["bytes_up"] = metrics["bytes_up"] + out.get("vote_bytes_up", 0)
    return out

  return method._replace(record=record)


def backdoor_evaluator(config, data: Data, apply_for: Callable):
  """`asr(state) -> {'backdoor_asr': float}` on the central test set for a backdoor run
  (models whose server state has params and batch_stats), else None."""
  a = config.get("attack")
  if a is None or a.kind != "backdoor" or config.get("method", "fedavg") == "cavp":
    return None
  evaluators = {}

  def asr(state) -> dict:
    key = repr(state.spec)
    if key not in evaluators:
      evaluators.clear()
      evaluators[key] = jax.jit(federated.make_evaluate(apply_for(state.spec),
                                                        batch_size=config.eval_batch_size))
    server = state.server
    return {"backdoor_asr": federated.attack_success_rate(
        evaluators[key], server.params, server.batch_stats, data.test_x, data.test_y,
        backdoor_trigger(config), int(a.target))}

  return asr


def build_lowrank(config, spec, params, max_examples: int) -> performance.LowRankDense | None:
  """The `LowRankDense` a '+lowrank' strategy may use for this dense run, or None when the
  run cannot (clients not SGD, FedProx, a model without `dense_lowrank`) or no dense
  kernel is cheaper as factors over the clients' rows (steps x batch)."""
  c, a = config.client, config.algorithm
  if robust_active(config) or aggregation_active(config):  # an aggregator reads each delta
    return None
  if (c.optimizer != "sgd" or a.name == "fedprox"
      or not isinstance(spec, (models.MLPSpec, models.ConvNetSpec))):
    return None
  schedule = build_schedule(config)
  rows = schedule.total_steps(int(max_examples)) * schedule.batch_size
  layers = performance.worthwhile_lowrank_layers(params, rows)
  # rows: a short calibration round then pays the correction cost of the full run's factors.
  return (performance.LowRankDense(layers, float(c.learning_rate), rows=rows,
                                 momentum=float(c.momentum or 0.0)) if layers else None)


def has_conv(spec) -> bool:
  return not isinstance(spec, (models.MLPSpec,) + models.TEXT_SPECS)


def default_strategy_cache() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fedjax_prune", "strategy.json")
