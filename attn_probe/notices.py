"""How the package speaks to its user: warnings attributed to the user's own line of code, and
information through the ``attn_probe`` logger (not warned: a healthy run prints nothing).

A warning raised deep inside the probe (closing a step, a hook inside a forward pass) would
otherwise point at a line of the package or of torch; :func:`warn` points it at the first frame
outside both, the user's ``probe.step()`` or ``model(x)``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch

#: The package's logger: alerts of severity ``info`` go here.
LOGGER = logging.getLogger("attn_probe")

_INSIDE = tuple(os.path.dirname(os.path.abspath(module.__file__)) + os.sep
                for module in (sys.modules[__package__], torch))


class AttentionWarning(UserWarning):
    """An alert of severity ``warning`` or ``critical``, or a problem of the probe itself."""


def caller_level() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` issued by the caller of this function
    point at the first frame outside attn_probe and torch."""
    frame, level = sys._getframe(2), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str, category: type[Warning] = AttentionWarning) -> None:
    """``warnings.warn(message)``, attributed to the user's line of code."""
    warnings.warn(message, category, stacklevel=caller_level() + 1)


def inform(message: str) -> None:
    """Information: logged at level INFO on :data:`LOGGER`, never warned."""
    LOGGER.info(message)
