"""tensorflow-datasets sources as pooled numpy arrays (to be partitioned into clients).

Uses `tfds.data_source` (random access over ArrayRecord files), which works
without TensorFlow. The dataset must already be prepared in `data_dir` in the
`array_record` format unless `download=True` (downloading and preparing may
need more than the base install). Nothing here is federated: pass the result
to a partitioner, then `from_partition`.

Stored formats and the matching `normalize_fn`:

* `emnist/<config>`, `mnist`, `fashion_mnist`, ...: x [M, 28, 28, 1] uint8
  with **0 = background** (tfds' convention, the inverse of LEAF/TFF FEMNIST)
  and EMNIST's transposed orientation; `normalize_unit` (x/255).
  `match_femnist=True` transposes and inverts EMNIST to LEAF's FEMNIST layout.
* `cifar10`: x [M, 32, 32, 3] uint8, `normalize_cifar10` (mean/std).
* `cifar100`: label = fine label (100 classes; `label_key="coarse_label"` for
  20), `normalize_cifar100`.
* `celeb_a`: y = one binary attribute (default `Male`), groups = celebrity id
  (`identity/Identity_No`, for LEAF-like by-celebrity clients); images
  218x178 resized as LEAF does to `image_size` square (84) with PIL bicubic, no
  crop (or the central 178x178 square first with `center_crop=True`);
  `normalize_unit`.
"""
from __future__ import annotations

import os

import numpy as np

from fedjax_prune.data._federated import (PooledData, check_labels, normalize_cifar10, normalize_cifar100,
                                          normalize_unit)
from fedjax_prune.data._leaf import CELEBA_IMAGE_SIZE, resize_image

CELEBA_DEFAULT_ATTRIBUTE = "Male"


def _open(name: str, split: str, data_dir, download: bool):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(name, split=split, data_dir=None if data_dir is None else os.fspath(data_dir),
                            download=download)
  except Exception as e:  # tfds raises many types (DatasetNotFoundError, NotImplementedError, ...).
    hint = "" if download else " (is it prepared in array_record format in data_dir? pass download=True to build it)"
    raise ValueError(f"tfds dataset {name!r} split {split!r} cannot be opened{hint}: "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def load_tfds(name: str, split: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
              max_examples: int | None = None, label_key: str = "label",
              attribute: str = CELEBA_DEFAULT_ATTRIBUTE, image_size: int = CELEBA_IMAGE_SIZE,
              center_crop: bool = False, match_femnist: bool = False) -> PooledData:
  """Loads a tfds image-classification split into memory.

  Args:
    name: tfds name, e.g. "emnist/byclass" (62 classes), "cifar10", "cifar100", "celeb_a".
    split: tfds split, e.g. "train", "test".
    data_dir: tfds data directory (default: tfds' own default).
    download: let tfds download and prepare the data if missing (default: no network).
    max_examples: keep only the first this many examples.
    label_key: label feature for non-CelebA datasets (cifar100: "label" or "coarse_label").
    attribute: CelebA binary attribute used as label (default "Male").
    image_size: CelebA output height = width (LEAF: 84).
    center_crop: CelebA: crop the central square before resizing.
    match_femnist: EMNIST/MNIST-style data: transpose and invert to LEAF's FEMNIST layout
      (upright, 255 = background).

  Returns:
    PooledData with x [M, H, W, C] uint8, y [M] int32 (and groups for CelebA).
  """
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"max_examples={max_examples}: must be >= 1 or None")
  source = _open(name, split, data_dir, download)
  features = source.dataset_info.features
  is_celeba = name.split("/")[0].split(":")[0] == "celeb_a"
  n = len(source) if max_examples is None else min(len(source), max_examples)
  if n == 0:
    raise ValueError(f"tfds dataset {name!r} split {split!r} has no examples")
  groups = None
  if is_celeba:
    allowed = sorted(features["attributes"].keys())
    if attribute not in allowed:
      raise ValueError(f"attribute={attribute!r} is not a CelebA attribute; allowed: {allowed}")
    x = np.zeros((n, image_size, image_size, 3), np.uint8)
    y = np.zeros((n,), np.int32)
    groups = np.zeros((n,), np.int64) if "identity" in features else None
    for i in range(n):
      ex = source[i]
      x[i] = resize_image(ex["image"], image_size, center_crop=center_crop)
      y[i] = int(bool(ex["attributes"][attribute]))
      if groups is not None:
        groups[i] = int(ex["identity"]["Identity_No"])
    num_classes, normalize_fn = 2, normalize_unit
    desc = (f"tfds {name} {split}: label = attribute {attribute!r}, images resized to "
            f"{image_size}x{image_size} (bicubic{', center crop' if center_crop else ''}), groups = celebrity id")
  else:
    if "image" not in features or label_key not in features:
      raise ValueError(f"tfds dataset {name!r} has features {sorted(features.keys())}; need 'image' and "
                       f"label_key={label_key!r}")
    num_classes = int(features[label_key].num_classes)
    first = np.asarray(source[0]["image"])
    x = np.zeros((n,) + first.shape, np.uint8)
    y = np.zeros((n,), np.int32)
    for i in range(n):
      ex = source[i]
      img = np.asarray(ex["image"])
      if img.shape != first.shape:
        raise ValueError(f"tfds {name} {split}: example {i} has image shape {img.shape}, expected {first.shape}")
      x[i] = img
      y[i] = int(ex[label_key])
    base = name.split("/")[0].split(":")[0]
    if match_femnist:
      if x.shape[1:] != (28, 28, 1):
        raise ValueError(f"match_femnist=True needs 28x28x1 images, {name!r} has {x.shape[1:]}")
      x = 255 - x.transpose(0, 2, 1, 3)
    normalize_fn = {"cifar10": normalize_cifar10, "cifar100": normalize_cifar100}.get(base, normalize_unit)
    desc = (f"tfds {name} {split}: {label_key} ({num_classes} classes), uint8 images"
            + (", transposed+inverted to FEMNIST layout" if match_femnist else ""))
  check_labels(y, num_classes, source=f"tfds {name}", client="<pooled>", split=split)
  return PooledData(x, y, num_classes, tuple(x.shape[1:]), desc, normalize_fn, groups)
