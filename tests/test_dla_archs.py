"""Direct logit attribution on each decoder family's own norms: Gemma's RMSNorm scales by (1 + weight), and Gemma 2/3
and OLMo 2 pass the attention's and the MLP's outputs through norms of their own before the residual stream. On tiny
random models (norm weights drawn at random, so a gain left out shows), each layer's neurons add up to what its MLP
adds to the residual stream, read through the final norm, its heads (as a diff job attributes them) to what its
attention adds, and with the embeddings they add up to the logit. LayerNorm families (OLMo 1's without weights,
Cohere's without biases) likewise; Cohere's and Granite's factors on the logits and Granite's on the blocks'
outputs are taken."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from config_factors import logit_factor

from mining.diff import _feature_rows, _head_dla
from mining.dla import DirectLogitAttribution, DlaBatch, GainProduct
from mining.hooks import capture, final_norm, resolve_hooks, unembedding
from mining.tiny import ARCHS as TINY_ARCHS
from mining.tiny import tiny_model

ARCHS = ["llama", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo2", "phi3", "granite", "olmo3", "exaone4",
         "vaultgemma", "glm", "glm4", "ministral", "seed_oss", "ernie4_5", "helium", "hunyuan_v1_dense", "arcee",
         "apertus"]
B, T, VOCAB = 3, 12, 300


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
        reads_stream = (getattr(blk, "feedforward_layernorm", None) or  # Apertus' names
                        (blk.mlp if not hasattr(blk, "input_layernorm") else
                         getattr(blk, "pre_feedforward_layernorm", None) or blk.post_attention_layernorm))
        handles.append(reads_stream.register_forward_pre_hook(
            lambda m, a, layer=layer: out.__setitem__(f"mid{layer}", a[0].clone())))
    handles.append(final_norm(model).register_forward_pre_hook(lambda m, a: out.__setitem__("final", a[0].clone())))
    try:
        out["logits"] = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return out


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
    gamma = norm.weight.float() + (1.0 if "gemma" in arch else 0.0)
    d = unembedding(model)[:, targets].T.float() * gamma * logit_factor(model.config)  # Granite's logits are scaled
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
    logits = (norm(flat(ref["final"])) @ unembedding(model)).gather(1, targets[:, None])[:, 0]
    logits = logits * logit_factor(model.config)
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


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "gpt_neox", "gptj", "phi", "gpt_bigcode", "starcoder2",
                                  "stablelm", "olmo", "opt", "bloom", "cohere", "cohere2", "nemotron", "falcon",
                                  "falcon-40b", "mpt", "codegen", "persimmon", "xglm"])
@torch.inference_mode()
def test_layernorm_families_neurons_add_up_to_their_mlps_output(arch):
    """The LayerNorm path (d_t centred over d_model, s the standard deviation): each layer's neurons plus its output
    projection's bias, read through the final norm, add up to what the MLP module outputs; the final stream so read,
    plus the norm's and the LM head's biases, is the model's logit. OLMo 1's LayerNorms have no weight (a gain of
    1), no bias and no eps attribute (its forward uses 1e-5); Cohere's centre without a bias, and its logits are
    scaled. Falcon-40B's block normalizes the stream twice, once for attention and once for the MLP."""
    if arch == "falcon-40b":
        model = tiny_model("falcon", vocab_size=VOCAB, seed=4, new_decoder_architecture=True, num_kv_heads=2)
        assert hasattr(model.transformer.h[0], "ln_mlp")
    else:
        model = tiny_model(arch, vocab_size=VOCAB, seed=4)
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    dla = DirectLogitAttribution(model)
    batch = DlaBatch(dla, _batch(ids), defer=False)
    points = resolve_hooks(model, "blocks.*.mlp.hook_post")
    outs, handles = {}, []
    for point in points:
        # the MLP module's output, or its output projection's where the module adds more (OPT and XGLM have none,
        # BLOOM's and MPT's add the residual)
        path = point.module_path if arch in ("opt", "bloom", "mpt", "xglm") else point.module_path.rsplit(".", 1)[0]
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
    gamma = gamma + 1 if arch == "nemotron" else gamma  # its LayerNorm1P scales by 1 + weight
    d = w_u[:, targets].T * gamma * logit_factor(model.config)  # (M, d_model); Cohere's logits are scaled
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


def _lossless_sae(folder, d_in: int) -> None:
    """A standard SAE that reconstructs its input exactly: latents relu(x) and relu(-x), decoder rows +I and -I."""
    from safetensors.torch import save_file
    from sae_files import write_saelens

    write_saelens(folder, d_in, 2 * d_in)
    eye = torch.eye(d_in)
    save_file({"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d_in), "b_dec": torch.zeros(d_in),
               "W_dec": torch.cat([eye, -eye], 0)}, str(folder / "sae_weights.safetensors"))


@pytest.mark.parametrize("arch", ARCHS)
@torch.inference_mode()
def test_latents_of_a_lossless_sae_add_up_to_what_their_site_writes(arch, tmp_path):
    """SAEs that reconstruct their sites exactly: the DLA of their latents (stats.dla) adds up, token by token, to
    what the site adds to the residual stream read through the final norm: the MLP's write for mlp.hook_post and
    hook_mlp_out SAEs (through its output projection, output norm and Granite's multiplier), the attention's for
    attn.hook_z and hook_attn_out SAEs, the whole stream for a hook_resid_post SAE."""
    from mining.analyses.logit_lens import latent_writes
    from mining.sae import load_saes
    from mining.spec import SAESpec

    model = tiny_model(arch, vocab_size=VOCAB, seed=4)
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    ref = _residuals(model, ids)
    layer = 1
    sites = ["mlp.hook_post", "hook_mlp_out", "attn.hook_z", "hook_attn_out", "hook_resid_post"]
    specs = {}
    for base in resolve_hooks(model, [f"blocks.{layer}.{s}" for s in sites]):
        _lossless_sae(tmp_path / base.site, base.width)
        specs[base.name] = SAESpec(str(tmp_path / base.site))
    saes = load_saes(specs)
    points = resolve_hooks(model, [f"{hook}.hook_sae_acts_post" for hook in saes], saes=saes)
    dla = DirectLogitAttribution(model)
    batch = DlaBatch(dla, _batch(ids))
    writes = {p.name: latent_writes(model, p) for p in points}
    with capture(model, points, lambda p, x: batch.latent_gain(p, x, *writes[p.name])), batch.watch_norm():
        model(input_ids=ids)
    got = {name.split(".", 2)[2].removesuffix(".hook_sae_acts_post"): v for name, v in batch.finish()}

    sel = torch.from_numpy(batch.sel_np)
    targets = torch.from_numpy(_batch(ids).targets_np.reshape(-1)[batch.sel_np])
    norm = final_norm(model)
    gamma = norm.weight.float() + (1.0 if "gemma" in arch else 0.0)
    d = unembedding(model)[:, targets].T.float() * gamma * logit_factor(model.config)
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    flat = lambda t: t.reshape(-1, t.shape[-1])[sel]  # noqa: E731
    s = torch.sqrt(flat(ref["final"]).pow(2).mean(-1) + eps)
    read = lambda v: (flat(v) * d).sum(-1) / s  # noqa: E731
    mlp_write = read(ref[f"post{layer}"] - ref[f"mid{layer}"])
    attn_write = read(ref[f"mid{layer}"] - ref[f"pre{layer}"])
    want = {"mlp.hook_post": mlp_write, "hook_mlp_out": mlp_write, "attn.hook_z": attn_write,
            "hook_attn_out": attn_write, "hook_resid_post": read(ref[f"post{layer}"])}
    assert set(got) == set(want)
    for site, values in got.items():
        assert values.shape == (len(sel), 2 * resolve_hooks(model, [f"blocks.{layer}.{site}"])[0].width)
        assert want[site].abs().max() > 1e-2
        torch.testing.assert_close(values.sum(1), want[site], rtol=1e-4, atol=1e-4, msg=site)
