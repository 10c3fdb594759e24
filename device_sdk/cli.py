"""Pieces every command line of the project shares (``python -m device_sdk``, ``python -m export``, the examples):
help that shows defaults and ends with an example, quiet third-party warnings unless ``--verbose``, error messages
that name command-line options instead of configuration fields, and timed progress lines for long silent steps."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator

from .errors import SDKError

#: Configuration field -> command-line option, for error messages (the one place that maps them, for every
#: command; :data:`COMMAND_OPTIONS` holds the few that differ per command).
FIELD_OPTIONS = {
    "steps": "--steps", "batch_size": "--batch", "batch": "--batch", "context": "--ctx", "ctx": "--ctx",
    "lr_experts": "--lr", "lr": "--lr", "lr_router": "--router-lr", "router_lr": "--router-lr",
    "router_period": "--router-period", "router_steps": "--router-steps", "lb_weight": "--lb-weight",
    "lb_mode": "--lb-mode", "eval_every": "--eval-every", "eval_tokens": "--eval-tokens",
    "peer_eval_tokens": "--peer-eval-tokens", "rank": "--rank", "alpha": "--alpha", "n_specialists": "--specialists",
    "n_generalists": "--generalists", "budget_mb": "--budget-mb", "budget_step_s": "--budget-step-s",
    "rounds": "--rounds", "local_steps": "--local-steps", "precision": "--precision", "device": "--device",
    "seed": "--seed", "seeds": "--seeds", "experts": "--experts", "train_tokens": "--train-tokens",
    "train_prefix": "--train-prefix", "valid_prefix": "--valid-prefix", "mixing": "--mixing", "routing": "--routing",
    "max_seq": "--max-seq", "quantize": "--quantize", "formats": "--format", "model": "--model",
    "base_model": "--model", "strategy": "--strategy", "strategies": "--strategies", "retries": "--retries",
    "users": "--users", "min_devices": "--min-devices", "round_deadline_s": "--deadline-s",
    "max_experts": "--max-experts", "routing_layers": "--routing-layers", "cache_dir": "--cache-dir",
    "state_dir": "--state", "enroll_secret": "--enroll-secret", "backend": "--backend", "program": "--program",
    "compile": "--compile",
}
#: Per command, the fields whose option differs from :data:`FIELD_OPTIONS`.
COMMAND_OPTIONS = {"join": {"steps": "--local-steps"}}
#: Prefixes of configuration errors ("invalid TrainConfig: ...") that mean nothing to a command-line user.
_CONFIG_PREFIX = re.compile(r"\binvalid (?:[A-Z]\w*Config|simulation settings|export options): ")

#: The one meaning of ``--eval-tokens`` in every command.
EVAL_TOKENS_HELP = ("test perplexity on N tokens of each test set, in windows spread evenly over it "
                    "(0: the whole test set)")


def option_for(field: str, command: str | None = None) -> str:
    """The command-line option of a configuration field (``router_period`` -> ``--router-period``)."""
    return COMMAND_OPTIONS.get(command or "", {}).get(field) or FIELD_OPTIONS.get(field) or \
        "--" + field.replace("_", "-")


def option_message(message: str, command: str | None = None) -> str:
    """``message`` with configuration field names replaced by the command's options.

    Names with an underscore are replaced wherever they stand (not inside a path); plain words (``steps``, ``rank``)
    only where a configuration problem names them: at the start of a clause, followed by ``must``, ``(`` or ``=``.
    """
    mapping = {**FIELD_OPTIONS, **COMMAND_OPTIONS.get(command or "", {})}
    message = _CONFIG_PREFIX.sub("invalid options: ", message)
    for field in sorted(mapping, key=len, reverse=True):
        if "_" in field:
            pattern = rf"(?<![\w./-]){field}(?!\w)"
        else:
            pattern = rf"(?:^|(?<=: )|(?<=; )){field}(?=\s+must\b|\s*\(|=)"
        message = re.sub(pattern, mapping[field], message)
    return message


class HelpFormatter(argparse.HelpFormatter):
    """Wraps the description and epilog line by line, keeping indented lines (examples) as they are, and appends
    ``(default: X)`` to every option whose help does not already state its default (``None`` and ``False``
    defaults are described in the help text where they mean something)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if line.startswith(" ") or not line.strip():
                lines.append(indent + line)
            else:
                lines.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(lines)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings or "default" in text):
            return text
        return text + " (default: %(default)s)"


def example(*lines: str) -> str:
    """An epilog: ``example:`` followed by the given command lines."""
    return "example:\n" + "\n".join("  " + line for line in lines)


def add_verbose(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``-v/--verbose``: debug logs and third-party warnings. On a subcommand (``top=False``) it may follow the
    subcommand's name without overriding a ``-v`` given before it."""
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="debug logs of this project, and third-party warnings (silenced otherwise)")


def quiet_third_party() -> None:
    """Silence third-party warnings (torchao, torch pytree, transformers deprecations, ...) and their logs below
    ERROR; the project's own loggers are untouched."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # child processes too
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar
    if "huggingface_hub" in sys.modules:  # read at import: switch it off where it is already imported
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    for name in ("torch", "torchao", "transformers", "executorch", "onnxruntime", "onnxscript", "httpx", "urllib3",
                 "huggingface_hub", "matplotlib", "PIL", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)


def setup_logging(verbose: bool, packages: tuple[str, ...] = ("device_sdk", "export", "__main__")) -> None:
    """INFO logs of this project's ``packages`` (DEBUG with ``verbose``); other libraries' logs and warnings only
    with ``verbose``."""
    if not verbose:
        quiet_third_party()
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in packages:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def run_command(run: Callable[[], int], command: str, verbose: bool, message: Callable[[SDKError], str],
                log: logging.Logger) -> int:
    """Run one command line's work: an :class:`SDKError` prints one line ``error: <message(err)>`` on stderr
    (with the traceback in the log under ``-v``) and returns 2; Ctrl-C prints ``interrupted`` and returns 130."""
    try:
        return run()
    except SDKError as err:
        if verbose:
            log.exception("%s failed", command)
        print(f"error: {message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def timed(message: str, log: logging.Logger | None = None) -> Iterator[None]:
    """Announce a long step (``message...``) and report its elapsed time when it is done."""
    emit = log.info if log is not None else (lambda text: print(text, file=sys.stderr, flush=True))
    start = time.perf_counter()
    emit(f"{message}...")
    yield
    emit(f"{message}: done in {format_seconds(time.perf_counter() - start)}")


def format_seconds(seconds: float) -> str:
    """``42 s`` or ``3 min 05 s``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


__all__ = ["EVAL_TOKENS_HELP", "FIELD_OPTIONS", "HelpFormatter", "add_verbose", "example", "format_seconds",
           "nonnegative_int", "option_for", "option_message", "quiet_third_party", "setup_logging", "timed"]
