-- name: dla-diff
-- purpose: diff stores: neurons, SAE latents or heads whose mean direct logit attribution changed most from A to B
-- param: what = neuron
-- param: hook = mlp.hook_post
-- param: limit = 20
-- requires: dla_diff, head_dla_diff
-- diff = mean DLA in B - mean DLA in A (to the actual next token, final-norm scale of each model);
-- ranked by |diff|. what = neuron (the features of `hook`: MLP neurons, or an SAE's latents such as
-- hook_resid_post.hook_sae_acts_post) | head.
SELECT * FROM (
    SELECT 'neuron' AS what, layer, neuron AS unit, mean_dla_a, mean_dla_b, diff FROM dla_diff WHERE hook = $hook
    UNION ALL
    SELECT 'head', layer, head, mean_dla_a, mean_dla_b, diff FROM head_dla_diff
)
WHERE what = $what
ORDER BY abs(diff) DESC NULLS LAST, layer, unit
LIMIT $limit;
