-- name: documents
-- purpose: the store's documents with their mined tokens and the model's mean loss over them (nats a token), hardest first
-- param: order = loss
-- param: limit = 100
-- requires: tokens, docs
-- order: loss (highest mean loss first) or doc_id. mean_loss averages -logprob over the document's rows that
-- predicted a next token of it; max_surprise is the largest of them.
SELECT
    t.doc_id,
    d.path,
    count(*) AS tokens,
    -avg(t.logprob) FILTER (WHERE NOT isnan(t.logprob)) AS mean_loss,
    -min(t.logprob) FILTER (WHERE NOT isnan(t.logprob)) AS max_surprise
FROM tokens AS t
INNER JOIN docs AS d ON d.doc_id = t.doc_id
GROUP BY t.doc_id, d.path
ORDER BY
    CASE
        WHEN $order = 'loss' THEN -mean_loss
        WHEN $order = 'doc_id' THEN t.doc_id
        ELSE error('order must be loss or doc_id; got ' || $order)
    END NULLS LAST,
    t.doc_id
LIMIT $limit;
