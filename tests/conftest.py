"""Shared fixtures: tiny in-process models and the real per-user text in ../shared/data (skipped when absent)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no test may reach a model hub

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from device_sdk.config import AdapterConfig  # noqa: E402
from device_sdk.inject import inject_adapters  # noqa: E402
from device_sdk.models import load_base_model  # noqa: E402
# Two threads at most; under pytest-xdist the workers split the cores between them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "multilingual").is_dir():
        pytest.skip(f"real per-user data not found at {SHARED_DATA} (tests read ../shared/data beside the project)")
    return SHARED_DATA


def make_model(family: str = "tiny-llama", seed: int = 0, adapter_seed: int | None = None,
               **adapter_kwargs) -> torch.nn.Module:
    """A tiny base model (initialised with ``seed``) with adapters (initialised with ``adapter_seed``); LoRA B
    matrices are randomised so every expert contributes."""
    base = load_base_model(family, seed=seed).model
    torch.manual_seed(seed + 1 if adapter_seed is None else adapter_seed)
    model = inject_adapters(base, AdapterConfig(**adapter_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    return model


@pytest.fixture
def tiny_user(tmp_path: Path) -> Path:
    """A small user folder of made-up but varied text (no ../shared needed)."""
    folder = tmp_path / "user"
    folder.mkdir()
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
             "upsilon phi chi psi omega").split()
    g = torch.Generator().manual_seed(0)
    for split, n_docs in (("train", 40), ("valid", 10), ("test", 10)):
        docs = []
        for _ in range(n_docs):
            idx = torch.randint(0, len(words), (60,), generator=g).tolist()
            docs.append(" ".join(words[i] for i in idx[:30]) + "\n" + " ".join(words[i] for i in idx[30:]))
        (folder / f"{split}.txt").write_text("\n\n".join(docs) + "\n")
    return folder
