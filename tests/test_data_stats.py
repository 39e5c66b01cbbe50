"""``python -m kerasnuc.data stats``: figures on the real datasets and on small fixtures."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from kerasnuc.data.__main__ import main
from kerasnuc.data.stats import count_instances, spec_stats

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
REPO = os.path.join(os.path.dirname(__file__), "..")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA),
                                reason=f"real datasets not found at {os.path.abspath(DATA)} (../shared/data)")


def test_count_instances():
    labels = np.zeros((5, 5), np.int32)
    assert count_instances(labels) == 0
    labels[0, 0], labels[1, 1], labels[2, 2] = 3, 3, 70000  # gaps and large ids
    assert count_instances(labels) == 2


def test_stats_cli_on_fixtures(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name, shape, n in [("a", (10, 12), 2), ("b", (10, 12), 0), ("c", (8, 8), 1)]:
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), np.zeros(shape, np.uint8))
        labels = np.zeros(shape, np.uint16)
        for i in range(n):
            labels[i, :3] = 5 * (i + 1)
        cv2.imwrite(str(tmp_path / "labels" / f"{name}.png"), labels)
    assert main(["stats", f"folder:{tmp_path}", f"dsb2018:{tmp_path}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        result = json.loads(line)
        assert result["images"] == 3 and result["nuclei"] == 3
        assert result["image_sizes"] == {"8x8": 1, "10x12": 2} and result["channels"] == {"1": 3}
    assert main(["stats", f"monuseg:{tmp_path / 'nowhere'}"]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_stats_module_runs(tmp_path):
    process = subprocess.run([sys.executable, "-m", "kerasnuc.data", "stats", "--indent", "2", "sample"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout)
    assert result["images"] == 40 and result["nuclei"] == 1659


@needs_data
@pytest.mark.parametrize("spec, expected", [
    ("dsb2018/stage1_train", {"images": 664, "nuclei": 28986}),
    ("dsb2018/stage1_test", {"images": 65, "nuclei": 4152}),
    ("dsb2018/stage1_train_original", {"images": 670, "nuclei": 29461}),
])
def test_dsb_stats_on_real_data(spec, expected):
    result = spec_stats("dsb2018:" + os.path.join(DATA, spec))
    assert {k: result[k] for k in expected} == expected
    assert sum(result["image_sizes"].values()) == expected["images"]
    assert sum(result["channels"].values()) == expected["images"]


@needs_data
def test_monuseg_stats_on_real_data():
    result = spec_stats("monuseg:" + os.path.join(DATA, "monuseg2018", "train"))
    assert (result["images"], result["nuclei"], result["xml_files"], result["xml_regions"]) == (30, 16959, 13, 4951)
    assert result["image_sizes"] == {"1000x1000": 30} and result["channels"] == {"3": 30}


@needs_data
def test_crchisto_stats_on_real_data():
    result = spec_stats("crchisto:" + os.path.join(DATA, "crchistophenotypes"))
    assert (result["images"], result["nuclei"], result["classified"]) == (100, 29756, 22444)
    assert result["classes"] == {"epithelial": 7722, "inflammatory": 6971, "fibroblast": 5712, "others": 2039}
    assert result["image_sizes"] == {"500x500": 100}
