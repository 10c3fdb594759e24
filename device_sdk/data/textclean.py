"""Turning man pages and help pages into clean paragraphs: extraction, filters, language check."""

from __future__ import annotations

import re
import subprocess
from html.parser import HTMLParser

# A few dozen frequent function words per language; enough to tell a paragraph's language apart.
STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the of and to in is that for it with as on be by this are or from at an which not".split()),
    "de": frozenset("der die das und ist nicht mit den von zu ein eine sie es im auf für dem des wird werden "
                    "oder als auch bei wenn sich".split()),
    "fr": frozenset("le la les et est des une un du pour dans que qui sur pas par au avec ce vous sont ou "
                    "être cette il".split()),
    "it": frozenset("il di che è la per un una con non le del della sono come gli dei da nel alla si questo "
                    "viene essere".split()),
    "nl": frozenset("de het een en van is dat op te niet met voor zijn in wordt worden die deze als aan bij "
                    "of u kunt".split()),
}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def is_language(paragraph: str, lang: str) -> bool:
    """True when ``lang``'s function words occur at least once and at least as often as English ones."""
    words = [w.lower() for w in _WORD.findall(paragraph)]
    own = sum(w in STOPWORDS[lang] for w in words)
    english = sum(w in STOPWORDS["en"] for w in words) if lang != "en" else 0
    return own >= 1 and own >= english


def is_prose(paragraph: str, min_words: int = 5, min_letter_share: float = 0.6) -> bool:
    """At least ``min_words`` words and mostly letters (drops option lists, code and tables)."""
    if len(paragraph.split()) < min_words:
        return False
    visible = [c for c in paragraph if not c.isspace()]
    return bool(visible) and sum(c.isalpha() for c in visible) / len(visible) >= min_letter_share


def man_paragraphs(page_gz: bytes) -> list[str]:
    """Paragraphs of a gzipped man page rendered by groff (one paragraph per output line).

    Alias pages (``.so``) give no paragraphs. Needs ``groff`` (Debian: groff-base, part of every man-db install).
    """
    import gzip

    source = gzip.decompress(page_gz)
    if source.lstrip().startswith(b".so "):
        return []
    done = subprocess.run(
        ["groff", "-k", "-Tutf8", "-mandoc", "-rLL=100000n", "-rHY=0", "-P-cbou"],
        input=source, capture_output=True, env={"GROFF_NO_SGR": "1", "PATH": "/usr/bin:/bin"}, check=False,
    )
    lines = done.stdout.decode("utf-8", errors="replace").splitlines()
    body = [ln.strip() for ln in lines[1:-1]]  # first and last lines are the page header and footer
    return [ln for ln in body if ln]


_BLOCK = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "td", "th", "dt", "dd", "div", "br", "tr", "table",
          "ul", "ol", "section", "title"}
_VOID = {"br", "img", "input", "meta", "link", "hr", "wbr", "col", "area", "base", "source"}
_SKIP_TAGS = {"script", "style", "pre", "code", "head", "nav", "footer"}
_SKIP_CLASSES = {"bascode", "pycode", "howtoget", "howtogetbody", "relatedtopics", "relatedbody", "related",
                 "navheader", "navfooter", "MAC", "breadcrumb", "toc", "programlisting", "screen", "literallayout"}


class _HelpText(HTMLParser):
    def __init__(self, root_id: str | None) -> None:
        super().__init__(convert_charrefs=True)
        self.root_id = root_id
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, opens_root, skips)
        self.in_root = root_id is None
        self.skip_depth = 0
        self.current: list[str] = []
        self.paragraphs: list[str] = []

    def _flush(self) -> None:
        text = " ".join("".join(self.current).split())
        if text:
            self.paragraphs.append(text)
        self.current = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        opens_root = self.root_id is not None and a.get("id") == self.root_id
        skips = tag in _SKIP_TAGS or "hidden" in a or bool(classes & _SKIP_CLASSES)
        if tag in _BLOCK:
            self._flush()
        if tag in _VOID:
            return
        self.stack.append((tag, opens_root, skips))
        self.in_root = self.in_root or opens_root
        self.skip_depth += skips

    def handle_endtag(self, tag):
        if tag in _BLOCK:
            self._flush()
        if not any(t == tag for t, _, _ in self.stack):
            return
        while self.stack:
            t, opened, skipped = self.stack.pop()
            self.skip_depth -= skipped
            if opened:
                self.in_root = False
            if t == tag:
                break

    def handle_data(self, data):
        if self.in_root and self.skip_depth == 0:
            self.current.append(data)


def html_paragraphs(html: str, root_id: str | None = None) -> list[str]:
    """Visible prose paragraphs of a help page, inside the element with id ``root_id`` (or the whole page).

    Hidden elements, code samples, navigation, "how to get" boxes and related-topic lists are skipped.
    """
    parser = _HelpText(root_id)
    parser.feed(html)
    parser.close()
    parser._flush()
    return parser.paragraphs
