"""Looking at a model's attention in a notebook: :func:`explore`.

A front end beside the command line (:mod:`attn_probe.cli`), on the same loaders:

* :mod:`.sources` — the model and the token ids, from what ``explore`` is given;
* :mod:`.explorer` — what the views show, computed from one forward pass and cached;
* :mod:`.view` — the ipywidgets view, and ``explore`` itself.
"""

from .explorer import Explorer
from .view import ExploreView, explore, in_notebook

__all__ = ["ExploreView", "Explorer", "explore", "in_notebook"]
