"""The README's "Using the SDK" example runs as written, with the tiny model and a tiny user in place of SmolLM2 and
the built data set (the only substitutions), so that a renamed function or a changed default breaks this test."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    """The first Python block under the README's "## Using the SDK" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using the SDK", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "README.md has no python example under '## Using the SDK'"
    return block.group(1)


def test_the_readme_example_trains_evaluates_and_saves(tiny_user, tmp_path, monkeypatch, capsys):
    code = readme_example()
    for old, new in (('load_base_model("smollm2-135m")', 'load_base_model("tiny-llama")'),
                     ('"data/multilingual/nl"', repr(str(tiny_user))),
                     ("TrainConfig(steps=150)", "TrainConfig(steps=2, batch_size=2, context=32, router_period=1, "
                                                "router_steps=1)")):
        assert old in code, f"the README example no longer contains {old}; update this test's substitutions"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert len(result.train) == 2 and result.router, "the example did not train its experts and its router"
    perplexity = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 1.0 < perplexity < 1e6
    saved = sorted(p.name for p in (tmp_path / "adapters").glob("*.safetensors"))
    assert saved and any("router" in name for name in saved), saved
