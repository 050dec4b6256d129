#!/usr/bin/env python
"""`python scripts/convert_ovis_checkpoint.py …` = `navit-convert ovis …` (the logic lives in `siglip2_navit.tools.convert_ovis`)."""

import sys

from _shim import run

if __name__ == "__main__":
    sys.exit(run("convert_ovis", "main"))
