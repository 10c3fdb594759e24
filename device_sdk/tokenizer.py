"""A small tokenizer interface over Hugging Face tokenizers, plus a byte tokenizer for in-process test models."""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Protocol


class Tokenizer(Protocol):
    """What the SDK needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_token_id: int
    #: What the tokenizer maps text to, as a digest: equal for tokenizers that give the same ids (the token cache's
    #: key; a name says nothing when two model folders share one, or a hub model's tokenizer changes).
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255) and an end-of-text token (id 256). Needs no files."""

    name = "bytes-v1"
    fingerprint = name
    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapts a ``transformers`` tokenizer (no special tokens added on encode)."""

    def __init__(self, tokenizer, name: str) -> None:
        self.hf = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        self.eos_token_id = int(eos) if eos is not None else 0

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer's whole definition (a fast tokenizer's JSON: vocabulary, merges, normalisation,
        pre-tokenisation; else its vocabulary), its end-of-text id and class."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else json.dumps(self.hf.get_vocab(), sort_keys=True)
        text = f"{type(self.hf).__name__}|{self.eos_token_id}|{definition}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=False)["input_ids"] if texts else []

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)
