-- name: dla-examples
-- purpose: where one neuron pushes the actual next token up (sign=positive) or down (negative) hardest, with context
-- param: layer
-- param: neuron
-- param: sign = positive
-- param: k = 10
-- requires: dla_examples
SELECT
    e.rank,
    e.dla,
    e.tok,
    t.token,
    nxt.token AS next_token,
    tok_context(e.tok, 12) AS context
FROM dla_examples AS e
LEFT JOIN tokens AS t ON t.tok = e.tok
LEFT JOIN tokens AS nxt ON nxt.tok = e.tok + 1 AND nxt.doc_id = t.doc_id
WHERE e.layer = $layer AND e.neuron = $neuron AND e.sign = $sign AND e.rank <= $k
ORDER BY e.rank;
