#!/usr/bin/env python
"""`python scripts/benchmark.py …` = `navit-benchmark …` (the logic lives in `siglip2_navit.tools.benchmark`)."""

import sys

from _shim import run

if __name__ == "__main__":
    sys.exit(run("benchmark", "cli"))
