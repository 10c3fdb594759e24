"""Reading, tokenising (with an on-disk cache), sampling and windowing a user's text."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..fileio import atomic_write_bytes
from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_CACHE_FORMAT = "tokens-v1"


@dataclass
class UserData:
    """One user's token streams.

    Attributes:
        name: the user's name (its folder name).
        train, valid, test: 1-D integer arrays of token ids; documents are separated by the EOS token.
    """

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def split(self, name: str) -> np.ndarray:
        return getattr(self, name)


def find_split_file(folder: Path, split: str) -> Path:
    """``folder/split.txt`` or ``folder/split.txt.gz``.

    Raises:
        DataError: if the folder or the file is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; point --data to a folder with train.txt[.gz], "
                        "valid.txt[.gz] and test.txt[.gz] (build one with `python -m device_sdk.data build`)")
    for candidate in (folder / f"{split}.txt", folder / f"{split}.txt.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder} has no {split}.txt or {split}.txt.gz; a user's folder needs train, valid and test "
                    "text files (one paragraph per line, a blank line between documents)")


def read_documents(path: Path) -> list[str]:
    """Documents of a text file: paragraphs are lines, documents are separated by blank lines.

    Raises:
        DataError: if the file is not UTF-8 text or holds no text.
    """
    try:
        stored = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    return documents_of(stored, path)


def documents_of(stored: bytes, path: Path) -> list[str]:
    """:func:`read_documents` of a file's bytes as read (``path`` names it: a ``.gz`` suffix means gzip)."""
    try:
        raw = gzip.decompress(stored) if path.suffix == ".gz" else stored
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise DataError(f"cannot read {path} as UTF-8 text{' (gzip)' if path.suffix == '.gz' else ''}: {err}") from err
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    if not docs:
        raise DataError(f"{path} is empty: it holds no text")
    return docs


def _tokenize(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    chunk = 256
    for start in range(0, len(docs), chunk):
        for doc_ids in tokenizer.encode_batch(docs[start : start + chunk]):
            ids.extend(doc_ids)
            ids.append(eos)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    return np.asarray(ids, dtype=dtype)


def _atomic_save(array: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def tokenize_cached(path: Path, tokenizer: Tokenizer, cache_dir: Path | None) -> np.ndarray:
    """Token ids of a text file, cached under ``cache_dir/tokens`` by the file's content and the tokenizer's
    :attr:`~device_sdk.tokenizer.Tokenizer.fingerprint` (the bytes hashed are the bytes tokenised: a file
    rewritten meanwhile is cached under its own content)."""
    if cache_dir is None:
        return _tokenize(read_documents(path), tokenizer)
    try:
        stored = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    digest = hashlib.sha256(stored).hexdigest()[:24]
    key = hashlib.sha256(f"{_CACHE_FORMAT}|{tokenizer.fingerprint}|{digest}".encode()).hexdigest()[:32]
    cached = Path(cache_dir) / "tokens" / f"{key}.npy"
    if cached.is_file():
        return np.load(cached, allow_pickle=False)
    log.info("tokenising %s (cached as %s)", path, cached.name)
    tokens = _tokenize(documents_of(stored, path), tokenizer)
    _atomic_save(tokens, cached)
    return tokens


def load_user_data(folder: Path, tokenizer: Tokenizer, cache_dir: Path | None = None) -> UserData:
    """Tokenise (or load from cache) a user's three splits.

    Raises:
        DataError: for a missing folder or file, unreadable or empty text.
    """
    folder = Path(folder)
    splits = {s: tokenize_cached(find_split_file(folder, s), tokenizer, cache_dir) for s in SPLITS}
    return UserData(name=folder.name, **splits)


#: Longest piece (tokens) a document is cut into when streams are interleaved.
INTERLEAVE_PIECE = 512


def _pieces(stream: np.ndarray, eos: int | None, piece: int) -> list[np.ndarray]:
    """A stream cut after every ``eos`` token (documents), documents longer than ``piece`` cut into pieces."""
    ends = (np.flatnonzero(stream == eos) + 1).tolist() if eos is not None else []
    bounds = [0, *[e for e in ends if e < len(stream)], len(stream)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out.extend(stream[i : min(b, i + piece)] for i in range(a, b, piece))
    return out


def interleave(streams: list[np.ndarray], eos: int | None, piece: int = INTERLEAVE_PIECE) -> np.ndarray:
    """Mix streams document by document: the next document (or piece of at most ``piece`` tokens of a long one)
    always comes from the stream with the fewest tokens emitted so far (ties: the first), until all are used.
    Every prefix of the result therefore holds each stream in proportion, within one piece, as long as every
    stream lasts; deterministic.

    Args:
        streams: 1-D token arrays whose documents end with ``eos`` (``None``: cut in fixed pieces only).
        piece: longest contiguous piece taken at once.
    """
    if piece < 1:
        raise DataError(f"interleave piece must be >= 1 token, got {piece}")
    queues = [_pieces(np.asarray(s), eos, piece) for s in streams]
    emitted, position, out = [0] * len(streams), [0] * len(streams), []
    while True:
        open_ = [i for i, q in enumerate(queues) if position[i] < len(q)]
        if not open_:
            break
        i = min(open_, key=lambda j: (emitted[j], j))
        chunk = queues[i][position[i]]
        out.append(chunk)
        emitted[i] += len(chunk)
        position[i] += 1
    return np.concatenate(out) if out else np.zeros(0, dtype=streams[0].dtype)


def ood_mixture(users: list[UserData], split: str, eos: int | None, piece: int = INTERLEAVE_PIECE) -> np.ndarray:
    """A uniform mixture of all users' ``split`` streams: the same number of tokens from each user (the smallest
    stream's size divided by the number of users), :func:`interleave`-d document by document, so the mixture is
    about as large as the smallest stream and every prefix holds each user's text in equal shares (within one
    piece)."""
    share = min(len(u.split(split)) for u in users) // len(users)
    return interleave([u.split(split)[:share] for u in users], eos, piece)


def load_users(root: Path, tokenizer: Tokenizer, users: list[str] | None = None, ood: bool = False,
               cache_dir: Path | None = None) -> list[UserData]:
    """Load every user folder under ``root`` (or the named ones).

    Args:
        ood: if true, every user's valid and test streams become the uniform mixture of all users' streams
            (out-of-distribution setting: train on one's own topic, target the mixture), interleaved document by
            document (:func:`ood_mixture`).

    Raises:
        DataError: if ``root`` has no user folders or a named user is missing.
    """
    root = Path(root)
    if users is None:
        # hidden folders are not users (a data build's temporary ".de-xxxx", ".git", ".ipynb_checkpoints")
        listed = sorted(root.iterdir()) if root.is_dir() else []
        users = [p.name for p in listed if p.is_dir() and not p.name.startswith(".")]
        if not users:
            raise DataError(f"{root} holds no user folders (expected {root}/<user>/train.txt[.gz] ...)")
    data = [load_user_data(root / u, tokenizer, cache_dir) for u in users]
    if ood:
        eos = tokenizer.eos_token_id
        valid, test = ood_mixture(data, "valid", eos), ood_mixture(data, "test", eos)
        data = [UserData(u.name, u.train, valid, test) for u in data]
    return data


def _check_length(tokens: np.ndarray, context: int, what: str) -> None:
    if len(tokens) < context + 1:
        raise DataError(f"{what} has {len(tokens)} tokens, fewer than one window of context+1 = {context + 1}; "
                        "add text or lower --ctx")


def sample_batch(tokens: np.ndarray, batch_size: int, context: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows.

    Returns:
        ``(x, y)``, both (B, T) int64: ``y`` is ``x`` shifted by one token.
    """
    _check_length(tokens, context, "the token stream")
    starts = torch.randint(0, len(tokens) - context, (batch_size,), generator=generator).tolist()
    windows = np.stack([tokens[s : s + context + 1] for s in starts]).astype(np.int64)
    batch = torch.from_numpy(windows)
    return batch[:, :-1], batch[:, 1:]


def spread_windows(tokens: np.ndarray, context: int, max_tokens: int) -> np.ndarray:
    """``max_tokens // context`` windows of ``context + 1`` tokens at evenly spaced, deterministic starts across
    the whole stream, laid end to end as a (n, context + 1) array (every window predicts ``context`` tokens); a
    stream too short for that many non-overlapping windows gives all of its full windows instead.

    Raises:
        DataError: if the stream is shorter than one window.
    """
    _check_length(tokens, context, "the evaluation stream")
    n_full = (len(tokens) - 1) // context
    n = max(1, min(max_tokens // context, n_full))
    starts = np.linspace(0, len(tokens) - context - 1, n).round().astype(np.int64) if n < n_full else \
        np.arange(n_full) * context
    return np.stack([np.asarray(tokens[s : s + context + 1], dtype=np.int64) for s in starts])


def eval_windows(tokens: np.ndarray, context: int, batch_size: int, max_tokens: int | None = None,
                 spread: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, non-overlapping windows covering the stream (or its first ``max_tokens`` tokens).

    Every token after the first is predicted exactly once. Full windows come in batches of up to ``batch_size``;
    a final shorter window (if any) comes alone. With ``spread`` and ``max_tokens``, the windows are instead
    :func:`spread_windows` across the whole stream (a sample of every part of it, not of its first documents).

    Yields:
        ``(x, y)``, (b, t) int64 each.
    """
    if spread and max_tokens is not None and len(tokens) > context:  # shorter: the one short window below
        rows = spread_windows(tokens, context, max_tokens)
        for start in range(0, len(rows), batch_size):
            batch = torch.from_numpy(rows[start : start + batch_size])
            yield batch[:, :-1], batch[:, 1:]
        return
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    _check_length(tokens, 1, "the evaluation stream")
    n_full = (len(tokens) - 1) // context
    full = np.asarray(tokens[: n_full * context + 1], dtype=np.int64)
    for start in range(0, n_full, batch_size):
        stop = min(start + batch_size, n_full)
        rows = np.stack([full[i * context : (i + 1) * context + 1] for i in range(start, stop)])
        batch = torch.from_numpy(rows)
        yield batch[:, :-1], batch[:, 1:]
    rest = np.asarray(tokens[n_full * context :], dtype=np.int64)
    if len(rest) >= 2:
        batch = torch.from_numpy(rest)[None]
        yield batch[:, :-1], batch[:, 1:]
