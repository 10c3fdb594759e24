"""Fixtures shared by the integration tests."""

import pytest
import torch


@pytest.fixture
def users_dir(tmp_path):
    """Three users with clearly different made-up vocabularies."""
    vocab = [("alpha", "beta", "gamma", "delta"), ("red", "green", "blue", "white"), ("one", "two", "three", "four")]
    g = torch.Generator().manual_seed(0)
    for name, words in zip(("u1", "u2", "u3"), vocab):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for split, n in (("train", 400), ("valid", 120), ("test", 120)):
            idx = torch.randint(0, 4, (n,), generator=g).tolist()
            (folder / f"{split}.txt").write_text(" ".join(words[i] for i in idx) + "\n")
    return tmp_path / "data"


@pytest.fixture
def server(tmp_path):
    """A real aggregator (``python -m aggregator serve``) on loopback, in its own data folder."""
    from .server import Server

    srv = Server(tmp_path / "agg").start()
    yield srv
    srv.stop()
