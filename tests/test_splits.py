"""Splits: train/val/test, grouped k-fold (each name in one test fold, no group straddles), JSON round trip."""

import json
import os

import pytest

from kerasnuc.data.splits import kfold_splits, load_split, save_split, train_val_test_split

# 23 source images cut into 1-6 crops each: crops of one image must stay together.
CROPS = [f"img{i:02d}_crop{j}" for i in range(23) for j in range(1 + i % 6)]


def source_image(name):
    return name.split("_")[0]


def _check_partition(split, names):
    sides = [set(split[s]) for s in ("train", "val", "test")]
    assert sides[0] and sides[2]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert set.union(*sides) == set(names)


def test_train_val_test_split():
    names = [f"n{i}" for i in range(20)]
    split = train_val_test_split(names, 0.15, 0.2, seed=1)
    _check_partition(split, names)
    assert len(split["test"]) == 4 and len(split["val"]) == 3
    assert split == train_val_test_split(list(reversed(names)), 0.15, 0.2, seed=1)
    assert train_val_test_split(["a", "b"], 0.0, 0.5)["val"] == []
    with pytest.raises(ValueError):
        train_val_test_split(["a", "b"], 0.2, 0.2)


@pytest.mark.parametrize("groups", [source_image, {n: source_image(n) for n in CROPS},
                                    [source_image(n) for n in CROPS]])
def test_kfold_grouped(groups):
    splits = kfold_splits(CROPS, k=5, seed=0, val_fraction=0.1, groups=groups)
    assert len(splits) == 5
    test_counts = {}
    for split in splits:
        _check_partition(split, CROPS)
        for name in split["test"]:
            test_counts[name] = test_counts.get(name, 0) + 1
        side_of = {}
        for side in ("train", "val", "test"):
            for name in split[side]:
                assert side_of.setdefault(source_image(name), side) == side, f"{name} straddles"
        assert split["val"], "each split gets a validation side"
        assert 0.03 < len(split["val"]) / len(CROPS) < 0.25
    assert test_counts == {name: 1 for name in CROPS}  # every name in exactly one test fold
    sizes = [len(s["test"]) for s in splits]
    assert max(sizes) - min(sizes) <= 6  # at most one (largest) group apart


def test_kfold_reproducible_and_ungrouped():
    names = [f"n{i}" for i in range(30)]
    first = kfold_splits(names, k=3, seed=4)
    assert first == kfold_splits(list(reversed(names)), k=3, seed=4)
    assert first != kfold_splits(names, k=3, seed=5)
    assert sorted(len(s["test"]) for s in first) == [10, 10, 10]
    assert all(len(s["val"]) == 3 for s in first)
    no_val = kfold_splits(names, k=3, seed=4, val_fraction=0)
    assert all(s["val"] == [] and len(s["train"]) == 20 for s in no_val)


def test_kfold_errors():
    with pytest.raises(ValueError, match="k >= 2"):
        kfold_splits(["a", "b"], k=1)
    with pytest.raises(ValueError, match="groups"):
        kfold_splits(["a_1", "a_2", "b_1"], k=3, groups=source_image)
    with pytest.raises(ValueError, match="unique"):
        kfold_splits(["a", "a", "b"], k=2)


def test_save_and_load_split(tmp_path):
    split = train_val_test_split([f"n{i}" for i in range(10)], seed=0)
    path = tmp_path / "runs" / "split.json"
    save_split(path, split)
    assert load_split(path) == split
    assert os.listdir(path.parent) == ["split.json"]  # no temporary file left behind
    folds = kfold_splits([f"n{i}" for i in range(10)], k=2)
    save_split(path, folds)
    assert load_split(path) == folds
    path.write_text(json.dumps({"train": ["a"], "test": ["a"]}))
    with pytest.raises(ValueError, match="both"):
        load_split(path)
    with pytest.raises(ValueError):
        save_split(path, {"train": ["a"], "holdout": ["b"]})
