from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvpool import ModelIdentity, block_keys
from kvpool.keys import next_key

FP = ModelIdentity("m", "r", "bfloat16", 30, 3, 64, 16).fingerprint()


def test_only_full_blocks_get_keys() -> None:
    assert block_keys(list(range(15)), 16, FP) == []
    assert len(block_keys(list(range(16)), 16, FP)) == 1
    assert len(block_keys(list(range(47)), 16, FP)) == 2


def test_keys_chain_the_prefix() -> None:
    a = block_keys(list(range(48)), 16, FP)
    b = block_keys(list(range(32)) + [7] * 16, 16, FP)
    c = block_keys([9] + list(range(1, 48)), 16, FP)
    assert a[:2] == b[:2] and a[2] != b[2]
    assert all(x != y for x, y in zip(a, c, strict=True))  # one token changes every later key


def test_salt_namespace_and_model_separate_keys() -> None:
    tokens = list(range(32))
    base = block_keys(tokens, 16, FP)
    other = ModelIdentity("m", "r", "bfloat16", 30, 3, 64, 16, tp_rank=1).fingerprint()
    assert block_keys(tokens, 16, FP, cache_salt="tenant-a") != base
    assert block_keys(tokens, 16, FP, namespace="ns") != base
    assert block_keys(tokens, 16, other) != base


def test_keys_are_the_same_in_another_process() -> None:
    code = ("from kvpool import ModelIdentity, block_keys;"
            "fp = ModelIdentity('m','r','bfloat16',30,3,64,16).fingerprint();"
            "print(block_keys(list(range(64)), 16, fp, 'salt')[-1].hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == block_keys(list(range(64)), 16, FP, "salt")[-1].hex()


@pytest.mark.parametrize("tokens", [[-1] * 16, [2**32] * 16, ["a"] * 16])
def test_bad_token_ids_are_rejected(tokens: list[object]) -> None:
    with pytest.raises(ValueError):
        block_keys(tokens, 16, FP)  # type: ignore[arg-type]


def test_bad_block_size_is_rejected() -> None:
    with pytest.raises(ValueError):
        block_keys([1, 2], 0, FP)


def test_next_key_continues_a_chain() -> None:
    tokens = list(range(100))
    keys = block_keys(tokens, 16, FP)
    assert next_key(keys[2], tokens[48:64]) == keys[3]
