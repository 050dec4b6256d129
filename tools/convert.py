# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""`navit-convert FAMILY SRC DST [options]`: one command for every converter.

Each FAMILY is its own module with its own options (`navit-convert FAMILY --help`); this module only dispatches.
"""

import argparse
import importlib
import sys
from typing import Dict, List, Optional


# FAMILY on the command line -> the converter module (in this package) that handles it
CONVERTERS: Dict[str, str] = {
    "ovis": "convert_ovis",
    "siglip2-naflex": "convert_siglip2_naflex",
    "aimv2": "convert_aimv2",
    "dinov3": "convert_dinov3",
}


def _summary(module_name: str) -> str:
    module = importlib.import_module(f"{__package__}.{module_name}")
    return (module.__doc__ or "").strip().splitlines()[0]


def _parser() -> argparse.ArgumentParser:
    families = "\n".join(f"  {name:<16}{_summary(module)}" for name, module in CONVERTERS.items())
    parser = argparse.ArgumentParser(
        prog="navit-convert",
        description="Convert a checkpoint into a packed (NaViT) Hub model folder.",
        epilog=f"families:\n{families}\n\nEach family's own options: navit-convert FAMILY --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("family", choices=list(CONVERTERS), metavar="FAMILY", help=", ".join(CONVERTERS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="SRC DST [options] of that family's converter")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in CONVERTERS:
        _parser().parse_args(argv)  # --help, or an error naming the families
        return 2
    module = importlib.import_module(f"{__package__}.{CONVERTERS[argv[0]]}")
    return module.main(argv[1:], prog=f"navit-convert {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
