"""qlora_helpers: the logic behind the six QLoRA notebooks (one module per stage, plus shared pieces)."""

from .noise import silence_known_noise

__version__ = "0.1.0"

silence_known_noise()
