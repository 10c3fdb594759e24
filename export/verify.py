"""Parity of an exported model with the PyTorch model: logits, argmax agreement and perplexity on real text.

Run automatically after every export (a failed check fails the export with the numbers) and on demand:
``python -m export verify --checkpoint DIR --out EXPORT_DIR``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import VerificationError

#: Short prose in the four languages of the default users and English, for parity checks without user data.
SAMPLE_TEXT = """\
The train left the station a few minutes late, and the passengers settled into their seats with newspapers, \
sandwiches and the quiet patience of people who travel the same line every morning.
Der Zug verließ den Bahnhof mit einigen Minuten Verspätung, und die Fahrgäste machten es sich mit Zeitungen und \
belegten Broten bequem, wie Menschen, die jeden Morgen dieselbe Strecke fahren.
Le train a quitté la gare avec quelques minutes de retard, et les voyageurs se sont installés avec leurs journaux \
et leurs sandwichs, comme des gens qui prennent la même ligne chaque matin.
Il treno lasciò la stazione con qualche minuto di ritardo e i passeggeri si sistemarono con giornali e panini, \
come chi percorre la stessa linea ogni mattina.
De trein vertrok met een paar minuten vertraging van het station, en de reizigers installeerden zich met kranten \
en broodjes, zoals mensen die elke ochtend dezelfde lijn nemen.
To save a document under another name, choose File - Save As, type a new name in the dialog and press Enter; the \
original file stays unchanged on the disk.
"""


@dataclass(frozen=True)
class Tolerance:
    max_abs_logit_diff: float = 5e-3
    min_argmax_agreement: float = 0.99
    max_ppl_rel_diff: float = 1e-3


@dataclass
class VerifyResult:
    """Parity numbers of one exported file against PyTorch."""

    target: str
    seq_lens: list[int]
    tokens: int
    max_abs_logit_diff: float
    argmax_agreement: float
    ppl_pytorch: float
    ppl_exported: float
    passed: bool

    @property
    def ppl_rel_diff(self) -> float:
        return abs(self.ppl_exported - self.ppl_pytorch) / self.ppl_pytorch

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_rel_diff": self.ppl_rel_diff}


def _windows(tokens: np.ndarray, length: int, count: int) -> list[torch.Tensor]:
    n = min(count, (len(tokens) - 1) // length)
    return [torch.from_numpy(np.asarray(tokens[i * length : i * length + length + 1], dtype=np.int64))[None]
            for i in range(n)]


@torch.no_grad()
def compare(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], tokens: np.ndarray, target: str,
            seq_lens: tuple[int, ...] = (16, 64), windows: int = 4, tol: Tolerance = Tolerance()) -> VerifyResult:
    """Run ``model`` and the exported ``run`` on the same windows of ``tokens`` at each sequence length.

    Args:
        model: the PyTorch model (input_ids -> logits).
        run: the exported model's runner, same signature.
        tokens: a token stream of real text, at least ``max(seq_lens) + 1`` tokens long.
    """
    tally, used = _Tally(), []
    for length in seq_lens:
        batches = _windows(tokens, length, windows)
        if not batches:
            continue
        used.append(length)
        for window in batches:
            x, y = window[:, :-1], window[:, 1:]
            tally.add(model(x).float().flatten(0, 1), run(x).float().flatten(0, 1), y.flatten())
    return tally.result(target, used, len(tokens), seq_lens, tol)


@dataclass
class _Tally:
    """Running parity statistics of exported logits against PyTorch's over the predicted tokens."""

    max_diff: float = 0.0
    agree: int = 0
    total: int = 0
    nll_ref: float = 0.0
    nll_exp: float = 0.0

    def add(self, ref: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        """``ref``, ``out``: (n, V) float logits of the same n positions; ``y``: (n,) the tokens that follow."""
        self.max_diff = max(self.max_diff, (ref - out).abs().max().item())
        self.agree += (ref.argmax(-1) == out.argmax(-1)).sum().item()
        self.total += y.numel()
        self.nll_ref += F.cross_entropy(ref, y, reduction="sum").item()
        self.nll_exp += F.cross_entropy(out, y, reduction="sum").item()

    def result(self, target: str, used: list[int], n_tokens: int, seq_lens: tuple[int, ...],
               tol: Tolerance) -> VerifyResult:
        """The verdict against ``tol``.

        Raises:
            VerificationError: if no window fitted the ``n_tokens`` of text.
        """
        if self.total == 0:
            raise VerificationError(f"not enough text to verify: {n_tokens} tokens, need {min(seq_lens) + 1}")
        result = VerifyResult(target, used, self.total, self.max_diff, self.agree / self.total,
                              math.exp(self.nll_ref / self.total), math.exp(self.nll_exp / self.total), passed=False)
        result.passed = (result.max_abs_logit_diff <= tol.max_abs_logit_diff
                         and result.argmax_agreement >= tol.min_argmax_agreement
                         and result.ppl_rel_diff <= tol.max_ppl_rel_diff)
        return result


def require(result: VerifyResult, tol: Tolerance = Tolerance()) -> None:
    """Raise with the numbers if ``result`` failed its tolerances."""
    if not result.passed:
        raise VerificationError(
            f"{result.target} does not match PyTorch: max |logit diff| {result.max_abs_logit_diff:.3g} "
            f"(limit {tol.max_abs_logit_diff}), argmax agreement {result.argmax_agreement:.4f} "
            f"(limit {tol.min_argmax_agreement}), perplexity {result.ppl_exported:.4f} vs {result.ppl_pytorch:.4f} "
            f"(relative limit {tol.max_ppl_rel_diff})")


@torch.no_grad()
def compare_kv(model: nn.Module, runner, tokens: np.ndarray, target: str, seq_lens: tuple[int, ...] = (16, 64),
               windows: int = 4, tol: Tolerance = Tolerance()) -> VerifyResult:
    """Parity of a KV-cache model (:mod:`export.kv_export`) with the full-sequence PyTorch ``model``.

    Each window of ``n`` tokens is run as a generation would: its first ``n // 2`` tokens in one prefill call,
    then the rest one decode call each; the logits of the prefill's last token and of every decoded token are
    compared with ``model``'s logits at the same positions (and give the perplexity of the tokens that follow).

    Args:
        model: the PyTorch model (input_ids (1, n) -> logits (1, n, V)).
        runner: a :class:`export.kv_export.KVRunner` (``reset()``, ``runner(ids (1, T), pos) -> (V,)``).
        tokens: a token stream of real text, at least ``min(seq_lens) + 1`` tokens long.
    """
    tally, used = _Tally(), []
    for length in seq_lens:
        batches = _windows(tokens, length, windows)
        if not batches:
            continue
        used.append(length)
        for window in batches:
            x, prefill = window[:, :-1], length // 2
            ref = model(x)[0, prefill - 1 :].float()  # (n - p + 1, V)
            runner.reset()
            out = [runner(x[:, :prefill], 0)]
            out += [runner(x[:, i : i + 1], i) for i in range(prefill, length)]
            tally.add(ref, torch.stack(out).float(), window[0, prefill:])
    return tally.result(target, used, len(tokens), seq_lens, tol)


@torch.no_grad()
def greedy_parity(model: nn.Module, runner, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy continuations of ``prompts`` by a KV-cache runner against Hugging Face ``generate`` (greedy, with its
    own KV cache) on the PyTorch model.

    Args:
        model: the HF causal LM (``Personalized.model.model``).
        runner: a :class:`export.kv_export.KVRunner`.
        prompts: token id lists; each prompt plus ``new_tokens`` must fit the runner's cache.

    Returns:
        ``{"prompts", "new_tokens", "equal" (prompts continued identically), "first_difference"}``, the last a
        ``[prompt index, token index]`` or ``None``.
    """
    from .generate import Generator, SamplingConfig

    generator, equal, first = Generator(runner), 0, None
    cfg = SamplingConfig(max_new_tokens=new_tokens, stop_tokens=())
    pad = getattr(model.config, "pad_token_id", None)
    pad = getattr(model.config, "eos_token_id", 0) if pad is None else pad
    for i, prompt in enumerate(prompts):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=pad)
        expected = out[0, len(prompt):].tolist()
        got = generator.generate(prompt, cfg)
        if got == expected:
            equal += 1
        elif first is None:
            first = [i, next(j for j, (a, b) in enumerate(zip(got, expected)) if a != b)]
    return {"prompts": len(prompts), "new_tokens": new_tokens, "equal": equal, "first_difference": first}
