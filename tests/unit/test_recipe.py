"""The multilingual dataset recipe's text cleaning and split assignment (no apt needed)."""

import pytest

from device_sdk.data import recipe
from device_sdk.data.textclean import html_paragraphs, is_language, is_prose
from device_sdk.errors import DataError

PAGE = """<html><head><title>t</title></head><body><div id="nav">Menu entry one two three four five</div>
<div id="DisplayArea"><h1>Laden en opslaan</h1>
<p class="paragraph">In de sectie <span class="emph">Algemeen</span> kunt u de standaardinstellingen van het
opslaan selecteren.</p>
<div class="howtoget"><p>Kies Extra - Opties - Laden/Opslaan voor deze functie van het programma</p></div>
<span hidden="true">verborgen tekst die niet in de uitvoer hoort te staan</span>
<div class="bascode">Sub Main  MsgBox "hallo" End Sub</div>
<p>Tweede alinea met <br>een regelafbreking.</p></div></body></html>"""


def test_help_page_prose_is_extracted_without_hidden_code_or_boxes():
    paragraphs = html_paragraphs(PAGE, root_id="DisplayArea")
    assert paragraphs[0] == "Laden en opslaan"
    assert "In de sectie Algemeen kunt u de standaardinstellingen van het opslaan selecteren." in paragraphs
    text = " ".join(paragraphs)
    for absent in ("Menu entry", "Kies Extra", "verborgen", "MsgBox"):
        assert absent not in text
    assert "Tweede alinea met" in paragraphs and "een regelafbreking." in paragraphs


def test_language_and_prose_filters():
    assert is_language("Dit is een zin die in het Nederlands is geschreven.", "nl")
    assert not is_language("This is a sentence that is written in English for the manual.", "nl")
    assert is_language("Die Datei wird in dem Ordner gespeichert und ist nicht leer.", "de")
    assert not is_prose("--help -v -x")
    assert not is_prose("x = f(1, 2) + g[3] * 4 / 5 - 6")
    assert is_prose("Dit is een gewone zin van genoeg woorden.")


def test_split_assignment_is_stable_and_roughly_proportional():
    keys = [f"libreoffice/text/page{i}.html" for i in range(2000)]
    splits = [recipe.split_of(k) for k in keys]
    assert splits == [recipe.split_of(k) for k in keys]
    share = {s: splits.count(s) / len(splits) for s in ("train", "valid", "test")}
    assert 0.70 < share["train"] < 0.82 and 0.08 < share["valid"] < 0.16 and 0.08 < share["test"] < 0.16


def test_machine_without_apt_gets_pointed_to_data_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(recipe.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="no apt-get.*--data DIR"):
        recipe.build_multilingual(tmp_path / "out", ("nl",))
    with pytest.raises(DataError, match="no recipe for language"):
        recipe.build_multilingual(tmp_path / "out", ("xx",))


def test_a_language_is_written_whole_or_not_at_all_and_hidden_folders_are_never_users(tmp_path):
    from device_sdk.data import load_users
    from device_sdk.data.recipe import write_language
    from device_sdk.errors import DataError
    from device_sdk.tokenizer import ByteTokenizer

    docs = {"train": [["Ein Absatz."]], "valid": [["Noch einer."]], "test": []}
    with pytest.raises(DataError, match="the test split came out empty"):
        write_language(tmp_path, "de", docs, {k: [] for k in docs})
    assert list(tmp_path.iterdir()) == []  # no half-written language, no temporary folder left behind
    stats = write_language(tmp_path, "de", {**docs, "test": [["Drei."]]}, {k: [] for k in docs})
    assert stats["test"]["paragraphs"] == 1 and [p.name for p in tmp_path.iterdir()] == ["de"]
    (tmp_path / ".it-k2j4").mkdir()  # what a build killed mid-write leaves (and .git, .ipynb_checkpoints)
    assert [u.name for u in load_users(tmp_path, ByteTokenizer())] == ["de"]
