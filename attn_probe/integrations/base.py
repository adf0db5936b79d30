"""What the framework callbacks share: the optional import of the framework, the probe's
defaults, and opening and closing steps.

A callback class is built on :class:`ProbeCallback` and on its framework's callback base, which
:func:`optional_base` imports without making the integration module fail to import.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from ..probe import AttentionProbe


def optional_base(module: str, name: str, *, label: str, extra: str
                  ) -> tuple[type | None, Callable]:
    """The class ``module.name`` (None when the framework is missing), and a module
    ``__getattr__`` for the integration module that raises ``ImportError`` saying what to
    install when ``AttentionProbeCallback`` is asked for without the framework."""
    try:
        base = getattr(importlib.import_module(module), name)
        error: ImportError | None = None
    except ImportError as missing:
        base, error = None, missing

    def module_getattr(attribute: str) -> Any:
        if attribute == "AttentionProbeCallback" and error is not None:
            raise ImportError(
                f"the {label} callback needs {module.split('.')[0]}: "
                f'pip install "attn_probe[{extra}]" ({error})'
            )
        raise AttributeError(attribute)

    return base, module_getattr


class ProbeCallback:
    """The framework-independent half of a callback: makes the probe with the framework's
    defaults and closes the step that is open.

    ``model``: the module to watch (default: the one the framework hands over);
    ``probe_kwargs``: passed to :class:`~attn_probe.AttentionProbe`.
    """

    def __init__(self, model: Any = None, **probe_kwargs: Any) -> None:
        super().__init__()
        self.model = model
        self.probe_kwargs = probe_kwargs
        self.probe: AttentionProbe | None = None
        self._open: int | None = None  # the step the coming forward passes belong to

    def _make_probe(self, target: Any, log_dir: Callable[[], str], every: Callable[[], int]
                    ) -> None:
        """A new probe on ``self.model`` or ``target``; ``log_dir()`` and ``every()`` give the
        framework's defaults for options the user left out."""
        if self.probe is not None:
            self.probe.detach()
        options = dict(self.probe_kwargs)
        if options.get("writer") is None and options.get("log_dir") is None:
            options.pop("writer", None)
            options["log_dir"] = log_dir()
        if "every" not in options:
            options["every"] = max(1, int(every()))
        self.probe = AttentionProbe(self.model if self.model is not None else target, **options)
        self._open = None

    def _finish(self) -> None:
        """Close the last step on every process, then remove the hooks."""
        if self.probe is None:
            return
        if self._open is not None:
            self.probe.step(self._open)
            self._open = None
        self.probe.detach()
