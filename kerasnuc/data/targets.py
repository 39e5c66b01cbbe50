"""Training targets from annotations (plain NumPy/SciPy/scikit-image, no deep-learning framework).

Segmentation models learn maps derived from instance labels (``foreground``,
``three_class``, ``distance_map``); detection models learn density maps made from
points (``density_map``); classifiers learn from patches centred on points
(``kerasnuc.predict.tiling.patches_at``, the one patch cutter). Points are (x, y) in 0-based pixel coordinates, pixel centres at
integers, so pixel (row r, column c) covers x in [c - 0.5, c + 0.5).
"""

import functools

import numpy as np
from scipy import ndimage

from kerasnuc.predict.tiling import reflect_indices  # noqa: F401  (the one mirror rule; augment imports it here)

__all__ = ["foreground", "three_class", "distance_map", "density_map",
           "instance_centroids", "point_pixels", "reflect_indices", "SEGMENTATION_TARGETS",
           "segmentation_target"]


def foreground(labels):
    """(H, W) instance labels -> (H, W, 1) float32 binary foreground."""
    return (np.asarray(labels) > 0).astype(np.float32)[..., None]


def three_class(labels):
    """(H, W) instance labels -> (H, W, 3) float32 one-hot: background, inside, boundary.

    Boundary = the inner boundary pixels of every instance (pixels of an instance with a
    4-neighbour of another label, background or another instance), so two touching
    nuclei are always separated by boundary pixels and the "inside" channel splits into
    one component (or more, at thin necks) per instance.
    """
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    inside = labels > 0
    boundary = find_boundaries(labels, connectivity=1, mode="inner") & inside
    out = np.zeros(labels.shape + (3,), dtype=np.float32)
    out[..., 0] = ~inside
    out[..., 1] = inside & ~boundary
    out[..., 2] = boundary
    return out


def distance_map(labels, normalize=True):
    """(H, W) instance labels -> (H, W, 1) float32 distance of each pixel to its instance's edge.

    The Euclidean distance to the nearest pixel outside the instance (another instance
    and the image border count as outside), so touching nuclei get separate peaks.
    ``normalize=True`` divides by each instance's maximum, giving [0, 1] per instance
    (1 at its centre) whatever the nucleus size; False keeps pixels.
    """
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        mask = labels[box] == index + 1
        # One pixel of padding makes the image border count as the instance's edge.
        distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        if normalize:
            distance = distance / max(float(distance[mask].max()), 1e-6)
        out[box][mask] = distance[mask]
    return out[..., None]


SEGMENTATION_TARGETS = {"foreground": foreground, "three_class": three_class, "distance": distance_map}


def segmentation_target(target):
    """A target function from its name ("foreground", "three_class", "distance") or itself."""
    if callable(target):
        return target
    if target not in SEGMENTATION_TARGETS:
        raise ValueError(f"unknown segmentation target '{target}'; known: {', '.join(SEGMENTATION_TARGETS)}")
    return SEGMENTATION_TARGETS[target]


def point_pixels(points, shape):
    """(K, 2) float (x, y) -> ((K,) int rows, (K,) int columns, (K,) bool inside ``shape``).

    A point belongs to the pixel whose centre is nearest (x = c - 0.5 goes to column c);
    points on the border pixels are inside, points beyond the image's edge are not.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    cols = np.floor(points[:, 0] + 0.5).astype(np.int64)
    rows = np.floor(points[:, 1] + 0.5).astype(np.int64)
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    return rows, cols, inside


def _disc(radius):
    """(2r+1, 2r+1) float64 disc of ones."""
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy <= r * r).astype(np.float64) if r > 0 else np.ones((1, 1))


@functools.lru_cache(maxsize=32)
def _density_kernel(sigma, radius):
    """Disc of ``radius`` blurred by a Gaussian of ``sigma``, scaled to a peak of 1. Cached
    (read-only): DetectionDataset asks for the same kernel for every crop, and building it
    took 40% of a density map (bench/bench_training.py, issue 18)."""
    half = int(radius) + (int(np.ceil(4.0 * sigma)) if sigma > 0 else 0)
    canvas = np.zeros((2 * half + 1, 2 * half + 1))
    r = int(radius)
    canvas[half - r:half + r + 1, half - r:half + r + 1] = _disc(r)
    if sigma > 0:
        canvas = ndimage.gaussian_filter(canvas, sigma, mode="constant", truncate=4.0)
    kernel = (canvas / canvas.max()).astype(np.float32)
    kernel.setflags(write=False)
    return kernel


def density_map(points, shape, sigma=2.0, radius=None):
    """Nucleus centres -> (H, W, 1) float32 density map (UD-Net style detection target).

    Each centre (x, y) is dilated by a disc of ``radius`` pixels (None or 0: a single
    pixel) and blurred with a Gaussian of ``sigma`` (0: no blur). Scaling: the combined
    kernel is divided by its own maximum, so an isolated nucleus peaks at exactly 1 for
    any ``sigma``/``radius``; touching nuclei add up. Why: the peak height, not the
    mass, is what detection reads back (local maxima above a threshold such as 0.5), so
    the threshold and the loss scale stay the same when ``sigma`` changes. Counts are
    ``map.sum() / kernel_mass`` if needed. Points outside the image are ignored, points
    on its border pixels kept (see :func:`point_pixels`); the blur is cut off at the
    image edge (zero outside), so a border nucleus still peaks at 1.
    """
    height, width = int(shape[0]), int(shape[1])
    rows, cols, inside = point_pixels(points, (height, width))
    impulses = np.zeros((height, width), dtype=np.float32)
    np.add.at(impulses, (rows[inside], cols[inside]), 1.0)
    kernel = _density_kernel(float(sigma), int(radius or 0))
    if kernel.shape != (1, 1) and inside.any():
        import cv2

        impulses = cv2.filter2D(impulses, cv2.CV_32F, kernel, borderType=cv2.BORDER_CONSTANT)
    return np.maximum(impulses, 0.0)[..., None]  # filter2D's DFT path can leave -1e-8


def instance_centroids(labels):
    """(H, W) instance labels -> ((K, 2) float64 (x, y) centroids, (K,) int64 instance ids).

    Detection points for datasets that only have masks. A non-convex nucleus' centroid
    can fall outside it.
    """
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return np.zeros((0, 2)), ids.astype(np.int64)
    centres = np.asarray(ndimage.center_of_mass(np.ones(labels.shape), labels, ids), dtype=np.float64)
    return centres[:, ::-1].copy(), ids.astype(np.int64)


