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
SELECT
    t.tok,
    t.pos,
    t.token,
    x.logprob_a,
    x.logprob_b,
    x.diff,
    t.gap
FROM doc_token_rows($doc) AS t
LEFT JOIN token_diff AS x ON t.predicted AND x.tok = t.tok - 1
WHERE t.tok >= $first AND ($last < 0 OR t.tok <= $last)
ORDER BY t.tok
LIMIT $limit;
