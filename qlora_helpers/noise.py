"""Messages a user cannot act on, silenced narrowly (by message) when the package is imported.

Each entry says where it comes from and why it is noise for a user of this project. Anything else,
warnings included, still shows.
"""

from __future__ import annotations

import logging
import warnings

# peft reads `model.is_gradient_checkpointing`, which transformers 5.x deprecated in favour of
# `is_activation_checkpointing`; the call is inside peft, so the user can do nothing about it.
WARNINGS = [(FutureWarning, r"`is_gradient_checkpointing` is deprecated")]

# bitsandbytes on AVX512-BF16 CPUs tries to fetch an optional kernel from the hub at import time and
# logs a warning when it cannot ("pip install kernels"); our models never use that kernel (see
# models.keep_4bit_on_autograd_path), so the advice does not apply.
LOG_MESSAGES = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_known_noise() -> None:
    """Install the filters once (importing qlora_helpers does it)."""
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
