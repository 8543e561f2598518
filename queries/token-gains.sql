-- name: token-gains
-- purpose: diff stores: tokens where model B predicts the actual next token much better (or worse) than A
-- param: direction = gains
-- param: k = 20
-- requires: token_diff
-- diff = logprob_b - logprob_a of the actual next token (nats); gains: B better, losses: B worse.
-- `next` is the token being predicted, `context` the text around the predicting «token».
SELECT
    d.tok,
    d.diff,
    d.logprob_a,
    d.logprob_b,
    t.doc_id,
    t.token,
    n.token AS next,
    tok_context(d.tok, 12) AS context
FROM token_diff AS d
INNER JOIN tokens AS t ON t.tok = d.tok
LEFT JOIN tokens AS n ON n.tok = d.tok + 1 AND n.doc_id = t.doc_id
WHERE d.diff IS NOT NULL
ORDER BY CASE WHEN $direction = 'losses' THEN d.diff ELSE -d.diff END, d.tok
LIMIT $k;
