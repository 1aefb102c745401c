"""Every bad input gives one clear line on stderr and exit status 2, and leaves no run directory behind."""
import argparse

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY, run_script
from dataloaders.la_heart import case_path, read_list
from utils.args import check_args
from utils.checkpoint import save_checkpoint
from utils.errors import UserError

TRAIN = "train_supervised_3D.py"


def train(root, tmp_path, *extra):
    return run_script(TRAIN, "--root_path", root, "--output_root", tmp_path / "model", "--labelnum", "4",
                      "--max_iterations", "1", "--no_eval", *TINY, *extra, check=False)


def assert_one_line_error(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0] and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def first_train_case(root):
    return case_path(root, read_list(root / "train.list")[0])


def rewrite_case(path, **datasets):
    path.unlink()
    with h5py.File(path, "w") as handle:
        for key, value in datasets.items():
            handle.create_dataset(key, data=value)


def test_missing_data_root(tmp_path):
    assert_one_line_error(train(tmp_path / "nowhere", tmp_path), "data root", "not found")
    assert not (tmp_path / "model").exists()


def test_missing_list_file(dataset_copy, tmp_path):
    (dataset_copy / "train.list").unlink()
    assert_one_line_error(train(dataset_copy, tmp_path), "train.list", "not found")


def test_listed_case_without_h5(dataset_copy, tmp_path):
    first_train_case(dataset_copy).unlink()
    assert_one_line_error(train(dataset_copy, tmp_path), "has no file", "mri_norm2.h5")


def test_corrupt_h5(dataset_copy, tmp_path):
    first_train_case(dataset_copy).write_bytes(b"\x89HDF\r\n garbage")
    assert_one_line_error(train(dataset_copy, tmp_path), "cannot be read as HDF5")


@pytest.mark.parametrize("missing", ["image", "label"])
def test_missing_key(dataset_copy, tmp_path, missing):
    kept = {"image": np.zeros((40, 40, 24), np.float32), "label": np.zeros((40, 40, 24), np.uint8)}
    del kept[missing]
    rewrite_case(first_train_case(dataset_copy), **kept)
    assert_one_line_error(train(dataset_copy, tmp_path), f"no '{missing}' dataset")


def test_non_binary_label(dataset_copy, tmp_path):
    label = np.zeros((40, 40, 24), np.uint8)
    label[5:10, 5:10, 5:10] = 255
    rewrite_case(first_train_case(dataset_copy), image=np.zeros((40, 40, 24), np.float32), label=label)
    assert_one_line_error(train(dataset_copy, tmp_path), "label values must be in 0..1", "255")


def test_image_label_shape_mismatch(dataset_copy, tmp_path):
    rewrite_case(first_train_case(dataset_copy), image=np.zeros((40, 40, 24), np.float32),
                 label=np.zeros((40, 40, 20), np.uint8))
    assert_one_line_error(train(dataset_copy, tmp_path), "(40, 40, 24)", "(40, 40, 20)", "differ")


@pytest.mark.parametrize("labelnum, fragment", [("9", "larger than train.list allows"),
                                                ("0", "at least 1")])
def test_labelnum_out_of_range(synthetic_root, tmp_path, labelnum, fragment):
    assert_one_line_error(train(synthetic_root, tmp_path, "--labelnum", labelnum), fragment)


def test_patch_not_divisible_by_16(synthetic_root, tmp_path):
    assert_one_line_error(train(synthetic_root, tmp_path, "--patch_size", "32", "32", "20"), "multiple of 16")


def test_unknown_flag_is_one_line(synthetic_root, tmp_path):
    assert_one_line_error(train(synthetic_root, tmp_path, "--labeled_bs", "2"), "unrecognized arguments")


def test_existing_run_directory(synthetic_root, tmp_path):
    assert train(synthetic_root, tmp_path).returncode == 0
    log = next((tmp_path / "model").rglob("log.txt"))
    before = log.read_text()
    assert_one_line_error(train(synthetic_root, tmp_path), "already exists", "--resume", "--overwrite")
    assert log.read_text() == before
    assert_one_line_error(train(synthetic_root, tmp_path, "--resume", "--overwrite"), "exclude each other")


def test_resume_without_a_run(synthetic_root, tmp_path):
    assert_one_line_error(train(synthetic_root, tmp_path, "--resume"), "no latest.pth")


def test_test_3d_rejects_a_checkpoint_of_another_method(synthetic_root, tmp_path):
    assert train(synthetic_root, tmp_path).returncode == 0
    run = next((tmp_path / "model").rglob("config.json")).parent
    state = torch.load(run / "iter_1.pth", weights_only=True)
    save_checkpoint(tmp_path / "mt.pth", {**state, "script": "train_mt_3D"})
    proc = run_script("test_3D.py", "--run", run, "--checkpoint", tmp_path / "mt.pth", check=False)
    assert_one_line_error(proc, "written by train_mt_3D, not by train_supervised_3D")
    assert not any(p.name.startswith("eval_") for p in run.iterdir())


def test_test_3d_rejects_a_folder_that_is_not_a_run(tmp_path):
    assert_one_line_error(run_script("test_3D.py", "--run", tmp_path, check=False), "not a run directory")


def test_test_3d_rejects_an_unfinished_run(synthetic_root, tmp_path):
    assert train(synthetic_root, tmp_path).returncode == 0
    run = next((tmp_path / "model").rglob("config.json")).parent
    (run / "iter_1.pth").unlink()
    assert_one_line_error(run_script("test_3D.py", "--run", run, check=False), "no final weights")


def args(**overrides):
    base = dict(patch_size=[112, 112, 80], labelnum=8, max_iterations=10, batch_size=4, save_interval=1,
                snapshot_interval=1, sw_batch_size=1, num_workers=0, base_lr=0.01, labeled_bs=2,
                resume=False, overwrite=False)
    return argparse.Namespace(**{**base, **overrides})


@pytest.mark.parametrize("labeled_bs", [4, 5, 0])
def test_labeled_bs_must_leave_room_for_unlabelled_data(labeled_bs):
    check_args(args())
    with pytest.raises(UserError, match="--labeled_bs"):
        check_args(args(labeled_bs=labeled_bs))
