"""``python -m device_sdk.data build multilingual --out DIR``: build the default per-user data set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import HelpFormatter, add_verbose, example, setup_logging
from ..errors import SDKError
from .recipe import LANGUAGES, build_multilingual

EXAMPLE = example("python -m device_sdk.data build multilingual --out data/multilingual --langs de,fr,it,nl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m device_sdk.data", formatter_class=HelpFormatter,
                                     description="Build the per-user data sets (COMMAND --help for each).",
                                     epilog=EXAMPLE)
    add_verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = sub.add_parser("build", help="build a data set from Debian packages", formatter_class=HelpFormatter,
                           description="Build a per-user data set (one folder per user with train/valid/test.txt.gz) "
                                       "from the documentation of Debian packages.", epilog=EXAMPLE)
    add_verbose(build, top=False)
    build.add_argument("recipe", choices=["multilingual"], help="multilingual: one user per language")
    build.add_argument("--out", required=True, type=Path, help="the data set folder to write")
    build.add_argument("--langs", default=",".join(LANGUAGES), help="comma-separated languages, one user each")
    build.add_argument("--workdir", type=Path, default=None,
                       help="keep downloads and extracted packages here (default: a temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
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
