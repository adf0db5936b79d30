"""The collapse suite's parts: the model families (:mod:`.families`), the runs and their
training (:mod:`.runs`), judging recorded runs (:mod:`.judge`) and what is printed and drawn
(:mod:`.report`). ``benchmarks/collapse_suite.py`` is the command that drives them."""
