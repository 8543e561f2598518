"""An encoder end to end: all-MiniLM-L6-v2 (BERT) mined through `mine run`, checked by brute force."""

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from mining.cli import main
from mining.query import connect, run_named
from mining.replay import load_contexts

pytestmark = [pytest.mark.slow, pytest.mark.ray]

JOB = """
name: minilm
model: {id: minilm-l6}
corpus: {source: "builtin:python-docs", max_tokens: 600, context_length: 48}
hooks: ["blocks.*.mlp.hook_post"]
stats: {top_k: 4}
compute: {actors: 1, batch_size: 4, shard_tokens: 300}
"""


def test_minilm_store_matches_brute_force(tmp_path):
    (tmp_path / "job.yaml").write_text(JOB)
    store = tmp_path / "store"
    assert main(["run", str(tmp_path / "job.yaml"), "--store", str(store), "--no-progress"]) == 0
    tokens = ds.dataset(store / "tokens").to_table().sort_by("tok").to_pandas()
    assert len(tokens) == 600 and tokens.logprob.isna().all()  # no LM head: log-probs are NULL, not made up
    neurons = pq.read_table(store / "neurons.parquet").to_pandas()
    assert len(neurons) == 6 * 1536 and (neurons["count"] == 600).all()

    from mining.models import load_model
    from mining.spec import ModelSpec

    loaded = load_model(ModelSpec(id="minilm-l6"))
    tok = loaded.tokenizer
    grabbed = {}
    layer = 4
    handle = loaded.model.encoder.layer[layer].output.dense.register_forward_pre_hook(
        lambda mod, args: grabbed.__setitem__("x", args[0][0]))
    acts = []
    try:
        with torch.inference_mode():
            for _, group in tokens.groupby("ctx", sort=True):
                ids = [tok.cls_token_id] + group.token_id.tolist() + [tok.sep_token_id]
                loaded.model(input_ids=torch.tensor([ids]))
                acts.append(grabbed["x"][1:-1].numpy())
    finally:
        handle.remove()
    a = np.concatenate(acts)
    top = pq.read_table(store / "top_examples.parquet").to_pandas()
    for neuron in (0, 511, 1535):
        col = a[:, neuron]
        mine = top[(top.layer == layer) & (top.neuron == neuron)].sort_values("rank")
        order = np.lexsort((np.arange(len(col)), -col))[:4]
        np.testing.assert_allclose(mine.value, col[order], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(col[mine.tok.to_numpy()], mine.value, rtol=1e-4, atol=1e-4)
        row = neurons[(neurons.layer == layer) & (neurons.neuron == neuron)].iloc[0]
        np.testing.assert_allclose([row["mean"], row["std"]], [col.mean(), col.std()], rtol=1e-4, atol=1e-5)


    # WordPiece's spans leave the spaces and newlines out; contexts still read as the document's text
    docs = dict(zip(*pq.read_table(store / "docs.parquet", columns=["doc_id", "text"]).to_pydict().values()))
    con = connect(store)
    shown = run_named(con, "top-contexts", {"layer": str(layer), "neuron": "0", "k": "4"}).to_pylist()
    con.close()
    assert len(shown) == 4
    for row in shown:
        text = row["context"].replace("«", "").replace("»", "")
        assert " " in text and text in docs[row["doc_id"]], row
    ctxs = load_contexts(store, sorted(set(tokens.ctx))[:5])
    for c in ctxs.values():  # the replayed contexts (exports, the viewer) show the same text
        start, end = c.span
        assert "".join(c.token) == docs[c.doc_id][start:end]
