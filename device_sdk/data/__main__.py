"""``python -m device_sdk.data build multilingual --out DIR``: build the default per-user data set."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import SDKError
from .recipe import LANGUAGES, build_multilingual


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_sdk.data")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a data set from Debian packages")
    build.add_argument("recipe", choices=["multilingual"])
    build.add_argument("--out", required=True, type=Path)
    build.add_argument("--langs", default=",".join(LANGUAGES), help="comma-separated languages")
    build.add_argument("--workdir", type=Path, default=None, help="keep downloads and extracted packages here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        stats = build_multilingual(args.out, tuple(args.langs.split(",")), args.workdir, progress=True)
    except SDKError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for lang, splits in stats.items():
        words = ", ".join(f"{s} {v['words'] / 1000:.0f}k words ({v['documents']} docs)" for s, v in splits.items())
        print(f"{lang}: {words}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
