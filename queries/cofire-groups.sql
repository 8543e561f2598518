-- name: cofire-groups
-- purpose: groups of neurons joined by co-firing pairs at or above the Jaccard threshold (`mine analyze STORE cofire`)
-- param: hook = mlp.hook_post
-- param: layer = -1
-- param: min_size = 2
-- param: limit = 20
-- requires: cofire_groups
-- A group is a connected component of the graph whose edges are the pairs with jaccard >= the
-- --threshold given to `mine analyze cofire`; group 1 is the largest of its layer.
SELECT
    layer,
    "group",
    any_value(size) AS size,
    list(neuron ORDER BY neuron) AS neurons
FROM cofire_groups
WHERE hook = $hook AND ($layer < 0 OR layer = $layer) AND size >= $min_size
GROUP BY layer, "group"
ORDER BY size DESC, layer, "group"
LIMIT $limit;
