"""NucSeg's "multiple inference": the nuclei of the original view, confirmed and reshaped by
a pixel vote of the same nuclei predicted in rotated and flipped views.

Jung, Lodhi and Kang, "An automatic nuclei segmentation method based on deep convolutional
neural networks for histopathology images", BMC Biomedical Engineering 1:24 (2019), the
post-processing step they call multiple inference (their ablation's "-P" rows leave it out).
The rule as implemented here, with the choices the paper's text leaves open made explicit:

1. **Views.** The original image and six rotated / flipped copies, seven predictions in all:
   kerasnuc's dihedral views 0..6 (:data:`MULTIPLE_INFERENCE_VIEWS`, see
   :data:`kerasnuc.predict.tiling.DIHEDRAL`): rotations by 90, 180 and 270 degrees, the
   left-right mirror, the mirror of the 90-degree rotation (a transpose) and the up-down
   mirror. The eighth dihedral view (mirror of the 270-degree rotation) is not used. Which
   sixth transform the paper took could not be checked against its text here; any list of
   views can be given (``Predictor(multiple_inference=[0, 1, 2, 3, 4, 6])``, ...).
2. Every view is predicted and post-processed into instances on its own, and its label image
   is mapped back into the original orientation before anything is compared.
3. **Anchored matching.** The nuclei of the ORIGINAL view's prediction are the candidates. In
   each other view, a nucleus whose IoU with an original nucleus is above ``iou`` (0.2) is its
   match; matching is one-to-one within a view (pairs taken greedily by decreasing IoU), so a
   view's nucleus speaks for at most one original nucleus and vice versa.
4. **Pixel majority.** The final mask of an original nucleus is the set of pixels covered by
   more than ``vote`` (50 %) of the masks counted for it: its own mask in the original view
   and its matches. With ``unmatched="absent"`` (default) a view without a match counts as a
   mask that covers nothing, so the fraction is over all n views: a nucleus must be found in
   at least n // 2 + 1 views (4 of 7) to keep any pixel, and one found in 3 of 7 is dropped.
   With ``unmatched="abstain"`` only the matched masks are counted (a nucleus seen in the
   original alone keeps its whole mask).
5. **Nuclei found only in other views** (matched to no original nucleus) are dropped: the
   original decides which nuclei exist, the other views confirm and reshape them.
6. A pixel two voted masks claim goes to the one with more votes there, then to the nucleus
   whose original mask holds it, then to the lower original id.

This replaces kerasnuc's earlier unanchored vote (``merge_instances_by_vote``: nuclei of all
views grouped transitively at IoU > 0.2, a group kept without any original member, 8 views);
``training.evaluate --tta-merge vote`` now means this rule.

Label images in, label image out, so it serves every family unchanged: probability-map models
(each view -> watershed -> mapped back) and instance models such as Mask R-CNN (each view's
detections -> labels -> mapped back). NumPy only, so it runs wherever the engine runs.
"""

import numpy as np

__all__ = ["MULTIPLE_INFERENCE_VIEWS", "UNMATCHED", "merge_views_anchored", "multiple_inference_views"]

MULTIPLE_INFERENCE_VIEWS = (0, 1, 2, 3, 4, 5, 6)
"""Dihedral view indices of the seven inferences; 0 (the original) comes first and is the anchor."""

UNMATCHED = ("absent", "abstain")


def multiple_inference_views(option):
    """The view list of a ``multiple_inference`` option: True -> :data:`MULTIPLE_INFERENCE_VIEWS`,
    False / None / 0 -> None (off), or a list of dihedral indices that holds 0 (put first, the
    anchor) and at least one other view."""
    if option is None or option is False or (isinstance(option, (int, np.integer)) and not isinstance(option, bool)
                                             and int(option) == 0):
        return None
    if option is True:
        return list(MULTIPLE_INFERENCE_VIEWS)
    try:
        views = [int(k) for k in option]
    except TypeError:
        raise ValueError(f"multiple_inference must be True, False or a list of dihedral view indices, "
                         f"got {option!r}") from None
    if any(not 0 <= k < 8 for k in views) or len(set(views)) != len(views):
        raise ValueError(f"multiple_inference views must be distinct dihedral indices 0..7, got {views}")
    if 0 not in views or len(views) < 2:
        raise ValueError(f"multiple_inference views must hold the original (0) and another view, got {views}")
    return [0] + [k for k in views if k != 0]


def _compact(labels, name):
    """(flat int64 labels 0..m, m) of an (H, W) label image; negative ids are an error."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label image, got shape {labels.shape}")
    if labels.dtype == bool:
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got {labels.dtype}")
    flat = labels.ravel().astype(np.int64)
    if flat.size and flat.min() < 0:
        raise ValueError(f"{name} has negative labels")
    values, inverse = np.unique(flat, return_inverse=True)
    if values.size and values[0] != 0:
        inverse = inverse + 1  # no background pixel: ids start at 1 all the same
        values = np.concatenate([[0], values])
    return inverse.reshape(-1).astype(np.int64), int(values.size - 1)


def _matches(original, n_original, view, n_view, iou):
    """(n_original + 1,) array: for each original nucleus the view nucleus matched to it (0: none)."""
    match = np.zeros(n_original + 1, np.int64)
    both = (original > 0) & (view > 0)
    if not both.any():
        return match
    codes, overlap = np.unique(original[both] * (n_view + 1) + view[both], return_counts=True)
    a, b = codes // (n_view + 1), codes % (n_view + 1)
    area_a = np.bincount(original, minlength=n_original + 1)
    area_b = np.bincount(view, minlength=n_view + 1)
    score = overlap / (area_a[a] + area_b[b] - overlap)
    good = score > iou
    a, b, score = a[good], b[good], score[good]
    used = np.zeros(n_view + 1, bool)
    for index in np.lexsort((b, a, -score)):  # best IoU first; ties: lower ids
        if match[a[index]] == 0 and not used[b[index]]:
            match[a[index]] = b[index]
            used[b[index]] = True
    return match


def merge_views_anchored(original_labels, view_labels, iou=0.2, vote=0.5, unmatched="absent"):
    """(H, W) int32 nuclei 1..k: the original view's nuclei after the multiple-inference vote.

    ``original_labels``: the original view's instance labels (0 background); ``view_labels``:
    the other views' label images, each already mapped back to the original orientation.
    A nucleus keeps the pixels that more than ``vote`` of its counted masks cover; see the
    module docstring for the matching (IoU > ``iou``, one-to-one per view, anchored on the
    original) and ``unmatched`` ("absent": views without a match vote background; "abstain":
    they are not counted). Output ids follow the original's label order.
    """
    if unmatched not in UNMATCHED:
        raise ValueError(f"unmatched must be one of {UNMATCHED}, got {unmatched!r}")
    if not 0.0 <= float(vote) < 1.0:
        raise ValueError(f"vote must be a fraction in [0, 1), got {vote}")
    shape = np.shape(original_labels)
    original, n_original = _compact(original_labels, "original_labels")
    views = []
    for index, labels in enumerate(view_labels):
        if np.shape(labels) != shape:
            raise ValueError(f"view_labels[{index}] has shape {np.shape(labels)}, the original {shape}")
        views.append(_compact(labels, f"view_labels[{index}]"))
    if n_original == 0:
        return np.zeros(shape, np.int32)

    # every source (original, then views) as labels in the original's ids: (pixel, id) pairs
    counted = np.ones(n_original + 1, np.int64)
    pixel_list = [np.flatnonzero(original)]
    id_list = [original[pixel_list[0]]]
    for view, n_view in views:
        match = _matches(original, n_original, view, n_view, iou)
        counted += match > 0
        owner = np.zeros(n_view + 1, np.int64)
        owner[match[match > 0]] = np.flatnonzero(match)
        mapped = owner[view]
        pixels = np.flatnonzero(mapped)
        pixel_list.append(pixels)
        id_list.append(mapped[pixels])
    total = len(views) + 1 if unmatched == "absent" else counted
    pixels, ids = np.concatenate(pixel_list), np.concatenate(id_list)
    keys, votes = np.unique(pixels * (n_original + 1) + ids, return_counts=True)
    pixels, ids = keys // (n_original + 1), keys % (n_original + 1)
    keep = votes > float(vote) * (total if np.ndim(total) == 0 else total[ids])
    pixels, ids, votes = pixels[keep], ids[keep], votes[keep]
    own = original[pixels] == ids
    order = np.lexsort((ids, ~own, -votes, pixels))  # per pixel: most votes, own mask, lower id
    pixels, ids = pixels[order], ids[order]
    first = np.ones(len(pixels), bool)
    first[1:] = pixels[1:] != pixels[:-1]
    merged = np.zeros(original.size, np.int64)
    merged[pixels[first]] = ids[first]
    survivors = np.unique(merged)
    remap = np.zeros(n_original + 1, np.int32)
    remap[survivors[survivors > 0]] = np.arange(1, np.count_nonzero(survivors) + 1, dtype=np.int32)
    return remap[merged].reshape(shape)
