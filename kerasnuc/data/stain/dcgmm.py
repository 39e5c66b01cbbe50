"""DCGMM stain normalisation: a deep convolutional Gaussian mixture model (Zanjani et al. 2018).

Why: a colour-only mixture (or a stain matrix) mixes up tissue classes whose colours overlap
when the staining is strong or weak. DCGMM lets a fully convolutional network (the E-step)
assign every pixel soft memberships ``gamma`` to K tissue classes (nuclei, surrounding
tissue, background, ...) from the *shape and appearance* of the density channel, so the
classes are the same structures in every image whatever its stain. The mixture's Gaussians
(a mean and a diagonal variance of (D, cx, cy) per class, :mod:`.hsd`) follow from the
memberships in closed form (the M-step), and the network is trained without labels to
minimise the negative log-likelihood of the pixels::

    p(x_i) = sum_k gamma_ik N(x_i | mu_k, diag(var_k)),  mu_k, var_k = M-step(x, gamma_k)

An image is normalised per class: standardised by its own class mean and std, rescaled to
the template's, blended by the memberships, then converted back to RGB.

This module is importable without Keras; Keras is imported only when a network is built,
loaded or trained (``make_normalizer("dcgmm", model=PATH)`` needs it at ``fit``).
Reference implementation read: github.com/FarhadZanjani/Histopathology-Stain-Color-Normalization
(K = 4 there, Adam 1e-4, 512 x 512 tiles, batch 1; it clips the likelihood at 1, which we do
not: a variance floor keeps the density bounded instead).
"""

import os
import threading
import weakref

import numpy as np

from kerasnuc.data.stain.core import NORMALIZERS, StainEstimationError, StainNormalizer
from kerasnuc.data.stain.hsd import CX_RANGE, SQRT3, hsd_to_rgb, rgb_to_hsd

__all__ = [
    "DCGMMNormalizer",
    "build_estep",
    "cluster_sums",
    "gaussian_parameters",
    "m_step",
    "mixture_nll",
    "dcgmm_loss",
    "load_estep",
    "memberships",
    "map_to_template",
    "MODEL_FILE",
    "MIN_VARIANCE",
]

MODEL_FILE = "model.keras"
"""Name of the E-step network in a folder written by ``train-dcgmm``."""
MIN_VARIANCE = 1e-4
"""Added to every class variance (HSD units; std >= 0.01): a class that collapses onto one
colour (pure glass) would otherwise have an unbounded likelihood and a zero std to divide by."""
_EPSILON = 1e-7


# ----------------------------------------------------------------------------- network


def build_estep(clusters=3, filters=16, depth=2, name="dcgmm_estep"):
    """The E-step network: a small U-Net (:func:`kerasnuc.models.unet.build_unet`, no BatchNorm)
    from the density channel (B, H, W, 1) to softmax memberships (B, H, W, ``clusters``).

    No BatchNorm because a few thousand unsupervised steps leave its moving statistics far
    from the batch statistics the memberships were trained with. Sizes must be multiples of
    ``2 ** depth``; :func:`memberships` pads and tiles.
    """
    from kerasnuc.models.unet import build_unet

    if int(clusters) < 2:
        raise ValueError(f"dcgmm: need at least 2 clusters, got {clusters}")
    return build_unet(input_shape=(None, None, 1), filters=int(filters), depth=int(depth),
                      out_channels=int(clusters), activation="softmax", batch_norm=False, name=name)


def network_multiple(network):
    """Spatial sizes of an E-step network must be multiples of this (2 ** its pooling layers)."""
    import keras

    return 2 ** sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in network.layers)


_NETWORKS = {}
_NETWORKS_LOCK = threading.Lock()


def load_estep(path):
    """The E-step network stored at ``path`` (a ``.keras`` file), loaded in safe mode and cached
    per file version, so normalisers rebuilt per image (serving.edge) do not reload it.

    Raises ValueError naming the file when it is not a Keras model of the expected shape.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dcgmm: E-step network {path} not found")
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    with _NETWORKS_LOCK:
        if key in _NETWORKS:
            return _NETWORKS[key]
    try:
        import keras
    except ImportError as error:
        raise ImportError(f"dcgmm: the E-step network {path} is a Keras model; dcgmm stain "
                          f"normalisation needs Keras and its backend installed ({error})") from None
    try:
        network = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001  (a zip Keras cannot read, or not a zip at all)
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ValueError(f"dcgmm: {path} is not a readable Keras model ({detail})") from None
    in_shape, out_shape = network.input_shape, network.output_shape
    if not (isinstance(in_shape, tuple) and len(in_shape) == 4 and in_shape[-1] == 1
            and isinstance(out_shape, tuple) and len(out_shape) == 4 and (out_shape[-1] or 0) >= 2):
        raise ValueError(f"dcgmm: {path} is not a DCGMM E-step network: expected input (B, H, W, 1) "
                         f"and output (B, H, W, K >= 2), got {in_shape} -> {out_shape}")
    with _NETWORKS_LOCK:
        _NETWORKS[key] = network
    return network


def network_reach(network):
    """Pixels each way one input pixel influences (:func:`kerasnuc.runs.measure_receptive_radius`,
    by probing), or ``8 * multiple`` if the probe cannot tell; cached per network."""
    from kerasnuc.runs import measure_receptive_radius

    if network not in _REACH:
        multiple = network_multiple(network)
        radius = measure_receptive_radius(network, 1, multiple)
        _REACH[network] = int(radius) if radius is not None else 8 * multiple
    return _REACH[network]


_REACH = weakref.WeakKeyDictionary()


def memberships(network, density, tile=512, batch_size=4):
    """(H, W) density -> (H, W, K) float32 memberships, any size: padded to the network's
    multiple and cut into overlapping tiles (:class:`kerasnuc.predict.tiling.TilePlan`, the
    engine's tiling) whose margins cover the network's reach, so tiles give the whole-image
    memberships."""
    from kerasnuc.predict.tiling import TilePlan, fitting_margin

    density = np.asarray(density, dtype=np.float32)
    multiple = network_multiple(network)
    side = max(int(tile), multiple)
    if max(density.shape) > side:  # one tile needs no margin
        margin = fitting_margin((side, side), network_reach(network), multiple)
    else:
        margin = 0
    plan = TilePlan(*density.shape, tile=side, margin=margin, multiple=multiple)
    padded = plan.pad(density)
    outputs = []
    for indices in plan.batches(batch_size):
        batch = network(plan.extract(padded, indices), training=False)
        outputs.extend(np.asarray(batch, dtype=np.float32))
    return plan.stitch(outputs)


# ----------------------------------------------------------------------------- M-step and likelihood (keras.ops)


def cluster_sums(hsd, gamma):
    """Sufficient statistics per image and class: membership mass (B, K), first (B, K, C) and
    second (B, K, C) moments of (B, H, W, C) pixels weighted by (B, H, W, K) memberships.
    Sums of tiles (or row bands) of one image add up to the whole image's."""
    from keras import ops

    gamma = ops.convert_to_tensor(gamma)
    hsd = ops.cast(ops.convert_to_tensor(hsd), gamma.dtype)
    count = ops.sum(gamma, axis=(1, 2))
    first = ops.einsum("bhwk,bhwc->bkc", gamma, hsd)
    second = ops.einsum("bhwk,bhwc->bkc", gamma, hsd * hsd)
    return count, first, second


def gaussian_parameters(count, first, second, min_variance=MIN_VARIANCE):
    """The closed-form M-step from :func:`cluster_sums`: class means (B, K, C) and diagonal
    variances (B, K, C), the variances floored by ``min_variance``."""
    from keras import ops

    mass = ops.expand_dims(count, -1) + _EPSILON
    mean = first / mass
    variance = ops.maximum(second / mass - mean * mean, 0.0) + min_variance
    return mean, variance


def m_step(hsd, gamma, min_variance=MIN_VARIANCE):
    """(B, H, W, C) pixels, (B, H, W, K) memberships -> per-image class means and variances
    (B, K, C) each: the membership-weighted mean and variance of each channel."""
    return gaussian_parameters(*cluster_sums(hsd, gamma), min_variance=min_variance)


def mixture_nll(hsd, gamma, mean, variance):
    """(B,) mean negative log-likelihood per pixel of each image under the mixture
    ``sum_k gamma_ik N(x_i | mean_k, diag(variance_k))`` with per-pixel weights ``gamma``."""
    from keras import ops

    gamma = ops.convert_to_tensor(gamma)
    hsd = ops.cast(ops.convert_to_tensor(hsd), gamma.dtype)
    mean = ops.cast(mean, gamma.dtype)[:, None, None]  # (B, 1, 1, K, C)
    variance = ops.cast(variance, gamma.dtype)[:, None, None]
    diff = ops.expand_dims(hsd, -2) - mean  # (B, H, W, K, C)
    log_normal = -0.5 * ops.sum(ops.log(2.0 * np.pi * variance) + diff * diff / variance, axis=-1)
    log_pixel = ops.logsumexp(ops.log(gamma + _EPSILON) + log_normal, axis=-1)
    return -ops.mean(log_pixel, axis=(1, 2))


def dcgmm_loss(y_true, y_pred):
    """Keras loss: ``y_true`` the (B, H, W, 3) HSD tiles, ``y_pred`` the E-step memberships;
    the Gaussians come from the M-step of each image, so only the memberships are learnt."""
    mean, variance = m_step(y_true, y_pred)
    return mixture_nll(y_true, y_pred, mean, variance)


# ----------------------------------------------------------------------------- statistics and mapping (NumPy)


def image_statistics(hsd, gamma, rows=256):
    """Whole-image class fractions (K,), means (K, 3) and stds (K, 3), float64, from the
    M-step of :func:`cluster_sums` summed over bands of ``rows`` rows (bounded memory)."""
    from keras import ops

    totals = None
    for top in range(0, hsd.shape[0], rows):
        sums = [ops.convert_to_numpy(part) for part in cluster_sums(
            np.asarray(hsd[None, top:top + rows], np.float64),
            np.asarray(gamma[None, top:top + rows], np.float64))]
        totals = sums if totals is None else [total + part for total, part in zip(totals, sums)]
    count = totals[0]
    mean, variance = gaussian_parameters(*totals)
    fractions = count[0] / max(hsd.shape[0] * hsd.shape[1], 1)
    return fractions, ops.convert_to_numpy(mean)[0], np.sqrt(ops.convert_to_numpy(variance)[0])


def map_to_template(hsd, gamma, mean, std, template_mean, template_std, mapped):
    """(H, W, 3) HSD moved to the template's class Gaussians: for each class k with
    ``mapped[k]``, ``(x - mean_k) / std_k * template_std_k + template_mean_k``, else ``x``;
    blended by the memberships and clipped to the HSD colour triangle (D >= 0,
    cx in [-1, 2], |cy| <= sqrt(3))."""
    out = np.zeros(hsd.shape, dtype=np.float64)
    for k in range(gamma.shape[-1]):
        moved = (hsd - mean[k]) * (template_std[k] / std[k]) + template_mean[k] if mapped[k] else hsd
        out += gamma[..., k:k + 1] * moved
    out[..., 0] = np.maximum(out[..., 0], 0.0)
    out[..., 1] = np.clip(out[..., 1], *CX_RANGE)
    out[..., 2] = np.clip(out[..., 2], -SQRT3, SQRT3)
    return out


# ----------------------------------------------------------------------------- normaliser


class DCGMMNormalizer(StainNormalizer):
    """Stain normalisation with a trained DCGMM E-step network (``python -m kerasnuc.data.stain
    train-dcgmm``), behind the shared interface.

    ``model``: the network's ``.keras`` file or the folder ``train-dcgmm`` wrote (made absolute;
    a run's stain.json and an export's metadata store a copy beside them and a path relative
    to their folder, :func:`kerasnuc.data.stain.core.store_files`). ``tile`` and
    ``batch_size``: how large images are cut for the network. Statistics are over all pixels
    (glass is a class of its own); the tissue check only decides whether a tile is worth
    normalising. A class holding less than ``min_cluster_fraction`` of the image's or the
    template's pixels is left as it is (its statistics would be noise).
    Fitted: ``means_``, ``stds_`` (K, 3) HSD and ``weights_`` (K,) of the template.
    """

    method = "dcgmm"
    _fitted_names = ("means_", "stds_", "weights_")
    _file_params = ("model",)

    def __init__(self, model=None, tile=512, batch_size=4, min_cluster_fraction=1e-3, **kwargs):
        super().__init__(**kwargs)
        if not model:
            raise ValueError("dcgmm: needs model=PATH, the model.keras (or its folder) written by "
                             "python -m kerasnuc.data.stain train-dcgmm")
        path = os.path.abspath(os.fspath(model))
        if os.path.isdir(path):
            path = os.path.join(path, MODEL_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dcgmm: E-step network {path} not found "
                                    "(train one with python -m kerasnuc.data.stain train-dcgmm)")
        self.model = path
        self.tile = int(tile)
        self.batch_size = int(batch_size)
        self.min_cluster_fraction = float(min_cluster_fraction)

    @property
    def network(self):
        return load_estep(self.model)

    def statistics(self, rgb):
        """HSD (H, W, 3), memberships (H, W, K) and the class fractions, means, stds of an image."""
        hsd = rgb_to_hsd(rgb)
        gamma = memberships(self.network, hsd[..., 0], self.tile, self.batch_size)
        return (hsd, gamma) + image_statistics(hsd, gamma)

    def _fit_stats(self, rgb, mask):
        _, _, fractions, mean, std = self.statistics(rgb)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            raise StainEstimationError("class statistics are not finite")
        return {"means_": mean, "stds_": std, "weights_": fractions}

    def _transform(self, rgb, mask):
        if len(self.weights_) != self.network.output_shape[-1]:
            raise ValueError(f"dcgmm: the template statistics have {len(self.weights_)} classes, "
                             f"the network {self.model} has {self.network.output_shape[-1]}")
        hsd, gamma, fractions, mean, std = self.statistics(rgb)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(np.isfinite(gamma))):
            raise StainEstimationError("class statistics or memberships are not finite")
        mapped = (fractions >= self.min_cluster_fraction) & (self.weights_ >= self.min_cluster_fraction)
        out = map_to_template(hsd, gamma, mean, std, self.means_, self.stds_, mapped)
        if not np.all(np.isfinite(out)):
            raise StainEstimationError("normalised HSD is not finite")
        return hsd_to_rgb(out)


NORMALIZERS[DCGMMNormalizer.method] = DCGMMNormalizer
