"""Test-time augmentation: the 8 dihedral views of an image, maps averaged.

Why: nuclei have no preferred orientation, so averaging a model's predictions over flips
and 90-degree rotations (after undoing each) removes orientation-dependent errors for the
price of 8 forward passes. For instance outputs, NucSeg's "multiple inference" (the original
view's nuclei reshaped by a pixel vote over 7 views) is
:func:`kerasnuc.postprocess.multiple_inference.merge_views_anchored`.
"""

import numpy as np

__all__ = ["DIHEDRAL", "dihedral_transform", "inverse_dihedral", "predict_tta"]

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
