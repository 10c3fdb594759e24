"""The server rules: one round's uploads -> one global tensor dict, each a pure function; :data:`RULES` maps a
rule's name to it.

- ``mean`` / ``token_weighted``: the (token-weighted) mean of every upload (FedAvg; FFA-LoRA, whose uploads hold
  its B matrices only, see :mod:`device_sdk.federated.catalog`). A server may stream it with
  :class:`~device_sdk.federated.tensors.RunningMean` and :func:`weight_for`: the same arithmetic.
- ``hetlora``: factors zero-padded to the largest rank, averaged with weights ``||gamma_i B_i A_i||_F``.
- ``flexlora``: the token-weighted mean update ``Delta W``, factorised by a truncated SVD.
- ``pcl_relay``: every upload relayed under ``peer<j>/<name>`` (each device mixes on its own data).

What each device then loads (the receive step) is the device's business (:mod:`device_sdk.strategies`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import InvalidUpload
from .tensors import fit, lora_pairs, mean
from .upload import Upload, largest

#: ``rule(uploads)``: the global tensors of one round's uploads (in device order).
Rule = Callable[[list[Upload]], dict[str, torch.Tensor]]

#: Rules a server can compute as a running sum, one upload at a time (:func:`weight_for` gives each weight).
MEAN_RULES = ("mean", "token_weighted")
#: Rules that weigh each upload by its training tokens (besides ``token_weighted``, a mean rule).
TOKEN_RULES = ("flexlora",)


def check_tokens(tokens: int, rule: str) -> int:
    """``tokens`` if positive; a rule that weighs uploads by their training tokens needs that.

    Raises:
        InvalidUpload: for a token count that is not positive.
    """
    if tokens <= 0:
        raise InvalidUpload(f"{rule} weighs uploads by their training tokens and needs a positive token count, got "
                            f"{tokens}; send the number of training tokens of the round as safetensors metadata "
                            "'tokens'")
    return tokens


def weight_for(rule: str, tokens: int) -> float:
    """Weight of one upload in a mean rule: 1 (the uniform mean, as in the paper) or its training tokens.

    Raises:
        InvalidUpload: for a token count that is not positive under ``token_weighted``, or a rule that is not a
            mean rule.
    """
    if rule == "mean":
        return 1.0
    if rule == "token_weighted":
        return float(check_tokens(tokens, "token-weighted aggregation"))
    raise InvalidUpload(f"unknown aggregation rule {rule!r}; choose from {MEAN_RULES}")


def mean_rule(uploads: list[Upload]) -> dict[str, torch.Tensor]:
    """The uniform mean of the uploads (float64 sums)."""
    return mean([u.tensors for u in uploads])


def token_weighted_rule(uploads: list[Upload]) -> dict[str, torch.Tensor]:
    """The mean of the uploads weighted by their training tokens."""
    return mean([u.tensors for u in uploads], [weight_for("token_weighted", u.tokens) for u in uploads])


def hetlora_rule(uploads: list[Upload]) -> dict[str, torch.Tensor]:
    """HetLoRA (Cho et al., 2023): every factor zero-padded to the largest rank, averaged with weights
    ``||gamma_i B_i A_i||_F`` per module (``gamma_i`` the module's own scale on device ``i``, from its rank;
    float64 sums).

    Shape:
        Upload ``i``: ``A`` (r_i, D_in), ``B`` (D_out, r_i). Result: ``A`` (max r_i, D_in), ``B`` (D_out, max r_i).
    """
    merged = {}
    for a_name, b_name in lora_pairs(uploads[0].tensors).values():
        norms = [u.scale_of(a_name) * float(torch.linalg.matrix_norm(u.tensors[b_name] @ u.tensors[a_name]))
                 for u in uploads]
        total = sum(norms)
        weights = [n / total if total > 0 else 1 / len(uploads) for n in norms]
        for name in (a_name, b_name):
            shape = list(largest(uploads, name).shape)
            acc = torch.zeros(shape, dtype=torch.float64)
            for w, u in zip(weights, uploads):
                acc += w * fit(u.tensors[name], shape).to(torch.float64)
            merged[name] = acc.to(torch.float32)
    return merged


def svd_factors(delta: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scale * B @ A`` the best rank-``rank`` approximation of ``delta`` (D_out, D_in).

    Returns:
        ``A`` (rank, D_in) and ``B`` (D_out, rank), float32, the singular values split evenly between them.
    """
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    k = min(rank, s.numel())
    root = (s[:k] / scale).sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root[None, :]
    return a.float(), b.float()


def average_delta(uploads: list[Upload], a_name: str, b_name: str) -> torch.Tensor:
    """Token-weighted mean over devices of ``gamma_i B_i A_i`` (D_out, D_in), in float64 (``gamma_i`` the module's
    scale on device ``i``, from its rank)."""
    total = sum(u.tokens for u in uploads)
    acc = None
    for u in uploads:
        w = u.tokens / total if total > 0 else 1 / len(uploads)
        delta = u.scale_of(a_name) * (u.tensors[b_name].to(torch.float64) @ u.tensors[a_name].to(torch.float64))
        acc = w * delta if acc is None else acc + w * delta
    return acc


def flexlora_rule(uploads: list[Upload]) -> dict[str, torch.Tensor]:
    """FlexLoRA (Bai et al., 2024): per module, the token-weighted mean ``Delta W``, factorised to the largest
    uploaded rank with scale 1 (each device keeps its first ``r_i`` components and divides by ``sqrt(gamma_i)``).

    Shape:
        Result: ``A`` (max r_i, D_in), ``B`` (D_out, max r_i).
    """
    merged = {}
    for a_name, b_name in lora_pairs(uploads[0].tensors).values():
        rank = max(u.tensors[a_name].shape[0] for u in uploads)
        merged[a_name], merged[b_name] = svd_factors(average_delta(uploads, a_name, b_name), rank, 1.0)
    return merged


def bundle(uploads: list[Upload]) -> dict[str, torch.Tensor]:
    """PCL's relay: every upload's tensors under ``peer<j>/<name>`` (``j``: position in ``uploads``)."""
    return {f"peer{j}/{name}": t for j, u in enumerate(uploads) for name, t in u.tensors.items()}


def unbundle(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The uploads of a :func:`bundle`, in order.

    Raises:
        InvalidUpload: if a name is not ``peer<j>/<name>``.
    """
    peers: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        head, sep, name = key.partition("/")
        if not (sep and head.startswith("peer") and head[4:].isdigit()):
            raise InvalidUpload(f"PCL expects a bundle of peer models named 'peer<j>/<tensor>', got {key!r}")
        peers.setdefault(int(head[4:]), {})[name] = t
    return [peers[j] for j in sorted(peers)]


#: Every server rule by name.
RULES: dict[str, Rule] = {
    "mean": mean_rule,
    "token_weighted": token_weighted_rule,
    "hetlora": hetlora_rule,
    "flexlora": flexlora_rule,
    "pcl_relay": bundle,
}
