-- name: document
-- purpose: one document's tokens in order, each with the model's log-prob of it given the text before it and that prediction's entropy
-- param: doc
-- param: first = 0
-- param: last = -1
-- requires: tokens, docs
-- first/last: the global token indices (tok) to return, inclusive; last = -1: to the document's end.
-- logprob is NULL for a document's first token (nothing predicted it); surprise is -logprob in nats.
-- gap is the document's text before the token that no token's span covers: gap || token reads as the
-- document (see the macro doc_token_rows).
SELECT
    tok,
    ctx,
    pos,
    token,
    logprob,
    -logprob AS surprise,
    entropy,
    gap
FROM doc_token_rows($doc)
WHERE tok >= $first AND ($last < 0 OR tok <= $last)
ORDER BY tok;
