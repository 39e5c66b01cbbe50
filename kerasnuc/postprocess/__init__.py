"""Post-processing: model maps -> nuclei.

* :mod:`.instances`: probability (or background/inside/boundary softmax) -> labelled
  instances by marker-controlled watershed.
* :mod:`.peaks`: density / proximity maps -> (x, y) nucleus centres.
* :mod:`.embedding`: seed + pixel-embedding maps (BayesNuSeg) -> instances by sequential clustering.
* :mod:`.tta`: dihedral test-time augmentation of maps.
* :mod:`.multiple_inference`: NucSeg's multiple inference, the original view's nuclei reshaped
  by a pixel majority over rotated / flipped views (anchored at IoU > 0.2).
* :mod:`.ensemble`: pixel-wise mask logic ("a | (b & c)"), majority vote, mean probability.
"""

from kerasnuc.postprocess.embedding import instances_from_embeddings, split_embedding_maps
from kerasnuc.postprocess.ensemble import ensemble_masks, majority_vote, mean_probability
from kerasnuc.postprocess.instances import instances_from_probability, remove_small_instances
from kerasnuc.postprocess.peaks import centroids_from_density
from kerasnuc.postprocess.multiple_inference import MULTIPLE_INFERENCE_VIEWS, merge_views_anchored
from kerasnuc.postprocess.tta import DIHEDRAL, dihedral_transform, inverse_dihedral, predict_tta

__all__ = [
    "DIHEDRAL",
    "MULTIPLE_INFERENCE_VIEWS",
    "centroids_from_density",
    "dihedral_transform",
    "ensemble_masks",
    "instances_from_embeddings",
    "instances_from_probability",
    "inverse_dihedral",
    "majority_vote",
    "mean_probability",
    "merge_views_anchored",
    "predict_tta",
    "remove_small_instances",
    "split_embedding_maps",
]
