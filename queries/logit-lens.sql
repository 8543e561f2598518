-- name: logit-lens
-- purpose: the tokens an MLP neuron's (or SAE latent's) output direction boosts or suppresses most, via the unembedding
-- param: layer
-- param: neuron
-- param: sign = boost
-- param: k = 10
-- param: hook = mlp.hook_post
-- requires: logit_lens
-- sign: boost (largest direct logit effect first), suppress (most negative first) or both.
-- weight: logit change per unit activation, before the final norm's per-token scale.
-- hook: mlp.hook_post, or an SAE's latents (e.g. hook_resid_post.hook_sae_acts_post).
SELECT
    sign,
    rank,
    token_id,
    token,
    weight
FROM logit_lens
CROSS JOIN (SELECT CASE WHEN $sign IN ('boost', 'suppress', 'both') THEN true
                        ELSE error('sign must be boost, suppress or both, got ' || $sign) END AS valid_sign)
WHERE valid_sign AND hook = $hook AND layer = $layer AND neuron = $neuron AND rank <= $k
  AND (sign = $sign OR ($sign = 'both' AND sign IN ('boost', 'suppress')))
ORDER BY sign = 'suppress', rank;
