-- name: token-gains
-- purpose: diff stores: tokens where model B predicts the actual next token much better (or worse) than A
-- param: direction = gains
-- param: k = 20
-- requires: token_diff
-- diff = logprob_b - logprob_a of the actual next token (nats); gains: B better, losses: B worse.
-- `next` is the token being predicted, `context` the text around the predicting «token».
WITH d AS (
    SELECT tok, diff, logprob_a, logprob_b
    FROM token_diff
    WHERE diff IS NOT NULL
    ORDER BY CASE WHEN $direction = 'losses' THEN diff ELSE -diff END, tok
    LIMIT $k
)

SELECT
    d.tok,
    d.diff,
    d.logprob_a,
    d.logprob_b,
    c.doc_id,
    c.token,
    n.token AS next,
    c.context
FROM d
LEFT JOIN tok_contexts((SELECT list(tok) FROM d), 12) AS c ON c.tok = d.tok
LEFT JOIN tokens AS n ON n.tok = d.tok + 1 AND n.doc_id = c.doc_id
ORDER BY CASE WHEN $direction = 'losses' THEN d.diff ELSE -d.diff END, d.tok;
