"""The ExecuTorch training program and backend against eager autograd (tiny GPT-2 and Llama LoRA-MoE models).

Each program is exported once per module, from a one-layer tiny model (the joint graph takes about a minute per
layer to lower on a loaded 2-core machine).
Tolerances: the program's loss equals eager's within 1e-5 absolute and each gradient within 1e-4 of the largest
gradient entry of its tensor (fp32, different kernels: observed ~1e-6); after 10 AdamW steps the adapters agree
within 2e-4 absolute (Adam's normalised updates amplify rounding while gradients are tiny).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from device_sdk.backends.executorch import (
    ProgramGradients,
    ProgramModel,
    TrainProgram,
    TrainProgramError,
    attach_program,
    program_valid_loss,
)
from device_sdk.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from device_sdk.config import AdapterConfig, TrainConfig
from device_sdk.data import UserData
from device_sdk.errors import ConfigError
from device_sdk.inject import inject_adapters
from device_sdk.models import load_base_model
from device_sdk.parts import EXPERT_ROLES, Role, role_parameters
from device_sdk.train import expert_step, init_train_state, objective, router_step, train_local

pytest.importorskip("executorch")

B, T = 2, 16
#: (family, mixing): both model families and both mixture forms.
CASES = [("tiny-gpt2", "mlp"), ("tiny-llama", "projection")]
CFG = TrainConfig(steps=10, batch_size=B, context=T, lr_experts=1e-2, lr_router=1e-2, router_period=3,
                  router_steps=1, lb_mode="importance", weight_decay=0.01, device="cpu", precision="fp32")
DATA = UserData("u", *(np.random.default_rng(i).integers(0, 257, 3000) for i in range(3)))


def _model(family: str, mixing: str, seed: int = 0, n_specialists: int = 1, alpha: float = 16.0):
    """The tiny base cut to one layer (the joint graph's export time grows with the layers), with adapters whose
    LoRA B matrices are random (every expert contributes)."""
    base = load_base_model(family, seed=0).model
    if family == "tiny-gpt2":
        base.transformer.h = base.transformer.h[:1]
        base.config.n_layer = 1
    else:
        base.model.layers = base.model.layers[:1]
        base.config.num_hidden_layers = 1
    torch.manual_seed(seed + 1)
    model = inject_adapters(base, AdapterConfig(mixing=mixing, n_specialists=n_specialists, routing="dense",
                                                alpha=alpha))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    return model


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 257, (B, T + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request, tmp_path_factory):
    """(family, mixing, program folder) with the program exported from :func:`_model`."""
    family, mixing = request.param
    folder = tmp_path_factory.mktemp(f"{family}-{mixing}")
    attach_program(_model(family, mixing), replace(CFG, backend="executorch", program=str(folder)), family)
    return family, mixing, folder


def _executorch(folder) -> TrainConfig:
    return replace(CFG, backend="executorch", program=str(folder))


def _params(model, roles=frozenset(Role)):
    return {n: p.detach().clone() for n, p in role_parameters(model, roles).items()}


def test_loss_and_every_gradient_match_eager_autograd(case):
    family, mixing, folder = case
    model = _model(family, mixing)
    program = TrainProgram(folder)
    program.write_parameters(_params(model))
    x, y = _batch(7)
    losses, grads = program.forward_backward(x, y)
    total, lm, lb = objective(model, x, y, CFG)
    total.backward()
    assert losses["loss"] == pytest.approx(total.item(), abs=1e-5)
    assert losses["lm"] == pytest.approx(lm.item(), abs=1e-5)
    assert losses["lb"] == pytest.approx(lb.item(), abs=1e-5)
    params = role_parameters(model, set(Role))
    assert set(grads) == set(params)
    for name, p in params.items():
        scale = p.grad.abs().max().item() + 1e-12
        assert (grads[name] - p.grad).abs().max().item() <= 1e-4 * scale, name
    assert any(n.endswith("router.weight") for n in grads)


def test_ten_adamw_steps_track_eager_adamw(case):
    family, mixing, folder = case
    eager, program = _model(family, mixing), _model(family, mixing)
    eager_result, eager_state = train_local(eager, DATA, CFG)
    program_result, program_state = train_local(program, DATA, _executorch(folder))
    assert program_state.program is not None and eager_state.program is None
    assert len(program_result.router) == len(eager_result.router) == 3  # tau = 3: router steps at 3, 6, 9
    for a, b in zip(eager_result.train + eager_result.router, program_result.train + program_result.router):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    want, got = _params(eager), _params(program)
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 2e-4, name
    assert program_state.schedule.last_epoch == eager_state.schedule.last_epoch == 10


def test_an_app_holding_only_the_program_trains_like_the_sdk(case):
    """The edge app's path: the SDK's loop and AdamW over the program's own tensors (no PyTorch model)."""
    family, mixing, folder = case
    eager = _model(family, mixing)
    program = TrainProgram(folder)
    program.write_parameters(_params(eager))
    app = ProgramModel(program)
    assert {n: p.shape for n, p in app.named_parameters()} == {n: p.shape for n, p in eager.named_parameters()
                                                                if n in program.meta.parameters}
    cfg = _executorch(folder)
    state = init_train_state(app, cfg)
    state.program = ProgramGradients(app, program)
    result, _ = train_local(app, DATA, cfg, state, validate=lambda _: program_valid_loss(program, DATA.valid))
    train_local(eager, DATA, CFG)
    for name, p in app.named_parameters():
        assert torch.equal(p.detach(), program.parameters()[name]), name  # trained in the program's memory
    want = _params(eager)
    for name, p in app.named_parameters():
        assert (p.detach() - want[name]).abs().max().item() <= 2e-4, name
    assert result.valid[-1]["loss"] > 0


def test_expert_step_leaves_router_bit_identical_and_router_step_leaves_experts(case):
    family, mixing, folder = case
    model = _model(family, mixing)
    cfg = _executorch(folder)
    state = init_train_state(model, cfg)
    state.program = attach_program(model, cfg)
    routers, experts = _params(model, Role.ROUTER), _params(model, EXPERT_ROLES)
    expert_step(model, state, *_batch(1), cfg)
    for name, p in role_parameters(model, Role.ROUTER).items():
        assert torch.equal(p, routers[name]) and p.grad is None, name
    assert any(not torch.equal(p, experts[n]) for n, p in role_parameters(model, EXPERT_ROLES).items())
    experts = _params(model, EXPERT_ROLES)
    router_step(model, state, *_batch(2), cfg)
    for name, p in role_parameters(model, EXPERT_ROLES).items():
        assert torch.equal(p, experts[name]) and p.grad is None, name
    assert all(not torch.equal(p, routers[n]) for n, p in role_parameters(model, Role.ROUTER).items())


def test_a_checkpoint_of_the_executorch_backend_resumes_identically_in_either_backend(case, tmp_path):
    family, mixing, folder = case
    first = replace(_executorch(folder), steps=4, schedule_steps=8)
    model = _model(family, mixing)
    _, state = train_local(model, DATA, first)
    save_checkpoint(tmp_path, model, state, family, {"round": 1})
    _, state = train_local(model, DATA, first, state)  # the uninterrupted run
    reference = _params(model)
    for backend in ("executorch", "pytorch"):
        cfg = replace(first, backend=backend)
        resumed = _model(family, mixing, seed=123)  # other initial adapters: all must come from the checkpoint
        resumed_state = init_train_state(resumed, cfg)
        info = load_checkpoint(latest_checkpoint(tmp_path), resumed, resumed_state, family)
        assert info["step"] == 4
        train_local(resumed, DATA, cfg, resumed_state)
        got = _params(resumed)
        tol = 0.0 if backend == "executorch" else 1e-4  # same program: bit-identical; eager: rounding only
        for name in reference:
            assert (got[name] - reference[name]).abs().max().item() <= tol, (backend, name)


def test_a_program_that_does_not_fit_is_rejected(case, tmp_path):
    family, mixing, folder = case
    other = _model(family, mixing, n_specialists=2)  # other names and shapes
    with pytest.raises(TrainProgramError, match="parameter names differ"):
        attach_program(other, _executorch(folder))
    with pytest.raises(TrainProgramError, match="8 x 16"):
        attach_program(_model(family, mixing), replace(_executorch(folder), batch_size=8))
    # the same tensors, another computation: the other mixing form, another LoRA scale
    other_mixing = "projection" if mixing == "mlp" else "mlp"
    with pytest.raises(TrainProgramError, match=f"another adapter: mixing '{mixing}' \\(program\\) vs "
                                                f"'{other_mixing}' \\(adapters\\)"):
        attach_program(_model(family, other_mixing), _executorch(folder))
    with pytest.raises(TrainProgramError, match="another adapter: alpha 16.0 \\(program\\) vs 8.0 \\(adapters\\)"):
        attach_program(_model(family, mixing, alpha=8.0), _executorch(folder))
    with pytest.raises(TrainProgramError, match="unexpected"):
        TrainProgram(folder).write_parameters(_params(other))
    with pytest.raises(TrainProgramError, match="shape"):
        TrainProgram(folder).forward_backward(*(t[:1] for t in _batch(0)))
    with pytest.raises(TrainProgramError, match="holds no training program"):
        TrainProgram(tmp_path)


def test_the_backend_setting_is_validated_early():
    with pytest.raises(ConfigError, match="backend must be one of"):
        TrainConfig(backend="tflite")
    with pytest.raises(ConfigError, match="fp32"):
        TrainConfig(backend="executorch", precision="bf16")
    assert TrainConfig(backend="executorch").precision == "fp32"
    assert TrainConfig(backend="executorch").device == "cpu"


def test_the_executorch_backend_refuses_a_regularizer(case):
    family, mixing, folder = case
    with pytest.raises(ConfigError, match="regularizer"):
        train_local(_model(family, mixing), DATA, _executorch(folder), regularizer=lambda m: torch.zeros(()))


def test_the_program_data_file_is_keyed_by_parameter_name(case):
    from export.executorch import read_ptd

    family, mixing, folder = case
    keys = set(read_ptd(folder / "trainable.ptd"))
    assert keys == {"model." + n for n in role_parameters(_model(family, mixing), set(Role))}


def test_the_pte_train_format_refuses_quantisation_and_a_missing_checkpoint(tmp_path, capsys):
    from export.__main__ import main

    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--format",
                 "pte-train"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out"), "--format", "pte-train",
                 "--quantize", "8da4w"]) == 2
    assert "fp32 base" in capsys.readouterr().err


def test_the_rewrites_keep_the_graph_s_results():
    """addmm -> mm + add (with alpha and beta), mm -> bmm of one batch and empty_permuted -> empty + permute,
    checked on tiny graphs."""
    from export.train_program import rewrite_for_training

    class AddMM(torch.nn.Module):
        def forward(self, b, x, w):
            return torch.addmm(b, x, w, beta=2.0, alpha=3.0)

    class EmptyPermuted(torch.nn.Module):
        def forward(self, x):
            return torch.empty_permuted((2, 3, 4), (2, 0, 1)).fill_(1.0) * x

    args = (torch.randn(3), torch.randn(2, 4), torch.randn(4, 3))
    gm = torch.export.export(AddMM(), args).graph_module
    assert rewrite_for_training(gm) == {"addmm": 1, "empty_permuted": 0, "mm": 1}  # the addmm's mm too
    assert not [n for n in gm.graph.nodes if n.target == torch.ops.aten.mm.default]
    assert torch.allclose(gm(*args)[0], torch.addmm(*args, beta=2.0, alpha=3.0), atol=1e-6)
    x = torch.randn(2, 3, 4)
    gm = torch.export.export(EmptyPermuted(), (x,)).graph_module
    assert rewrite_for_training(gm) == {"addmm": 0, "empty_permuted": 1, "mm": 0}
    out = gm(x)[0]
    assert out.shape == (2, 3, 4) and torch.equal(out, x)
    assert out.stride() == torch.empty_permuted((2, 3, 4), (2, 0, 1)).stride()

    class MM(torch.nn.Module):
        def forward(self, a, b):
            return (torch.mm(a.t(), b),)

    args = (torch.randn(5, 4), torch.randn(5, 3))
    gm = torch.export.export(MM(), args).graph_module
    assert rewrite_for_training(gm)["mm"] == 1
    assert [n.target for n in gm.graph.nodes].count(torch.ops.aten.bmm.default) == 1
    assert gm(*args)[0].shape == (4, 3) and torch.allclose(gm(*args)[0], args[0].t() @ args[1], atol=1e-6)
