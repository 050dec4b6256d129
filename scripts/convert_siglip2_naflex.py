#!/usr/bin/env python
"""`python scripts/convert_siglip2_naflex.py …` = `navit-convert siglip2-naflex …` (the logic lives in `siglip2_navit.tools.convert_siglip2_naflex`)."""

import sys

from _shim import run

if __name__ == "__main__":
    sys.exit(run("convert_siglip2_naflex", "main"))
