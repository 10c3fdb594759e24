"""Export a device's personalised model: files, tokenizer, manifest, and verification of every file."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_sdk.data import load_user_data
from device_sdk.fileio import atomic_write_bytes
from device_sdk.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

from .errors import ExportError, VerificationError
from .load import Personalized, load_personalized
from .verify import SAMPLE_TEXT, Tolerance, compare, require

log = logging.getLogger(__name__)

FORMATS = ("pte", "onnx")
QUANTIZE = ("none", "8da4w", "8da8w", "int4")  # 8da4w / 8da8w: the .pte; int4: an extra model.int4.onnx
#: Quantisations of the ExecuTorch program (see export/quantize.py).
PTE_QUANTIZE = ("8da4w", "8da8w")
MANIFEST = "manifest.json"
#: An int4 model ships only if it stays this close to the fp32 PyTorch model. Perplexity is the quality
#: criterion; argmax agreement only guards against a broken graph, which agrees on almost no token (near-uniform
#: predictions flip argmax easily: a tiny random model's 8da4w program agrees on 0.70 at equal perplexity, the real
#: SmolLM2's on 0.85). onnxruntime's dynamic int8 on this model family (ppl 16 -> 26-28) fails the perplexity.
QUANTIZED_TOL = Tolerance(max_abs_logit_diff=float("inf"), min_argmax_agreement=0.50, max_ppl_rel_diff=0.05)
#: Windows per sequence length of the parity checks: fp32 files must match everywhere, so a few windows do; a
#: quantised file's perplexity is a statistic, and on the 4 windows' 168 predicted tokens of a KV check it moved by
#: 3 points between two 8da8w programs of the same function (docs/results.md), so it is judged on 16 (672 tokens).
WINDOWS, QUANTIZED_WINDOWS = 4, 16


@dataclass(frozen=True)
class ExportOptions:
    """What to export. ``formats`` from :data:`FORMATS`; ``max_seq`` the longest accepted sequence; ``kv_cache``:
    prefill + decode programs over a static cache of ``max_seq`` positions (export/kv.py) instead of full-sequence
    ones."""

    formats: tuple[str, ...] = FORMATS
    quantize: str = "none"
    max_seq: int = 512
    kv_cache: bool = False

    def __post_init__(self) -> None:
        problems = []
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            problems.append(f"formats must be a non-empty subset of {FORMATS}, got {list(self.formats)}")
        if self.quantize not in QUANTIZE:
            problems.append(f"quantize {self.quantize!r} is not supported; choose from {QUANTIZE}")
        elif self.quantize == "int4" and "onnx" not in self.formats:
            problems.append("quantize int4 applies to the ONNX export; add the onnx format")
        elif self.quantize in PTE_QUANTIZE and "pte" not in self.formats:
            problems.append(f"quantize {self.quantize} applies to the ExecuTorch export; add the pte format")
        if not 2 <= self.max_seq <= 8192:
            problems.append(f"max_seq must be in [2, 8192], got {self.max_seq}")
        if problems:
            raise ExportError("invalid export options: " + "; ".join(problems))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> list[str]:
    """Write the tokenizer next to the model: ``tokenizer.json`` (Hugging Face) or a byte-tokenizer description."""
    if isinstance(tokenizer, HFTokenizer):
        written = tokenizer.hf.save_pretrained(str(out))
        return sorted(Path(p).name for p in written if Path(p).is_file())
    if isinstance(tokenizer, ByteTokenizer):
        (out / "tokenizer.json").write_text(json.dumps({"type": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                                                        "eos_token_id": tokenizer.eos_token_id}))
        return ["tokenizer.json"]
    raise ExportError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")


def verification_lengths(max_seq: int) -> tuple[int, ...]:
    """The sequence lengths the parity checks run at: 16 and min(64, ``max_seq``) (one where they meet)."""
    return tuple(dict.fromkeys(t for t in (16, min(64, max_seq)) if t <= max_seq)) or (max_seq,)


def max_positions(loaded: Personalized) -> int | None:
    """How many positions the base model was trained for (``max_position_embeddings`` / ``n_positions``), if its
    configuration says."""
    config = loaded.model.model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_enough_text(tokens: np.ndarray, length: int, data: Path | None) -> None:
    """A quantised file is judged on :data:`QUANTIZED_WINDOWS` windows of ``length`` tokens; refuse to judge it on
    fewer (its perplexity on a handful of windows moves by more than the tolerance).

    Raises:
        ExportError: naming how many tokens there are, how many it takes, and what to pass.
    """
    fit = (len(tokens) - 1) // length
    if fit < QUANTIZED_WINDOWS:
        source = (f"the test text of {data}" if data is not None else
                  "the built-in sample text (pass --data <a user folder> to verify on its test text)")
        raise ExportError(f"a quantised export is verified on {QUANTIZED_WINDOWS} windows of {length} tokens "
                          f"({QUANTIZED_WINDOWS * length + 1} tokens), but {source} gives {len(tokens)} tokens "
                          f"with this tokenizer ({fit} windows)")


def verification_tokens(loaded: Personalized, data: Path | None) -> np.ndarray:
    """The user's test text if ``data`` is given, else the built-in multilingual sample."""
    if data is not None:
        return load_user_data(data, loaded.tokenizer).test
    return np.asarray(loaded.tokenizer.encode(SAMPLE_TEXT), dtype=np.int64)


def runner_for(path: Path):
    if path.suffix == ".pte":
        from .executorch import PteRunner

        return PteRunner(path)
    from .onnx import OnnxRunner

    return OnnxRunner(path)


#: What a KV-cache export's files take and return (the ONNX model adds its cache; see export/kv_export.py).
KV_SIGNATURE = {"inputs": {"input_ids": "int64 (1, seq), 1 <= seq <= max_seq",
                           "input_pos": "int64 (1,): position of the first token",
                           "past_key.i / past_value.i": "float32 (1, kv_heads, max_seq, head_dim), ONNX only"},
                "outputs": {"logits": "float32 (1, 1, vocab): the last token's",
                            "present_key.i / present_value.i": "ONNX only, the updated cache"}}


def check_file(loaded: Personalized, path: Path, tokens: np.ndarray, seq_lens: tuple[int, ...], limits: Tolerance,
               kv_cache: bool, max_seq: int, quantized: bool):
    """Verify one exported file against the PyTorch model (a KV-cache file through prefill and decode calls)."""
    windows = QUANTIZED_WINDOWS if quantized else WINDOWS
    if kv_cache:
        from .kv_export import kv_runner
        from .verify import compare_kv

        return compare_kv(loaded.model, kv_runner(path, max_seq), tokens, path.name, seq_lens=seq_lens,
                          windows=windows, tol=limits)
    return compare(loaded.model, runner_for(path), tokens, path.name, seq_lens=seq_lens, windows=windows, tol=limits)


#: Greedy generation check of fp32 KV-cache files: this many prompts (cut from the verification text) of
#: GREEDY_PROMPT tokens, continued by GREEDY_TOKENS tokens each, must equal Hugging Face ``generate``.
GREEDY_PROMPTS, GREEDY_PROMPT, GREEDY_TOKENS = 3, 12, 16


def check_greedy(loaded: Personalized, path: Path, tokens: np.ndarray, max_seq: int) -> dict:
    """Greedy continuations by the exported KV-cache file equal Hugging Face ``generate`` token for token.

    Raises:
        VerificationError: if any continuation differs (the prompt and token index are in the message).
    """
    from .kv_export import kv_runner
    from .verify import greedy_parity

    prompt_len = min(GREEDY_PROMPT, max_seq // 2)  # a short cache still takes a prompt and new tokens
    n = min(GREEDY_TOKENS, max_seq - prompt_len)
    step = max(1, (len(tokens) - prompt_len) // GREEDY_PROMPTS)
    prompts = [tokens[i * step : i * step + prompt_len].tolist() for i in range(GREEDY_PROMPTS)]
    log.info("checking greedy generation of %s against Hugging Face generate...", path.name)
    result = greedy_parity(loaded.model.model, kv_runner(path, max_seq), prompts, n)
    if result["equal"] != result["prompts"]:
        prompt, token = result["first_difference"]
        raise VerificationError(f"{path.name}: greedy generation differs from Hugging Face generate for "
                                f"{result['prompts'] - result['equal']} of {result['prompts']} prompts (first at "
                                f"prompt {prompt}, new token {token})")
    return result


def export_checkpoint(checkpoint: Path, out: Path, options: ExportOptions, data: Path | None = None,
                      tol: Tolerance = Tolerance()) -> dict:
    """Export, verify and describe a personalised model. Returns the manifest (also written to ``out``).

    Raises:
        ExportError: bad checkpoint or options, exporter failure. VerificationError: a file does not match
            PyTorch (the numbers are in the message; the files stay for inspection, no manifest is written).
    """
    start = time.perf_counter()
    log.info("loading the personalised model from %s", checkpoint)
    loaded = load_personalized(checkpoint)
    positions = max_positions(loaded)
    if positions is not None and options.max_seq > positions:
        raise ExportError(f"max_seq {options.max_seq} exceeds the {positions} positions {loaded.base_model} was "
                          f"trained for (longer inputs would index past its position table or degrade): use "
                          f"--max-seq {positions} or less")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, exports = [], {}
    if "pte" in options.formats:
        from .executorch import export_pte

        program_model, adapters = loaded.model, loaded.adapter_parameters()
        if options.kv_cache:
            from .kv_export import export_kv_pte

            log.info("lowering the KV-cache program to ExecuTorch (XNNPACK)...")
            exports["pte"] = export_kv_pte(loaded.model.model, out, options.max_seq,
                                           options.quantize if options.quantize in PTE_QUANTIZE else "none")
        elif options.quantize in PTE_QUANTIZE:
            from device_sdk.parts import iter_role_parameters

            from .quantize import quantize_program

            program_model, counts = quantize_program(loaded.model, options.quantize)
            adapters = {name: p for name, p, _ in iter_role_parameters(program_model.model)}
            log.info("%s: %d base linears, %d embedding(s) int8", options.quantize, counts["linears"],
                     counts["embeddings"])
        if not options.kv_cache:
            log.info("lowering to ExecuTorch (XNNPACK)... this takes a few minutes on a real model")
            exports["pte"] = export_pte(program_model, out, options.max_seq, adapters,
                                        quantized=options.quantize in PTE_QUANTIZE)
        files.append(out / "model.pte")
    if "onnx" in options.formats:
        from .onnx import export_onnx

        log.info("exporting to ONNX... this takes a minute or two on a real model")
        if options.kv_cache:
            from .kv_export import export_kv_onnx

            exports["onnx"] = export_kv_onnx(loaded.model.model, out / "model.onnx", options.max_seq)
        else:
            exports["onnx"] = export_onnx(loaded.model, out / "model.onnx", options.max_seq)
        files.append(out / "model.onnx")
        if options.quantize == "int4":
            from .onnx import quantize_int4

            # adapter and router matrices have a dimension of at most this: they stay fp32
            small = max(loaded.adapter.rank, loaded.adapter.attention_lora_rank, loaded.adapter.n_experts)
            log.info("quantising model.onnx to int4...")
            exports["onnx_int4"] = quantize_int4(out / "model.onnx", out / "model.int4.onnx", small)
            files.append(out / "model.int4.onnx")
    tokens = verification_tokens(loaded, data)
    seq_lens = verification_lengths(options.max_seq)
    if options.quantize != "none":
        check_enough_text(tokens, max(seq_lens), data)
    verification = {}
    for path in files:
        quantized = ".int4." in path.name or (path.suffix == ".pte" and options.quantize in PTE_QUANTIZE)
        limits = QUANTIZED_TOL if quantized else tol
        log.info("verifying %s against PyTorch...", path.name)
        result = check_file(loaded, path, tokens, seq_lens, limits, options.kv_cache, options.max_seq, quantized)
        log.info("%s: max |logit diff| %.2e, argmax agreement %.4f, ppl %.4f vs %.4f", path.name,
                 result.max_abs_logit_diff, result.argmax_agreement, result.ppl_exported, result.ppl_pytorch)
        require(result, limits)
        verification[path.name] = result.to_dict()
        if options.kv_cache and not quantized:
            verification[path.name]["greedy"] = check_greedy(loaded, path, tokens, options.max_seq)
    tokenizer_files = save_tokenizer(loaded.tokenizer, out)
    data_files = exports.get("pte", {}).get("data_files", []) + (["adapter_keys.json"] if "pte" in exports else [])
    manifest = {
        "format": "device_sdk.export/1",
        "base_model": loaded.base_model,
        "adapter": loaded.adapter.to_dict(),
        "roles": ["attention", "generalist", "specialist", "router"],
        "round": loaded.info.get("round"),
        "global_version": loaded.info.get("global_version"),
        "export": {"formats": list(options.formats), "quantize": options.quantize, "max_seq": options.max_seq,
                   **(KV_SIGNATURE if options.kv_cache else
                      {"inputs": {"input_ids": "int64 (batch, seq)"},
                       "outputs": {"logits": "float32 (batch, seq, vocab)"}}),
                   "kv_cache": options.kv_cache,
                   "pte_batch": 1, **{f"{k}_seconds": v["seconds"] for k, v in exports.items()}},
        "files": {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
                  for p in [*files, *(out / f for f in data_files), *(out / f for f in tokenizer_files)]},
        "verification": verification,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("export done in %.0f s: %s", time.perf_counter() - start, ", ".join(p.name for p in files))
    return manifest


def verify_export(checkpoint: Path, out: Path, data: Path | None = None, tol: Tolerance = Tolerance()) -> dict:
    """Re-run the parity checks of an existing export folder against its checkpoint."""
    loaded = load_personalized(checkpoint)
    tokens = verification_tokens(loaded, data)
    results = {}
    manifest = json.loads((Path(out) / MANIFEST).read_text()) if (Path(out) / MANIFEST).is_file() else {}
    pte_quantized = manifest.get("export", {}).get("quantize") in PTE_QUANTIZE
    stale = manifest.get("stale", {})
    for name in ("model.pte", "model.onnx", "model.int4.onnx"):
        path = Path(out) / name
        if name in stale:
            log.info("%s holds the adapters of round %s (stale since update-adapters): not verified", name,
                     stale[name].get("round"))
        elif path.is_file():
            quantized = ".int4." in name or (name == "model.pte" and pte_quantized)
            limits = QUANTIZED_TOL if quantized else tol
            export = manifest.get("export", {})
            seq_lens = verification_lengths(export.get("max_seq", 64))
            if quantized:
                check_enough_text(tokens, max(seq_lens), data)
            result = check_file(loaded, path, tokens, seq_lens, limits, bool(export.get("kv_cache")),
                                export.get("max_seq", 512), quantized)
            require(result, limits)
            results[name] = result.to_dict()
            if export.get("kv_cache") and not quantized:
                results[name]["greedy"] = check_greedy(loaded, path, tokens, export["max_seq"])
    if not results:
        raise ExportError(f"{out} holds no model.pte or model.onnx")
    return results


def update_program_adapters(program_dir: Path, checkpoint: Path, data: Path | None = None,
                            tol: Tolerance = Tolerance()) -> Path:
    """Write a checkpoint's adapters into an ExecuTorch export's ``adapters.ptd`` (program and base data stay), then
    verify the program against the checkpoint's PyTorch model and record the result in the manifest.

    The new adapters must come from the same base model and compute the same graph as the export: the same adapter
    shape (every tensor's size) and the same LoRA alpha, attention rank, top-k, mixing form and generalist count,
    which the program fixes in its graph (:data:`device_sdk.config.GRAPH_FIELDS`; checked against the manifest).
    An ONNX file of the folder keeps the old adapters inside its graph: the manifest lists it under ``stale`` (with
    the round it holds), and ``verify`` skips it; export the checkpoint again for a current one.

    Raises:
        ExportError: the adapters do not fit the program (nothing is written). VerificationError: the updated
            program does not match the checkpoint (the manifest is not updated).
    """
    from device_sdk.adapters import file_attention_rank, file_mixing, read_adapter_file
    from device_sdk.config import graph_differences

    from .adapter_layout import build_all, load_layout
    from .executorch import write_adapters
    from .load import find_adapters

    program_dir = Path(program_dir)
    manifest_path = program_dir / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{program_dir} has no {MANIFEST}: it is not an export of this SDK")
    manifest = json.loads(manifest_path.read_text())
    program = {"mixing": "projection", **manifest["adapter"]}  # exports from before the setting: projection
    folder, info = find_adapters(checkpoint)
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        file_tensors, meta = read_adapter_file(path)
        if meta["base_model"] != manifest["base_model"]:
            raise ExportError(f"{path} is for base model {meta['base_model']!r}, the program for "
                              f"{manifest['base_model']!r}")
        n_experts = int(meta["n_generalists"]) + int(meta["n_specialists"])
        adapters = {"alpha": float(meta["alpha"]), "attention_rank": file_attention_rank(meta),
                    "n_generalists": int(meta["n_generalists"]), "rank": int(meta["rank"])}
        if n_experts > 1:  # one expert: no router, so neither k nor the mixing form is in the graph
            adapters |= {"top_k": int(meta["top_k"]), "mixing": file_mixing(meta)}
        differ = graph_differences(program, adapters)
        if differ:
            raise ExportError(f"{path} holds adapters of another model than the program computes ("
                              f"{', '.join(differ)}): the tensors fit, the model would not; export the checkpoint "
                              "again")
        tensors.update(file_tensors)
    layout = load_layout(program_dir)  # None: the program stores every adapter tensor as it is
    export = manifest.get("export", {})
    quantized = export.get("quantize") in PTE_QUANTIZE
    seq_lens = verification_lengths(export.get("max_seq", 64))
    loaded = load_personalized(checkpoint)  # everything that can fail before a byte is written
    tokens = verification_tokens(loaded, data)
    if quantized:
        check_enough_text(tokens, max(seq_lens), data)
    limits = QUANTIZED_TOL if quantized else tol
    before = (program_dir / "adapters.ptd").read_bytes()
    written = write_adapters(program_dir, tensors if layout is None else build_all(layout, tensors))
    try:
        result = check_file(loaded, program_dir / "model.pte", tokens, seq_lens, limits,
                            bool(export.get("kv_cache")), export.get("max_seq", 512), quantized)
        require(result, limits)
    except BaseException:  # a failed check, a runtime error, Ctrl-C: the program keeps its verified adapters
        atomic_write_bytes(written, before)
        raise
    old_round = manifest.get("round")
    manifest["round"], manifest["global_version"] = info.get("round"), info.get("global_version")
    manifest["files"]["adapters.ptd"] = {"sha256": _sha256(written), "bytes": written.stat().st_size}
    manifest["verification"]["model.pte"] = result.to_dict()
    for name in ("model.onnx", "model.int4.onnx"):
        if (program_dir / name).is_file() and name not in manifest.get("stale", {}):
            manifest.setdefault("stale", {})[name] = {"round": old_round, "reason": "its adapters are inside its "
                                                      "graph; update-adapters rewrites only model.pte's"}
            manifest["verification"].pop(name, None)
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1).encode())  # never torn
    return written
