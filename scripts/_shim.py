"""What every scripts/*.py shim shares: run a tool of the `siglip2_navit` package from a checkout.

The installed package is used when there is one (`pip install .` or `-e .`); otherwise this checkout's root is
registered as the package `siglip2_navit`, so `python scripts/encode.py …` works in a plain clone too.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

PACKAGE = "siglip2_navit"
CHECKOUT = Path(__file__).resolve().parent.parent


def run(tool: str, entry: str = "main") -> int:
    """Import `siglip2_navit.tools.<tool>` and call its `entry` with the command line; return its exit status."""
    try:
        importlib.import_module(PACKAGE)
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, CHECKOUT / "__init__.py", submodule_search_locations=[str(CHECKOUT)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    status = getattr(importlib.import_module(f"{PACKAGE}.tools.{tool}"), entry)()
    return status if isinstance(status, int) else 0
