"""Export a training run as a TensorFlow-Serving SavedModel, atomically versioned.

    python -m export.saved_model RUN_DIR --base EXPORT_BASE [--version N] [--name NAME]

writes ``EXPORT_BASE/<name>/<version>/`` (default name: the run's model family, default
version: newest existing + 1). The SavedModel is first written to a hidden staging folder
``EXPORT_BASE/<name>/.incomplete-*`` (not an integer, so TF-Serving never loads it) and
renamed into place when complete. The base also gets ``models.config``,
``batching_parameters.txt`` and ``compose.yaml`` (see :mod:`export.deploy`).

Before anything is written the model must fit what the run's config.json claims (task,
channels, classes, model family: :mod:`kerasnuc.model_checks`); a broken run folder, a corrupt
``model.keras`` or a mismatch is one line naming the run and the problem, exit status 1, and a
failed export leaves no folder behind.

Signatures (inputs are uint8 pixels; normalisation happens in the graph, exactly as
``kerasnuc.intensity.normalize_image``: per-image min-max, RGB <-> grey conversion):

segmentation / detection
    ``serving_default``: ``image`` uint8 [batch, height, width, 1 or 3] -> ``maps`` float32
    [batch, height, width, K]. Any height and width: the graph pads to the model's multiple
    (reflect, as ``kerasnuc.predict.tiling.pad_to_multiple``) and crops back.
    ``with_range``: also ``intensity_range`` float32 [batch, 2] = (min, max) of the whole
    image after channel conversion, for tiles of a larger image (serving.client uses it).
classification
    ``serving_default``: ``image`` uint8 [batch, patch, patch, 1 or 3] nucleus patches ->
    ``probabilities`` [batch, classes], ``class_index`` int64 [batch]; ``with_range`` as above
    (training normalised patches by their whole image's range).
instance (Mask R-CNN)
    ``serving_default``: ``image`` uint8 [batch, S, S, 1 or 3] tiles of the model's fixed input
    size S (metadata ``input_size``) -> ``boxes`` float32 [batch, D, 4] (y1, x1, y2, x2) in tile
    pixels, ``scores`` [batch, D] (0 for padding rows), ``masks`` [batch, D, m, m]
    box-relative probabilities; ``with_range`` as above (the engine's tiles of a larger image).
Monte-Carlo dropout models
    ``uncertainty`` (and ``uncertainty_with_range``): T stochastic passes in the graph
    (``tf.map_fn``) -> ``mean`` and ``variance`` (population variance over the passes).
    ``serving_default`` is one stochastic pass.
every model
    ``metadata``: no inputs -> ``kerasnuc_json`` string scalar: the JSON of
    ``assets.extra/kerasnuc.json`` (task, channels, classes, tiles, thresholds, versions; see
    :mod:`kerasnuc.runs`) except ``version``, which is only fixed when the folder is published.
"""

import argparse
import json
import os
import shutil
import sys
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

INPUT_KEY = "image"
RANGE_KEY = "intensity_range"
METADATA_FILE = "kerasnuc.json"


class ExportError(RuntimeError):
    """An export could not be completed (message says why)."""


# ----------------------------------------------------------------------------- graph pieces


def convert_channels(x, channels):
    """float32 [B, H, W, 1 or 3] -> [B, H, W, channels] like normalize_image (mean / repeat)."""
    import tensorflow as tf

    count = tf.shape(x)[-1]
    check = tf.debugging.Assert(tf.logical_or(tf.equal(count, 1), tf.equal(count, 3)),
                                ["image must have 1 or 3 channels, got", count])
    with tf.control_dependencies([check]):
        if channels == 1:
            x = tf.reduce_mean(x, axis=-1, keepdims=True)  # the mean of one channel is itself
        else:
            x = x * tf.ones([1, 1, 1, channels], x.dtype)  # broadcasts grey, keeps RGB
    return tf.ensure_shape(x, [None, None, None, channels])


def intensity_range(x):
    """[B, 2] (min, max) of each image in a converted float batch."""
    import tensorflow as tf

    return tf.stack([tf.reduce_min(x, axis=[1, 2, 3]), tf.reduce_max(x, axis=[1, 2, 3])], axis=1)


def normalize(image, channels, value_range=None):
    """uint8 batch -> float32 model input in [0, 1]; ``value_range`` [B, 2] or None (per image)."""
    import tensorflow as tf

    x = convert_channels(tf.cast(image, tf.float32), channels)
    if value_range is None:
        value_range = intensity_range(x)
    value_range = tf.cast(value_range, tf.float32)
    low = tf.reshape(value_range[:, 0], [-1, 1, 1, 1])
    high = tf.reshape(value_range[:, 1], [-1, 1, 1, 1])
    return (x - low) / tf.maximum(high - low, 1e-6)


def pad_to_multiple(x, multiple):
    """Pad [B, H, W, C] at the bottom/right to multiples of ``multiple``; returns (padded, H, W).

    Reflect padding where the image is larger than the padding, else edge padding: the
    rule of ``kerasnuc.predict.tiling.pad_to_multiple``, done with gathers so both modes work
    for any size.
    """
    import tensorflow as tf

    height, width = tf.shape(x)[1], tf.shape(x)[2]
    if multiple <= 1:
        return x, height, width
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    reflect = tf.minimum(height, width) > tf.maximum(pad_h, pad_w)

    def indices(size, pad):
        i = tf.range(size + pad)
        mirrored = tf.where(i < size, i, 2 * (size - 1) - i)
        clamped = tf.minimum(i, size - 1)
        return tf.where(reflect, mirrored, clamped)

    x = tf.gather(x, indices(height, pad_h), axis=1)
    x = tf.gather(x, indices(width, pad_w), axis=2)
    return x, height, width


def make_predict(model, meta):
    """f(uint8 image, range or None) -> model output for the run's task."""
    import tensorflow as tf

    channels, multiple = meta["channels"], meta["multiple"]

    def predict(image, value_range=None):
        x = normalize(image, channels, value_range)
        if meta["task"] == "instance":  # fixed-size tiles in, (boxes, scores, masks) out
            return [tf.cast(out, tf.float32) for out in model(x, training=False)]
        if meta["task"] == "classification":
            return tf.cast(model(x, training=False), tf.float32)
        padded, height, width = pad_to_multiple(x, multiple)
        out = tf.cast(model(padded, training=False), tf.float32)
        return out[:, :height, :width, :]

    return predict


def add_signatures(archive, model, meta, mc_samples):
    """Register the signatures described in the module docstring on an ExportArchive."""
    import tensorflow as tf

    predict = make_predict(model, meta)
    classify = meta["task"] == "classification"
    if classify:
        size = meta["patch"]
        image_spec = tf.TensorSpec([None, size, size, None], tf.uint8, name=INPUT_KEY)
    elif meta["task"] == "instance":
        height, width = meta["input_size"]
        image_spec = tf.TensorSpec([None, height, width, None], tf.uint8, name=INPUT_KEY)
    else:
        image_spec = tf.TensorSpec([None, None, None, None], tf.uint8, name=INPUT_KEY)
    range_spec = tf.TensorSpec([None, 2], tf.float32, name=RANGE_KEY)

    def outputs(result):
        if meta["task"] == "instance":
            from kerasnuc.predict.detections import OUTPUTS

            return dict(zip(OUTPUTS, result))
        if classify:
            return {"probabilities": result, "class_index": tf.argmax(result, axis=-1)}
        return {"maps": result}

    def sampled(image, value_range):
        samples = tf.map_fn(lambda _: predict(image, value_range), tf.range(mc_samples),
                            fn_output_signature=tf.float32)
        return {"mean": tf.reduce_mean(samples, axis=0),
                "variance": tf.math.reduce_variance(samples, axis=0)}

    def endpoint(name, fn, signature):
        # plain Python control flow only: skip autograph (it costs seconds per signature)
        archive.add_endpoint(name, tf.function(fn, input_signature=signature, autograph=False))

    endpoint("serving_default", lambda image: outputs(predict(image)), [image_spec])
    endpoint("with_range", lambda image, intensity_range: outputs(predict(image, intensity_range)),
             [image_spec, range_spec])
    if meta["stochastic"]:
        endpoint("uncertainty", lambda image: sampled(image, None), [image_spec])
        endpoint("uncertainty_with_range", lambda image, intensity_range: sampled(image, intensity_range),
                 [image_spec, range_spec])
    text = json.dumps(meta, sort_keys=True)
    endpoint("metadata", lambda: {"kerasnuc_json": tf.constant(text)}, [])


# ----------------------------------------------------------------------------- versions


def versions(model_dir):
    """Sorted integer version folders of a model folder (what TF-Serving would load)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(v) for v in os.listdir(model_dir)
                  if v.isdigit() and os.path.isdir(os.path.join(model_dir, v)))


def next_version(model_dir):
    existing = versions(model_dir)
    return existing[-1] + 1 if existing else 1


def export_saved_model(run_dir, base, version=None, name=None, mc_samples=None, log=None):
    """Export ``run_dir`` into ``base/<name>/<version>``; returns that path."""
    from export.deploy import write_deploy_files
    from kerasnuc.atomic import made_folders
    from kerasnuc.runs import load_model, read_run, run_metadata

    log = log or (lambda message: print(message, flush=True))
    run = read_run(run_dir)  # read once, passed on
    model = load_model(run)
    meta = run_metadata(run, model)
    name = name or meta["model"] or "model"
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ExportError(f"model name '{name}': use letters, digits, '-' and '_' only")
    if mc_samples is not None:
        meta["mc_samples"] = int(mc_samples)
    if meta["stochastic"] and meta["mc_samples"] < 2:
        raise ExportError(f"mc_samples must be at least 2 for an uncertainty signature, got {meta['mc_samples']}")
    meta["model_name"] = name
    from kerasnuc.models.memory import working_bytes_per_pixel

    # what one input pixel costs a network pass: the server's memory budgets (serving/server.py)
    meta["working_bytes_per_pixel"] = working_bytes_per_pixel(model)
    signatures = ["serving_default", "with_range", "metadata"]
    if meta["stochastic"]:
        signatures[2:2] = ["uncertainty", "uncertainty_with_range"]
    meta["signatures"] = signatures

    model_dir = os.path.join(os.path.abspath(base), name)
    if version is not None and int(version) in versions(model_dir):
        raise ExportError(f"{model_dir}/{version} exists; versions are never overwritten "
                          f"(omit --version for {next_version(model_dir)})")
    with made_folders(model_dir):  # a failed export removes the folders it made
        final = _write_version(model, meta, model_dir, version)
    write_deploy_files(os.path.abspath(base))
    log(f"exported {meta['task']} model '{name}' version {os.path.basename(final)}: {final}")
    log(f"signatures: {', '.join(signatures)}; input '{INPUT_KEY}' uint8 [batch, height, width, 1|3]")
    return final


def _write_version(model, meta, model_dir, version):
    """Write the SavedModel in a staging folder of ``model_dir`` and rename it to its version
    (the next free one unless ``version``); returns the version folder."""
    import keras

    from kerasnuc.runs import exported_metadata, write_json_atomic

    staging = os.path.join(model_dir, f".incomplete-{uuid.uuid4().hex[:12]}")
    extra = os.path.join(staging, "assets.extra")
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        # a dcgmm stain network travels in assets.extra/stain_model.keras, named relative to it
        # (in kerasnuc.json and the metadata signature alike); the file is copied after write_out
        stored = exported_metadata(meta, extra, copy=False)
        add_signatures(archive, model, stored, meta["mc_samples"])
        archive.write_out(staging, verbose=False)
        os.makedirs(extra, exist_ok=True)
        exported_metadata(meta, extra)
        meta = stored
        explicit = version is not None
        version = int(version) if explicit else next_version(model_dir)
        while True:
            meta["version"] = version
            write_json_atomic(os.path.join(staging, "assets.extra", METADATA_FILE), meta)
            final = os.path.join(model_dir, str(version))
            if not os.path.exists(final):
                try:
                    os.rename(staging, final)  # atomic: TF-Serving sees nothing or everything
                    break
                except OSError:
                    if not os.path.exists(final):
                        raise
            if explicit:  # another export took it meanwhile
                raise ExportError(f"{final} appeared during the export; not overwritten")
            version = next_version(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def read_export_metadata(version_dir):
    """The kerasnuc.json of an exported version folder."""
    with open(os.path.join(version_dir, "assets.extra", METADATA_FILE)) as handle:
        return json.load(handle)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m export.saved_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training.fit run directory (holds model.keras, config.json)")
    parser.add_argument("--base", required=True, help="export base folder (TF-Serving model base)")
    parser.add_argument("--version", type=int, help="version number (default: newest existing + 1)")
    parser.add_argument("--name", help="model name in the base (default: the run's model family)")
    parser.add_argument("--mc-samples", type=int, dest="mc_samples",
                        help="stochastic passes of the uncertainty signature (default: the run's mc_samples)")
    args = parser.parse_args(argv)
    if args.version is not None and args.version < 1:
        sys.exit("export.saved_model: --version must be a positive integer")
    from kerasnuc.runs import RunError

    try:
        path = export_saved_model(args.run_dir, args.base, args.version, args.name, args.mc_samples)
    except (RunError, ExportError, ValueError, OSError) as error:
        sys.exit(f"export.saved_model: {error}")
    print(path)


if __name__ == "__main__":
    main()
