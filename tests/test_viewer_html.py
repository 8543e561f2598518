"""The viewer's HTML helpers: escaping of hostile token text, JSON inside script blocks, the CSP hash."""

import base64
import hashlib
import json
import re

from mining.cli import main
from mining.viewer.html import _asset, page, script_json, table, token_html, tokens_html


def test_token_text_is_escaped_and_invisible_characters_shown():
    assert token_html('<script>alert("x")</script>') == "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"
    assert token_html('"><img src=x onerror=alert(1)>') == "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"
    assert token_html("a&b'") == "a&amp;b&#x27;"
    for ch in ("\u202e", "\u2066", "\u200b", "\ufeff", "\x00", "\x1b", "\u2028"):
        out = token_html(f"x{ch}y")
        assert ch not in out and f"&lt;U+{ord(ch):04X}&gt;" in out
    assert token_html("caf\u00e9 \U0001f600") == "caf\u00e9 \U0001f600"  # ordinary Unicode stays as is
    assert "\u21b5" in token_html("\n") and "\u21e5" in token_html("\t")


def test_tokens_carry_values_and_mark_the_peak():
    out = tokens_html(["a", "<b>"], [0.5, -2.0], 2.0, peak=1)
    assert out.count('class="t"') == 1 and out.count('class="t pk"') == 1
    assert 'data-v="0.5"' in out and 'data-v="-2"' in out and "&lt;b&gt;" in out
    assert "rgba(255, 140, 0, 0.250)" in out and "rgba(31, 95, 191, 1.000)" in out


def test_script_json_cannot_close_its_script_block():
    text = script_json({"t": "</script><script>alert(1)</script>", "u": "\u2028<!--"})
    assert "<" not in text and ">" not in text and "\u2028" not in text
    assert json.loads(text) == {"t": "</script><script>alert(1)</script>", "u": "\u2028<!--"}


def test_table_cells_and_links_are_escaped():
    out = table([("token", "txt"), ("v", "num")], [["<i>", 1.5]], links={0: ['x" onclick="y']})
    assert "<i>" not in out and "&lt;i&gt;" in out and 'href="x&quot; onclick=&quot;y"' in out
    assert 'data-v="1.5"' in out


def test_the_only_script_is_the_viewers_and_the_csp_allows_exactly_it():
    html = page('t</title><script>', "<p>body</p>")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    assert scripts == [_asset("viewer.js")]
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in html and "default-src 'none'" in html
    assert "<title>t&lt;/title&gt;&lt;script&gt;</title>" in html


def test_cli_refusals(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "none")]) == 2
    assert "not a complete store" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--neuron", "x", "--out", str(tmp_path / "o")]) == 2
    assert "expected LAYER:NEURON" in capsys.readouterr().err
