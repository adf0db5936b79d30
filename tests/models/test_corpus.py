"""The built-in training text: Python standard-library source, as bytes."""

from __future__ import annotations

from attn_probe.models.corpus import builtin_corpus


def test_builtin_corpus_is_python_source():
    data = builtin_corpus(max_bytes=200_000)
    text = bytes(data.tolist()).decode("utf-8", errors="replace")
    assert len(data) == 200_000 and "def " in text and "import " in text
