-- Macros over the store's views, created by mining.query.connect() after the views.
-- A macro whose tables the store lacks (e.g. no histograms) is skipped.

-- Quantile q of every neuron of hook h (layer l, or every layer when l < 0), read from the
-- histograms. The rule mirrors the Python reducer exactly:
--   q <= 0 -> min; q >= 1 -> max; else rank r = greatest(1, ceil(q * count)) and the bin whose
--   cumulative count (in bin order) first reaches r; estimate = midpoint of the bin clamped to
--   [min, max]; the exact-zero bin (lo = hi = 0) gives 0.
-- value_firing: the same among firing tokens only (bins with lo >= 0, the zero bin excluded;
--   n = their count; q >= 1 -> max; NULL when the neuron never fires).
CREATE OR REPLACE MACRO neuron_quantiles(h, l, q) AS TABLE
WITH nr AS (
    SELECT hook, layer, neuron, count AS total, min AS vmin, max AS vmax
    FROM neurons
    WHERE hook = h AND (l < 0 OR layer = l)
),

bins AS (
    SELECT
        hb.hook,
        hb.layer,
        hb.neuron,
        hb.bin,
        nr.total,
        CASE
            WHEN hb.lo = 0 AND hb.hi = 0 THEN 0.0
            ELSE (greatest(hb.lo, nr.vmin) + least(hb.hi, nr.vmax)) / 2
        END AS est,
        hb.lo >= 0 AND NOT (hb.lo = 0 AND hb.hi = 0) AS firing,
        sum(hb.count) OVER (PARTITION BY hb.hook, hb.layer, hb.neuron ORDER BY hb.bin) AS cum,
        sum(CASE WHEN firing THEN hb.count ELSE 0 END)
            OVER (PARTITION BY hb.hook, hb.layer, hb.neuron ORDER BY hb.bin) AS cum_firing,
        sum(CASE WHEN firing THEN hb.count ELSE 0 END)
            OVER (PARTITION BY hb.hook, hb.layer, hb.neuron) AS n_firing
    FROM histograms AS hb
    INNER JOIN nr ON hb.hook = nr.hook AND hb.layer = nr.layer AND hb.neuron = nr.neuron
),

picked AS (
    SELECT
        hook,
        layer,
        neuron,
        max(n_firing) AS n_firing,
        arg_min(est, bin) FILTER (WHERE cum >= greatest(1, ceil(q::DOUBLE * total))) AS value,
        arg_min(est, bin) FILTER (
            WHERE firing AND cum_firing >= greatest(1, ceil(q::DOUBLE * n_firing))
        ) AS value_firing
    FROM bins
    GROUP BY hook, layer, neuron
)

SELECT
    nr.hook,
    nr.layer,
    nr.neuron,
    CASE WHEN q <= 0 THEN nr.vmin WHEN q >= 1 THEN nr.vmax ELSE p.value END AS value,
    CASE
        WHEN coalesce(p.n_firing, 0) = 0 THEN NULL
        WHEN q >= 1 THEN nr.vmax
        ELSE p.value_firing
    END AS value_firing
FROM nr
LEFT JOIN picked AS p ON nr.hook = p.hook AND nr.layer = p.layer AND nr.neuron = p.neuron;

-- Quantile q of neuron n in layer l of hook h (unconditional).
CREATE OR REPLACE MACRO neuron_quantile(h, l, n, q) AS (
    SELECT value FROM neuron_quantiles(h, l, q) WHERE neuron = n
);

-- Quantile q of neuron n among its firing (> 0) tokens; NULL when it never fires.
CREATE OR REPLACE MACRO neuron_quantile_firing(h, l, n, q) AS (
    SELECT value_firing FROM neuron_quantiles(h, l, q) WHERE neuron = n
);

-- v as a fraction of neuron n's maximum activation.
CREATE OR REPLACE MACRO neuron_frac_of_max(h, l, n, v) AS (
    SELECT v / nullif(max, 0) FROM neurons WHERE hook = h AND layer = l AND neuron = n
);

-- Text of the tokens within w positions of each global token t in the list toks, in t's context,
-- t marked «like this»; for each t its tok, doc_id, pos, token and context. Text between two tokens
-- that neither token's span covers (WordPiece's spaces and newlines: BERT's offsets leave them
-- out) comes from the document, read only where there is such a gap (never for byte-level BPE,
-- whose spans tile the text). One hash join against every window position lets DuckDB
-- push the positions into the Parquet scan as a dynamic IN filter (a few row groups read), where
-- tok_context per row costs a subquery and a scan each.
CREATE OR REPLACE MACRO tok_contexts(toks, w) AS TABLE
WITH win AS (
    SELECT peak, unnest(range(peak - w, peak + w + 1)) AS wtok
    FROM (SELECT DISTINCT unnest(toks) AS peak)
),

rows AS (
    SELECT win.peak, x.tok, x.ctx, x.pos, x.doc_id, x.token, x.char_start, x.char_end
    FROM win INNER JOIN tokens AS x ON x.tok = win.wtok
),

peaks AS (SELECT peak, ctx AS peak_ctx, doc_id, pos, token FROM rows WHERE tok = peak),

shown AS (
    SELECT rows.*, lag(rows.char_end) OVER (PARTITION BY rows.peak ORDER BY rows.pos) AS prev_end
    FROM rows INNER JOIN peaks ON peaks.peak = rows.peak AND rows.ctx = peaks.peak_ctx
),

gaps AS (
    SELECT g.peak, g.pos, substr(d.text, g.prev_end + 1, g.char_start - g.prev_end) AS gap
    FROM shown AS g INNER JOIN docs AS d ON d.doc_id = g.doc_id
    WHERE g.char_start > g.prev_end
)

SELECT
    peaks.peak AS tok,
    any_value(peaks.doc_id) AS doc_id,
    any_value(peaks.pos) AS pos,
    any_value(peaks.token) AS token,
    string_agg(coalesce(gaps.gap, '') || CASE WHEN shown.tok = shown.peak THEN '«' || shown.token || '»' ELSE shown.token END,
               '' ORDER BY shown.pos) AS context
FROM shown
INNER JOIN peaks ON peaks.peak = shown.peak
LEFT JOIN gaps ON gaps.peak = shown.peak AND gaps.pos = shown.pos
GROUP BY peaks.peak;

-- One token's context: tok_contexts for a single t (queries that show many rows call tok_contexts
-- once with all of them, one scan instead of a subquery per row).
CREATE OR REPLACE MACRO tok_context(t, w) AS (
    (SELECT context FROM tok_contexts([t], w))
);

-- Document d's tokens in order, each with the prediction of it: the row before it holds the log-prob and
-- entropy of the document's next token, so each token takes that row's (predicted: the row before is its
-- predecessor; else logprob and entropy are NULL, as for a document's first token, and so are NaN scores of a
-- model without them). gap: the document's text between the previous token's span and this one's (WordPiece
-- spans leave out spaces), so gap || token, row after row, reads as the document.
CREATE OR REPLACE MACRO doc_token_rows(d) AS TABLE
WITH t AS (
    SELECT
        tok,
        ctx,
        pos,
        token,
        char_start,
        lag(tok) OVER w = tok - 1 AS predicted,
        lag(logprob) OVER w AS lp,
        lag(entropy) OVER w AS ent,
        lag(char_end) OVER w AS prev_end
    FROM tokens
    WHERE doc_id = d
    WINDOW w AS (ORDER BY tok)
)

SELECT
    t.tok,
    t.ctx,
    t.pos,
    t.token,
    coalesce(t.predicted, false) AS predicted,
    CASE WHEN t.predicted AND NOT isnan(t.lp) THEN t.lp END AS logprob,
    CASE WHEN t.predicted AND NOT isnan(t.ent) THEN t.ent END AS entropy,
    CASE WHEN t.char_start > coalesce(t.prev_end, 0) THEN
        substr(x.text, coalesce(t.prev_end, 0) + 1, t.char_start - coalesce(t.prev_end, 0))
    ELSE '' END AS gap
FROM t
INNER JOIN docs AS x ON x.doc_id = d;
