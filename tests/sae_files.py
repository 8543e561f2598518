"""Random SAEs written in SAELens', sparsify's, Gemma Scope's and circuit-tracer's on-disk layouts, and their
encoders' formulas in NumPy (for test_sae.py and the bad-input matrix)."""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def write_saelens(folder: Path, d_in: int, d_sae: int, kind: str = "standard", k: int | None = None, seed: int = 0,
                  **cfg) -> dict[str, np.ndarray]:
    """A random SAE in SAELens' layout (cfg.json, sae_weights.safetensors); its tensors as NumPy."""
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5, "W_dec": torch.randn(d_sae, d_in, generator=g),
         "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if kind == "gated":
        t.update(b_gate=torch.randn(d_sae, generator=g) * 0.1, r_mag=torch.randn(d_sae, generator=g) * 0.1,
                 b_mag=torch.randn(d_sae, generator=g) * 0.1)
    else:
        t["b_enc"] = torch.randn(d_sae, generator=g) * 0.1
    if kind == "jumprelu":
        t["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, "architecture": kind,
                                                 "apply_b_dec_to_input": True, "normalize_activations": "none",
                                                 **({"k": k} if k else {}), **cfg}))
    return {name: v.numpy().astype(np.float64) for name, v in t.items()}


def write_saelens_transcoder(folder: Path, d_in: int, d_sae: int, d_out: int, hook_name_out: str,
                             kind: str = "transcoder", seed: int = 2, w_dec: torch.Tensor | None = None,
                             **cfg) -> dict[str, np.ndarray]:
    """A random SAELens transcoder (transcoder, skip_transcoder or jumprelu_transcoder) writing hook_name_out; w_dec:
    its decoder rows (d_sae, d_out), random if not given."""
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
         "W_dec": torch.randn(d_sae, d_out, generator=g) if w_dec is None else w_dec.float().contiguous(),
         "b_dec": torch.randn(d_out, generator=g) * 0.1}
    if kind == "jumprelu_transcoder":
        t["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    if kind == "skip_transcoder":
        t["W_skip"] = torch.randn(d_out, d_in, generator=g) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "sae_weights.safetensors"))
    layer = int(hook_name_out.split(".")[1]) if hook_name_out.startswith("blocks.") else 0
    (folder / "cfg.json").write_text(json.dumps({  # SAELens' TranscoderConfig keeps apply_b_dec_to_input's default
        "architecture": kind, "d_in": d_in, "d_sae": d_sae, "d_out": d_out, "hook_name_out": hook_name_out,
        "hook_layer_out": layer, "hook_head_index_out": None, "apply_b_dec_to_input": True,
        "normalize_activations": "none", **cfg}))
    return {name: v.numpy().astype(np.float64) for name, v in t.items()}


def write_gemmascope(folder: Path, d_in: int, d_sae: int, seed: int = 7,
                     w_dec: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A random JumpReLU SAE in Gemma Scope's own layout: params.npz (W_enc, W_dec, b_enc, b_dec, threshold), no
    config; w_dec: its decoder rows (d_sae, d_out), a transcoder's."""
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((d_sae, d_in)) if w_dec is None else w_dec
    t = {"W_enc": rng.standard_normal((d_in, d_sae)) / d_in ** 0.5, "W_dec": w_dec,
         "b_enc": rng.standard_normal(d_sae) * 0.1, "b_dec": rng.standard_normal(w_dec.shape[1]) * 0.1,
         "threshold": rng.random(d_sae) * 0.3}
    t = {name: v.astype(np.float32) for name, v in t.items()}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **t)
    return {name: v.astype(np.float64) for name, v in t.items()}


def write_circuit_tracer(folder: Path, layers: dict[int, tuple[int, int, int]], reads: str = "mlp.hook_in",
                         writes: str = "mlp.hook_out", jumprelu: str | None = None, skip: bool = False,
                         entries: str = "uris", seed: int = 5, w_dec: torch.Tensor | None = None,
                         dtype: torch.dtype = torch.bfloat16, **cfg) -> dict[int, dict[str, np.ndarray]]:
    """A random circuit-tracer transcoder set: config.yaml and layer_L.safetensors for each layer L -> (d_in, d_sae,
    d_out), in bfloat16 (as circuit-tracer saves them) unless dtype says otherwise. jumprelu: the threshold's name
    (threshold, or activation_function.threshold as its JumpReLU module saves it), None for ReLU; skip: a W_skip
    too; entries: the config's transcoders as hf:// paths ("uris"), {layer, filepath} mappings ("dicts") or none
    ("none"); w_dec: the decoder rows of every layer. Each layer's tensors as NumPy, W_enc (d_in, d_sae) as the reference reads it."""
    import yaml

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for layer, (d_in, d_sae, d_out) in layers.items():
        t = {"W_enc": torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5,
             "b_enc": torch.randn(d_sae, generator=g) * 0.1,
             "W_dec": torch.randn(d_sae, d_out, generator=g) if w_dec is None else w_dec.float(),
             "b_dec": torch.randn(d_out, generator=g) * 0.1}
        if jumprelu:
            t[jumprelu] = torch.rand(d_sae, generator=g) * 0.3
        if skip:
            t["W_skip"] = torch.randn(d_out, d_in, generator=g) * 0.1
        t = {name: v.to(dtype).contiguous() for name, v in t.items()}
        save_file(t, str(folder / f"layer_{layer}.safetensors"))
        w = {name: v.float().numpy().astype(np.float64) for name, v in t.items()}
        w["W_enc"] = w["W_enc"].T
        if jumprelu:
            w["threshold"] = w.pop(jumprelu)
        out[layer] = w
    files = [f"hf://someone/transcoders/layer_{layer}.safetensors" for layer in range(max(layers) + 1)]
    listed = {"uris": files, "dicts": [{"id": f"L{i}", "layer": i, "filepath": f} for i, f in enumerate(files)],
              "none": None}[entries]
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "tiny", "model_kind": "transcoder_set", "feature_input_hook": reads,
        "feature_output_hook": writes, **({"transcoders": listed} if listed else {}), **cfg}))
    return out


def write_clt(folder: Path, n_layers: int, d_in: int, d_sae: int, d_out: int, reads: str = "hook_resid_mid",
              writes: str = "hook_mlp_out", jumprelu: bool = False, seed: int = 9,
              w_dec: dict[int, torch.Tensor] | None = None, dtype: torch.dtype = torch.bfloat16,
              layers: range | None = None) -> dict[int, dict[str, np.ndarray]]:
    """A random circuit-tracer cross-layer transcoder over n_layers blocks, in its lazy-loading files: config.yaml,
    W_enc_L.safetensors (W_enc_L (d_sae, d_in), b_enc_L, b_dec_L, W_skip_L, and threshold_L if jumprelu) and
    W_dec_L.safetensors (W_dec_L (d_sae, n_layers - L, d_out); w_dec: some layers' own) for L in layers (default
    all). Each layer's tensors as NumPy without the suffix, W_enc (d_in, d_sae) as the reference reads it."""
    import yaml

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for L in layers if layers is not None else range(n_layers):
        enc = {"W_enc": torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5,
               "b_enc": torch.randn(d_sae, generator=g) * 0.1,
               "b_dec": torch.randn(d_out, generator=g) * 0.1, "W_skip": torch.randn(d_in, d_out, generator=g) * 0.1}
        if jumprelu:
            enc["threshold"] = torch.rand(d_sae, generator=g) * 0.3
        dec = (w_dec or {}).get(L)
        dec = torch.randn(d_sae, n_layers - L, d_out, generator=g) if dec is None else dec.float()
        save_file({f"{k}_{L}": v.to(dtype).contiguous() for k, v in enc.items()},
                  str(folder / f"W_enc_{L}.safetensors"))
        save_file({f"W_dec_{L}": dec.to(dtype).contiguous()}, str(folder / f"W_dec_{L}.safetensors"))
        w = {k: v.to(dtype).float().numpy().astype(np.float64) for k, v in {**enc, "W_dec": dec}.items()}
        w["W_enc"] = w["W_enc"].T
        out[L] = w
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "tiny", "model_kind": "cross_layer_transcoder", "feature_input_hook": reads,
        "feature_output_hook": writes}))
    return out


def write_sparsify(folder: Path, d_in: int, d_sae: int, k: int, transcode: bool = False,
                   seed: int = 1) -> dict[str, np.ndarray]:
    """A random SAE in EleutherAI sparsify's layout (cfg.json, sae.safetensors with an nn.Linear encoder)."""
    g = torch.Generator().manual_seed(seed)
    t = {"encoder.weight": torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5,
         "encoder.bias": torch.randn(d_sae, generator=g) * 0.1, "W_dec": torch.randn(d_sae, d_in, generator=g),
         "b_dec": torch.randn(d_in, generator=g) * 0.1}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "num_latents": d_sae, "k": k, "expansion_factor": 1,
                                                 "normalize_decoder": True, "transcode": transcode}))
    return {"W_enc": t["encoder.weight"].numpy().T.astype(np.float64), "b_enc": t["encoder.bias"].numpy(),
            "b_dec": t["b_dec"].numpy(), "W_dec": t["W_dec"].numpy().astype(np.float64)}


def reference(kind: str, w: dict[str, np.ndarray], x: np.ndarray, k: int | None = None,
              centre: bool = True) -> np.ndarray:
    """The latents, written out from SAELens' and sparsify's encode() in float64."""
    x = x.astype(np.float64) - (w["b_dec"] if centre else 0)
    if kind == "gated":
        gate = x @ w["W_enc"] + w["b_gate"] > 0
        return gate * np.maximum(x @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
    pre = x @ w["W_enc"] + w["b_enc"]
    out = np.maximum(pre, 0)
    if kind == "jumprelu":
        out = out * (pre > w["threshold"])
    if kind == "topk":
        keep = np.argsort(-out, axis=-1, kind="stable")[..., :k]
        mask = np.zeros_like(out, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        out = out * mask
    return out
