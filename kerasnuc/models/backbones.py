"""ImageNet backbone weights from a local file (the network cannot download them here).

Our encoders name their layers as ``keras.applications`` does (``block1_conv1`` for VGG-16,
``conv2_block1_1_conv`` for ResNet-101), so weights saved from an application model load by
layer name even where our encoder differs (dilated stages keep the kernels' shapes).
Default is random initialisation; the run's config.json records ``backbone_weights``.
"""

import hashlib
import os

import keras

APPLICATIONS = {
    "vgg16": "VGG16",
    "resnet50": "ResNet50",
    "resnet101": "ResNet101",
}


class BackboneWeightsError(ValueError):
    """The weights file is missing, unreadable or does not fit the encoder."""


def file_digest(path):
    """sha256 of the weights file, recorded so a run says exactly which weights it started from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_backbone_weights(model, path, application):
    """Copy the weights of ``keras.applications.<application>`` (read from ``path``, the
    usual ``*_notop.h5`` file or a ``.weights.h5`` of that model) into the layers of
    ``model`` with the same names. Returns the number of layers loaded.

    Raises BackboneWeightsError naming the file when it is missing, cannot be read, or
    no layer / a layer's shapes do not match.
    """
    if application not in APPLICATIONS:
        raise BackboneWeightsError(f"unknown backbone '{application}'; choose {', '.join(APPLICATIONS)}")
    if not os.path.isfile(path):
        raise BackboneWeightsError(f"{path}: backbone weights file not found")
    builder = getattr(keras.applications, APPLICATIONS[application])
    try:
        source = builder(include_top=False, weights=path, input_shape=(None, None, 3))
    except Exception as error:  # h5py / Keras say what was wrong with the file
        raise BackboneWeightsError(f"{path}: cannot load {application} weights ({error})") from None
    ours = {layer.name: layer for layer in model.layers}
    loaded = 0
    for layer in source.layers:
        weights = layer.get_weights()
        if not weights or layer.name not in ours:
            continue
        target = ours[layer.name]
        shapes = [tuple(w.shape) for w in target.get_weights()]
        if shapes != [tuple(w.shape) for w in weights]:
            raise BackboneWeightsError(
                f"{path}: layer {layer.name} has shapes {[w.shape for w in weights]}, "
                f"the encoder expects {shapes}")
        target.set_weights(weights)
        loaded += 1
    if not loaded:
        raise BackboneWeightsError(f"{path}: no layer of {application} matches the encoder's layer names")
    return loaded
