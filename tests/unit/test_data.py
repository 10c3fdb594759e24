"""User data: reading, caching, sampling, deterministic evaluation windows, OOD mixtures, bad input."""

import gzip

import numpy as np
import pytest
import torch

from device_sdk.data import UserData, eval_windows, load_user_data, load_users, ood_mixture, sample_batch
from device_sdk.errors import DataError
from device_sdk.tokenizer import ByteTokenizer


def test_documents_are_separated_by_eos_and_cached(tiny_user, tmp_path):
    tok = ByteTokenizer()
    data = load_user_data(tiny_user, tok, cache_dir=tmp_path / "cache")
    assert (data.train == tok.eos_token_id).sum() == 40
    cached = list((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(cached) == 3
    again = load_user_data(tiny_user, tok, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.test, data.test)
    (tiny_user / "test.txt").write_text("changed text\n")
    changed = load_user_data(tiny_user, tok, cache_dir=tmp_path / "cache")
    assert tok.decode(changed.test.tolist()) == "changed text"


def _word_tokenizer(words: list[str]):
    """A real Hugging Face tokenizer (fast, word level) over ``words``, named like a local model folder."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from device_sdk.tokenizer import HFTokenizer

    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>"), "./base")


def test_the_token_cache_tells_two_tokenizers_of_one_name_apart(tmp_path):
    folder = tmp_path / "u"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.txt").write_text("hallo welt\n\nwelt hallo\n")
    first = _word_tokenizer(["<unk>", "</s>", "hallo", "welt"])
    second = _word_tokenizer(["<unk>", "</s>", "welt", "hallo"])  # another model in a folder of the same name
    assert first.name == second.name and first.fingerprint != second.fingerprint
    assert first.fingerprint == _word_tokenizer(["<unk>", "</s>", "hallo", "welt"]).fingerprint
    cache = tmp_path / "cache"
    a, b = (load_user_data(folder, tok, cache_dir=cache) for tok in (first, second))
    assert a.train.tolist() == [2, 3, 1, 3, 2, 1] and b.train.tolist() == [3, 2, 1, 2, 3, 1]
    assert len(list((cache / "tokens").glob("*.npy"))) == 2  # one per tokenizer (the three splits are equal)


def test_gzip_files_are_read(tmp_path):
    folder = tmp_path / "u"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        with gzip.open(folder / f"{split}.txt.gz", "wt") as f:
            f.write(f"{split} paragraph one\nparagraph two\n\nsecond document\n")
    data = load_user_data(folder, ByteTokenizer())
    assert ByteTokenizer().decode(data.valid.tolist()) == "valid paragraph one\nparagraph twosecond document"


def test_eval_windows_predict_every_token_exactly_once():
    tokens = np.arange(1000, dtype=np.int64)
    targets = torch.cat([y.flatten() for _, y in eval_windows(tokens, context=64, batch_size=4)])
    assert torch.equal(targets, torch.arange(1, 1000))
    for x, y in eval_windows(tokens, 64, 4):
        assert torch.equal(x[:, 1:], y[:, :-1])
    capped = torch.cat([y.flatten() for _, y in eval_windows(tokens, 64, 4, max_tokens=100)])
    assert torch.equal(capped, torch.arange(1, 101))


def test_sample_batch_is_seeded_and_shifted():
    tokens = np.arange(500, dtype=np.uint16)
    x1, y1 = sample_batch(tokens, 4, 32, torch.Generator().manual_seed(3))
    x2, _ = sample_batch(tokens, 4, 32, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and x1.shape == (4, 32) and torch.equal(y1, x1 + 1)


def test_ood_mixture_takes_an_equal_share_from_each_user(tmp_path):
    tok = ByteTokenizer()
    for name, letter, n in (("a", "a", 30), ("b", "b", 60)):
        folder = tmp_path / name
        folder.mkdir()
        for split in ("train", "valid", "test"):
            (folder / f"{split}.txt").write_text((letter * 9 + " ") * n)
    users = load_users(tmp_path, tok, ood=True)
    mixed = users[0].test
    assert np.array_equal(mixed, users[1].test)
    assert (mixed == ord("a")).sum() == (mixed == ord("b")).sum() > 0
    assert np.array_equal(users[1].train, load_users(tmp_path, tok)[1].train)
    assert len(ood_mixture(load_users(tmp_path, tok), "valid", tok.eos_token_id)) == 2 * (301 // 2)


def test_every_prefix_of_the_ood_mixture_holds_every_user_in_equal_shares():
    """Users concatenated in order would put only the first user's text in any short prefix (the quick preset's
    test tokens, PCL's peer scoring and the expert-score batches all read prefixes)."""
    eos, piece, ctx = 0, 64, 32
    rng = np.random.default_rng(0)
    users = []
    for u in range(4):  # documents of 5-300 tokens; user u's tokens are 10u+1 .. 10u+9
        docs = [np.append(rng.integers(10 * u + 1, 10 * u + 10, rng.integers(5, 300)), eos) for _ in range(200)]
        users.append(UserData(str(u), np.zeros(1), np.concatenate(docs), np.concatenate(docs)))
    mixed = ood_mixture(users, "test", eos, piece)
    owner = np.where(mixed == eos, -1, (mixed - 1) // 10)
    for n_windows in (8, 40, 200):
        counts = np.bincount(owner[: n_windows * ctx][owner[: n_windows * ctx] >= 0], minlength=4)
        assert counts.max() - counts.min() <= piece + 1, (n_windows, counts)  # equal within one piece
    share = min(len(u.test) for u in users) // 4
    assert np.bincount(owner[owner >= 0], minlength=4).tolist() == \
        [int((u.test[:share] != eos).sum()) for u in users]  # every user's first `share` tokens, nothing else


def test_bad_data_fails_clearly(tmp_path, tiny_user):
    tok = ByteTokenizer()
    with pytest.raises(DataError, match="does not exist"):
        load_user_data(tmp_path / "nowhere", tok)
    (tiny_user / "valid.txt").unlink()
    with pytest.raises(DataError, match="has no valid.txt or valid.txt.gz"):
        load_user_data(tiny_user, tok)
    (tiny_user / "valid.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="is empty"):
        load_user_data(tiny_user, tok)
    (tiny_user / "valid.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="UTF-8"):
        load_user_data(tiny_user, tok)
    with pytest.raises(DataError, match="fewer than one window"):
        sample_batch(np.arange(10), 2, 64, torch.Generator())
    with pytest.raises(DataError, match="holds no user folders"):
        load_users(tmp_path / "empty", tok)


def test_spread_evaluation_of_a_stream_shorter_than_one_window_takes_the_one_short_window():
    stream = np.arange(10, dtype=np.int64)
    (x, y), = list(eval_windows(stream, context=32, batch_size=2, max_tokens=64, spread=True))
    assert x.tolist() == [list(range(9))] and y.tolist() == [list(range(1, 10))]
