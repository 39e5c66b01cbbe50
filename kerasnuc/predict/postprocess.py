"""Maps -> nuclei: instances from probability maps, points from density maps.

Uses :mod:`kerasnuc.postprocess` (SciPy, scikit-image); on a device without them it falls
back to OpenCV (connected components, local maxima by dilation) and says so once.

The post-processing parameters (a run's thresholds.json ``postprocess``) choose the method:
``{"method": "embedding", ...}`` (BayesNuSeg: seed + offsets + sigma maps) clusters pixel
embeddings (:mod:`kerasnuc.postprocess.embedding`, NumPy only, so also without SciPy);
without ``method`` (or ``"watershed"``) probability maps go through the watershed.
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


EMBEDDING = "embedding"


def is_embedding(params):
    """True when ``params`` (thresholds.json's postprocess) ask for embedding clustering."""
    return (params or {}).get("method") == EMBEDDING


def _numpy_module(name):
    """kerasnuc.postprocess.<name> (a NumPy-only module); loaded from its file where the
    package's SciPy imports fail."""
    import importlib

    try:
        return importlib.import_module(f"kerasnuc.postprocess.{name}")
    except ImportError:
        import importlib.util
        import os

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "postprocess",
                            f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"kerasnuc_postprocess_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def _embedding_module():
    """kerasnuc.postprocess.embedding, also without SciPy."""
    return _numpy_module("embedding")


def multiple_inference_module():
    """kerasnuc.postprocess.multiple_inference (NucSeg's anchored vote), also without SciPy."""
    return _numpy_module("multiple_inference")


def multiple_inference_instances(original, view_outputs, to_labels, iou=0.2, vote=0.5):
    """NucSeg's multiple inference of one image: (H, W) int32 labels.

    ``original``: the network output of the original view; ``view_outputs``: (k, output) of
    dihedral views k, each output in its own view's orientation; ``to_labels(output)`` -> that
    view's instance labels (the watershed of maps, an instance model's detections). Each
    view's labels are mapped back and the original's nuclei kept by the anchored pixel vote
    (:func:`kerasnuc.postprocess.multiple_inference.merge_views_anchored`). The one copy of this
    composition: the engine's blocks and training.evaluate both call it.
    """
    from kerasnuc.predict.tiling import inverse_dihedral

    views = [np.ascontiguousarray(inverse_dihedral(to_labels(output), k)) for k, output in view_outputs]
    return multiple_inference_module().merge_views_anchored(to_labels(original), views, iou=iou, vote=vote)


def embedding_instances(maps, params):
    """Instances of (H, W, classes + 3) BayesNuSeg maps by sequential clustering; ``params``:
    ``threshold`` (foreground: seed above it), ``seed_threshold``, ``score_threshold``,
    ``min_area``, ``offset_scale``, ``min_unclustered``, ``classes``."""
    module = _embedding_module()
    params = dict(params or {})
    seed, offsets, sigma = module.split_embedding_maps(maps, params.get("classes"))
    options = {k: params[k] for k in ("seed_threshold", "score_threshold", "min_area", "offset_scale",
                                      "min_unclustered") if k in params}
    return module.instances_from_embeddings(seed, offsets, sigma,
                                            foreground_threshold=params.get("threshold", 0.5), **options)


def foreground(maps, params=None):
    """(H, W) nucleus probability of a model's maps: the seed map (max over classes) for
    embedding models, else the probability's foreground (softmax: inside + boundary)."""
    maps = np.asarray(maps, np.float32)
    if is_embedding(params):
        return _embedding_module().split_embedding_maps(maps, (params or {}).get("classes"))[0]
    if maps.ndim == 3 and maps.shape[-1] == 3:
        return maps[..., 1] + maps[..., 2]
    return maps.reshape(maps.shape[:2])


def uncertainty(variance, params=None):
    """(H, W) per-pixel uncertainty of a Monte-Carlo model from its (H, W, K) predictive
    variance: the seed channels' (max over classes) for embedding models (offsets and sigma
    are geometry, not probabilities), else the mean over channels."""
    variance = np.asarray(variance, np.float32)
    if variance.ndim == 2:
        return variance
    if is_embedding(params):
        classes = int((params or {}).get("classes") or variance.shape[-1] - 3)
        return variance[..., :classes].max(axis=-1)
    return variance.mean(axis=-1)


def instances(prob, params):
    """Instance labels from a model's maps: embedding clustering when ``params["method"]`` is
    "embedding", else the watershed of a probability map (kerasnuc.postprocess or an OpenCV
    fallback)."""
    if is_embedding(params):
        return embedding_instances(prob, params)
    post = _postprocess_module()
    if post is not None:
        return post.instances_from_probability(prob, **_kwargs(post.instances_from_probability, params))
    import cv2

    prob = np.asarray(prob, np.float32)
    fg = foreground(prob, params)
    mask = (fg > params.get("threshold", 0.5)).astype(np.uint8)
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
