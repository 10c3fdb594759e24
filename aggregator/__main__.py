"""``python -m aggregator serve [--data-dir DIR] [--host H] [--port P] [--port-file FILE]``.

Exits with status 2 for refused settings (e.g. an admin token shorter than 22 characters) and non-zero when the
server cannot start (another aggregator serves the data directory).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def limit_malloc_fragmentation() -> None:
    """Keep the server's memory flat under many concurrent ~10 MB uploads (glibc only; a no-op elsewhere).

    glibc gives every thread its own arena and raises the mmap threshold after large frees, so request bodies
    handled in the thread pool end up fragmenting many heaps: measured, peak RSS grew from 966 to 1210 MiB between
    50 and 400 uploads. Two arenas and a fixed 1 MiB mmap threshold (large buffers go back to the OS on free)
    keep it at 884 -> 963 MiB (benchmarks/aggregator_load.py).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    from device_sdk.cli import HelpFormatter, example  # argparse helpers only (no model code)

    from .settings import Settings

    def default(field: str) -> object:
        return Settings.model_fields[field].default

    parser = argparse.ArgumentParser(prog="python -m aggregator", formatter_class=HelpFormatter,
                                     description="The federation's aggregator: collects each round's generalist "
                                                 "uploads and serves their average.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the aggregator HTTP server", formatter_class=HelpFormatter,
        description="Run the aggregator HTTP server (operator page at /, API docs at /docs). Every option can also "
                    "be set in the environment as AGGREGATOR_<OPTION> (e.g. AGGREGATOR_PORT=9000); the admin token "
                    "comes from AGGREGATOR_ADMIN_TOKEN (at least 22 url-safe characters), else one is generated "
                    "and written to DATA_DIR/admin_token (mode 0600). One server per data directory. Next: create "
                    "the federation with python -m device_sdk init-federation, then devices join.",
        epilog=example("python -m aggregator serve --data-dir agg-data --port 8700",
                       "python -m device_sdk init-federation --server http://127.0.0.1:8700 "
                       "--admin-token \"$(cat agg-data/admin_token)\" --model smollm2-135m"))
    serve.add_argument("--data-dir", type=Path, default=None,
                       help=f"database file and weight blobs (AGGREGATOR_DATA_DIR; default: {default('data_dir')})")
    serve.add_argument("--host", default=None,
                       help=f"interface to listen on (AGGREGATOR_HOST; default: {default('host')})")
    serve.add_argument("--port", type=int, default=None,
                       help=f"port (AGGREGATOR_PORT; default: {default('port')}; 0: any free port, see --port-file)")
    serve.add_argument("--max-upload-mb", type=float, default=None,
                       help="largest accepted safetensors body in MB: uploads and the initial tensors (JSON bodies "
                            "take at most 64 KiB) "
                            f"(AGGREGATOR_MAX_UPLOAD_MB; default: {default('max_upload_mb'):g})")
    serve.add_argument("--port-file", type=Path, default=None,
                       help="once listening, write the bound port to this file (with --port 0: no race for a port)")
    serve.add_argument("-v", "--verbose", action="store_true", help="debug logs, the aggregator's and uvicorn's")
    args = parser.parse_args(argv)
    limit_malloc_fragmentation()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pydantic import ValidationError

    overrides = {k: v for k, v in {"data_dir": args.data_dir, "host": args.host, "port": args.port,
                                   "max_upload_mb": args.max_upload_mb}.items() if v is not None}
    try:  # before the heavy imports: a refused setting answers at once
        settings = Settings(**overrides)
    except ValidationError as err:  # the messages only: never echo a (refused) secret
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())
        parser.exit(2, f"python -m aggregator serve: invalid settings: {problems}\n")

    import uvicorn

    from .app import create_app
    from .serving import PortReportingServer

    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level="debug" if args.verbose else "info")
    server = PortReportingServer(config, args.port_file) if args.port_file else uvicorn.Server(config)
    server.run()
    if not server.started:  # the lifespan refused to start (data directory locked, weak admin token): logged above
        logging.getLogger("aggregator").error("the aggregator did not start (data directory %s); see the error above",
                                              settings.data_dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
