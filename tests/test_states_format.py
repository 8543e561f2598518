"""The stored reducer states' format (store.encode_states): a bit-exact round trip for every dtype and
shape a reducer keeps, and the same bytes as the strided torch byte shuffle and safetensors' `save` that
wrote the stores of earlier versions, so those still decode and a state's checksum does not depend on the
version."""

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mining import byteshuffle
from mining.store import decode_checked, decode_states, encode_states


def _old_codec():
    """The strided torch shuffle that wrote earlier versions' stores, kept in scripts/bench_states.py."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_states.py"
    spec = importlib.util.spec_from_file_location("bench_states", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.torch_encode, module.torch_decode


torch_shuffle_encode, torch_shuffle_decode = _old_codec()


def states() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 33, generator=g)
    return {
        "h/moments.mean": x.double(), "h/top.keys": torch.randint(-2**62, 2**62, (4, 33), generator=g),
        "h/histogram.counts": torch.randint(0, 9, (33, 5), generator=g, dtype=torch.int32),
        "h/x.bf16": x.bfloat16(), "h/x.f16": x.half(), "h/x.f32": x, "h/flags": x > 0,
        "h/bytes": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "h/count": torch.tensor(12345), "h/empty": torch.empty(0, 33), "h/strided": x.T,
        "h/special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
        # scalars of every dtype, named so that safetensors' layout order (dtype, then name) is not the dicts'
        **{f"{chr(ord('z') - i)}/scalar": torch.tensor(7, dtype=dtype) for i, dtype in enumerate(
            (torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16, torch.int32,
             torch.float32, torch.float64, torch.int64))},
        "A/k": torch.tensor(3), "h/one": torch.ones(1, dtype=torch.bool),
    }


def test_round_trip_is_bit_exact():
    before = states()
    after = decode_states(encode_states(before))
    assert after.keys() == before.keys()
    for name, t in before.items():
        got = after[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(as_bytes(got), as_bytes(t)), name


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("seed", range(3))
def test_same_bytes_as_the_torch_shuffle(seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {**states(), "r/values": torch.randn(16, 1 + seed * 100, generator=g)}
    assert encode_states(tensors) == torch_shuffle_encode(tensors)
    old = decode_states(torch_shuffle_encode(tensors))  # a store written by an earlier version
    assert all(torch.equal(as_bytes(old[k]), as_bytes(v)) for k, v in tensors.items())
    new = torch_shuffle_decode(encode_states(tensors))  # and the old decoder reads what this one writes
    assert all(torch.equal(as_bytes(new[k]), as_bytes(v)) for k, v in tensors.items())


def large_states(seed: int) -> dict[str, torch.Tensor]:
    """Tensors of a megabyte and more, so that byteshuffle.each_large runs them on threads, with odd lengths."""
    g = torch.Generator().manual_seed(seed)
    return {**states(), "L/counts": torch.randint(0, 70000, (1536, 171 + seed), generator=g, dtype=torch.int32),
            "L/sum": torch.randn(129, 1537, generator=g, dtype=torch.float64),
            "L/toks": torch.randint(-1, 2**40, (300, 1001), generator=g),
            "L/half": torch.randn(700, 1001, generator=g).half()}


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_large_tensors_on_threads_same_bytes(threads):
    tensors = large_states(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        blob = encode_states(tensors)
        decoded = decode_states(blob)
    finally:
        torch.set_num_threads(before)
    assert blob == torch_shuffle_encode(tensors)
    assert all(torch.equal(as_bytes(decoded[k]), as_bytes(v)) for k, v in tensors.items())


@pytest.mark.parametrize("size", [2, 4, 8, 16])
def test_byteshuffle_matches_numcodecs(size):
    """The loops (4 and 8 bytes) and the fallback (other sizes, unaligned data) against numcodecs' Shuffle."""
    from numcodecs import Shuffle

    rng = np.random.default_rng(size)
    raw = rng.integers(0, 256, size * 1001 + size, dtype=np.uint8)
    for data in (raw[:-size], raw[1:1 + size * 1001]):  # aligned, and one byte off
        expected = np.frombuffer(Shuffle(size).encode(data), np.uint8)
        out = np.empty_like(data)
        byteshuffle.shuffle_into(data, size, out)
        assert np.array_equal(out, expected)
        assert np.array_equal(byteshuffle.unshuffle(expected, size), data)


def test_each_large_raises_the_first_error_after_all_ran():
    ran = []

    def fn(i):
        ran.append(i)
        if i == 1:
            raise ValueError("bad tensor")

    with pytest.raises(ValueError, match="bad tensor"):
        byteshuffle.each_large(fn, [byteshuffle.LARGE] * 4 + [10], threads=2)
    assert sorted(ran) == [0, 1, 2, 3, 4]


def test_decode_checked_returns_only_what_matches_its_checksum():
    blob = encode_states(states())
    digest = hashlib.sha256(blob).hexdigest()
    got = decode_checked(blob, digest)
    assert got is not None and torch.equal(got["h/x.f32"], states()["h/x.f32"])
    changed = bytearray(blob)
    changed[-5] ^= 0xFF
    assert decode_checked(bytes(changed), digest) is None  # decodes to something else, or fails: either way None
    assert decode_checked(blob[: len(blob) // 2], digest) is None  # truncated: the decode raises
    assert decode_checked(b"\x00" * 8, digest) is None
