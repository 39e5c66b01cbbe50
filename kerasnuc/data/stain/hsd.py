"""Hue-saturation-density (HSD) colour model (van der Laak et al. 2000), as DCGMM uses it.

Why: in optical density (OD) a stain's colour and its amount separate. HSD writes an OD
triple as its mean density ``D = (OD_R + OD_G + OD_B) / 3`` and two chromatic coordinates
that do not depend on the amount of stain::

    cx = OD_R / D - 1,    cy = (OD_G - OD_B) / (sqrt(3) D)

so a Gaussian per tissue class over (D, cx, cy) models "how much" and "which colour"
separately. Every OD >= 0 maps into the triangle cx in [-1, 2], |cy| <= sqrt(3); glass
(``D`` ~ 0) has no defined colour and gets the grey point cx = cy = 0. OD comes from
:func:`kerasnuc.data.stain.core.rgb_to_od` (``-log(max(rgb, 1) / 255)``), so the round trip
RGB -> HSD -> RGB is exact for every uint8 value >= 1 (0 comes back as 1).
"""

import numpy as np

from kerasnuc.data.stain.core import od_to_rgb, rgb_to_od

__all__ = ["od_to_hsd", "hsd_to_od", "rgb_to_hsd", "hsd_to_rgb", "MIN_DENSITY", "CX_RANGE"]

SQRT3 = np.sqrt(3.0)
MIN_DENSITY = 1e-6
"""Below this mean OD a pixel is glass: its chromatic coordinates are set to the grey point."""
CX_RANGE = (-1.0, 2.0)
"""cx of non-negative OD (OD_R = 0 gives -1, OD_G = OD_B = 0 gives 2)."""


def od_to_hsd(od):
    """(..., 3) optical density -> (..., 3) (D, cx, cy), in the input's float dtype."""
    od = np.asarray(od)
    od = od if np.issubdtype(od.dtype, np.floating) else od.astype(np.float64)
    density = od.mean(axis=-1)
    glass = density < MIN_DENSITY
    safe = np.where(glass, 1.0, density)
    cx = np.where(glass, 0.0, od[..., 0] / safe - 1.0)
    cy = np.where(glass, 0.0, (od[..., 1] - od[..., 2]) / (SQRT3 * safe))
    return np.stack([density, cx, cy], axis=-1).astype(od.dtype, copy=False)


def hsd_to_od(hsd):
    """(..., 3) (D, cx, cy) -> (..., 3) optical density (the inverse of :func:`od_to_hsd`)."""
    hsd = np.asarray(hsd)
    density, cx, cy = hsd[..., 0], hsd[..., 1], hsd[..., 2]
    red = density * (cx + 1.0)
    green = 0.5 * density * (2.0 - cx + SQRT3 * cy)
    blue = 0.5 * density * (2.0 - cx - SQRT3 * cy)
    return np.stack([red, green, blue], axis=-1)


def rgb_to_hsd(rgb, dtype=np.float64):
    """(..., 3) uint8 RGB -> (..., 3) HSD of ``dtype``."""
    return od_to_hsd(rgb_to_od(rgb).astype(dtype, copy=False))


def hsd_to_rgb(hsd):
    """(..., 3) HSD -> (..., 3) uint8 RGB; negative OD (outside the colour triangle) is clipped to 0."""
    return od_to_rgb(np.maximum(hsd_to_od(hsd), 0.0))
