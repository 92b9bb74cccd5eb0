"""fedjax_prune: federated learning with model pruning, one compiled round over a stacked client axis."""
__version__ = "0.1.0"
