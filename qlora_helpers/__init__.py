"""qlora_helpers: the logic behind the qlora-notebooks stage notebooks (01 setup ... 06 serve)."""

__version__ = "0.1.0"
