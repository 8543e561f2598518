"""Quantize a loaded model's weights with llama.cpp's formats, for diffing a model against its quantized self.

`model.quantize: q4_0` rounds every weight matrix of a linear or embedding layer through the format and back
(gguf's reference quantizer, the one llama.cpp's conversion scripts use), then mines in `model.dtype` as usual.
The activations are those of a model whose weights are what llama.cpp would dequantize; llama.cpp's own kernels
also round the activations entering a matmul (to q8 blocks), which is not reproduced. Norms and biases stay in
float, as llama.cpp keeps them.

Blocks run along each weight row (a linear layer's input features), as in a GGUF file. A matrix whose rows are
not a multiple of the block cannot be stored in the format; llama.cpp keeps such a tensor in float16, and so
does this (`quantize_weights` returns the format each tensor got).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

FORMATS = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "mxfp4", "bf16", "f16")
"""Formats gguf's Python quantizer implements (its k-quants and i-quants only dequantize; to diff a q4_k_m
model, give its .gguf file as the model id)."""

FALLBACK = "f16"


def check_format(name: str) -> None:
    from .errors import UserError

    if name not in FORMATS:
        raise UserError(f"model.quantize: expected one of {', '.join(FORMATS)}, got {name!r} (k-quants such as "
                        "q4_k cannot be made here; give a .gguf file in that format as model.id instead)")


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def round_trip(w: np.ndarray, name: str) -> tuple[np.ndarray, str]:
    """`w` (float32, rows along the last axis) through the format and back; the format actually used."""
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    qtype = _qtype(name)
    block = GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        name, qtype = FALLBACK, _qtype(FALLBACK)
    return quants.dequantize(quants.quantize(w, qtype), qtype).reshape(w.shape), name


def weight_matrices(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, bool]]:
    """Every linear and embedding layer's weight, once (tied embeddings share one parameter), and whether it is
    stored transposed (GPT-2's Conv1D keeps (in, out), so its rows are the stored columns)."""
    seen: set[int] = set()
    out = []
    for module_name, module in model.named_modules():
        w = getattr(module, "weight", None)
        conv1d = type(module).__name__ == "Conv1D"
        if not (conv1d or isinstance(module, (torch.nn.Linear, torch.nn.Embedding))) or w is None or id(w) in seen:
            continue
        seen.add(id(w))
        out.append((f"{module_name}.weight", w, conv1d))
    return out


@torch.no_grad()
def quantize_weights(model: torch.nn.Module, name: str) -> dict[str, int]:
    """Round every weight matrix through format `name` in place; how many tensors got each format."""
    check_format(name)
    used: Counter[str] = Counter()
    for _, w, transposed in weight_matrices(model):
        rows = w.detach().to("cpu", torch.float32)
        rows = rows.T if transposed else rows
        q, got = round_trip(np.ascontiguousarray(rows.numpy()), name)
        q_t = torch.from_numpy(q)
        w.copy_((q_t.T if transposed else q_t).to(w.dtype))
        used[got] += 1
    return dict(used)
