"""The command line ``python -m codegen`` / ``hopper-mxfp4``: generate, compile, doctor (:mod:`.main`), tune
(:mod:`.tune`), and bench (the benchmarks, loaded by :mod:`.main`)."""
