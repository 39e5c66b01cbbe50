"""Seed + pixel-embedding maps -> instances by sequential clustering (Neven et al. 2019, BayesNuSeg).

NumPy only (no SciPy / scikit-image), so the edge runtime can cluster too.

The model's maps (:mod:`kerasnuc.models.bayesnuseg`): seed (H, W) in [0, 1], offsets
(H, W, 2) (row, col) in [-1, 1] and sigma (H, W), both in units of ``offset_scale``
pixels. A pixel's embedding is ``(row, col) / offset_scale + offset``: where it says its
nucleus' centre is. Clustering: among the unclustered foreground pixels (seed >
``foreground_threshold``) take the one with the highest seed score; stop when it is below
``seed_threshold``; its embedding is a centre C with its sigma; the unclustered foreground
pixels whose Gaussian score ``exp(-||e - C||^2 / (2 sigma^2))`` exceeds ``score_threshold``
form one instance (kept when it has at least ``min_area`` pixels and more than
``min_unclustered`` of the proposal was still unclustered, as Neven et al.); every
proposed pixel is then clustered; repeat.

Speed: candidates are sorted by seed once (no argmax over the image per step), and a
score above the threshold needs ``||e - C|| < sigma * sqrt(2 ln(1 / score_threshold))``, so
each step only looks at the foreground pixels whose embeddings fall in the cells of
embedding space (``CELL`` pixels, bucketed once by sorting) that this disc meets. A 1000 x 1000
map with 1,296 nuclei took 0.39 s on the shared 2-core CPU (under load;
``tests/test_bayesnuseg.py::test_clustering_a_1000_pixel_tile_is_fast`` measures it).
"""

import math

import numpy as np

__all__ = ["instances_from_embeddings", "split_embedding_maps"]


def split_embedding_maps(maps, classes=None):
    """(seed (H, W) max over classes, offsets (H, W, 2) in [-1, 1], sigma (H, W)) of a model's
    (H, W, classes + 3) output (offsets stored as ``(tanh + 1) / 2``)."""
    maps = np.asarray(maps, np.float32)
    if maps.ndim != 3 or maps.shape[-1] < 4:
        raise ValueError(f"embedding maps must be (H, W, classes + 3) with classes >= 1, got shape {maps.shape}")
    classes = maps.shape[-1] - 3 if classes is None else int(classes)
    if classes + 3 != maps.shape[-1]:
        raise ValueError(f"embedding maps have {maps.shape[-1]} channels, not classes + 3 = {classes + 3}")
    seed = maps[..., :classes].max(axis=-1)
    return seed, maps[..., classes:classes + 2] * 2.0 - 1.0, maps[..., classes + 2]


def instances_from_embeddings(seed, offsets, sigma, seed_threshold=0.5, score_threshold=0.5, min_area=10,
                              foreground_threshold=0.5, offset_scale=64.0, min_unclustered=0.5):
    """(H, W) int32 instance labels (0 background, 1..N in order of decreasing seed score).

    ``seed`` (H, W); ``offsets`` (H, W, 2) (row, col) in embedding units; ``sigma`` (H, W),
    embedding units (see the module docstring).
    """
    seed = np.asarray(seed, np.float32)
    offsets = np.asarray(offsets, np.float32)
    sigma = np.asarray(sigma, np.float32)
    if seed.ndim != 2 or offsets.shape != seed.shape + (2,) or sigma.shape != seed.shape:
        raise ValueError(f"seed (H, W), offsets (H, W, 2) and sigma (H, W) needed, got {seed.shape}, "
                         f"{offsets.shape}, {sigma.shape}")
    if not 0.0 < score_threshold < 1.0:
        raise ValueError(f"score_threshold must be in (0, 1), got {score_threshold}")
    height, width = seed.shape
    labels = np.zeros(height * width, np.int32)
    pixels = np.flatnonzero(seed.ravel() > foreground_threshold)  # foreground, row-major
    if len(pixels) == 0:
        return labels.reshape(height, width)
    # embeddings in pixels (where each pixel says its centre is), bucketed in CELL-sized cells
    # of embedding space, so a step visits only the cells its Gaussian can reach
    rows, cols = np.divmod(pixels, width)
    emb_r = rows + offsets.reshape(-1, 2)[pixels, 0] * offset_scale
    emb_c = cols + offsets.reshape(-1, 2)[pixels, 1] * offset_scale
    cell_r = np.floor(emb_r / CELL).astype(np.int64)
    cell_c = np.floor(emb_c / CELL).astype(np.int64)
    low_r, low_c = int(cell_r.min()), int(cell_c.min())
    span = int(cell_c.max()) - low_c + 1
    keys = (cell_r - low_r) * span + (cell_c - low_c)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    scores = seed.ravel()[pixels]
    bandwidth = np.maximum(sigma.ravel()[pixels] * offset_scale, 1e-3)  # pixels
    unclustered = np.ones(len(pixels), bool)
    candidates = np.flatnonzero(scores >= seed_threshold)
    candidates = candidates[np.argsort(-scores[candidates], kind="stable")]
    reach = math.sqrt(2.0 * math.log(1.0 / score_threshold))  # score > threshold <=> distance < sigma * reach
    next_id = 1
    for index in candidates:
        if not unclustered[index]:
            continue
        centre_r, centre_c = emb_r[index], emb_c[index]
        radius = float(bandwidth[index]) * reach
        near = _near(centre_r, centre_c, radius, order, sorted_keys, low_r, low_c, span)
        distance = (emb_r[near] - centre_r) ** 2 + (emb_c[near] - centre_c) ** 2
        proposal = near[distance < radius * radius]
        if not (proposal == index).any():  # the centre pixel always belongs to its own proposal
            proposal = np.append(proposal, index)
        free = proposal[unclustered[proposal]]
        if len(free) >= max(int(min_area), 1) and len(free) > min_unclustered * len(proposal):
            labels[pixels[free]] = next_id
            next_id += 1
        unclustered[proposal] = False
    return labels.reshape(height, width)


CELL = 8.0
"""Side (pixels) of the embedding-space cells that each clustering step searches."""


def _near(centre_r, centre_c, radius, order, sorted_keys, low_r, low_c, span):
    """Indices (into the foreground pixels) of every pixel whose embedding cell meets the
    square of half-side ``radius`` around (centre_r, centre_c)."""
    first_r, last_r = int(math.floor((centre_r - radius) / CELL)), int(math.floor((centre_r + radius) / CELL))
    first_c = max(int(math.floor((centre_c - radius) / CELL)) - low_c, 0)
    last_c = min(int(math.floor((centre_c + radius) / CELL)) - low_c, span - 1)
    if last_c < first_c:
        return np.zeros(0, np.int64)
    parts = []
    for cell_row in range(max(first_r - low_r, 0), last_r - low_r + 1):
        start = np.searchsorted(sorted_keys, cell_row * span + first_c, side="left")
        stop = np.searchsorted(sorted_keys, cell_row * span + last_c, side="right")
        if stop > start:
            parts.append(order[start:stop])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
