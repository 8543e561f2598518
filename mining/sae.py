"""Sparse autoencoders over a hook: their latents mined like neurons.

    saes: {blocks.17.hook_resid_post: EleutherAI/sae-SmolLM2-1.7B-layer17-32x}   # or {source: DIR, subfolder: ...}
    hooks: ["blocks.17.hook_resid_post.hook_sae_acts_post"]      # SAELens' name for the latents

An SAE reads its hook's activation x (B, T, d_in) and gives d_sae latents a token: feature i of
`blocks.L.SITE.hook_sae_acts_post` is latent i. Every statistic, export and the viewer then treat latents as they
treat neurons. Four on-disk formats are read, told apart by their files:

- SAELens (`cfg.json`, `sae_weights.safetensors`: W_enc (d_in, d_sae), b_enc, W_dec, b_dec, and `threshold` for
  JumpReLU): pre = (x - b_dec if apply_b_dec_to_input) @ W_enc + b_enc; latents relu(pre) (standard), relu(pre)
  where pre > threshold (jumprelu), or the k largest of relu(pre) (topk); gated SAEs gate on pre + b_gate and scale
  (x @ W_enc * exp(r_mag) + b_mag).
  SAELens' transcoders (architecture transcoder, skip_transcoder, jumprelu_transcoder) read hook_name and
  reconstruct hook_name_out (cfg.json) of the same block: their input is not centred (b_dec is the output's) and
  their decoder W_dec (d_sae, d_out) writes hook_name_out. A skip transcoder's W_skip adds to that reconstruction
  only, so its latents are its encoder's, as another transcoder's.
- Gemma Scope's own layout (`params.npz`: W_enc, W_dec, b_enc, b_dec, threshold; no config): JumpReLU,
  pre = x @ W_enc + b_enc (not centred), latents relu(pre) where pre > threshold. The hook it reads is the key's
  (Gemma Scope's res, mlp and att SAEs read hook_resid_post, hook_mlp_out and attn.hook_z).
- circuit-tracer's transcoder sets (`config.yaml` with model_kind transcoder_set, feature_input_hook,
  feature_output_hook and its `transcoders`, one file a layer, layer_L.safetensors: W_enc (d_sae, d_in), b_enc,
  W_dec (d_sae, d_out), b_dec, and `threshold` or `activation_function.threshold` for JumpReLU; W_skip, where
  present, adds to the reconstruction only): pre = x @ W_enc.T + b_enc (not centred), latents relu(pre), where
  pre > threshold for JumpReLU. The key's block picks the layer's file; its hook is feature_input_hook (mlp.hook_in
  is ln2.hook_normalized, what the MLP reads), and the latents write feature_output_hook (mlp.hook_out is
  hook_mlp_out). A cross-layer transcoder (model_kind cross_layer_transcoder; W_enc_L.safetensors: W_enc_L
  (d_sae, d_in), b_enc_L, b_dec_L, threshold_L; W_dec_L.safetensors: W_dec_L (d_sae, n_layers - L, d_out)) is read
  a layer at a time the same way, its latents writing feature_output_hook of their block and of every later one.
- EleutherAI sparsify (`cfg.json` with d_in and k, `sae.safetensors`: encoder.weight (d_sae, d_in), encoder.bias,
  W_dec, b_dec): pre = relu(encoder(x - b_dec)) (a transcoder's input is not centred), the k largest kept.
  Its hookpoints are module outputs: `layers.N` is blocks.N.hook_resid_post, `layers.N.mlp` blocks.N.hook_mlp_out
  (a transcoder there reads the MLP module's input, blocks.N.ln2.hook_normalized).

The encoder makes the latents; the decoder W_dec gives each latent's write into the residual stream, which the
logit lens and direct logit attribution read (analyses/logit_lens.py latent_writes).
"""

from __future__ import annotations

import json
import re
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .errors import UserError

SUFFIX = ".hook_sae_acts_post"
"""A hook name ending in this is its base hook's SAE latents (SAELens' HookedSAETransformer names them so)."""

_SAELENS, _SPARSIFY, _GEMMASCOPE = "sae_weights.safetensors", "sae.safetensors", "params.npz"
WEIGHTS = {"saelens": _SAELENS, "sparsify": _SPARSIFY, "gemmascope": _GEMMASCOPE}
"""Each layout's weight file, which tells the layouts apart (circuit-tracer's has one a layer, beside its config)."""
_TRACER = "config.yaml"
"""A circuit-tracer transcoder set's config, which tells that layout apart."""
_ENCODER = {"saelens": {n: n for n in ("W_enc", "b_enc", "b_dec", "threshold", "b_gate", "r_mag", "b_mag")},
            "sparsify": {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "b_dec": "b_dec"},
            "gemmascope": {n: n for n in ("W_enc", "b_enc", "b_dec", "threshold")},
            "circuit-tracer": {n: n for n in ("W_enc", "b_enc", "b_dec", "threshold")}}
"""Each layout's encoder tensors: our name -> the file's."""
_ROW_ENCODERS = ("sparsify", "circuit-tracer")
"""Layouts whose encoder is stored (d_sae, d_in), as an nn.Linear's weight."""
_TRACER_THRESHOLD = "activation_function.threshold"
"""circuit-tracer's name for a JumpReLU threshold in the files its JumpReLU module saved (others say threshold)."""
_TRACER_SITES = {"mlp.hook_in": "ln2.hook_normalized", "mlp.hook_out": "hook_mlp_out"}
"""circuit-tracer's names for what the MLP reads and writes -> hooks.py's; its other names are TransformerLens'."""
_CLT_WRITES = ("hook_mlp_out", "hook_attn_out")
"""What a cross-layer transcoder may write: sites that join the residual stream as they are, so that its writes
into several blocks add up (the logit lens and DLA sum them)."""
_KINDS = ("standard", "jumprelu", "topk", "gated")
_BLOCK_HOOK = re.compile(r"blocks\.\d+\.[A-Za-z0-9_.]+")
"""A block's hook as TransformerLens (and hooks.py) name it."""
_TRANSCODERS = {"transcoder": "standard", "skip_transcoder": "standard", "jumprelu_transcoder": "jumprelu"}
"""SAELens' transcoder architectures -> how their latents are made (the SAE kind with the same encoder)."""


def split_sae(site: str) -> tuple[str, bool]:
    """"hook_resid_post.hook_sae_acts_post" -> ("hook_resid_post", True); any other site -> (site, False)."""
    return (site[: -len(SUFFIX)], True) if site.endswith(SUFFIX) else (site, False)


@dataclass(eq=False)
class SAE:
    """One SAE's shape and kind from its config and its weight file's header; the encoder's tensors are read on
    first use (validation on the driver needs the widths only)."""

    hook: str
    """Base hook name it reads, e.g. blocks.3.hook_resid_post."""
    folder: Path
    kind: str
    """standard | jumprelu | topk | gated (SAELens' architectures; sparsify's SAEs are topk)."""
    d_in: int
    d_sae: int
    k: int | None
    centre_input: bool
    """Subtract b_dec from the input before encoding."""
    layout: str
    """saelens | sparsify | gemmascope | circuit-tracer."""
    transcoder: bool = False
    """It reconstructs another activation than the one it reads: the MLP module's output from its input (sparsify's
    transcode), or out_hook."""
    out_hook: str | None = None
    """The activation a transcoder's decoder writes, e.g. blocks.6.hook_mlp_out: SAELens' hook_name_out, or the job's
    saes.HOOK.writes for one in Gemma Scope's layout."""
    d_out: int | None = None
    """With out_hook: that activation's width (W_dec's columns)."""
    has_decoder: bool = True
    """Its weight file holds W_dec (d_sae, ...), which the logit lens and DLA read; encoding needs none."""
    file: str | None = None
    """Its weight file in folder, where the layout has one a layer (circuit-tracer's); else the layout's."""

    def __post_init__(self) -> None:
        self._weights: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()  # an actor with two calls in flight encodes from two threads

    def _tensors(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (device, dtype)
        with self._lock:
            if key not in self._weights:
                names = self._encoder_names()  # the encoder's tensors only: a decoder is as large and not needed
                found = read_tensors(self.weights, [name for names_of in names.values() for name in names_of])
                raw = {mine: next(found[n] for n in theirs if n in found) for mine, theirs in names.items()
                       if any(n in found for n in theirs)}
                if self.layout in _ROW_ENCODERS:
                    raw["W_enc"] = raw["W_enc"].T
                self._weights[key] = {name: t.to(device=device, dtype=dtype).contiguous() for name, t in raw.items()}
            return self._weights[key]

    def _encoder_names(self) -> dict[str, tuple[str, ...]]:
        """Our name of each encoder tensor -> the names its weight file may give it (the first it has is read)."""
        names = {mine: (theirs,) for mine, theirs in _ENCODER[self.layout].items()}
        if self.layout == "circuit-tracer":
            names["threshold"] = ("threshold", _TRACER_THRESHOLD)
        return names

    @property
    def weights(self) -> Path:
        """The file its encoder is read from."""
        return self.folder / (self.file or WEIGHTS[self.layout])

    @property
    def out_site(self) -> str | None:
        """out_hook without its block, e.g. hook_mlp_out."""
        return self.out_hook.split(".", 2)[2] if self.out_hook else None

    def decoder(self) -> torch.Tensor:
        """W_dec as float32 (d_sae, d_out): each latent's direction in what the SAE reconstructs (its hook's
        activation; a transcoder's, the MLP's output or its out_hook's)."""
        found = read_tensors(self.weights, ["W_dec"])
        if "W_dec" not in found:
            raise UserError(f"saes.{self.hook}: {self.folder} has no W_dec (the decoder the logit lens and DLA read)")
        w = found["W_dec"].float()
        if w.dim() != 2 or w.shape[0] != self.d_sae:
            raise UserError(f"saes.{self.hook}: W_dec is {tuple(w.shape)}, expected ({self.d_sae}, d_out)")
        return w

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) activations -> (..., d_sae) latents, in x's dtype and device."""
        w = self._tensors(x.device, x.dtype)
        sae_in = x - w["b_dec"] if self.centre_input else x
        pre = sae_in @ w["W_enc"]
        if self.kind == "gated":
            gate = (pre + w["b_gate"]) > 0
            magnitude = torch.relu(sae_in @ (w["W_enc"] * torch.exp(w["r_mag"])) + w["b_mag"])
            return magnitude * gate
        pre = pre + w["b_enc"]
        acts = torch.relu(pre)
        if self.kind == "jumprelu":
            return acts * (pre > w["threshold"])
        if self.kind == "topk":
            top = torch.topk(acts, self.k, dim=-1, sorted=False)
            acts = torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
        return acts


@dataclass(eq=False)
class CrossLayerTranscoder(SAE):
    """One layer's part of a circuit-tracer cross-layer transcoder: W_enc_L.safetensors (W_enc_L (d_sae, d_in),
    b_enc_L, b_dec_L, and threshold_L for JumpReLU) and W_dec_L.safetensors (W_dec_L (d_sae, n_out, d_out)). Its
    latents read layer L's hook; each writes out_hook's site of block L and of the n_out - 1 blocks after it."""

    layer: int = 0
    n_out: int = 1
    """The blocks each latent writes, from its own on."""

    def _encoder_names(self) -> dict[str, tuple[str, ...]]:
        return {name: (f"{name}_{self.layer}",) for name in ("W_enc", "b_enc", "b_dec", "threshold")}

    @property
    def weights(self) -> Path:
        return self.folder / f"W_enc_{self.layer}.safetensors"

    @property
    def decoder_file(self) -> Path:
        return self.folder / f"W_dec_{self.layer}.safetensors"

    def decoder(self) -> torch.Tensor:
        """W_dec_L as float32 (d_sae, n_out, d_out): each latent's write into out_hook's site of block L + j."""
        return torch.stack(list(self.decoder_blocks()), dim=1)

    def decoder_blocks(self) -> Iterator[torch.Tensor]:
        """W_dec_L[:, j] as float32 (d_sae, d_out) for each block L + j in turn, read a slice at a time: layer 0's
        whole decoder of a 26-layer CLT with 16k latents a layer is 2 GB in bfloat16, 4 GB as float32."""
        from safetensors import safe_open

        name = f"W_dec_{self.layer}"
        if not self.decoder_file.is_file():
            raise UserError(f"saes.{self.hook}: {self.folder} has no {self.decoder_file.name} (the decoder the logit "
                            "lens and DLA read)")
        with safe_open(str(self.decoder_file), framework="pt") as f:
            shape = tuple(f.get_slice(name).get_shape()) if name in f.keys() else None
            if shape != (self.d_sae, self.n_out, self.d_out):
                raise UserError(f"saes.{self.hook}: {self.decoder_file.name}'s {name} is {shape}, expected "
                                f"{(self.d_sae, self.n_out, self.d_out)}")
            for j in range(self.n_out):
                yield f.get_slice(name)[:, j, :].float()


def sae_folder(hook: str, spec: Any) -> Path:
    """The local folder of an SAESpec: a directory as given, or a Hugging Face repo's snapshot (downloaded once)."""
    where = f"saes.{hook}"
    local = Path(spec.source).expanduser()
    if local.is_dir():
        folder = local / spec.subfolder if spec.subfolder else local
    elif spec.source.startswith((".", "/", "~")) or spec.source.count("/") != 1:
        raise UserError(f"{where}.source: {spec.source!r} is neither a local directory nor a Hugging Face repo id")
    else:
        folder = _fetch(hook, spec, where)
    if not folder.is_dir():
        raise UserError(f"{where}: no folder {folder}")
    return folder


def _fetch(hook: str, spec: Any, where: str) -> Path:
    """A hub repo's SAE folder, downloaded once: the subfolder's files (the whole repo without one), or, for a
    circuit-tracer transcoder set, whose folder holds every layer's file (tens of GB), its config and the file of
    the key's layer."""
    from huggingface_hub import snapshot_download

    prefix = f"{spec.subfolder}/" if spec.subfolder else ""
    try:
        root = Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=[prefix + _TRACER]))
        config = root / prefix / _TRACER
        if config.is_file():
            cfg = _tracer_config(config, where)
            files = _clt_files(_layer_of(hook)) if _is_clt(cfg) else (_tracer_file(cfg, hook, spec, where),)
            pattern = [prefix + _TRACER, *(prefix + f for f in files)]
        else:
            pattern = [f"{prefix}*"] if prefix else None
        root = Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=pattern))
    except UserError:
        raise
    except Exception as e:  # offline, not found, gated: huggingface_hub raises many kinds
        raise UserError(f"{where}.source: cannot fetch {spec.source!r} from the Hugging Face hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return root / spec.subfolder if spec.subfolder else root


def load_sae(hook: str, spec: Any) -> SAE:
    """Read an SAE's config and its weight file's header (no tensors); every problem is one UserError line."""
    folder = sae_folder(hook, spec)
    where = f"saes.{hook}"
    layout = next((name for name, file in WEIGHTS.items() if (folder / file).is_file()), None)
    if layout is None and (folder / _TRACER).is_file():
        layout = "circuit-tracer"
    writes = getattr(spec, "writes", None)
    if writes and layout != "gemmascope":
        raise UserError(f"{where}.writes: only for an SAE in Gemma Scope's layout (params.npz); a SAELens "
                        "transcoder's cfg.json names the hook it writes (hook_name_out), a circuit-tracer set's "
                        "config.yaml too (feature_output_hook), and a sparsify transcoder writes its MLP's output")
    if layout == "circuit-tracer":
        return _circuit_tracer(hook, folder, spec, where)
    if layout is None or (layout != "gemmascope" and not (folder / "cfg.json").is_file()):
        raise UserError(f"{where}: {folder} holds no SAE: expected cfg.json beside {_SAELENS} (SAELens) or "
                        f"{_SPARSIFY} (sparsify), Gemma Scope's {_GEMMASCOPE}, or a circuit-tracer transcoder "
                        f"set's {_TRACER}")
    try:
        cfg = json.loads((folder / "cfg.json").read_text()) if layout != "gemmascope" else {}
        shapes = _shapes(folder / WEIGHTS[layout])
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{where}: cannot read the SAE in {folder} ({str(e).splitlines()[0][:200]})") from None
    if layout == "gemmascope":
        return _gemmascope(hook, folder, shapes, where, writes)
    return (_saelens if layout == "saelens" else _sparsify)(hook, folder, cfg, shapes, where)


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from the file's headers (no tensor is read)."""
    if path.suffix == ".npz":  # a zip of .npy files, each with its own header
        import numpy as np

        shapes = {}
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                with z.open(name) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shapes[name.removesuffix(".npy")] = tuple(read(f)[0])
        return shapes
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Those of the named tensors the weight file has (a safetensors file, or Gemma Scope's params.npz)."""
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path) as f:
            return {name: torch.from_numpy(np.ascontiguousarray(f[name])) for name in names if name in f.files}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in names if name in f.keys()}


def _need(shapes: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]], where: str, path: str,
          by: str = "its cfg.json") -> None:
    """by: what the wanted shapes come from."""
    for name, shape in want.items():
        if name not in shapes:
            raise UserError(f"{where}: {path} has no tensor {name!r} (it has {', '.join(sorted(shapes))})")
        if shapes[name] != shape:
            raise UserError(f"{where}: {path}'s {name} is {shapes[name]}, {by} implies {shape}")


def _saelens(hook: str, folder: Path, cfg: dict, shapes: Mapping[str, tuple[int, ...]], where: str) -> SAE:
    kind = str(cfg.get("architecture") or "standard")
    activation = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu")
    if kind == "standard" and activation != "relu":  # SAELens before 6: top-k SAEs were "standard" with a top-k
        kind = activation
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    cfg = {**meta, **cfg}  # SAELens 6 keeps hook_name and hook_head_index under metadata
    _check_reads(hook, cfg.get("hook_name"), where)
    out_hook = None
    if kind in _TRANSCODERS:
        kind, out_hook = _TRANSCODERS[kind], _out_hook(cfg, where)
    if kind not in _KINDS:
        raise UserError(f"{where}: SAELens architecture {kind!r} is not supported "
                        f"({', '.join(_KINDS + tuple(_TRANSCODERS))} are)")
    for key, why in (("hook_head_index", "it reads one head's part of attn.hook_z"),
                     ("hook_head_index_out", "it writes one head's part of attn.hook_z"),
                     ("rescale_acts_by_decoder_norm", "its latents are scaled by its decoder rows' norms")):
        if cfg.get(key) not in (None, False):
            raise UserError(f"{where}: {key}={cfg[key]!r} is not supported: {why}")
    if str(cfg.get("normalize_activations") or "none") != "none":
        raise UserError(f"{where}: normalize_activations={cfg['normalize_activations']!r} is not supported: the SAE "
                        "reads rescaled activations; only 'none' is")
    if "W_enc" not in shapes or len(shapes["W_enc"]) != 2:
        raise UserError(f"{where}: {_SAELENS} has no 2-d W_enc")
    d_in, d_sae = (int(cfg.get("d_in", shapes["W_enc"][0])), int(cfg.get("d_sae", shapes["W_enc"][1])))
    d_out = int(cfg.get("d_out") or shapes.get("W_dec", (0, d_in))[1]) if out_hook else None
    want = {"W_enc": (d_in, d_sae), "b_dec": (d_out or d_in,)}
    want.update({"b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)} if kind == "gated" else {"b_enc": (d_sae,)})
    if kind == "jumprelu":
        want["threshold"] = (d_sae,)
    _need(shapes, want, where, _SAELENS)
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if kind == "topk" and not (isinstance(k, int) and 0 < k <= d_sae):
        raise UserError(f"{where}: a topk SAE needs k in 1..{d_sae} in its cfg.json (k or activation_fn_kwargs.k)")
    if out_hook and "W_dec" in shapes and shapes["W_dec"] != (d_sae, d_out):
        raise UserError(f"{where}: {_SAELENS}'s W_dec is {shapes['W_dec']}, its cfg.json implies {(d_sae, d_out)}")
    centre = bool(cfg.get("apply_b_dec_to_input", True)) and not out_hook  # a transcoder's b_dec is its output's
    return SAE(hook, folder, kind, d_in, d_sae, k if kind == "topk" else None, centre, "saelens",
               transcoder=bool(out_hook), out_hook=out_hook, d_out=d_out, has_decoder=_has_decoder(shapes, d_sae))


def _check_reads(hook: str, named: Any, where: str) -> None:
    """Refuse an SAE keyed by another hook than the one its cfg.json says it was trained on (another layer, most
    often). A name that is not a block's TransformerLens name (e.g. a Hugging Face module's) is not compared; a
    block's hook_resid_post is the next block's hook_resid_pre."""
    def canonical(name: str) -> str:
        m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", name)
        return f"blocks.{int(m.group(1)) - 1}.hook_resid_post" if m and int(m.group(1)) > 0 else name

    if isinstance(named, str) and _BLOCK_HOOK.fullmatch(named) and \
            canonical(named) != canonical(hook):
        raise UserError(f"{where}: its cfg.json says it reads {named} (hook_name); key it by that hook")


def _out_hook(cfg: dict, where: str) -> str:
    """A SAELens transcoder's hook_name_out, which must be a block's hook named as hooks.py names them."""
    out = cfg.get("hook_name_out")
    if not (isinstance(out, str) and _BLOCK_HOOK.fullmatch(out)):
        what = f"{where}:" if where.endswith(".writes") else \
            f"{where}: a SAELens transcoder's cfg.json needs hook_name_out,"
        raise UserError(f"{what} the hook it writes, as blocks.L.SITE (e.g. blocks.6.hook_mlp_out), got {out!r}")
    return out


def _gemmascope(hook: str, folder: Path, shapes: Mapping[str, tuple[int, ...]], where: str,
                writes: str | None) -> SAE:
    """Gemma Scope's own layout (params.npz, no config): a JumpReLU SAE whose input is not centred; with `writes`, a
    transcoder writing that hook (W_dec and b_dec its width)."""
    if len(shapes.get("W_enc", ())) != 2:
        raise UserError(f"{where}: {_GEMMASCOPE} has no 2-d W_enc")
    d_in, d_sae = shapes["W_enc"]
    out_hook = _out_hook({"hook_name_out": writes}, f"{where}.writes") if writes else None
    d_out = int(shapes.get("W_dec", (d_sae, d_in))[1]) if out_hook else None
    _need(shapes, {"b_enc": (d_sae,), "threshold": (d_sae,), "b_dec": (d_out or d_in,)}, where, _GEMMASCOPE,
          "its W_enc and W_dec")
    return SAE(hook, folder, "jumprelu", int(d_in), int(d_sae), None, False, "gemmascope", transcoder=bool(out_hook),
               out_hook=out_hook, d_out=d_out, has_decoder=_has_decoder(shapes, d_sae))


def _tracer_config(path: Path, where: str) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{where}: cannot read {path} ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: {path} is not a circuit-tracer config (a mapping with feature_input_hook, "
                        "feature_output_hook and transcoders)")
    kind = cfg.get("model_kind", "transcoder_set")
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise UserError(f"{where}: circuit-tracer model_kind {kind!r} is not supported (transcoder_set and "
                        "cross_layer_transcoder are)")
    return cfg


def _is_clt(cfg: dict) -> bool:
    return cfg.get("model_kind") == "cross_layer_transcoder"


def _layer_of(hook: str) -> int:
    m = re.fullmatch(r"blocks\.(\d+)\..+", hook)
    return int(m.group(1)) if m else -1


def _clt_files(layer: int) -> tuple[str, str]:
    """A cross-layer transcoder's files of one layer: its encoder's, its decoder's."""
    return f"W_enc_{layer}.safetensors", f"W_dec_{layer}.safetensors"


def _tracer_file(cfg: dict, hook: str, spec: Any, where: str) -> str:
    """The weight file of the key's layer in a circuit-tracer set's folder: its entry under `transcoders` (a list
    of paths a layer, or of {layer, filepath}; an hf:// path is read inside the repo), else layer_L.safetensors."""
    layer = _layer_of(hook)
    entries = cfg.get("transcoders") if isinstance(cfg.get("transcoders"), list) else []
    path = next((e.get("filepath") for e in entries if isinstance(e, dict) and e.get("layer") == layer), None)
    if path is None and all(isinstance(e, str) for e in entries) and 0 <= layer < len(entries):
        path = entries[layer]
    if not isinstance(path, str):
        return f"layer_{layer}.safetensors"
    if path.startswith("hf://"):  # hf://org/repo/path/in/repo?revision=...
        path = path[len("hf://"):].split("?")[0].split("/", 2)[-1]
        if spec.subfolder and path.startswith(f"{spec.subfolder}/"):
            path = path[len(spec.subfolder) + 1:]
    if not path.endswith(".safetensors"):
        raise UserError(f"{where}: its config.yaml gives layer {layer} the file {path!r}; only circuit-tracer's "
                        "safetensors files are read (for Gemma Scope's params.npz, key its folder with writes:)")
    return path


def _circuit_tracer(hook: str, folder: Path, spec: Any, where: str) -> SAE:
    """One layer's transcoder of a circuit-tracer set: it reads feature_input_hook and writes
    feature_output_hook of the key's block, its input not centred."""
    cfg = _tracer_config(folder / _TRACER, where)
    block, _, site = hook.partition(".")[2].partition(".")
    reads, writes = (str(cfg.get(key)) for key in ("feature_input_hook", "feature_output_hook"))
    if _TRACER_SITES.get(reads, reads) != site:
        raise UserError(f"{where}: its config.yaml says its transcoders read {reads} "
                        f"(blocks.{block}.{_TRACER_SITES.get(reads, reads)}); key it by that hook")
    out_hook = _out_hook({"hook_name_out": f"blocks.{block}.{_TRACER_SITES.get(writes, writes)}"}, where)
    if _is_clt(cfg):
        return _clt(hook, folder, out_hook, where)
    file = _tracer_file(cfg, hook, spec, where)
    if not (folder / file).is_file():
        raise UserError(f"{where}: {folder} has no {file} (the transcoder of layer {block})")
    try:
        shapes = _shapes(folder / file)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: cannot read {folder / file} ({str(e).splitlines()[0][:200]})") from None
    if len(shapes.get("W_enc", ())) != 2:
        raise UserError(f"{where}: {file} has no 2-d W_enc")
    d_sae, d_in = shapes["W_enc"]
    d_out = int(shapes.get("W_dec", (d_sae, d_in))[1])
    if "W_dec" in shapes and shapes["W_dec"] != (d_sae, d_out):
        raise UserError(f"{where}: {file}'s W_dec is {shapes['W_dec']}, its W_enc implies ({d_sae}, d_out)")
    want = {"b_enc": (d_sae,), "b_dec": (d_out,)}
    threshold = next((n for n in ("threshold", _TRACER_THRESHOLD) if n in shapes), None)
    if threshold:
        want[threshold] = (d_sae,)
    _need(shapes, want, where, file, "its W_enc and W_dec")
    return SAE(hook, folder, "jumprelu" if threshold else "standard", int(d_in), int(d_sae), None, False,
               "circuit-tracer", transcoder=True, out_hook=out_hook, d_out=d_out,
               has_decoder=_has_decoder(shapes, d_sae), file=file)


def _clt(hook: str, folder: Path, out_hook: str, where: str) -> CrossLayerTranscoder:
    """Layer L's encoder of a circuit-tracer cross-layer transcoder, its decoder's shape from its file's header."""
    if out_hook.split(".", 2)[2] not in _CLT_WRITES:
        raise UserError(f"{where}: the cross-layer transcoder writes {out_hook.split('.', 2)[2]}; one writing "
                        f"{' or '.join(_CLT_WRITES)} (what joins the residual stream) is supported")
    layer = _layer_of(hook)
    encoder, decoder = _clt_files(layer)
    if not (folder / encoder).is_file():
        raise UserError(f"{where}: {folder} has no {encoder} (the cross-layer transcoder's encoder of layer {layer})")
    try:
        shapes = _shapes(folder / encoder)
        dec = _shapes(folder / decoder) if (folder / decoder).is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: cannot read the cross-layer transcoder in {folder} "
                        f"({str(e).splitlines()[0][:200]})") from None
    w_enc = shapes.get(f"W_enc_{layer}", ())
    if len(w_enc) != 2:
        raise UserError(f"{where}: {encoder} has no 2-d W_enc_{layer}")
    d_sae, d_in = w_enc
    d_out = int(shapes.get(f"b_dec_{layer}", (d_in,))[0])
    w_dec = dec.get(f"W_dec_{layer}")
    if w_dec is not None and (len(w_dec) != 3 or w_dec[0] != d_sae or w_dec[2] != d_out):
        raise UserError(f"{where}: {decoder}'s W_dec_{layer} is {w_dec}, its encoder implies ({d_sae}, n_layers - "
                        f"{layer}, {d_out})")
    want = {f"b_enc_{layer}": (d_sae,), f"b_dec_{layer}": (d_out,)}
    threshold = f"threshold_{layer}" in shapes
    if threshold:
        want[f"threshold_{layer}"] = (d_sae,)
    _need(shapes, want, where, encoder, "its W_enc")
    return CrossLayerTranscoder(hook, folder, "jumprelu" if threshold else "standard", int(d_in), int(d_sae), None,
                                False, "circuit-tracer", transcoder=True, out_hook=out_hook, d_out=d_out,
                                has_decoder=w_dec is not None, layer=layer, n_out=int(w_dec[1]) if w_dec else 1)


def _sparsify(hook: str, folder: Path, cfg: dict, shapes: Mapping[str, tuple[int, ...]], where: str) -> SAE:
    if "encoder.weight" not in shapes or len(shapes["encoder.weight"]) != 2:
        raise UserError(f"{where}: {_SPARSIFY} has no 2-d encoder.weight")
    d_sae, d_in = shapes["encoder.weight"]
    if "d_in" in cfg and int(cfg["d_in"]) != d_in:
        raise UserError(f"{where}: cfg.json says d_in {cfg['d_in']}, {_SPARSIFY}'s encoder reads {d_in}")
    _need(shapes, {"encoder.bias": (d_sae,), "b_dec": (d_in,)}, where, _SPARSIFY)
    if cfg.get("activation", "topk") != "topk":
        raise UserError(f"{where}: sparsify activation {cfg['activation']!r} is not supported (topk is)")
    k = cfg.get("k")
    if not (isinstance(k, int) and 0 < k <= d_sae):
        raise UserError(f"{where}: sparsify's cfg.json needs k in 1..{d_sae}, got {k!r}")
    transcode = bool(cfg.get("transcode", False))
    return SAE(hook, folder, "topk", int(d_in), int(d_sae), k, not transcode, "sparsify", transcoder=transcode,
               has_decoder=_has_decoder(shapes, d_sae))


def _has_decoder(shapes: Mapping[str, tuple[int, ...]], d_sae: int) -> bool:
    return len(shapes.get("W_dec", ())) == 2 and shapes["W_dec"][0] == d_sae


def load_saes(saes: Mapping[str, Any]) -> dict[str, SAE]:
    """A job's `saes:` (base hook name -> SAESpec) as SAE objects. Each keeps the encoder's tensors it reads on first
    use, so a caller loads them once and keeps them (the miner's points, the replayer)."""
    return {hook: load_sae(hook, spec) for hook, spec in saes.items()}


def sae_provenance(saes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What the store records of each SAE: where it came from, its kind and shape, its weights' sha256."""
    import hashlib

    out = {}
    for hook, sae in load_saes(saes).items():
        digest = hashlib.sha256()
        with open(sae.weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        spec = saes[hook]
        out[hook] = {"source": spec.source, "subfolder": spec.subfolder, "revision": spec.revision,
                     "writes": spec.writes,
                     "folder": str(sae.folder), "weights": str(sae.weights), "format": sae.layout, "kind": sae.kind,
                     "d_in": sae.d_in,
                     "d_sae": sae.d_sae, "k": sae.k, "transcoder": sae.transcoder, "hook_name_out": sae.out_hook,
                     "weights_sha256": digest.hexdigest()}
    return out
