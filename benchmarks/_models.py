"""Model loading shared by the benchmarks that also run architectures without a local checkpoint."""
from __future__ import annotations

from vitq.zoo import LoadedModel, ZooError, load_model


def load_or_random_init(name: str) -> LoadedModel:
    """The zoo model with its local weights, else with random weights (``random_init`` says which).

    Only for benchmarks whose figures do not depend on the weights (latency, sizes, cost); the library
    itself never falls back to random weights.
    """
    try:
        return load_model(name)
    except ZooError:
        return load_model(name, random_init=True)
