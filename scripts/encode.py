#!/usr/bin/env python
"""`python scripts/encode.py …` = `navit-encode …` (the logic lives in `siglip2_navit.tools.encode`)."""

import sys

from _shim import run

if __name__ == "__main__":
    sys.exit(run("encode", "main"))
