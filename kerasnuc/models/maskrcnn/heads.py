"""The three heads: RPN (shared over P2..P6), box head (two FC layers), mask head (FCN, 28x28).

Each head is a dict of named layers made once (``*_layers``) and a function applying it, so
the trainer (:mod:`.trainer`) reuses the inference model's layers by name on its own sampled
regions. Region batches (B, R, ...) are folded into (B * R, ...) for the mask convolutions.
"""

import keras
from keras import layers, ops

BOX_HEAD = ("mrcnn_fc1", "mrcnn_fc2", "mrcnn_class_logits", "mrcnn_bbox")
MASK_HEAD = ("mrcnn_mask_conv1", "mrcnn_mask_conv2", "mrcnn_mask_conv3", "mrcnn_mask_conv4",
             "mrcnn_mask_deconv", "mrcnn_mask")


@keras.saving.register_keras_serializable(package="kerasnuc")
class FoldRegions(keras.layers.Layer):
    """(B, R, ...) -> (B * R, ...): region batches through Conv2D, which wants rank 4."""

    def call(self, x):
        return ops.reshape(x, (-1,) + tuple(x.shape[2:]))

    def compute_output_shape(self, shape):
        return (None,) + tuple(shape[2:])


@keras.saving.register_keras_serializable(package="kerasnuc")
class UnfoldRegions(keras.layers.Layer):
    """(B * R, ...) -> (B, R, ...), the inverse of :class:`FoldRegions` for ``regions`` R."""

    def __init__(self, regions, **kwargs):
        super().__init__(**kwargs)
        self.regions = int(regions)

    def call(self, x):
        return ops.reshape(x, (-1, self.regions) + tuple(x.shape[1:]))

    def compute_output_shape(self, shape):
        return (None, self.regions) + tuple(shape[1:])

    def get_config(self):
        return {**super().get_config(), "regions": self.regions}


def _normal(stddev):
    """Detectron's initialisation of the prediction layers: small outputs at the start, so the
    first steps' losses are those of "no deltas, even odds" and not of random large deltas."""
    return keras.initializers.RandomNormal(stddev=stddev)


def rpn_head(pyramid, filters, anchors_per_location):
    """[P2..P6] -> (rpn_logits (B, A), rpn_deltas (B, A, 4)), anchors ordered as :mod:`.anchors`."""
    conv = layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_initializer=_normal(0.01),
                         name="rpn_conv_shared")
    score = layers.Conv2D(anchors_per_location, 1, kernel_initializer=_normal(0.01), name="rpn_class_raw")
    delta = layers.Conv2D(4 * anchors_per_location, 1, kernel_initializer=_normal(0.01), name="rpn_bbox_pred")
    logits, deltas = [], []
    for k, level in enumerate(pyramid):
        shared = conv(level)
        cells = level.shape[1] * level.shape[2] * anchors_per_location
        logits.append(layers.Reshape((cells,), name=f"rpn_logits_p{k + 2}")(score(shared)))
        deltas.append(layers.Reshape((cells, 4), name=f"rpn_deltas_p{k + 2}")(delta(shared)))
    return (layers.Concatenate(axis=1, name="rpn_logits")(logits),
            layers.Concatenate(axis=1, name="rpn_deltas")(deltas))


def box_head_layers(units, num_classes):
    """Layers of the box head: two FC layers of ``units``, class logits, per-class deltas."""
    return {"mrcnn_fc1": layers.Dense(units, activation="relu", name="mrcnn_fc1"),
            "mrcnn_fc2": layers.Dense(units, activation="relu", name="mrcnn_fc2"),
            "mrcnn_class_logits": layers.Dense(num_classes + 1, kernel_initializer=_normal(0.01),
                                               name="mrcnn_class_logits"),
            "mrcnn_bbox": layers.Dense(4 * (num_classes + 1), kernel_initializer=_normal(0.001), name="mrcnn_bbox")}


def box_head(pooled, head, num_classes, tag=""):
    """(B, R, 7, 7, C) pooled regions -> class logits (B, R, K+1), deltas (B, R, K+1, 4)."""
    regions = pooled.shape[1]
    x = layers.Reshape((regions, -1), name=f"mrcnn_flatten{tag}")(pooled)
    x = head["mrcnn_fc2"](head["mrcnn_fc1"](x))
    deltas = layers.Reshape((regions, num_classes + 1, 4), name=f"mrcnn_bbox_reshape{tag}")(head["mrcnn_bbox"](x))
    return head["mrcnn_class_logits"](x), deltas


def mask_head_layers(filters, num_classes):
    """Layers of the mask head: four 3x3 convs, a x2 transposed conv, per-class 1x1 logits."""
    head = {f"mrcnn_mask_conv{k}": layers.Conv2D(filters, 3, padding="same", activation="relu",
                                                  name=f"mrcnn_mask_conv{k}") for k in range(1, 5)}
    head["mrcnn_mask_deconv"] = layers.Conv2DTranspose(filters, 2, strides=2, activation="relu",
                                                       name="mrcnn_mask_deconv")
    head["mrcnn_mask"] = layers.Conv2D(num_classes, 1, name="mrcnn_mask")
    return head


def mask_head(pooled, head, tag=""):
    """(B, R, 14, 14, C) pooled regions -> mask logits (B, R, 28, 28, K)."""
    regions = pooled.shape[1]
    x = FoldRegions(name=f"mrcnn_mask_fold{tag}")(pooled)
    for name in MASK_HEAD:
        x = head[name](x)
    return UnfoldRegions(regions, name=f"mrcnn_mask_unfold{tag}")(x)


def shared_layers(model, names):
    """The inference model's layers ``names`` as a head dict, for the trainer."""
    return {name: model.get_layer(name) for name in names}
