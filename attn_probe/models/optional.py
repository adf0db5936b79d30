"""The one guard for the optional Hugging Face dependency."""

from __future__ import annotations

from typing import Any

HF_INSTALL = 'pip install "attn_probe[hf]"'


def import_transformers(purpose: str) -> Any:
    """``transformers``, or ``ImportError`` saying that ``purpose`` needs it and how to get it."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"{purpose} needs Hugging Face transformers: {HF_INSTALL}") from error
    return transformers
