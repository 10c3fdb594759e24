"""Text generation over an export folder made with ``--kv-cache``: one prefill call for the prompt, then one decode
call per new token, streaming token ids; greedy, temperature and top-p sampling, stop tokens, and the tokenizer's
chat template (SmolLM2-Instruct's ChatML).

Needs no model code: the tokenizer comes from ``tokenizer.json`` (the ``tokenizers`` library) and the chat template
from ``chat_template.jinja`` / ``tokenizer_config.json`` (rendered with jinja2, sandboxed).

    gen = open_export("phone/", runtime="pte")
    for token in gen.stream(gen.tokens.chat([{"role": "user", "content": "Hello"}]), SamplingConfig()):
        print(gen.tokens.decode([token]), end="")
    print(gen.stats)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ExportError
from .kv_export import KVRunner, kv_runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token.

    Attributes:
        max_new_tokens: at most this many new tokens (fewer if a stop token comes or the cache is full).
        temperature: 0 for greedy (argmax); otherwise logits are divided by it before sampling.
        top_p: sample from the smallest set of tokens whose probabilities sum to at least ``top_p`` (1: all).
        stop_tokens: generation ends after any of these ids (it is yielded); ``None``: the tokenizer's end token.
        seed: seed of the sampler (sampling only).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if problems:
            raise ExportError("invalid sampling config: " + "; ".join(problems))


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """Pick the next token from one position's logits.

    Args:
        logits: (V,) float.
        cfg: greedy when ``cfg.temperature == 0``, else temperature + top-p (nucleus) sampling.

    Returns:
        The token id.
    """
    if cfg.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)  # (V,)
    if cfg.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
        sorted_probs[before >= cfg.top_p] = 0.0  # keeps the most likely token always
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class ExportTokenizer:
    """The tokenizer of an export folder: a Hugging Face ``tokenizer.json`` (via ``tokenizers``) or raw bytes."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        spec = json.loads((folder / "tokenizer.json").read_text())
        self.bytes = spec.get("type") == "bytes-v1"
        self.template: str | None = None
        if self.bytes:
            self.eos_token_id: int | None = int(spec.get("eos_token_id", 256))
            return
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = folder / "tokenizer_config.json"
        cfg = json.loads(config.read_text()) if config.is_file() else {}
        eos = cfg.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token_id = self.tok.token_to_id(eos) if eos else None
        template = folder / "chat_template.jinja"
        self.template = template.read_text() if template.is_file() else cfg.get("chat_template")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8")) if self.bytes else self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.bytes:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.tok.decode(ids, skip_special_tokens=False)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` (``[{"role": "user", "content": ...}, ...]``) in the model's chat template,
        ending with the assistant's turn opened.

        Raises:
            ExportError: if the export has no chat template (a base model, or the byte tokenizer).
        """
        if not self.template:
            raise ExportError("this export has no chat template (chat_template.jinja); pass a plain prompt")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(self.template).render(messages=messages, add_generation_prompt=True)
        return self.encode(text)


@dataclass
class GenerationStats:
    """Timing of the last generation: one prefill call over the prompt, one decode call per further token."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_by: str = ""

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first (which the prefill call produces) per second of decode calls."""
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0

    def __str__(self) -> str:
        return (f"prefill {self.prompt_tokens} tokens at {self.prefill_tokens_per_s:.1f} tokens/s, decode "
                f"{max(self.new_tokens - 1, 0)} tokens at {self.decode_tokens_per_s:.1f} tokens/s "
                f"(stopped by {self.stopped_by})")


@dataclass
class Generator:
    """Generation over a KV-cache runner (:mod:`export.kv_export`)."""

    runner: KVRunner
    tokens: ExportTokenizer | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    def stream(self, prompt: list[int], cfg: SamplingConfig = SamplingConfig()) -> Iterator[int]:
        """Yield new token ids one by one (the stop token included, if one comes).

        Args:
            prompt: token ids, ``1 <= len(prompt) < max_seq``.

        Raises:
            ExportError: for an empty prompt or one that leaves no room in the cache.
        """
        max_seq = self.runner.max_seq
        if not prompt or len(prompt) >= max_seq:
            raise ExportError(f"the prompt has {len(prompt)} tokens; it must have 1 to {max_seq - 1} (the cache "
                              f"holds {max_seq} positions: export with a larger --max-seq)")
        stop = set(cfg.stop_tokens) if cfg.stop_tokens is not None else (
            {self.tokens.eos_token_id} if self.tokens is not None and self.tokens.eos_token_id is not None else set())
        generator = torch.Generator().manual_seed(cfg.seed)
        self.stats = stats = GenerationStats(prompt_tokens=len(prompt))
        self.runner.reset()
        start = time.perf_counter()
        logits = self.runner(torch.tensor([prompt], dtype=torch.long), 0)
        stats.prefill_seconds = time.perf_counter() - start
        pos = len(prompt)
        while True:
            token = next_token(logits, cfg, generator)
            stats.new_tokens += 1
            yield token
            if token in stop:
                stats.stopped_by = "stop token"
                return
            if stats.new_tokens >= cfg.max_new_tokens:
                stats.stopped_by = "max_new_tokens"
                return
            if pos >= max_seq:
                stats.stopped_by = "cache full"
                return
            start = time.perf_counter()
            logits = self.runner(torch.tensor([[token]], dtype=torch.long), pos)
            stats.decode_seconds += time.perf_counter() - start
            pos += 1

    def generate(self, prompt: list[int], cfg: SamplingConfig = SamplingConfig()) -> list[int]:
        """The new token ids (see :meth:`stream`)."""
        return list(self.stream(prompt, cfg))


def open_export(folder: Path, runtime: str = "pte", onnx_file: str = "model.onnx") -> Generator:
    """A :class:`Generator` over an export folder made with ``--kv-cache``.

    Args:
        runtime: ``pte`` (ExecuTorch, ``model.pte``) or ``onnx`` (onnxruntime, ``onnx_file``).

    Raises:
        ExportError: if the folder has no manifest, holds programs without a KV cache, or lacks the file.
    """
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ExportError(f"{folder} has no manifest.json: not an export folder of this SDK")
    export = json.loads(manifest_path.read_text())["export"]
    if not export.get("kv_cache"):
        raise ExportError(f"{folder} holds programs without a KV cache; export with --kv-cache to generate")
    if runtime not in ("pte", "onnx"):
        raise ExportError(f"runtime must be pte or onnx, got {runtime!r}")
    path = folder / ("model.pte" if runtime == "pte" else onnx_file)
    if not path.is_file():
        raise ExportError(f"{folder} has no {path.name}")
    return Generator(kv_runner(path, int(export["max_seq"])), ExportTokenizer(folder))


__all__ = ["ExportTokenizer", "GenerationStats", "Generator", "SamplingConfig", "next_token", "open_export"]
