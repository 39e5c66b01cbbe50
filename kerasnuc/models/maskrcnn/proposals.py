"""RPN proposals: decode the anchors' deltas, clip, keep the top scores, suppress overlaps.

Static shapes throughout (top-k, fixed-size NMS, zero padding), so the inference model
exports to SavedModel and TFLite and traces under JAX. The anchors are a constant rebuilt from
the layer's configuration (:func:`.anchors.generate_anchors`), never stored as weights.
"""

import keras
from keras import ops

from kerasnuc.models.maskrcnn.anchors import generate_anchors
from kerasnuc.models.maskrcnn.boxes import clip_boxes, decode
from kerasnuc.models.maskrcnn.float32 import Float32Layer
from kerasnuc.models.maskrcnn.nms import non_max_suppression


@keras.saving.register_keras_serializable(package="kerasnuc")
class ProposalLayer(Float32Layer):
    """[rpn_logits (B, A), rpn_deltas (B, A, 4)] -> proposals (B, post_nms, 4), zero-padded.

    ``pre_nms`` best-scored anchors are decoded and clipped to the image, then greedy NMS at
    ``nms_threshold`` keeps at most ``post_nms`` of them in score order. Proposals carry no
    gradient (Mask R-CNN's approximate joint training).
    """

    def __init__(self, image_size, anchor_scales=(8, 16, 32, 64, 128), anchor_ratios=(0.5, 1.0, 2.0),
                 pre_nms=1000, post_nms=1000, nms_threshold=0.7, **kwargs):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.anchor_scales = tuple(float(s) for s in anchor_scales)
        self.anchor_ratios = tuple(float(r) for r in anchor_ratios)
        self.pre_nms = int(pre_nms)
        self.post_nms = int(post_nms)
        self.nms_threshold = float(nms_threshold)
        self.anchors = generate_anchors(self.image_size, self.anchor_scales, self.anchor_ratios)

    def call(self, inputs):
        logits, deltas = inputs
        logits = ops.stop_gradient(ops.cast(logits, "float32"))
        deltas = ops.stop_gradient(ops.cast(deltas, "float32"))
        count = min(self.pre_nms, self.anchors.shape[0])
        scores, top = ops.top_k(logits, count)
        anchors = ops.take(ops.convert_to_tensor(self.anchors), top, axis=0)  # (B, K, 4)
        boxes = clip_boxes(decode(anchors, ops.take_along_axis(deltas, top[..., None], axis=1)),
                           self.image_size)
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        keep, kept = non_max_suppression(boxes, scores, self.post_nms, self.nms_threshold, valid=area > 0)
        return ops.take_along_axis(boxes, keep[..., None], axis=1) * kept[..., None]

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], self.post_nms, 4)

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size, "anchor_scales": self.anchor_scales,
                "anchor_ratios": self.anchor_ratios, "pre_nms": self.pre_nms, "post_nms": self.post_nms,
                "nms_threshold": self.nms_threshold}
