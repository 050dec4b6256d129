#!/usr/bin/env python
"""`python scripts/push_to_hub.py …` = `navit-push …` (the logic lives in `siglip2_navit.tools.push`)."""

import sys

from _shim import run

if __name__ == "__main__":
    sys.exit(run("push", "main"))
