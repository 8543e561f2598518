-- name: logit-lens
-- purpose: the tokens one MLP neuron's output direction boosts (or suppresses) most, read through the unembedding
-- param: layer
-- param: neuron
-- param: sign = boost
-- param: k = 10
-- requires: logit_lens
-- sign: boost (largest direct logit effect first), suppress (most negative first) or both.
-- weight: logit change per unit activation, before the final norm's per-token scale.
SELECT
    sign,
    rank,
    token_id,
    token,
    weight
FROM logit_lens
CROSS JOIN (SELECT CASE WHEN $sign IN ('boost', 'suppress', 'both') THEN true
                        ELSE error('sign must be boost, suppress or both, got ' || $sign) END AS valid_sign)
WHERE valid_sign AND layer = $layer AND neuron = $neuron AND rank <= $k
  AND (sign = $sign OR ($sign = 'both' AND sign IN ('boost', 'suppress')))
ORDER BY sign = 'suppress', rank;
