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
    max_diff, agree, total = 0.0, 0, 0
    nll_ref, nll_exp = 0.0, 0.0
    used = []
    for length in seq_lens:
        batches = _windows(tokens, length, windows)
        if not batches:
            continue
        used.append(length)
        for window in batches:
            x, y = window[:, :-1], window[:, 1:]
            ref = model(x).float()
            out = run(x).float()
            max_diff = max(max_diff, (ref - out).abs().max().item())
            agree += (ref.argmax(-1) == out.argmax(-1)).sum().item()
            total += y.numel()
            nll_ref += F.cross_entropy(ref.flatten(0, 1), y.flatten(), reduction="sum").item()
            nll_exp += F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum").item()
    if total == 0:
        raise VerificationError(f"not enough text to verify: {len(tokens)} tokens, need {min(seq_lens) + 1}")
    result = VerifyResult(target, used, total, max_diff, agree / total, math.exp(nll_ref / total),
                          math.exp(nll_exp / total), passed=False)
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
