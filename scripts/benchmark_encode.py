#!/usr/bin/env python
"""`python scripts/benchmark_encode.py …` = `python -m siglip2_navit.tools.benchmark_encode …` (the logic lives in `siglip2_navit.tools.benchmark_encode`)."""

import sys

from _shim import run

if __name__ == "__main__":
    sys.exit(run("benchmark_encode", "main"))
