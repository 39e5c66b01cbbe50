"""Test-time augmentation ("multiple inference"): the 8 dihedral views of an image.

Why: nuclei have no preferred orientation, so averaging a model's predictions over flips
and 90-degree rotations (after undoing each) removes orientation-dependent errors for the
price of 8 forward passes; for instance outputs, :func:`merge_instances_by_vote` keeps
nuclei that most views agree on (Jung et al., Mask R-CNN nuclei, "multiple inference").
"""

import numpy as np

__all__ = ["DIHEDRAL", "dihedral_transform", "inverse_dihedral", "predict_tta", "merge_instances_by_vote"]

from kerasnuc.predict.tiling import DIHEDRAL, _check_k, dihedral_transform, inverse_dihedral  # noqa: F401
from kerasnuc.predict.tiling import transform_indices as _transform_indices


def predict_tta(predict_fn, image, transforms=8):
    """Mean of ``predict_fn`` over dihedral views, each mapped back: (H, W, K) float32.

    ``predict_fn``: (B, H, W, C) float batch -> (B, H, W, K) maps (NumPy or tensor).
    ``image``: (H, W, C) or (H, W). ``transforms``: how many of :data:`DIHEDRAL` (first
    n, 1..8) or a list of indices. Views of equal shape go through ``predict_fn`` as one
    batch: all 8 at once for a square image, two batches of 4 otherwise.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    indices = _transform_indices(transforms)
    groups = {}
    for k in indices:
        view = dihedral_transform(image, k)
        groups.setdefault(view.shape, []).append((k, view))
    total = None
    for members in groups.values():
        batch = np.stack([view for _, view in members]).astype(np.float32, copy=False)
        outputs = np.asarray(predict_fn(batch))
        if outputs.ndim != 4 or outputs.shape[0] != len(members):
            raise ValueError(
                f"predict_fn must return (B, H, W, K) with B={len(members)}, got {outputs.shape}")
        for (k, _), output in zip(members, outputs):
            restored = inverse_dihedral(output, k).astype(np.float64)
            total = restored if total is None else total + restored
    return (total / len(indices)).astype(np.float32)


def merge_instances_by_vote(label_images, iou_threshold=0.2, min_votes=None):
    """Consensus (H, W) int32 instances from n predictions of the same image.

    Nuclei are matched across predictions when their IoU exceeds ``iou_threshold``:
    pairs are joined greedily from the highest IoU, never putting two nuclei of one
    prediction in the same group. A group found by fewer than ``min_votes`` predictions
    (default a majority, n // 2 + 1) is dropped; otherwise it keeps the pixels that at
    least ``min_votes`` of its members cover. A pixel claimed by two groups goes to the
    group with more votes there. Overlaps come from pixel-id pairs (one ``np.unique`` per
    pair of predictions), not from comparing full masks. ``label_images``: n arrays
    (H, W) int, 0 background, already mapped back to the original orientation.
    """
    from skimage.segmentation import relabel_sequential

    labels = [np.asarray(image) for image in label_images]
    if not labels:
        raise ValueError("no label images to merge")
    shape = labels[0].shape
    if any(image.shape != shape or image.ndim != 2 for image in labels):
        raise ValueError(f"label images must all be 2-D with one shape, got {[i.shape for i in labels]}")
    n = len(labels)
    min_votes = n // 2 + 1 if min_votes is None else int(min_votes)
    if not 1 <= min_votes <= n:
        raise ValueError(f"min_votes must be in 1..{n}, got {min_votes}")

    # Global ids: prediction i's label l becomes offsets[i] + l - 1 (0-based nodes).
    flat = []
    for image in labels:
        image = image.ravel()
        if image.min() < 0:
            raise ValueError("label images must be non-negative")
        flat.append(relabel_sequential(image.astype(np.int64))[0])
    counts = [int(image.max()) for image in flat]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n_nodes = int(offsets[-1])
    if n_nodes == 0:
        return np.zeros(shape, np.int32)
    source = np.repeat(np.arange(n), counts)
    areas = np.zeros(n_nodes, np.int64)
    for i, image in enumerate(flat):
        areas[offsets[i]:offsets[i + 1]] = np.bincount(image, minlength=counts[i] + 1)[1:]

    edges = _iou_edges(flat, counts, offsets, areas, iou_threshold)
    group = _group_without_duplicates(edges, source, n_nodes)

    # Votes per (pixel, group): one np.unique over all predictions' foreground pixels.
    _, group_ids = np.unique(group, return_inverse=True)
    n_groups = int(group_ids.max()) + 1
    support = np.bincount(group_ids, minlength=n_groups)
    pixel_list, group_list = [], []
    for i, image in enumerate(flat):
        pixels = np.flatnonzero(image)
        pixel_list.append(pixels)
        group_list.append(group_ids[offsets[i] + image[pixels] - 1])
    pixels = np.concatenate(pixel_list)
    groups = np.concatenate(group_list)
    keys, votes = np.unique(pixels * n_groups + groups, return_counts=True)
    pixels, groups = keys // n_groups, keys % n_groups
    keep = (votes >= min_votes) & (support[groups] >= min_votes)
    pixels, groups, votes = pixels[keep], groups[keep], votes[keep]
    # Contested pixels: most votes wins, then the better-supported group.
    order = np.lexsort((-support[groups], -votes, pixels))
    pixels, groups = pixels[order], groups[order]
    first = np.ones(len(pixels), bool)
    first[1:] = pixels[1:] != pixels[:-1]
    merged = np.zeros(int(np.prod(shape)), np.int64)
    merged[pixels[first]] = groups[first] + 1
    return relabel_sequential(merged.reshape(shape))[0].astype(np.int32)


def _iou_edges(flat, counts, offsets, areas, iou_threshold):
    """(E, 3) array of (node a, node b, IoU) for nuclei of different predictions with IoU > threshold."""
    edges = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            both = (flat[i] > 0) & (flat[j] > 0)
            if not both.any():
                continue
            a = flat[i][both]
            b = flat[j][both]
            pairs, overlap = np.unique(a * (counts[j] + 1) + b, return_counts=True)
            node_a = offsets[i] + pairs // (counts[j] + 1) - 1
            node_b = offsets[j] + pairs % (counts[j] + 1) - 1
            iou = overlap / (areas[node_a] + areas[node_b] - overlap)
            good = iou > iou_threshold
            edges.append(np.stack([node_a[good], node_b[good], iou[good]], axis=1))
    return np.concatenate(edges) if edges else np.zeros((0, 3))


def _group_without_duplicates(edges, source, n_nodes):
    """(n_nodes,) group root per node: union-find over edges by decreasing IoU, refusing a
    union that would put two nuclei of the same prediction in one group."""
    parent = np.arange(n_nodes)
    members = {node: 1 << int(source[node]) for node in range(n_nodes)}  # predictions per root

    def find(node):
        root = node
        while parent[root] != root:
            root = parent[root]
        while parent[node] != root:
            parent[node], node = root, parent[node]
        return root

    for a, b, _ in edges[np.argsort(-edges[:, 2], kind="stable")] if len(edges) else ():
        root_a, root_b = find(int(a)), find(int(b))
        if root_a == root_b or members[root_a] & members[root_b]:
            continue
        parent[root_b] = root_a
        members[root_a] |= members.pop(root_b)
    return np.array([find(node) for node in range(n_nodes)])
