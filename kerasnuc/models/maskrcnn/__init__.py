"""Mask R-CNN for nuclei (NucSeg, Jung, Lodhi and Kang 2019), in Keras 3 with keras.ops only.

``build_maskrcnn`` makes the inference model (static square input, fixed-size padded
detections: exports to SavedModel and TFLite); ``training_targets`` turns one label crop into
the NumPy targets; ``build_trainer`` wraps the inference model's layers into the training
graph that computes the five losses.
"""

from kerasnuc.models.maskrcnn.config import resolve_config
from kerasnuc.models.maskrcnn.detections import ClassMasks, DetectionLayer
from kerasnuc.models.maskrcnn.heads import FoldRegions, UnfoldRegions
from kerasnuc.models.maskrcnn.losses import LOSS_NAMES, MaskRCNNLosses
from kerasnuc.models.maskrcnn.model import INPUT_MULTIPLE, build_maskrcnn
from kerasnuc.models.maskrcnn.proposals import ProposalLayer
from kerasnuc.models.maskrcnn.roi_align import RoIAlign
from kerasnuc.models.maskrcnn.sampling import RegionSampler
from kerasnuc.models.maskrcnn.targets import TARGET_KEYS, training_targets
from kerasnuc.models.maskrcnn.trainer import MaskRCNNTrainer, build_trainer

CUSTOM_OBJECTS = {f"kerasnuc>{layer.__name__}": layer for layer in (
    ClassMasks, DetectionLayer, FoldRegions, UnfoldRegions, MaskRCNNLosses, ProposalLayer, RoIAlign,
    RegionSampler)}
"""The custom layers of the inference and training graphs, for safe-mode loading."""

__all__ = ["build_maskrcnn", "build_trainer", "training_targets", "resolve_config", "TARGET_KEYS",
           "LOSS_NAMES", "INPUT_MULTIPLE", "CUSTOM_OBJECTS", "MaskRCNNTrainer"]
