"""Tables about the model rather than per-token statistics, built on an actor that holds the model.

    logit_lens        from the weights (hooked mlp.hook_post layers, and SAE latents that write the stream)
    heads             head scores on repeated random tokens plus a few corpus contexts
    neuron_coherence  embedding coherence of each neuron's merged top-context peak tokens
    weight_diff       diff jobs: per parameter, neuron and head, how much B's weights differ from A's
    head_ablation     per head of the hooked layers, loss change under zero and mean ablation over
                      the first contexts of the corpus; one layer per call, spread over the actors

The driver gathers the inputs (`model_table_inputs`) after merging the shards.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .analyses.heads import BATCH, KINDS, head_ablation_table
from .engine import ShardMiner
from .store import Store

COHERENCE_SCHEMA = pa.schema([("hook", pa.string()), ("layer", pa.int32()), ("neuron", pa.int32()),
                              ("coherence", pa.float64()), ("peaks", pa.int32()),
                              ("distinct_tokens", pa.int32())])


def write_model_tables(miner: ShardMiner, store: Store, names: list[str], inputs: dict[str, Any]) -> None:
    model, tokenizer = miner.loaded.model, miner.loaded.tokenizer
    if "logit_lens" in names:
        from .analyses.logit_lens import has_lens, logit_lens_table

        layers = sorted({p.layer for p in miner.points if p.site == "mlp.hook_post"})
        latents = [p for p in miner.points if p.sae and has_lens(p)]
        store.write_table("logit_lens", logit_lens_table(model, tokenizer, layers, k=miner.spec.stats.logit_lens_k,
                                                         latents=latents))
    if "heads" in names:
        from .analyses.heads import head_scores_table

        corpus_ids = inputs.get("corpus_ids")
        bos = int(corpus_ids[0, 0]) if corpus_ids is not None and len(corpus_ids) else None  # as mined
        store.write_table("heads", head_scores_table(model, tokenizer, corpus_ids=corpus_ids, bos_id=bos))
    if "weight_diff" in names:
        from .diff import weight_diff_tables

        for name, table in weight_diff_tables(model, miner.loaded_b.model).items():
            store.write_table(name, table)
    if "neuron_coherence" in names:
        store.write_table("neuron_coherence", coherence_table(miner, inputs["peaks"]))


def coherence_table(miner: ShardMiner, peaks: pa.Table) -> pa.Table:
    """peaks: (hook, layer, neuron, token_id) rows of the merged top_contexts."""
    from .analyses.coherence import coherence, unit_embeddings

    if peaks.num_rows == 0:
        return COHERENCE_SCHEMA.empty_table()
    units = unit_embeddings(miner.loaded.model, len(miner.loaded.tokenizer))
    df = peaks.to_pandas().sort_values(["hook", "layer", "neuron"], kind="stable")
    keys = df[["hook", "layer", "neuron"]].drop_duplicates().reset_index(drop=True)
    slot = df.groupby(["hook", "layer", "neuron"], sort=True).cumcount().to_numpy()
    row = df.groupby(["hook", "layer", "neuron"], sort=True).ngroup().to_numpy()
    grid = np.full((len(keys), int(slot.max()) + 1), -1, dtype=np.int64)
    grid[row, slot] = df["token_id"].to_numpy()
    distinct = df.groupby(["hook", "layer", "neuron"], sort=True)["token_id"].nunique().to_numpy()
    return pa.table({
        "hook": pa.array(keys["hook"].tolist(), pa.string()), "layer": pa.array(keys["layer"], pa.int32()),
        "neuron": pa.array(keys["neuron"], pa.int32()), "coherence": coherence(units, grid),
        "peaks": pa.array((grid >= 0).sum(1), pa.int32()), "distinct_tokens": pa.array(distinct, pa.int32()),
    }, schema=COHERENCE_SCHEMA)


def head_ablation_layer(miner: ShardMiner, layer: int, input_ids: np.ndarray) -> pa.Table:
    from .analyses.heads import dims

    n_heads = dims(miner.loaded.model.config)["n_heads"]
    ids = torch.from_numpy(np.ascontiguousarray(input_ids))
    return head_ablation_table(miner.loaded.model, ids, [(layer, h) for h in range(n_heads)], kinds=KINDS,
                               batch_size=miner.batch_size or BATCH)


def ablation_contexts(shards: list, tokens: int) -> np.ndarray:
    """The first full-length contexts of the corpus, in order, until they hold `tokens` tokens."""
    rows, total = [], 0
    for s in shards:
        full = s.length == s.ids.shape[1]
        for row in s.ids[full]:
            if total >= tokens:
                return np.stack(rows)
            rows.append(row)
            total += len(row)
    if not rows:
        raise ValueError("no full-length context to ablate heads on")
    return np.stack(rows)
