-- name: regex-neurons
-- purpose: neurons most correlated with a regex over the dense sample (`mine analyze STORE regex PATTERN`); sign=negative: anti-correlated
-- param: pattern =
-- param: hook = mlp.hook_post
-- param: layer = -1
-- param: sign = positive
-- param: limit = 20
-- requires: regex_neurons, top_examples
-- pattern is the label given with --name (the regex itself by default); empty: every pattern,
-- `limit` each. corr: Pearson correlation over the sampled tokens of the neuron's value with
-- "the token overlaps a match"; top_tokens: the neuron's top activations over the whole corpus.
WITH ranked AS (
    SELECT
        *,
        row_number() OVER (
            PARTITION BY pattern
            ORDER BY CASE WHEN $sign = 'negative' THEN corr ELSE -corr END, layer, neuron
        ) AS rank
    FROM regex_neurons
    WHERE
        (CAST($pattern AS VARCHAR) = '' OR pattern = CAST($pattern AS VARCHAR))
        AND hook = $hook
        AND ($layer < 0 OR layer = $layer)
        AND corr IS NOT NULL
)

SELECT
    r.pattern,
    r.rank,
    r.layer,
    r.neuron,
    r.corr,
    r.mean_match,
    r.mean_other,
    r.matches,
    r.n,
    (
        SELECT string_agg(t.token, ' | ' ORDER BY e.rank)
        FROM top_examples AS e
        INNER JOIN tokens AS t ON e.tok = t.tok
        WHERE e.hook = r.hook AND e.layer = r.layer AND e.neuron = r.neuron AND e.rank <= 5
    ) AS top_tokens
FROM ranked AS r
WHERE r.rank <= $limit
ORDER BY r.pattern, r.rank;
