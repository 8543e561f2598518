"""`mine bench` on a tiny random Llama (SmolLM2's tokenizer): every part runs and reports positive
figures. Speed is never asserted, only that the figures exist and are sane."""

import importlib.util
import json
import tempfile

import pytest

from mining.cli import main


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smol_tokenizer):
    """A 2-layer random Llama saved as a local model directory (the `--model DIR` path)."""
    from mining.tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def bench(capsys, model, *args: str) -> dict:
    code = main(["bench", "--model", str(model), "--tokens", "300", "--context-length", "64", "--batch-size", "4",
                 "--repeats", "1", "--json", *args])
    out = capsys.readouterr().out
    assert code == 0
    assert len(out.strip().splitlines()) == 1  # exactly one JSON object on stdout (progress goes to stderr)
    return json.loads(out)


def test_throughput_json(capsys, tiny_llama):
    r = bench(capsys, tiny_llama, "--parts", "forward,mining,dla,kernels")
    for key in ("bare_tokens_per_s", "mining_tokens_per_s", "mining_ratio", "dla_tokens_per_s", "dla_ratio",
                "mining_torch_ops_ratio", "kernels_speedup"):
        assert r[key] > 0, key
    assert r["config"]["tokens"] == 300 and r["config"]["layers"] == 2 and r["config"]["neurons"] == 128
    rounds = r["round_ratios"]["mining"]  # each round's ratio to the forward run next to it
    assert len(rounds) == r["config"]["repeats"] and all(v > 0 for v in rounds)
    assert min(rounds) <= r["round_ratio_medians"]["mining"] <= max(rounds)
    assert {"cpu_count", "torch", "device", "dtype", "threads"} <= set(r["machine"])
    assert "token_table_tokens_per_s" not in r and "store" not in r
    assert r["interleave"] == "batch"  # the CPU default: every batch of a miner beside the forward's same batch
    rates = r["rounds_tokens_per_s"]
    pooled = sum(1 / f for f in rates["forward"]) / sum(1 / v for v in rates["mining"])
    assert r["mining_ratio"] == pytest.approx(pooled)
    assert r["kernels_speedup"] == pytest.approx(r["mining_ratio"] / r["mining_torch_ops_ratio"])
    assert set(r["targets"]) == {"mining_ratio", "dla_ratio"}  # the parts run: the throughput targets only
    assert r["targets"]["mining_ratio"]["met"] == (r["mining_ratio"] >= 0.90)


def test_targets_judged_from_the_figures():
    """`targets` in the JSON and the report: each target of the parts measured, met or missed by how much; a query
    latency from a store smaller than 10M token rows is not judged; the GPU stretch goal only on a GPU."""
    from mining.bench import verdict_lines, verdicts

    r = {"mining_ratio": 0.93, "dla_ratio": 0.75, "machine": {},
         "memory": {"peak_growth_pct": 12.5}, "store": {"ratio_dense_to_store_1m": 605.0},
         "duckdb": {"token_rows": 10_000_000, "queries": {"a": {"median_ms": 68.0}, "b": {"median_ms": 120.0}}}}
    t = verdicts(r)
    assert t["mining_ratio"]["met"] is True and t["mining_ratio"]["missed_by"] is None
    assert t["dla_ratio"]["met"] is False and t["dla_ratio"]["missed_by"] == pytest.approx(-0.05)
    assert t["memory_growth_pct"]["met"] is False and t["memory_growth_pct"]["missed_by"] == pytest.approx(2.5)
    assert t["store_pct_of_dense_1m"]["met"] is True and t["store_pct_of_dense_1m"]["value"] == pytest.approx(100 / 605)
    assert t["query_ms"]["value"] == 120.0 and t["query_ms"]["met"] is False  # the slowest query counts
    assert "mined_tokens_per_s" not in t
    lines = verdict_lines(t)
    assert any("mining + DLA >= 0.80" in line and "0.75  missed by 0.05" in line for line in lines)
    assert any("memory growth" in line and "missed by 2.5%" in line for line in lines)
    r["duckdb"]["token_rows"] = 100_000
    r["machine"]["gpu"] = "NVIDIA H100"
    r["mining_tokens_per_s"] = 266_718.0
    t = verdicts(r)
    assert t["query_ms"]["met"] is None and "100,000 token rows" in t["query_ms"]["note"]
    assert t["mined_tokens_per_s"]["met"] is False and t["mined_tokens_per_s"]["missed_by"] == pytest.approx(-733_282)
    assert verdicts({"machine": {}}) == {}  # nothing measured, nothing judged


def test_whole_runs_interleaved(capsys, tiny_llama):
    r = bench(capsys, tiny_llama, "--parts", "forward,mining", "--interleave", "run", "--repeats", "2")
    assert r["interleave"] == "run"
    assert r["mining_ratio"] == pytest.approx(r["mining_tokens_per_s"] / r["bare_tokens_per_s"])
    assert len(r["round_ratios"]["mining"]) == 2


def test_interleaved_takes_turns_batch_by_batch(monkeypatch):
    """Each variant's next batch only after the others' same batch, the order reversed every other batch; each
    variant's time is the sum of its own steps only, and its result is what its run returned."""
    from types import SimpleNamespace

    from mining import bench

    events, clock = [], [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def stepper(name, cost, steps):
        def run(shards):
            for i in range(steps):
                events.append((name, i))
                clock[0] += cost
                yield
            return f"{name} over {shards}"
        return run

    work = SimpleNamespace(shards="the slice", loaded=SimpleNamespace(device=SimpleNamespace(type="cpu")))
    out = bench.interleaved({"forward": stepper("forward", 1.0, 3), "mining": stepper("mining", 1.5, 3)}, work)
    assert events == [("forward", 0), ("mining", 0), ("mining", 1), ("forward", 1), ("forward", 2), ("mining", 2)]
    assert out == {"forward": (3.0, "forward over the slice"), "mining": (4.5, "mining over the slice")}


def test_a_miner_in_steps_leaves_the_model_bare_between_them(tiny_job):
    """ShardMiner.steps: the bench runs other variants on the same model between a miner's batches, so no hook
    may stay registered across a pause, nor inference mode stay on; the steps give mine()'s result."""
    import torch

    from mining.engine import ShardMiner

    spec, loaded, shards = tiny_job
    reference = ShardMiner(spec, loaded).mine(shards[0])
    steps = ShardMiner(spec, loaded).steps(shards[0])
    paused = 0
    while True:
        try:
            next(steps)
        except StopIteration as end:
            result = end.value
            break
        paused += 1
        assert not torch.is_inference_mode_enabled()
        for module in loaded.model.modules():
            assert not module._forward_hooks and not module._forward_pre_hooks, module
    assert paused == -(-len(shards[0].ids) // spec.compute.fixed_batch_size)  # one pause a batch
    for name, st in result.stats.items():
        a, b = st.state_dict(), reference.stats[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert result.tokens.equals(reference.tokens)


def test_an_encoder_has_no_dla_to_measure(capsys, tmp_path, minilm_tokenizer):
    from mining.tiny import tiny_model

    tiny_model("bert", vocab_size=len(minilm_tokenizer), head=False).save_pretrained(tmp_path)
    minilm_tokenizer.save_pretrained(tmp_path)
    r = bench(capsys, tmp_path, "--parts", "forward,mining,dla")
    assert r["mining_ratio"] > 0 and r["dla_ratio"] is None and "dla_tokens_per_s" not in r
    assert "encoder" in r["skipped_variants"]["dla"] and r["config"]["causal"] is False
    assert main(["bench", "--model", str(tmp_path), "--tokens", "300", "--context-length", "64", "--batch-size", "4",
                 "--repeats", "1", "--parts", "forward,mining,dla"]) == 0
    out = capsys.readouterr().out
    assert "an encoder: no LM head" in out and "direct logit attribution: skipped: " in out


def test_other_parts(capsys, tiny_llama, tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the run's scratch folder goes
    r = bench(capsys, tiny_llama, "--parts", "tokens,dense,patterns,sae,alternatives,bytes")
    assert not list(temp.iterdir()), "the run's scratch folder (its SAEs, caches, stores) outlived it"
    assert r["bare_tokens_per_s"] > 0  # the baseline runs whenever a throughput variant does
    assert r["token_table_ratio"] > 0 and r["dense_ratio"] > 0 and r["patterns_ratio"] > 0 and r["sae_ratio"] > 0
    from mining.bench import SAE_EXPANSION, BenchConfig, bench_job, bench_saes
    from mining.sae import load_saes
    from mining.spec import spec_from_dict

    cfg = BenchConfig(model=str(tiny_llama))
    hooks = {v: bench_job(cfg, v, sae_folder=str(tmp_path))["hooks"] for v in ("mining", "patterns", "sae")}
    assert hooks == {"mining": ["blocks.*.mlp.hook_post"],  # each variant's extra work
                     "patterns": ["blocks.*.mlp.hook_post", "blocks.*.attn.hook_pattern"],
                     "sae": ["blocks.*.mlp.hook_post", "blocks.*.hook_resid_post.hook_sae_acts_post"]}
    saes = load_saes(spec_from_dict(bench_job(cfg, "sae", sae_folder=str(tmp_path))).saes)
    assert sorted(saes) == [f"blocks.{layer}.hook_resid_post" for layer in range(len(bench_saes(cfg.model, tmp_path)))]
    assert {(s.kind, s.d_in, s.d_sae) for s in saes.values()} == {("topk", 32, SAE_EXPANSION * 32)}
    alt = r["alternatives"]
    cache = alt["cache_to_disk"]
    assert cache["tokens_per_s"] > 0 and cache["cache_bytes"] >= 300 * 128 * 2  # float16 per neuron and token
    assert cache["capture_s"] > 0 and cache["reduce_s"] > 0
    for module, name in (("nnsight", "nnsight_to_disk"), ("transformer_lens", "transformer_lens")):
        if importlib.util.find_spec(module) is None:  # the `alternatives` extra: reported, never a failure
            assert "not installed" in alt[name]["skipped"]
        else:
            assert alt[name]["tokens_per_s"] > 0 and alt[name]["cache_bytes"] >= 300 * 128 * 2, alt[name]
    s = r["store"]
    assert s["tokens"] == 300 and s["bytes_by_kind"]["tokens"] > 0 and s["bytes_by_kind"]["neuron_tables"] > 0
    assert s["dense_fp16_bytes_per_token"] == 256
    assert s["extrapolated_1m_bytes"] > s["bytes"]
    assert s["bytes_by_kind"]["states"] > 0 and s["bytes_by_kind"]["shard_markers"] > 0  # one merged file + markers
    per_shard = s["per_shard"]  # the per-shard overheads the scaling section of BENCHMARKS.md rests on
    assert per_shard["write_s"] > 0 and per_shard["fold_s"] > 0
    rates = per_shard["fold_keeps_up_tokens_per_s"]
    assert rates["1048576"] == pytest.approx(16 * rates["65536"])


def test_memory(capsys, tiny_llama):
    r = bench(capsys, tiny_llama, "--parts", "memory", "--memory-tokens", "64")
    assert "config" not in r  # nothing loaded in this process: each size is mined in a fresh one
    m = r["memory"]
    assert [run["tokens"] for run in m["runs"]] == [64, 640, 64, 640]  # two fresh processes a size, alternating
    assert m["peak_mb"] == [max(r["peak_mb"] for r in m["runs"][i::2]) for i in (0, 1)]
    assert all(run["peak_mb"] > run["rss_after_load_mb"] > 0 for run in m["runs"])


def test_batch_size_auto(capsys, tiny_llama):
    """`--batch-size auto` resolves as compute.batch_size: auto does (on CPUs, 2,048 tokens a batch), and the
    memory part's children mine with that number."""
    r = bench(capsys, tiny_llama, "--parts", "mining,memory", "--batch-size", "auto", "--tokens", "4000",
              "--memory-repeats", "1")
    c = r["config"]
    assert c["batch_size"] == 2048 // 64 and c["batch_fit"]["device"] == "cpu" and c["batch_fit"]["shard_contexts"] > 32
    assert r["mining_ratio"] > 0
    assert [run["tokens"] for run in r["memory"]["runs"]] == [2 * 32 * 63, 20 * 32 * 63]


def test_readable_report(capsys, tiny_llama):
    code = main(["bench", "--model", str(tiny_llama), "--tokens", "100", "--context-length", "64", "--repeats", "1",
                 "--parts", "mining"])
    out = capsys.readouterr().out
    assert code == 0
    assert "bare forward" in out and "mining: top/bottom-k" in out and "ratio" in out


def test_duckdb_latency(tmp_path):
    from mining.bench_store import duckdb_latency

    d = duckdb_latency(tmp_path / "synth", 100_000, repeats=2, n_layers=2, n_neurons=64, k=8)
    assert d["token_rows"] == 100_000 and not d["reused"]
    assert set(d["queries"]) == {"top-activations", "quantiles", "neuron-summary"}
    for name, q in d["queries"].items():
        assert q["median_ms"] > 0 and q["runs"] == 2 and q["rows"] > 0, name
    assert d["queries"]["top-activations"]["rows"] == 8  # k = 8 kept, 10 asked
    assert duckdb_latency(tmp_path / "synth", 100_000, repeats=1, n_layers=2, n_neurons=64, k=8)["reused"]


def test_synthetic_store_refuses_foreign_directory(tmp_path):
    from mining.bench_store import synthetic_store
    from mining.errors import UserError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a synthetic bench store"):
        synthetic_store(tmp_path, 1000, 1, 4, 2)
    assert (tmp_path / "notes.txt").exists()


@pytest.mark.parametrize("args, message", [
    (["--tokens", "0"], "error: --tokens: must be positive, got 0"),
    (["--parts", "forward,warp"], "error: --parts: unknown part 'warp'"),
    (["--batch-size", "-1"], "error: --batch-size: must be positive"),
    (["--batch-size", "0"], "error: --batch-size: must be positive or auto, got 0"),
])
def test_bad_input(capsys, args, message):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_machine_names_the_gpu_reducers(monkeypatch):
    """On a GPU the report says which path the reducers took: the CUDA kernel, or the torch ops (no nvcc, a failed
    build or first-use check, MINING_CUDA_LAYER=0), so a figure is never read as the kernel's by mistake; and how the
    kernel sums the moments' powers (float32 pairs on GPUs with slow float64)."""
    from types import SimpleNamespace

    import torch

    from mining.bench import BenchConfig, machine
    from mining.reducers import cuda_layer

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "A GPU")
    work = SimpleNamespace(loaded=SimpleNamespace(device=torch.device("cuda", 0)))
    cases = ((object(), None, False, "cuda kernel, float64 sums"),
             (object(), None, True, "cuda kernel, float32-pair sums"),
             (None, None, False, "torch ops"), (object(), "0", False, "torch ops"))
    for lib, env, pairs, said in cases:
        monkeypatch.setattr(cuda_layer, "library", lambda dev=None, lib=lib: lib)
        monkeypatch.setattr(cuda_layer, "float_pairs", lambda dev, pairs=pairs: pairs)
        if env is None:
            monkeypatch.delenv("MINING_CUDA_LAYER", raising=False)
        else:
            monkeypatch.setenv("MINING_CUDA_LAYER", env)
        info = machine(work, BenchConfig())
        assert info["gpu"] == "A GPU" and info["gpu_reducers"] == said


def test_the_host_overhead_script_runs():
    """scripts/host_overhead.py (the GPU path's host work, measured on the CPU with a no-op library) at a tiny size:
    its stand-in library must keep answering what layer_pass asks (session 16 added questions it did not answer)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "host_overhead.py"
    done = subprocess.run([sys.executable, str(script), "--layers", "2", "--width", "64", "--batches", "3",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "over the bare forward: mining +" in done.stdout and ", dla +" in done.stdout
    assert "outside the forward passes" in done.stdout


def test_the_kernel_variants_script_runs(tmp_path):
    """scripts/kernel_variants.py at a tiny size; a variant is compiled under its own path, so numba's cache never
    hands its machine code to the real layer_kernel (the cache keys a function by its file and its own bytecode)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    import mining.reducers.layer_kernel as layer_kernel

    script = Path(__file__).resolve().parents[1] / "scripts" / "kernel_variants.py"
    done = subprocess.run([sys.executable, str(script), "--rounds", "2", "--layers", "2", "--shape", "2", "16", "64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "as is: best" in done.stdout and "(1.000 of as is)" in done.stdout
    spec = importlib.util.spec_from_file_location("kernel_variants", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    copy = tmp_path / "copy.py"
    copy.write_text(Path(layer_kernel.__file__).read_text())
    variant = module.load_variant("copy", str(copy))
    assert variant._layer.py_func.__code__.co_filename == str(copy.resolve())
    assert callable(variant.layer_update)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_flops_per_token_counts_the_matmuls_text_runs_through(arch):
    """2 FLOPs a weight of each block's matrices and of the LM head, by name from the modules; not the token or
    position embeddings (lookups) nor Gemma 3's vision tower (idle on text); plus causal attention's 2 x 2 x d x T/2
    per layer."""
    from mining.bench import flops_per_token
    from mining.tiny import tiny_model

    model = tiny_model(arch)
    decoder = {"gpt2": "transformer.h", "llama": "model.layers", "gemma3": "model.language_model.layers"}[arch]
    blocks = [p for name, p in model.named_parameters() if name.startswith(decoder + ".") and p.ndim == 2]
    cfg = model.config.get_text_config()
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    matmuls = sum(p.numel() for p in blocks) + cfg.vocab_size * cfg.hidden_size  # the blocks' and the LM head's
    want = 2 * matmuls + 2 * cfg.num_hidden_layers * d_attn * 64
    assert flops_per_token(model, 64) == want
    if arch == "gemma3":
        assert sum(p.numel() for n, p in model.named_parameters() if "vision" in n) > 0
