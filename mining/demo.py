"""`mine demo`: mine jobs/demo.yaml (or reuse a complete store) and print a few real answers."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .query import connect, run_named, write_result
from .runner import run_job
from .spec import load_spec
from .store import Store, spec_difference


def bundled_job() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "jobs" / "demo.yaml", here / "jobs" / "demo.yaml"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("jobs/demo.yaml")


def run_demo(store: Path, job: str | None, fresh: bool, overrides: list[str]) -> int:
    spec = load_spec(job or bundled_job(), overrides)
    s = Store(store)
    changed = s.complete and spec_difference(yaml.safe_load((store / "job.yaml").read_text()), spec.to_dict())
    if changed and not fresh:
        print(f"{store} was mined with a different {changed}; mining it again for this demo spec\n")
        fresh = True
    if s.complete and not fresh:
        print(f"{store} is already mined (use --fresh to mine again); answering from it\n")
    else:
        resume = store.exists() and not fresh and (store / "job.yaml").exists()
        summary = run_job(spec, store, resume=resume, overwrite=fresh and store.exists())
        print(f"\nmined {summary.tokens:,} tokens of {spec.corpus.source} with {spec.model.id} "
              f"in {summary.seconds:.0f} s -> {store}\n")
    con = connect(store)
    firing = {"min_frac_active": "0.001"}  # neurons that do fire: their top contexts say something
    section("Heavy-tailed neurons (highest excess kurtosis): rare, strong features",
            run_named(con, "heavy-tailed", {"limit": "5", **firing}))
    heavy = run_named(con, "heavy-tailed", {"limit": "2", **firing}).to_pylist()
    for row in heavy:
        layer, neuron = row["layer"], row["neuron"]
        tail(con, row)
        section(f"Quantiles of layer {layer} neuron {neuron}",
                run_named(con, "quantiles", {"layer": str(layer), "neuron": str(neuron)}))
    if spec.stats.token_table:
        section("Documents the model finds hardest (mean loss, nats a token; mine serve shows each token's)",
                run_named(con, "documents", {"limit": "5"}))
    section("Dead and dense neurons", run_named(con, "dead-and-dense", {"limit": "5"}))
    if spec.stats.polysemanticity:
        poly = run_named(con, "polysemanticity", {"limit": "5"})
        section("Polysemantic neurons: their top contexts peak on unrelated tokens (coherence near 0)", poly)
        if poly.num_rows:
            layer, neuron = poly["layer"][0].as_py(), poly["neuron"][0].as_py()
            section(f"Top contexts of layer {layer} neuron {neuron}, the least coherent (compare the marked tokens)",
                    run_named(con, "top-contexts", {"layer": str(layer), "neuron": str(neuron), "k": "5"}))
    if spec.stats.dla:
        helpful = run_named(con, "dla-neurons", {"limit": "3"})
        section("Neurons that most raise the logit of the actual next token (mean direct logit attribution)", helpful)
        best = helpful.to_pylist()[0]
        section(f"Where layer {best['layer']} neuron {best['neuron']} helps most (next token shown)",
                run_named(con, "dla-examples", {"layer": str(best["layer"]), "neuron": str(best["neuron"]), "k": "5"}))
    print(f"Ask your own: mine query {store} \"SELECT ...\"   |   mine queries")
    print(f"Browse: mine export {store} --top 50 --format html --out {store}-viewer   |   mine serve {store}")
    diff_job = bundled_job().parent / "smollm2-vs-q4_0.yaml"
    if diff_job.exists():
        shown = os.path.relpath(diff_job) if diff_job.is_relative_to(Path.cwd()) else diff_job
        print(f"Diff it against its q4_0-quantized self: mine run {shown}   (then mine serve runs/smollm2-vs-q4_0)")
    return 0


def tail(con, row: dict) -> None:
    """A heavy-tailed neuron's rare, strong activations: its lowest where the tail is negative (skew < 0), else its
    top contexts. A SiLU-gated MLP's output is often heavy-tailed below zero, where its top contexts say little."""
    layer, neuron = row["layer"], row["neuron"]
    params = {"layer": str(layer), "neuron": str(neuron), "k": "5"}
    if row["skew"] is not None and row["skew"] < 0:
        section(f"Lowest activations of layer {layer} neuron {neuron}, where its tail is (skew {row['skew']:.1f}; "
                "the token is «marked»)", run_named(con, "bottom-activations", params))
    else:
        section(f"Top contexts of layer {layer} neuron {neuron} (the activating token is «marked»)",
                run_named(con, "top-activations", params))


def section(title: str, table) -> None:
    print(f"== {title}")
    write_result(table, "table")
    print()
