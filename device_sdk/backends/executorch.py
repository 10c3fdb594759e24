"""The ExecuTorch training backend: losses and gradients from an exported training program.

A program folder (written by ``python -m export --format pte-train`` or on first use, see :func:`attach_program`)
holds ``train.pte`` (the frozen base and the joint forward/backward graph, XNNPACK), ``trainable.ptd`` (the adapter
tensors, keyed by ``model.<parameter name>``) and ``train_program.json`` (:class:`TrainProgramMeta`).

The runtime exposes the program's parameter tensors as views of its own memory (after the first call). The SDK
keeps its optimizers (torch AdamW and the one-cycle schedule of :mod:`device_sdk.train`) over ordinary tensors and
copies the adapter values into the program before each call, so checkpoints, evaluation and the shared tensors
are the same code as with the PyTorch backend. The runtime's own optimizer (SGD, opaque state) is not used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import graph_differences
from ..errors import SDKError
from ..inject import adapter_config
from ..parts import iter_role_parameters

log = logging.getLogger(__name__)

PROGRAM, TRAINABLE_DATA, META = "train.pte", "trainable.ptd", "train_program.json"
FORMAT = "comigs-train-program/1"
#: The program's outputs before its gradients.
LOSS_TERMS = ("loss", "lm", "lb")


class TrainProgramError(SDKError):
    """A training program is missing, malformed or does not fit the model or the batches."""


@dataclass(frozen=True)
class TrainProgramMeta:
    """What a training program was exported for (``train_program.json``).

    Attributes:
        base_model: the base model's name.
        base_fingerprint: sha256 over the frozen base tensors (:func:`base_fingerprint`).
        batch_size, context: the fixed (B, T) of its batches.
        lb_mode, lb_weight: the load-balancing term of its objective.
        n_generalists, mixing: the adapter shape.
        prefix: prefix of the parameter names inside the program.
        parameters: ``{name: {"shape": [...], "role": role}}`` of every trainable (adapter) tensor.
        seconds: export time.
        lowered: whether the graph was lowered to XNNPACK.
        adapter: the :class:`device_sdk.config.AdapterConfig` fields of the model (rank, alpha, expert counts).
    """

    base_model: str
    base_fingerprint: str
    batch_size: int
    context: int
    lb_mode: str
    lb_weight: float
    n_generalists: int
    mixing: str
    prefix: str
    parameters: dict = field(default_factory=dict)
    seconds: float = 0.0
    lowered: bool = True
    adapter: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def read(cls, folder: Path) -> TrainProgramMeta:
        """Raises: TrainProgramError: if ``folder`` holds no training program of this SDK."""
        path = Path(folder) / META
        if not path.is_file() or not (Path(folder) / PROGRAM).is_file():
            raise TrainProgramError(f"{folder} holds no training program ({PROGRAM} and {META}); export one with "
                                    "`python -m export --format pte-train`")
        data = json.loads(path.read_text())
        if data.pop("format", None) != FORMAT:
            raise TrainProgramError(f"{path} is not a {FORMAT} file; export the training program again")
        try:
            return cls(**data)
        except TypeError as err:
            raise TrainProgramError(f"{path} is malformed ({err}); export the training program again") from err


def program_parameters(model: nn.Module) -> dict[str, tuple[nn.Parameter, str]]:
    """``{name: (parameter, role)}`` of every adapter tensor: what a training program trains."""
    return {name: (p, role.value) for name, p, role in iter_role_parameters(model)}


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and values of ``model``'s non-adapter parameters (the frozen base)."""
    adapters = {id(p) for _, p, _ in iter_role_parameters(model)}
    digest = hashlib.sha256()
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in adapters:
            continue
        t = p.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class TrainProgram:
    """A loaded training program: ``forward_backward(x, y)`` -> loss terms and ``{name: gradient}``.

    Names are the adapter parameter names of the eager model (the program's prefix removed).
    """

    def __init__(self, folder: Path) -> None:
        """Raises: TrainProgramError: if the folder holds no training program."""
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import TrainingModule

        self.folder = Path(folder)
        self.meta = TrainProgramMeta.read(self.folder)
        data = self.folder / TRAINABLE_DATA
        if not data.is_file():
            raise TrainProgramError(f"{self.folder} has no {TRAINABLE_DATA}; export the training program again")
        self._module = TrainingModule(_load_for_executorch(str(self.folder / PROGRAM), str(data)))
        self._params: dict[str, torch.Tensor] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.meta.parameters)

    def check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Raises: TrainProgramError: unless ``x`` and ``y`` are (B, T) int64 of the program's shape."""
        shape = (self.meta.batch_size, self.meta.context)
        for what, t in (("inputs", x), ("targets", y)):
            if tuple(t.shape) != shape or t.dtype != torch.long:
                raise TrainProgramError(
                    f"the training program takes {what} of shape {shape} int64, got {tuple(t.shape)} {t.dtype}; "
                    f"export it for batch_size={t.shape[0]}, context={t.shape[-1]} or train with "
                    f"batch_size={shape[0]}, context={shape[1]}")

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """One call of the program.

        Args:
            x, y: (B, T) int64 inputs and next-token targets (CPU).

        Returns:
            ``({"loss", "lm", "lb"}, {name: gradient of loss})``; the gradients are fresh tensors.
        """
        self.check_batch(x, y)
        outputs = self._module.forward_backward("forward", (x.contiguous(), y.contiguous()))
        n = len(self.meta.prefix)
        grads = {name[n:]: g for name, g in self._module.named_gradients().items()}
        if self._params is None:
            self._params = {name[n:]: p for name, p in self._module.named_parameters().items()}
            if set(self._params) != set(self.meta.parameters):
                raise TrainProgramError(f"{self.folder}: the program's parameters do not match {META}; export the "
                                        "training program again")
        return {k: float(v) for k, v in zip(LOSS_TERMS, outputs)}, grads

    def parameters(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` views of the program's trainable tensors (writing them changes the program's)."""
        if self._params is None:  # the runtime hands them out with the first call's outputs
            zeros = torch.zeros(self.meta.batch_size, self.meta.context, dtype=torch.long)
            self.forward_backward(zeros, zeros)
        return self._params

    def write_parameters(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (exactly the program's names and shapes) into the program.

        Raises:
            TrainProgramError: naming missing, unexpected or misshapen tensors (nothing is written then).
        """
        params = self.parameters()
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        shapes = [n for n in params if n in tensors and tuple(tensors[n].shape) != tuple(params[n].shape)]
        if missing or extra or shapes:
            raise TrainProgramError(f"tensors do not fit the training program in {self.folder}: {len(missing)} "
                                    f"missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}), "
                                    f"{len(shapes)} of another shape (e.g. {shapes[:2]})")
        with torch.no_grad():
            for name, t in tensors.items():
                if t.data_ptr() != params[name].data_ptr():  # a ProgramModel's tensors are the program's own
                    params[name].copy_(t.detach().to(params[name].dtype))


def check_program_fits(meta: TrainProgramMeta, model: nn.Module, folder: Path, fingerprint: str | None = None,
                       lb: tuple[str, float] | None = None) -> list[str]:
    """Every way the program in ``folder`` does not fit ``model`` (empty: it fits).

    Args:
        fingerprint: the model's :func:`base_fingerprint` (computed when ``None``).
        lb: the ``(lb_mode, lb_weight)`` the training uses (not checked when ``None``).
    """
    params = program_parameters(model)
    problems = []
    missing = sorted(set(params) - set(meta.parameters))
    extra = sorted(set(meta.parameters) - set(params))
    if missing or extra:
        problems.append(f"parameter names differ from the model's: {len(missing)} missing from the program (e.g. "
                        f"{missing[:2]}), {len(extra)} not in the model (e.g. {extra[:2]})")
    shapes = [n for n, (p, _) in params.items() if n in meta.parameters
              and list(p.shape) != list(meta.parameters[n]["shape"])]
    if shapes:
        problems.append(f"{len(shapes)} parameter(s) have other shapes (e.g. {shapes[:2]})")
    if (fingerprint or base_fingerprint(model)) != meta.base_fingerprint:
        problems.append(f"it was exported from another base model ({meta.base_model})")
    differ = graph_differences(meta.adapter or {}, adapter_config(model).to_dict())  # old programs: {}
    if differ:
        problems.append("its graph computes another adapter: " + ", ".join(differ))
    if lb is not None and (meta.lb_mode, meta.lb_weight) != tuple(lb):
        problems.append(f"its load balancing is {meta.lb_mode} x {meta.lb_weight}, training uses {lb[0]} x {lb[1]}")
    return problems


class ProgramGradients:
    """The ExecuTorch backend of one model: computes a step's losses through the program and sets ``.grad`` of the
    parameters that step trains (and of no other)."""

    def __init__(self, model: nn.Module, program: TrainProgram) -> None:
        self.program = program
        self._params = {name: p for name, (p, _) in program_parameters(model).items()}

    def __call__(self, model: nn.Module, train: list[nn.Parameter], x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the model's adapter values into the program, run it on ``(x, y)`` (B, T), and set the gradient
        of each parameter in ``train``.

        Returns:
            ``(total, lm, lb)`` scalars, as :func:`device_sdk.train.objective`.
        """
        self.program.write_parameters(self._params)
        losses, grads = self.program.forward_backward(x.to("cpu"), y.to("cpu"))
        names = {id(p): name for name, p in self._params.items()}
        for p in train:
            p.grad = grads[names[id(p)]].to(p.device)
        return tuple(torch.tensor(losses[k]) for k in LOSS_TERMS)


def program_valid_loss(program: TrainProgram, tokens, max_batches: int = 8) -> float:
    """Mean loss of the program on the first ``max_batches`` non-overlapping (B, T) windows of ``tokens`` (a 1-D
    token array; its gradients are computed and dropped): validation for an app without an inference model."""
    b, t = program.meta.batch_size, program.meta.context
    ids = torch.as_tensor(tokens[: max_batches * b * t + 1].astype("int64"))
    losses = []
    for start in range(0, ids.numel() - b * t - 1 + 1, b * t):
        window = ids[start: start + b * t + 1]
        losses.append(program.forward_backward(window[:-1].reshape(b, t), window[1:].reshape(b, t))[0]["loss"])
    if not losses:
        raise TrainProgramError(f"need more than {b * t} validation tokens for one {b} x {t} batch")
    return sum(losses) / len(losses)


class ProgramModel(nn.Module):
    """The trainable tensors of a program as an ``nn.Module`` tree with the parameter names and roles of the
    eager model, sharing the program's memory: the SDK's optimizer code (:func:`device_sdk.train.init_train_state`,
    :func:`~device_sdk.train.expert_step`, :func:`~device_sdk.train.router_step`, with ``state.program`` a
    :class:`ProgramGradients`) then trains an app that holds only the program (no model code, no base weights in
    Python). It has no forward."""

    def __init__(self, program: TrainProgram) -> None:
        from ..config import AdapterConfig
        from ..federated.roles import Role
        from ..inject import ADAPTER_CONFIG_ATTR

        super().__init__()
        adapter = {k: tuple(v) if isinstance(v, list) else v for k, v in program.meta.adapter.items()}
        setattr(self, ADAPTER_CONFIG_ATTR, AdapterConfig(**adapter))  # what device_upload reads (rank, alpha)
        for name, tensor in program.parameters().items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]
            module.role = Role(program.meta.parameters[name]["role"])
            module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=True))  # shares the memory
        self.program = program


def attach_program(model: nn.Module, cfg, base_model: str = "") -> ProgramGradients:
    """The ExecuTorch backend for ``model`` and ``cfg`` (a :class:`device_sdk.config.TrainConfig`).

    ``cfg.program`` names the program folder; a folder without a program gets one exported from ``model``
    (minutes for a real model; needs the ``export`` package); an existing program is never overwritten.
    ``cfg.program = None`` exports into a temporary folder.

    Raises:
        TrainProgramError: if the model is not on the CPU, or the folder holds a program that does not fit the
            model (parameter names, shapes, base weights) or the training (batch shape, load balancing).
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise TrainProgramError("the ExecuTorch backend trains a model on the CPU; use device='cpu'")
    folder = Path(cfg.program) if cfg.program else Path(tempfile.mkdtemp(prefix="train-program-"))
    if not (folder / META).is_file():
        from export.train_program import export_train_program  # export imports device_sdk; only on demand

        log.info("exporting the training program into %s", folder)
        export_train_program(model, folder, cfg.batch_size, cfg.context, cfg, base_model)
    program = TrainProgram(folder)
    meta = program.meta
    problems = check_program_fits(meta, model, folder, lb=(cfg.lb_mode, cfg.lb_weight))
    if (meta.batch_size, meta.context) != (cfg.batch_size, cfg.context):
        problems.append(f"it takes batches of {meta.batch_size} x {meta.context}, training uses "
                        f"{cfg.batch_size} x {cfg.context}")
    if problems:
        raise TrainProgramError(f"the training program in {folder} does not fit: " + "; ".join(problems)
                                + "; export one for this model and training (python -m export --format pte-train) "
                                "or empty the folder to have it exported on the next start")
    log.info("ExecuTorch backend: training through %s", folder / PROGRAM)
    return ProgramGradients(model, program)
