"""`mine demo`, the README's first command, as a user runs it: a process that mines SmolLM2 on an embedded Ray
cluster and prints answers the store backs; run again, it answers from the store; with another spec, it mines
again. Smaller than jobs/demo.yaml (--set) so that it fits the suite."""

import os
import re
import subprocess
import sys

import pytest

from mining.demo import tail
from mining.query import connect, run_named
from synthetic_store import make_synthetic_store

SMALL = ["--set", "corpus.max_tokens=1024", "--set", "compute.actors=1", "--set", "compute.cpus_per_actor=2"]


def demo(store, *extra: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "mining.cli", "demo", "--store", str(store), *SMALL, *extra],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out


def sections(stdout: str) -> dict[str, str]:
    """Each `== title` section's printed table."""
    parts = re.split(r"^== (.*)$", stdout, flags=re.M)
    return {title: body.strip() for title, body in zip(parts[1::2], parts[2::2])}


def printed_values(table: str) -> list[float]:
    """The value column (the second) of a printed rank table."""
    return [float(line.split()[1]) for line in table.splitlines()[2:] if re.match(r"\s*\d+\s", line)]


def test_a_heavy_tail_is_shown_on_its_side(tmp_path, capsys):
    con = connect(make_synthetic_store(tmp_path, n_tokens=3000, k=5))
    rows = con.execute("SELECT layer, neuron, skew FROM neurons WHERE hook = 'mlp.hook_post' AND skew IS NOT NULL "
                       "ORDER BY skew").fetchall()
    for layer, neuron, skew in (rows[0], rows[-1]):
        tail(con, {"layer": layer, "neuron": neuron, "skew": skew})
        title, table = next(iter(sections(capsys.readouterr().out).items()))
        named = "bottom-activations" if skew < 0 else "top-activations"
        assert title.startswith("Lowest activations" if skew < 0 else "Top contexts"), title
        want = run_named(con, named, {"layer": str(layer), "neuron": str(neuron), "k": "5"}).column("value")
        assert printed_values(table) == pytest.approx(want.to_pylist(), rel=1e-5)
    assert rows[0][2] < 0 < rows[-1][2]
    con.close()


@pytest.mark.slow
@pytest.mark.ray
def test_demo_mines_prints_answers_the_store_backs_and_reuses_the_store(tmp_path):
    store = tmp_path / "demo"
    first = demo(store)
    assert "mined 1,024 tokens of builtin:python-docs with smollm2-135m" in first.stdout
    got = sections(first.stdout)
    con = connect(store)
    heavy = run_named(con, "heavy-tailed", {"limit": "2", "min_frac_active": "0.001"}).to_pylist()
    assert len(heavy) == 2
    table = got["Heavy-tailed neurons (highest excess kurtosis): rare, strong features"]
    for row in heavy:  # the printed ranking is the store's, and each neuron is shown on the side of its tail
        assert re.search(rf"^mlp\.hook_post\s+{row['layer']}\s+{row['neuron']}\s", table, re.M), table
        layer, neuron = row["layer"], row["neuron"]
        if row["skew"] < 0:
            title = next(t for t in got if t.startswith(f"Lowest activations of layer {layer} neuron {neuron},"))
            want = run_named(con, "bottom-activations", {"layer": str(layer), "neuron": str(neuron), "k": "5"})
        else:
            title = f"Top contexts of layer {layer} neuron {neuron} (the activating token is «marked»)"
            want = run_named(con, "top-activations", {"layer": str(layer), "neuron": str(neuron), "k": "5"})
        values = printed_values(got[title])
        assert values == pytest.approx(want.column("value").to_pylist(), rel=1e-5) and len(values) == 5
        assert "«" in got[title]
        quantiles = got[f"Quantiles of layer {layer} neuron {neuron}"]
        assert quantiles.splitlines()[-1].startswith("(12 rows)")
    poly = run_named(con, "polysemanticity", {"limit": "5"}).to_pylist()
    table = got["Polysemantic neurons: their top contexts peak on unrelated tokens (coherence near 0)"]
    assert [tuple(map(int, line.split()[1:3])) for line in table.splitlines()[2:7]] == \
        [(r["layer"], r["neuron"]) for r in poly]
    title = f"Top contexts of layer {poly[0]['layer']} neuron {poly[0]['neuron']}, the least coherent"
    contexts = next(body for t, body in got.items() if t.startswith(title))
    want = run_named(con, "top-contexts", {"layer": str(poly[0]["layer"]), "neuron": str(poly[0]["neuron"]), "k": "5"})
    assert printed_values(contexts) == pytest.approx(want.column("value").to_pylist(), rel=1e-5)
    docs = got["Documents the model finds hardest (mean loss, nats a token; mine serve shows each token's)"]
    want = run_named(con, "documents", {"limit": "5"}).to_pylist()
    assert [int(line.split()[0]) for line in docs.splitlines()[2:2 + len(want)]] == [r["doc_id"] for r in want]
    mean_loss = {r[0]: r[1] for r in con.execute("SELECT doc_id, -avg(logprob) FROM tokens WHERE NOT isnan(logprob) "
                                                 "GROUP BY 1").fetchall()}
    assert [r["mean_loss"] for r in want] == pytest.approx(sorted(mean_loss.values(), reverse=True)[:len(want)])
    helpful = got["Neurons that most raise the logit of the actual next token (mean direct logit attribution)"]
    best = run_named(con, "dla-neurons", {"limit": "1"}).to_pylist()[0]
    assert re.search(rf"^\s*{best['layer']}\s+{best['neuron']}\s", helpful.splitlines()[2]), helpful
    assert f"Where layer {best['layer']} neuron {best['neuron']} helps most (next token shown)" in got
    con.close()

    again = demo(store)
    assert "is already mined (use --fresh to mine again); answering from it" in again.stdout
    assert "mined 1,024 tokens" not in again.stdout
    assert sections(again.stdout) == got

    changed = demo(store, "--set", "stats.top_k=8")
    assert "was mined with a different stats" in changed.stdout
    assert "mined 1,024 tokens" in changed.stdout
    con = connect(store)
    assert con.execute("SELECT max(rank) FROM top_examples").fetchone()[0] == 8
    con.close()
