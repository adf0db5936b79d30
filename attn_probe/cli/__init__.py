"""The ``attn-probe`` command: ``demo`` trains and probes a small GPT, ``analyze`` profiles a
model. Application code on top of the library: nothing in the library imports it.

* :mod:`.main` — argument parsing, the one-line error convention (exit 2), the demo's report;
* :mod:`.demo` — the built-in demo's runs (stable, unstable, unstable with QK-norm);
* :mod:`.analyze` — orchestration of ``attn-probe analyze`` (models and tokens are loaded by
  :mod:`attn_probe.models`, whose errors it words in its option names);
* :mod:`.heads` — the ``--heatmaps LAYER:HEADS`` syntax;
* :mod:`.console` — one-line errors and the progress bar.
"""

from .main import main

__all__ = ["main"]
