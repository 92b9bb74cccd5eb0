"""Specs as JSON: store the architecture next to a checkpoint, rebuild it on resume.

A run whose architecture changes (structured pruning) must restore its state
into the right shapes: the checkpoint's `meta` holds `spec_to_json(spec)` and
`spec_from_json` rebuilds the frozen spec before the state is restored.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from fedjax_prune import models

_TYPES = {cls.__name__: cls for cls in (models.MLPSpec, models.ConvNetSpec, models.ResNetSpec,
                                        models.InceptionSpec) + models.TEXT_SPECS}


def spec_to_json(spec) -> dict[str, Any]:
  """A JSON-able dict {'type': class name, **fields} (ConvSpecs as nested dicts)."""
  if type(spec).__name__ not in _TYPES:
    raise ValueError(f'cannot serialise a {type(spec).__name__}; expected one of {sorted(_TYPES)}')
  return {'type': type(spec).__name__, **dataclasses.asdict(spec)}


def _tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def spec_from_json(data: dict[str, Any]):
  """Inverse of `spec_to_json`; raises ValueError naming an unknown type."""
  data = dict(data)
  name = data.pop('type', None)
  if name not in _TYPES:
    raise ValueError(f'spec type {name!r} is unknown; expected one of {sorted(_TYPES)}')
  if name == 'ConvNetSpec':
    data['convs'] = tuple(models.ConvSpec(**{k: _tuples(v) for k, v in c.items()})
                          for c in data['convs'])
  fields = {k: (v if k == 'convs' else _tuples(v)) for k, v in data.items()}
  return _TYPES[name](**fields)
