"""Every bad input gives one clear line on stderr and exit status 2, and leaves no run directory behind.

Most of these run the script's ``main`` in the test's interpreter (``run_main``: the same ``run_cli`` path, without
an interpreter start per input); the first tests run it as a process, to keep one check of the whole path."""
import argparse

import numpy as np
import pytest
import torch

from conftest import TINY, assert_one_line_error, first_train_case, rewrite_case, run_main, run_script
from utils.args import check_args
from utils.checkpoint import save_checkpoint
from utils.errors import UserError

TRAIN = "train_supervised_3D.py"


def train_args(root, tmp_path, *extra):
    return ("--root_path", root, "--output_root", tmp_path / "model", "--labelnum", "4", "--max_iterations", "1",
            "--no_eval", *TINY, *extra)


def train(root, tmp_path, *extra):
    """A one-iteration labelled-only run into ``tmp_path/model``, expected to be refused (in this interpreter)."""
    return run_main(TRAIN, *train_args(root, tmp_path, *extra))


def test_missing_data_root(tmp_path):
    proc = run_script(TRAIN, *train_args(tmp_path / "nowhere", tmp_path), check=False)
    assert_one_line_error(proc, "data root", "not found")
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
    proc = run_script(TRAIN, *train_args(synthetic_root, tmp_path, "--labeled_bs", "2"), check=False)
    assert_one_line_error(proc, "unrecognized arguments")


def test_existing_run_directory(synthetic_root, finished_copy, tmp_path):
    log = finished_copy / "log.txt"
    before = log.read_text()
    assert_one_line_error(train(synthetic_root, tmp_path), "already exists", "--resume", "--overwrite")
    assert log.read_text() == before
    assert_one_line_error(train(synthetic_root, tmp_path, "--resume", "--overwrite"), "exclude each other")


def test_resume_without_a_run(synthetic_root, tmp_path):
    assert_one_line_error(train(synthetic_root, tmp_path, "--resume"), "no latest.pth")


def test_test_3d_rejects_a_checkpoint_of_another_method(finished_copy, tmp_path):
    run = finished_copy
    before = sorted(p.name for p in run.iterdir())
    state = torch.load(run / "iter_2.pth", weights_only=True)
    save_checkpoint(tmp_path / "mt.pth", {**state, "script": "train_mt_3D"})
    proc = run_main("test_3D.py", "--run", run, "--checkpoint", tmp_path / "mt.pth")
    assert_one_line_error(proc, "written by train_mt_3D, not by train_supervised_3D")
    assert sorted(p.name for p in run.iterdir()) == before  # no evaluation folder, finished or partial


def test_test_3d_rejects_a_network_the_run_does_not_have(finished):
    before = sorted(p.name for p in finished.iterdir())
    proc = run_main("test_3D.py", "--run", finished, "--network", "ema_model")
    assert_one_line_error(proc, "--network ema_model: the networks of this run are model")
    assert sorted(p.name for p in finished.iterdir()) == before


def test_test_3d_rejects_a_folder_that_is_not_a_run(tmp_path):
    assert_one_line_error(run_main("test_3D.py", "--run", tmp_path), "not a run directory")


def test_test_3d_rejects_an_unfinished_run(finished_copy):
    run = finished_copy
    (run / "iter_2.pth").unlink()
    assert_one_line_error(run_main("test_3D.py", "--run", run), "no final weights")


def args(**overrides):
    base = dict(patch_size=[112, 112, 80], stride_xy=18, stride_z=4, labelnum=8, max_iterations=10, batch_size=4,
                save_interval=1, save_minutes=10.0, snapshot_interval=1, sw_batch_size=1, num_workers=0,
                base_lr=0.01, lr_step=2500, lr_gamma=0.1, momentum=0.9, weight_decay=1e-4, labeled_bs=2,
                resume=False, overwrite=False, accept_changes=False, exp="LA/MT", model="vnet", output_root="model",
                n_filters=16, label_seed=None, seed=1337)
    return argparse.Namespace(**{**base, **overrides})


@pytest.mark.parametrize("labeled_bs", [4, 5, 0])
def test_labeled_bs_must_leave_room_for_unlabelled_data(labeled_bs):
    check_args(args())
    with pytest.raises(UserError, match="--labeled_bs"):
        check_args(args(labeled_bs=labeled_bs))


# -- labels, ids and splits that would give a wrong number silently ----------------------------------------
def test_fractional_label_is_refused_naming_the_case(dataset_copy, tmp_path):
    path = first_train_case(dataset_copy)
    label = np.zeros((40, 40, 24), np.float32)
    label[5:10, 5:10, 5:10] = 0.5
    rewrite_case(path, image=np.random.RandomState(0).randn(40, 40, 24).astype(np.float32), label=label)
    assert_one_line_error(train(dataset_copy, tmp_path), path.parent.name, "not whole numbers", "0.5")
    assert not (tmp_path / "model").exists()


def test_whole_number_float_labels_are_read_as_class_ids(dataset_copy, tmp_path):
    from dataloaders.h5io import read_case

    path = first_train_case(dataset_copy)
    label = np.zeros((40, 40, 24), np.float64)
    label[5:10, 5:10, 5:10] = 1.0
    rewrite_case(path, image=np.zeros((40, 40, 24), np.float32), label=label)
    _, read = read_case(path)
    assert read.dtype == np.uint8 and read.sum() == 125


@pytest.mark.parametrize("bad_id", ["../escape", "/etc", "sub/case", "..", "a\\b"])
def test_case_ids_that_leave_the_data_root_are_refused(dataset_copy, tmp_path, bad_id):
    ids = (dataset_copy / "train.list").read_text().splitlines()
    (dataset_copy / "train.list").write_text("\n".join(ids + [bad_id]) + "\n")
    assert_one_line_error(train(dataset_copy, tmp_path), "train.list", repr(bad_id), "not a plain name")


def test_a_case_in_both_the_training_and_the_test_list_is_refused(dataset_copy, tmp_path):
    test_case = (dataset_copy / "test.list").read_text().split()[0]
    with open(dataset_copy / "train.list", "a") as handle:
        handle.write(test_case + "\n")
    assert_one_line_error(train(dataset_copy, tmp_path), "both train.list and test.list", test_case)


# -- problems of the evaluation, found before the training ------------------------------------------------
def first_test_case(root):
    from dataloaders.la_heart import case_path, read_list

    return case_path(root, read_list(root / "test.list")[0])


@pytest.mark.parametrize("extra", [[], ["--no_eval"]])
def test_a_test_image_with_nan_stops_the_run_before_training(dataset_copy, tmp_path, extra):
    path = first_test_case(dataset_copy)
    image = np.zeros((40, 40, 24), np.float32)
    image[0, 0, 0] = np.nan
    rewrite_case(path, image=image, label=np.zeros((40, 40, 24), np.uint8))
    proc = run_main(TRAIN, "--root_path", dataset_copy, "--output_root", tmp_path / "model", "--labelnum", "4",
                    "--max_iterations", "1", *TINY, *extra)
    assert_one_line_error(proc, path.parent.name, "NaN or infinite")
    assert not (tmp_path / "model").exists()


def test_an_unreadable_test_case_stops_the_run_before_training(dataset_copy, tmp_path):
    first_test_case(dataset_copy).write_bytes(b"\x89HDF\r\n truncated")
    assert_one_line_error(train(dataset_copy, tmp_path), "cannot be read as HDF5")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--stride_xy", "40"], "larger than the patch"),
    (["--stride_z", "0"], "strides must be positive"),
    (["--stride_xy", "0"], "strides must be positive"),
    (["--sw_batch_size", "0"], "--sw_batch_size must be at least 1"),
    (["--lr_step", "0"], "--lr_step must be at least 1"),
    (["--n_filters", "0"], "--n_filters must be at least 1"),
    (["--amp"], "--amp needs a CUDA device"),
    (["--compile"], "--compile is for CUDA devices"),
    (["--num_workers", "-1"], "--num_workers must be >= 0"),
    (["--num_workers", "many"], "invalid workers value: 'many'"),
    (["--lr_gamma", "-0.1"], "--lr_gamma must be >= 0"),
    (["--base_lr", "nan"], "--base_lr must be a finite number, got nan"),
    (["--base_lr", "inf"], "--base_lr must be a finite number, got inf"),
    (["--momentum", "inf"], "--momentum must be a finite number"),
    (["--exp", "/tmp/elsewhere"], "must be a relative path inside --output_root"),
    (["--exp", "../../escape"], "must be a relative path inside --output_root"),
    (["--model", "a/b"], "argument --model: invalid choice: 'a/b'"),
    (["--accept_changes"], "--accept_changes only applies to --resume"),
    (["--save_minutes", "-1"], "--save_minutes must be >= 0"),
])
def test_impossible_flags_are_refused_before_anything_is_written(synthetic_root, tmp_path, flags, fragment):
    assert_one_line_error(train(synthetic_root, tmp_path, *flags), fragment)
    assert not (tmp_path / "model").exists()


def test_a_method_flag_of_nan_is_refused(synthetic_root, tmp_path):
    proc = run_main("train_mt_3D.py", "--root_path", synthetic_root, "--output_root", tmp_path / "model",
                    "--labelnum", "4", "--max_iterations", "1", *TINY, "--consistency", "nan")
    assert_one_line_error(proc, "--consistency must be a finite number")


def test_ucseg_upg_patch_zero_is_one_line(synthetic_root, tmp_path):
    proc = run_main("train_ucseg_3D.py", "--root_path", synthetic_root, "--output_root", tmp_path / "model",
                    "--labelnum", "4", "--max_iterations", "1", *TINY, "--labeled_bs", "1", "--upg_patch", "0")
    assert_one_line_error(proc, "--upg_patch must be at least 1")


def test_abbreviated_flags_are_refused(synthetic_root, tmp_path):
    assert_one_line_error(train(synthetic_root, tmp_path, "--max_iter", "3"), "unrecognized arguments")


def test_an_output_root_that_is_a_file_is_one_line(synthetic_root, tmp_path):
    (tmp_path / "model").write_text("not a folder")
    assert_one_line_error(train(synthetic_root, tmp_path), "is a file, not a folder")
    assert (tmp_path / "model").read_text() == "not a folder"


def test_an_output_root_that_cannot_be_created_is_one_line(synthetic_root, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_main(TRAIN, "--root_path", synthetic_root, "--output_root", tmp_path / "file" / "model",
                    "--labelnum", "4", "--max_iterations", "1", "--no_eval", *TINY)
    assert_one_line_error(proc, "cannot create the run folder")


def test_an_unwritable_run_folder_is_one_line(synthetic_root, tmp_path, monkeypatch):
    """Root writes anywhere, so the check is exercised in-process with ``os.access`` saying no."""
    from utils.run import TrainingRun
    import train_supervised_3D as supervised

    args = supervised.get_parser().parse_args(["--root_path", str(synthetic_root), "--output_root",
                                               str(tmp_path), "--labelnum", "4", *TINY])
    args.exp = "LA/Supervised"
    (tmp_path / "LA" / "Supervised_4" / "vnet").mkdir(parents=True)
    args.resume = True
    monkeypatch.setattr("utils.run.os.access", lambda path, mode: False)
    with pytest.raises(UserError, match="is not writable"):
        TrainingRun(args, "train_supervised_3D.py")


def test_missing_medpy_is_found_before_training(synthetic_root, tmp_path, monkeypatch):
    site = tmp_path / "fake_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['medpy'] = None  # hidden: not found\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    proc = run_script(TRAIN, *train_args(synthetic_root, tmp_path), check=False)
    assert_one_line_error(proc, "medpy is not installed")
    assert not (tmp_path / "model").exists()


def test_missing_edt_is_found_before_training(synthetic_root, tmp_path, monkeypatch):
    """The dual-task methods' signed-distance targets need ``edt``: without it, one line before training."""
    fake = tmp_path / "fake_site" / "edt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('edt is hidden by the test')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    proc = run_script("train_dtc_3D.py", "--root_path", synthetic_root, "--output_root", tmp_path / "model",
                      "--labelnum", "4", "--max_iterations", "1", "--labeled_bs", "1", *TINY, check=False)
    assert_one_line_error(proc, "need the edt package")
    assert not (tmp_path / "model").exists()


def test_permission_denied_on_a_case_is_not_called_corrupt(dataset_copy, monkeypatch):
    from dataloaders import h5io

    def refuse(*args, **kwargs):
        raise OSError("Unable to synchronously open file (unable to open file: name = 'x', errno = 13, error "
                      "message = 'Permission denied', flags = 0, o_flags = 0)")

    monkeypatch.setattr(h5io.h5py, "File", refuse)
    with pytest.raises(UserError) as caught:
        h5io.read_case(first_train_case(dataset_copy))
    assert "permission denied" in str(caught.value) and "corrupt" not in str(caught.value)


# -- issue 27: a hostile test battery's inputs, each refused in one line -----------------------------------
SEMI_SUPERVISED = ("--labeled_bs", "1")


@pytest.mark.parametrize("seed", ["-1", str(2 ** 64)])
def test_a_seed_out_of_range_is_refused_before_the_run_folder(synthetic_root, tmp_path, seed):
    assert_one_line_error(train(synthetic_root, tmp_path, "--seed", seed), f"--seed must lie in 0..{2 ** 64 - 1}",
                          f"got {seed}")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("script, model", [
    (TRAIN, "unet_3D"), (TRAIN, "vnet_sdf"), (TRAIN, "nosuch"), ("train_mt_3D.py", "unet_3D"),
    ("train_cps_3D.py", "vnet_sdf"), ("train_dtc_3D.py", "vnet"), ("train_ugmcl_3D.py", "resnet_vnet"),
    ("train_ucseg_3D.py", "vnet"), ("train_ugpl_3D.py", "vnet_sdf")])
def test_a_network_the_method_cannot_train_is_refused_before_the_run_folder(synthetic_root, tmp_path, script,
                                                                             model):
    extra = () if script == TRAIN else SEMI_SUPERVISED
    proc = run_main(script, *train_args(synthetic_root, tmp_path, *extra, "--model", model))
    assert_one_line_error(proc, "--model", "invalid choice", repr(model))
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("script", ["train_supervised_3D", "train_mt_3D", "train_uamt_3D", "train_cps_3D",
                                    "train_dtc_3D", "train_ugmcl_3D", "train_ugpl_3D"])
def test_every_network_a_method_accepts_builds_and_predicts(script):
    """Each ``--model`` choice of a script gives networks that its ``predict`` reads (two classes per voxel)."""
    import importlib

    module = importlib.import_module(script)
    parser = module.get_parser()
    choices = next(action.choices for action in parser._actions if action.dest == "model")
    for model in choices:
        args = parser.parse_args(["--model", model, "--n_filters", "4"])
        nets = {name: net.eval() for name, net in module.build_networks(args).items()}
        with torch.no_grad():
            assert module.predict(nets, torch.zeros(1, 1, 32, 32, 16)).shape == (1, 2, 32, 32, 16), model


def test_a_list_that_is_not_utf8_is_one_line(dataset_copy, tmp_path):
    listed = dataset_copy / "train.list"
    listed.write_bytes(listed.read_bytes() + b"caf\xe9\n")
    assert_one_line_error(train(dataset_copy, tmp_path), "train.list is not UTF-8 text", "0xe9")
    assert not (tmp_path / "model").exists()


def test_an_image_with_an_axis_of_length_zero_is_one_line(dataset_copy, tmp_path):
    rewrite_case(first_train_case(dataset_copy), image=np.zeros((40, 0, 24), np.float32),
                 label=np.zeros((40, 0, 24), np.uint8))
    assert_one_line_error(train(dataset_copy, tmp_path), "axis of length 0", "(40, 0, 24)")
    assert not (tmp_path / "model").exists()


def test_an_image_stored_as_a_group_is_one_line(dataset_copy, tmp_path):
    import h5py

    path = first_train_case(dataset_copy)
    path.unlink()
    with h5py.File(path, "w") as handle:
        handle.create_group("image")
        handle.create_dataset("label", data=np.zeros((40, 40, 24), np.uint8))
    assert_one_line_error(train(dataset_copy, tmp_path), "'image' is an HDF5 group, not a dataset")
    assert not (tmp_path / "model").exists()


def write_huge_case(path):
    """A case file of a few kB whose datasets declare 100000 x 100000 x 10000 voxels (chunked, never written)."""
    import h5py

    path.unlink()
    shape, chunks = (100000, 100000, 10000), (64, 64, 64)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("image", shape=shape, dtype=np.float32, chunks=chunks, compression="gzip")
        handle.create_dataset("label", shape=shape, dtype=np.uint8, chunks=chunks, compression="gzip")


def test_a_case_that_declares_more_voxels_than_the_memory_holds_is_refused_before_reading(dataset_copy, tmp_path):
    write_huge_case(first_train_case(dataset_copy))
    assert_one_line_error(train(dataset_copy, tmp_path), "(100000, 100000, 10000)", "more than this machine's memory")
    assert not (tmp_path / "model").exists()


def test_where_the_memory_size_is_unknown_a_failed_allocation_is_one_line(dataset_copy, tmp_path, monkeypatch):
    from dataloaders import h5io

    monkeypatch.setattr(h5io, "physical_memory", lambda: None)
    write_huge_case(first_train_case(dataset_copy))
    assert_one_line_error(train(dataset_copy, tmp_path), "(100000, 100000, 10000)", "do not fit in the memory left")


@pytest.fixture
def symlink_loop(tmp_path):
    """``tmp_path/loop_a`` -> ``loop_b`` -> ``loop_a``."""
    (tmp_path / "loop_a").symlink_to("loop_b")
    (tmp_path / "loop_b").symlink_to("loop_a")
    return tmp_path / "loop_a"


@pytest.mark.parametrize("flag", ["--root_path", "--output_root"])
def test_a_loop_of_symbolic_links_as_a_training_path_is_one_line(synthetic_root, tmp_path, symlink_loop, flag):
    paths = {"--root_path": synthetic_root, "--output_root": tmp_path / "model", flag: symlink_loop / "sub"}
    proc = run_main(TRAIN, "--root_path", paths["--root_path"], "--output_root", paths["--output_root"],
                    "--labelnum", "4", "--max_iterations", "1", "--no_eval", *TINY)
    assert_one_line_error(proc, f"{symlink_loop / 'sub'} runs into a loop of symbolic links")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop_a", "loop_b"]


def test_a_loop_of_symbolic_links_as_the_run_of_test_3d_is_one_line(tmp_path, symlink_loop):
    assert_one_line_error(run_main("test_3D.py", "--run", symlink_loop), f"{symlink_loop} runs into a loop")
    proc = run_main("test_3D.py", "--run", symlink_loop.name, cwd=tmp_path)  # relative to the working directory
    assert_one_line_error(proc, "loop_a runs into a loop of symbolic links")


def test_test_3d_imports_only_the_projects_training_scripts(finished_copy, tmp_path, monkeypatch):
    """A ``config.json`` whose script names any other module (here one that leaves a file when imported) is
    refused without importing it."""
    import json

    (tmp_path / "planted.py").write_text("from pathlib import Path\nPath(__file__).with_name('ran').touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = json.loads((finished_copy / "config.json").read_text())
    (finished_copy / "config.json").write_text(json.dumps({**config, "script": "planted"}))
    proc = run_main("test_3D.py", "--run", finished_copy)
    assert_one_line_error(proc, "names the script 'planted', which is not one of this project's training scripts",
                          "train_supervised_3D")
    assert not (tmp_path / "ran").exists()
