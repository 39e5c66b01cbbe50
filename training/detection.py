"""The detection task (UD-Net): regress density maps on crops, tune peak finding on
validation images, score nucleus centres on held-out images.

Targets are :func:`kerasnuc.data.targets.density_map` maps (a Gaussian of
``config.density_sigma`` on every centre, isolated peaks at 1); detections are the local
maxima of the predicted map (:func:`kerasnuc.postprocess.centroids_from_density`), matched
one-to-one to the true centres within ``config.match_radius`` pixels. The primary figure
is the pooled precision/recall/F1 over all test points (TP/FP/FN summed over images);
per-image values and their mean are reported too.
"""

import math
import time

import cv2
import keras
import numpy as np

from kerasnuc import metrics, models
from kerasnuc.data.augment import Augmenter
from kerasnuc.data.splits import records_of
from kerasnuc.data.pipeline import DetectionDataset, record_points
from kerasnuc.runs import thresholds_record
from kerasnuc.losses import get_loss
from kerasnuc.models.geometry import input_multiple
from kerasnuc.postprocess import centroids_from_density
from training import plots
from training.callbacks import fit_into_run
from training.optimizers import make_optimizer

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MIN_DISTANCES = (2, 3, 4, 5, 6)
# Losses that make no sense for a linear density regression head.
NOT_REGRESSION = ("bce", "dice", "focal", "categorical", "categorical_focal")
# Keyword arguments of centroids_from_density that config.postprocess may carry.
PEAK_KEYS = ("threshold", "min_distance", "exclude_border", "refine", "refine_radius")


class _FixedCrops(DetectionDataset):
    """Validation crops that stay the same every epoch, so val_loss compares epochs fairly."""

    def on_epoch_end(self):
        pass

    def set_epoch(self, epoch):
        pass


def detection_loss(config, log):
    """The loss name used: the segmentation default (bce_dice) becomes mse; classification
    or segmentation losses are refused."""
    if config.loss == "bce_dice":
        log("detection: loss 'bce_dice' is the segmentation default; using 'mse' on the density maps")
        return "mse"
    if config.loss in NOT_REGRESSION:
        raise ValueError(f"detection regresses density maps; loss '{config.loss}' does not fit, use 'mse'")
    return config.loss


def build_model(config, loss):
    model = models.build(config.model, input_shape=(None, None, config.channels), **dict(config.model_config))
    model.compile(optimizer=make_optimizer(config), loss=get_loss(loss),
                  metrics=[keras.metrics.MeanAbsoluteError(name="mae")])
    return model


def train(config, run, train_records, val_records, loss, log):
    """Fit the model; the best epoch by validation loss is saved as model.keras."""
    multiple = input_multiple(config.model, config.model_config)
    model = build_model(config, loss)
    if models.task_of(config.model) != "detection":
        log(f"detection: model '{config.model}' is built for {models.task_of(config.model)}; "
            "training it on density maps anyway")
    log(f"model {config.model}: {model.count_params():,} parameters, input multiple {multiple}")
    augmenter = Augmenter(**config.augment) if config.augment else None
    train_data = DetectionDataset(train_records, tile=config.tile, batch_size=config.batch_size,
                                  sigma=config.density_sigma, steps=config.steps_per_epoch or None,
                                  channels=config.channels, augmenter=augmenter, seed=config.seed,
                                  workers=config.workers)
    val_data = None
    if val_records:
        val_data = _FixedCrops(val_records, tile=config.tile, batch_size=config.batch_size,
                               sigma=config.density_sigma, channels=config.channels, seed=config.seed + 1)
    log(f"training: {len(train_data)} batches of {config.batch_size} x {config.tile}^2 per epoch, "
        f"{config.epochs} epochs, density sigma {config.density_sigma}, loss {loss}"
        + (f"; validation {len(val_data)} fixed batches" if val_data is not None else ""))
    history = fit_into_run(model, run, train_data, val_data, config.epochs, log, config.time_budget,
                           init_weights=config.init_weights)
    return history, multiple


def predict_densities(model, records, config, multiple):
    """Predicted density map (H, W) per whole image (padded to the model multiple, cropped
    back); Monte-Carlo models average ``mc_samples`` passes."""
    from training.segmentation import held_out_engine

    engine = held_out_engine(model, config, multiple)
    passes = config.mc_samples if models.is_stochastic(model) else 1
    return [engine.predict_maps(record.image, tile=0, samples=passes)[0][..., 0] for record in records]


def peak_params(params):
    """The centroids_from_density keyword arguments in a post-processing dict."""
    return {k: params[k] for k in PEAK_KEYS if k in params}


def detections_for_thresholds(density, thresholds, min_distance):
    """{threshold: (K, 2) (x, y)} equal to ``centroids_from_density(density, threshold,
    min_distance)`` for each threshold, finding the peaks once at the lowest threshold.

    Why it is the same: peak_local_max keeps maxima above the threshold, then drops those
    within min_distance of a higher kept peak; a peak is only ever dropped by higher ones,
    so the peaks at threshold t are the low-threshold peaks whose value exceeds t.
    An untrained model's map has thousands of peaks, where peak finding dominates the grid.
    """
    from skimage.feature import peak_local_max

    from kerasnuc.postprocess.peaks import _centre_of_mass

    density = np.asarray(density, dtype=np.float64)
    distance = max(int(min_distance), 1)
    peaks = peak_local_max(density, min_distance=distance, threshold_abs=min(thresholds), exclude_border=False)
    values = density[peaks[:, 0], peaks[:, 1]] if len(peaks) else np.zeros(0)
    out = {}
    for threshold in thresholds:
        kept = peaks[values > threshold]
        if len(kept) == 0:
            out[threshold] = np.zeros((0, 2), np.float64)
            continue
        out[threshold] = _centre_of_mass(density, kept, distance, threshold)[:, ::-1].copy()
    return out


def _pooled_f1(predictions, truths, radius):
    tp = fp = fn = 0
    for found, truth in zip(predictions, truths):
        scores = metrics.detection_scores(truth, found, radius)
        tp, fp, fn = tp + scores["tp"], fp + scores["fp"], fn + scores["fn"]
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def tune_postprocess(densities, records, defaults, radius, log):
    """Grid-search threshold and min_distance for the best pooled F1 on validation images
    (other peak options in ``defaults`` are kept)."""
    base = peak_params(defaults)
    truths = [record_points(r) for r in records]
    fast = set(base) <= {"threshold", "min_distance"}  # the default peak options
    best, best_score = base, -1.0
    for min_distance in MIN_DISTANCES:
        if fast:
            grids = [detections_for_thresholds(d, THRESHOLDS, min_distance) for d in densities]
        for threshold in THRESHOLDS:
            params = {**base, "threshold": threshold, "min_distance": min_distance}
            if fast:
                found = [grid[threshold] for grid in grids]
            else:
                found = [centroids_from_density(d, **params) for d in densities]
            score = _pooled_f1(found, truths, radius)
            if score > best_score:
                best, best_score = params, float(score)
    log(f"peak finding tuned on {len(records)} validation images: threshold {best['threshold']}, "
        f"min_distance {best['min_distance']} (pooled F1 {best_score:.3f} at {radius:g} px)")
    return best, best_score


def _display(image):
    rgb = image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
    low, high = np.percentile(rgb, (0.5, 99.5))
    return np.clip((rgb.astype(np.float32) - low) / max(high - low, 1) * 255, 0, 255).astype(np.uint8)


def dots_panel(image, true_points, pred_points, radius=3):
    """RGB uint8: true centres as green dots, detections as smaller red dots on top."""
    out = np.ascontiguousarray(_display(image))
    for points, colour, size in ((true_points, (0, 255, 0), radius), (pred_points, (255, 0, 0), radius - 1)):
        for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2):
            cv2.circle(out, (int(round(x)), int(round(y))), size, colour, -1, lineType=cv2.LINE_AA)
    return out


def save_detections(records, predictions, per_image, path):
    """detections.png: the best and the worst test image by F1 (truth green, predicted red)."""
    order = np.argsort([row["f1"] for row in per_image])
    picks = list(dict.fromkeys([int(order[-1]), int(order[0])]))
    panels = [dots_panel(records[i].image, record_points(records[i]), predictions[i]) for i in picks]
    titles = [f"{records[i].name[:14]} F1 {per_image[i]['f1']:.2f} (green truth, red pred)" for i in picks]
    plots.save_overlays(panels, path, titles)


def run_task(config, run, records, split, log):
    """Train, tune, evaluate; writes model.keras, history.csv, curves.png, thresholds.json,
    metrics.json and detections.png into ``run``."""
    train_records, val_records, test_records = records_of(records, split)
    if not test_records:
        raise ValueError("detection: no test images to evaluate on")
    loss = detection_loss(config, log)
    radius = float(config.match_radius)
    started = time.time()
    history, multiple = train(config, run, train_records, val_records, loss, log)
    train_seconds = time.time() - started
    plots.plot_history(history, run.file("curves.png"))
    model = keras.models.load_model(run.file("model.keras"))

    params = peak_params(config.postprocess)
    val_f1 = None
    if config.tune_postprocess and val_records:
        val_densities = predict_densities(model, val_records, config, multiple)
        params, val_f1 = tune_postprocess(val_densities, val_records, params, radius, log)
    run.write_json("thresholds.json", thresholds_record("detection", params, "pooled_f1", val_f1, match_radius=radius,
                                                        density_sigma=config.density_sigma))

    # the held-out score is training.evaluate's (one evaluator, one metrics.json layout)
    from training import evaluate as scorer

    test_densities = predict_densities(model, test_records, config, multiple)
    density_of = {id(r): d for r, d in zip(test_records, test_densities)}
    result, artifacts = scorer.evaluate_detection(test_records, lambda record: {"mean": density_of[id(record)]},
                                                  params, radius, log=lambda message: None)
    pooled, per_image = result["pooled"], result["per_image"]
    run.write_json("metrics.json", {
        "split": "test", "images": len(test_records), **result, "primary": "pooled",
        "match_radius": radius, "postprocess": params, "loss": loss,
        "density_sigma": config.density_sigma, "epochs": len(history.get("loss", [])),
        "train_seconds": round(train_seconds, 1),
        "best_val_loss": float(min(history["val_loss"])) if history.get("val_loss") else None,
    })
    save_detections(test_records, artifacts["pred_points"], per_image, run.file("detections.png"))
    log(f"test ({len(test_records)} images, {pooled['tp'] + pooled['fn']} points, radius {radius:g} px): "
        f"pooled P {pooled['precision']:.3f} R {pooled['recall']:.3f} F1 {pooled['f1']:.3f}; "
        f"per-image mean F1 {result['mean']['f1']:.3f}")
    summary = {k: pooled[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn", "mean_distance")}
    summary.update({f"mean_{k}": result["mean"].get(k) for k in ("precision", "recall", "f1")})
    return {k: float(v) for k, v in summary.items() if v is not None and not math.isnan(v)}
