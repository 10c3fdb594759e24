"""``python -m export``: export a device's personalised model for phone inference, verified against PyTorch.

Subcommands: (none) export, ``verify``, ``update-adapters``; ``python -m export SUBCOMMAND --help`` for each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from device_sdk.cli import HelpFormatter, add_verbose, example, option_message, run_command, setup_logging
from device_sdk.errors import SDKError
from device_sdk.runfolder import RunFolder, claim_run_folder

from .pipeline import FORMATS, QUANTIZE

log = logging.getLogger("export")

DESCRIPTION = """\
Export a device's personalised model (base + adapters + routers) for phone inference and verify every file \
against PyTorch on real text (max |logit diff|, argmax agreement, perplexity).
Formats (--format):
  pte    ExecuTorch program model.pte (XNNPACK) with its weights in base.ptd and adapters.ptd
  onnx   model.onnx (fp32, dynamic batch and sequence)
  all    both
  peft   Hugging Face PEFT LoRA adapters: the generalist (with the attention LoRA) in OUT, each specialist in
         OUT/specialist-N; each equals the model with every token on that expert (the router is not exported)
  pte-train
         ExecuTorch TRAINING program train.pte (joint forward + backward, XNNPACK, frozen base inside) with the
         trainable adapter tensors in trainable.ptd keyed by parameter name; batches of --batch-size x --context
         (train through it with `join --backend executorch --program OUT`)
Subcommands:
  python -m export [--checkpoint ...]           export (this page)
  python -m export verify --help                re-run the parity checks of an export folder
  python -m export update-adapters --help       replace adapters.ptd of an ExecuTorch export after a new round"""
EXPORT_OUT = RunFolder("export")
CHECKPOINT_HELP = "device state folder (join --state), checkpoint folder, or train-local output folder"


def _formats(text: str) -> tuple[str, ...]:
    if text == "all":
        return FORMATS
    if text in ("peft", "pte-train"):
        return (text,)
    chosen = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"expected pte, onnx, all, pte,onnx, peft or pte-train, got {text!r}")
    return chosen


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export", description=DESCRIPTION, formatter_class=HelpFormatter,
        epilog=example("python -m export --checkpoint device-state/de --format all --out phone/ "
                       "--data data/multilingual/de"))
    add_verbose(parser)
    parser.add_argument("--checkpoint", required=True, type=Path, help=CHECKPOINT_HELP)
    parser.add_argument("--out", required=True, type=Path,
                        help="export folder (model files, tokenizer, manifest.json, run.json); must be new or empty")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out that holds an earlier export (only folders this SDK wrote are "
                             "deleted)")
    parser.add_argument("--format", type=_formats, default="all", help="pte, onnx, all, or a list such as pte,onnx; "
                        "peft: Hugging Face PEFT LoRA adapters (alone)")
    parser.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="8da8w / 8da4w: int8 / int4 base weights with int8 dynamic activations in model.pte "
                             "(8da4w: Q4_1 blocks of 32, int8 output projection); int4: an extra model.int4.onnx "
                             "(Q4_1 blocks); adapters and routers stay fp32")
    parser.add_argument("--max-seq", type=int, default=512, help="the longest sequence the exported model accepts")
    parser.add_argument("--kv-cache", action="store_true",
                        help="prefill + decode programs over a static KV cache of --max-seq positions (Llama family; "
                             "for export.generate and examples/phone_inference.py)")
    parser.add_argument("--data", type=Path, default=None, help="user folder whose test text is used to verify "
                        "(default: a built-in multilingual sample)")
    parser.add_argument("--batch-size", type=int, default=8, help="pte-train: sequences per training batch")
    parser.add_argument("--context", type=int, default=128, help="pte-train: tokens per training sequence")
    return parser


def verify_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export verify", formatter_class=HelpFormatter,
        description="Re-run the parity checks of an export folder against the checkpoint it came from.",
        epilog=example("python -m export verify --checkpoint device-state/de --out phone/"))
    add_verbose(parser)
    parser.add_argument("--checkpoint", required=True, type=Path, help=CHECKPOINT_HELP)
    parser.add_argument("--out", required=True, type=Path, help="the export folder to verify (read only)")
    parser.add_argument("--data", type=Path, default=None, help="user folder whose test text is used to verify "
                        "(default: a built-in multilingual sample)")
    return parser


def update_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export update-adapters", formatter_class=HelpFormatter,
        description="Replace the adapters data file (adapters.ptd) of an ExecuTorch export after a new round, "
                    "keeping the program and the base data file, and verify the program against the new "
                    "checkpoint. The adapters must compute the graph the program was exported for (alpha, top-k, "
                    "mixing form, expert counts). ONNX files of the folder keep the old adapters: the manifest "
                    "lists them as stale.",
        epilog=example("python -m export update-adapters --program phone/ --checkpoint device-state/de"))
    add_verbose(parser)
    parser.add_argument("--program", required=True, type=Path, help="the export folder (model.pte, adapters.ptd)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="the device's new state or adapters folder")
    parser.add_argument("--data", type=Path, default=None,
                        help="a user folder whose test text verifies the program (default: the built-in sample)")
    return parser


PARSERS = {"export": export_parser, "verify": verify_parser, "update-adapters": update_parser}


def _export(args: argparse.Namespace) -> int:
    from .pipeline import ExportOptions, export_checkpoint

    if args.format == ("pte-train",):
        return _export_train(args)
    peft = args.format == ("peft",)  # PEFT adapters: export/peft.py (no program, no quantisation)
    options = None if peft else ExportOptions(formats=args.format, quantize=args.quantize, max_seq=args.max_seq,
                                              kv_cache=args.kv_cache)
    if not args.checkpoint.exists():
        raise SDKError(f"--checkpoint {args.checkpoint} does not exist ({CHECKPOINT_HELP})")
    if peft:
        from .peft import export_peft

        if args.quantize != "none":
            raise SDKError(f"--quantize {args.quantize} applies to the pte and onnx formats; PEFT adapters are fp32")
        claim_run_folder(args.out, EXPORT_OUT, {"checkpoint": str(args.checkpoint.resolve()), "formats": args.format,
                                                "data": args.data}, args.overwrite,
                         inputs=(args.checkpoint, args.data))
        _print_results(export_peft(args.checkpoint, args.out, args.data)["verification"])
        print(json.dumps({"out": str(args.out), "ok": True}))
        return 0
    claim_run_folder(args.out, EXPORT_OUT, {"checkpoint": str(args.checkpoint.resolve()), "formats": args.format,
                                            "quantize": args.quantize, "max_seq": args.max_seq,
                                            "kv_cache": args.kv_cache, "data": args.data}, args.overwrite,
                     inputs=(args.checkpoint, args.data))
    results = export_checkpoint(args.checkpoint, args.out, options, args.data)["verification"]
    _print_results(results)
    print(json.dumps({"out": str(args.out), "ok": True}))
    return 0


def _export_train(args: argparse.Namespace) -> int:
    from .train_program import export_train_checkpoint

    if not args.checkpoint.exists():
        raise SDKError(f"--checkpoint {args.checkpoint} does not exist ({CHECKPOINT_HELP})")
    if args.quantize != "none":
        raise SDKError("--quantize does not apply to pte-train: a training program keeps an fp32 base")
    if args.batch_size < 1 or args.context < 2:
        raise SDKError(f"--batch-size must be >= 1 and --context >= 2, got {args.batch_size} and {args.context}")
    claim_run_folder(args.out, EXPORT_OUT, {"checkpoint": str(args.checkpoint.resolve()), "formats": args.format,
                                            "batch_size": args.batch_size, "context": args.context},
                     args.overwrite, inputs=(args.checkpoint,))
    meta = export_train_checkpoint(args.checkpoint, args.out, args.batch_size, args.context)
    print(json.dumps({"out": str(args.out), "ok": True, "seconds": meta.seconds,
                      "parameters": len(meta.parameters)}))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .pipeline import verify_export

    _print_results(verify_export(args.checkpoint, args.out, args.data))
    print(json.dumps({"out": str(args.out), "ok": True}))
    return 0


def _update(args: argparse.Namespace) -> int:
    from .pipeline import update_program_adapters

    path = update_program_adapters(args.program, args.checkpoint, args.data)
    print(json.dumps({"adapters": str(path), "ok": True}))
    return 0


def _print_results(results: dict) -> None:
    for name, r in results.items():
        print(f"{name}: max |logit diff| {r['max_abs_logit_diff']:.2e}, argmax agreement {r['argmax_agreement']:.4f}, "
              f"perplexity {r['ppl_exported']:.4f} (PyTorch {r['ppl_pytorch']:.4f}) on {r['tokens']} tokens")


RUN = {"export": _export, "verify": _verify, "update-adapters": _update}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("verify", "update-adapters") else "export"
    args = PARSERS[command]().parse_args(argv[1:] if command != "export" else argv)
    setup_logging(args.verbose)
    return run_command(lambda: RUN[command](args), command, args.verbose,
                       lambda err: option_message(str(err), "export"), log)


if __name__ == "__main__":
    sys.exit(main())
