-- name: pca-components
-- purpose: principal components of the dense sample (`mine analyze STORE pca`): variance explained and top-loading neurons
-- param: hook = mlp.hook_post
-- param: layer = -1
-- requires: pca_components, pca_loadings
-- Component 1 is the largest. top_neurons: the 5 largest |loadings| as neuron:loading; a
-- component's sign is fixed so that its largest |loading| is positive.
SELECT
    c.layer,
    c.component,
    c.explained_variance_ratio,
    sum(c.explained_variance_ratio) OVER (
        PARTITION BY c.hook, c.layer ORDER BY c.component
    ) AS cumulative,
    c.singular_value,
    c.n,
    (
        SELECT string_agg(l.neuron || ':' || printf('%+.3f', l.loading), ' ' ORDER BY l.rank)
        FROM pca_loadings AS l
        WHERE l.hook = c.hook AND l.layer = c.layer AND l.component = c.component AND l.rank <= 5
    ) AS top_neurons
FROM pca_components AS c
WHERE c.hook = $hook AND ($layer < 0 OR c.layer = $layer)
ORDER BY c.layer, c.component;
