"""Federated datasets: the stacked client format, loaders, partitioners, sampling."""
from fedjax_prune.data._client_data import ClientData, DataError, client_slice, from_client_lists, to_device
from fedjax_prune.data._federated import (FederatedDataset, PooledData, central_test_set, from_partition,
                                          normalize_cifar10, normalize_cifar100, normalize_tokens,
                                          normalize_unit, pool, pooled)
from fedjax_prune.data._leaf import load_leaf, read_leaf_json
from fedjax_prune.data._tff_h5 import load_tff_h5, read_tff_h5
from fedjax_prune.data._shakespeare import (LEAF_LETTERS, OOV_ID, VOCAB_SIZE, char_windows, decode_ids, encode_text,
                                            load_shakespeare, shakespeare_from_snippets)
from fedjax_prune.data._cifar_npz import load_pfllib_npz, read_pfllib_npz
from fedjax_prune.data._tfds import load_tfds
from fedjax_prune.data._describe import ClientStats, client_stats, describe, label_counts
from fedjax_prune.data._partition import (balanced_dirichlet, balanced_dirichlet_train_test, dirichlet,
                                          dirichlet_class_priors, iid, natural, partition_arrays,
                                          partition_class_counts, shards, size_skew)
from fedjax_prune.data._sampling import fixed_schedule, pad_cohort, poisson, proportional, uniform
from fedjax_prune.data._synthetic import synthetic_fedprox, synthetic_images
from fedjax_prune.data._augment import (CIFAR10_MEAN, CIFAR10_STD, Augmentation, center_crop_resize,
                                        cifar_augmentation, compose, cutout, femnist_asp_augmentation,
                                        identity_augmentation, ignore_key, normalize, random_crop, random_flip)
# Unambiguous aliases for the client samplers.
from fedjax_prune.data._sampling import poisson as sample_poisson
from fedjax_prune.data._sampling import proportional as sample_proportional, uniform as sample_uniform

__all__ = [
    # the stacked client format
    "ClientData",
    "DataError",
    "client_slice",
    "from_client_lists",
    "to_device",
    # federated datasets, pooling, input normalisation
    "FederatedDataset",
    "PooledData",
    "central_test_set",
    "from_partition",
    "normalize_cifar10",
    "normalize_cifar100",
    "normalize_tokens",
    "normalize_unit",
    "pool",
    "pooled",
    # loaders
    "load_leaf",
    "read_leaf_json",
    "load_tff_h5",
    "read_tff_h5",
    "LEAF_LETTERS",
    "OOV_ID",
    "VOCAB_SIZE",
    "char_windows",
    "decode_ids",
    "encode_text",
    "load_shakespeare",
    "shakespeare_from_snippets",
    "load_pfllib_npz",
    "read_pfllib_npz",
    "load_tfds",
    # description
    "ClientStats",
    "client_stats",
    "describe",
    "label_counts",
    # partitioners
    "balanced_dirichlet",
    "balanced_dirichlet_train_test",
    "dirichlet",
    "dirichlet_class_priors",
    "iid",
    "natural",
    "partition_arrays",
    "partition_class_counts",
    "shards",
    "size_skew",
    # client sampling
    "fixed_schedule",
    "pad_cohort",
    "poisson",
    "proportional",
    "uniform",
    "sample_poisson",
    "sample_proportional",
    "sample_uniform",
    # synthetic data
    "synthetic_fedprox",
    "synthetic_images",
    # augmentation
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Augmentation",
    "center_crop_resize",
    "cifar_augmentation",
    "compose",
    "cutout",
    "femnist_asp_augmentation",
    "identity_augmentation",
    "ignore_key",
    "normalize",
    "random_crop",
    "random_flip",
]
