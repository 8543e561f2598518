-- name: document
-- purpose: one document's tokens in order, each with the model's log-prob of it given the text before it and that prediction's entropy
-- param: doc
-- param: first = 0
-- param: last = -1
-- requires: tokens, docs
-- first/last: the global token indices (tok) to return, inclusive; last = -1: to the document's end.
-- A token row's own logprob is of the document's next token, so each token takes the row before it
-- (NULL for a document's first token, and where the row before it is not its predecessor). surprise is
-- -logprob in nats. gap is the document's text between the previous token's span and this one's
-- (WordPiece spans leave out spaces): gap || token, row after row, reads as the document.
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
    WHERE doc_id = $doc
    WINDOW w AS (ORDER BY tok)
)

SELECT
    t.tok,
    t.ctx,
    t.pos,
    t.token,
    CASE WHEN t.predicted AND NOT isnan(t.lp) THEN t.lp END AS logprob,
    CASE WHEN t.predicted AND NOT isnan(t.lp) THEN -t.lp END AS surprise,
    CASE WHEN t.predicted AND NOT isnan(t.ent) THEN t.ent END AS entropy,
    CASE WHEN t.char_start > coalesce(t.prev_end, 0) THEN
        substr(d.text, coalesce(t.prev_end, 0) + 1, t.char_start - coalesce(t.prev_end, 0))
    ELSE '' END AS gap
FROM t
INNER JOIN docs AS d ON d.doc_id = $doc
WHERE t.tok >= $first AND ($last < 0 OR t.tok <= $last)
ORDER BY t.tok;
