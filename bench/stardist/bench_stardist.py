#!/usr/bin/env python3
"""StarDist 2D side of the benchmark (bench-only; never imported by kerasnuc).

Run with the bench venv's python (``bash bench/stardist/setup.sh`` creates it):

    PY=bench/.venv-stardist/bin/python
    $PY bench/stardist/bench_stardist.py train   --data ../shared/data/dsb2018/stage1_train --out runs/stardist/dsb2018 \
            --epochs 400 --steps 100
    $PY bench/stardist/bench_stardist.py predict --model runs/stardist/dsb2018 \
            --images ../shared/data/dsb2018/stage1_test/images --out stardist_predict.json --labels-out /tmp/sd_labels
    $PY bench/stardist/bench_stardist.py mosaic  --images ../shared/data/dsb2018/stage1_test/images --size 8192 \
            --out /tmp/mosaic.tif --pyramid
    $PY bench/stardist/bench_stardist.py big     --model runs/stardist/dsb2018 --image /tmp/mosaic.tif --out big.json

Only numpy, imageio/tifffile (installed with stardist), csbdeep and stardist are used.

Training follows StarDist's own example notebook (examples/2D/2_training.ipynb): csbdeep
``normalize(x, 1, 99.8, axis=(0,1))``, ``fill_label_holes``, ``Config2D(n_rays=32, grid=(2,2))``,
random flips/rot90 + random intensity change + Gaussian noise, ``model.train`` and then
``model.optimize_thresholds(X_val, Y_val)``. Deviations, all on purpose: a 90/10 split (the notebook
uses 85/15, ``--val-frac 0.15`` restores it) with ``--seed`` (the notebook uses 42); DSB images are
converted to one channel (mean of RGB), as StarDist's ``2D_dsb2018`` model sees them; H&E keeps 3.

Timing split in ``predict``: StarDist 0.9's ``predict_instances`` only drains the generator
``_predict_instances_generator``, which yields the marker ``'predict'`` just before the network
part and ``'nms'`` just before ``_instances_from_prediction``. We drain that same generator
ourselves and time stamp the markers, so the work done is exactly ``predict_instances``' (same
defaults, sparse=True) and:
  network_s     = 'predict' -> 'nms': ``_predict_sparse_generator`` = padding, Keras forward pass,
                  and the (cheap) selection of candidate pixels with prob > prob_thresh;
  postprocess_s = 'nms' -> result: ``_instances_from_prediction`` = polygon NMS + polygons_to_label;
  seconds       = call -> result (= predict_instances end to end; image reading and the
                  percentile normalisation are outside it and reported apart as normalize_s).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import resource
import sys
import time

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


# ----------------------------------------------------------------------------- environment

def _setup_env(threads: int) -> None:
    """Must run before TensorFlow (and numba / OpenMP code) is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads and threads > 0:
        for k in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "NUMBA_NUM_THREADS",
                  "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[k] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"


def _tf_threads(threads: int) -> None:
    import tensorflow as tf
    if threads and threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def _versions() -> dict:
    import numpy as np
    import tensorflow as tf
    import keras
    import csbdeep
    import stardist
    return {"python": platform.python_version(), "numpy": np.__version__, "tensorflow": tf.__version__,
            "keras": keras.__version__, "csbdeep": csbdeep.__version__, "stardist": stardist.__version__,
            "TF_USE_LEGACY_KERAS": os.environ.get("TF_USE_LEGACY_KERAS", "0")}


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- I/O helpers

def list_images(folder: str) -> list[str]:
    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    return files


def read_image(path: str):
    import numpy as np
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile
        with tifffile.TiffFile(path) as tf:
            img = tf.series[0].levels[0].asarray()  # level 0 of a pyramid (or the only level)
    else:
        import imageio.v3 as iio
        img = iio.imread(path)
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 4:  # RGBA -> RGB (DSB's alpha is 255 everywhere)
        img = img[..., :3]
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    return img


def to_channels(img, n_channel: int):
    """One channel: mean of RGB (as StarDist's 2D_dsb2018 sees DSB); three: grey is repeated."""
    import numpy as np
    if n_channel == 1:
        if img.ndim == 3:
            img = img[..., :3].astype(np.float32).mean(axis=-1)
        return img
    if n_channel == 3:
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        if img.shape[-1] != 3:
            raise ValueError(f"expected 3 channels, got shape {img.shape}")
        return img
    raise ValueError(f"n_channel {n_channel} not supported")


def write_labels(path_stem: str, lab) -> str:
    """uint16 PNG when it fits (cv2/imageio read it back unchanged), else uint32 TIFF."""
    import numpy as np
    lab = np.asarray(lab)
    if lab.size == 0 or int(lab.max()) < 65536:
        import imageio.v3 as iio
        path = path_stem + ".png"
        iio.imwrite(path, lab.astype(np.uint16))
    else:
        import tifffile
        path = path_stem + ".tif"
        tifffile.imwrite(path, lab.astype(np.uint32), compression="zlib")
    return path


def find_label(label_dir: str, image_path: str) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for ext in IMAGE_EXTS:
        p = os.path.join(label_dir, stem + ext)
        if os.path.exists(p):
            return p
    raise SystemExit(f"no label for {image_path} in {label_dir}")


def load_model(model_dir: str):
    from stardist.models import StarDist2D
    model_dir = os.path.abspath(model_dir.rstrip("/"))
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise SystemExit(f"{model_dir}/config.json not found")
    return StarDist2D(None, name=os.path.basename(model_dir), basedir=os.path.dirname(model_dir))


def _dump(obj, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        f.write("\n")
    print(f"wrote {path}", flush=True)


# ----------------------------------------------------------------------------- augmentation (notebook)

def random_fliprot(img, mask):
    import numpy as np
    assert img.ndim >= mask.ndim
    axes = tuple(range(mask.ndim))
    perm = tuple(np.random.permutation(axes))
    img = img.transpose(perm + tuple(range(mask.ndim, img.ndim)))
    mask = mask.transpose(perm)
    for ax in axes:
        if np.random.rand() > 0.5:
            img = np.flip(img, axis=ax)
            mask = np.flip(mask, axis=ax)
    return img, mask


def random_intensity_change(img):
    import numpy as np
    return img * np.random.uniform(0.6, 2) + np.random.uniform(-0.2, 0.2)


def augmenter(x, y):
    import numpy as np
    x, y = random_fliprot(x, y)
    x = random_intensity_change(x)
    sig = 0.02 * np.random.uniform(0, 1)
    x = x + sig * np.random.normal(0, 1, x.shape)
    return x, y


# ----------------------------------------------------------------------------- train

def cmd_train(a) -> dict:
    import numpy as np
    import keras
    from csbdeep.utils import normalize
    from stardist import fill_label_holes, calculate_extents
    from stardist.models import Config2D, StarDist2D

    _tf_threads(a.threads)
    keras.utils.set_random_seed(a.seed)  # python, numpy and TF seeds (augmenter uses np.random)
    img_dir = os.path.join(a.data, "images")
    lab_dir = os.path.join(a.data, "labels")
    files = list_images(img_dir)
    if a.limit:
        files = files[: a.limit]
    t0 = time.perf_counter()
    raw = [read_image(f) for f in files]
    Y = [fill_label_holes(read_image(find_label(lab_dir, f))) for f in files]

    if a.channels == "auto":
        # DSB is a grey/RGB mix -> one channel; an all-RGB set outside DSB (H&E) -> three
        n_grey = sum(x.ndim == 2 for x in raw)
        n_channel = 1 if (n_grey > 0 or "dsb" in os.path.abspath(a.data).lower()) else 3
    else:
        n_channel = int(a.channels)
    X = [normalize(to_channels(x, n_channel), 1, 99.8, axis=(0, 1)).astype(np.float32) for x in raw]
    del raw
    load_s = time.perf_counter() - t0
    print(f"{len(X)} images, {n_channel} channel(s), loaded+normalised in {load_s:.1f} s", flush=True)

    small = [f for f, y in zip(files, Y) if min(y.shape[:2]) < a.patch]
    if small:
        raise SystemExit(f"{len(small)} images smaller than --patch {a.patch}, e.g. {small[0]}")

    rng = np.random.RandomState(a.seed)
    ind = rng.permutation(len(X))
    n_val = max(1, int(round(a.val_frac * len(ind))))
    ind_train, ind_val = ind[:-n_val], ind[-n_val:]
    X_val, Y_val = [X[i] for i in ind_val], [Y[i] for i in ind_val]
    X_trn, Y_trn = [X[i] for i in ind_train], [Y[i] for i in ind_train]
    print(f"- training: {len(X_trn)}  - validation: {len(X_val)}", flush=True)

    conf = Config2D(n_rays=a.rays, grid=(a.grid, a.grid), use_gpu=False, n_channel_in=n_channel,
                    train_patch_size=(a.patch, a.patch), train_epochs=a.epochs,
                    train_steps_per_epoch=a.steps, train_batch_size=a.batch_size,
                    train_tensorboard=a.tensorboard)
    out = os.path.abspath(a.out.rstrip("/"))
    model = StarDist2D(conf, name=os.path.basename(out), basedir=os.path.dirname(out))
    print(conf, flush=True)

    median_size = calculate_extents(list(Y_trn), np.median)
    fov = np.array(model._axes_tile_overlap("YX"))
    print(f"median object size: {median_size}; network field of view: {fov}", flush=True)
    if any(median_size > fov):
        print("WARNING: median object size larger than field of view of the neural network.", flush=True)

    t1 = time.perf_counter()
    hist = model.train(X_trn, Y_trn, validation_data=(X_val, Y_val), augmenter=augmenter,
                       epochs=a.epochs, steps_per_epoch=a.steps)
    train_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    thr = model.optimize_thresholds(X_val, Y_val)
    thr_s = time.perf_counter() - t2

    summary = {
        "data": os.path.abspath(a.data), "images": len(files), "n_channel_in": n_channel,
        "train_images": [os.path.basename(files[i]) for i in ind_train],
        "val_images": [os.path.basename(files[i]) for i in ind_val],
        "seed": a.seed, "val_frac": a.val_frac, "epochs": a.epochs, "steps_per_epoch": a.steps,
        "batch_size": a.batch_size, "patch": a.patch, "grid": a.grid, "n_rays": a.rays,
        "threads": a.threads, "load_s": round(load_s, 3), "train_s": round(train_s, 3),
        "optimize_thresholds_s": round(thr_s, 3), "thresholds": {k: float(v) for k, v in thr.items()},
        "history": {k: [float(v) for v in vs] for k, vs in hist.history.items()},
        "peak_rss_mb": round(_peak_rss_mb(), 1), "versions": _versions(),
    }
    _dump(summary, os.path.join(out, "bench_train.json"))
    return summary


# ----------------------------------------------------------------------------- predict

def timed_predict_instances(model, img, **kwargs):
    """Drain predict_instances' own generator and time stamp its 'predict' / 'nms' markers."""
    t0 = time.perf_counter()
    t_pred = t_nms = None
    result = None
    for r in model._predict_instances_generator(img, **kwargs):
        if isinstance(r, str):
            if r == "predict":
                t_pred = time.perf_counter()
            elif r == "nms":
                t_nms = time.perf_counter()
        else:
            result = r
    t_end = time.perf_counter()
    if t_pred is None or t_nms is None:
        raise RuntimeError("StarDist's generator no longer yields 'predict'/'nms'; timing split broken")
    return result, {"seconds": t_end - t0, "network_s": t_nms - t_pred, "postprocess_s": t_end - t_nms,
                    "setup_s": t_pred - t0}


def _tracing_count(model):
    """How many times Keras traced its predict function (Keras 3 / TF backend); None if unknown."""
    fn = getattr(model.keras_model, "predict_function", None)
    get = getattr(fn, "experimental_get_tracing_count", None)
    try:
        return int(get()) if get else None
    except Exception:
        return None


def warm_up(model, x, kw) -> float:
    """Untimed: predict_instances on x, then the network on two other input shapes.

    Keras 3 traces model.predict's tf.function again whenever an input dimension changes, until
    that dimension has been relaxed to None (0.3-1 s per trace on a 2-core CPU). Growing both
    dimensions in the warm-up relaxes both, so the timed images trigger no trace
    (``retraces_during_timing`` in the JSON checks that).
    """
    import numpy as np
    t = time.perf_counter()
    model.predict_instances(x, **kw)
    for pad in (64, 128):
        width = ((0, pad), (0, pad)) + (((0, 0),) if x.ndim == 3 else ())
        model.predict(np.pad(x, width), **kw)
    return time.perf_counter() - t


def cmd_predict(a) -> dict:
    import numpy as np
    from csbdeep.utils import normalize

    _tf_threads(a.threads)
    model = load_model(a.model)
    n_channel = model.config.n_channel_in
    files = list_images(a.images)
    if a.limit:
        files = files[: a.limit]
    if a.labels_out:
        os.makedirs(a.labels_out, exist_ok=True)
    kw = {}
    if a.n_tiles:
        kw["n_tiles"] = tuple(a.n_tiles) + ((1,) if n_channel > 1 else ())
        kw["show_tile_progress"] = False

    def prep(f):
        img = to_channels(read_image(f), n_channel)
        t = time.perf_counter()
        x = normalize(img, 1, 99.8, axis=(0, 1))
        return x, time.perf_counter() - t

    warm = None
    if a.warmup and files:
        x, _ = prep(files[0])
        warm = warm_up(model, x, kw)
        print(f"warm-up (first image at 3 input shapes, untimed): {warm:.2f} s, "
              f"{_tracing_count(model)} trace(s) of Keras' predict function", flush=True)
    traces0 = _tracing_count(model)

    check = None
    per = []
    for i, f in enumerate(files):
        x, norm_s = prep(f)
        (lab, details), t = timed_predict_instances(model, x, **kw)
        if i == 0 and a.check:
            # the split must not change the result: compare with the public call once
            lab2, _ = model.predict_instances(x, **kw)
            check = bool(np.array_equal(lab, lab2))
        name = os.path.splitext(os.path.basename(f))[0]
        rec = {"image": os.path.basename(f), "shape": list(x.shape), "pixels": int(x.shape[0] * x.shape[1]),
               "seconds": round(t["seconds"], 5), "network_s": round(t["network_s"], 5),
               "postprocess_s": round(t["postprocess_s"], 5), "setup_s": round(t["setup_s"], 6),
               "normalize_s": round(norm_s, 5), "n_nuclei": int(len(details["prob"]))}
        if a.labels_out:
            rec["labels"] = write_labels(os.path.join(a.labels_out, name), lab)
        per.append(rec)
        print(f"[{i + 1}/{len(files)}] {rec['image'][:24]} {x.shape[0]}x{x.shape[1]}: {t['seconds']:.3f} s "
              f"(net {t['network_s']:.3f}, post {t['postprocess_s']:.3f}), {rec['n_nuclei']} nuclei", flush=True)

    px = sum(r["pixels"] for r in per)
    tot = {k: sum(r[k] for r in per) for k in ("seconds", "network_s", "postprocess_s", "normalize_s")}
    mp = px / 1e6
    out = {
        "model": os.path.abspath(a.model), "images_dir": os.path.abspath(a.images), "n_images": len(per),
        "n_channel_in": n_channel, "thresholds": {"prob": float(model.thresholds.prob),
                                                  "nms": float(model.thresholds.nms)},
        "predict_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
        "threads": a.threads, "warmup_s": None if warm is None else round(warm, 4),
        "split_equals_predict_instances": check,
        "retraces_during_timing": (None if traces0 is None or _tracing_count(model) is None
                                   else _tracing_count(model) - traces0),
        "timing": ("seconds: predict_instances end to end (StarDist's own generator drained here, "
                   "defaults incl. sparse=True); network_s: from its 'predict' marker to its 'nms' marker "
                   "(padding + Keras forward + candidate selection); postprocess_s: 'nms' marker to result "
                   "(_instances_from_prediction: NMS + polygons_to_label). Reading and normalisation excluded."),
        "totals": {"pixels": px, "megapixels": round(mp, 4), **{k: round(v, 4) for k, v in tot.items()},
                   "mp_per_s": round(mp / tot["seconds"], 4) if tot["seconds"] else None,
                   "network_mp_per_s": round(mp / tot["network_s"], 4) if tot["network_s"] else None,
                   "postprocess_mp_per_s": round(mp / tot["postprocess_s"], 4) if tot["postprocess_s"] else None,
                   "mean_seconds_per_image": round(tot["seconds"] / len(per), 5) if per else None},
        "peak_rss_mb": round(_peak_rss_mb(), 1), "versions": _versions(), "per_image": per,
    }
    _dump(out, a.out)
    t = out["totals"]
    print(f"{len(per)} images, {t['megapixels']} MP in {t['seconds']:.3f} s = {t['mp_per_s']} MP/s "
          f"(network {t['network_s']:.3f} s, post-processing {t['postprocess_s']:.3f} s)", flush=True)
    return out


# ----------------------------------------------------------------------------- big

def _percentiles(img, n_channel: int, max_samples: int = 1 << 24):
    """1 / 99.8 percentiles like csbdeep's normalize(axis=(0,1)), on a regular subsample if huge."""
    import numpy as np
    step = max(1, int(math.ceil(math.sqrt(img.shape[0] * img.shape[1] / max_samples))))
    sub = np.asarray(img[::step, ::step])
    if n_channel == 1:
        sub = to_channels(sub, 1)
        return (np.percentile(sub, 1).astype(np.float32), np.percentile(sub, 99.8).astype(np.float32), step)
    sub = to_channels(sub, n_channel)
    return (np.percentile(sub, 1, axis=(0, 1), keepdims=True).astype(np.float32),
            np.percentile(sub, 99.8, axis=(0, 1), keepdims=True).astype(np.float32), step)


def cmd_big(a) -> dict:
    import numpy as np
    from csbdeep.data import Normalizer, normalize_mi_ma

    _tf_threads(a.threads)
    model = load_model(a.model)
    n_channel = model.config.n_channel_in

    t = time.perf_counter()
    img = read_image(a.image)
    read_s = time.perf_counter() - t
    raw_shape, raw_dtype = list(img.shape), str(img.dtype)
    if n_channel == 1 and img.ndim == 3:
        img = to_channels(img, 1)  # float32 copy (4 B/pixel)
    elif n_channel == 3 and img.ndim == 2:
        img = to_channels(img, 3)
    rss_after_read = _peak_rss_mb()
    axes = "YX" if img.ndim == 2 else "YXC"

    t = time.perf_counter()
    mi, ma, step = _percentiles(img, n_channel)
    pct_s = time.perf_counter() - t

    class PercentileNormalizer(Normalizer):
        """Global 1/99.8 % percentiles, applied block by block (no full float copy of the image)."""
        def before(self, x, axes_):
            return normalize_mi_ma(x, mi, ma, dtype=np.float32)

        def after(self, *args, **kwargs):
            raise NotImplementedError

        @property
        def do_after(self):
            return False

    # StarDist's block cover needs block <= image size: clamp per axis (to a multiple of the grid)
    grid = model.config.grid
    block = [a.block if a.block <= n else (n // g) * g for n, g in zip(img.shape[:2], grid)]
    context = None if a.context < 0 else a.context
    kw = {}
    if a.tile:
        # tile each block's forward pass so the U-Net activations stay bounded on CPU
        kw["n_tiles"] = tuple(max(1, int(math.ceil(b_ / a.tile))) for b_ in block) + \
            ((1,) if axes == "YXC" else ())
        kw["show_tile_progress"] = False
    if axes == "YXC":
        block = block + [img.shape[2]]
    warm = None
    if a.warmup:
        crop = img[:512, :512]
        warm = warm_up(model, PercentileNormalizer().before(crop, axes), {})
        print(f"warm-up (512x512 crop at 3 shapes, untimed): {warm:.2f} s", flush=True)
    traces0 = _tracing_count(model)
    t = time.perf_counter()
    labels, polys = model.predict_instances_big(
        img, axes=axes, block_size=block, min_overlap=a.min_overlap, context=context,
        normalizer=PercentileNormalizer(), show_progress=False, labels_out_dtype=np.int32, **kw)
    secs = time.perf_counter() - t
    px = int(img.shape[0] * img.shape[1])
    n = int(len(polys["prob"]))
    lab_path = None
    if a.labels_out:
        lab_path = write_labels(os.path.splitext(a.labels_out)[0], labels)
    out = {
        "model": os.path.abspath(a.model), "image": os.path.abspath(a.image), "shape": raw_shape,
        "dtype": raw_dtype, "axes": axes, "n_channel_in": n_channel, "block": a.block,
        "block_effective": block[:2], "min_overlap": a.min_overlap,
        "context": "auto" if context is None else context,
        "context_recommended": [int(v) for v in model._axes_tile_overlap("YX")],
        "predict_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
        "threads": a.threads,
        "normalisation": f"global 1/99.8 percentiles on every {step}th pixel per axis, applied per block",
        "warmup_s": None if warm is None else round(warm, 3),
        "retraces_during_timing": (None if traces0 is None or _tracing_count(model) is None
                                   else _tracing_count(model) - traces0),
        "read_s": round(read_s, 3), "percentile_s": round(pct_s, 3), "seconds": round(secs, 3),
        "pixels": px, "megapixels": round(px / 1e6, 3), "mp_per_s": round(px / 1e6 / secs, 4),
        "n_nuclei": n, "peak_rss_before_predict_mb": round(rss_after_read, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
        "labels": lab_path, "versions": _versions(),
    }
    _dump(out, a.out)
    print(f"{raw_shape} in {secs:.2f} s = {out['mp_per_s']} MP/s, {n} nuclei, peak RSS {out['peak_rss_mb']} MB",
          flush=True)
    return out


# ----------------------------------------------------------------------------- mosaic (test input for big)

def cmd_mosaic(a) -> dict:
    """Tile images (cropped/padded to --cell) into a size x size TIFF; --pyramid adds half-size levels."""
    import numpy as np
    import tifffile
    files = list_images(a.images)
    grey = a.channels == 1
    cell = a.cell
    n = a.size // cell
    canvas = np.zeros((a.size, a.size) if grey else (a.size, a.size, 3), np.uint8)
    k = 0
    for r in range(n):
        for c in range(n):
            img = read_image(files[k % len(files)])
            k += 1
            if img.dtype != np.uint8:
                img = (255.0 * img / max(1, img.max())).astype(np.uint8)
            img = np.round(to_channels(img, 1)).astype(np.uint8) if grey else to_channels(img, 3)
            h, w = min(cell, img.shape[0]), min(cell, img.shape[1])
            canvas[r * cell:r * cell + h, c * cell:c * cell + w] = img[:h, :w]
    levels = [canvas]
    if a.pyramid:
        while min(levels[-1].shape[:2]) > 512:
            levels.append(levels[-1][::2, ::2])
    with tifffile.TiffWriter(a.out, bigtiff=True) as tw:
        opts = dict(tile=(256, 256), compression="zlib", photometric="minisblack" if grey else "rgb")
        tw.write(levels[0], subifds=len(levels) - 1, **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)
    print(f"wrote {a.out}: {canvas.shape}, {k} tiles from {a.images}, {len(levels)} level(s)", flush=True)
    return {"out": a.out, "shape": list(canvas.shape), "levels": len(levels)}


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--threads", type=int, default=0,
                        help="TF intra-op / OpenMP threads (0 = library defaults)")

    t = sub.add_parser("train", help="StarDist's notebook recipe + optimize_thresholds")
    t.add_argument("--data", required=True, help="folder with images/ and labels/")
    t.add_argument("--out", required=True, help="model folder to write")
    t.add_argument("--epochs", type=int, required=True)
    t.add_argument("--steps", type=int, required=True, help="steps per epoch")
    t.add_argument("--grid", type=int, default=2)
    t.add_argument("--rays", type=int, default=32)
    t.add_argument("--patch", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=4, help="Config2D default 4")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-frac", type=float, default=0.1)
    t.add_argument("--limit", type=int, default=0, help="use only the first N images (sorted)")
    t.add_argument("--channels", default="auto", choices=("auto", "1", "3"),
                   help="auto: 1 for DSB / any grey image (mean of RGB), else 3")
    t.add_argument("--tensorboard", action="store_true", help="Config2D train_tensorboard (needs tensorboard)")
    common(t)

    q = sub.add_parser("predict", help="time predict_instances per image, split network / post-processing")
    q.add_argument("--model", required=True)
    q.add_argument("--images", required=True)
    q.add_argument("--limit", type=int, default=0)
    q.add_argument("--out", required=True, help="JSON to write")
    q.add_argument("--labels-out", default=None, help="folder for uint16 PNG (uint32 TIFF if needed) labels")
    q.add_argument("--n-tiles", type=int, nargs=2, default=None, help="n_tiles for predict_instances (Y X)")
    q.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="do not run one untimed warm-up prediction on the first image")
    q.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the one-off check that the timed split equals predict_instances' labels")
    common(q)

    b = sub.add_parser("big", help="predict_instances_big on a large (pyramidal) TIFF")
    b.add_argument("--model", required=True)
    b.add_argument("--image", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--block", type=int, default=4096)
    b.add_argument("--min-overlap", type=int, default=128)
    b.add_argument("--context", type=int, default=64,
                   help="-1 = StarDist's automatic value (the network's receptive field)")
    b.add_argument("--tile", type=int, default=1024,
                   help="tile each block's forward pass into ~TILE px tiles (0 = whole block at once)")
    b.add_argument("--labels-out", default=None, help="write the label image (PNG/TIFF path)")
    b.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="do not warm up (trace) the network on a crop before timing")
    common(b)

    m = sub.add_parser("mosaic", help="write a test mosaic TIFF for `big`")
    m.add_argument("--images", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--size", type=int, default=2048)
    m.add_argument("--cell", type=int, default=256)
    m.add_argument("--channels", type=int, default=1, choices=(1, 3))
    m.add_argument("--pyramid", action="store_true")

    a = p.parse_args(argv)
    _setup_env(getattr(a, "threads", 0))
    return {"train": cmd_train, "predict": cmd_predict, "big": cmd_big, "mosaic": cmd_mosaic}[a.cmd](a)


if __name__ == "__main__":
    main()
