"""H&E stain normalisation: the shared interface, Reinhard, Macenko, Vahadane; HED stain jitter.

Why: slides from different labs and scanners differ in stain colour; mapping every tile
to one template's colours (or, in training, jittering the stains) makes models travel.

Interface shared by every method (DCGMM, a trained network, is in :mod:`.dcgmm` and
registers itself in ``NORMALIZERS``)::

    normalizer = make_normalizer("macenko")      # or "reinhard", "vahadane", "dcgmm" (model=PATH)
    normalizer.fit(template_rgb_uint8)            # (H, W, 3) uint8; bad template -> ValueError
    out = normalizer.transform(rgb_uint8)         # (H, W, 3) uint8
    json.dump(normalizer.to_dict(), f)            # store in the run folder ...
    normalizer = normalizer_from_dict(json.load(f), folder)  # ... and use it at inference

Files a normaliser needs (a dcgmm E-step network: its ``_file_params``) travel with the JSON
that stores it: :func:`store_files` copies them into the JSON's folder and stores paths
relative to it; :func:`resolve_paths` (and ``normalizer_from_dict(data, folder)``) makes them
absolute again, so a run folder or an export copied to another machine still works.
:func:`normalize_rgb` is the one rule of which images a normaliser changes (RGB, not grey).

Robustness: a tile that cannot be normalised (glass only, too little tissue, all white or
all black, a degenerate or non-finite stain estimate) comes back unchanged, with a
:class:`StainNormalizationWarning` that says why; it never turns into NaN or noise.

Optical density (OD) throughout: ``od = -log(max(rgb, 1) / 255)``, so glass is ~0.
Stain matrices are (2, 3) float64, rows H then E, unit length, non-negative where the
method guarantees it; the H row is the one with the larger red (first) OD component.
"""

import warnings

import numpy as np

__all__ = [
    "StainNormalizationWarning",
    "StainEstimationError",
    "StainNormalizer",
    "ReinhardNormalizer",
    "MacenkoNormalizer",
    "VahadaneNormalizer",
    "make_normalizer",
    "normalizer_from_dict",
    "normalize_rgb",
    "resolve_paths",
    "store_files",
    "estimate_stain_matrix",
    "rgb_to_od",
    "od_to_rgb",
    "tissue_mask",
    "stain_angles_deg",
    "hed_jitter",
]

INTENSITY_MAX = 255.0


class StainNormalizationWarning(UserWarning):
    """A tile was returned unchanged because stain normalisation was not possible on it."""


class StainEstimationError(ValueError):
    """Stain statistics could not be estimated from an image (message says why)."""


# ----------------------------------------------------------------------------- helpers


def _check_rgb(rgb):
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB, got dtype {rgb.dtype}")
    return rgb


def rgb_to_od(rgb):
    """(..., 3) uint8 RGB -> (..., 3) float64 optical density, 0 for white, ~5.5 for black."""
    return -np.log(np.maximum(np.asarray(rgb, dtype=np.float64), 1.0) / INTENSITY_MAX)


def od_to_rgb(od):
    """(..., 3) optical density -> (..., 3) uint8 RGB (clipped, rounded)."""
    rgb = INTENSITY_MAX * np.exp(-np.asarray(od, dtype=np.float64))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def tissue_mask(rgb, od_threshold=0.15, max_od=3.0):
    """(H, W) bool: stained tissue pixels.

    Every channel must absorb more than ``od_threshold`` (Macenko's beta: drops glass and
    faint pixels), and not every channel may be near-black (all OD >= ``max_od``, i.e.
    RGB <= ~12: pen marks, scanner black borders, an all-black tile), which carry no
    stain colour.
    """
    od = rgb_to_od(_check_rgb(rgb))
    return np.all(od > od_threshold, axis=-1) & ~np.all(od >= max_od, axis=-1)


def stain_angles_deg(a, b):
    """Angles in degrees between corresponding rows of two (2, 3) stain matrices."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.degrees(np.arccos(np.clip(np.sum(a * b, axis=1), -1.0, 1.0)))


def _order_h_then_e(matrix):
    """Rows ordered H then E: H has the larger red (first) OD component."""
    return matrix if matrix[0, 0] >= matrix[1, 0] else matrix[::-1].copy()


def _validate_stain_matrix(matrix, min_angle_deg):
    if matrix.shape != (2, 3) or not np.all(np.isfinite(matrix)):
        raise StainEstimationError("stain matrix estimate is not finite")
    norms = np.linalg.norm(matrix, axis=1)
    if np.any(norms < 1e-8):
        raise StainEstimationError("a stain vector estimate is zero")
    matrix = matrix / norms[:, None]
    if np.any(matrix.sum(axis=1) <= 0):
        raise StainEstimationError("a stain vector points to negative optical density")
    angle = float(stain_angles_deg(matrix[:1], matrix[1:])[0])
    if angle < min_angle_deg:
        raise StainEstimationError(
            f"H and E vectors are nearly parallel ({angle:.1f} deg < {min_angle_deg} deg): "
            "the tile does not show two distinct stains")
    return _order_h_then_e(matrix)


# ----------------------------------------------------------------------------- base class


class StainNormalizer:
    """Base class: options, tissue checks, identity fallback and JSON round trip.

    Subclasses implement ``_fit_stats(rgb, mask) -> dict`` (fitted attributes, JSON-able
    after ``tolist``) and ``_transform(rgb, mask) -> uint8`` (may raise
    :class:`StainEstimationError`, which becomes an identity + warning).
    """

    method = None
    _fitted_names = ()
    _file_params = ()  # constructor options naming files (resolve_paths, store_files)

    def __init__(self, od_threshold=0.15, max_od=3.0, min_tissue_fraction=0.01,
                 min_tissue_pixels=100):
        self.od_threshold = float(od_threshold)
        self.max_od = float(max_od)
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.min_tissue_pixels = int(min_tissue_pixels)

    # -- options / serialisation
    def get_params(self):
        """Constructor options (JSON-able dict), as scikit-learn's ``get_params``."""
        import inspect

        names = []
        for cls in type(self).__mro__:
            if cls is object:
                continue
            names += [p for p in inspect.signature(cls.__init__).parameters
                      if p not in ("self", "kwargs") and p not in names]
        return {name: getattr(self, name) for name in names}

    @property
    def is_fitted(self):
        return all(hasattr(self, name) for name in self._fitted_names)

    def to_dict(self):
        """JSON-able dict: method, options and (if fitted) the fitted statistics."""
        fitted = None
        if self.is_fitted:
            fitted = {name: np.asarray(getattr(self, name)).tolist() for name in self._fitted_names}
        return {"method": self.method, "params": self.get_params(), "fitted": fitted}

    @classmethod
    def from_dict(cls, data):
        """Rebuild a normaliser stored with :meth:`to_dict` (any method)."""
        return normalizer_from_dict(data)

    # -- tissue checks
    def _tissue(self, rgb):
        """(H, W) tissue mask, or raise StainEstimationError when there is too little tissue."""
        mask = tissue_mask(rgb, self.od_threshold, self.max_od)
        count, total = int(mask.sum()), mask.size
        if count < self.min_tissue_pixels or count < self.min_tissue_fraction * total:
            raise StainEstimationError(
                f"too little tissue: {count} of {total} pixels ({100.0 * count / max(total, 1):.2f}%) "
                f"pass the OD threshold {self.od_threshold}; need >= {self.min_tissue_pixels} pixels "
                f"and >= {100 * self.min_tissue_fraction:.2f}%")
        return mask

    # -- public API
    def fit(self, template_rgb):
        """Learn the template's stain statistics from an (H, W, 3) uint8 image.

        Raises ValueError (a :class:`StainEstimationError`) if the template has too little
        tissue or its stains cannot be estimated.
        """
        rgb = _check_rgb(template_rgb)
        try:
            stats = self._fit_stats(rgb, self._tissue(rgb))
        except StainEstimationError as error:
            raise StainEstimationError(f"{self.method}: cannot fit on this template: {error}") from None
        for name, value in stats.items():
            if not np.all(np.isfinite(value)):
                raise StainEstimationError(f"{self.method}: template statistic {name} is not finite")
        for name, value in stats.items():
            setattr(self, name, np.asarray(value, dtype=np.float64))
        return self

    def transform(self, rgb):
        """(H, W, 3) uint8 -> (H, W, 3) uint8 in the template's colours.

        Returns the input unchanged, with a :class:`StainNormalizationWarning`, when the
        tile has too little tissue or its stains cannot be estimated.
        """
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(template) first")
        rgb = _check_rgb(rgb)
        try:
            out = self._transform(rgb, self._tissue(rgb))
        except StainEstimationError as error:
            warnings.warn(f"{self.method} stain normalisation skipped, tile returned unchanged: {error}",
                          StainNormalizationWarning, stacklevel=2)
            return rgb.copy()
        return out

    def fit_transform(self, rgb):
        return self.fit(rgb).transform(rgb)

    def __call__(self, rgb):
        return self.transform(rgb)

    def _fit_stats(self, rgb, mask):  # pragma: no cover - abstract
        raise NotImplementedError

    def _transform(self, rgb, mask):  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------- Reinhard


class ReinhardNormalizer(StainNormalizer):
    """Reinhard et al. 2001: match per-channel mean and std in CIE L*a*b* (scikit-image).

    Statistics are over all pixels (the classic method); the tissue check only decides
    whether the tile is worth normalising. Fitted: ``means_``, ``stds_`` (3,) float64.
    """

    method = "reinhard"
    _fitted_names = ("means_", "stds_")

    def __init__(self, min_std=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.min_std = float(min_std)

    @staticmethod
    def _lab_stats(rgb):
        from skimage.color import rgb2lab

        lab = rgb2lab(rgb).reshape(-1, 3)
        return lab, lab.mean(axis=0), lab.std(axis=0)

    def _fit_stats(self, rgb, mask):
        _, means, stds = self._lab_stats(rgb)
        if np.any(stds < self.min_std):
            raise StainEstimationError(f"LAB standard deviation {stds.round(4).tolist()} is ~0 (flat image)")
        return {"means_": means, "stds_": stds}

    def _transform(self, rgb, mask):
        from skimage.color import lab2rgb

        lab, means, stds = self._lab_stats(rgb)
        if np.any(stds < self.min_std) or not np.all(np.isfinite(stds)):
            raise StainEstimationError(f"LAB standard deviation {stds.round(4).tolist()} is ~0 (flat image)")
        lab = (lab - means) * (self.stds_ / stds) + self.means_
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # out-of-gamut colours are clipped: expected
            out = lab2rgb(lab.reshape(rgb.shape))
        if not np.all(np.isfinite(out)):
            raise StainEstimationError("LAB to RGB conversion produced non-finite values")
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- stain-matrix methods


class _StainMatrixNormalizer(StainNormalizer):
    """Shared by Macenko and Vahadane: OD = C @ S, scale C's 99th percentiles to the template's.

    Fitted: ``stain_matrix_`` (2, 3) rows H, E and ``max_concentrations_`` (2,), the
    template's per-stain concentration percentile over tissue pixels.
    """

    _fitted_names = ("stain_matrix_", "max_concentrations_")

    def __init__(self, percentile=99.0, min_angle_deg=3.0, min_eigenvalue_ratio=0.005,
                 min_concentration_ratio=0.05, **kwargs):
        super().__init__(**kwargs)
        self.percentile = float(percentile)
        self.min_angle_deg = float(min_angle_deg)
        self.min_eigenvalue_ratio = float(min_eigenvalue_ratio)
        self.min_concentration_ratio = float(min_concentration_ratio)

    def estimate_validated(self, od_tissue):
        """(N, 3) tissue OD -> (2, 3) stain matrix, rows H then E, or StainEstimationError.

        Refuses tissue whose OD has only one significant colour direction (second
        covariance eigenvalue < ``min_eigenvalue_ratio`` x the first; real H&E tiles
        measured >= 0.010 on MoNuSeg and CRCHistoPhenotypes, grey or one-stain tiles
        <= 0.003) and estimates whose H and E are nearly parallel.
        """
        if len(od_tissue) < 3 or not np.all(np.isfinite(od_tissue)):
            raise StainEstimationError("not enough finite OD samples")
        eigvals = np.linalg.eigvalsh(np.cov(od_tissue, rowvar=False))
        if not np.all(np.isfinite(eigvals)) or eigvals[-1] <= 1e-12:
            raise StainEstimationError("tissue OD has no variation (a single colour)")
        ratio = eigvals[-2] / eigvals[-1]
        if ratio < self.min_eigenvalue_ratio:
            raise StainEstimationError(
                f"tissue OD has a single colour direction (eigenvalue ratio {ratio:.4f} < "
                f"{self.min_eigenvalue_ratio}): not two distinct stains")
        return _validate_stain_matrix(self.estimate_stain_matrix(od_tissue), self.min_angle_deg)

    def estimate_stain_matrix(self, od_tissue):  # pragma: no cover - abstract
        raise NotImplementedError

    def concentrations(self, od, stain_matrix):
        """(N, 3) OD -> (N, 2) concentrations for a (2, 3) stain matrix (least squares)."""
        conc, *_ = np.linalg.lstsq(stain_matrix.T, od.T, rcond=None)
        return conc.T

    def _stats(self, rgb, mask):
        """Stain matrix, per-colour concentrations and their percentiles for one image.

        Concentrations depend only on a pixel's colour, so they are computed once per
        distinct RGB value (typically 5-15x fewer than pixels) and indexed back.
        """
        pixels = rgb.reshape(-1, 3)
        tissue = mask.reshape(-1)
        matrix = self.estimate_validated(rgb_to_od(pixels[tissue]))
        colours, inverse = _unique_colours(pixels)
        conc = self.concentrations(rgb_to_od(colours), matrix)
        if not np.all(np.isfinite(conc)):
            raise StainEstimationError("stain concentrations are not finite")
        max_conc = np.percentile(conc[inverse[tissue]], self.percentile, axis=0)
        if (not np.all(np.isfinite(max_conc)) or np.any(max_conc <= 1e-6)
                or max_conc.min() < self.min_concentration_ratio * max_conc.max()):
            raise StainEstimationError(
                f"a stain is absent (H, E concentration {self.percentile:g}th percentiles "
                f"{np.round(max_conc, 4).tolist()})")
        return conc, inverse, matrix, max_conc

    def _fit_stats(self, rgb, mask):
        _, _, matrix, max_conc = self._stats(rgb, mask)
        return {"stain_matrix_": matrix, "max_concentrations_": max_conc}

    def _transform(self, rgb, mask):
        conc, inverse, _, max_conc = self._stats(rgb, mask)
        od = (conc * (self.max_concentrations_ / max_conc)) @ self.stain_matrix_
        if not np.all(np.isfinite(od)):
            raise StainEstimationError("normalised optical density is not finite")
        return od_to_rgb(od)[inverse].reshape(rgb.shape)


def _unique_colours(pixels):
    """(N, 3) uint8 -> (M, 3) distinct colours and (N,) index of each pixel's colour."""
    key = (pixels[:, 0].astype(np.int32) << 16) | (pixels[:, 1].astype(np.int32) << 8) | pixels[:, 2]
    keys, inverse = np.unique(key, return_inverse=True)
    colours = np.stack([(keys >> 16) & 255, (keys >> 8) & 255, keys & 255], axis=1).astype(np.uint8)
    return colours, inverse.reshape(-1)


class MacenkoNormalizer(_StainMatrixNormalizer):
    """Macenko et al. 2009: SVD of tissue OD, stain vectors at the angle percentiles.

    The OD of tissue pixels is projected on the plane of its two leading eigenvectors;
    the ``alpha`` and ``100 - alpha`` percentiles of the angle in that plane give H and E.
    """

    method = "macenko"

    def __init__(self, alpha=1.0, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)

    def estimate_stain_matrix(self, od_tissue):
        """(N, 3) tissue OD -> (2, 3) stain matrix (unordered, not validated)."""
        if len(od_tissue) < 3 or not np.all(np.isfinite(od_tissue)):
            raise StainEstimationError("not enough finite OD samples")
        cov = np.cov(od_tissue, rowvar=False)
        if not np.all(np.isfinite(cov)):
            raise StainEstimationError("OD covariance is not finite")
        eigvals, eigvecs = np.linalg.eigh(cov)
        if eigvals[-1] <= 1e-12 or eigvals[-2] <= 1e-6 * eigvals[-1]:
            raise StainEstimationError(
                f"OD covariance is rank-deficient (eigenvalues {eigvals.tolist()}): a single colour")
        plane = eigvecs[:, [2, 1]]  # leading first
        plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point towards positive OD
        projected = od_tissue @ plane
        phi = np.arctan2(projected[:, 1], projected[:, 0])
        low, high = np.percentile(phi, [self.alpha, 100.0 - self.alpha])
        v_low = plane @ np.array([np.cos(low), np.sin(low)])
        v_high = plane @ np.array([np.cos(high), np.sin(high)])
        return np.stack([v_low, v_high])


class VahadaneNormalizer(_StainMatrixNormalizer):
    """Vahadane et al. 2016: sparse non-negative factorisation of OD (structure preserving).

    OD ~= C @ S with C >= 0 sparse (L1 weight ``lambda_dict`` while learning, as
    staintools' spams ``trainDL``) and S >= 0 with unit rows, learnt from up to
    ``max_fit_pixels`` random tissue pixels. ``solver="alternating"`` (default) alternates
    scikit-learn's vectorised non-negative sparse coder (``non_negative_factorization``
    with S fixed) with a projected block update of S; it reaches the same optimum as
    ``solver="dictionary_learning"`` (scikit-learn's ``DictionaryLearning`` with positive
    code and dictionary, within ~1 degree on MoNuSeg) but ~10-30x faster, because
    scikit-learn's lasso coder loops over pixels in Python.
    Concentrations for normalisation are non-negative sparse codes with L1 weight
    ``lambda_code`` per pixel.
    """

    method = "vahadane"

    def __init__(self, lambda_dict=0.1, lambda_code=0.01, max_fit_pixels=4000, max_iter=100,
                 solver="alternating", random_state=0, **kwargs):
        super().__init__(**kwargs)
        if solver not in ("alternating", "dictionary_learning"):
            raise ValueError(f"solver must be 'alternating' or 'dictionary_learning', got {solver!r}")
        self.lambda_dict = float(lambda_dict)
        self.lambda_code = float(lambda_code)
        self.max_fit_pixels = int(max_fit_pixels)
        self.max_iter = int(max_iter)
        self.solver = solver
        self.random_state = int(random_state)

    def estimate_stain_matrix(self, od_tissue):
        """(N, 3) tissue OD -> (2, 3) non-negative stain matrix (unordered, not validated)."""
        if len(od_tissue) < 3 or not np.all(np.isfinite(od_tissue)):
            raise StainEstimationError("not enough finite OD samples")
        rng = np.random.default_rng(self.random_state)
        if len(od_tissue) > self.max_fit_pixels:
            od_tissue = od_tissue[rng.choice(len(od_tissue), self.max_fit_pixels, replace=False)]
        if np.ptp(od_tissue, axis=0).max() < 1e-6:
            raise StainEstimationError("tissue OD is constant: a single colour")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter; the result is validated later
            if self.solver == "dictionary_learning":
                return self._dictionary_learning(od_tissue)
            return self._alternating(od_tissue)

    def _dictionary_learning(self, od):
        from sklearn.decomposition import DictionaryLearning

        learner = DictionaryLearning(
            n_components=2, alpha=self.lambda_dict, max_iter=self.max_iter, fit_algorithm="cd",
            transform_algorithm="lasso_cd", positive_code=True, positive_dict=True,
            random_state=self.random_state)
        return learner.fit(od).components_

    def _alternating(self, od, tol=1e-6):
        from sklearn.decomposition import NMF

        stains = NMF(n_components=2, init="nndsvd", max_iter=200).fit(od).components_
        norms = np.linalg.norm(stains, axis=1, keepdims=True)
        if np.any(norms < 1e-12):
            raise StainEstimationError("non-negative factorisation found fewer than two stains")
        stains = stains / norms
        for _ in range(self.max_iter):
            codes = self._sparse_codes(od, stains, self.lambda_dict)
            previous = stains.copy()
            residual = od - codes @ stains
            for k in range(2):  # block update of each stain, projected to >= 0 and unit norm
                residual += np.outer(codes[:, k], stains[k])
                update = np.maximum(codes[:, k] @ residual, 0.0)
                norm = np.linalg.norm(update)
                if norm > 0:
                    stains[k] = update / norm
                residual -= np.outer(codes[:, k], stains[k])
            if np.abs(stains - previous).max() < tol:
                break
        return stains

    @staticmethod
    def _sparse_codes(od, stain_matrix, l1_weight):
        """(N, 3) OD -> (N, 2) argmin_C>=0 0.5 |od - C S|^2 + l1_weight |C|_1 per pixel."""
        from sklearn.decomposition import non_negative_factorization

        # scikit-learn scales the W penalty by n_features, hence the division.
        codes, _, _ = non_negative_factorization(
            np.maximum(od, 0.0), H=np.ascontiguousarray(stain_matrix, dtype=np.float64),
            n_components=2, init="custom", update_H=False, solver="cd",
            alpha_W=l1_weight / od.shape[1], alpha_H=0.0, l1_ratio=1.0, max_iter=200, tol=1e-4)
        return codes

    def concentrations(self, od, stain_matrix):
        """(N, 3) OD -> (N, 2) non-negative sparse concentrations for a fixed stain matrix."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._sparse_codes(od, stain_matrix, self.lambda_code)


# ----------------------------------------------------------------------------- factory


NORMALIZERS = {cls.method: cls for cls in (ReinhardNormalizer, MacenkoNormalizer, VahadaneNormalizer)}


def make_normalizer(method, **options):
    """A new, unfitted normaliser: ``method`` in "reinhard", "macenko", "vahadane", "dcgmm"."""
    key = str(method).lower()
    if key not in NORMALIZERS:
        raise ValueError(f"unknown stain normalisation method {method!r}; choose from {sorted(NORMALIZERS)}")
    return NORMALIZERS[key](**options)


def normalizer_from_dict(data, folder=None):
    """Rebuild a (fitted) normaliser from :meth:`StainNormalizer.to_dict` output; relative file
    options resolve against ``folder``, the folder of the JSON it was read from
    (:func:`resolve_paths`)."""
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError("not a stored stain normaliser: expected a dict with 'method', 'params', 'fitted'")
    data = resolve_paths(data, folder)
    normalizer = make_normalizer(data["method"], **(data.get("params") or {}))
    fitted = data.get("fitted")
    if fitted:
        missing = [name for name in normalizer._fitted_names if name not in fitted]
        if missing:
            raise ValueError(f"stored {data['method']} normaliser lacks fitted values {missing}")
        for name in normalizer._fitted_names:
            setattr(normalizer, name, np.asarray(fitted[name], dtype=np.float64))
    return normalizer


def _file_options(data):
    """[(option, path)] of a stored normaliser's file options (the ``params`` its class lists
    in ``_file_params``)."""
    cls = NORMALIZERS.get(str(data.get("method", "")).lower())
    params = data.get("params") or {}
    return [(name, params[name]) for name in getattr(cls, "_file_params", ()) if params.get(name)]


def resolve_paths(data, folder=None, where=None):
    """A copy of the stored normaliser ``data`` whose relative file options (a dcgmm ``model``)
    are absolute, taken relative to ``folder`` (the folder of the JSON that stored them).

    Raises FileNotFoundError naming ``where`` (the JSON) and the missing file, and ValueError
    for a relative path with no ``folder`` to resolve it against (metadata that came without
    its folder, e.g. over gRPC)."""
    import os

    options = _file_options(data)
    if not options:
        return data
    params = dict(data.get("params") or {})
    for name, path in options:
        path = os.fspath(path)
        if not os.path.isabs(path):
            if folder is None:
                raise ValueError(f"{where or 'stain normaliser'}: the {data['method']} stain {name} "
                                 f"'{path}' is relative to the folder of the JSON that stored it, and that "
                                 "folder is not known here (read the metadata or stain.json file itself)")
            path = os.path.join(os.path.abspath(os.fspath(folder)), path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{where or folder or 'stain normaliser'}: the {data['method']} stain "
                                    f"{name} {path} is missing (it travels with the run or export it "
                                    "belongs to: copy it along)")
        params[name] = path
    return {**data, "params": params}


def store_files(data, folder, prefix="", copy=True):
    """A copy of the stored normaliser ``data`` (absolute paths) whose files are copied into
    ``folder`` as ``<prefix>stain_<option><suffixes>`` (atomically, :mod:`kerasnuc.atomic`), the
    option now naming that file relative to ``folder``: a JSON written into ``folder`` then
    carries everything it needs. ``copy=False``: only the new names (the files follow later)."""
    import os
    import shutil

    from kerasnuc.atomic import atomic_path

    options = _file_options(data)
    if not options:
        return data
    params = dict(data.get("params") or {})
    for name, path in options:
        source = os.path.abspath(os.fspath(path))
        if os.path.isdir(source):  # a train-dcgmm folder: the network inside
            from kerasnuc.data.stain.dcgmm import MODEL_FILE

            source = os.path.join(source, MODEL_FILE)
        stored = f"{prefix}stain_{name}{''.join(os.path.basename(source).partition('.')[1:])}"
        target = os.path.join(os.fspath(folder), stored)
        if copy and os.path.abspath(target) != source:
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        params[name] = stored
    return {**data, "params": params}


def normalize_rgb(normalizer, image):
    """The one rule of which pixels a run's stain normaliser changes (training, the prediction
    engine, int8 calibration): an (H, W, 3) RGB image is mapped to the template's colours;
    grey images, and any image when ``normalizer`` is None, pass unchanged."""
    image = np.asarray(image)
    if normalizer is None or image.ndim != 3 or image.shape[2] != 3:
        return image
    return normalizer.transform(image)


def estimate_stain_matrix(rgb, method="macenko", **options):
    """(2, 3) float64 stain matrix of an (H, W, 3) uint8 image: rows H then E, unit length.

    ``method`` is "macenko" or "vahadane"; options as for their normalisers. Raises
    :class:`StainEstimationError` (a ValueError) when the image has too little tissue or
    the estimate is degenerate.
    """
    normalizer = make_normalizer(method, **options)
    if not isinstance(normalizer, _StainMatrixNormalizer):
        raise ValueError(f"{method!r} does not estimate a stain matrix; use 'macenko' or 'vahadane'")
    rgb = _check_rgb(rgb)
    mask = normalizer._tissue(rgb)
    return normalizer.estimate_validated(rgb_to_od(rgb.reshape(-1, 3)[mask.reshape(-1)]))


# ----------------------------------------------------------------------------- augmentation


def hed_jitter(rgb, rng=None, sigma=0.05, bias=0.05):
    """Random HED stain perturbation (Tellez et al. 2018) of an (H, W, 3) uint8 image.

    Each of the H, E, D stain channels becomes ``c * a + b`` with
    ``a ~ U(1 - sigma, 1 + sigma)`` and ``b ~ U(-bias, bias)`` drawn per channel from
    ``rng`` (a NumPy Generator, a seed or None). Stains are scikit-image's HED (its
    ``hed_from_rgb`` / ``rgb_from_hed`` matrices and ``combine_stains``, i.e.
    ``rgb2hed``/``hed2rgb``) except that negative stain values are kept instead of
    clipped as ``rgb2hed`` does, so that zero jitter returns the image exactly (the
    clip changes ~8% of MoNuSeg pixels by more than 2 levels). Returns uint8.

    Units are ``rgb2hed``'s (1 unit = 13.8 natural OD), so ``bias`` dominates: on a
    MoNuSeg tile the defaults change pixels by ~42 grey levels on average and can tint
    glass down to ~140; ``bias=0.01`` changes ~8 levels, ``sigma=0.05`` alone ~1.4.
    """
    from skimage.color import combine_stains, hed_from_rgb, rgb_from_hed

    rgb = _check_rgb(rgb)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    scale = rng.uniform(1.0 - sigma, 1.0 + sigma, size=3)
    shift = rng.uniform(-bias, bias, size=3)
    log_adjust = np.log(1e-6)  # scikit-image's rgb2hed scaling
    hed = (np.log(np.maximum(rgb / 255.0, 1e-6)) / log_adjust) @ hed_from_rgb
    out = combine_stains(hed * scale + shift, rgb_from_hed)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
