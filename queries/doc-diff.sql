-- name: doc-diff
-- purpose: diff stores: per document, mean log-prob of A and B and how much B gains, best documents first
-- param: limit = 20
-- requires: token_diff, docs
SELECT
    t.doc_id,
    d.path,
    count(*) AS tokens,
    avg(x.logprob_a) AS mean_logprob_a,
    avg(x.logprob_b) AS mean_logprob_b,
    avg(x.diff) AS mean_gain,
    sum(x.diff) AS total_gain
FROM token_diff AS x
INNER JOIN tokens AS t ON t.tok = x.tok
INNER JOIN docs AS d ON d.doc_id = t.doc_id
WHERE x.diff IS NOT NULL
GROUP BY t.doc_id, d.path
ORDER BY mean_gain DESC, t.doc_id
LIMIT $limit;
