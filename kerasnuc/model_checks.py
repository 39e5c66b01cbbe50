"""Does a model fit the task its run (or its export's metadata) claims? One place for the rule.

A run folder's ``config.json`` says the task, the model family and the input channels; the
exporters, the prediction engine and ``serving.edge`` trust it. A model that does not
fit (a U-Net in a run whose config says classification) would export without complaint and
serve nonsense, so loading checks it:

=================  ===============================================================
every task         one input (N, H, W, channels) with ``channels`` = config channels;
                   one output; finite values
segmentation       per-pixel maps (N, H, W, K) with the input's H and W; values in [0, 1]
                   (probabilities: the post-processing thresholds them)
detection          per-pixel density maps (N, H, W, K) with the input's H and W
classification     (N, classes) class probabilities, classes = the run's class names
                   (when the run records them), rows summing to 1 (softmax)
instance           (Mask R-CNN) one fixed-size input, three outputs: boxes (N, D, 4),
                   scores (N, D) in [0, 1], masks (N, D, m, m) in [0, 1]
model family       ``model.keras``'s model name, when it is a registered family, is the
                   config's ``model``; a dense task needs a dense family and vice versa
=================  ===============================================================

:func:`shape_problems` checks static shapes only and needs neither Keras nor TensorFlow
(``kerasnuc.predict.litert`` uses it on a ``.tflite``); :func:`check_keras_model` adds the
family check and one small forward pass (value ranges, spatial size following the input).
"""

import numpy as np

from kerasnuc.runs import TASKS, RunError

DENSE_TASKS = ("segmentation", "detection")


class ModelMismatch(RunError):
    """The model does not fit the task, channels or family its run claims (message says how)."""


def _shape(shape):
    """A shape as a tuple with None for unknown sizes (Keras None, LiteRT -1)."""
    return tuple(None if s is None or int(s) < 0 else int(s) for s in shape)


def _text(shape):
    return "(" + ", ".join("N" if i == 0 else ("?" if s is None else str(s)) for i, s in enumerate(shape)) + ")"


def shape_problems(task, channels, input_shape, output_shape, num_classes=None, claimed_by="config"):
    """What is wrong with a model's (input, output) shapes for ``task``: a list of phrases
    (empty when they fit). ``None`` / -1 sizes are unknown and always fit. ``claimed_by``
    names where task and channels come from (config, metadata)."""
    if task not in TASKS:
        return [f"task '{task}' is none of {', '.join(TASKS)}"]
    problems = []
    inp, out = _shape(input_shape), _shape(output_shape)
    if len(inp) != 4:
        problems.append(f"the model takes {_text(inp)} input, not images (N, H, W, C)")
    elif channels is not None and inp[-1] is not None and inp[-1] != int(channels):
        problems.append(f"{claimed_by} channels {channels} but the model takes {inp[-1]}-channel input")
    if task in DENSE_TASKS:
        what = "per-pixel probability maps" if task == "segmentation" else "per-pixel density maps"
        if len(out) != 4:
            kind = "class scores" if len(out) == 2 else f"rank-{len(out)} output"
            problems.append(f"task '{task}' needs {what} (N, H, W, K), the model outputs {kind} {_text(out)}")
        elif len(inp) == 4 and any(i is not None and o is not None and i != o for i, o in zip(inp[1:3], out[1:3])):
            problems.append(f"task '{task}' needs maps of the input's size, the model maps "
                            f"{_text(inp)} to {_text(out)}")
    else:
        if len(out) != 2:
            kind = "per-pixel maps" if len(out) == 4 else f"rank-{len(out)} output"
            problems.append(f"task 'classification' needs class probabilities (N, classes), "
                            f"the model outputs {kind} {_text(out)}")
        elif out[-1] is not None and out[-1] < 2:
            problems.append(f"task 'classification' needs at least 2 classes, the model outputs {out[-1]}")
        elif num_classes and out[-1] is not None and out[-1] != int(num_classes):
            problems.append(f"the run has {num_classes} classes, the model outputs {out[-1]} class scores")
    return problems


def instance_shape_problems(channels, input_shape, output_shapes, claimed_by="config"):
    """What is wrong with an instance model's input and (boxes, scores, masks) output shapes
    (a list of phrases, empty when they fit)."""
    problems = []
    inp = _shape(input_shape)
    if len(inp) != 4:
        problems.append(f"the model takes {_text(inp)} input, not images (N, H, W, C)")
    else:
        if channels is not None and inp[-1] is not None and inp[-1] != int(channels):
            problems.append(f"{claimed_by} channels {channels} but the model takes {inp[-1]}-channel input")
        if inp[1] is None or inp[2] is None:
            problems.append(f"task 'instance' needs a fixed input size (the engine tiles to it), the model "
                            f"takes {_text(inp)}")
    shapes = [_shape(s) for s in output_shapes]
    ranks = sorted(len(s) for s in shapes)
    if ranks != [2, 3, 4]:
        problems.append("task 'instance' needs three outputs boxes (N, D, 4), scores (N, D), masks (N, D, m, m), "
                        f"the model outputs {', '.join(_text(s) for s in shapes)}")
        return problems
    boxes, scores, masks = sorted(shapes, key=lambda s: {3: 0, 2: 1, 4: 2}[len(s)])
    if boxes[-1] not in (None, 4):
        problems.append(f"boxes must be (N, D, 4) (y1, x1, y2, x2), got {_text(boxes)}")
    counts = {s[1] for s in (boxes, scores, masks) if s[1] is not None}
    if len(counts) > 1:
        problems.append(f"boxes, scores and masks must have the same number of detections, got "
                        f"{_text(boxes)}, {_text(scores)}, {_text(masks)}")
    return problems


def instance_value_problems(x, outs):
    """What is wrong with an instance model's (boxes, scores, masks) on a probe batch ``x``."""
    boxes, scores, masks = (np.asarray(o, np.float32) for o in outs)
    if len(boxes) != len(x) or len(scores) != len(x) or len(masks) != len(x):
        return [f"{len(x)} images in gave {len(boxes)}, {len(scores)}, {len(masks)} outputs"]
    if not all(np.isfinite(o).all() for o in (boxes, scores, masks)):
        return ["the model outputs NaN or infinite values"]
    problems = []
    for name, values in (("scores", scores), ("masks", masks)):
        if values.size and (values.min() < -1e-5 or values.max() > 1 + 1e-5):
            problems.append(f"task 'instance' needs {name} in [0, 1], the model outputs values in "
                            f"[{values.min():.3g}, {values.max():.3g}]")
    return problems


def value_problems(task, x, out):
    """What is wrong with the output ``out`` of a probe batch ``x`` for ``task`` (list of phrases)."""
    out = np.asarray(out, np.float32)
    if out.shape[0] != x.shape[0]:
        return [f"{x.shape[0]} images in gave {out.shape[0]} outputs"]
    if not np.isfinite(out).all():
        return ["the model outputs NaN or infinite values"]
    problems = []
    if task in DENSE_TASKS:
        if out.ndim == 4 and out.shape[1:3] != x.shape[1:3]:
            problems.append(f"task '{task}' needs maps of the input's size, a {x.shape[1]}x{x.shape[2]} input "
                            f"gave {out.shape[1]}x{out.shape[2]} maps")
        if task == "segmentation" and (out.min() < -1e-5 or out.max() > 1 + 1e-5):
            problems.append(f"task 'segmentation' needs probabilities in [0, 1] (sigmoid or softmax head), "
                            f"the model outputs values in [{out.min():.3g}, {out.max():.3g}]")
    elif out.ndim == 2:
        sums = out.sum(axis=-1)
        if out.min() < -1e-5 or out.max() > 1 + 1e-5 or np.abs(sums - 1).max() > 1e-3:
            problems.append(f"task 'classification' needs class probabilities (softmax: in [0, 1], summing "
                            f"to 1), the model's rows sum to {sums.min():.3g}..{sums.max():.3g} with values in "
                            f"[{out.min():.3g}, {out.max():.3g}]")
    return problems


def family_problems(task, config_model, model_name):
    """The config's model family against the task and against the name inside model.keras."""
    from kerasnuc import models

    problems = []
    families = models.available()
    if config_model in families:
        family_task = models.task_of(config_model)
        if (family_task == "instance") != (task == "instance"):
            problems.append(f"config model '{config_model}' is a {family_task} model, config task is '{task}'")
        elif (family_task == "classification") != (task == "classification"):
            problems.append(f"config model '{config_model}' is a {family_task} model, config task is '{task}'")
    if config_model and model_name in families and model_name != config_model:
        problems.append(f"config model '{config_model}' but model.keras holds a '{model_name}'")
    return problems


def probe_batch(task, channels, input_shape, multiple=1, patch=32, seed=0):
    """A small random normalised batch the model must accept: 2 images of its fixed size, or
    (dense models taking any size) a non-square k x (k + 2) ``multiple``s with k odd and the
    sides >= 16 (a transposed or rescaled map shows, and so does a model needing a larger
    multiple than the config's depth gives), or classifiers' patch x patch."""
    shape = _shape(input_shape)
    height, width = shape[1:3] if len(shape) == 4 else (None, None)
    if task in DENSE_TASKS:
        k = max(1, -(-16 // multiple))
        k += 1 - k % 2
        height, width = height or k * multiple, width or (k + 2) * multiple
    else:
        height, width = height or int(patch), width or int(patch)
    return np.random.default_rng(seed).random((2, height, width, int(channels))).astype(np.float32)


def check_keras_model(model, config, where, class_names=(), multiple=1):
    """Raise :class:`ModelMismatch` (one line, starting with ``where``) unless the Keras
    ``model`` fits the run's ``config`` (task, channels, model family, class names): static
    shapes, then one forward pass of :func:`probe_batch` for the value ranges."""
    import keras

    task = config.get("task", "segmentation")
    channels = config.get("channels")
    if task == "instance":
        _check_instance_model(model, config, where)
        return
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        problems = [f"the model has {len(model.inputs)} inputs and {len(model.outputs)} outputs, not one each"]
    else:
        problems = shape_problems(task, channels, model.inputs[0].shape, model.outputs[0].shape,
                                  len(class_names) or None)
    problems += family_problems(task, config.get("model"), model.name)
    if not problems:
        channels = channels or model.inputs[0].shape[-1]
        x = probe_batch(task, channels, model.inputs[0].shape, multiple, config.get("patch", 32))
        try:
            out = keras.ops.convert_to_numpy(model(x, training=False))
        except Exception as error:  # noqa: BLE001  (any failure here means the model does not fit)
            detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            sizes = f" (sides multiples of {multiple} = 2**depth of config.json)" if task in DENSE_TASKS else ""
            problems.append(f"the model fails on a {x.shape[1]}x{x.shape[2]}x{x.shape[3]} input{sizes}: {detail}")
        else:
            problems += value_problems(task, x, out)
    if problems:
        raise ModelMismatch(f"{where}: model.keras does not match config.json: " + "; ".join(problems))


def _check_instance_model(model, config, where):
    """:func:`check_keras_model` for task 'instance': shapes, family, one probe image."""
    import keras

    channels = config.get("channels")
    if len(model.inputs) != 1:
        problems = [f"the model has {len(model.inputs)} inputs, not one"]
    else:
        problems = instance_shape_problems(channels, model.inputs[0].shape, [o.shape for o in model.outputs])
    problems += family_problems("instance", config.get("model"), model.name)
    if not problems:
        shape = _shape(model.inputs[0].shape)
        x = np.random.default_rng(0).random((1, shape[1], shape[2], shape[3])).astype(np.float32)
        try:
            outs = [keras.ops.convert_to_numpy(o) for o in model(x, training=False)]
        except Exception as error:  # noqa: BLE001  (any failure here means the model does not fit)
            detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            problems.append(f"the model fails on a {x.shape[1]}x{x.shape[2]}x{x.shape[3]} input: {detail}")
        else:
            order = sorted(range(len(outs)), key=lambda i: {3: 0, 2: 1, 4: 2}.get(outs[i].ndim, 3))
            problems += instance_value_problems(x, [outs[i] for i in order])
    if problems:
        raise ModelMismatch(f"{where}: model.keras does not match config.json: " + "; ".join(problems))
