"""H&E stain normalisation behind one interface, and HED stain jitter.

``core``: the interface (:class:`StainNormalizer`, :func:`make_normalizer`,
:func:`normalizer_from_dict`), Reinhard, Macenko, Vahadane and the HED jitter (NumPy only).
``hsd``: the hue-saturation-density colour model. ``dcgmm``: the deep convolutional
Gaussian mixture normaliser (Zanjani et al. 2018; Keras is imported only when one is used),
trained by ``dcgmm_train`` (``python -m kerasnuc.data.stain train-dcgmm``).
"""

from kerasnuc.data.stain.core import (  # noqa: F401
    INTENSITY_MAX,
    NORMALIZERS,
    MacenkoNormalizer,
    ReinhardNormalizer,
    StainEstimationError,
    StainNormalizationWarning,
    StainNormalizer,
    VahadaneNormalizer,
    estimate_stain_matrix,
    hed_jitter,
    make_normalizer,
    normalize_rgb,
    normalizer_from_dict,
    od_to_rgb,
    resolve_paths,
    store_files,
    rgb_to_od,
    stain_angles_deg,
    tissue_mask,
)
from kerasnuc.data.stain.dcgmm import DCGMMNormalizer  # noqa: F401  (registers "dcgmm")
from kerasnuc.data.stain.hsd import hsd_to_od, hsd_to_rgb, od_to_hsd, rgb_to_hsd  # noqa: F401

from kerasnuc.data.stain import core as _core

__all__ = _core.__all__ + ["DCGMMNormalizer", "rgb_to_hsd", "hsd_to_rgb", "od_to_hsd", "hsd_to_od"]
