"""Evaluation metrics in plain NumPy/SciPy (no Keras/TensorFlow needed).

- segmentation: pixel Dice/IoU, object F1, AJI, AJI+, panoptic quality, one-call report;
- detection: centre-point precision/recall/F1 within a radius;
- classification: per-class F1, confusion matrix, ROC AUC/AP, classified-point F1;
- uncertainty: predictive entropy and uncertainty accuracy for MC-dropout maps.
"""

from .classification import classification_report, detection_classification_scores
from .detection import detection_scores, match_points
from .segmentation import (
    OverlapTable,
    aggregated_jaccard_index,
    aji_plus,
    match_one_to_one,
    object_scores,
    overlap_table,
    panoptic_quality,
    pixel_dice,
    pixel_iou,
    segmentation_report,
)
from .uncertainty import predictive_entropy, uncertainty_accuracy

__all__ = [
    "OverlapTable",
    "aggregated_jaccard_index",
    "aji_plus",
    "classification_report",
    "detection_classification_scores",
    "detection_scores",
    "match_one_to_one",
    "match_points",
    "object_scores",
    "overlap_table",
    "panoptic_quality",
    "pixel_dice",
    "pixel_iou",
    "predictive_entropy",
    "segmentation_report",
    "uncertainty_accuracy",
]
