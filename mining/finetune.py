"""`mine finetune`: a briefly fine-tuned copy of a model, to diff against the original.

Plain next-token training (AdamW, fixed seed) on contexts of a corpus, planned exactly as a mining
job plans them; only the chosen layers' blocks train (the rest, embeddings included, stay frozen),
so a weight diff knows which layers should have changed. The copy is saved as safetensors with the
tokenizer, loadable as `model: {id: OUT_DIR}`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .spec import CorpusSpec, ModelSpec


@dataclass(frozen=True)
class FinetuneResult:
    out: Path
    steps: int
    tokens: int
    loss_first: float
    loss_last: float
    seconds: float
    layers: tuple[int, ...]


def parse_layers(text: str, n_layers: int) -> tuple[int, ...]:
    """"28,29" or "20-29" or "all" -> layer indices, checked against the model."""
    if text == "all":
        return tuple(range(n_layers))
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--layers {text!r}: expected all, a list like 28,29 or a range like 20-29") from None
    bad = sorted(i for i in out if not 0 <= i < n_layers)
    if bad or not out:
        raise UserError(f"--layers {text!r}: layers are 0..{n_layers - 1}")
    return tuple(sorted(out))


def finetune(model_id: str, source: str, out: Path, *, steps: int = 20, lr: float = 1e-4, batch_size: int = 4,
             context_length: int = 128, layers: str = "all", seed: int = 0) -> FinetuneResult:
    from .architectures import arch_of, locate
    from .models import load_config, load_model
    from .runner import plan
    from .spec import JobSpec

    if steps < 1 or batch_size < 1 or lr <= 0:
        raise UserError("--steps, --batch-size and --lr must be positive")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new directory")
    corpus = CorpusSpec(source=source, max_tokens=steps * batch_size * context_length, context_length=context_length)
    spec = JobSpec(name="finetune", corpus=corpus, model=ModelSpec(id=model_id, device="cpu"))
    loaded = load_model(spec.model)
    if not loaded.causal:
        raise UserError(f"{model_id}: fine-tuning needs a causal LM")
    shards, _ = plan(spec, loaded.tokenizer)
    ids = torch.cat([torch.from_numpy(s.ids[s.length == s.ids.shape[1]]) for s in shards])
    if len(ids) < batch_size:
        raise UserError(f"{source}: too little text for one batch of {batch_size} full contexts")
    model = loaded.model
    _, blocks = locate(model, arch_of(model))
    chosen = parse_layers(layers, len(blocks))
    model.requires_grad_(False)
    for i in chosen:
        blocks[i].requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    start, losses, seen = time.perf_counter(), [], 0
    for step in range(steps):
        batch = ids[(step * batch_size) % len(ids):][:batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        seen += batch.numel()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.config.__dict__.pop("quantization_config", None)  # a GGUF source's; the copy is plain weights
    model.config.use_cache = load_config(spec.model).use_cache  # as the source had it: load_model turned it off
    model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return FinetuneResult(out, steps, seen, losses[0], losses[-1], time.perf_counter() - start, chosen)
