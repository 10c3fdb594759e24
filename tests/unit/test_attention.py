"""The SDK's attention: fp32 when a CPU trains under bf16 autocast, Hugging Face's sdpa otherwise, masks kept."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from device_sdk.attention import NAME
from device_sdk.models import load_base_model


class _AttentionDtypes(TorchDispatchMode):
    """Records the dtype of the query of every attention kernel that runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func):
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_attention_trains_in_fp32_under_cpu_bf16_autocast_and_evaluates_in_the_input_dtype(name):
    model = load_base_model(name).model
    assert model.config._attn_implementation == NAME
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _AttentionDtypes() as spy:
        reference = model(x).logits
    assert spy.seen and set(spy.seen) == {torch.float32}
    with _AttentionDtypes() as spy, torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(x).logits  # gradients recorded: a training forward
    assert spy.seen and set(spy.seen) == {torch.float32}  # sdpa's own choice here would be bf16
    with torch.no_grad(), _AttentionDtypes() as spy, torch.autocast("cpu", dtype=torch.bfloat16):
        evaluated = model(x).logits  # no backward follows: bf16, sdpa's fast forward
    assert set(spy.seen) == {torch.bfloat16}
    model.config._attn_implementation = "sdpa"  # transformers' attention, for comparison
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x).logits
    assert torch.equal(evaluated, plain)
    assert (fast.float() - reference).abs().max() <= (plain.float() - reference).abs().max() * 1.5 + 1e-3


def test_padding_masks_still_apply_under_autocast():
    model = load_base_model("tiny-llama").model
    tokens = torch.randint(1, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), tokens], dim=1)  # left padding
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fp32 path (gradients recorded)
        alone = model(tokens).logits[0, -1].float()
        masked = model(padded, attention_mask=mask).logits[0, -1].float()
        unmasked = model(padded).logits[0, -1].float()
    assert (masked - alone).abs().max() < 0.05  # the padding is masked out (position ids aside)
    assert (unmasked - alone).abs().max() > (masked - alone).abs().max()  # and it would matter
