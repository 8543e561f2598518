-- name: doc-tokens
-- purpose: diff stores: one document's tokens, each with how well A and B predicted it (log-probs, B - A)
-- param: doc
-- param: first = 0
-- param: last = -1
-- param: limit = 100000
-- requires: token_diff, docs
-- logprob_a/logprob_b are of this token given the text before it (the row before it in the document
-- predicted it; NULL for a document's first token). gap is the document's text between the previous
-- token's span and this one's (WordPiece spans leave out spaces); text = gap || token reads as the document.
-- first/last: the global token indices (tok) to return, inclusive; last = -1: to the document's end.
WITH t AS (
    SELECT
        tok,
        pos,
        token,
        char_start,
        char_end,
        lag(tok) OVER w = tok - 1 AS predicted,
        lag(logprob) OVER w AS la,
        lag(logprob_b) OVER w AS lb,
        lag(char_end) OVER w AS prev_end
    FROM tokens
    WHERE doc_id = $doc
    WINDOW w AS (ORDER BY tok)
)

SELECT
    t.tok,
    t.pos,
    t.token,
    CASE WHEN t.predicted THEN t.la END AS logprob_a,
    CASE WHEN t.predicted THEN t.lb END AS logprob_b,
    CASE WHEN t.predicted THEN t.lb - t.la END AS diff,
    CASE WHEN t.char_start > coalesce(t.prev_end, 0) THEN
        substr(d.text, coalesce(t.prev_end, 0) + 1, t.char_start - coalesce(t.prev_end, 0))
    ELSE '' END AS gap
FROM t
INNER JOIN docs AS d ON d.doc_id = $doc
WHERE t.tok >= $first AND ($last < 0 OR t.tok <= $last)
ORDER BY t.tok
LIMIT $limit;
