"""Direct logit attribution on each decoder family's own norms: Gemma's RMSNorm scales by (1 + weight), and Gemma 2/3
and OLMo 2 pass the attention's and the MLP's outputs through norms of their own before the residual stream. On tiny
random models (norm weights drawn at random, so a gain left out shows), each layer's neurons add up to what its MLP
adds to the residual stream, read through the final norm, its heads (as a diff job attributes them) to what its
attention adds, and with the embeddings they add up to the logit."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mining.diff import _feature_rows, _head_dla
from mining.dla import DirectLogitAttribution, DlaBatch, GainProduct
from mining.hooks import capture, final_norm, resolve_hooks, unembedding
from mining.tiny import ARCHS as TINY_ARCHS, tiny_model

ARCHS = ["llama", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo2", "phi3", "granite"]
B, T, VOCAB = 3, 12, 300


def logit_factor(model) -> float:
    """What the model multiplies its logits by, from its config alone: Cohere's logit_scale, Granite's
    1 / logits_scaling (1 elsewhere)."""
    config = model.config
    return getattr(config, "logit_scale", None) or 1.0 / getattr(config, "logits_scaling", 1.0)


def _batch(ids: torch.Tensor) -> SimpleNamespace:
    """Every position mined; all but the last have a next token."""
    toks = np.arange(ids.numel()).reshape(ids.shape)
    targets = np.full(ids.shape, -1)
    targets[:, :-1] = ids[:, 1:].numpy()
    return SimpleNamespace(toks_np=toks, targets_np=targets, toks=torch.from_numpy(toks))


def _residuals(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each block's input, the stream after attention and its output, by plain PyTorch hooks (not mining.hooks)."""
    decoder = getattr(model.model, "language_model", model.model)  # Gemma 3's multimodal wrapper: its text decoder
    blocks, out = decoder.layers, {}
    handles = []
    for layer, blk in enumerate(blocks):
        handles.append(blk.register_forward_pre_hook(
            lambda m, a, kw, layer=layer: out.__setitem__(f"pre{layer}", (a[0] if a else kw["hidden_states"]).clone()),
            with_kwargs=True))
        handles.append(blk.register_forward_hook(lambda m, a, o, layer=layer: out.__setitem__(
            f"post{layer}", (o[0] if isinstance(o, tuple) else o).clone())))
        # the stream after attention: what the MLP's pre-norm reads, or the MLP itself where it has none (OLMo 2)
        reads_stream = (blk.mlp if not hasattr(blk, "input_layernorm") else
                        getattr(blk, "pre_feedforward_layernorm", None) or blk.post_attention_layernorm)
        handles.append(reads_stream.register_forward_pre_hook(
            lambda m, a, layer=layer: out.__setitem__(f"mid{layer}", a[0].clone())))
    handles.append(final_norm(model).register_forward_pre_hook(lambda m, a: out.__setitem__("final", a[0].clone())))
    try:
        out["logits"] = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return out


def mine_merged(spec) -> tuple:
    """A job mined without Ray, its shards in order by one miner as an actor mines them, their states merged:
    (the loaded model, the shards, hook name -> merged HookStats)."""
    from mining.models import load_model
    from mining.runner import plan
    from test_device import mine_all

    loaded = load_model(spec.model)
    shards, _ = plan(spec, loaded.tokenizer)
    results = mine_all(spec, loaded, shards)
    stats = results[0].stats
    for r in results[1:]:
        stats = {name: st.merge(r.stats[name]) for name, st in stats.items()}
    return loaded, shards, stats


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "torch"])
@pytest.mark.parametrize("arch", ARCHS)
@torch.inference_mode()
def test_neurons_add_up_to_their_mlps_write_and_everything_to_the_logit(arch, defer):
    model = tiny_model(arch, vocab_size=VOCAB, seed=4)
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    ref = _residuals(model, ids)
    dla = DirectLogitAttribution(model)
    batch = DlaBatch(dla, _batch(ids), defer=defer)
    points = resolve_hooks(model, "blocks.*.mlp.hook_post")
    heads = resolve_hooks(model, "blocks.*.attn.hook_z")

    def take(point, x):
        if point.site == "attn.hook_z":
            values = _head_dla(batch, point, x, _feature_rows(model, point).float())
            batch.keep_raw(point.name, "attn", point.layer, values)
        else:
            batch.gain(point, x)

    with capture(model, points + heads, take), batch.watch_norm():
        model(input_ids=ids)
    got = dict(batch.finish())
    assert len(got) == len(points) + len(heads)

    sel = torch.from_numpy(batch.sel_np)
    assert len(sel) == B * (T - 1)
    targets = torch.from_numpy(_batch(ids).targets_np.reshape(-1)[batch.sel_np])
    # d_t and s straight from the modules: the final norm's gain (1 + w for Gemma) and its RMS divisor
    norm = final_norm(model)
    gamma = norm.weight.float() + (1.0 if arch.startswith("gemma") else 0.0)
    d = unembedding(model)[:, targets].T.float() * gamma * logit_factor(model)  # Granite's logits are scaled
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    flat = lambda t: t.reshape(-1, t.shape[-1])[sel]  # noqa: E731
    s = torch.sqrt(flat(ref["final"]).pow(2).mean(-1) + eps)
    read = lambda v: (flat(v) * d).sum(-1) / s  # noqa: E731 - a residual-stream write's logit, scale held fixed
    total = read(ref["pre0"])
    for layer, point in enumerate(points):
        values = got[point.name]
        values = values.values() if isinstance(values, GainProduct) else values
        assert isinstance(got[point.name], GainProduct) == defer
        mlp_write = read(ref[f"post{layer}"] - ref[f"mid{layer}"])
        assert mlp_write.abs().max() > 1e-2
        torch.testing.assert_close(values.sum(1), mlp_write, rtol=1e-4, atol=1e-4)
        attn_write = read(ref[f"mid{layer}"] - ref[f"pre{layer}"])
        assert got[heads[layer].name].shape == (len(sel), heads[layer].n_heads)
        torch.testing.assert_close(got[heads[layer].name].sum(1), attn_write, rtol=1e-4, atol=1e-4)
        total = total + got[heads[layer].name].sum(1) + values.sum(1)
    logits = (norm(flat(ref["final"])) @ unembedding(model)).gather(1, targets[:, None])[:, 0] * logit_factor(model)
    torch.testing.assert_close(total, logits, rtol=1e-4, atol=1e-4)
    cap = getattr(model.config, "final_logit_softcapping", None)
    model_logits = ref["logits"].reshape(-1, VOCAB)[sel].gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(model_logits, logits if cap is None else cap * torch.tanh(logits / cap))


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a != "bert"])
@torch.inference_mode()
def test_dla_reads_each_familys_final_norm_as_the_norm_computes_it(arch):
    """The norm as DLA reads it (its gain, centring and per-token scale) is the norm: on a stream of small variance,
    where eps matters (OLMo 1's is fixed at 1e-5 inside its forward), and for Gemma's (1 + w) gain."""
    model = tiny_model(arch, vocab_size=VOCAB, seed=4)
    dla = DirectLogitAttribution(model)
    x = torch.randn(5, dla.w_u.shape[0], generator=torch.Generator().manual_seed(2)) * 3e-3 + 1e-3
    centred = x - x.mean(-1, keepdim=True) if dla.kind == "layer" else x
    bias = getattr(dla.norm, "bias", None)
    want = dla.gamma * centred / dla.scale(x)[:, None] + (0 if bias is None else bias)
    torch.testing.assert_close(want, dla.norm(x).float(), rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_gemmas_gain_is_one_plus_its_weight():
    """Gemma's stored norm weights sit around zero: read as the gain itself, its DLA would be about zero."""
    model = tiny_model("gemma", vocab_size=VOCAB, seed=4)
    dla = DirectLogitAttribution(model)
    torch.testing.assert_close(dla.gamma, final_norm(model).weight.float() + 1)
    assert set(dla.out_norms) == set()
    assert set(DirectLogitAttribution(tiny_model("gemma2", vocab_size=VOCAB)).out_norms) == {
        (part, layer) for part in ("attn", "mlp") for layer in (0, 1)}


JOB = """
name: gemma2-dla
model: {{id: "{model}"}}
corpus: {{source: "builtin:python-docs", max_tokens: 500, context_length: 48}}
hooks: ["blocks.*.mlp.hook_post"]
stats: {{top_k: 5, dla: true, logit_lens: true, heads: true}}
compute: {{actors: 1, batch_size: 4, shard_tokens: 250}}
"""


@pytest.mark.slow
@pytest.mark.ray
@torch.inference_mode()
def test_a_mined_gemma2_store_matches_brute_force(tmp_path, smol_tokenizer):
    """`mine run` on a tiny Gemma 2 (saved with SmolLM2's tokenizer): every neuron's mined DLA (count, mean, top and
    bottom 5) against a brute force from the modules' raw weights, (1 + w) gains and the MLP output norm's scale."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from mining.cli import main

    model = tiny_model("gemma2", vocab_size=len(smol_tokenizer), seed=2, max_position_embeddings=256)
    model.save_pretrained(tmp_path / "model")
    smol_tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "job.yaml").write_text(JOB.format(model=tmp_path / "model"))
    store = tmp_path / "store"
    assert main(["run", str(tmp_path / "job.yaml"), "--store", str(store), "--no-progress"]) == 0
    for table in ("logit_lens", "heads", "dla_examples"):
        assert pq.read_metadata(store / f"{table}.parquet").num_rows > 0

    tokens = ds.dataset(store / "tokens").to_table().sort_by("tok").to_pandas()
    layers = model.model.layers
    w_u = (model.lm_head.weight * (model.model.norm.weight + 1)).double()  # (V, d): d_t rows
    per_layer: dict[int, list[np.ndarray]] = {0: [], 1: []}
    # each position's target: the document's next token, mined or not (the corpus' cut can fall inside a document)
    texts = pq.read_table(store / "docs.parquet").to_pandas().set_index("doc_id").text
    tokens["next"] = -1
    for doc, rows in tokens.groupby("doc_id"):
        ids = smol_tokenizer(texts[doc], add_special_tokens=False)["input_ids"]
        assert ids[:len(rows)] == rows.token_id.tolist()
        tokens.loc[rows.index, "next"] = (ids[1:] + [-1])[:len(rows)]
    for _, group in tokens.groupby("ctx", sort=True):
        ids = [smol_tokenizer.bos_token_id or 0] + group.token_id.tolist()
        got: dict = {}
        hooks = [layers[L].mlp.down_proj.register_forward_pre_hook(lambda m, a, L=L: got.__setitem__(("a", L), a[0][0]))
                 for L in per_layer]
        hooks += [layers[L].mlp.down_proj.register_forward_hook(lambda m, a, o, L=L: got.__setitem__(("out", L), o[0]))
                  for L in per_layer]
        hooks.append(model.model.norm.register_forward_pre_hook(lambda m, a: got.__setitem__("final", a[0][0])))
        model(input_ids=torch.tensor([ids]))
        for h in hooks:
            h.remove()
        nxt = group.next.to_numpy()
        keep = torch.from_numpy(np.flatnonzero(nxt >= 0) + 1)  # positions after the BOS
        rms = lambda x, eps: torch.sqrt(x.double().pow(2).mean(-1) + eps)  # noqa: E731
        s = rms(got["final"][keep], model.model.norm.eps)
        for L in per_layer:
            post = layers[L].post_feedforward_layernorm
            w_out = layers[L].mlp.down_proj.weight.T.double() * (post.weight.double() + 1)  # (N, d)
            s_out = rms(got[("out", L)][keep], post.eps)
            gain = w_u[torch.from_numpy(nxt[nxt >= 0])] @ w_out.T  # (P, N)
            per_layer[L].append((got[("a", L)][keep].double() * gain / (s * s_out)[:, None]).numpy())
    examples = pq.read_table(store / "dla_examples.parquet").to_pandas()
    neurons = pq.read_table(store / "dla_neurons.parquet").to_pandas()
    for L, parts in per_layer.items():
        values = np.concatenate(parts)
        for n in range(values.shape[1]):
            col = values[:, n]
            row = neurons[(neurons.layer == L) & (neurons.neuron == n)].iloc[0]
            assert row["count"] == len(col)
            np.testing.assert_allclose(row["mean_dla"], col.mean(), rtol=1e-4, atol=1e-6)
            mine = examples[(examples.layer == L) & (examples.neuron == n)]
            for sign, want in (("positive", np.sort(col)[::-1][:5]), ("negative", np.sort(col)[:5])):
                got_values = mine[mine.sign == sign].sort_values("rank").dla
                np.testing.assert_allclose(got_values, want, rtol=1e-4, atol=1e-6)

    # a diff job against a copy with one neuron scaled: its DLA of A is the store's above, heads attributed too
    b = tiny_model("gemma2", vocab_size=len(smol_tokenizer), seed=2, max_position_embeddings=256)
    b.model.layers[0].mlp.up_proj.weight[7] *= 3
    b.save_pretrained(tmp_path / "b")
    smol_tokenizer.save_pretrained(tmp_path / "b")
    a_id, b_id = tmp_path / "model", tmp_path / "b"
    models = f'models: {{a: {{id: "{a_id}"}}, b: {{id: "{b_id}"}}}}'
    diff_job = JOB.format(model=a_id).replace(f'model: {{id: "{a_id}"}}', models)
    diff_job = diff_job.replace(", logit_lens: true, heads: true", "")
    (tmp_path / "diff.yaml").write_text(diff_job)
    assert main(["run", str(tmp_path / "diff.yaml"), "--store", str(tmp_path / "diff"), "--no-progress"]) == 0
    diff = pq.read_table(tmp_path / "diff" / "dla_diff.parquet").to_pandas().sort_values(["layer", "neuron"])
    np.testing.assert_allclose(diff.mean_dla_a, neurons.sort_values(["layer", "neuron"]).mean_dla, rtol=1e-6, atol=1e-9)
    heads = pq.read_table(tmp_path / "diff" / "head_dla_diff.parquet").to_pandas()
    assert len(heads) == 2 * model.config.num_attention_heads and heads.mean_dla_a.notna().all()


@pytest.mark.parametrize("arch, hooks, dla", [("gemma2", ["blocks.*.mlp.hook_post"], True),
                                             ("opt", ["blocks.*.mlp.hook_post"], False),
                                             ("olmoe", ["blocks.*.mlp.hook_expert_weights"], False)])
def test_the_gpu_kernels_emulated_miner_mines_what_the_cpu_miner_mines(arch, hooks, dla, tmp_path, smol_tokenizer,
                                                                       monkeypatch):
    """The device path (the CUDA kernel, emulated on the CPU) on a tiny Gemma 2, whose DLA it divides by each layer's
    own scale as it reads the activations (FusedGain); on OPT, whose MLP activations come back from (B*T, N); on
    OLMoE's routing probabilities (a softmax the hook computes): it mines what the CPU miner mines, bit for bit.
    (OPT's DLA is left out: for the LayerNorm families, GPT-2's too, the two paths' gains differ in the last bit.)"""
    from mining.models import load_model
    from mining.reducers import cuda_layer
    from mining.runner import plan
    from mining.spec import spec_from_dict
    from test_device import mine_all, same_results

    tiny_model(arch, vocab_size=len(smol_tokenizer), seed=2).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    spec = spec_from_dict({
        "name": f"{arch}-device", "model": {"id": str(tmp_path)},
        "corpus": {"source": "builtin:python-docs", "max_tokens": 600, "context_length": 64},
        "hooks": hooks, "stats": {"top_k": 6, "dla": dla},
        "compute": {"batch_size": 4, "shard_tokens": 300},
    })
    loaded = load_model(spec.model)
    shards, _ = plan(spec, loaded.tokenizer)
    ref = mine_all(spec, loaded, shards[:2])
    monkeypatch.setenv("MINING_DEVICE_PATH", "1")
    monkeypatch.setenv("MINING_CUDA_EMULATE", "1")
    calls = []  # whether each call reduced DLA fused into the read
    original = cuda_layer.layer_pass
    monkeypatch.setattr(cuda_layer, "layer_pass", lambda *a, **kw: calls.append("gain" in kw) or original(*a, **kw))
    same_results(mine_all(spec, loaded, shards[:2]), ref)
    assert calls and (True in calls) == dla



@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "gpt_neox", "gptj", "phi", "gpt_bigcode", "starcoder2",
                                  "stablelm", "olmo", "opt", "bloom", "cohere", "cohere2"])
@torch.inference_mode()
def test_layernorm_families_neurons_add_up_to_their_mlps_output(arch):
    """The LayerNorm path (d_t centred over d_model, s the standard deviation): each layer's neurons plus its output
    projection's bias, read through the final norm, add up to what the MLP module outputs; the final stream so read,
    plus the norm's and the LM head's biases, is the model's logit. OLMo 1's LayerNorms have no weight (a gain of
    1), no bias and no eps attribute (its forward uses 1e-5); Cohere's centre without a bias, and its logits are
    scaled."""
    model = tiny_model(arch, vocab_size=VOCAB, seed=4)
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    dla = DirectLogitAttribution(model)
    batch = DlaBatch(dla, _batch(ids), defer=False)
    points = resolve_hooks(model, "blocks.*.mlp.hook_post")
    outs, handles = {}, []
    for point in points:
        # the MLP module's output, or its output projection's where the module adds more (OPT has none, BLOOM's
        # adds the residual)
        path = point.module_path if arch in ("opt", "bloom") else point.module_path.rsplit(".", 1)[0]
        mlp = model.get_submodule(path)
        handles.append(mlp.register_forward_hook(lambda m, a, o, L=point.layer: outs.__setitem__(L, o.clone())))
    handles.append(dla.norm.register_forward_pre_hook(lambda m, a: outs.__setitem__("final", a[0].clone())))
    try:
        with capture(model, points, batch.gain), batch.watch_norm():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    got = dict(batch.finish())
    sel = torch.from_numpy(batch.sel_np)
    targets = torch.from_numpy(_batch(ids).targets_np.reshape(-1)[batch.sel_np])
    norm, w_u = dla.norm, unembedding(model)
    gamma = norm.weight if arch != "olmo" else torch.ones(w_u.shape[0])
    d = w_u[:, targets].T * gamma * logit_factor(model)  # (M, d_model); Cohere's logits are scaled
    flat = lambda t: t.reshape(-1, t.shape[-1])[sel]  # noqa: E731
    x = flat(outs["final"])
    eps = 1e-5 if arch == "olmo" else getattr(norm, "variance_epsilon", None) or norm.eps  # Cohere's: an attribute
    s = torch.sqrt(x.var(-1, unbiased=False) + eps)
    read = lambda v: ((v - v.mean(-1, keepdim=True)) * d).sum(-1) / s  # noqa: E731 - LayerNorm: v centred
    biases = torch.zeros(len(sel))
    if getattr(norm, "bias", None) is not None:
        biases += (norm.bias @ w_u)[targets]
    if getattr(model.get_output_embeddings(), "bias", None) is not None:  # Phi's LM head
        biases += model.get_output_embeddings().bias[targets]
    logit = logits.reshape(-1, logits.shape[-1])[sel].gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(read(x) + biases, logit, rtol=1e-4, atol=1e-4)
    for point in points:
        bias = model.get_submodule(point.module_path).bias
        bias = torch.zeros(x.shape[-1]) if bias is None else bias  # StableLM's down_proj has none
        mlp_out = read(flat(outs[point.layer]))
        assert mlp_out.abs().max() > 1e-2
        torch.testing.assert_close(got[point.name].sum(1) + read(bias.expand(len(sel), -1)), mlp_out,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, says", [("gpt2", "no hooked blocks.*.mlp.hook_post of a gated MLP")])
def test_gate_cases_are_refused_in_one_line_where_there_is_no_gate_to_hook(arch, says, tmp_path, smol_tokenizer):
    from mining.errors import UserError
    from mining.runner import validate
    from mining.spec import spec_from_dict

    tiny_model(arch, vocab_size=len(smol_tokenizer)).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    job = {"name": "gates", "model": {"id": str(tmp_path)}, "hooks": ["blocks.*.mlp.hook_post"],
           "corpus": {"source": "builtin:python-docs", "max_tokens": 300, "context_length": 64},
           "stats": {"gate_cases": True}}
    with pytest.raises(UserError, match=says) as caught:
        validate(spec_from_dict(job))
    assert str(caught.value).startswith("stats.gate_cases: ") and "\n" not in str(caught.value)
    job["stats"] = {}
    validate(spec_from_dict(job))


def test_phi3_gate_and_up_are_the_halves_of_its_fused_projection_and_mine(tmp_path, smol_tokenizer):
    """Phi-3 computes gate and up in one matmul (gate_up_proj, then chunk(2)). Its hook_pre and hook_pre_linear are
    the two halves: a job mines the gate itself and the gate-sign cases of its neurons, each context recomputed here
    alone with plain hooks on the model's modules. A sign within 1e-4 of zero may differ between the batched and
    the single forward: each neuron's count may move by at most its number of such values."""
    from mining.runner import validate
    from mining.spec import spec_from_dict

    tiny_model("phi3", vocab_size=len(smol_tokenizer)).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    spec = spec_from_dict({
        "name": "phi3-gates", "model": {"id": str(tmp_path)},
        "hooks": ["blocks.*.mlp.hook_post", "blocks.1.mlp.hook_pre"],
        "corpus": {"source": "builtin:python-docs", "max_tokens": 600, "context_length": 64},
        "stats": {"top_k": 4, "gate_cases": True}, "compute": {"batch_size": 4, "shard_tokens": 256}})
    validate(spec)
    loaded, shards, stats = mine_merged(spec)

    model, grabbed = loaded.model, {}
    handles = []
    for layer, blk in enumerate(model.model.layers):
        handles.append(blk.mlp.gate_up_proj.register_forward_hook(
            lambda m, a, o, layer=layer: grabbed.__setitem__(("fused", layer), o[0])))
        handles.append(blk.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, layer=layer: grabbed.__setitem__(("post", layer), a[0][0])))
    acts: dict = {}
    try:
        with torch.inference_mode():
            for shard in shards:
                for c in range(len(shard.ids)):
                    model(torch.from_numpy(shard.ids[c, :shard.length[c]])[None])
                    keep = slice(shard.first[c], shard.first[c] + shard.mined[c])
                    for (kind, layer), x in grabbed.items():
                        acts.setdefault((kind, layer), []).append(x[keep].float())
    finally:
        for h in handles:
            h.remove()
    acts = {key: torch.cat(parts) for key, parts in acts.items()}

    n = sum(s.n_tokens for s in shards)
    gate1 = acts[("fused", 1)].chunk(2, dim=-1)[0]
    values, _ = stats["blocks.1.mlp.hook_pre"].top.finalize()
    torch.testing.assert_close(values, gate1.topk(4, dim=0).values, rtol=1e-4, atol=1e-4)
    for layer in range(len(model.model.layers)):
        gate, up = acts[("fused", layer)].chunk(2, dim=-1)
        post = acts[("post", layer)]
        torch.testing.assert_close(post, torch.nn.functional.silu(gate) * up)  # the model's own split
        got = stats[f"blocks.{layer}.mlp.hook_post"].gate_cases.finalize()
        assert (got["count"].sum(0) == n).all()
        case = (gate > 0).long() * 2 + (up > 0).long()
        near = ((gate.abs() < 1e-4) | (up.abs() < 1e-4)).sum(0).numpy()
        for c in range(4):
            want = (case == c).sum(0).numpy()
            assert (np.abs(got["count"][c] - want) <= near).all(), (layer, c)
        both = (case == 3) & ~((gate.abs() < 1e-4) | (up.abs() < 1e-4))
        best = torch.where(both, post, torch.tensor(float("-inf"))).max(0).values
        has = torch.isfinite(best) & (near == 0)
        assert has.any()
        torch.testing.assert_close(got["top"][3][0][0][has], best[has], rtol=1e-4, atol=1e-4)


def test_phi3_weight_diff_finds_a_neuron_changed_in_its_fused_projection():
    """neuron_weight_diff reads a neuron's gate and up rows out of gate_up_proj: changing one neuron's up row there
    shows as that neuron's in_norm, and nowhere else."""
    from mining.diff import _neuron_weights

    a, b = tiny_model("phi3"), tiny_model("phi3")
    n = a.config.intermediate_size
    with torch.no_grad():
        b.model.layers[1].mlp.gate_up_proj.weight[n + 5] *= 3  # the up row of neuron 5 (the gate rows come first)
    for site, rows in (("mlp.hook_pre", slice(0, n)), ("mlp.hook_pre_linear", slice(n, 2 * n))):
        point = resolve_hooks(a, [f"blocks.1.{site}"])[0]
        torch.testing.assert_close(_feature_rows(a, point), a.model.layers[1].mlp.gate_up_proj.weight[rows].double())
    table = _neuron_weights(a, b).to_pandas()
    changed = table[table.in_norm > 0]
    assert list(zip(changed.layer, changed.neuron)) == [(1, 5)]
    up = a.model.layers[1].mlp.gate_up_proj.weight[n + 5].double()
    assert changed.in_norm.iloc[0] == pytest.approx(float(2 * up.norm()), rel=1e-6)  # 3w rounded to float32


@torch.inference_mode()
def test_a_mined_opt_matches_brute_force(tmp_path, smol_tokenizer):
    """OPT's MLP sees the stream as (B*T, d): a job's miner still takes each neuron's activations and DLA by token.
    Against each context recomputed alone with plain hooks: top activations, and DLA's count, mean and top values
    from the raw weights (d_t = gamma * W_U[:, t] centred, s the final stream's standard deviation)."""
    from mining.spec import spec_from_dict

    tiny_model("opt", vocab_size=len(smol_tokenizer), max_position_embeddings=256).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    spec = spec_from_dict({
        "name": "opt", "model": {"id": str(tmp_path)}, "hooks": ["blocks.*.mlp.hook_post"],
        "corpus": {"source": "builtin:python-docs", "max_tokens": 600, "context_length": 64},
        "stats": {"top_k": 4, "dla": True}, "compute": {"batch_size": 4, "shard_tokens": 256}})
    loaded, shards, stats = mine_merged(spec)

    model, grabbed = loaded.model, {}
    decoder = model.model.decoder
    handles = [blk.fc2.register_forward_pre_hook(lambda m, a, layer=layer: grabbed.__setitem__(layer, a[0]))
               for layer, blk in enumerate(decoder.layers)]
    handles.append(decoder.final_layer_norm.register_forward_pre_hook(lambda m, a: grabbed.__setitem__("final", a[0])))
    acts, dla = {0: [], 1: []}, {0: [], 1: []}
    norm = decoder.final_layer_norm
    try:
        for shard in shards:
            for c in range(len(shard.ids)):
                n = int(shard.length[c])
                ids = torch.from_numpy(shard.ids[c, :n])
                model(ids[None])
                p = torch.arange(int(shard.first[c]), int(shard.first[c] + shard.mined[c]))
                target = torch.cat([ids[1:], torch.tensor([int(shard.next_id[c])])])[p]
                final = grabbed["final"][0, p].double()
                s = torch.sqrt(final.var(-1, unbiased=False) + norm.eps)
                d = model.lm_head.weight[target.clamp(min=0)].double() * norm.weight.double()
                d = d - d.mean(-1, keepdim=True)
                for layer in acts:
                    a = grabbed[layer].reshape(1, n, -1)[0, p].double()  # (B*T, N) as the module saw it
                    acts[layer].append(a)
                    w_out = decoder.layers[layer].fc2.weight.double()  # (d, N)
                    dla[layer].append((a * (d @ w_out) / s[:, None])[target >= 0])
    finally:
        for h in handles:
            h.remove()
    for layer in acts:
        a, values = torch.cat(acts[layer]), torch.cat(dla[layer])
        st = stats[f"blocks.{layer}.mlp.hook_post"]
        top, _ = st.top.finalize()
        torch.testing.assert_close(top.double(), a.topk(4, dim=0).values, rtol=1e-4, atol=1e-5)
        m = st.dla_moments.finalize()
        assert (m["count"] == len(values)).all() and len(values) > 500
        np.testing.assert_allclose(m["mean"], values.mean(0).numpy(), rtol=1e-3, atol=1e-6)
        best, _ = st.dla_top.finalize()
        torch.testing.assert_close(best.double(), values.topk(4, dim=0).values, rtol=1e-4, atol=1e-5)
