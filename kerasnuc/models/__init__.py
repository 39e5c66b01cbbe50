"""Model families behind one registry.

>>> from kerasnuc import models
>>> models.available()
['bayesnuseg', 'ce2p', 'dcrn', 'densenet', 'fc_densenet', 'fcn8', 'maskrcnn', 'mc_unet', 'pspsegnet',
 'r2unet', 'segnet', 'udnet', 'unet']
>>> model = models.build("unet", input_shape=(None, None, 3), filters=16)
"""

from kerasnuc import losses as _losses  # noqa: F401  (registers the losses a model.keras names)
from kerasnuc import losses_embedding as _losses_embedding  # noqa: F401  (BayesNuSeg's loss)
from kerasnuc.models.bayesnuseg import build_bayesnuseg
from kerasnuc.models.dcrn import build_dcrn, build_densenet
from kerasnuc.models.fc_densenet import build_fc_densenet
from kerasnuc.models.fcn import build_fcn8
from kerasnuc.models.layers import MaxPoolingWithIndices, MaxUnpoolingWithIndices, MCDropout
from kerasnuc.models.ce2p import build_ce2p
from kerasnuc.models.maskrcnn import CUSTOM_OBJECTS as _MASKRCNN_OBJECTS
from kerasnuc.models.maskrcnn import build_maskrcnn
from kerasnuc.models.mc_unet import build_mc_unet
from kerasnuc.models.psp import AdaptiveAveragePooling2D, BilinearResizeLike
from kerasnuc.models.pspsegnet import build_pspsegnet
from kerasnuc.models.r2unet import build_r2unet, build_udnet
from kerasnuc.models.segnet import build_segnet
from kerasnuc.models.unet import build_unet

# name -> (builder, task, what it is); the task tells training which targets to feed.
_REGISTRY = {
    "unet": (build_unet, "segmentation", "U-Net, configurable width and depth"),
    "segnet": (build_segnet, "segmentation", "SegNet, unpooling by max-pooling indices"),
    "r2unet": (build_r2unet, "segmentation", "Recurrent residual U-Net (t=2, ~1.0 M params)"),
    "udnet": (build_udnet, "detection", "R2U-Net regressing Gaussian density maps (t=3)"),
    "dcrn": (build_dcrn, "classification", "Densely connected recurrent patch classifier"),
    "densenet": (build_densenet, "classification", "DenseNet patch classifier (DCRN baseline)"),
    "mc_unet": (build_mc_unet, "segmentation", "Encoder-decoder with Monte-Carlo dropout"),
    "bayesnuseg": (build_bayesnuseg, "segmentation",
                   "BayesNuSeg: MC-dropout encoder, seed + embedding decoders, instances by clustering"),
    "pspsegnet": (build_pspsegnet, "segmentation", "Dilated ResNet-101 encoder, pyramid pooling, SegNet decoder"),
    "ce2p": (build_ce2p, "segmentation", "CE2P (Self-Correction's net): ResNet-101, PSP, edge, fusion"),
    "fcn8": (build_fcn8, "segmentation", "FCN-8s on a VGG-16 encoder (pool3/pool4 skip fusion)"),
    "fc_densenet": (build_fc_densenet, "segmentation", "FC-DenseNet (Tiramisu) 103, 67 or 56"),
    "maskrcnn": (build_maskrcnn, "instance", "Mask R-CNN (NucSeg): ResNet-101 FPN, nucleus anchors, 28x28 masks"),
}

# Layers that must be known when a .keras file is loaded in safe mode.
CUSTOM_OBJECTS = {
    "kerasnuc>MaxPoolingWithIndices": MaxPoolingWithIndices,
    "kerasnuc>MaxUnpoolingWithIndices": MaxUnpoolingWithIndices,
    "kerasnuc>MCDropout": MCDropout,
    "kerasnuc>AdaptiveAveragePooling2D": AdaptiveAveragePooling2D,
    "kerasnuc>BilinearResizeLike": BilinearResizeLike,
    **_MASKRCNN_OBJECTS,
}


def available():
    """Sorted names of the registered model families."""
    return sorted(_REGISTRY)


def task_of(name):
    """The task a family is built for: segmentation, detection, classification or instance."""
    return _entry(name)[1]


def describe(name):
    """One line saying what the family is."""
    return _entry(name)[2]


def default_config(name):
    """The builder's keyword defaults (the paper configuration), e.g. filters and depth."""
    import inspect

    signature = inspect.signature(_entry(name)[0])
    return {k: p.default for k, p in signature.parameters.items() if p.default is not p.empty}


def build(name, input_shape=None, **config):
    """Build family ``name``; ``config`` goes to its builder (see each ``build_*``)."""
    builder = _entry(name)[0]
    if input_shape is not None:
        config["input_shape"] = tuple(input_shape)
    try:
        return builder(**config)
    except TypeError as error:
        raise TypeError(f"model '{name}': {error}") from None


def is_stochastic(model):
    """True if the model samples at inference (has Monte-Carlo dropout layers)."""
    return any(isinstance(layer, MCDropout) for layer in model.layers)


def _entry(name):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(available())}") from None
