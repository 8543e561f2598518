-- name: dla-examples
-- purpose: where one neuron pushes the actual next token up (sign=positive) or down (negative) hardest, with context
-- param: layer
-- param: neuron
-- param: hook = mlp.hook_post
-- param: sign = positive
-- param: k = 10
-- requires: dla_examples
WITH e AS (
    SELECT rank, dla, tok
    FROM dla_examples
    WHERE hook = $hook AND layer = $layer AND neuron = $neuron AND sign = $sign AND rank <= $k
)

SELECT
    e.rank,
    e.dla,
    e.tok,
    c.token,
    nxt.token AS next_token,
    c.context
FROM e
LEFT JOIN tok_contexts((SELECT list(tok) FROM e), 12) AS c ON c.tok = e.tok
LEFT JOIN tokens AS nxt ON nxt.tok = e.tok + 1 AND nxt.doc_id = c.doc_id
ORDER BY e.rank;
