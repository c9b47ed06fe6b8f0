from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kvpool import ModelIdentity, block_keys
from kvpool.keys import (
    Adapter,
    ChainMemo,
    Identity,
    KeyChain,
    adapter_digest,
    next_key,
    root_key,
)

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


# --- the chain: resumable, lazy, memoised; identity; adapters -----------------------------

def test_a_chain_fed_in_any_pieces_makes_the_keys_of_the_whole() -> None:
    rng = random.Random(18)
    for bt in (1, 7, 16, 32):
        tokens = [rng.randrange(50_000) for _ in range(300)]
        want = block_keys(tokens, bt, FP, "salt")
        for _ in range(20):
            chain = KeyChain.of(Identity(FP, "salt"), bt)
            cut, got = 0, []
            while cut < len(tokens):
                step = rng.randrange(0, 3 * bt)
                got += chain.feed(tokens[cut:cut + step])
                cut += step
            assert got == chain.keys == want and chain.fed == len(tokens)


def test_advance_keys_a_growing_sequence_feeding_only_what_is_new() -> None:
    tokens = list(range(1000, 1100))
    chain = KeyChain.of(Identity(FP), 16)
    assert chain.advance(tokens[:10], 10) == []
    assert chain.advance(tokens[:40], 40) == block_keys(tokens[:40], 16, FP)
    fed = chain.fed
    assert chain.advance(tokens[:40], 20) == block_keys(tokens, 16, FP)[:1]  # no new tokens
    assert chain.fed == fed
    assert chain.advance(tokens, 1000) == block_keys(tokens, 16, FP)


def test_a_memoised_piece_gives_the_same_keys_and_an_early_stop_is_not_remembered() -> None:
    memo = ChainMemo(entries=4)
    system = list(range(5000, 5075))
    want = block_keys([*system, 1, 2, 3] * 2, 16, FP)
    for _ in range(2):  # the second time from the memo
        chain = KeyChain.of(Identity(FP), 16, memo)
        keys = chain.feed(system, memo, "SYSTEM") + chain.feed([1, 2, 3], memo, "q")
        keys += chain.feed(system, memo, "SYSTEM") + chain.feed([1, 2, 3])
        assert keys == want
    assert len(memo) == 2  # SYSTEM from two chain states ("q" is shorter than a block)
    lazy = KeyChain.of(Identity(FP, "other"), 16, memo).extend(system, memo, "SYSTEM")
    next(lazy)
    lazy.close()
    assert len(memo) == 2


def test_a_bad_token_id_ends_the_chain_and_keeps_the_keys_before_it() -> None:
    chain = KeyChain.of(Identity(FP), 4)
    good = chain.feed([1, 2, 3, 4])
    with pytest.raises(ValueError):
        chain.feed([5, 6, 7, -1, 9, 9, 9, 9])
    assert chain.keys == good
    with pytest.raises(ValueError):
        chain.feed([1, 2, 3, 4])


def test_an_adapter_keys_apart_from_the_base_model_and_from_other_weights() -> None:
    tokens = list(range(64))
    base = block_keys(tokens, 16, FP)
    a = Adapter("sql", bytes(32))
    assert Identity(FP).root() == root_key(FP)  # no adapter: the keys they always were
    keyed = KeyChain.of(Identity(FP, adapter=a), 16).feed(tokens)
    assert keyed == block_keys(tokens, 16, FP, adapter=a)
    assert not set(keyed) & set(base)
    assert block_keys(tokens, 16, FP, adapter=Adapter("sql", b"\1" * 32)) != keyed
    assert block_keys(tokens, 16, FP, adapter=Adapter("sql2", bytes(32))) != keyed
    # the salt and the adapter name cannot stand in for each other
    assert root_key(FP, "lora:sql", None) != root_key(FP, "", Adapter("sql", bytes(32)))
    with pytest.raises(ValueError):
        Adapter("x", b"short")


def test_adapter_digest_is_of_the_contents(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        (d / "adapter_config.json").write_text('{"r": 8}')
        (d / "adapter_model.safetensors").write_bytes(b"\x01" * 1000)
    (two / "sub").mkdir()  # subfolders are not part of it
    assert adapter_digest(one) == adapter_digest(two)
    (two / "adapter_model.safetensors").write_bytes(b"\x01" * 999 + b"\x02")
    assert adapter_digest(one) != adapter_digest(two)
    (two / "adapter_model.safetensors").write_bytes(b"\x01" * 1000)
    (two / "README.md").write_text("x")
    assert adapter_digest(one) != adapter_digest(two)
    for i in range(70):
        (two / f"f{i}").write_text("x")
    with pytest.raises(ValueError):
        adapter_digest(two)
    with pytest.raises(OSError):
        adapter_digest(tmp_path / "missing")


def test_advance_after_an_extend_read_part_way_keys_the_rest() -> None:
    tokens = list(range(16))
    chain = KeyChain.of(Identity(FP), 4)
    lazy = chain.extend(tokens)
    next(lazy)
    lazy.close()
    assert chain.advance(tokens, 16) == block_keys(tokens, 4, FP)


def test_the_memo_keeps_namespaces_apart_and_no_huge_salt() -> None:
    memo = ChainMemo()
    piece = list(range(40))
    a = KeyChain(root_key(FP), 16, namespace="a").feed(piece, memo, "P")
    b = KeyChain(root_key(FP), 16, namespace="b").feed(piece, memo, "P")
    assert a == block_keys(piece, 16, FP, namespace="a")
    assert b == block_keys(piece, 16, FP, namespace="b") != a
    big = Identity(FP, "s" * 10_000)
    assert memo.root(big) == big.root() and big not in memo._roots
    small = Identity(FP, "tenant")
    assert memo.root(small) == small.root() and small in memo._roots
