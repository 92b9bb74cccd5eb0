"""Method drivers: `config.method` -> module with `validate(config)` and `run(config, env)`.

A plain dict (no global registration): add a line here when a method lands.
"""
from experiments.methods import fedavg

DRIVERS = {
    "fedavg": fedavg,   # the FedAvg family (config.algorithm.name picks FedAvg/M/Adam/Yogi/Prox)
}
