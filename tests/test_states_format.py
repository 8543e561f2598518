"""The stored reducer states' format (store.encode_states): a bit-exact round trip for every dtype and
shape a reducer keeps, and the same bytes as the strided torch byte shuffle and safetensors' `save` that
wrote the stores of earlier versions, so those still decode and a state's checksum does not depend on the
version."""

import importlib.util
from pathlib import Path

import pytest
import torch

from mining.store import decode_states, encode_states


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
