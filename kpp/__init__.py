"""Kanerva++: a generative episodic memory (Ramapuram, Wu, Kalousis, ICLR 2021), in plain PyTorch."""
from kpp.config import ConfigError, KanervaConfig

__all__ = ["ConfigError", "KanervaConfig", "KanervaPlusPlus"]


def __getattr__(name: str):
    # the model imports torch; the config does not, so a job's --help and config checks run without torch
    if name == "KanervaPlusPlus":
        from kpp.model import KanervaPlusPlus
        return KanervaPlusPlus
    raise AttributeError(f"module 'kpp' has no attribute {name!r}")
