"""Sparse autoencoders' latents (mining/sae.py): each format's encoder against its formula written out in NumPy,
`SITE.hook_sae_acts_post` against the SAE applied to SITE's own capture on several families, a Ray job's tables
against brute force, and a bad SAE refused in one line before anything is mined."""

import hashlib
import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from mining.errors import UserError
from mining.hooks import record, resolve_hooks
from mining.sae import load_sae, load_saes
from mining.spec import SAESpec, spec_from_dict
from mining.tiny import tiny_model
from sae_files import (reference, write_circuit_tracer, write_clt, write_gemmascope, write_saelens,
                       write_saelens_transcoder, write_sparsify)


# ---------------------------------------------------------------- the encoders


@pytest.mark.parametrize("kind", ["standard", "jumprelu", "topk", "gated"])
def test_saelens_encoders_follow_their_formulas(tmp_path, kind):
    k = 7 if kind == "topk" else None
    w = write_saelens(tmp_path / kind, 24, 96, kind, k=k)
    sae = load_sae("blocks.0.hook_resid_post", SAESpec(str(tmp_path / kind)))
    assert (sae.kind, sae.d_in, sae.d_sae, sae.k, sae.layout) == (kind, 24, 96, k, "saelens")
    x = torch.randn(3, 11, 24, generator=torch.Generator().manual_seed(5))
    got = sae.encode(x)
    assert got.shape == (3, 11, 96) and got.dtype == torch.float32
    want = reference(kind, w, x.numpy(), k)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    active = (got > 0).sum(-1)
    assert 0 < active.float().mean() < 96  # neither all off nor all on: the formula was exercised
    if kind == "topk":
        assert int(active.max()) <= 7
    assert sae.encode(x.to(torch.bfloat16)).dtype == torch.bfloat16  # the weights follow the activation's dtype


def test_an_older_saelens_top_k_sae_is_read_as_top_k(tmp_path):
    """SAELens before 6 saved top-k SAEs as architecture "standard" with activation_fn_str "topk"."""
    w = write_saelens(tmp_path, 24, 96, activation_fn_str="topk", activation_fn_kwargs={"k": 4})
    sae = load_sae("blocks.0.hook_resid_post", SAESpec(str(tmp_path)))
    assert (sae.kind, sae.k) == ("topk", 4)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(sae.encode(x).numpy(), reference("topk", w, x.numpy(), 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, encoder", [("transcoder", "standard"), ("skip_transcoder", "standard"),
                                           ("jumprelu_transcoder", "jumprelu")])
def test_saelens_transcoders_encode_their_input_uncentred_and_write_their_output_hook(tmp_path, kind, encoder):
    """SAELens' transcoders read hook_name and write hook_name_out (d_out wide): b_dec is the output's, so the input
    is not centred whatever apply_b_dec_to_input says; a skip transcoder's W_skip changes its output, not its
    latents."""
    w = write_saelens_transcoder(tmp_path, 24, 96, 40, "blocks.3.hook_mlp_out", kind)
    sae = load_sae("blocks.3.ln2.hook_normalized", SAESpec(str(tmp_path)))
    assert (sae.kind, sae.d_in, sae.d_sae, sae.d_out, sae.centre_input, sae.transcoder, sae.out_hook,
            sae.out_site) == (encoder, 24, 96, 40, False, True, "blocks.3.hook_mlp_out", "hook_mlp_out")
    x = torch.randn(3, 11, 24, generator=torch.Generator().manual_seed(5))
    got = sae.encode(x).numpy()
    np.testing.assert_allclose(got, reference(encoder, w, x.numpy(), centre=False), rtol=1e-5, atol=1e-5)
    assert 0 < (got > 0).mean() < 1
    assert sae.decoder().shape == (96, 40)


@pytest.mark.parametrize("named", [None, "blocks.4.hook_resid_post", "blocks.5.hook_resid_pre", "model.layers.4"])
def test_an_sae_keyed_by_the_hook_its_config_names_or_its_equal_loads(tmp_path, named):
    """A block's hook_resid_post is the next block's hook_resid_pre; a name outside TransformerLens' (a Hugging Face
    module's) is not compared. Another hook is refused (the bad-SAE cases below)."""
    write_saelens(tmp_path, 24, 96, **({"hook_name": named} if named else {}))
    assert load_sae("blocks.4.hook_resid_post", SAESpec(str(tmp_path))).d_sae == 96
    with pytest.raises(UserError, match="key it by that hook") if named and named.startswith("blocks") else \
            nullcontext():
        load_sae("blocks.4.hook_mlp_out", SAESpec(str(tmp_path)))


def test_a_gemma_scope_sae_is_read_from_its_params_npz(tmp_path):
    """Gemma Scope's own layout (params.npz, no config): a JumpReLU SAE whose input is not centred."""
    w = write_gemmascope(tmp_path, 24, 96)
    sae = load_sae("blocks.3.hook_resid_post", SAESpec(str(tmp_path)))
    assert (sae.kind, sae.d_in, sae.d_sae, sae.centre_input, sae.layout, sae.has_decoder) == \
        ("jumprelu", 24, 96, False, "gemmascope", True)
    x = torch.randn(3, 11, 24, generator=torch.Generator().manual_seed(5))
    got = sae.encode(x).numpy()
    np.testing.assert_allclose(got, reference("jumprelu", w, x.numpy(), centre=False), rtol=1e-5, atol=1e-5)
    assert 0 < (got > 0).mean() < 1
    np.testing.assert_array_equal(sae.decoder().numpy(), w["W_dec"].astype(np.float32))


@pytest.mark.parametrize("jumprelu, entries", [(None, "uris"), ("threshold", "dicts"),
                                               ("activation_function.threshold", "none")])
def test_a_circuit_tracer_transcoder_set_gives_each_layer_its_own_file(tmp_path, jumprelu, entries):
    """circuit-tracer's transcoder sets (config.yaml, layer_L.safetensors with W_enc (d_sae, d_in), bfloat16): the
    key's block picks its layer's file however the config lists them; the input is not centred, ReLU or JumpReLU
    (either name of the threshold), and the latents write feature_output_hook (mlp.hook_out: hook_mlp_out). W_skip
    adds to the reconstruction only."""
    w = write_circuit_tracer(tmp_path, {0: (24, 96, 24), 1: (24, 80, 24), 2: (24, 64, 24)}, jumprelu=jumprelu,
                             skip=True, entries=entries)
    x = torch.randn(3, 11, 24, generator=torch.Generator().manual_seed(5))
    for layer in (1, 2):
        sae = load_sae(f"blocks.{layer}.ln2.hook_normalized", SAESpec(str(tmp_path)))
        assert (sae.kind, sae.d_in, sae.d_sae, sae.centre_input, sae.layout, sae.transcoder, sae.out_hook,
                sae.d_out, sae.file) == ("jumprelu" if jumprelu else "standard", 24, w[layer]["W_enc"].shape[1],
                                         False, "circuit-tracer", True, f"blocks.{layer}.hook_mlp_out", 24,
                                         f"layer_{layer}.safetensors")
        got = sae.encode(x).numpy()
        want = reference("jumprelu" if jumprelu else "standard", w[layer], x.numpy(), centre=False)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < (got > 0).mean() < 1
        np.testing.assert_array_equal(sae.decoder().numpy(), w[layer]["W_dec"].astype(np.float32))


@pytest.mark.parametrize("jumprelu", [False, True])
def test_a_cross_layer_transcoders_layer_encodes_with_its_own_tensors(tmp_path, jumprelu):
    """A circuit-tracer cross-layer transcoder (config.yaml, W_enc_L/W_dec_L.safetensors): the key's layer's encoder
    (W_enc_L (d_sae, d_in), b_enc_L, threshold_L), not centred; its decoder (d_sae, n_layers - L, d_out) writes
    hook_mlp_out of its block and each after it."""
    w = write_clt(tmp_path, 4, 24, 64, 24, jumprelu=jumprelu)
    x = torch.randn(3, 11, 24, generator=torch.Generator().manual_seed(5))
    for layer in (1, 3):
        sae = load_sae(f"blocks.{layer}.hook_resid_mid", SAESpec(str(tmp_path)))
        assert (sae.kind, sae.d_in, sae.d_sae, sae.centre_input, sae.layout, sae.out_hook, sae.d_out, sae.n_out,
                sae.has_decoder, sae.weights.name) == ("jumprelu" if jumprelu else "standard", 24, 64, False,
                                                       "circuit-tracer", f"blocks.{layer}.hook_mlp_out", 24, 4 - layer,
                                                       True, f"W_enc_{layer}.safetensors")
        got = sae.encode(x).numpy()
        want = reference("jumprelu" if jumprelu else "standard", w[layer], x.numpy(), centre=False)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert 0 < (got > 0).mean() < 1
        np.testing.assert_array_equal(sae.decoder().numpy(), w[layer]["W_dec"].astype(np.float32))


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])
def test_a_cross_layer_latents_lens_sums_its_writes_into_each_block(tmp_path, family):
    """Layer 0's latents of a cross-layer transcoder writing a quarter of a direction into block 0's hook_mlp_out and
    three quarters into block 1's have the lens of a per-layer transcoder writing all of it into block 1's
    (hook_mlp_out joins the stream as it is; Granite's multiplier is on each block's write)."""
    from mining.analyses.logit_lens import logit_lens_table

    model = tiny_model(family).eval()
    d_model = model.config.hidden_size
    rows = torch.randn(48, d_model, generator=torch.Generator().manual_seed(3))
    write_clt(tmp_path / "clt", 2, d_model, 48, d_model, w_dec={0: torch.stack([rows * 0.25, rows * 0.75], 1)},
              dtype=torch.float32, layers=range(1))
    write_circuit_tracer(tmp_path / "set", {1: (d_model, 48, d_model)}, "hook_resid_mid", "hook_mlp_out", w_dec=rows,
                         dtype=torch.float32)
    saes = {"blocks.0.hook_resid_mid": load_sae("blocks.0.hook_resid_mid", SAESpec(str(tmp_path / "clt"))),
            "blocks.1.hook_resid_mid": load_sae("blocks.1.hook_resid_mid", SAESpec(str(tmp_path / "set")))}
    points = resolve_hooks(model, ["blocks.*.hook_resid_mid.hook_sae_acts_post"], saes=saes)
    lens = logit_lens_table(model, None, [], k=5, latents=points).to_pandas()
    key = ["neuron", "sign", "rank"]
    clt, single = (lens[lens.layer == layer].set_index(key).sort_index() for layer in (0, 1))
    assert len(clt) == len(single) == 48 * 2 * 5
    assert (clt.token_id == single.token_id).all()
    np.testing.assert_allclose(clt.weight, single.weight, rtol=1e-4, atol=1e-6)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hugging Face repo served from a folder: huggingface_hub.snapshot_download copies the files its
    allow_patterns match into a cache; (the repo's folder, the cache, the patterns each call asked for)."""
    import fnmatch

    import huggingface_hub

    repo, cache, asked = tmp_path / "repo", tmp_path / "cache", []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.append(allow_patterns)
        for f in repo.rglob("*"):
            name = f.relative_to(repo).as_posix()
            if f.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns)):
                (cache / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, cache / name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repo, cache, asked


def _fetched(cache: Path) -> list[str]:
    return sorted(f.relative_to(cache).as_posix() for f in cache.rglob("*") if f.is_file())


def test_a_cross_layer_transcoder_on_the_hub_fetches_one_layers_encoder_and_decoder(hub):
    repo, cache, asked = hub
    write_clt(repo, 3, 24, 32, 24)
    sae = load_sae("blocks.2.hook_resid_mid", SAESpec("someone/clt"))
    assert asked == [["config.yaml"], ["config.yaml", "W_enc_2.safetensors", "W_dec_2.safetensors"]]
    assert _fetched(cache) == ["W_dec_2.safetensors", "W_enc_2.safetensors", "config.yaml"]
    assert (sae.n_out, sae.d_sae) == (1, 32)


def test_a_circuit_tracer_set_on_the_hub_fetches_its_config_and_one_layers_file(hub):
    """A set's repo holds every layer's file (1.7 GB each for Qwen3-0.6B's): the key's layer's alone is fetched."""
    repo, cache, asked = hub
    write_circuit_tracer(repo / "relu", {0: (24, 32, 24), 1: (24, 32, 24), 2: (24, 32, 24)}, entries="uris")
    config = repo / "relu" / "config.yaml"  # its hf:// paths name the files in the repo's subfolder
    config.write_text(config.read_text().replace("transcoders/layer_", "transcoders/relu/layer_"))
    (repo / "relu" / "features").mkdir()  # circuit-tracer repos also hold the features' dashboards
    (repo / "relu" / "features" / "layer_1.bin").write_bytes(b"0" * 10)
    sae = load_sae("blocks.1.ln2.hook_normalized", SAESpec("someone/transcoders", subfolder="relu"))
    assert asked == [["relu/config.yaml"], ["relu/config.yaml", "relu/layer_1.safetensors"]]
    assert _fetched(cache) == ["relu/config.yaml", "relu/layer_1.safetensors"]
    assert (sae.folder, sae.file, sae.d_sae) == (cache / "relu", "layer_1.safetensors", 32)


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_encoder_keeps_the_k_largest(tmp_path, transcode):
    w = write_sparsify(tmp_path, 20, 80, k=5, transcode=transcode)
    sae = load_sae("blocks.0.mlp.hook_post", SAESpec(str(tmp_path)))
    assert (sae.kind, sae.d_in, sae.d_sae, sae.k, sae.layout, sae.centre_input) == \
        ("topk", 20, 80, 5, "sparsify", not transcode)
    x = torch.randn(4, 9, 20, generator=torch.Generator().manual_seed(6))
    got = sae.encode(x).numpy()
    np.testing.assert_allclose(got, reference("topk", w, x.numpy(), 5, centre=not transcode), rtol=1e-5, atol=1e-5)
    assert ((got > 0).sum(-1) == 5).all()


# ---------------------------------------------------------------- the hook


@pytest.mark.parametrize("family, site", [("llama", "hook_resid_post"), ("llama", "attn.hook_z"),
                                          ("gpt2", "mlp.hook_post"), ("phi3", "mlp.hook_pre"),
                                          ("bert", "hook_resid_mid"), ("mixtral", "hook_resid_pre"),
                                          ("llama", "ln2.hook_normalized"), ("gpt2", "ln1.hook_normalized")])
def test_latents_are_the_sae_of_their_base_hooks_capture(tmp_path, family, site):
    model = tiny_model(family).eval()
    base = resolve_hooks(model, [f"blocks.1.{site}"])[0]
    w = write_saelens(tmp_path, base.width, 3 * base.width, "jumprelu")
    saes = load_saes({base.name: SAESpec(str(tmp_path))})
    points = resolve_hooks(model, [f"blocks.*.{site}.hook_sae_acts_post", base.name], saes=saes)
    assert [(p.name, p.width, p.module_path) for p in points] == \
        [(base.name, base.width, base.module_path),
         (f"{base.name}.hook_sae_acts_post", 3 * base.width, base.module_path)]  # `*`: the layers with an SAE
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), record(model, points) as out:
        model(ids)
    latents = out[f"{base.name}.hook_sae_acts_post"]
    assert latents.shape == (2, 9, 3 * base.width)
    np.testing.assert_allclose(latents.numpy(), reference("jumprelu", w, out[base.name].numpy()), rtol=1e-4,
                               atol=1e-5)
    assert (latents > 0).any()


# ---------------------------------------------------------------- the logit lens of latents


def _sae_with_decoder(folder: Path, d_in: int, w_dec: torch.Tensor, transcode: bool = False) -> None:
    """A sparsify SAE whose decoder rows are given (its encoder is random: the lens reads the decoder alone)."""
    write_sparsify(folder, d_in, w_dec.shape[0], k=1, transcode=transcode)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "sae.safetensors"))
    save_file({**tensors, "W_dec": w_dec.contiguous()}, str(folder / "sae.safetensors"))


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])
def test_a_latent_whose_decoder_is_a_neurons_direction_has_that_neurons_lens(tmp_path, family):
    """An mlp.hook_post SAE whose decoder is the identity, residual-stream and hook_mlp_out SAEs whose decoder rows
    are layer 1's MLP output rows, and a transcoder writing those rows; SAELens transcoders writing mlp.hook_post
    (the identity, from hook_resid_mid) and hook_mlp_out (those rows, from hook_resid_pre): each latent's lens is
    the neuron's (tests/test_logit_lens.py checks the neurons' against brute force), but where a row is read after
    something the neuron's write passes: Gemma 2's MLP output norm (the SAEs writing hook_mlp_out or the stream),
    Granite's multiplier (resid_post). A transcoder's lens (SAELens', Gemma Scope's told what it writes, or a
    circuit-tracer set's) is that of an SAE on the hook it writes."""
    from mining.analyses.logit_lens import logit_lens_table
    from mining.hooks import mlp_out_weight

    model = tiny_model(family).eval()
    d_mlp = resolve_hooks(model, ["blocks.1.mlp.hook_post"])[0].width
    w_out = mlp_out_weight(model, 1).detach().float()
    d_model = w_out.shape[1]
    _sae_with_decoder(tmp_path / "identity", d_mlp, torch.eye(d_mlp))
    _sae_with_decoder(tmp_path / "stream", d_model, w_out)
    _sae_with_decoder(tmp_path / "transcoder", d_model, w_out, transcode=True)
    write_saelens_transcoder(tmp_path / "to-neurons", d_model, d_mlp, d_mlp, "blocks.1.mlp.hook_post",
                             w_dec=torch.eye(d_mlp))
    write_saelens_transcoder(tmp_path / "to-mlp-out", d_model, d_mlp, d_model, "blocks.1.hook_mlp_out", w_dec=w_out)
    write_gemmascope(tmp_path / "gemmascope-to-mlp-out", d_model, d_mlp, w_dec=w_out.numpy())
    write_circuit_tracer(tmp_path / "tracer-to-mlp-out", {1: (d_model, d_mlp, d_model)}, "hook_attn_out", w_dec=w_out,
                         dtype=torch.float32)
    saes = {"blocks.1.mlp.hook_post": load_sae("blocks.1.mlp.hook_post", SAESpec(str(tmp_path / "identity"))),
            "blocks.1.hook_resid_post": load_sae("blocks.1.hook_resid_post", SAESpec(str(tmp_path / "stream"))),
            "blocks.1.hook_mlp_out": load_sae("blocks.1.hook_mlp_out", SAESpec(str(tmp_path / "stream"))),
            "blocks.1.ln2.hook_normalized": load_sae("blocks.1.ln2.hook_normalized",  # what a transcoder reads
                                                     SAESpec(str(tmp_path / "transcoder"))),
            "blocks.1.hook_resid_mid": load_sae("blocks.1.hook_resid_mid", SAESpec(str(tmp_path / "to-neurons"))),
            "blocks.1.hook_resid_pre": load_sae("blocks.1.hook_resid_pre", SAESpec(str(tmp_path / "to-mlp-out"))),
            "blocks.1.ln1.hook_normalized": load_sae("blocks.1.ln1.hook_normalized", SAESpec(
                str(tmp_path / "gemmascope-to-mlp-out"), writes="blocks.1.hook_mlp_out")),
            "blocks.1.hook_attn_out": load_sae("blocks.1.hook_attn_out", SAESpec(str(tmp_path / "tracer-to-mlp-out")))}
    names = [f"{hook}.hook_sae_acts_post" for hook in saes]
    points = resolve_hooks(model, names, saes=saes)
    lens = logit_lens_table(model, None, [1], k=5, latents=points).to_pandas()
    key = ["layer", "neuron", "sign", "rank"]
    neurons = lens[lens.hook == "mlp.hook_post"].set_index(key)
    assert len(neurons) == d_mlp * 2 * 5
    for name in names:
        latents = lens[lens.hook == name.split(".", 2)[2]].set_index(key)
        assert len(latents) == len(neurons)
        same = (latents.token_id == neurons.token_id).all() and np.allclose(latents.weight, neurons.weight,
                                                                           rtol=1e-4, atol=1e-6)
        # the stream SAEs' latents read after Gemma 2's MLP output norm; after Granite's multiplier (resid_post)
        expected = {"hook_resid_post": family == "llama", "hook_mlp_out": family != "gemma2",
                    "hook_resid_pre": family != "gemma2",  # the SAELens transcoder writing hook_mlp_out
                    "ln1": family != "gemma2",  # the Gemma Scope one
                    "hook_attn_out": family != "gemma2"}  # the circuit-tracer one
        assert same == expected.get(name.split(".")[2], True), name


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])
def test_a_latent_of_heads_is_read_through_the_attentions_output_projection(tmp_path, family):
    """An attn.hook_z SAE whose decoder is the identity: latent j's lens is that of a hook_attn_out latent writing
    column j of the attention's output projection, through the attention's output norm where there is one (Gemma 2;
    hook_attn_out is read after it) and with Granite's block multiplier on both."""
    from mining.analyses.logit_lens import logit_lens_table
    from mining.hooks import norm_gain, out_norm, out_weight

    model = tiny_model(family).eval()
    z = resolve_hooks(model, ["blocks.1.attn.hook_z"])[0]
    w_o = out_weight(model, 1, "attn.hook_z").detach().float()  # (heads x d_head, d_model)
    norm = out_norm(model, 1, "attn")
    if norm is not None:
        w_o = w_o * norm_gain(model, norm)
    _sae_with_decoder(tmp_path / "z", z.width, torch.eye(z.width))
    _sae_with_decoder(tmp_path / "out", w_o.shape[1], w_o)
    saes = {z.name: load_sae(z.name, SAESpec(str(tmp_path / "z"))),
            "blocks.1.hook_attn_out": load_sae("blocks.1.hook_attn_out", SAESpec(str(tmp_path / "out")))}
    points = resolve_hooks(model, [f"{hook}.hook_sae_acts_post" for hook in saes], saes=saes)
    lens = logit_lens_table(model, None, [], k=5, latents=points).to_pandas()
    key = ["layer", "neuron", "sign", "rank"]
    heads = lens[lens.hook == "attn.hook_z.hook_sae_acts_post"].set_index(key)
    out = lens[lens.hook == "hook_attn_out.hook_sae_acts_post"].set_index(key)
    assert len(heads) == len(out) == z.width * 2 * 5
    assert (heads.token_id == out.token_id).all()
    np.testing.assert_allclose(heads.weight, out.weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("site", ["ln2.hook_normalized", "mlp.hook_pre"])
def test_latents_before_a_nonlinearity_or_a_norm_get_no_lens_rows(tmp_path, site, hostile_job):
    """Their decoders do not write the residual stream directly: a job whose only features they are is refused the
    logit lens in one line; beside an SAE that has one, only that SAE's latents get rows."""
    from mining.analyses.logit_lens import has_lens
    from mining.runner import validate

    model = tiny_model("llama").eval()
    base = resolve_hooks(model, [f"blocks.0.{site}"])[0]
    write_saelens(tmp_path / "no-lens", base.width, 8)
    write_saelens(tmp_path / "stream", 32, 8)
    saes = {base.name: load_sae(base.name, SAESpec(str(tmp_path / "no-lens"))),
            "blocks.0.hook_resid_post": load_sae("blocks.0.hook_resid_post", SAESpec(str(tmp_path / "stream")))}
    points = resolve_hooks(model, [f"{hook}.hook_sae_acts_post" for hook in saes], saes=saes)
    assert [has_lens(p) for p in points] == [p.name.startswith("blocks.0.hook_resid_post") for p in points]
    job = {"name": "lens", "model": str(hostile_job.parent / "model"), "corpus": {"source": "builtin:python-docs"},
           "hooks": [f"{base.name}.hook_sae_acts_post"], "saes": {base.name: str(tmp_path / "no-lens")},
           "stats": {"logit_lens": True}}
    with pytest.raises(UserError, match=r"stats.logit_lens: it reads blocks.\*.mlp.hook_post neurons \(or an SAE's "
                                        r"latents whose decoder writes the stream\)"):
        validate(spec_from_dict(job))
    job["hooks"].append("blocks.0.hook_resid_post.hook_sae_acts_post")
    job["saes"]["blocks.0.hook_resid_post"] = str(tmp_path / "stream")
    validate(spec_from_dict(job))


# ---------------------------------------------------------------- refusals, each one line before any mining


def _validate(job: dict):
    from mining.runner import validate

    validate(spec_from_dict(job))


@pytest.fixture(scope="module")
def saes(tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    write_saelens(root / "good", 32, 64, "jumprelu")
    write_saelens(root / "narrow", 16, 64)
    write_saelens(root / "matryoshka", 32, 64, "matryoshka_batchtopk")
    write_saelens(root / "normalized", 32, 64, normalize_activations="expected_average_only_in")
    write_saelens(root / "topk-without-k", 32, 64, "topk")
    write_saelens(root / "one-head", 32, 64, hook_head_index=2)
    write_sparsify(root / "groupmax", 32, 64, k=4)
    cfg = json.loads((root / "groupmax" / "cfg.json").read_text())
    (root / "groupmax" / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    write_saelens(root / "lying", 32, 64)
    cfg = json.loads((root / "lying" / "cfg.json").read_text())
    (root / "lying" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 128}))  # it disagrees with its weights
    (root / "empty").mkdir()
    write_gemmascope(root / "gemmascope-without-threshold", 32, 64)
    npz = root / "gemmascope-without-threshold" / "params.npz"
    params = dict(np.load(npz))
    np.savez(npz, **{k: v for k, v in params.items() if k != "threshold"})
    write_saelens(root / "trained-on-layer-0", 32, 64, hook_name="blocks.0.hook_resid_post")
    write_saelens(root / "saelens-6-on-layer-0", 32, 64, metadata={"hook_name": "blocks.0.hook_resid_post"})
    write_saelens(root / "saelens-6-one-head", 32, 64, metadata={"hook_name": "blocks.1.hook_resid_post",
                                                               "hook_head_index": 3})
    write_saelens_transcoder(root / "tc-another-block", 32, 64, 32, "blocks.0.hook_mlp_out")
    write_saelens_transcoder(root / "tc-hf-name", 32, 64, 32, "model.layers.1.mlp")
    write_saelens_transcoder(root / "tc-narrow", 32, 64, 16, "blocks.1.hook_mlp_out")
    write_saelens_transcoder(root / "tc-one-head", 32, 64, 32, "blocks.1.hook_attn_out", hook_head_index_out=2)
    write_saelens_transcoder(root / "tc-no-out", 32, 64, 32, "blocks.1.hook_mlp_out")
    cfg = json.loads((root / "tc-no-out" / "cfg.json").read_text())
    (root / "tc-no-out" / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hook_name_out"}))
    write_saelens(root / "encoder-only", 32, 64)
    write_circuit_tracer(root / "tracer", {0: (32, 64, 32), 1: (32, 64, 32)})
    write_circuit_tracer(root / "tracer-layer-0-only", {0: (32, 64, 32)})
    write_circuit_tracer(root / "tracer-narrow", {0: (16, 64, 32), 1: (16, 64, 32)})
    write_circuit_tracer(root / "tracer-other-kind", {0: (32, 64, 32)}, model_kind="crosscoder")
    write_clt(root / "clt-of-a-deeper-model", 4, 32, 64, 32)
    write_clt(root / "clt-layer-0-only", 2, 32, 64, 32, layers=range(1))
    write_clt(root / "clt-to-resid-post", 2, 32, 64, 32, writes="hook_resid_post")
    write_circuit_tracer(root / "tracer-npz", {0: (32, 64, 32)}, transcoders=["layer_0/params.npz"] * 2)
    write_circuit_tracer(root / "tracer-to-a-module", {1: (32, 64, 32)}, writes="mlp.down_proj")
    write_circuit_tracer(root / "tracer-not-a-mapping", {1: (32, 64, 32)})
    (root / "tracer-not-a-mapping" / "config.yaml").write_text("- just\n- a list\n")
    from safetensors.torch import load_file, save_file

    weights = str(root / "encoder-only" / "sae_weights.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if k != "W_dec"}, weights)
    return root


REFUSALS = {
    "latents-without-an-sae": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"]},
                               "no SAE reads blocks.1.hook_resid_post"),
    "every-layer-none-has-one": ({"hooks": ["blocks.*.hook_resid_pre.hook_sae_acts_post"],
                                  "saes": {"blocks.1.hook_resid_post": "good"}},
                                 "no SAE reads blocks.*.hook_resid_pre"),
    "another-width": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                       "saes": {"blocks.1.hook_resid_post": "narrow"}}, "the SAE reads 16 features"),
    "on-a-pattern": ({"hooks": ["blocks.1.attn.hook_pattern.hook_sae_acts_post"],
                      "saes": {"blocks.1.attn.hook_pattern": "good"}}, "not attn.hook_pattern"),
    "not-an-sae": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                    "saes": {"blocks.1.hook_resid_post": "empty"}}, "holds no SAE"),
    "no-folder": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                   "saes": {"blocks.1.hook_resid_post": {"source": "good", "subfolder": "layers.1"}}}, "no folder"),
    "unknown-architecture": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                              "saes": {"blocks.1.hook_resid_post": "matryoshka"}}, "'matryoshka_batchtopk' is not"),
    "normalized-input": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                          "saes": {"blocks.1.hook_resid_post": "normalized"}}, "normalize_activations"),
    "sparsify-groupmax": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                           "saes": {"blocks.1.hook_resid_post": "groupmax"}}, "activation 'groupmax' is not supported"),
    "one-head": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                  "saes": {"blocks.1.hook_resid_post": "one-head"}}, "hook_head_index=2 is not supported"),
    "topk-without-k": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                        "saes": {"blocks.1.hook_resid_post": "topk-without-k"}}, "needs k"),
    "config-disagrees": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                          "saes": {"blocks.1.hook_resid_post": "lying"}}, "its cfg.json implies (32, 128)"),
    "unread-sae": ({"hooks": ["blocks.1.hook_resid_post"], "saes": {"blocks.1.hook_resid_post": "good"}},
                   "no hook reads this SAE"),
    "dla-without-a-decoder": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                               "saes": {"blocks.1.hook_resid_post": "encoder-only"}, "stats": {"dla": True}},
                              "has no W_dec of 64 rows, and stats.dla reads each latent's decoder row"),
    "transcoder-writes-another-block": ({"hooks": ["blocks.1.ln2.hook_normalized.hook_sae_acts_post"],
                                         "saes": {"blocks.1.ln2.hook_normalized": "tc-another-block"}},
                                        "the transcoder writes blocks.0.hook_mlp_out; only a hook of the block it "
                                        "reads (blocks.1)"),
    "transcoder-writes-an-hf-module": ({"hooks": ["blocks.1.ln2.hook_normalized.hook_sae_acts_post"],
                                        "saes": {"blocks.1.ln2.hook_normalized": "tc-hf-name"}},
                                       "needs hook_name_out, the hook it writes, as blocks.L.SITE"),
    "transcoder-writes-another-width": ({"hooks": ["blocks.1.ln2.hook_normalized.hook_sae_acts_post"],
                                         "saes": {"blocks.1.ln2.hook_normalized": "tc-narrow"}},
                                        "the transcoder writes 16 features, blocks.1.hook_mlp_out has 32"),
    "transcoder-writes-one-head": ({"hooks": ["blocks.1.hook_resid_mid.hook_sae_acts_post"],
                                    "saes": {"blocks.1.hook_resid_mid": "tc-one-head"}},
                                   "hook_head_index_out=2 is not supported"),
    "transcoder-without-its-output": ({"hooks": ["blocks.1.ln2.hook_normalized.hook_sae_acts_post"],
                                       "saes": {"blocks.1.ln2.hook_normalized": "tc-no-out"}},
                                      "needs hook_name_out"),
    "keyed-by-another-hook": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                               "saes": {"blocks.1.hook_resid_post": "trained-on-layer-0"}},
                              "its cfg.json says it reads blocks.0.hook_resid_post (hook_name); key it by that hook"),
    "writes-of-a-saelens-sae": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                                 "saes": {"blocks.1.hook_resid_post": {"source": "good",
                                                                       "writes": "blocks.1.hook_mlp_out"}}},
                                "writes: only for an SAE in Gemma Scope's layout"),
    "gemma-scope-writes-nonsense": ({"hooks": ["blocks.1.ln2.hook_normalized.hook_sae_acts_post"],
                                     "saes": {"blocks.1.ln2.hook_normalized": {"source": "gemmascope-without-threshold",
                                                                               "writes": "mlp_out"}}},
                                    "writes: the hook it writes, as blocks.L.SITE"),
    "gemma-scope-without-threshold": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                                       "saes": {"blocks.1.hook_resid_post": "gemmascope-without-threshold"}},
                                      "params.npz has no tensor 'threshold'"),
    "keyed-by-another-hook-saelens-6": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                                         "saes": {"blocks.1.hook_resid_post": "saelens-6-on-layer-0"}},
                                        "its cfg.json says it reads blocks.0.hook_resid_post (hook_name)"),
    "one-head-saelens-6": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                            "saes": {"blocks.1.hook_resid_post": "saelens-6-one-head"}},
                           "hook_head_index=3 is not supported"),
    "hub-repo-offline": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                          "saes": {"blocks.1.hook_resid_post": "nobody/no-such-sae"}},
                         "cannot fetch 'nobody/no-such-sae'"),
    "wildcard-key": ({"saes": {"blocks.*.hook_resid_post": "good"}}, "expected the hook an SAE reads"),
    "tracer-keyed-by-another-hook": ({"hooks": ["blocks.1.hook_resid_post.hook_sae_acts_post"],
                                      "saes": {"blocks.1.hook_resid_post": "tracer"}},
                                     "its config.yaml says its transcoders read mlp.hook_in "
                                     "(blocks.1.ln2.hook_normalized); key it by that hook"),
    "tracer-without-the-layer": ({"hooks": ["blocks.1.ln2.hook_normalized.hook_sae_acts_post"],
                                  "saes": {"blocks.1.ln2.hook_normalized": "tracer-layer-0-only"}},
                                 "has no layer_1.safetensors (the transcoder of layer 1)"),
    "tracer-another-width": ({"hooks": ["blocks.1.ln2.hook_normalized.hook_sae_acts_post"],
                              "saes": {"blocks.1.ln2.hook_normalized": "tracer-narrow"}}, "the SAE reads 16 features"),
    "tracer-other-kind": ({"hooks": ["blocks.0.ln2.hook_normalized.hook_sae_acts_post"],
                           "saes": {"blocks.0.ln2.hook_normalized": "tracer-other-kind"}},
                          "model_kind 'crosscoder' is not supported"),
    "clt-of-a-deeper-model": ({"hooks": ["blocks.0.hook_resid_mid.hook_sae_acts_post"],
                               "saes": {"blocks.0.hook_resid_mid": "clt-of-a-deeper-model"}},
                              "the cross-layer transcoder writes hook_mlp_out of blocks 0..3, this model has "
                              "blocks 0..1"),
    "clt-writes-the-stream": ({"hooks": ["blocks.0.hook_resid_mid.hook_sae_acts_post"],
                               "saes": {"blocks.0.hook_resid_mid": "clt-to-resid-post"}},
                              "the cross-layer transcoder writes hook_resid_post; one writing hook_mlp_out or "
                              "hook_attn_out"),
    "clt-without-the-layer": ({"hooks": ["blocks.1.hook_resid_mid.hook_sae_acts_post"],
                               "saes": {"blocks.1.hook_resid_mid": "clt-layer-0-only"}},
                              "has no W_enc_1.safetensors (the cross-layer transcoder's encoder of layer 1)"),
    "tracer-npz-file": ({"hooks": ["blocks.1.ln2.hook_normalized.hook_sae_acts_post"],
                         "saes": {"blocks.1.ln2.hook_normalized": "tracer-npz"}},
                        "gives layer 1 the file 'layer_0/params.npz'; only circuit-tracer's safetensors files"),
    "tracer-writes-a-module": ({"hooks": ["blocks.1.ln2.hook_normalized.hook_sae_acts_post"],
                                "saes": {"blocks.1.ln2.hook_normalized": "tracer-to-a-module"}},
                               "the transcoder writes blocks.1.mlp.down_proj; only a hook of the block it reads "
                               "(blocks.1) that this model has"),
    "tracer-not-a-config": ({"hooks": ["blocks.1.ln2.hook_normalized.hook_sae_acts_post"],
                             "saes": {"blocks.1.ln2.hook_normalized": "tracer-not-a-mapping"}},
                            "is not a circuit-tracer config"),
    "writes-of-a-tracer-set": ({"hooks": ["blocks.1.ln2.hook_normalized.hook_sae_acts_post"],
                                "saes": {"blocks.1.ln2.hook_normalized": {"source": "tracer",
                                                                          "writes": "blocks.1.hook_mlp_out"}}},
                               "a circuit-tracer set's config.yaml too (feature_output_hook)"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_bad_sae_is_refused_in_one_line(case, saes, hostile_job, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra, needle = REFUSALS[case]

    def local(value):  # a folder name of the fixture's as its path; a hub id stays as it is
        if isinstance(value, dict):
            return {**value, "source": local(value["source"])}
        return str(saes / value) if (saes / value).is_dir() else value

    extra = {**extra, "saes": {hook: local(v) for hook, v in extra.get("saes", {}).items()}}
    job = {"name": "bad", "model": str(hostile_job.parent / "model"), "corpus": {"source": "builtin:python-docs"},
           **extra}
    with pytest.raises(UserError) as e:
        _validate(job)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------- a job on Ray, against brute force


@pytest.fixture(scope="module")
def mined(hostile_job, tmp_path_factory):
    """The tiny Llama over the hostile corpus: a SAELens JumpReLU SAE on layer 1's residual stream (also kept
    densely), a sparsify top-k SAE on layer 0's MLP neurons beside those neurons, and a standard SAE on layer 0's
    MLP output, a sparsify transcoder on layer 1's MLP input, a SAELens JumpReLU transcoder reading layer 0's
    MLP input and writing its hook_mlp_out, a Gemma Scope SAE (params.npz) on layer 0's residual stream, and a
    circuit-tracer set's JumpReLU skip transcoder reading layer 1's hook_resid_mid and writing its MLP's output, and
    layer 0's part of a circuit-tracer cross-layer transcoder reading layer 0's and writing both MLPs' outputs."""
    from mining.cli import main

    root = tmp_path_factory.mktemp("sae-job")
    weights = {"resid": write_saelens(root / "resid", 32, 96, "jumprelu"),
               "mlp": write_sparsify(root / "sparsify" / "layers.0.mlp", 64, 128, k=6),
               "mlp_out": write_saelens(root / "mlp-out", 32, 64, seed=3),
               "transcoder": write_sparsify(root / "transcoder", 32, 64, k=4, transcode=True),
               "saelens_transcoder": write_saelens_transcoder(root / "saelens-transcoder", 32, 48, 32,
                                                              "blocks.0.hook_mlp_out", "jumprelu_transcoder"),
               "gemmascope": write_gemmascope(root / "gemmascope", 32, 64),
               "tracer": write_circuit_tracer(root / "tracer", {0: (32, 40, 32), 1: (32, 56, 32)}, "hook_resid_mid",
                                              jumprelu="activation_function.threshold", skip=True)[1],
               "clt": write_clt(root / "clt", 2, 32, 40, 32, layers=range(1))[0]}
    weights["clt"]["W_dec"] = weights["clt"]["W_dec"].sum(1)  # its whole write into the stream: both blocks'
    job = root / "job.yaml"
    job.write_text(f"""
name: sae
model: {{id: "{hostile_job.parent / 'model'}"}}
corpus: {{source: "files:{hostile_job.parent / 'docs'}/*.txt", context_length: 64, max_tokens: 900}}
hooks: ["blocks.*.hook_resid_post.hook_sae_acts_post", "blocks.0.mlp.hook_post.hook_sae_acts_post",
        "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out.hook_sae_acts_post",
        "blocks.*.ln2.hook_normalized.hook_sae_acts_post", "blocks.*.hook_resid_mid.hook_sae_acts_post"]
saes:
  blocks.1.hook_resid_post: {root / 'resid'}
  blocks.0.hook_mlp_out: {root / 'mlp-out'}
  blocks.1.ln2.hook_normalized: {root / 'transcoder'}
  blocks.0.ln2.hook_normalized: {root / 'saelens-transcoder'}
  blocks.0.hook_resid_post: {root / 'gemmascope'}
  blocks.1.hook_resid_mid: {root / 'tracer'}
  blocks.0.hook_resid_mid: {root / 'clt'}
  blocks.0.mlp.hook_post: {{source: {root / 'sparsify'}, subfolder: layers.0.mlp}}
stats: {{top_k: 6, quantile_samples: 2, dla: true, logit_lens: true, logit_lens_k: 4}}
dense: {{hooks: ["blocks.1.hook_resid_post.hook_sae_acts_post"], token_fraction: 0.25}}
compute: {{actors: 2, cpus_per_actor: 1, batch_size: 4, shard_tokens: 400}}
""")
    assert main(["run", str(job), "--store", str(root / "store"), "--no-progress"]) == 0
    return root / "store", weights


@pytest.fixture(scope="module")
def brute(mined, hostile_job):
    """Every mined token's latents, from each context's own forward pass and the formulas above; under "dla", the
    direct logit attribution of the latents whose decoder writes the stream: a · (W_dec[i] · γ ⊙ W_U[:, next]) / s,
    s the final RMSNorm's scale (NaN where a token has no next token)."""
    from mining.models import load_model
    from mining.runner import plan
    from mining.shards import special_tokens
    from mining.spec import ModelSpec, load_spec

    store, weights = mined
    loaded = load_model(ModelSpec(id=str(hostile_job.parent / "model")))
    prefix = list(special_tokens(loaded.tokenizer, "auto", None).prefix)
    tokens = ds.dataset(store / "tokens").to_table().sort_by("tok").to_pandas()
    model = loaded.model
    last = f"blocks.{model.config.num_hidden_layers - 1}.hook_resid_post"  # the final norm's input
    named = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out",
             "blocks.1.ln2.hook_normalized", "blocks.0.ln2.hook_normalized", "blocks.0.hook_resid_post",
             "blocks.1.hook_resid_mid", "blocks.0.hook_resid_mid", last]
    hooks = list(dict.fromkeys(named))  # the last block's output may be one of them
    acts: dict[str, list] = {hook: [] for hook in hooks}
    with torch.inference_mode(), record(model, hooks) as out:
        for _, group in tokens.groupby("ctx", sort=True):
            model(torch.tensor([prefix + group.token_id.tolist()]))
            for hook in hooks:
                acts[hook].append(out[hook][0, len(prefix):].numpy())
    resid, mlp, mlp_out, mlp_in, mlp_in0, resid0, mid1, mid0, final = (
        np.concatenate(acts[hook]).astype(np.float64) for hook in named)
    nxt = np.full(len(tokens), -1)  # each mined token's next token in its document
    for shard in plan(load_spec(store / "job.yaml"), loaded.tokenizer)[0]:
        grid = shard.tok_grid()
        for c in range(len(shard.ids)):
            pos = np.nonzero(grid[c] >= 0)[0]
            nxt[grid[c, pos]] = np.append(shard.ids[c, pos[1:]], shard.next_id[c])  # the last: the next context's first
    norm = model.model.norm
    scale = np.sqrt((final ** 2).mean(-1) + norm.variance_epsilon)
    d = (model.lm_head.weight.detach().double().numpy()[np.maximum(nxt, 0)] * norm.weight.detach().double().numpy())
    latents = {"resid": reference("jumprelu", weights["resid"], resid),
               "transcoder": reference("topk", weights["transcoder"], mlp_in, 4, centre=False),
               "saelens_transcoder": reference("jumprelu", weights["saelens_transcoder"], mlp_in0, centre=False),
               "gemmascope": reference("jumprelu", weights["gemmascope"], resid0, centre=False),
               "tracer": reference("jumprelu", weights["tracer"], mid1, centre=False),
               "clt": reference("standard", weights["clt"], mid0, centre=False)}
    dla = {name: np.where(nxt[:, None] >= 0, a * (d @ weights[name]["W_dec"].T) / scale[:, None], np.nan)
           for name, a in latents.items()}
    return {("hook_resid_post.hook_sae_acts_post", 1): latents["resid"],
            ("mlp.hook_post.hook_sae_acts_post", 0): reference("topk", weights["mlp"], mlp, 6),
            ("hook_mlp_out.hook_sae_acts_post", 0): reference("standard", weights["mlp_out"], mlp_out),
            ("ln2.hook_normalized.hook_sae_acts_post", 1): latents["transcoder"],
            ("ln2.hook_normalized.hook_sae_acts_post", 0): latents["saelens_transcoder"],
            ("hook_resid_post.hook_sae_acts_post", 0): latents["gemmascope"],
            ("hook_resid_mid.hook_sae_acts_post", 1): latents["tracer"],
            ("hook_resid_mid.hook_sae_acts_post", 0): latents["clt"],
            "dla": {("hook_resid_mid.hook_sae_acts_post", 1): dla["tracer"],
                    ("hook_resid_mid.hook_sae_acts_post", 0): dla["clt"],
                    ("hook_resid_post.hook_sae_acts_post", 1): dla["resid"],
                    ("ln2.hook_normalized.hook_sae_acts_post", 1): dla["transcoder"],
                    ("ln2.hook_normalized.hook_sae_acts_post", 0): dla["saelens_transcoder"],
                    ("hook_resid_post.hook_sae_acts_post", 0): dla["gemmascope"]}}


@pytest.mark.ray
def test_latents_tables_match_brute_force(mined, brute):
    store, _ = mined
    neurons = pq.read_table(store / "neurons.parquet").to_pandas()
    top = pq.read_table(store / "top_examples.parquet").to_pandas()
    assert sorted(set(zip(neurons.hook, neurons.layer))) == [
        ("hook_mlp_out.hook_sae_acts_post", 0), ("hook_resid_mid.hook_sae_acts_post", 0),
        ("hook_resid_mid.hook_sae_acts_post", 1), ("hook_resid_post.hook_sae_acts_post", 0),
        ("hook_resid_post.hook_sae_acts_post", 1), ("ln2.hook_normalized.hook_sae_acts_post", 0),
        ("ln2.hook_normalized.hook_sae_acts_post", 1),
        ("mlp.hook_post", 0), ("mlp.hook_post.hook_sae_acts_post", 0)]
    for (hook, layer), acts in ((key, v) for key, v in brute.items() if key != "dla"):
        assert acts.shape[0] == 900
        rows = neurons[(neurons.hook == hook) & (neurons.layer == layer)].sort_values("neuron")
        assert len(rows) == acts.shape[1]
        np.testing.assert_allclose(rows["max"], acts.max(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rows["mean"], acts.mean(0), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(rows["frac_active"], (acts > 0).mean(0), atol=1.5 / 900)
        for latent in (0, int(acts.max(0).argmax()), acts.shape[1] - 1):
            col = acts[:, latent]
            got = top[(top.hook == hook) & (top.layer == layer) & (top.neuron == latent)].sort_values("rank")
            np.testing.assert_allclose(got.value, np.sort(col)[::-1][:len(got)], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(col[got.tok.to_numpy()], got.value, rtol=1e-4, atol=1e-5)
    topk = neurons[neurons.hook == "mlp.hook_post.hook_sae_acts_post"]
    assert topk.frac_active.sum() == pytest.approx(6, abs=0.01)  # top-k: 6 latents of 128 on every token


@pytest.mark.ray
def test_latents_dla_matches_brute_force(mined, brute, tmp_path):
    """stats.dla on latents whose decoder writes the stream (a residual-stream SAE, a transcoder): per latent, the
    mean, count and extremes of a · (w · d_t) / s, and its top examples; the other SAEs' latents have no rows."""
    from mining.query import connect, run_named

    store, _ = mined
    dla = pq.read_table(store / "dla_neurons.parquet").to_pandas()
    examples = pq.read_table(store / "dla_examples.parquet").to_pandas()
    assert sorted(set(zip(dla.hook, dla.layer))) == [("hook_mlp_out.hook_sae_acts_post", 0),
                                                     ("hook_resid_mid.hook_sae_acts_post", 0),
                                                     ("hook_resid_mid.hook_sae_acts_post", 1),
                                                     ("hook_resid_post.hook_sae_acts_post", 0),
                                                     ("hook_resid_post.hook_sae_acts_post", 1),
                                                     ("ln2.hook_normalized.hook_sae_acts_post", 0),
                                                     ("ln2.hook_normalized.hook_sae_acts_post", 1),
                                                     ("mlp.hook_post", 0), ("mlp.hook_post.hook_sae_acts_post", 0)]
    for (hook, layer), want in brute["dla"].items():
        rows = dla[(dla.hook == hook) & (dla.layer == layer)].sort_values("neuron")
        assert len(rows) == want.shape[1] and (rows["count"] == (~np.isnan(want)).sum(0)).all()
        scale = np.nanmax(np.abs(want))
        np.testing.assert_allclose(rows.mean_dla, np.nanmean(want, 0), rtol=1e-3, atol=1e-5 * scale)
        np.testing.assert_allclose(rows.max_dla, np.nanmax(want, 0), rtol=1e-3, atol=1e-5 * scale)
        latent = int(np.nanargmax(np.nanmax(want, 0)))
        got = examples[(examples.hook == hook) & (examples.layer == layer) & (examples.neuron == latent)
                       & (examples.sign == "positive")]
        np.testing.assert_allclose(got.sort_values("rank").dla, np.sort(want[~np.isnan(want[:, latent]), latent])
                                   [::-1][:len(got)], rtol=1e-3, atol=1e-5 * scale)
    con = connect(store)
    best = run_named(con, "dla-neurons", {"hook": "hook_resid_post.hook_sae_acts_post", "layer": "1",
                                          "limit": "1"}).to_pylist()[0]
    assert best["neuron"] == int(np.nanargmax(np.nanmean(brute["dla"][("hook_resid_post.hook_sae_acts_post", 1)], 0)))
    assert run_named(con, "dla-examples", {"hook": "hook_resid_post.hook_sae_acts_post", "layer": "1",
                                           "neuron": str(best["neuron"]), "k": "3"}).num_rows == 3
    neurons = run_named(con, "dla-neurons", {"limit": "500"}).to_pylist()
    assert {r["layer"] for r in neurons} == {0} and len(neurons) == 64  # the default hook: layer 0's neurons
    examples = run_named(con, "dla-examples", {"layer": "0", "neuron": "3"}).to_pylist()
    con.close()
    older = tmp_path / "older"  # a store mined before latents had DLA rows: its tables have no hook column
    shutil.copytree(store, older)
    for name in ("dla_neurons", "dla_examples"):
        table = pq.read_table(older / f"{name}.parquet")
        table = table.filter(pc.equal(table["hook"], "mlp.hook_post")).drop_columns(["hook"])
        pq.write_table(table, older / f"{name}.parquet")
    con = connect(older)
    assert run_named(con, "dla-neurons", {"limit": "500"}).to_pylist() == neurons
    assert run_named(con, "dla-examples", {"layer": "0", "neuron": "3"}).to_pylist() == examples
    con.close()


@pytest.mark.ray
def test_dense_latents_and_provenance(mined, brute):
    from mining.dense import read_dense

    store, _ = mined
    toks, values = read_dense(store, "blocks.1.hook_resid_post.hook_sae_acts_post")
    assert 100 < len(toks) < 400 and values.shape[1] == 96
    np.testing.assert_allclose(values.astype(np.float32), brute[("hook_resid_post.hook_sae_acts_post", 1)][toks],
                               rtol=2e-3, atol=2e-3)
    recorded = json.loads((store / "provenance.json").read_text())["saes"]
    assert {h: (r["format"], r["kind"], r["d_sae"], r["k"]) for h, r in recorded.items()} == {
        "blocks.1.hook_resid_post": ("saelens", "jumprelu", 96, None),
        "blocks.0.mlp.hook_post": ("sparsify", "topk", 128, 6),
        "blocks.0.hook_mlp_out": ("saelens", "standard", 64, None),
        "blocks.1.ln2.hook_normalized": ("sparsify", "topk", 64, 4),
        "blocks.0.ln2.hook_normalized": ("saelens", "jumprelu", 48, None),
        "blocks.0.hook_resid_post": ("gemmascope", "jumprelu", 64, None),
        "blocks.1.hook_resid_mid": ("circuit-tracer", "jumprelu", 56, None),
        "blocks.0.hook_resid_mid": ("circuit-tracer", "standard", 40, None)}
    assert {h: (r["transcoder"], r["hook_name_out"]) for h, r in recorded.items() if r["transcoder"]} == {
        "blocks.1.ln2.hook_normalized": (True, None), "blocks.0.ln2.hook_normalized": (True, "blocks.0.hook_mlp_out"),
        "blocks.1.hook_resid_mid": (True, "blocks.1.hook_mlp_out"),
        "blocks.0.hook_resid_mid": (True, "blocks.0.hook_mlp_out")}
    assert all(len(r["weights_sha256"]) == 64 for r in recorded.values())
    tracer = recorded["blocks.1.hook_resid_mid"]  # one file a layer: layer 1's is the one read and hashed
    assert tracer["weights"] == str(Path(tracer["folder"]) / "layer_1.safetensors")
    assert tracer["weights_sha256"] == hashlib.sha256(Path(tracer["weights"]).read_bytes()).hexdigest()


@pytest.mark.ray
def test_latents_logit_lens_rows_and_query(mined):
    from mining.query import connect, run_named

    store, _ = mined
    lens = pq.read_table(store / "logit_lens.parquet").to_pandas()
    counts = lens.groupby(["hook", "layer"]).size().to_dict()
    assert counts == {("hook_resid_post.hook_sae_acts_post", 1): 96 * 2 * 4,
                      ("hook_mlp_out.hook_sae_acts_post", 0): 64 * 2 * 4,
                      ("ln2.hook_normalized.hook_sae_acts_post", 1): 64 * 2 * 4,  # a transcoder writes the stream
                      ("ln2.hook_normalized.hook_sae_acts_post", 0): 48 * 2 * 4,
                      ("hook_resid_post.hook_sae_acts_post", 0): 64 * 2 * 4,
                      ("hook_resid_mid.hook_sae_acts_post", 1): 56 * 2 * 4,  # circuit-tracer's transcoders
                      ("hook_resid_mid.hook_sae_acts_post", 0): 40 * 2 * 4,
                      ("mlp.hook_post", 0): 64 * 2 * 4, ("mlp.hook_post.hook_sae_acts_post", 0): 128 * 2 * 4}
    con = connect(store)
    rows = run_named(con, "logit-lens", {"hook": "hook_resid_post.hook_sae_acts_post", "layer": "1", "neuron": "7",
                                         "sign": "both"}).to_pylist()
    assert [(r["sign"], r["rank"]) for r in rows] == [("boost", i) for i in (1, 2, 3, 4)] + \
        [("suppress", i) for i in (1, 2, 3, 4)]
    assert run_named(con, "logit-lens", {"layer": "0", "neuron": "7"}).num_rows == 4  # hook defaults to neurons
    con.close()


@pytest.mark.ray
@pytest.mark.parametrize("hook", ["hook_resid_post.hook_sae_acts_post", "ln2.hook_normalized.hook_sae_acts_post"])
def test_export_replays_a_latents_activations(mined, brute, tmp_path, hook):
    from mining.cli import main

    store, _ = mined
    acts = brute[(hook, 1)]
    latent = int(acts.max(0).argmax())
    out = tmp_path / "examples.jsonl"
    assert main(["export", str(store), "--hook", hook, "--neuron", f"1:{latent}", "--k", "3", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    top = [r for r in records if r["set"] == "top"]
    assert len(top) == 3 and top[0]["value"] == pytest.approx(acts[:, latent].max(), rel=1e-4)
    for r in records:  # the replayed context's activation at its peak is the mined value
        assert r["activations"][r["peak_index"]] == pytest.approx(r["value"], rel=1e-3, abs=1e-4)
    site = tmp_path / "neuronpedia"
    assert main(["export", str(store), "--hook", hook, "--neuron", f"1:{latent}", "--k", "2", "--format",
                 "neuronpedia", "--model-id", "tiny", "--out", str(site)]) == 0
    source = json.loads((site / "tiny" / "1-mine" / "source.jsonl").read_text())
    assert source["hookName"] == "blocks.1." + hook.removesuffix(".hook_sae_acts_post")  # the SAE's, as Neuronpedia's


@pytest.mark.ray
def test_the_viewer_names_a_latent_and_shows_its_lens(mined, tmp_path):
    from mining.cli import main

    store, _ = mined
    site = tmp_path / "site"
    assert main(["export", str(store), "--hook", "hook_resid_post.hook_sae_acts_post", "--top", "2", "--by", "max",
                 "--format", "html", "--out", str(site)]) == 0
    pages = sorted((site / "neurons").glob("hook_resid_post.hook_sae_acts_post-1-*.html"))
    assert len(pages) == 2
    html = pages[0].read_text()
    latent = pages[0].stem.rsplit("-", 1)[1]
    assert f"hook_resid_post.hook_sae_acts_post · layer 1 · latent {latent}</h1>" in html
    assert 'id="logit-lens"' in html  # the latent's decoder direction through the unembedding
