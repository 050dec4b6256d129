#!/usr/bin/env python
"""`python scripts/convert_dinov3.py …` = `navit-convert dinov3 …` (the logic lives in `siglip2_navit.tools.convert_dinov3`)."""

import sys

from _shim import run

if __name__ == "__main__":
    sys.exit(run("convert_dinov3", "main"))
