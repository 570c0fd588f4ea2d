"""``python -m benchmarks [SUITE] [flags]`` from a checkout: the same command line as ``hopper-mxfp4 bench``."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
