"""User data: a folder with ``train.txt[.gz]``, ``valid.txt[.gz]`` and ``test.txt[.gz]``, tokenised once and cached."""

from .loading import (
    SPLITS,
    UserData,
    eval_windows,
    find_split_file,
    interleave,
    load_user_data,
    load_users,
    ood_mixture,
    read_documents,
    sample_batch,
)

__all__ = [
    "SPLITS",
    "UserData",
    "eval_windows",
    "find_split_file",
    "interleave",
    "load_user_data",
    "load_users",
    "ood_mixture",
    "read_documents",
    "sample_batch",
]
