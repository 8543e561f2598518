// The viewer's only script, inlined in every page under a hash-based Content-Security-Policy.
// It never writes HTML: tokens and labels are escaped by the page builder; this only sorts,
// filters, shows a tooltip and paints attention patterns from JSON data blocks.
"use strict";
(function () {
  function cellValue(td) {
    var v = td.getAttribute("data-v");
    if (v === null) return td.textContent.trim().toLowerCase();
    if (v === "") return null;
    var n = Number(v);
    return Number.isNaN(n) ? v.toLowerCase() : n;
  }

  function compare(a, b) {
    if (typeof a === "number" && typeof b === "number") return a - b;
    if (typeof a === "number") return -1;
    if (typeof b === "number") return 1;
    return a < b ? -1 : a > b ? 1 : 0;
  }

  // Sortable tables: click (or Enter on) a header; numbers start descending, text ascending.
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
    heads.forEach(function (th, col) {
      th.tabIndex = 0;
      function sort() {
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var numeric = th.getAttribute("data-type") === "num";
        var current = th.getAttribute("aria-sort");
        var ascending = current ? current === "descending" : !numeric;
        rows.sort(function (r1, r2) {
          var a = cellValue(r1.cells[col]), b = cellValue(r2.cells[col]);
          if (a === null || b === null) return (a === null) - (b === null);  // empty cells last
          return compare(a, b) * (ascending ? 1 : -1);
        });
        rows.forEach(function (r) { body.appendChild(r); });
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") sort(); });
    });
  });

  // Filters: words match the row's text; `metric>1.5`, `layer=3`, `frac_active<=0.01` compare a column.
  document.querySelectorAll("input.filter").forEach(function (input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    var count = document.getElementById(input.getAttribute("data-count"));
    var names = Array.prototype.map.call(table.tHead.rows[0].cells, function (th) {
      return (th.getAttribute("data-key") || th.textContent).trim().toLowerCase();
    });
    var ops = {
      ">": function (x, y) { return x > y; }, "<": function (x, y) { return x < y; },
      ">=": function (x, y) { return x >= y; }, "<=": function (x, y) { return x <= y; },
      "=": function (x, y) { return x === y; }, "!=": function (x, y) { return x !== y; }
    };
    function apply() {
      var conds = input.value.trim().toLowerCase().split(/\s+/).filter(Boolean).map(function (t) {
        var m = t.match(/^([a-z_0-9]+)(>=|<=|!=|>|<|=)(-?[0-9.]+(?:e[-+]?[0-9]+)?)$/);
        if (m && names.indexOf(m[1]) >= 0) return { col: names.indexOf(m[1]), op: ops[m[2]], v: Number(m[3]) };
        return { text: t };
      });
      var shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        var ok = conds.every(function (c) {
          if (c.text !== undefined) return row.textContent.toLowerCase().indexOf(c.text) >= 0;
          var x = row.cells[c.col].getAttribute("data-v");
          return x !== null && x !== "" && c.op(Number(x), c.v);
        });
        row.hidden = !ok;
        if (ok) shown += 1;
      });
      if (count) count.textContent = String(shown);
    }
    input.addEventListener("input", apply);
    apply();
  });

  // Token tooltip: the token and its activation.
  var tip = document.getElementById("tip");
  if (tip) {
    document.addEventListener("mouseover", function (e) {
      var t = e.target.closest ? e.target.closest(".t") : null;
      if (!t || t.getAttribute("data-v") === null) { tip.hidden = true; return; }
      tip.textContent = t.textContent + "  " + t.getAttribute("data-v");
      var r = t.getBoundingClientRect();
      tip.style.left = (window.scrollX + r.left) + "px";
      tip.style.top = (window.scrollY + r.bottom + 4) + "px";
      tip.hidden = false;
    });
  }

  // Attention patterns: a heat map (query rows, key columns) and the tokens coloured by the
  // attention the hovered query token pays them.
  document.querySelectorAll("figure.attn").forEach(function (fig) {
    var data = JSON.parse(fig.querySelector("script.attn-data").textContent);
    var n = data.pattern.length;
    var cell = Math.max(3, Math.floor(384 / Math.max(n, 1)));
    var canvas = fig.querySelector("canvas");
    canvas.width = n * cell;
    canvas.height = n * cell;
    var g = canvas.getContext("2d");
    for (var i = 0; i < n; i++) {
      for (var j = 0; j < n; j++) {
        g.fillStyle = "rgba(31, 95, 191, " + data.pattern[i][j] + ")";
        g.fillRect(j * cell, i * cell, cell, cell);
      }
    }
    var toks = fig.querySelectorAll(".q");
    var label = fig.querySelector(".focus");
    function focus(q) {
      Array.prototype.forEach.call(toks, function (t, k) {
        t.style.background = "rgba(31, 95, 191, " + data.pattern[q][k] + ")";
        t.setAttribute("data-v", data.pattern[q][k].toFixed(3));
        t.classList.toggle("sel", k === q);
      });
      if (label) label.textContent = "query token " + q + ": " + toks[q].textContent;
    }
    Array.prototype.forEach.call(toks, function (t, k) { t.addEventListener("mouseenter", function () { focus(k); }); });
    canvas.addEventListener("mousemove", function (e) {
      var q = Math.min(n - 1, Math.max(0, Math.floor(e.offsetY / cell)));
      focus(q);
    });
    focus(n - 1);
  });
})();
