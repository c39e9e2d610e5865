"""The one tiny model of the suite (fast on CPU), as a KanervaConfig and as a job's `model.*` overrides."""
import copy

from kpp import KanervaConfig

# every section the tiny model shrinks; episode length and reads are set by each form below
TINY_MODEL = {
    "encoder": {"width": 8, "groups": 4, "embedding_dim": 32},
    "memory": {"channels": 16, "height": 8, "width": 8},  # the code memory: 2 x latent.dim
    "read": {"window": 4},
    "latent": {"dim": 8, "prior_width": 16},
    "decoder": {"width": 8, "groups": 4},
}


# the map memory with centred, amortised keys (kpp's defaults until issue 23), as tiny_config overrides
MAP_MEMORY = {"memory": {"channels": 4, "content": "map"},
              "keys": {"layout": "centre", "logvar": "amortized", "init_logvar": 0.0}}


def tiny_config(**overrides) -> KanervaConfig:
    """The tiny model for model-level tests: episodes of 6 images, 2 reads; `overrides` merge per section."""
    base = {"episode_length": 6, "keys": {"num_reads": 2}, **copy.deepcopy(TINY_MODEL)}
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return KanervaConfig.from_dict(base).validate()


def tiny_model_dict(episode_length: int = 4) -> dict:
    """The tiny model as the nested dict KanervaConfig.from_dict takes (jobs' tests: episodes of 4 images)."""
    return {"episode_length": episode_length, **copy.deepcopy(TINY_MODEL)}


def tiny_model_overrides(episode_length: int = 4) -> list[str]:
    """The tiny model as `model.a=b` overrides of a job's command line (pipeline.train.config's parser)."""
    def flow(section: dict) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in section.items()) + "}"
    return [f"model.episode_length={episode_length}", *(f"model.{name}={flow(fields)}" for name, fields in TINY_MODEL.items())]
