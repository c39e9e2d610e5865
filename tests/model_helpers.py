"""Small model configs for fast CPU tests."""
from kpp import KanervaConfig


def tiny_config(**overrides) -> KanervaConfig:
    base = {
        "episode_length": 6,
        "encoder": {"width": 8, "groups": 4, "embedding_dim": 32},
        "memory": {"channels": 4, "height": 8, "width": 8},
        "keys": {"num_reads": 2},
        "read": {"window": 4},
        "latent": {"dim": 8, "prior_width": 16},
        "decoder": {"width": 8, "groups": 4},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return KanervaConfig.from_dict(base).validate()
