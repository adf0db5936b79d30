"""Models the package ships or loads: the demo GPT, the llama2.c loader, one token sampler, and
the loaders of a model (:mod:`.loading`) and of its token ids (:mod:`.inputs`, :mod:`.shards`)
that the command line and :func:`attn_probe.explore` share.

The measuring code never imports them.
"""
