"""Job spec: YAML -> validated frozen dataclasses.

Every error names the offending key (`corpus.max_tokens: expected int, got 'lots'`), so a
user can fix the file without reading code. `--set key=value` overrides are applied to the
raw YAML mapping before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    id: str
    """Alias (smollm2-135m, minilm-l6), Hugging Face id, local directory, or .gguf file."""
    dtype: str = "float32"
    """float32 | float16 | bfloat16."""
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda | cuda:N."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for Hugging Face ids."""
    gguf_file: str | None = None
    """GGUF file name inside a directory or repo, when the weights are GGUF."""
    trust_remote_code: bool = False
    """Run the model repo's own Python code. Off unless you trust the repo."""
    allow_pickle: bool = False
    """Load pickled checkpoints (pytorch_model.bin, *.pt), which can run code when unpickled. Off: only
    safetensors and GGUF weights load."""
    quantize: str | None = None
    """Round every weight matrix through a llama.cpp format and back before mining (q8_0, q5_1, q5_0, q4_1, q4_0,
    mxfp4, bf16, f16): diff a model against its quantized self (mining/quantize.py)."""

    def __post_init__(self) -> None:
        if self.quantize is not None:
            from .quantize import check_format

            check_format(self.quantize)
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise UserError(f"model.dtype: expected float32, float16 or bfloat16, got {self.dtype!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise UserError(f"model.device: expected auto, cpu or cuda[:N], got {self.device!r}")


@dataclass(frozen=True)
class CorpusSpec:
    source: str
    """files:GLOB (txt/jsonl/parquet) | dataset:NAME_OR_PATH | builtin:python-stdlib | builtin:python-docs."""
    text_field: str = "text"
    """Field holding the text in jsonl/parquet/dataset records."""
    max_tokens: int = 100_000
    """Mined tokens (BOS and padding excluded); respected exactly."""
    context_length: int = 128
    """Tokens per context, special tokens included."""
    split: str = "train"
    """Split of a `datasets` dataset."""
    bos: str = "auto"
    """auto (the tokenizer's own rule, else its BOS/EOS token) | none | a token string to prepend."""
    max_docs: int | None = None
    """Stop after this many documents (None: no limit)."""

    def __post_init__(self) -> None:
        if not any(self.source.startswith(p) for p in ("files:", "dataset:", "builtin:")):
            raise UserError(f"corpus.source: expected files:GLOB, dataset:NAME or builtin:NAME, got {self.source!r}")
        _positive("corpus.max_tokens", self.max_tokens)
        if self.context_length < 4:
            raise UserError(f"corpus.context_length: must be at least 4, got {self.context_length}")


@dataclass(frozen=True)
class StatsSpec:
    top_k: int = 32
    """Top and bottom examples kept per neuron (and top contexts)."""
    histogram: bool = True
    histogram_mantissa_bits: int = 4
    """Bins per octave = 2**bits; relative bin width 2**-bits (quantile error half that)."""
    histogram_min_exp: int = -12
    """|x| < 2**min_exp falls in the two underflow bins beside the exact-zero bin."""
    histogram_max_exp: int = 8
    """|x| >= 2**max_exp falls in the overflow bins (clamped to the neuron's min/max)."""
    moments: bool = True
    token_table: bool = True
    """Per-token rows: log-prob of the next token and entropy (causal LMs)."""
    quantile_samples: int = 0
    """Examples kept per neuron and quantile band (0: off); needs histogram and moments."""
    dla: bool = False
    """Direct logit attribution of every mlp.hook_post neuron to the actual next token (causal LMs)."""
    heads: bool = False
    """Attention-head scores (previous-token, duplicate, induction, BOS sink, entropy): the `heads` table."""
    head_ablation: bool = False
    """Per head of the hooked layers, the loss change under zero and mean ablation (`head_ablation`)."""
    head_ablation_tokens: int = 1024
    """Tokens of the corpus' first full contexts that every ablation is scored on (one forward per head and kind)."""
    gate_cases: bool = False
    """Gated MLPs (SwiGLU): per neuron the count, mean and top examples of each (gate, up) sign case."""
    logit_lens: bool = False
    """For every hooked mlp.hook_post neuron, the vocabulary its output direction boosts and suppresses."""
    logit_lens_k: int = 10
    neuron_match: bool = False
    """Diff jobs: streaming cross-correlation of A's and B's neurons per layer and each A neuron's best B match."""
    polysemanticity: bool = False
    """Per neuron the variance explained by the current token and by position (`neuron_variance`), and the
    embedding coherence of its top contexts' peak tokens (`neuron_coherence`)."""
    token_groups: int = 256
    """Token ids given their own group for `polysemanticity` (the most frequent; the rest share one)."""

    def __post_init__(self) -> None:
        _positive("stats.top_k", self.top_k)
        if not 1 <= self.histogram_mantissa_bits <= 7:
            raise UserError("stats.histogram_mantissa_bits: must be between 1 and 7")
        if not -126 <= self.histogram_min_exp < self.histogram_max_exp <= 127:
            raise UserError("stats.histogram_min_exp/max_exp: need -126 <= min_exp < max_exp <= 127")
        _positive("stats.logit_lens_k", self.logit_lens_k)
        _positive("stats.token_groups", self.token_groups)
        if self.quantile_samples < 0:
            raise UserError(f"stats.quantile_samples: must be >= 0, got {self.quantile_samples}")
        if self.quantile_samples and not (self.histogram and self.moments):
            raise UserError("stats.quantile_samples: needs stats.histogram and stats.moments on (bands come from them)")
        _positive("stats.head_ablation_tokens", self.head_ablation_tokens)


@dataclass(frozen=True)
class DenseSpec:
    hooks: tuple[str, ...] = ()
    """Hooks whose activations are kept densely (float16, Zarr) for a sample of tokens."""
    token_fraction: float = 0.05
    """Fraction of tokens kept, chosen by a hash of the global token index (stable across runs)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.token_fraction <= 1.0:
            raise UserError(f"dense.token_fraction: must be in (0, 1], got {self.token_fraction}")


CPU_SHARD_TOKENS = 65536
GPU_SHARD_TOKENS = 1 << 20


@dataclass(frozen=True)
class ComputeSpec:
    actors: Union[int, str] = "auto"
    """Ray actors: one per GPU, else per `cpus_per_actor` CPUs ('auto'), or a number."""
    cpus_per_actor: int = 1
    """CPU cores (and torch threads) per actor."""
    batch_size: Union[int, str] = "auto"
    """Contexts per forward pass, or auto: on a GPU the largest batch whose measured peak memory fits 85% of
    the free device memory; on CPUs 2,048 tokens a batch (16 contexts of 128). Chosen once per job, on its
    first shard, and written to the store's job.yaml (`--resume` keeps it)."""
    shard_tokens: Union[int, str] = "auto"
    """Tokens per shard: the unit of work, retry and resume. auto: 65,536 (CPU_SHARD_TOKENS) when the actors
    run on CPUs, 1,048,576 (GPU_SHARD_TOKENS) on GPUs, whose shards must be long enough that writing and
    merging a shard's states (about a second each, whatever its length) stays small beside mining it.
    Chosen at the start of a job and written to the store's job.yaml (`--resume` keeps it)."""
    max_retries: int = 2
    """Retries of a shard whose attempt failed or whose worker died, before it is recorded as failed."""

    def __post_init__(self) -> None:
        if isinstance(self.actors, str) and self.actors != "auto":
            raise UserError(f"compute.actors: expected 'auto' or a positive integer, got {self.actors!r}")
        if isinstance(self.actors, int):
            _positive("compute.actors", self.actors)
        _positive("compute.cpus_per_actor", self.cpus_per_actor)
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            raise UserError(f"compute.batch_size: expected 'auto' or a positive integer, got {self.batch_size!r}")
        if isinstance(self.batch_size, int):
            _positive("compute.batch_size", self.batch_size)
        if isinstance(self.shard_tokens, str) and self.shard_tokens != "auto":
            raise UserError(f"compute.shard_tokens: expected 'auto' or a positive integer, got {self.shard_tokens!r}")
        if isinstance(self.shard_tokens, int):
            _positive("compute.shard_tokens", self.shard_tokens)
        if self.max_retries < 0:
            raise UserError(f"compute.max_retries: must be >= 0, got {self.max_retries}")

    @property
    def fixed_shard_tokens(self) -> int | None:
        """The shard size, or None while it is `auto` (not chosen yet: the runner does, by the actors' device)."""
        return None if self.shard_tokens == "auto" else int(self.shard_tokens)

    @property
    def fixed_batch_size(self) -> int | None:
        """The batch size, or None while it is `auto` (not chosen yet)."""
        return None if self.batch_size == "auto" else int(self.batch_size)


@dataclass(frozen=True)
class SAESpec:
    source: str
    """A local directory, or a Hugging Face repo id (fetched once, like a model's)."""
    subfolder: str | None = None
    """The SAE's folder inside the source (sparsify and SAELens releases hold one a hook, e.g. layers.3)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a repo id."""
    writes: str | None = None
    """A transcoder in Gemma Scope's layout (which has no config): the hook its decoder writes, e.g.
    blocks.5.hook_mlp_out. SAELens' transcoders name it in their cfg.json (hook_name_out)."""


@dataclass(frozen=True)
class JobSpec:
    name: str
    corpus: CorpusSpec
    model: ModelSpec | None = None
    models: dict[str, ModelSpec] | None = None
    """Two models {a: ..., b: ...} for a diff job (instead of `model`)."""
    hooks: tuple[str, ...] = ("blocks.*.mlp.hook_post",)
    saes: dict[str, SAESpec] = field(default_factory=dict)
    """Sparse autoencoders by the hook they read (blocks.L.SITE): hook blocks.L.SITE.hook_sae_acts_post to mine
    their latents (mining/sae.py)."""
    stats: StatsSpec = field(default_factory=StatsSpec)
    dense: DenseSpec = field(default_factory=DenseSpec)
    compute: ComputeSpec = field(default_factory=ComputeSpec)
    store: str | None = None
    """Store directory; `mine run --store` overrides it; default runs/<name>."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise UserError(f"name: expected a non-empty name without '/', got {self.name!r}")
        if self.models is not None:
            if self.model is not None:
                raise UserError("models: a diff job names two models under `models: {a: ..., b: ...}`, not `model` too")
            if set(self.models) != {"a", "b"}:
                raise UserError(f"models: expected exactly the keys a and b, got {', '.join(sorted(self.models)) or 'none'}")
            object.__setattr__(self, "model", self.models["a"])  # model A tokenizes and plans the corpus
        if self.model is None:
            raise UserError("model: missing; give a model id, e.g. `model: {id: smollm2-135m}`")
        if not self.hooks and self.models is None:  # a diff job without hooks compares the models token by token
            raise UserError("hooks: give at least one hook, e.g. blocks.*.mlp.hook_post")
        for hook in self.saes:
            if not re.fullmatch(r"blocks\.\d+\.[A-Za-z0-9_.]+", hook) or hook.endswith(".hook_sae_acts_post"):
                raise UserError(f"saes.{hook}: expected the hook an SAE reads, e.g. blocks.3.hook_resid_post")

    @property
    def is_diff(self) -> bool:
        return self.models is not None

    def with_compute(self, **values: Any) -> "JobSpec":
        """The same job with these compute keys set (what an `auto` resolved to)."""
        raw = self.to_dict()
        raw["compute"].update(values)
        return spec_from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        out = _plain(dataclasses.asdict(self))
        if self.is_diff:
            out.pop("model")  # it is models.a
        return out


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise UserError(f"{key}: must be positive, got {value}")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------- loading


def load_spec(path: str | Path, overrides: typing.Sequence[str] = ()) -> JobSpec:
    """Read a YAML job spec, apply `key=value` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: job spec not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read job spec ({e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys (name, model, corpus, ...) at the top level")
    for item in overrides:
        apply_override(raw, item)
    return spec_from_dict(raw)


def spec_from_dict(raw: dict[str, Any]) -> JobSpec:
    raw = dict(raw)
    if isinstance(raw.get("model"), str):  # `model: gpt2` is shorthand for `model: {id: gpt2}`
        raw["model"] = {"id": raw["model"]}
    return _build(JobSpec, raw, "")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`corpus.max_tokens=5000` -> raw["corpus"]["max_tokens"] = 5000 (value parsed as YAML)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value, e.g. corpus.max_tokens=5000")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    parts = _key_parts(key.strip())
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and part == "model":
            child = {"id": child}
        if isinstance(child, str) and i == 1 and parts[0] == "saes":  # an SAE given by its source alone
            child = {"source": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
        node[part] = child
        node = child
    node[parts[-1]] = value


def _key_parts(key: str) -> list[str]:
    """A dotted key's parts, where a key under `saes` is a hook name, dots and all: saes.blocks.3.hook_resid_post
    -> [saes, blocks.3.hook_resid_post], and saes.blocks.3.hook_resid_post.subfolder adds [subfolder]."""
    parts = key.split(".")
    if parts[0] != "saes" or len(parts) < 3:
        return parts
    fields = {f.name for f in dataclasses.fields(SAESpec)}
    tail = [parts.pop()] if parts[-1] in fields else []
    return ["saes", ".".join(parts[1:])] + tail


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'spec'}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"{prefix}{unknown[0]}: unknown key; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{key}: missing (required)")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], key)
    try:
        return cls(**kwargs)
    except UserError as e:  # a model's own checks say `model.`; in a diff job it is models.a or models.b
        if cls is ModelSpec and prefix != "model." and str(e).startswith("model."):
            raise UserError(prefix + str(e).removeprefix("model.")) from None
        raise


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if len(errors) == 1 else f"{key}: unexpected value {_show(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp in (ModelSpec, SAESpec):  # `model: gpt2`, `saes: {HOOK: DIR}`
            value = {dataclasses.fields(tp)[0].name: value}
        return _build(tp, value, key + ".")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {_show(value)}")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {_show(value)}")
        inner = typing.get_args(tp)[1]
        return {str(k): _coerce(inner, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"spec field {key} has an unsupported type {tp}")  # a bug in this file


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"


def store_path(spec: JobSpec, override: str | None) -> Path | str:
    """A local directory as a Path; an object-storage URL (s3://...) as the string itself (a Path
    would fold its `//`)."""
    from .storage import is_url

    raw = override or spec.store or f"runs/{spec.name}"
    return raw if is_url(raw) else Path(raw)
