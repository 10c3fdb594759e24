"""Where a KV-cache program's decode step spends its time: per-operator totals from ExecuTorch's ETDump.

Loads a ``--kv-cache`` ExecuTorch export (our ``model.pte`` with its data files) or a stock ``export_llm`` program,
runs one prefill of ``--prompt`` tokens and ``--steps`` decode steps with event tracing on, and prints, per token,
the time of each portable kernel (``native_call_*``, ``llama::*``: outside any delegate), of each kind of XNNPACK
operator (summed over its instances), and of the delegate calls as a whole, with call counts per token.

    python benchmarks/decode_profile.py OUT/fp32 OUT/stock/stock_fp32.pte [--steps 16] [--prompt 8]

Writes benchmarks/out/decode_profile.json. Times include the tracing overhead; compare programs within one run.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import table, write_json  # noqa: E402
from export.executorch import PROGRAM, data_beside  # noqa: E402


def profile(path: Path, steps: int, prompt: int) -> dict:
    """Per-token operator times (ms) and call counts of ``steps`` decode steps of the program at ``path``."""
    import executorch.kernels.quantized  # noqa: F401  (kernels of quantised programs)
    from executorch.devtools import Inspector
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (stock programs' SDPA and cache ops)
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    program = path / PROGRAM if path.is_dir() else path
    with data_beside(program) as data:
        module = _load_for_executorch(str(program), str(data) if data else None, enable_etdump=True)
    module.forward([torch.randint(0, 1000, (1, prompt)), torch.tensor([0])])
    start = time.perf_counter()
    for i in range(steps):
        module.forward([torch.tensor([[5]]), torch.tensor([prompt + i])])
    wall = (time.perf_counter() - start) / steps * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "run.etdp"
        module.write_etdump_result_to_file(str(dump), str(Path(tmp) / "debug.bin"))
        inspector = Inspector(etdump_path=str(dump))
    calls = steps + 1  # the prefill is traced too; per-token figures divide by every call (prompt is short)
    ms, count = collections.Counter(), collections.Counter()
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            if event.perf_data is None or event.name in ("Method::execute", "OPERATOR_CALL"):
                continue
            kind = str(event.name).split(" #")[0]  # XNNPACK numbers each operator instance
            ms[kind] += sum(event.perf_data.raw) / calls
            count[kind] += len(event.perf_data.raw) / calls
    return {"program": str(program), "decode_ms_per_token_wall": wall, "ms_per_token": dict(ms),
            "calls_per_token": dict(count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("programs", nargs="+", type=Path, help="export folders or .pte files")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=8)
    args = parser.parse_args()
    results = [profile(p, args.steps, args.prompt) for p in args.programs]
    for result in results:
        print(f"\n{result['program']}: {result['decode_ms_per_token_wall']:.1f} ms per decode step (wall, traced)")
        rows = [{"operator": kind, "ms per token": v, "calls per token": result["calls_per_token"][kind]}
                for kind, v in sorted(result["ms_per_token"].items(), key=lambda kv: -kv[1]) if v >= 0.01]
        print(table(rows, ["operator", "ms per token", "calls per token"]))
    print("wrote", write_json("decode_profile", {"steps": args.steps, "prompt": args.prompt, "programs": results}))


if __name__ == "__main__":
    main()
