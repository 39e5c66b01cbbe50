"""BayesNuSeg's instance loss (Neven et al., CVPR 2019, as BayesNuSeg uses it), ``keras.ops`` only.

The model (:mod:`kerasnuc.models.bayesnuseg`) outputs ``[seed..., o_y, o_x, s]`` in [0, 1].
Pixel embeddings are ``e = (row, col) / offset_scale + (2 o - 1)`` (coordinates added here,
not in the graph) and sigma is ``s``, both in units of ``offset_scale`` pixels. Per instance
k of a crop (mask M_k): centre ``C_k`` = mean embedding over M_k, ``sigma_k`` = mean sigma
over M_k, Gaussian score ``phi_k = exp(-||e - C_k||^2 / (2 sigma_k^2))`` at every pixel.

    loss = lambda_iou * mean_k LovaszHinge(2 phi_k - 1, M_k)
         + lambda_seed * mean_pixels(fg_weight * [x in M_k] (seed - phi_k)^2 + [bg] seed^2)
         + lambda_smooth * mean_k mean_{x in M_k} (sigma(x) - sigma_k)^2

(``phi`` and ``sigma_k`` held constant in the seed and smoothness terms, as Neven et al.).
Lambdas 1, 1, 10 as the paper. Targets: (B, H, W, 1) instance ids 0..K of each crop,
sequential per crop (``training.embedding.EmbeddingDataset`` relabels every crop), as
floats; ids above ``max_instances`` are ignored (neither instance nor background). The
one-hot over ids is fixed at ``max_instances`` so shapes are static (TF and JAX). With
several classes the target's optional second channel is each pixel's class (1..classes);
without it every instance is class 1.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kerasnuc")
class BayesNuSegLoss(keras.losses.Loss):
    """Seed + embedding (Lovasz hinge) + sigma smoothness loss of BayesNuSeg / Neven et al."""

    def __init__(self, lambda_iou=1.0, lambda_seed=1.0, lambda_smooth=10.0, offset_scale=64.0,
                 max_instances=64, classes=1, foreground_weight=1.0, name="bayesnuseg", **kwargs):
        super().__init__(name=name, **kwargs)
        self.lambda_iou, self.lambda_seed = float(lambda_iou), float(lambda_seed)
        self.lambda_smooth, self.offset_scale = float(lambda_smooth), float(offset_scale)
        self.max_instances, self.classes = int(max_instances), int(classes)
        self.foreground_weight = float(foreground_weight)
        if self.offset_scale <= 0 or self.max_instances < 1 or self.classes < 1:
            raise ValueError("bayesnuseg loss: offset_scale > 0, max_instances >= 1 and classes >= 1 needed")

    def call(self, y_true, y_pred):
        terms = self.terms(y_true, y_pred)
        return (self.lambda_iou * terms["iou"] + self.lambda_seed * terms["seed"]
                + self.lambda_smooth * terms["smooth"])

    def terms(self, y_true, y_pred):
        """{"iou", "seed", "smooth"}: the three (B,) per-crop terms before weighting."""
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "float32")
        shape = ops.shape(y_pred)
        batch, height, width = shape[0], shape[1], shape[2]
        pixels = height * width
        classes = self.classes
        seed = ops.reshape(y_pred[..., :classes], (batch, pixels, classes))
        offsets = ops.reshape(y_pred[..., classes:classes + 2] * 2.0 - 1.0, (batch, pixels, 2))
        sigma = ops.reshape(y_pred[..., classes + 2], (batch, pixels))
        rows = ops.cast(ops.arange(height), "float32")[:, None] + ops.zeros((1, width))
        cols = ops.zeros((height, 1)) + ops.cast(ops.arange(width), "float32")[None, :]
        coords = ops.stack([ops.reshape(rows, (-1,)), ops.reshape(cols, (-1,))], axis=-1) / self.offset_scale
        embedding = coords[None] + offsets  # (B, N, 2)

        ids = ops.reshape(y_true[..., 0], (batch, pixels))
        k = ops.cast(ops.arange(1, self.max_instances + 1), "float32")
        masks = ops.cast(ops.equal(ids[:, None, :], k[None, :, None]), "float32")  # (B, K, N)
        count = ops.sum(masks, axis=-1)  # (B, K)
        present = ops.cast(count > 0, "float32")
        safe = ops.maximum(count, 1.0)
        centre = ops.einsum("bkn,bnd->bkd", masks, embedding) / safe[..., None]  # (B, K, 2)
        sigma_k = ops.einsum("bkn,bn->bk", masks, sigma) / safe
        squared = ops.sum(ops.square(embedding[:, None] - centre[:, :, None]), axis=-1)  # (B, K, N)
        bandwidth = 2.0 * ops.square(ops.maximum(sigma_k, 1e-4))[..., None]
        phi = ops.exp(-squared / bandwidth)

        instances = ops.maximum(ops.sum(present, axis=-1), 1.0)
        hinge = lovasz_hinge(2.0 * phi - 1.0, masks)  # (B, K)
        iou = ops.sum(hinge * present, axis=-1) / instances
        spread = ops.square(sigma[:, None, :] - ops.stop_gradient(sigma_k)[..., None]) * masks
        smooth = ops.sum(ops.sum(spread, axis=-1) / safe * present, axis=-1) / instances

        own_phi = ops.stop_gradient(ops.sum(phi * masks, axis=1))  # (B, N): phi of each pixel's instance
        inside = ops.sum(masks, axis=1)
        background = ops.cast(ops.equal(ids, 0.0), "float32")
        if classes > 1 and y_true.shape[-1] is not None and y_true.shape[-1] > 1:
            pixel_class = ops.reshape(y_true[..., 1], (batch, pixels))
        else:
            pixel_class = ops.ones((batch, pixels))
        class_hot = ops.cast(ops.equal(pixel_class[..., None],
                                       ops.cast(ops.arange(1, classes + 1), "float32")[None, None]), "float32")
        target = own_phi[..., None] * class_hot  # (B, N, C): phi in the pixel's class channel, 0 elsewhere
        inside_error = ops.sum(ops.square(seed - target), axis=-1) * inside * self.foreground_weight
        background_error = ops.sum(ops.square(seed), axis=-1) * background
        seed_term = ops.mean(inside_error + background_error, axis=-1)
        return {"iou": iou, "seed": seed_term, "smooth": smooth}

    def get_config(self):
        return {**super().get_config(), "lambda_iou": self.lambda_iou, "lambda_seed": self.lambda_seed,
                "lambda_smooth": self.lambda_smooth, "offset_scale": self.offset_scale,
                "max_instances": self.max_instances, "classes": self.classes,
                "foreground_weight": self.foreground_weight}


def lovasz_hinge(logits, labels):
    """(B, K) Lovasz hinge (Berman et al. 2018) of (B, K, N) logits against (B, K, N) binary masks.

    The Lovasz extension of the Jaccard loss: hinge errors sorted in decreasing order,
    weighted by the Jaccard gradient of the sorted labels; a convex surrogate of 1 - IoU.
    """
    signs = 2.0 * labels - 1.0
    errors = 1.0 - logits * signs
    order = ops.argsort(-ops.stop_gradient(errors), axis=-1)
    errors_sorted = ops.take_along_axis(errors, order, axis=-1)
    labels_sorted = ops.take_along_axis(labels, order, axis=-1)
    total = ops.sum(labels_sorted, axis=-1, keepdims=True)
    intersection = total - ops.cumsum(labels_sorted, axis=-1)
    union = total + ops.cumsum(1.0 - labels_sorted, axis=-1)
    jaccard = 1.0 - intersection / ops.maximum(union, 1e-6)
    gradient = ops.concatenate([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], axis=-1)
    return ops.sum(ops.relu(errors_sorted) * ops.stop_gradient(gradient), axis=-1)
