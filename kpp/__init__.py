"""Kanerva++: a generative episodic memory (Ramapuram, Wu, Kalousis, ICLR 2021), in plain PyTorch."""
from kpp.config import ConfigError, KanervaConfig, for_bit_depth
from kpp.model import KanervaPlusPlus

__all__ = ["ConfigError", "KanervaConfig", "KanervaPlusPlus", "for_bit_depth"]
