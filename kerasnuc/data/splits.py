"""Reproducible splits of image names, grouped so crops of one source never straddle two sides.

A split is ``{"train": [...], "val": [...], "test": [...]}`` of sorted names;
:func:`kfold_splits` gives k of them whose test sides partition the names. Splits are
stored as JSON (:func:`save_split`, :func:`load_split`) in a run's folder so evaluation
and later runs use exactly the same images.
"""

import json
import os

import numpy as np

from kerasnuc.atomic import write_text_atomic

__all__ = ["train_val_test_split", "kfold_splits", "save_split", "load_split", "records_of", "SIDES",
           "MONUSEG_ORGANS", "monuseg_organ", "monuseg_organ_split", "monuseg_test_groups", "NAMED_SPLITS",
           "split_from_spec"]

SIDES = ("train", "val", "test")

# ---------------------------------------------------------------------------- MoNuSeg by organ

MONUSEG_ORGANS = {
    "A7": "breast", "AR": "breast", "E2": "breast",  # TCGA BRCA
    "B0": "kidney", "HE": "kidney",  # KIRC (B0), KIRP (HE)
    "18": "liver", "21": "liver", "38": "liver", "49": "liver", "50": "liver",  # see the note below
    "G9": "prostate", "CH": "prostate",  # PRAD
    "DK": "bladder", "G2": "bladder",  # BLCA
    "AY": "colon", "NH": "colon",  # COAD
    "KB": "stomach", "RD": "stomach",  # STAD
}
"""Organ of a MoNuSeg 2018 training tile by the TCGA tissue-source-site code of its name
(``TCGA-<site>-<participant>-...``), as the MoNuSeg organisers' data page (organ and disease
type per image; the same organs are the ``tissue`` column of the RationAI/MoNuSeg mirror of the
challenge data on Hugging Face) and Kumar et al., IEEE TMI 36(7) 2017 (the 30 images of 7 organs
and their split) give it. Note: the organisers and Kumar et al. call the five sites 18, 21, 38, 49 and 50
"liver", but these are TCGA lung projects (18, 21: LUSC; 38, 49, 50: LUAD), as the organisers'
own disease-type column says (lung squamous cell / adenocarcinoma); the name is kept so the
split matches the papers that use it."""

# Kumar et al. 2017: 16 training images of 4 organs (4 each), a same-organ test set of 8 (2 per
# training organ) and a different-organ test set of 6 (2 each of bladder, colon, stomach).
_KUMAR_TEST_SAME = ("TCGA-E2-A1B5-01Z-00-DX1", "TCGA-E2-A14V-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1",
                    "TCGA-B0-5698-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-21-5786-01Z-00-DX1",
                    "TCGA-CH-5767-01Z-00-DX1", "TCGA-G9-6362-01Z-00-DX1")
_KUMAR_TEST_OTHER = ("TCGA-DK-A2I6-01A-01-TS1", "TCGA-G2-A2EK-01A-02-TSB", "TCGA-AY-A8YK-01A-01-TS1",
                     "TCGA-NH-A8F7-01A-01-TS1", "TCGA-KB-A93J-01A-01-TS1", "TCGA-RD-A8N9-01A-01-TS1")
# one training image per training organ held out to tune post-processing (the papers give no
# validation set; these four are the "only-train with validation" choice of a public MoNuSeg
# converter, so the organ mix of training is unchanged)
_KUMAR_VAL = ("TCGA-AR-A1AS-01Z-00-DX1", "TCGA-HE-7130-01Z-00-DX1", "TCGA-50-5931-01Z-00-DX1",
              "TCGA-G9-6363-01Z-00-DX1")


def monuseg_organ(name):
    """The organ of a MoNuSeg image name (:data:`MONUSEG_ORGANS`); ValueError for another name."""
    parts = str(name).split(":")[-1].split("-")
    if len(parts) < 3 or parts[0] != "TCGA" or parts[1] not in MONUSEG_ORGANS:
        raise ValueError(f"'{name}' is not a MoNuSeg 2018 training image (TCGA-<site>-... with a known site)")
    return MONUSEG_ORGANS[parts[1]]


def monuseg_test_groups():
    """{"same_organ": 8 names, "different_organ": 6 names}: Kumar et al.'s two test sets."""
    return {"same_organ": sorted(_KUMAR_TEST_SAME), "different_organ": sorted(_KUMAR_TEST_OTHER)}


def monuseg_organ_split(names):
    """The organ-wise MoNuSeg split ("MOSID" in NucSeg, after Kumar et al. 2017) of ``names``
    (the 30 training tiles): train 12 / val 4 of breast, kidney, liver, prostate; test the 14
    images of the same-organ and different-organ test sets. Every name must be a MoNuSeg tile,
    and all 30 must be there."""
    names = sorted(names)
    for name in names:
        monuseg_organ(name)
    test = set(_KUMAR_TEST_SAME) | set(_KUMAR_TEST_OTHER)
    expected = 30
    if len(set(names)) != expected:
        raise ValueError(f"the monuseg_organ split needs the {expected} MoNuSeg 2018 training tiles, got "
                         f"{len(set(names))} images")
    missing = sorted((test | set(_KUMAR_VAL)) - set(names))
    if missing:
        raise ValueError(f"the monuseg_organ split needs {missing[0]} (and {len(missing) - 1} more), not in the data")
    val = set(_KUMAR_VAL)
    return {"train": [n for n in names if n not in test and n not in val], "val": sorted(val), "test": sorted(test)}


NAMED_SPLITS = {"monuseg_organ": monuseg_organ_split}
"""Splits given by name in a training config's ``split``."""


def split_from_spec(spec, names):
    """A fixed split of ``names`` from a config's ``split``: a name of :data:`NAMED_SPLITS`, or
    the path of a split JSON file (:func:`load_split`; configs/splits/). A file's names must all
    be in the data; images the file does not name are left out (not trained or scored)."""
    if spec in NAMED_SPLITS:
        return NAMED_SPLITS[spec](names)
    if not os.path.isfile(os.fspath(spec)):
        raise ValueError(f"split '{spec}': neither a named split ({', '.join(NAMED_SPLITS)}) nor a split file")
    split = load_split(spec)
    if isinstance(split, list):
        raise ValueError(f"{spec}: holds {len(split)} folds; a config's split takes one train/val/test split")
    known = set(names)
    unknown = [name for side in split.values() for name in side if name not in known]
    if unknown:
        raise ValueError(f"{spec}: {len(unknown)} names are not in the data, e.g. '{unknown[0]}'")
    return {side: sorted(split.get(side, [])) for side in SIDES}


def train_val_test_split(names, val_fraction=0.15, test_fraction=0.15, seed=0):
    """Shuffle the image names with ``seed`` and cut into train/val/test name lists.

    At least one image goes to each non-empty fraction when there are 3 or more images.
    """
    names = sorted(names)
    needed = 1 + (val_fraction > 0) + (test_fraction > 0)
    if len(names) < needed:
        raise ValueError(f"need at least {needed} images to split into train/val/test, got {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    n_test = max(1, int(round(test_fraction * len(names)))) if test_fraction > 0 else 0
    n_val = max(1, int(round(val_fraction * len(names)))) if val_fraction > 0 else 0
    test = [names[i] for i in order[:n_test]]
    val = [names[i] for i in order[n_test:n_test + n_val]]
    train = [names[i] for i in order[n_test + n_val:]]
    if not train:
        raise ValueError("no images left for training after the validation and test split")
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def _group_of(names, groups):
    """name -> group key, from None (each name alone), a dict, a function or a parallel sequence."""
    if groups is None:
        return {n: n for n in names}
    if callable(groups):
        return {n: groups(n) for n in names}
    if isinstance(groups, dict):
        missing = [n for n in names if n not in groups]
        if missing:
            raise ValueError(f"groups has no entry for {len(missing)} names, e.g. {missing[:3]}")
        return {n: groups[n] for n in names}
    groups = list(groups)
    if len(groups) != len(names):
        raise ValueError(f"groups has {len(groups)} entries for {len(names)} names")
    return dict(zip(names, groups))


def kfold_splits(names, k=5, seed=0, val_fraction=0.1, groups=None):
    """k train/val/test splits whose test sides partition ``names`` (k-fold cross-validation).

    ``groups`` (a dict name -> key, a function of the name, or a sequence parallel to
    ``names``; None: every name is its own group) keeps all names of one group (source
    image, patient, slide) on one side of every split. Groups are shuffled with ``seed``
    and dealt to the fold with the fewest names so far, so folds have similar sizes. In
    each split, about ``val_fraction`` of all names (whole groups, at least one group when
    > 0) is drawn from the non-test groups for validation; the rest train.
    Returns a list of k dicts of sorted name lists.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError("names must be unique")
    key = _group_of(names, groups)
    members = {}
    for name in sorted(names):
        members.setdefault(key[name], []).append(name)
    group_keys = sorted(members, key=repr)
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    if len(group_keys) < k:
        raise ValueError(f"cannot make {k} folds from {len(group_keys)} groups")
    rng = np.random.default_rng(seed)
    order = [group_keys[i] for i in rng.permutation(len(group_keys))]
    # Large groups first (stable, so ties keep the random order), each to the smallest fold.
    order.sort(key=lambda g: -len(members[g]))
    folds, sizes = [[] for _ in range(k)], np.zeros(k, dtype=int)
    for group in order:
        target = int(np.argmin(sizes))
        folds[target].append(group)
        sizes[target] += len(members[group])
    splits = []
    for i in range(k):
        rest = [g for j in range(k) if j != i for g in folds[j]]
        rest = [rest[r] for r in rng.permutation(len(rest))]
        val, count = [], 0
        if val_fraction > 0 and len(rest) > 1:
            wanted = val_fraction * len(names)
            for group in rest[:-1]:  # always leave a group to train on
                if val and count + len(members[group]) / 2 > wanted:
                    break
                val.append(group)
                count += len(members[group])
        train = [g for g in rest if g not in val]
        splits.append({side: sorted(n for g in chosen for n in members[g])
                       for side, chosen in (("train", train), ("val", val), ("test", folds[i]))})
    return splits


def is_colour(image, tolerance=2.0):
    """True for an RGB image whose channels differ (brightfield, H&E), False for grey ones (most
    fluorescence images are stored as R = G = B): the mean absolute channel difference in grey levels."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3:
        return False
    rgb = image[..., :3].astype(np.float32)
    return float(np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()) > tolerance


def extra_spec(extra):
    """(dataset spec, selection '' / 'colour' / 'grey') of one ``extra_train_data`` entry of a run's
    config: a spec, or {"data": SPEC, "only": ...}. Its images are named 'extra<i>:<name>'."""
    if isinstance(extra, str):
        return extra, ""
    if not isinstance(extra, dict) or "data" not in extra:
        raise ValueError(f"extra_train_data entries are dataset specs or {{'data': SPEC, 'only': ...}}, got {extra!r}")
    return extra["data"], extra.get("only", "")


def select_records(records, only):
    """The records of a set that ``only`` names: '' all, 'colour' or 'grey' (:func:`is_colour`)."""
    if not only:
        return list(records)
    return [r for r in records if is_colour(r.image) == (only == "colour")]


def records_of(records, split, sides=("train", "val", "test")):
    """The records of each side of ``split`` (lists of names), in the split's order."""
    by_name = {record.name: record for record in records}
    return tuple([by_name[name] for name in split[side]] for side in sides)


def _check_split(split, where):
    if not isinstance(split, dict) or set(split) - set(SIDES) or "train" not in split:
        raise ValueError(f"{where}: a split must be a dict with 'train' (and 'val', 'test') name lists")
    seen = {}
    for side, side_names in split.items():
        if not isinstance(side_names, list) or not all(isinstance(n, str) for n in side_names):
            raise ValueError(f"{where}: '{side}' must be a list of names")
        for name in side_names:
            if name in seen:
                raise ValueError(f"{where}: '{name}' is in both '{seen[name]}' and '{side}'")
            seen[name] = side


def save_split(path, split):
    """Write a split (or a list of k-fold splits) as JSON, atomically (temp file + rename)."""
    path = os.fspath(path)
    for i, one in enumerate(split if isinstance(split, list) else [split]):
        _check_split(one, f"split {i}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    write_text_atomic(path, json.dumps(split, indent=1, sort_keys=True) + "\n")


def load_split(path):
    """Read a split (dict) or a list of splits written by :func:`save_split`; checks no name is on two sides."""
    path = os.fspath(path)
    with open(path) as file:
        try:
            split = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a JSON split file ({error})") from None
    for i, one in enumerate(split if isinstance(split, list) else [split]):
        _check_split(one, f"{path} (split {i})")
    return split
