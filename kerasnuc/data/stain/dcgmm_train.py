"""Training a DCGMM E-step network on unlabelled H&E tiles and writing its folder.

Why unsupervised: the network is trained only to make the pixels likely under the mixture
its memberships define (:func:`kerasnuc.data.stain.dcgmm.dcgmm_loss`), so any folder of H&E
images will do. Random ``tile`` x ``tile`` crops with random dihedral transforms, Adam
(paper: 1e-4, 100,000 iterations). The folder holds::

    model.keras   the E-step network (standard layers only: loads in safe mode, no custom objects)
    dcgmm.json    the fitted normaliser (normalizer_from_dict: method, params with the absolute
                  model path, the template's class statistics), the template path and a
                  training summary (steps, the NLL curve, seconds)

both written atomically.
"""

import glob
import os
import time

import numpy as np

from kerasnuc.data.stain.dcgmm import MODEL_FILE, DCGMMNormalizer, build_estep, dcgmm_loss
from kerasnuc.data.stain.hsd import rgb_to_hsd

__all__ = ["read_unlabelled", "sample_tiles", "batch_nll", "train_dcgmm", "write_dcgmm", "JSON_FILE"]

JSON_FILE = "dcgmm.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_unlabelled(data, min_side=1):
    """RGB images for training: ``data`` a folder of images (no labels needed) or a dataset
    spec (``monuseg:PATH``, ``folder:PATH``, ...; :func:`kerasnuc.data.load_dataset`).
    Grey images and images smaller than ``min_side`` are left out. Returns [(name, rgb)]."""
    from kerasnuc.data import load_dataset
    from kerasnuc.data.imageio import DataError, read_image

    if os.path.isdir(data):
        paths = sorted(p for p in glob.glob(os.path.join(data, "*")) if p.lower().endswith(IMAGE_SUFFIXES))
        if not paths:
            raise DataError(f"{data}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        images = [(os.path.basename(p), read_image(p, channels=3)) for p in paths]
    else:
        images = [(r.name, r.image) for r in load_dataset(data) if r.channels == 3]
    usable = [(name, rgb) for name, rgb in images if min(rgb.shape[:2]) >= min_side]
    if not usable:
        raise DataError(f"{data}: no RGB images of at least {min_side} x {min_side} pixels "
                        f"({len(images)} images read)")
    return usable


def sample_tiles(images, rng, tile, batch):
    """(batch, tile, tile, 3) uint8 random crops, images drawn in proportion to their area,
    each crop turned by a random one of the 8 dihedral transforms."""
    areas = np.array([rgb.shape[0] * rgb.shape[1] for rgb in images], dtype=np.float64)
    picks = rng.choice(len(images), size=batch, p=areas / areas.sum())
    out = np.empty((batch, tile, tile, 3), np.uint8)
    for i, index in enumerate(picks):
        rgb = images[index]
        top = rng.integers(0, rgb.shape[0] - tile + 1)
        left = rng.integers(0, rgb.shape[1] - tile + 1)
        crop = np.rot90(rgb[top:top + tile, left:left + tile], k=int(rng.integers(4)))
        out[i] = crop[:, ::-1] if rng.integers(2) else crop
    return out


def batch_nll(network, rgb_tiles):
    """Mean DCGMM negative log-likelihood per pixel of (B, H, W, 3) uint8 tiles under ``network``."""
    from keras import ops

    hsd = rgb_to_hsd(rgb_tiles, np.float32)
    gamma = network(hsd[..., :1], training=False)
    return float(ops.convert_to_numpy(ops.mean(dcgmm_loss(hsd, gamma))))


def train_dcgmm(images, steps=1000, tile=128, batch=8, clusters=3, filters=16, depth=2,
                learning_rate=1e-4, seed=0, log=print, log_every=50):
    """Train an E-step network on random crops of ``images`` ((H, W, 3) uint8 arrays).

    Returns the network (uncompiled, ready to save) and a summary dict: the NLL of a fixed
    validation batch before and after, the training NLL averaged over each ``log_every``
    steps, seconds. ``log`` gets one progress line per ``log_every`` steps.
    """
    import keras

    images = [rgb for rgb in images if min(rgb.shape[:2]) >= tile]
    if not images:
        raise ValueError(f"dcgmm: no training image is at least {tile} x {tile} pixels")
    keras.utils.set_random_seed(int(seed))
    rng = np.random.default_rng(seed)
    validation = sample_tiles(images, np.random.default_rng(seed + 1), tile, batch)
    network = build_estep(clusters, filters, depth)
    network.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=dcgmm_loss)
    before = batch_nll(network, validation)
    log(f"dcgmm: {len(images)} images, {steps} steps of {batch} x {tile}x{tile} tiles, {clusters} classes, "
        f"{network.count_params():,} parameters, Adam {learning_rate:g}; validation NLL {before:.4f}")
    start, window, curve = time.monotonic(), [], []
    for step in range(1, steps + 1):
        hsd = rgb_to_hsd(sample_tiles(images, rng, tile, batch), np.float32)
        loss = network.train_on_batch(hsd[..., :1], hsd)
        window.append(float(np.asarray(loss).reshape(-1)[0]))
        if not np.isfinite(window[-1]):
            raise FloatingPointError(f"dcgmm: the NLL became {window[-1]} at step {step}; "
                                     f"lower the learning rate ({learning_rate:g})")
        if step % log_every == 0 or step == steps:
            curve.append([step, float(np.mean(window))])
            elapsed = time.monotonic() - start
            log(f"dcgmm: step {step}/{steps} NLL {curve[-1][1]:.4f} "
                f"({elapsed:.0f} s, {step / max(elapsed, 1e-9):.1f} steps/s)")
            window = []
    trained = build_estep(clusters, filters, depth)  # without the optimizer and the loss
    trained.set_weights(network.get_weights())
    after = batch_nll(trained, validation)
    summary = {"steps": int(steps), "tile": int(tile), "batch": int(batch), "clusters": int(clusters),
               "filters": int(filters), "depth": int(depth), "learning_rate": float(learning_rate),
               "seed": int(seed), "images": len(images), "validation_nll_before": before,
               "validation_nll_after": after, "nll_curve": curve,
               "seconds": round(time.monotonic() - start, 1)}
    return trained, summary


def write_dcgmm(out_dir, network, template_rgb, template_path=None, summary=None):
    """Write ``model.keras`` and ``dcgmm.json`` (the normaliser fitted on the template) into
    ``out_dir``, each atomically; returns the fitted :class:`DCGMMNormalizer`."""
    from kerasnuc.atomic import atomic_path, made_folders
    from kerasnuc.runs import write_json_atomic

    with made_folders(out_dir):
        model_path = os.path.join(os.path.abspath(out_dir), MODEL_FILE)
        with atomic_path(model_path) as tmp:
            network.save(tmp)
        normalizer = DCGMMNormalizer(model=model_path).fit(template_rgb)
        record = {"template": os.path.abspath(template_path) if template_path else None,
                  **normalizer.to_dict(), "training": summary or {}}
        write_json_atomic(os.path.join(out_dir, JSON_FILE), record)
    return normalizer
