"""kerasnuc.atomic: the one way files are written (nothing half-written under the final name)."""

import os

import pytest

from kerasnuc.atomic import atomic_path, temporary_name, write_text_atomic


def test_temporary_name_keeps_every_suffix_the_writers_need():
    assert temporary_name("/r/epoch-0001.weights.h5") == f"/r/epoch-0001.tmp{os.getpid()}.weights.h5"
    assert temporary_name("/r/labels.ome.tif").endswith(".ome.tif")
    assert temporary_name("/r/README") == f"/r/README.tmp{os.getpid()}"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "complete\n")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as handle:
                handle.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "complete\n"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_lines_and_text_write_the_same(tmp_path):
    write_text_atomic(tmp_path / "a.csv", "x,y\n1,2\n")
    write_text_atomic(tmp_path / "b.csv", ["x,y\n", "1,2\n"])
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_made_folders_removes_what_it_made_when_the_block_fails(tmp_path):
    from kerasnuc.atomic import made_folders

    (tmp_path / "base").mkdir()
    with pytest.raises(ValueError):
        with made_folders(tmp_path / "base" / "a" / "b") as folder:
            assert os.path.isdir(folder)
            raise ValueError("export failed")
    assert os.listdir(tmp_path / "base") == []  # a and b gone, base (there before) kept
    with made_folders(tmp_path / "base" / "a" / "b"):
        (tmp_path / "base" / "a" / "b" / "model.tflite").write_bytes(b"1")
    assert os.listdir(tmp_path / "base" / "a" / "b") == ["model.tflite"]
