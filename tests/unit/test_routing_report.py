"""The routing report reads as text: byte-level tokens joined into characters, snippets from a word boundary,
each expert's share of tokens; the expert-score picture keeps lines at 0 and 1 visible."""

import numpy as np

from device_sdk.sim.figures import plot_expert_scores
from device_sdk.sim.routing_html import expert_shares
from device_sdk.sim.runner import _sample_ids, token_texts
from device_sdk.tokenizer import ByteTokenizer


def test_multibyte_characters_are_shown_whole_not_as_replacement_characters():
    tok = ByteTokenizer()
    text = "Grüße aus Zürich, ça va?"
    pieces = token_texts(tok, tok.encode(text))
    assert len(pieces) == len(tok.encode(text))  # one piece per token: the colours stay aligned
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert [tok.decode([i]) for i in tok.encode("ü")] == ["\ufffd", "\ufffd"]  # what a per-token decode shows


def test_samples_start_at_a_word_boundary():
    tok = ByteTokenizer()
    stream = np.array(tok.encode("abcdefgh ijklmnop qrstuvwx yz"))
    ids = _sample_ids(stream, 8, tok)
    assert tok.decode(ids.tolist()).startswith(" ")


def test_expert_shares_count_top1_tokens_per_expert():
    sample = {"roles": ["generalist", "specialist", "specialist"], "top1": [[0, 0, 1, 2], [1, 1, 1, 1]]}
    first, last = expert_shares(sample, 0), expert_shares(sample, 1)
    assert "generalist 0: 50%" in first and "specialist 1: 25%" in first and "specialist 2: 25%" in first
    assert "generalist 0: 0%" in last and "specialist 1: 100%" in last


def test_expert_score_plot_draws_a_legend_and_lines_at_the_edges(tmp_path):
    series = [{"iteration": i, "layers": [{"generalist": None, "specialist": 1.0}] * 2} for i in (0, 10, 20)]
    record = {"strategy": "comigs-2s", "seed": 1, "expert_scores": {"a": series, "b": series}}
    path = plot_expert_scores([record], "comigs-2s", tmp_path / "experts.png")
    assert path is not None and path.stat().st_size > 10_000
