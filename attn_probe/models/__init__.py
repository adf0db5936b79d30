"""Models the package ships or loads: the demo GPT, the llama2.c loader, one token sampler.

Used by the command line, the examples, the benchmarks and the tests; the measuring code never
imports them.
"""
