"""What the loaders say about bad input, in the words of whoever called them.

A loader's message names the arguments it is about. Called from Python they are its keyword
arguments (``inputs``, ``tokens``, ``trust_remote_code=True``); the command line says the same
with its options (``--data``, ``--tokens``, ``--trust-remote-code``). A :class:`Message` keeps
its template, so each front end words it with its own names (:meth:`Message.worded`) and none
rewrites another's text.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["KEYWORDS", "InputError", "Message", "one_line"]

#: The arguments a message may name, as the Python API names them.
KEYWORDS = {
    "model": "model",
    "inputs": "inputs",
    "sequences": "sequences",
    "tokens": "tokens",
    "trust_remote_code": "trust_remote_code=True",
    "device": "device",
    # what to give instead of text when no tokenizer comes with the model
    "no_tokenizer": "pass tokenizer=, token ids, a token shard, or inputs=None to sample",
}


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines too) made one space."""
    return " ".join(str(text).split())


class Message(str):
    """A message naming arguments by ``{placeholders}`` of :data:`KEYWORDS`: as a string it
    reads with the Python API's names; :meth:`worded` says it with others."""

    template: str
    values: dict[str, Any]

    def __new__(cls, template: str, /, **values: Any) -> "Message":
        self = super().__new__(cls, template.format(**KEYWORDS, **values))
        self.template, self.values = template, values
        return self

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with the arguments called ``names`` (those not in it: as in Python)."""
        return self.template.format(**{**KEYWORDS, **names}, **self.values)


class InputError(ValueError):
    """Bad input to a loader: one line that says what was wrong and what to do, naming the
    arguments by their keywords; :meth:`worded` names them otherwise."""

    def __init__(self, template: str, /, **values: Any) -> None:
        self.message = Message(template, **values)
        super().__init__(self.message)

    def worded(self, names: Mapping[str, str]) -> str:
        return self.message.worded(names)
