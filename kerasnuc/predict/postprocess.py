"""Maps -> nuclei: instances from probability maps, points from density maps.

Uses :mod:`kerasnuc.postprocess` (SciPy, scikit-image); on a device without them it falls
back to OpenCV (connected components, local maxima by dilation) and says so once.
"""

import sys

import numpy as np


def _postprocess_module():
    try:
        import kerasnuc.postprocess as post

        return post
    except ImportError as error:  # SciPy / scikit-image missing on the device
        print(f"kerasnuc.predict: {error}; falling back to OpenCV post-processing "
              "(no watershed split, no sub-pixel peaks)", file=sys.stderr)
        return None


def _kwargs(function, params):
    import inspect

    accepted = inspect.signature(function).parameters
    return {k: v for k, v in (params or {}).items() if k in accepted}


def instances(prob, params):
    """Instance labels from a probability map (kerasnuc.postprocess or an OpenCV fallback)."""
    post = _postprocess_module()
    if post is not None:
        return post.instances_from_probability(prob, **_kwargs(post.instances_from_probability, params))
    import cv2

    prob = np.asarray(prob, np.float32)
    foreground = (prob[..., 1] + prob[..., 2]) if prob.ndim == 3 and prob.shape[-1] == 3 else prob.reshape(prob.shape[:2])
    mask = (foreground > params.get("threshold", 0.5)).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    small = stats[:, cv2.CC_STAT_AREA] < params.get("min_area", 10)
    small[0] = False
    labels[small[labels]] = 0
    _, labels = np.unique(labels, return_inverse=True)
    return labels.reshape(mask.shape).astype(np.int32)


def centroids(density, params):
    """(K, 2) (x, y) peaks of a density map (kerasnuc.postprocess or an OpenCV fallback)."""
    post = _postprocess_module()
    if post is not None:
        return post.centroids_from_density(density, **_kwargs(post.centroids_from_density, params))
    import cv2

    density = np.asarray(density, np.float32).reshape(density.shape[:2])
    distance = max(int(params.get("min_distance", 3)), 1)
    kernel = np.ones((2 * distance + 1, 2 * distance + 1), np.uint8)
    peaks = (density == cv2.dilate(density, kernel)) & (density > params.get("threshold", 0.1))
    rows, cols = np.nonzero(peaks)
    return np.stack([cols, rows], axis=1).astype(np.float64)


def instance_centroids(labels):
    """(K, 2) (x, y) centroids of instances 1..K."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return np.zeros((0, 2))
    rows, cols = np.indices(labels.shape)
    flat = labels.ravel()
    count = np.bincount(flat, minlength=ids.max() + 1)
    x = np.bincount(flat, cols.ravel(), minlength=ids.max() + 1)[ids] / count[ids]
    y = np.bincount(flat, rows.ravel(), minlength=ids.max() + 1)[ids] / count[ids]
    return np.stack([x, y], axis=1)




def points_from_maps(maps, task, params):
    """(K, 2) (x, y) nucleus centres: density peaks (detection) or instance centroids (segmentation)."""
    if task == "segmentation":
        return instance_centroids(instances(maps, params))
    return centroids(maps[..., 0] if maps.shape[-1] == 1 else maps.max(axis=-1), params)
