-- name: top-neurons
-- purpose: neurons ranked by one metric of the neurons table (by: mean, std, skew, kurtosis, frac_active, min, max, abs_max), for exports and the viewer's index
-- param: hook = mlp.hook_post
-- param: layer = -1
-- param: by = kurtosis
-- param: order = desc
-- param: limit = 100
-- param: min_frac_active = 0
-- layer = -1: every layer; order: desc (highest first) or asc; limit = -1: all.
SELECT
    row_number() OVER (ORDER BY
        CASE WHEN $order = 'asc' THEN score END ASC NULLS LAST,
        CASE WHEN $order = 'desc' THEN score END DESC NULLS LAST,
        layer, neuron) AS rank,
    *
FROM (
    SELECT
        CASE $by
            WHEN 'mean' THEN mean
            WHEN 'std' THEN std
            WHEN 'skew' THEN skew
            WHEN 'kurtosis' THEN kurtosis
            WHEN 'frac_active' THEN frac_active
            WHEN 'min' THEN min
            WHEN 'max' THEN max
            WHEN 'abs_max' THEN greatest(abs(min), abs(max))
            ELSE error('by must be one of mean, std, skew, kurtosis, frac_active, min, max, abs_max; got ' || $by)
        END AS score,
        neurons.*
    FROM neurons
    CROSS JOIN (SELECT CASE WHEN $order IN ('asc', 'desc') THEN true
                            ELSE error('order must be asc or desc, got ' || $order) END AS valid_order)
    WHERE valid_order AND hook = $hook AND ($layer < 0 OR layer = $layer) AND frac_active >= $min_frac_active
)
ORDER BY rank
LIMIT (CASE WHEN $limit < 0 THEN NULL ELSE $limit END);
