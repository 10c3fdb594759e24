"""An HTML page colouring each token of sample texts by its top-1 expert (paper Fig. 2 and appendix E)."""

from __future__ import annotations

import html
from pathlib import Path

from ..fileio import atomic_write_bytes

GENERALIST_COLOURS = ("#f6a04d", "#f7c58f", "#e07b1a")
SPECIALIST_COLOURS = ("#6fa8dc", "#a4c8ea", "#3d7fc1", "#9fd6c9", "#5bb5a2", "#c2b3e0", "#8e7cc3")


def _colour(role: str, index: int, n_generalists: int) -> str:
    if role == "generalist":
        return GENERALIST_COLOURS[index % len(GENERALIST_COLOURS)]
    return SPECIALIST_COLOURS[(index - n_generalists) % len(SPECIALIST_COLOURS)]


def _tokens_html(sample: dict, layer: int) -> str:
    roles = sample["roles"]
    n_gen = roles.count("generalist")
    spans = []
    for token, expert in zip(sample["tokens"], sample["top1"][layer]):
        colour = _colour(roles[expert], expert, n_gen)
        spans.append(f'<span style="background:{colour}" title="expert {expert} ({roles[expert]})">'
                     f"{html.escape(token).replace(chr(10), '&#8629;')}</span>")
    return "".join(spans)


def expert_shares(sample: dict, layer: int) -> str:
    """Each expert's share of the sample's tokens at ``layer`` (top-1), e.g. ``generalist 0: 62% · specialist 1:
    38%``, as HTML."""
    top1 = sample["top1"][layer]
    roles = sample["roles"]
    n_gen = roles.count("generalist")
    parts = []
    for expert, role in enumerate(roles):
        share = sum(1 for e in top1 if e == expert) / max(1, len(top1))
        colour = _colour(role, expert, n_gen)
        parts.append(f'<span style="background:{colour}">{role} {expert}: {100 * share:.0f}%</span>')
    return " ".join(parts)


def routing_page(records: list[dict], path: Path, title: str, layers: tuple[int, ...] | None = None) -> Path | None:
    """Write the page for every strategy with learned routers (first seed of each), showing the chosen routed
    layers (1-based; default the first and the last) of each user's model on its own text (in distribution) and on
    the others' texts. Layers beyond a model's depth are skipped."""
    sections = []
    for record in records:
        if not record["routing"] or record["seed"] != min(r["seed"] for r in records
                                                          if r["strategy"] == record["strategy"]):
            continue
        parts = [f"<h2>{html.escape(record['strategy'])} (seed {record['seed']})</h2>"]
        for user, samples in record["routing"].items():
            parts.append(f"<h3>model of {html.escape(user)}</h3><table>")
            for sample in samples:
                n_layers = len(sample["top1"])
                where = "own text" if sample["text_of"] == user else f"text of {html.escape(sample['text_of'])}"
                chosen = sorted({0, n_layers - 1}) if not layers else [i - 1 for i in layers if 1 <= i <= n_layers]
                for layer in chosen:
                    parts.append(f"<tr><td class=k>{where}<br>layer {layer + 1}/{n_layers}<br>"
                                 f"<small>{expert_shares(sample, layer)}</small></td>"
                                 f"<td class=t>{_tokens_html(sample, layer)}</td></tr>")
            parts.append("</table>")
        sections.append("\n".join(parts))
    if not sections:
        return None
    legend = (f'<p><span style="background:{GENERALIST_COLOURS[0]}">generalist</span> '
              f'<span style="background:{SPECIALIST_COLOURS[0]}">specialist</span> (lighter/darker shades: further '
              "experts of the same kind). Each token is coloured by the expert with the largest router weight; "
              "hover for the expert index.</p>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:auto} td.k{vertical-align:top;width:9em;"
            "color:#555;font-size:80%} td.t{font-family:monospace;line-height:1.7;padding-bottom:.6em}"
            "span{white-space:pre-wrap}</style></head><body>"
            f"<h1>{html.escape(title)}: top-1 expert per token</h1>{legend}{''.join(sections)}</body></html>")
    path = Path(path)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
