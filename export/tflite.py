"""Export a training run as a LiteRT (``.tflite``) model, with metadata and an agreement report.

    python -m export.tflite RUN_DIR --quantize {float32,float16,dynamic,int8} [--input-size N|HxW] [--out PATH]

writes ``PATH`` (default ``RUN_DIR/export/<model>_<quantize>[_<H>x<W>].tflite``) and beside it:

* ``<stem>.json``: the metadata ``serving.edge`` needs (task, channels, input multiple,
  tile sizes, tuned thresholds, class names, input quantisation) plus what was converted;
* ``<stem>.report.json`` / ``.report.md``: file size; agreement with the Keras model on
  the run's held-out (test split) images: max |difference| of the maps, Dice / object F1 of
  the post-processed nuclei (segmentation), F1 of the centres (detection) or label
  agreement (classification), and the same scores against the truth for both; LiteRT
  latency per image (``ai_edge_litert.interpreter.Interpreter``, median of repeats).

What the .tflite computes: the Keras model only; its input is the *normalised* image
(float32 in [0, 1]; for ``int8`` uint8 with the quantisation stored in the input tensor,
scale ~1/255, zero point 0). Normalisation (per-image min-max) happens in
``serving.edge`` with NumPy, exactly as in training.

Static input (``--input-size``): NPU / Edge TPU / NNAPI delegates need static shapes, and
a dynamic (None, None, None, C) input leaves SHAPE/PACK ops around TRANSPOSE_CONV. The model
is rebuilt from its config with the input fixed at [1, H, W, C] (H, W multiples of the
input multiple; a classifier only takes its patch size, which then fixes the batch to 1)
and the metadata records ``tflite.static_input``; ``serving.edge`` runs images in H x W
tiles (margin ``tile_margin``, lowered to fit) and batches as batch-1 calls, and so does
the report, whose maps and latencies are then the tiled ones.

Checks: the model must fit what the run's config.json claims (task, channels, classes, model
family: :mod:`kerasnuc.model_checks`) before anything is converted; the files are written in
a hidden staging folder and moved into place when all four are complete, so a failed export
leaves nothing (errors: one line, exit status 1).

Quantisation: ``float16`` weights; ``dynamic`` int8 weights, float activations; ``int8``
full-integer (weights and activations, uint8 input and output), calibrated by a
representative dataset of crops (patches for classifiers) of the run's *training* images
(split.json + the data spec in config.json, stain-normalised like training). A Mask R-CNN
keeps its detection layers (``Float32Layer``: proposals and NMS, RoIAlign, detections,
class masks) in float32 inside the int8 model and gives float32 outputs: quantised to int8,
box coordinates lose sub-pixel precision and an IoU union of padding boxes rounds to a zero
divisor, which LiteRT's int8 DIV refuses at invoke.

Conversion goes through a float32 copy of the model when needed: a model trained under a
mixed-precision policy is rebuilt from its config under float32 and given the same
weights; Monte-Carlo dropout (``kerasnuc.models.MCDropout``, which emits Keras' stateless
RNG ops that LiteRT cannot run) is swapped for :class:`LiteStochasticDropout`, the same
inverted dropout written with ``tf.random.uniform`` (LiteRT's RANDOM_UNIFORM builtin).
The export checks that the converted model is still stochastic in LiteRT and records it.
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

QUANTIZATIONS = ("float32", "float16", "dynamic", "int8")


@keras.saving.register_keras_serializable(package="kerasnuc_export")
class LiteStochasticDropout(keras.layers.Dropout):
    """Inverted dropout that is always on, written with TF ops that LiteRT has (RANDOM_UNIFORM).

    Same distribution as :class:`kerasnuc.models.MCDropout` (keep with probability
    ``1 - rate``, scale kept values by ``1 / (1 - rate)``), a different random stream.
    TensorFlow backend only: used for conversion, never for training.
    """

    def call(self, inputs, training=None):
        keep = tf.cast(tf.random.uniform(tf.shape(inputs), dtype=tf.float32) >= self.rate, inputs.dtype)
        return inputs * keep / tf.cast(1.0 - self.rate, inputs.dtype)


def _is_mixed(model):
    return any(getattr(layer, "dtype_policy", None) is not None
               and layer.dtype_policy.compute_dtype != "float32" for layer in model.layers)


def conversion_model(model, batch_shape=None):
    """(model to convert, notes): a float32, LiteRT-convertible copy where one is needed.

    ``batch_shape`` (e.g. [1, H, W, C]) rebuilds the model with that fixed input shape.
    """
    from kerasnuc.models import is_stochastic

    mixed, stochastic = _is_mixed(model), is_stochastic(model)
    if not (mixed or stochastic or batch_shape):
        return model, []
    config = model.get_config()
    notes = []
    if batch_shape:
        inputs = [layer for layer in config["layers"] if layer.get("class_name") == "InputLayer"]
        if len(inputs) != 1:
            raise ValueError(f"a static input needs a functional model with one input, "
                             f"{model.name} has {len(inputs)}")
        inputs[0]["config"]["batch_shape"] = [int(s) for s in batch_shape]
        notes.append(f"input fixed to {[int(s) for s in batch_shape]} (static shapes for edge accelerators)")
    for layer in config["layers"]:
        if layer.get("class_name") == "MCDropout" or layer.get("registered_name") == "kerasnuc>MCDropout":
            layer.update(class_name="LiteStochasticDropout", module="export.tflite",
                         registered_name="kerasnuc_export>LiteStochasticDropout")
        dtype = layer.get("config", {}).get("dtype")
        if mixed and dtype is not None and "mixed" in json.dumps(dtype):
            layer["config"]["dtype"] = "float32"
    if mixed:
        notes.append("mixed-precision model rebuilt under float32 with the same weights")
    if stochastic:
        notes.append("MCDropout swapped for LiteStochasticDropout (tf.random.uniform -> LiteRT RANDOM_UNIFORM)")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        copy = keras.Model.from_config(config, custom_objects={
            "LiteStochasticDropout": LiteStochasticDropout})
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    return copy, notes


def representative_inputs(run_dir, meta, count=64, seed=0, size=None):
    """``count`` normalised float32 crops (or nucleus patches) of the run's training images.

    Crops are ``size`` = (height, width) (default the training tile, square)."""
    from kerasnuc.runs import records_of_split
    from kerasnuc.intensity import normalize_image
    from kerasnuc.predict.tiling import pad_to_multiple

    # stain-normalised here: these crops go to the converter, not through the engine
    records = records_of_split(run_dir, "train", stain=True)
    if not records:
        raise ValueError(f"{run_dir}: split.json has no training images to calibrate int8 with")
    rng = np.random.default_rng(seed)
    channels = meta["channels"]
    if meta["task"] == "classification":
        patches, _ = nucleus_patches(records, meta)
        if not len(patches):
            raise ValueError(f"{run_dir}: no nuclei in the training images to calibrate int8 with")
        chosen = rng.choice(len(patches), size=min(count, len(patches)), replace=False)
        return [patches[i:i + 1] for i in chosen]
    height, width = (int(meta["tile"]),) * 2 if size is None else (int(size[0]), int(size[1]))
    samples = []
    for _ in range(count):
        record = records[int(rng.integers(len(records)))]
        x = normalize_image(record.image, channels)
        x = pad_to_multiple(x, meta["multiple"])
        if x.shape[0] < height or x.shape[1] < width:
            x = np.pad(x, ((0, max(0, height - x.shape[0])), (0, max(0, width - x.shape[1])), (0, 0)),
                       mode="reflect")
        top = int(rng.integers(x.shape[0] - height + 1))
        left = int(rng.integers(x.shape[1] - width + 1))
        samples.append(x[None, top:top + height, left:left + width].astype(np.float32))
    return samples


def activation_peaks(model, samples, batch_size=8):
    """(samples, layers) max |activation| of each sample at the layers whose int8 ranges are
    shared or summed (Add, Concatenate, Conv2DTranspose) and at the output; and the names."""
    kinds = (keras.layers.Add, keras.layers.Concatenate, keras.layers.Conv2DTranspose)
    layers = [layer for layer in model.layers if isinstance(layer, kinds)]
    outputs = [layer.output for layer in layers] + list(model.outputs)
    names = [layer.name for layer in layers] + ["output"]
    probe = keras.Model(model.inputs, outputs)
    peaks = []
    for i in range(0, len(samples), batch_size):
        batch = np.concatenate(samples[i:i + batch_size])
        values = probe.predict(batch, verbose=0)
        values = values if isinstance(values, (list, tuple)) else [values]
        peaks.append(np.stack([np.abs(np.asarray(v, np.float32)).reshape(len(batch), -1).max(axis=1)
                               for v in values], axis=1))
    return np.concatenate(peaks), names


def drop_outlier_samples(model, samples, factor=4.0):
    """(kept samples, note or None): calibration without the few crops whose activations are
    ``factor`` x the median crop's at some layer (export_tflite then keeps whichever of the
    two calibrations agrees better with the float model on other crops).

    Why: int8 ranges are the min/max over the calibration set, and TFLite gives a
    concatenation one scale for all its inputs. One atypical crop (a full-contrast image
    among low-contrast ones: 10x the usual activations in a UD-Net decoder) then widens a
    skip connection's range tenfold and leaves it a few int8 levels, which wrecked that
    detector's maps (F1 0.75 -> 0.09). Those crops still run at inference; only their
    extreme activations saturate.
    """
    if factor <= 0 or len(samples) < 8:
        return samples, None
    peaks, names = activation_peaks(model, samples)
    median = np.median(peaks, axis=0)
    ratio = peaks / np.maximum(median, 1e-6)
    outliers = np.nonzero((ratio > factor).any(axis=1))[0]
    if len(outliers) > len(samples) // 4:  # not a few outliers but a spread-out distribution: keep all
        return samples, (f"int8 calibration: {len(outliers)} of {len(samples)} samples exceed {factor:g}x the "
                         f"median activation peak; too many to drop, all kept")
    if not len(outliers):
        return samples, None
    worst = int(np.argmax(ratio.max(axis=0)))
    dropped = set(outliers.tolist())
    kept = [sample for i, sample in enumerate(samples) if i not in dropped]
    return kept, (f"int8 calibration: {len(outliers)} of {len(samples)} samples reach "
                  f"{ratio[outliers].max():.1f}x the median sample's peak activation (at {names[worst]})")


def int8_error(content, model, meta, samples):
    """Mean |LiteRT - Keras| of the ``content`` .tflite over ``samples`` (lists of (1, ...) inputs)."""
    import tempfile

    from kerasnuc.predict.litert import LiteModel

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "candidate.tflite")
        with open(path, "wb") as handle:
            handle.write(content)
        lite = LiteModel(path, meta)
        outputs = [lite.run(sample) for sample in samples]
    keras_runtime = _keras_engine(model, meta).runtime  # both sides through the engine's runtimes
    reference = [keras_runtime.run(sample) for sample in samples]
    if isinstance(outputs[0], tuple):  # an instance model's (boxes, scores, masks): summed per output
        return float(sum(np.mean(np.abs(np.concatenate([o[k] for o in outputs]) -
                                        np.concatenate([r[k] for r in reference])))
                         for k in range(len(outputs[0]))))
    return float(np.mean(np.abs(np.concatenate(outputs) - np.concatenate(reference))))


def nucleus_patches(records, meta):
    """(N, patch, patch, C) normalised patches at every nucleus of the records, (N,) classes or None.

    Patches are normalised with their whole image's range, as ClassificationDataset does;
    nuclei are the classified points, else points, else instance centroids.
    """
    from kerasnuc.runs import nucleus_points
    from kerasnuc.predict.tiling import intensity_range, normalize_with_range, patches_at

    patches, classes, known = [], [], True
    for record in records:
        points, labels = nucleus_points(record)
        if not len(points):
            continue
        value_range = intensity_range(record.image, meta["channels"])
        patches.append(normalize_with_range(patches_at(record.image, points, meta["patch"]),
                                            meta["channels"], value_range))
        known = known and labels is not None
        classes.append(labels if labels is not None else np.zeros(len(points), np.int64))
    if not patches:
        return np.zeros((0, meta["patch"], meta["patch"], meta["channels"]), np.float32), None
    return np.concatenate(patches).astype(np.float32), (np.concatenate(classes) if known else None)


def convert(model, quantize, representative=None):
    """.tflite bytes of a (convertible) Keras model in one of QUANTIZATIONS."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got '{quantize}'")
    # (from_concrete_functions would skip the temporary SavedModel that from_keras_model
    # writes, but gave NaN maps with Keras 3 variables: not used.)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantize == "int8":
        if not representative:
            raise ValueError("int8 needs representative inputs")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x] for x in representative)
        float_layers = float32_layers(model)
        if float_layers:
            return _int8_keeping_float(converter, float_layers)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    return converter.convert()


def float32_layers(model):
    """Names of the model's layers that an int8 export keeps in float32: the Mask R-CNN
    ``Float32Layer`` s, whose box arithmetic needs float32 under any dtype policy (see the
    module docstring); empty for every other family, whose int8 export is unchanged."""
    from kerasnuc.models.maskrcnn.float32 import Float32Layer

    return [layer.name for layer in model.layers if isinstance(layer, Float32Layer)]


def _int8_keeping_float(converter, float_layers):
    """int8 .tflite bytes (uint8 input, float32 outputs) whose ops inside ``float_layers``
    stay float32: the converter calibrates only, then the MLIR quantiser runs with those ops
    denylisted. (``TFLiteConverter`` has no public denylist; this is the call that
    ``tf.lite.experimental.QuantizationDebugger`` makes for its ``denylisted_nodes``.)"""
    import re

    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.python.convert import mlir_quantize

    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    # TF op names carry the Keras layer's name scope, suffixed "_<n>" when traced again
    inside = re.compile("/(" + "|".join(re.escape(name) for name in float_layers) + r")(_\d+)?/")
    interpreter = Interpreter(model_content=calibrated)
    nodes = sorted({interpreter._get_tensor_details(index, 0)["name"]
                    for op in interpreter._get_ops_details() for index in op["outputs"]
                    if inside.search(interpreter._get_tensor_details(index, 0)["name"])})
    if not nodes:
        raise ValueError(f"int8: no converted op belongs to the float32 layers {float_layers}")
    return mlir_quantize(calibrated, disable_per_channel=converter._experimental_disable_per_channel,
                         input_data_type=tf.uint8, output_data_type=tf.float32, denylisted_nodes=nodes)


def _io_details(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    details = {}
    for key, info in (("input", interpreter.get_input_details()[0]),
                      ("output", interpreter.get_output_details()[0])):
        details[key] = {"dtype": np.dtype(info["dtype"]).name,
                        "shape": [int(s) for s in info["shape_signature"]],
                        "quantization": [float(info["quantization"][0]), int(info["quantization"][1])]}
    return details


def check_stochastic(lite, meta):
    """True if two LiteRT runs on the same input differ (Monte-Carlo dropout survived conversion)."""
    if meta["task"] == "classification":
        x = np.full((1, meta["patch"], meta["patch"], meta["channels"]), 0.5, np.float32)
    else:
        size = max(meta["multiple"] * 2, 32)
        shape = lite.static_shape or (size, size)
        x = np.random.default_rng(0).random((1, *shape, meta["channels"])).astype(np.float32)
    return bool(np.abs(lite.run(x) - lite.run(x)).max() > 0)


# ----------------------------------------------------------------------------- evaluation


def _keras_engine(model, meta):
    """The prediction engine over the Keras model: the export is checked against exactly what
    ``kerasnuc.predict`` would give from the run."""
    from kerasnuc.predict.engine import Predictor
    from kerasnuc.predict.runtimes import KerasRuntime

    return Predictor(KerasRuntime(model=model, meta=meta))


def _classified(engine, records, samples):
    """(N, classes) probabilities at every nucleus of the records (nucleus_points), by the engine."""
    from kerasnuc.runs import nucleus_points

    out = [engine.classify(record.image, points, samples=samples)
           for record, (points, _) in ((r, nucleus_points(r)) for r in records) if len(points)]
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _truth_points(record):
    from kerasnuc.data.targets import instance_centroids

    if record.points is not None:
        return np.asarray(record.points, dtype=np.float64).reshape(-1, 2)
    if record.labels is not None:
        return instance_centroids(record.labels)[0]
    return None


def evaluate(path, model, run_dir, meta, repeats=3, threads=None, max_images=None, split="test",
             records=None):
    """Agreement of the .tflite with the Keras model and LiteRT latency on held-out images."""
    from kerasnuc.runs import records_of_split
    from kerasnuc import metrics
    from kerasnuc.predict.litert import LiteModel
    from kerasnuc.predict.postprocess import centroids, instances

    lite = LiteModel(path, meta, num_threads=threads)
    if records is None:
        records = records_of_split(run_dir, split, limit=max_images)
        if not records:
            split = "val"
            records = records_of_split(run_dir, split, limit=max_images)
    samples = meta["mc_samples"] if meta["stochastic"] else 1
    post = meta.get("postprocess") or {}
    rows, latencies = [], []
    task = meta["task"]
    if task == "classification":
        from kerasnuc.predict.engine import Predictor

        patches, truth = nucleus_patches(records, meta)
        keras_prob = _classified(_keras_engine(model, meta), records, samples)
        lite_prob = _classified(Predictor(lite), records, samples)
        lite.run(patches[:1])
        for _ in range(repeats):
            started = time.perf_counter()
            lite.run(patches[:1])
            latencies.append(time.perf_counter() - started)
        keras_cls, lite_cls = keras_prob.argmax(-1), lite_prob.argmax(-1)
        summary = {
            "nuclei": int(len(patches)),
            "label_agreement": float(np.mean(keras_cls == lite_cls)),
            "max_abs_diff": float(np.abs(keras_prob - lite_prob).max()),
            "mean_abs_diff": float(np.abs(keras_prob - lite_prob).mean()),
            "latency_ms_per_patch": 1000 * float(np.median(latencies)),
        }
        if truth is not None:
            num_classes = keras_prob.shape[-1]
            for name, predicted in (("keras", keras_cls), ("tflite", lite_cls)):
                scores = metrics.classification_report(truth, predicted, num_classes=num_classes)
                summary[f"accuracy_{name}"] = float(scores["accuracy"])
                summary[f"macro_f1_{name}"] = float(scores["macro_f1"])
        return {"split": split, "images": len(records), "mc_samples": samples, "summary": summary,
                "per_image": []}

    if task == "instance":
        return _evaluate_instances(lite, model, meta, records, split, repeats)
    keras_engine = _keras_engine(model, meta)
    for record in records:
        keras_map, _ = keras_engine.predict_maps(record.image, tile=0, samples=samples)
        # a static model runs whole images in its fixed tiles (lite.run tiles them too), so
        # its maps and latency are the tiled ones
        lite_map, _ = lite.predict_maps(record.image, tile=0, samples=samples)
        times = []
        x = normalize_padded(record.image, meta)
        lite.run(x)  # warm-up for this shape
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(samples):
                lite.run(x)
            times.append(time.perf_counter() - started)
        row = {"name": record.name, "shape": list(record.image.shape[:2]),
               "max_abs_diff": float(np.abs(keras_map - lite_map).max()),
               "mean_abs_diff": float(np.abs(keras_map - lite_map).mean()),
               "latency_ms": 1000 * float(np.median(times))}
        if task == "segmentation":
            keras_labels, lite_labels = instances(keras_map, post), instances(lite_map, post)
            row["dice_vs_keras"] = float(metrics.pixel_dice(keras_labels > 0, lite_labels > 0))
            row["object_f1_vs_keras"] = float(metrics.object_scores(keras_labels, lite_labels)["f1"])
            if record.labels is not None:
                truth = record.labels
                row["dice_keras"] = float(metrics.pixel_dice(truth > 0, keras_labels > 0))
                row["dice_tflite"] = float(metrics.pixel_dice(truth > 0, lite_labels > 0))
                row["aji_keras"] = float(metrics.aggregated_jaccard_index(truth, keras_labels))
                row["aji_tflite"] = float(metrics.aggregated_jaccard_index(truth, lite_labels))
        else:
            channel = (lambda m: m[..., 0]) if keras_map.shape[-1] == 1 else (lambda m: m.max(axis=-1))
            keras_points, lite_points = centroids(channel(keras_map), post), centroids(channel(lite_map), post)
            radius = meta.get("match_radius", 6.0)
            row["f1_vs_keras"] = float(metrics.detection_scores(keras_points, lite_points, radius)["f1"])
            truth = _truth_points(record)
            if truth is not None:
                row["f1_keras"] = float(metrics.detection_scores(truth, keras_points, radius)["f1"])
                row["f1_tflite"] = float(metrics.detection_scores(truth, lite_points, radius)["f1"])
        rows.append(row)
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)] if rows else []
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    if rows:
        summary["max_abs_diff"] = float(np.max([r["max_abs_diff"] for r in rows]))
        pixels = sum(r["shape"][0] * r["shape"][1] for r in rows)
        summary["latency_ms_per_megapixel"] = float(sum(r["latency_ms"] for r in rows) / pixels * 1e6)
        summary["latency_ms_median"] = float(np.median([r["latency_ms"] for r in rows]))
    result = {"split": split, "images": len(rows), "mc_samples": samples, "summary": summary, "per_image": rows}
    if lite.tiles_fixed:
        result["static_tiles"] = {"tile": list(lite.static_shape), "margin": lite.static_margin()}
    return result


def _evaluate_instances(lite, model, meta, records, split, repeats):
    """Agreement of an instance (Mask R-CNN) .tflite with the Keras model: both through the
    engine (tiles of the fixed input, detections -> labels), the nuclei compared (Dice, object
    F1), each against the truth (AJI), the largest score difference on the first tile, and the
    LiteRT latency of one tile."""
    from kerasnuc import metrics
    from kerasnuc.predict.engine import Predictor

    keras_engine, lite_engine = _keras_engine(model, meta), Predictor(lite)
    rows = []
    for record in records:
        keras_labels = keras_engine.predict_instances(record.image)[0]
        lite_labels = lite_engine.predict_instances(record.image)[0]
        row = {"name": record.name, "shape": list(record.image.shape[:2]),
               "nuclei_keras": int(keras_labels.max()), "nuclei_tflite": int(lite_labels.max()),
               "dice_vs_keras": float(metrics.pixel_dice(keras_labels > 0, lite_labels > 0)),
               "object_f1_vs_keras": float(metrics.object_scores(keras_labels, lite_labels)["f1"])}
        if record.labels is not None:
            row["aji_keras"] = float(metrics.aggregated_jaccard_index(record.labels, keras_labels))
            row["aji_tflite"] = float(metrics.aggregated_jaccard_index(record.labels, lite_labels))
        rows.append(row)
    summary = {k: float(np.mean([r[k] for r in rows])) for k in (rows[0] if rows else {})
               if isinstance(rows[0][k], (int, float))}
    if records:
        from kerasnuc.predict.detections import split_outputs

        plan, pad = keras_engine.plan_for(*records[0].image.shape[:2])
        from kerasnuc.intensity import normalize_image

        tile = plan.extract(pad(normalize_image(records[0].image, meta["channels"])), [0])
        keras_out = split_outputs(keras_engine.runtime.run(tile))
        lite_out = split_outputs(lite.run(tile))
        summary["max_abs_diff_scores"] = float(np.abs(keras_out[1] - lite_out[1]).max())
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            lite.run(tile)
            times.append(time.perf_counter() - started)
        summary["latency_ms_per_tile"] = 1000 * float(np.median(times))
    return {"split": split, "images": len(rows), "mc_samples": 1, "summary": summary, "per_image": rows}


def normalize_padded(image, meta):
    from kerasnuc.intensity import normalize_image
    from kerasnuc.predict.tiling import pad_to_multiple

    return pad_to_multiple(normalize_image(image, meta["channels"]), meta["multiple"])[None]


# ----------------------------------------------------------------------------- export


def calibrated_int8(convertible, run_dir, meta, calibration, outlier_factor, size, notes, log):
    """int8 .tflite bytes calibrated on ``calibration`` training crops (``size`` (H, W) or the
    training tile). Where some crops are outliers (:func:`drop_outlier_samples`), both
    calibrations are converted and the one closer to the float model on 16 other training
    crops is kept; ``notes`` gets what was done."""
    representative = representative_inputs(run_dir, meta, calibration, size=size)
    crop = (f"{meta['patch']}px patches" if meta["task"] == "classification" else
            f"{size[0]}x{size[1]} crops" if size else f"{meta['tile']}px crops")
    trimmed, outlier_note = drop_outlier_samples(convertible, representative, outlier_factor)
    if outlier_note:
        notes.append(outlier_note)
        log(outlier_note)
    if len(trimmed) < len(representative):
        check = representative_inputs(run_dir, meta, 16, seed=1, size=size)
        candidates = {"without them": (trimmed, convert(convertible, "int8", trimmed)),
                      "with all": (representative, convert(convertible, "int8", representative))}
        errors = {name: int8_error(content, convertible, meta, check) for name, (_, content) in candidates.items()}
        choice = min(errors, key=errors.get)
        note = (f"int8 calibration: mean |int8 - float| on {len(check)} other training crops "
                + ", ".join(f"{name} {error:.4g}" for name, error in errors.items()) + f": used {choice}")
        notes.append(note)
        log(note)
        representative, content = candidates[choice]
    else:
        content = convert(convertible, "int8", representative)
    notes.append(f"int8 calibrated on {len(representative)} {crop} of the training split")
    return content


def default_output(run_dir, meta, quantize, static_input=None):
    size = f"_{static_input[1]}x{static_input[2]}" if static_input else ""
    return os.path.join(run_dir, "export", f"{meta['model'] or 'model'}_{quantize}{size}.tflite")


def parse_input_size(value):
    """``N``, ``"N"`` or ``"HxW"`` (or an (H, W) pair) -> (H, W) ints; ValueError if unreadable."""
    if isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        parts = str(value).lower().replace("*", "x").split("x")
    try:
        sizes = [int(str(part).strip()) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2:
        raise ValueError(f"--input-size {value}: expected N or HxW, e.g. 256 or 256x320")
    return tuple(sizes)


def static_input_shape(run_dir, meta, input_size):
    """[1, H, W, C] for ``--input-size``, checked against the run's model (ValueError if not)."""
    height, width = parse_input_size(input_size)
    text = str(input_size) if isinstance(input_size, (int, str)) else f"{height}x{width}"
    where = f"{run_dir}: --input-size {text}"
    name = meta["model"] or "model"
    if height <= 0 or width <= 0:
        raise ValueError(f"{where}: sides must be positive")
    if meta["task"] == "classification":
        patch = int(meta["patch"])
        if (height, width) != (patch, patch):
            raise ValueError(f"{where}: this {name} classifier takes {patch}x{patch} nucleus patches; "
                             f"only --input-size {patch} (which fixes the batch to 1) is possible")
    elif height % meta["multiple"] or width % meta["multiple"]:
        raise ValueError(f"{where}: must be a multiple of {meta['multiple']} for this {name}")
    return [1, height, width, int(meta["channels"])]


def export_tflite(run_dir, quantize="float32", out=None, calibration=64, repeats=3, threads=None,
                  max_images=None, evaluate_model=True, log=None, input_size=None, calibration_outliers=4.0):
    """Convert, write ``out`` + metadata + report; returns (path, report dict).

    ``input_size`` (N, "HxW" or (H, W)): a static [1, H, W, C] input (see the module docstring).
    ``calibration_outliers``: see :func:`calibrated_int8` (0: calibrate on all crops only).
    The four files are written in a hidden staging folder beside ``out`` and moved into place
    only when all are complete: a failed export leaves nothing (and no new empty folder).
    """
    import shutil

    from kerasnuc.atomic import made_folders
    from kerasnuc.runs import load_model, read_run, run_metadata

    log = log or (lambda message: print(message, flush=True))
    if input_size is not None:
        try:
            parse_input_size(input_size)  # a malformed size fails before the model loads
        except ValueError as error:
            raise ValueError(f"{run_dir}: {error}") from None
    run = read_run(run_dir)  # read once, passed on
    model = load_model(run)  # RunError for a broken run or a model that does not fit its task
    meta = run_metadata(run, model)
    static = static_input_shape(run_dir, meta, input_size) if input_size is not None else None
    out = out or default_output(run_dir, meta, quantize, static)
    if not out.endswith(".tflite"):
        raise ValueError(f"--out must end in .tflite, got {out}")
    folder = os.path.dirname(os.path.abspath(out))
    with made_folders(folder):  # a failed export removes the folders it made
        staging = os.path.join(folder, f".incomplete-{os.path.basename(out)}-{os.getpid()}")
        os.makedirs(staging)
        try:
            staged, report = _convert_and_report(model, meta, run_dir, quantize,
                                                 os.path.join(staging, os.path.basename(out)), out, static,
                                                 calibration, calibration_outliers, repeats, threads, max_images,
                                                 evaluate_model, log)
            base = os.path.splitext(out)[0]
            stain_model = os.path.splitext(staged)[0] + ".stain_model.keras"  # a dcgmm run's network
            stain_files = [".stain_model.keras"] if os.path.exists(stain_model) else []
            for suffix in (".json", ".report.json", ".report.md", *stain_files, ".tflite"):  # the model last
                os.replace(os.path.splitext(staged)[0] + suffix, base + suffix)
            os.rmdir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log(f"wrote {out} ({report['megabytes']} MB, {quantize}); metadata {base}.json; report {base}.report.md")
    if evaluate_model:
        s = report["agreement"]["summary"]
        log("agreement with Keras: " + ", ".join(f"{k} {v:.4g}" for k, v in s.items()))
    return out, report


def _convert_and_report(model, meta, run_dir, quantize, staged, out, static, calibration, calibration_outliers,
                        repeats, threads, max_images, evaluate_model, log):
    """Write the .tflite, its metadata JSON and report at ``staged`` (a staging path for
    ``out``); returns (staged, report)."""
    from kerasnuc.runs import exported_metadata, write_json_atomic
    from kerasnuc.predict.litert import LiteModel
    from kerasnuc.predict.tiling import fitting_margin

    convertible, notes = conversion_model(model, static)
    if static and meta["task"] != "classification":
        margin = fitting_margin(static[1:3], meta["tile_margin"], meta["multiple"])
        radius = meta.get("receptive_radius")
        note = f"serving.edge runs images in {static[1]}x{static[2]} tiles with margin {margin}"
        if radius is not None and margin < radius:
            multiple = meta["multiple"]
            enough = 2 * -(-radius // multiple) * multiple + multiple  # sides leaving a margin >= radius
            note += (f" (< receptive radius {radius}: tile seams differ slightly from whole-image maps; "
                     f"sides of at least {enough} avoid it)")
        notes.append(note)
    started = time.time()
    if quantize == "int8":
        content = calibrated_int8(convertible, run_dir, meta, calibration, calibration_outliers,
                                  static[1:3] if static else None, notes, log)
    else:
        content = convert(convertible, quantize)
    convert_seconds = time.time() - started
    with open(staged, "wb") as handle:
        handle.write(content)
    io = _io_details(staged)
    meta["tflite"] = {"quantize": quantize, "input_is": "normalised image (see normalization)",
                      "static_input": static, **io, "notes": notes}
    lite = LiteModel(staged, meta)
    if meta["stochastic"]:
        meta["tflite"]["stochastic_in_litert"] = check_stochastic(lite, meta)
        if not meta["tflite"]["stochastic_in_litert"]:
            log("warning: the converted Monte-Carlo model is deterministic in LiteRT")
    base = os.path.splitext(staged)[0]
    # a dcgmm stain network travels beside the .tflite (<name>.stain_model.keras), named relative to it
    write_json_atomic(base + ".json", exported_metadata(meta, os.path.dirname(base), os.path.basename(base) + "."))
    report = {"file": os.path.abspath(out), "quantize": quantize, "static_input": static, "bytes": len(content),
              "megabytes": round(len(content) / 2 ** 20, 3), "convert_seconds": round(convert_seconds, 1),
              "keras_params": int(model.count_params()), "io": io, "notes": notes,
              "litert_threads": threads, "machine": machine_info()}
    if meta["stochastic"]:
        report["stochastic_in_litert"] = meta["tflite"]["stochastic_in_litert"]
    if evaluate_model:
        report["agreement"] = evaluate(staged, model, run_dir, meta, repeats=repeats, threads=threads,
                                       max_images=max_images)
    write_json_atomic(base + ".report.json", report)
    with open(base + ".report.md", "w") as handle:
        handle.write(report_markdown(report, meta))
    return staged, report


def machine_info():
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__}
    try:
        import ai_edge_litert

        info["ai_edge_litert"] = getattr(ai_edge_litert, "__version__", "unknown")
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def report_markdown(report, meta):
    lines = [f"# TFLite export: {os.path.basename(report['file'])}", "",
             f"- model: {meta['model']} ({meta['task']}), run `{meta['run_dir']}`",
             f"- quantisation: **{report['quantize']}**, {report['bytes']:,} bytes "
             f"({report['megabytes']} MB), Keras parameters {report['keras_params']:,}",
             f"- input: {report['io']['input']['dtype']} {report['io']['input']['shape']} "
             f"quantisation {report['io']['input']['quantization']}; output: {report['io']['output']['dtype']} "
             f"quantisation {report['io']['output']['quantization']}"]
    for note in report["notes"]:
        lines.append(f"- {note}")
    if "stochastic_in_litert" in report:
        lines.append(f"- Monte-Carlo dropout stochastic in LiteRT: {report['stochastic_in_litert']}")
    agreement = report.get("agreement")
    if agreement:
        lines += ["", f"## Agreement with the Keras model ({agreement['images']} {agreement['split']} images"
                      f"{', mean of %d passes' % agreement['mc_samples'] if agreement['mc_samples'] > 1 else ''})",
                  "", "| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in agreement["summary"].items()]
        if agreement.get("static_tiles"):
            tiles = agreement["static_tiles"]
            lines += ["", f"Static input: maps and latencies are of whole images run in "
                          f"{tiles['tile'][0]}x{tiles['tile'][1]} tiles, margin {tiles['margin']}."]
    machine = report["machine"]
    lines += ["", f"Machine: {machine.get('cpu_model', machine['processor'])}, {machine['cpus']} CPUs, "
                  f"{machine['platform']}; LiteRT threads {report['litert_threads'] or 'default'}.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m export.tflite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="float32")
    parser.add_argument("--out", help="output .tflite (default RUN_DIR/export/<model>_<quantize>[_<H>x<W>].tflite)")
    parser.add_argument("--input-size", dest="input_size", metavar="N|HxW",
                        help="static [1, H, W, C] input for edge accelerators (multiples of the model's "
                             "input multiple; classifiers: the patch size)")
    parser.add_argument("--calibration", type=int, default=64, help="int8: representative crops (default 64)")
    parser.add_argument("--calibration-outliers", type=float, default=4.0, dest="calibration_outliers",
                        metavar="FACTOR", help="int8: also calibrate without the crops whose activations reach "
                                               "FACTOR x the median crop's at some layer, and keep the calibration "
                                               "closer to float32 on other crops (default 4; 0: all crops only)")
    parser.add_argument("--repeats", type=int, default=3, help="latency: runs per image, median (default 3)")
    parser.add_argument("--threads", type=int, help="LiteRT threads for the report (default: runtime's choice)")
    parser.add_argument("--max-images", type=int, dest="max_images", help="evaluate on at most this many test images")
    parser.add_argument("--no-report", action="store_true", help="skip the agreement/latency evaluation")
    args = parser.parse_args(argv)
    from kerasnuc.runs import RunError

    try:
        export_tflite(args.run_dir, args.quantize, args.out, args.calibration, args.repeats, args.threads,
                      args.max_images, evaluate_model=not args.no_report, input_size=args.input_size,
                      calibration_outliers=args.calibration_outliers)
    except (RunError, ValueError, OSError) as error:
        sys.exit(f"export.tflite: {error}")


if __name__ == "__main__":
    main()
