"""``python -m export --checkpoint DIR --format pte|onnx|all --out DIR`` and ``python -m export verify ...``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from device_sdk.errors import SDKError

from .pipeline import FORMATS, QUANTIZE, ExportOptions, export_checkpoint, verify_export


def update_adapters_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export update-adapters",
                                     description="replace the adapters data file of an ExecuTorch export after a "
                                                 "new round, keeping the program and the base data file")
    parser.add_argument("--program", required=True, type=Path, help="the export folder (model.pte, adapters.ptd)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="the device's new state or adapters folder")
    args = parser.parse_args(argv)
    from .pipeline import update_program_adapters

    try:
        path = update_program_adapters(args.program, args.checkpoint)
    except SDKError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"adapters": str(path), "ok": True}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "update-adapters":
        return update_adapters_main(argv[1:])
    verify = bool(argv) and argv[0] == "verify"
    parser = argparse.ArgumentParser(prog="python -m export" + (" verify" if verify else ""),
                                     description="export a device's personalised model for phone inference")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="device state folder, checkpoint folder, or train-local output folder")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data", type=Path, default=None, help="user folder whose test text is used to verify "
                        "(default: a built-in multilingual sample)")
    if not verify:
        parser.add_argument("--format", default="all", help="pte, onnx or all")
        parser.add_argument("--quantize", default="none", help=f"one of {QUANTIZE}")
        parser.add_argument("--max-seq", type=int, default=512)
    args = parser.parse_args(argv[1:] if verify else argv)
    # Library loggers (executorch logs one line per constant on the root logger) stay at WARNING; ours at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("export", "device_sdk"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        if verify:
            results = verify_export(args.checkpoint, args.out, args.data)
        else:
            formats = FORMATS if args.format == "all" else tuple(args.format.split(","))
            options = ExportOptions(formats=formats, quantize=args.quantize, max_seq=args.max_seq)
            results = export_checkpoint(args.checkpoint, args.out, options, args.data)["verification"]
    except SDKError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, r in results.items():
        print(f"{name}: max |logit diff| {r['max_abs_logit_diff']:.2e}, argmax agreement {r['argmax_agreement']:.4f}, "
              f"perplexity {r['ppl_exported']:.4f} (PyTorch {r['ppl_pytorch']:.4f}) on {r['tokens']} tokens")
    print(json.dumps({"out": str(args.out), "ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
