"""Dataset recipe: the default 4-language split (de, fr, it, nl) built from Debian packages.

Sources per language: the LibreOffice help pages, the translated man pages and, for Dutch, the GIMP manual.
Documents (one source file each) go to train/valid/test by a stable hash of their path with the language
removed, so translations of one page land in the same split in every language. Paragraphs must be prose in the
user's language; exact duplicate paragraphs (licence notices, boilerplate) are dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError
from .textclean import html_paragraphs, is_language, is_prose, man_paragraphs

log = logging.getLogger(__name__)

LANGUAGES = ("de", "fr", "it", "nl")
SPLIT_BUCKETS = (("train", 76), ("valid", 88), ("test", 100))  # cumulative percentages of documents


def packages_for(lang: str) -> list[str]:
    pkgs = [f"libreoffice-help-{lang}", f"manpages-{lang}"]
    if lang == "nl":
        pkgs.append("gimp-help-nl")
    return pkgs


def split_of(key: str) -> str:
    """train / valid / test for a document key, stable across machines and runs."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return next(name for name, upper in SPLIT_BUCKETS if bucket < upper)


def _apt_download(packages: list[str], dest: Path) -> list[Path]:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataError("this machine has no apt-get/dpkg-deb: the multilingual recipe needs a Debian or Ubuntu "
                        "machine. Build the data there, or pass --data DIR with your own user folders "
                        "(train.txt[.gz], valid.txt[.gz], test.txt[.gz] per user)")
    dest.mkdir(parents=True, exist_ok=True)

    def download() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", *packages], cwd=dest, capture_output=True, text=True)

    done = download()
    if done.returncode != 0 and os.geteuid() == 0:
        log.info("apt-get download failed (%s); running apt-get update once", done.stderr.strip()[:200])
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        done = download()
    if done.returncode != 0:
        hint = "run `sudo apt-get update` first" if os.geteuid() != 0 else "check the machine's apt sources"
        raise DataError(f"apt-get download {' '.join(packages)} failed: {done.stderr.strip()[:300]}; {hint}, "
                        "or pass --data DIR with prepared user folders")
    return sorted(dest.glob("*.deb"))


def _extract(debs: list[Path], root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)


def iter_documents(root: Path, lang: str) -> Iterator[tuple[str, list[str]]]:
    """``(key, paragraphs)`` for every source document of ``lang`` under an extracted package ``root``."""
    man_root = root / "usr/share/man" / lang
    for page in sorted(man_root.glob("man*/*.gz")):
        yield f"man/{page.parent.name}/{page.name.removesuffix('.gz')}", man_paragraphs(page.read_bytes())
    lo_root = root / "usr/share/libreoffice/help" / lang
    for page in sorted(lo_root.rglob("*.html")):
        text = page.read_text(encoding="utf-8", errors="replace")
        yield f"libreoffice/{page.relative_to(lo_root)}", html_paragraphs(text, root_id="DisplayArea")
    gimp_root = root / "usr/share/gimp/2.0/help" / lang
    for page in sorted(gimp_root.rglob("*.html")):
        text = page.read_text(encoding="utf-8", errors="replace")
        yield f"gimp/{page.relative_to(gimp_root)}", html_paragraphs(text)


def build_language(lang: str, out: Path, workdir: Path, progress: bool = False) -> dict:
    """Download, extract, clean and split one language into ``out/<lang>``. Returns per-split statistics."""
    debs = _apt_download(packages_for(lang), workdir / "debs" / lang)
    root = workdir / "root" / lang
    _extract(debs, root)
    seen: set[str] = set()
    splits: dict[str, list[list[str]]] = {"train": [], "valid": [], "test": []}
    doc_ids: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    documents = iter_documents(root, lang)
    if progress:
        from tqdm.auto import tqdm

        documents = tqdm(documents, desc=f"{lang}: documents", unit="doc")
    for key, paragraphs in documents:
        kept = []
        for p in paragraphs:
            if p in seen or not is_prose(p) or not is_language(p, lang):
                continue
            seen.add(p)
            kept.append(p)
        if kept:
            split = split_of(key)
            splits[split].append(kept)
            doc_ids[split].append(key)
    return write_language(out, lang, splits, doc_ids)


def write_language(out: Path, lang: str, splits: dict[str, list[list[str]]], doc_ids: dict[str, list[str]]) -> dict:
    """Write one language's splits (documents of paragraphs) into ``out/<lang>`` at once: into a hidden temporary
    folder first, renamed when complete. Returns per-split statistics.

    Raises:
        DataError: a split is empty (nothing of the language is written).
    """
    target = out / lang
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{lang}-"))  # a dot-folder: never listed as a user
    try:
        stats = {}
        for split, docs in splits.items():
            if not docs:
                raise DataError(f"{lang}: the {split} split came out empty; the packages {packages_for(lang)} "
                                "did not yield enough prose")
            text = "\n\n".join("\n".join(doc) for doc in docs) + "\n"
            with gzip.open(tmp / f"{split}.txt.gz", "wt", encoding="utf-8") as f:
                f.write(text)
            stats[split] = {"documents": len(docs), "paragraphs": sum(map(len, docs)), "words": len(text.split())}
        (tmp / "doc_ids.json").write_text(json.dumps(doc_ids, indent=0))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or interrupted build leaves nothing behind
    return stats


def build_multilingual(out: Path, languages: tuple[str, ...] = LANGUAGES, workdir: Path | None = None,
                       progress: bool = False) -> dict:
    """Build ``out/<lang>/{train,valid,test}.txt.gz`` for each language; returns statistics (also in
    ``out/stats.json``)."""
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise DataError(f"no recipe for language(s) {unknown}; choose from {LANGUAGES}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    owned_workdir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="device-sdk-recipe-"))
    try:
        stats = {lang: build_language(lang, out, workdir, progress) for lang in languages}
    finally:
        if owned_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats
