"""Output folders that hold one run: a run manifest (``run.json``) says which command wrote the folder and with
which settings, so that a second run never mixes its files with another run's.

Rules (:func:`claim_run_folder`):

- a missing or empty folder is claimed: the manifest is written before anything else; so is a folder that holds
  only the manifest of an earlier run of the same command that it would not resume (that run failed at its start);
- a folder whose manifest names the same command is reused when that command resumes (``join``: the same data;
  ``simulate``: any settings, runs are cached by key), and refused otherwise;
- one process at a time: a folder another process is using is refused (an exclusive ``flock`` on the folder,
  held until the claiming process ends);
- any other non-empty folder is refused, naming what is there; ``overwrite=True`` deletes it first, but only when
  an SDK command wrote it (its manifest says so) and it holds none of the run's inputs: a folder of someone else's
  files, or one that merely holds a file or folder named like an SDK output (``runs/``, ``adapters/``), is never
  deleted. Runs from before manifests existed are recognised by their files, for resuming and for messages.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SDKError
from .fileio import atomic_write_bytes, try_lock

log = logging.getLogger(__name__)

MANIFEST = "run.json"
#: Files and folders each command wrote before run manifests existed: such a folder is adopted (resumable
#: commands) or may be replaced with ``overwrite`` (never a folder without any of them).
LEGACY_MARKERS = {
    "federation-demo": ("aggregator", "devices"),
    "simulate": ("runs",),
    "join": ("credentials.json", "checkpoints"),
    "train-local": ("metrics.json", "adapters"),
    "export": ("manifest.json", "model.pte", "model.onnx"),
}


class RunFolderError(SDKError):
    """An output folder holds another run's files (or files no SDK command wrote)."""


@dataclass(frozen=True)
class RunFolder:
    """How a command uses its output folder.

    Attributes:
        command: the command's name, recorded in the manifest (e.g. ``train-local``).
        option: the command-line option that names the folder (for messages), e.g. ``--out``.
        resume_keys: settings that must match for a run to continue in the folder; ``None``: the command never
            continues a run (a used folder is refused); ``()``: every run of the command may share the folder.
    """

    command: str
    option: str = "--out"
    resume_keys: tuple[str, ...] | None = None


def read_manifest(folder: Path) -> dict | None:
    """The run manifest of ``folder``, or ``None`` (missing or unreadable)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "command" in manifest else None


def _legacy_kind(folder: Path) -> str | None:
    for command, markers in LEGACY_MARKERS.items():
        if any((folder / m).exists() for m in markers):
            return command
    return None


def _describe(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def claim_run_folder(folder: Path, kind: RunFolder, settings: dict, overwrite: bool = False,
                     inputs: tuple[Path | None, ...] = ()) -> bool:
    """Make ``folder`` this run's output folder and write its manifest.

    Args:
        folder: the output folder (created if missing).
        kind: the command and its resume rule.
        settings: the run's settings (JSON-serialisable; paths are written as strings), recorded in the manifest.
        overwrite: delete a folder another run of an SDK command wrote, and start afresh.
        inputs: the run's input paths (data, checkpoint; ``None`` entries are skipped): ``overwrite`` never deletes
            a folder that holds one of them.

    Returns:
        ``True`` if the folder continues an earlier run of the same command (resume), ``False`` for a fresh one.

    Raises:
        RunFolderError: the folder holds another run (another command, other settings, or a command that does not
            resume), or files no SDK command wrote; the message names them and what to do.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{kind.option} {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    _lock(folder, kind)
    settings = json.loads(json.dumps(settings, default=str))
    if any(folder.iterdir()):
        manifest = read_manifest(folder)
        owner = manifest["command"] if manifest else _legacy_kind(folder)
        if owner is None:
            raise RunFolderError(f"{kind.option} {folder} holds files that no comigs-sdk command wrote "
                                 f"({_describe(folder)}); choose an empty or new folder (--overwrite does not "
                                 "delete folders the SDK did not write)")
        if overwrite:
            _check_deletable(folder, kind, manifest, owner, inputs)
            log.info("--overwrite: deleting %s (a %s run)", folder, owner)
            for child in folder.iterdir():  # the contents: the folder itself, which this process locks, stays
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        elif owner != kind.command:
            raise RunFolderError(f"{kind.option} {folder} holds the output of another command ({owner}, not "
                                 f"{kind.command}); choose another {kind.option}, or pass --overwrite to delete it "
                                 "and start afresh")
        elif [p.name for p in folder.iterdir()] == [MANIFEST] and not _resumes(kind, manifest, settings):
            log.info("%s %s holds only the manifest of an earlier %s run that wrote nothing else (it failed at its "
                     "start): starting afresh", kind.option, folder, owner)
        elif kind.resume_keys is None:
            raise RunFolderError(f"{kind.option} {folder} already holds the output of an earlier {owner} run "
                                 f"({_describe(folder)}); choose another {kind.option}, or pass --overwrite to "
                                 "replace it")
        else:
            before = (manifest or {}).get("settings", {})
            changed = _changed(kind, manifest, settings)
            if changed:
                what = "; ".join(f"{k}: {before[k]!r} then, {settings.get(k)!r} now" for k in changed)
                raise RunFolderError(f"{kind.option} {folder} holds an earlier {owner} run with other settings "
                                     f"({what}); choose another {kind.option}, or pass --overwrite to delete it "
                                     "and start afresh")
            _write(folder, kind, settings, (manifest or {}).get("created"))
            return True
    _write(folder, kind, settings, None)
    return False


def _changed(kind: RunFolder, manifest: dict | None, settings: dict) -> list[str]:
    """The resume settings of ``kind`` whose value in ``manifest`` differs from ``settings``."""
    before = (manifest or {}).get("settings", {})
    return [k for k in kind.resume_keys or () if k in before and before[k] != settings.get(k)]


def _resumes(kind: RunFolder, manifest: dict | None, settings: dict) -> bool:
    """Whether a run of ``kind`` with ``settings`` continues the run that ``manifest`` describes."""
    return kind.resume_keys is not None and not _changed(kind, manifest, settings)


#: The run folders this process holds (``flock`` on the folder itself, kept until the process ends).
_HELD: dict[Path, int] = {}


def hold_folder(folder: Path, option: str) -> None:
    """Hold ``folder`` for the rest of this process, as :func:`claim_run_folder` does (no manifest): a second
    process that tries is refused. Again in this process: nothing happens.

    Raises:
        RunFolderError: another process holds it, naming ``option`` (e.g. ``state_dir``).
    """
    _lock(Path(folder), RunFolder("", option=option))


def _lock(folder: Path, kind: RunFolder) -> None:
    """Hold an exclusive lock on ``folder`` for the rest of this process (once per folder and process): a second
    process on the same output folder would mix its checkpoints, caches and partial runs with this one's."""
    key = folder.resolve()
    if key in _HELD:
        return
    try:
        fd = try_lock(key)
    except OSError as err:  # a file system without locks: run unguarded rather than not at all
        log.warning("cannot lock %s on this file system (%s): a second process on it would not be refused", folder,
                    err)
        _HELD[key] = -1
        return
    if fd is None:
        raise RunFolderError(f"another process is using {kind.option} {folder} right now (a second run there would "
                             f"mix its files with that one's); wait for it to end, or choose another {kind.option}")
    _HELD[key] = fd


def _check_deletable(folder: Path, kind: RunFolder, manifest: dict | None, owner: str,
                     inputs: tuple[Path | None, ...]) -> None:
    """Refuse to delete ``folder`` unless its manifest says an SDK command wrote it and it holds no input."""
    if manifest is None:
        raise RunFolderError(f"{kind.option} {folder} looks like a {owner} run from before run manifests "
                             f"({_describe(folder)}), but without {MANIFEST} the SDK cannot tell that it wrote "
                             "everything there, so --overwrite does not delete it; delete it yourself, or choose "
                             f"another {kind.option}")
    root = folder.resolve()
    for path in inputs:
        if path is not None and Path(path).resolve().is_relative_to(root):
            raise RunFolderError(f"{kind.option} {folder} holds this run's input {path}; --overwrite would delete "
                                 f"it. Choose a {kind.option} outside the inputs")


def _write(folder: Path, kind: RunFolder, settings: dict, created: float | None) -> None:
    now = time.time()
    manifest = {"command": kind.command, "settings": settings, "created": created or now, "updated": now}
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


__all__ = ["LEGACY_MARKERS", "MANIFEST", "RunFolder", "RunFolderError", "claim_run_folder", "hold_folder",
           "read_manifest"]
