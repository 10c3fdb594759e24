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
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
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


def _tokenize_file(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    docs = read_documents(path)
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
    """Token ids of a text file, cached under ``cache_dir/tokens`` by file content and tokenizer name."""
    if cache_dir is None:
        return _tokenize_file(path, tokenizer)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:24]
    key = hashlib.sha256(f"{_CACHE_FORMAT}|{tokenizer.name}|{digest}".encode()).hexdigest()[:32]
    cached = Path(cache_dir) / "tokens" / f"{key}.npy"
    if cached.is_file():
        return np.load(cached, allow_pickle=False)
    log.info("tokenising %s (cached as %s)", path, cached.name)
    tokens = _tokenize_file(path, tokenizer)
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


def ood_mixture(users: list[UserData], split: str) -> np.ndarray:
    """A uniform mixture of all users' ``split`` streams: the same number of tokens from each user (the smallest
    stream's size divided by the number of users), so the mixture is about as large as the smallest stream."""
    share = min(len(u.split(split)) for u in users) // len(users)
    return np.concatenate([u.split(split)[:share] for u in users])


def load_users(root: Path, tokenizer: Tokenizer, users: list[str] | None = None, ood: bool = False,
               cache_dir: Path | None = None) -> list[UserData]:
    """Load every user folder under ``root`` (or the named ones).

    Args:
        ood: if true, every user's valid and test streams become the uniform mixture of all users' streams
            (out-of-distribution setting: train on one's own topic, target the mixture).

    Raises:
        DataError: if ``root`` has no user folders or a named user is missing.
    """
    root = Path(root)
    if users is None:
        users = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if not users:
            raise DataError(f"{root} holds no user folders (expected {root}/<user>/train.txt[.gz] ...)")
    data = [load_user_data(root / u, tokenizer, cache_dir) for u in users]
    if ood:
        valid, test = ood_mixture(data, "valid"), ood_mixture(data, "test")
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


def eval_windows(tokens: np.ndarray, context: int, batch_size: int,
                 max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, non-overlapping windows covering the stream (or its first ``max_tokens`` tokens).

    Every token after the first is predicted exactly once. Full windows come in batches of up to ``batch_size``;
    a final shorter window (if any) comes alone.

    Yields:
        ``(x, y)``, (b, t) int64 each.
    """
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
