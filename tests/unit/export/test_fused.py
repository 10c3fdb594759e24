"""Fused adapter products of the ExecuTorch KV program (export/fused.py) and the adapter layout rule they share with
the adapter update (export/adapter_layout.py): the fused program computes what the model computes in every mixing
form and expert count, also quantised, with far fewer products per token; its constants are exactly what the
layout rule builds from the adapter files; bad layouts and adapters of another shape fail clearly. (The lowered
program and an update of its adapters: test_kv_export.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from device_sdk.inject import use_export_form
from device_sdk.parts import iter_role_parameters
from export.adapter_layout import FusedTensor, build_all, load_layout, save_layout
from export.errors import ExportError
from export.fused import FusedProjectionMLP, fuse_adapters
from export.kv import KVCacheLM
from export.quantize import quantize_program

from ...conftest import make_model


def adapter_files(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors as the adapter files name them."""
    return {name: p.detach().clone() for name, p, _ in iter_role_parameters(model)}


def decode(program: torch.nn.Module, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of positions ``prefill - 1 .. T - 1``: one prefill call, then one decode call per token."""
    with torch.no_grad():
        out = [program(x[:, :prefill], torch.tensor([0]))[0, -1]]
        out += [program(x[:, i : i + 1], torch.tensor([i]))[0, -1] for i in range(prefill, x.shape[1])]
    return torch.stack(out)


@pytest.mark.parametrize("mixing,n_specialists", [("mlp", 2), ("mlp", 1), ("projection", 2), ("projection", 0)])
def test_the_fused_program_computes_what_the_model_computes(mixing, n_specialists):
    model = use_export_form(make_model("tiny-llama", n_specialists=n_specialists, mixing=mixing)).eval()
    x = torch.randint(0, 257, (1, 20))
    with torch.no_grad():
        ref = model(input_ids=x).logits[0, 9:]
    program, layout = fuse_adapters(KVCacheLM(model, 32))
    fused_mlp = mixing == "projection" or n_specialists == 0  # whole-MLP experts keep their own products
    assert all(isinstance(layer.mlp, FusedProjectionMLP) == fused_mlp for layer in program.model.model.layers)
    assert all(hasattr(layer.self_attn, "lora_fused") for layer in program.model.model.layers)
    torch.testing.assert_close(decode(program, x, 10), ref, atol=2e-5, rtol=2e-5)
    # the model itself is untouched (it is verified against the program afterwards)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits[0, 9:], ref)


@pytest.mark.parametrize("scheme", ["8da4w", "8da8w"])
def test_fusing_a_quantised_program_keeps_its_function(scheme):
    """Q4_1 base linears that read one input share one block-sum product; the result is the unfused program's."""
    model = use_export_form(make_model("tiny-llama", n_specialists=2)).eval()
    quantised, _ = quantize_program(KVCacheLM(model, 32), scheme, group_size=32)
    x = torch.randint(0, 257, (1, 16))
    ref = decode(quantised, x, 8)
    quantised.reset()
    fused, _ = fuse_adapters(quantised)
    torch.testing.assert_close(decode(fused, x, 8), ref, atol=1e-4, rtol=1e-4)


class CountProducts(TorchDispatchMode):
    """Counts the matrix products (and grouped convolutions) that a forward pass runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                    torch.ops.aten.convolution.default):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mixing", ["mlp", "projection"])
def test_a_fused_decode_step_runs_fewer_products(mixing):
    """One decode token of a 1G2S tiny Llama (2 layers), 8da4w. Per layer the attention's stacked A saves 2
    products and q, k and v's shared Q4_1 block sums 2 more; projection experts also run each projection's experts
    as 2 products instead of 6, and need no gate columns. Whole-MLP experts keep theirs."""
    model = use_export_form(make_model("tiny-llama", n_specialists=2, mixing=mixing)).eval()
    quantised, _ = quantize_program(KVCacheLM(model, 32), "8da4w", group_size=32)
    fused, _ = fuse_adapters(quantised)
    counts = {}
    for name, program in (("unfused", quantised), ("fused", fused)):
        with torch.no_grad():
            program(torch.randint(0, 257, (1, 8)), torch.tensor([0]))
            with CountProducts() as counter:
                program(torch.randint(0, 257, (1, 1)), torch.tensor([8]))
        counts[name] = counter.calls
    saved = {"mlp": 4, "projection": 4 + 3 * 4 + 3 + 1}[mixing]  # + 3 x (6 - 2) expert products, 3 gate columns, 1 sum
    assert counts["unfused"] - counts["fused"] == 2 * saved, counts


def test_the_program_constants_are_what_the_layout_builds_from_the_adapter_files():
    """The one rule: the constants the export puts into the program are those the adapter update builds from a
    checkpoint's tensors (names as in the adapter files), and every adapter tensor has its place."""
    model = use_export_form(make_model("tiny-llama", n_specialists=2)).eval()
    files = adapter_files(model)
    program, layout = fuse_adapters(KVCacheLM(model, 32))
    assert {s for f in layout for s in f.sources} == set(files)
    assert len({f.name for f in layout}) == len(layout) < len(files)
    built = build_all(layout, files)
    for fused in layout:
        torch.testing.assert_close(program.model.get_parameter(fused.name).detach(), built[fused.name],
                                   atol=0, rtol=0)


def test_the_layout_round_trips_and_refuses_what_does_not_fit(tmp_path):
    model = use_export_form(make_model("tiny-llama", n_specialists=2)).eval()
    files = adapter_files(model)
    _, layout = fuse_adapters(KVCacheLM(model, 32))
    save_layout(tmp_path, layout)
    assert load_layout(tmp_path) == layout
    assert load_layout(tmp_path / "elsewhere") is None  # no file: every adapter tensor stored as it is

    missing = dict(files)
    missing.pop(next(iter(files)))
    with pytest.raises(ExportError, match="is missing .* export it again"):
        build_all(layout, missing)
    with pytest.raises(ExportError, match="1 adapter tensor\\(s\\) have no place in this program"):
        build_all(layout, {**files, "model.layers.0.mlp.mlp.gate_proj.experts.3.lora_A": torch.zeros(8, 64)})
    wrong = {name: (t[:, :-1] if name.endswith("q_proj.lora.lora_A") else t) for name, t in files.items()}
    with pytest.raises(ExportError, match="do not fit together"):
        build_all(layout, wrong)

    payload = json.loads((tmp_path / "adapter_layout.json").read_text())
    (tmp_path / "adapter_layout.json").write_text(json.dumps({**payload, "version": 99}))
    with pytest.raises(ExportError, match="layout version 99"):
        load_layout(tmp_path)
    (tmp_path / "adapter_layout.json").write_text('{"version": 1, "tensors": [{"name": "x"}]}')
    with pytest.raises(ExportError, match="not a readable adapter layout"):
        load_layout(tmp_path)
    with pytest.raises(ExportError, match="unknown kind"):
        FusedTensor("x", "diagonal", ("a",))


def test_the_slot_and_side_by_side_kinds_place_each_tensor_where_the_products_read_it():
    b = torch.arange(6.0).view(3, 2)
    placed = FusedTensor("b", "slot_cols", ("b",), scale=2.0, slot=1, slots=3).build({"b": b})
    assert placed.shape == (3, 6)
    torch.testing.assert_close(placed[:, 2:4], 2 * b)
    assert placed[:, :2].abs().sum() == 0 and placed[:, 4:].abs().sum() == 0
    side = FusedTensor("s", "cols", ("b", "c"), scale=0.5).build({"b": b, "c": b + 1})
    assert side.shape == (3, 4)
    torch.testing.assert_close(side[:, 2:], 0.5 * (b + 1))


class BatchedAdapter(torch.nn.Module):
    """``input_ids (1, T) -> (3, T, 16)``: a base product, then a batched product whose second operand is an adapter
    (XNNPACK takes such an operand as a runtime input of its delegate, not as a packed constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.base = torch.nn.Parameter(torch.randn(24, 1), requires_grad=False)
        self.model.experts = torch.nn.Parameter(torch.randn(3, 8, 16), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.linear(input_ids.float().unsqueeze(-1), self.model.base)  # (1, T, 24)
        return torch.bmm(x.view(-1, 3, 8).permute(1, 0, 2), self.model.experts)


def test_an_adapter_a_delegate_takes_as_input_is_stored_and_updated_with_the_adapters(tmp_path):
    from export.executorch import PteRunner, export_pte, write_adapters

    module = BatchedAdapter().eval()
    export_pte(module, tmp_path, 8, {"experts": module.model.experts})
    x = torch.randint(0, 5, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(PteRunner(tmp_path / "model.pte")(x), module(x), atol=1e-4, rtol=1e-4)
        module.model.experts.mul_(-2.0)
        write_adapters(tmp_path, {"experts": module.model.experts})
        torch.testing.assert_close(PteRunner(tmp_path / "model.pte")(x), module(x), atol=1e-4, rtol=1e-4)
