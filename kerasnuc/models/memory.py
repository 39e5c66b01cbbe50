"""How much memory a model needs per input pixel, so a server can bound what a request costs.

A request's working memory grows with its pixels times the model's activation width, not
with the pixels alone: the same 4 Mpix cost a 4-filter U-Net about 0.3 GB and a PSPNet
several GB. The widest layer output per input pixel (float32 bytes, at a reference input size)
is measured from the model's own graph; working memory is taken as ``WORKING_FACTOR`` times it
(bench/results/server_load.md measured 71.5 MB per Mpix for the 4-filter bench U-Net, whose
widest output is 32 bytes per pixel: 2.2 times).
"""

import numpy as np

WORKING_FACTOR = 3.0
REFERENCE_SIDE = 256


def widest_activation_bytes(model, side=REFERENCE_SIDE):
    """Bytes per input pixel of the model's largest layer output (float32) for a ``side`` x ``side``
    input, or None where the graph cannot be re-traced at a fixed size (subclassed models)."""
    import keras

    try:
        channels = int(model.inputs[0].shape[-1])
        clone = keras.models.clone_model(model, input_tensors=keras.Input((side, side, channels)))
    except Exception:  # noqa: BLE001  (not a functional or sequential model)
        return None
    widest = 0
    for layer in clone.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        outputs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        for output in outputs:
            shape = getattr(output, "shape", None)
            if shape is not None and all(isinstance(d, int) for d in shape[1:]):
                widest = max(widest, int(np.prod(shape[1:])))
    return widest * 4 / side ** 2 if widest else None


def working_bytes_per_pixel(model):
    """Estimated working memory of one network pass per input pixel (None where unknown)."""
    widest = widest_activation_bytes(model)
    return None if widest is None else WORKING_FACTOR * widest
