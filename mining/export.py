"""Example sets: for chosen neurons, their top examples with the activation on every token of the context.

The store keeps per-neuron peaks, not whole activation tensors, so the per-token activations
are recomputed by a replay pass over just the needed contexts (cost: one forward pass per
exported context — for 10 neurons × 10 examples, ~100 contexts, seconds on a CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
import yaml

from .errors import UserError
from .hooks import capture, resolve_hooks
from .models import load_model, resolve_source
from .shards import special_tokens
from .spec import spec_from_dict
from .storage import atomic_write, atomic_write_text, is_url


def export_examples(store: str | Path, hook: str, neurons: Sequence[tuple[int, int]], k: int, fmt: str,
                    out: Path) -> int:
    rows = example_rows(store, hook, neurons, k)
    if fmt == "jsonl":
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        atomic_write(out, lambda p: pq.write_table(pa.Table.from_pylist(rows), p, compression="zstd"))
    return len(rows)


def example_rows(store: str | Path, hook: str, neurons: Sequence[tuple[int, int]], k: int) -> list[dict]:
    if is_url(store):  # read the tables from the same local mirror queries use
        from .mirror import mirror

        root = mirror(str(store))
    else:
        root = Path(store)
    if not (root / "manifest.parquet").exists():
        raise UserError(f"{store}: not a complete store (no manifest.parquet); finish it with `mine run --resume`")
    top = pq.read_table(root / "top_examples.parquet",
                        filters=[("hook", "=", hook), ("rank", "<=", k)]).to_pylist()
    wanted = {}
    for layer, neuron in neurons:
        found = [r for r in top if r["layer"] == layer and r["neuron"] == neuron]
        if not found:
            raise UserError(f"neuron {layer}:{neuron} of {hook} is not in {store} (see `mine query {store} "
                            f"--named neuron-index`)")
        wanted[(layer, neuron)] = sorted(found, key=lambda r: r["rank"])
    tokens = ds.dataset(root / "tokens", format="parquet")
    toks = [r["tok"] for rs in wanted.values() for r in rs]
    peak_rows = tokens.to_table(filter=pc.field("tok").isin(toks)).to_pylist()
    by_tok = {r["tok"]: r for r in peak_rows}
    ctxs = sorted({by_tok[t]["ctx"] for t in toks})
    ctx_rows = tokens.to_table(filter=pc.field("ctx").isin(ctxs)).sort_by([("ctx", "ascending"), ("pos", "ascending")])
    contexts = _group_contexts(ctx_rows)
    acts = _replay(root, hook, sorted({layer for layer, _ in neurons}), contexts)
    out = []
    for (layer, neuron), examples in wanted.items():
        for r in examples:
            peak = by_tok[r["tok"]]
            ctx = contexts[peak["ctx"]]
            values = acts[(layer, peak["ctx"])][:, neuron]
            out.append({
                "hook": hook, "layer": layer, "neuron": neuron, "rank": r["rank"], "value": r["value"],
                "tok": r["tok"], "ctx": peak["ctx"], "doc_id": peak["doc_id"],
                "char_start": peak["char_start"], "char_end": peak["char_end"],
                "peak_index": ctx["tok"].index(r["tok"]), "tokens": ctx["token"],
                "activations": [round(float(v), 6) for v in values],
            })
    return out


def _group_contexts(table: pa.Table) -> dict[int, dict[str, list]]:
    contexts: dict[int, dict[str, list]] = {}
    for row in table.select(["ctx", "tok", "pos", "token_id", "token"]).to_pylist():
        c = contexts.setdefault(row["ctx"], {"tok": [], "pos": [], "token_id": [], "token": []})
        for key in ("tok", "pos", "token_id", "token"):
            c[key].append(row[key])
    return contexts


@torch.inference_mode()
def _replay(store: Path, hook: str, layers: list[int], contexts: dict[int, dict[str, list]]) -> dict:
    """Re-run the stored model over the contexts; returns (layer, ctx) -> (n_tokens, N) activations."""
    spec = spec_from_dict(yaml.safe_load((store / "job.yaml").read_text()))
    loaded = load_model(spec.model)
    specials = special_tokens(loaded.tokenizer, spec.corpus.bos, resolve_source(spec.model).bos)
    points = resolve_hooks(loaded.model, [f"blocks.{layer}.{hook}" for layer in layers])
    result = {}
    for ctx, c in contexts.items():
        ids = list(specials.prefix) + c["token_id"] + list(specials.suffix)
        if c["pos"] and c["pos"][0] != len(specials.prefix):
            raise UserError(f"{store}: context {ctx} does not start where the tokenizer's specials end; "
                            "was it mined with another tokenizer?")
        seen: dict[int, torch.Tensor] = {}

        def keep(point, x):
            seen[point.layer] = x[0].float().cpu()

        with capture(loaded.model, points, keep):
            loaded.model(input_ids=torch.tensor([ids], device=loaded.device))
        first = len(specials.prefix)
        for layer, x in seen.items():
            result[(layer, ctx)] = x[first : first + len(c["token_id"])].numpy().astype(np.float32)
    return result
