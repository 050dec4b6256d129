#!/usr/bin/env python
"""`python scripts/convert_aimv2.py …` = `navit-convert aimv2 …` (the logic lives in `siglip2_navit.tools.convert_aimv2`)."""

import sys

from _shim import run

if __name__ == "__main__":
    sys.exit(run("convert_aimv2", "main"))
