"""A run survives what a researcher does to it: signals, NaN losses, two processes, damaged files, bad settings of
the evaluation. Each test meets the fault where a user would (the command line) and checks the one-line message,
the exit status, and that nothing was lost or overwritten."""
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (CODE_DIR, REPO_ROOT, TINY, assert_one_line_error, assert_same_models, device_env,
                      first_train_case, read_summary, rewrite_case, run_main, run_script, wait_for)
from utils.folder_lock import is_abandoned

TRAIN = "train_supervised_3D.py"


def run_dir(output_root):
    return output_root / "synthetic_LA" / "Supervised_4" / "vnet"


def common(root, output_root, *extra):
    return ["--root_path", root, "--output_root", output_root, "--labelnum", "4", "--no_eval", *TINY, *extra]


def start(script, args):
    """Start a training script in the background (its output captured, so that it can be read after)."""
    return subprocess.Popen([sys.executable, str(CODE_DIR / script), *map(str, args)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
                            env=device_env("cpu"))


def logged_iterations(run):
    log = run / "log.txt"
    text = log.read_text() if log.is_file() else ""
    return [int(line.split("iteration ")[1].split(" ")[0]) for line in text.splitlines() if " : loss : " in line]


def wait_for_iteration(run, iteration, proc):
    assert wait_for(lambda: proc.poll() is not None or iteration in logged_iterations(run)), "no progress"
    assert proc.poll() is None, proc.communicate()


def weights(path):
    return torch.load(path, weights_only=True)["models"]


@pytest.fixture(scope="module")
def straight(synthetic_root, tmp_path_factory):
    """An uninterrupted deterministic 12-iteration run, the reference every interrupted run must match."""
    out = tmp_path_factory.mktemp("straight")
    run_main(TRAIN, *common(synthetic_root, out, "--max_iterations", "12"), check=True)
    return weights(run_dir(out) / "iter_12.pth")


# -- signals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_the_iteration_prints_the_resume_command_and_exits_with_its_status(
        synthetic_root, tmp_path, straight, signum):
    args = common(synthetic_root, tmp_path, "--max_iterations", "12", "--num_workers", "2")
    run = run_dir(tmp_path)
    proc = start(TRAIN, args)
    wait_for_iteration(run, 3, proc)
    proc.send_signal(signum)
    proc.send_signal(signum)  # a second signal (shell and scheduler both send one) changes nothing
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    stopped = logged_iterations(run)[-1]
    assert torch.load(run / "latest.pth", weights_only=True)["iteration"] == stopped < 12
    assert f"stopped by {signal.Signals(signum).name} after iteration {stopped}; latest.pth is saved" in err
    command = shlex.split(err.strip().splitlines()[-1])
    assert command[0] == "python" and Path(command[1]).name == TRAIN and command[-1] == "--resume"
    assert err.strip().splitlines()[-1] in (run / "log.txt").read_text()  # the log says how to go on, too
    run_main(TRAIN, *command[2:], cwd=REPO_ROOT, check=True)  # the command as printed (in this interpreter)
    assert_same_models(weights(run / "iter_12.pth"), straight)


def test_latest_is_also_saved_by_time(synthetic_root, tmp_path):
    run = run_dir(tmp_path)
    proc = start(TRAIN, common(synthetic_root, tmp_path, "--max_iterations", "200", "--save_minutes", "1e-6"))
    wait_for_iteration(run, 3, proc)
    proc.kill()
    proc.wait()
    assert torch.load(run / "latest.pth", weights_only=True)["iteration"] >= 2  # --save_interval is 200


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(synthetic_root, tmp_path, straight):
    args = common(synthetic_root, tmp_path, "--max_iterations", "12")
    run = run_dir(tmp_path)
    proc = start(TRAIN, args)
    wait_for_iteration(run, 2, proc)
    proc.kill()
    proc.wait()
    assert not (run / "latest.pth").exists()
    proc = run_main(TRAIN, *args, "--resume", check=True)
    assert "stopped before its first latest.pth; starting from iteration 0" in (run / "log.txt").read_text()
    assert_same_models(weights(run / "iter_12.pth"), straight)


# -- numbers that go wrong ---------------------------------------------------------------------------------
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(synthetic_root, tmp_path):
    args = common(synthetic_root, tmp_path, "--max_iterations", "10", "--save_interval", "1")
    proc = run_script(TRAIN, *args, "--base_lr", "1e30", check=False)
    assert_one_line_error(proc, "the loss term loss_", "is nan", "latest.pth of iteration", "is intact",
                          "--resume --accept_changes")
    failed_at = int(proc.stderr.split("iteration ")[1].split(":")[0])
    run = run_dir(tmp_path)
    latest = torch.load(run / "latest.pth", weights_only=True)
    assert latest["iteration"] == failed_at - 1
    assert all(torch.isfinite(t).all() for t in latest["models"]["model"].values() if t.is_floating_point())
    assert not (run / "iter_10.pth").exists()


def test_a_non_finite_loss_in_the_first_iteration_says_that_nothing_was_saved(dataset_copy, tmp_path):
    from dataloaders.la_heart import read_list

    for case in read_list(dataset_copy / "train.list")[:4]:  # every labelled case: huge finite intensities
        path = first_train_case(dataset_copy).parent.parent / case / "mri_norm2.h5"
        label = np.zeros((40, 40, 24), np.uint8)
        label[10:20, 10:20, 5:15] = 1
        rewrite_case(path, image=np.full((40, 40, 24), 3e38, np.float32), label=label)
    proc = run_script(TRAIN, *common(dataset_copy, tmp_path, "--max_iterations", "3"), check=False)
    assert_one_line_error(proc, "iteration 1:", "no checkpoint was written yet")
    assert "do not look z-scored" in proc.stdout


def test_accept_changes_continues_a_run_with_new_settings_and_records_them(synthetic_root, tmp_path):
    args = common(synthetic_root, tmp_path, "--save_interval", "1")
    run_main(TRAIN, *args, "--max_iterations", "2", check=True)
    assert_one_line_error(run_main(TRAIN, *args, "--max_iterations", "3", "--resume"),
                          "--max_iterations 2 -> 3", "--accept_changes")
    run_main(TRAIN, *args, "--max_iterations", "3", "--resume", "--accept_changes", check=True)
    run = run_dir(tmp_path)
    config = json.loads((run / "config.json").read_text())
    assert config["args"]["max_iterations"] == 3 and config["changes"][0]["flags"] == {"max_iterations": [2, 3]}
    assert (run / "iter_3.pth").is_file() and (run / "iter_2.pth").is_file()


def test_an_accepted_change_that_cannot_load_leaves_the_configuration_that_matches_the_run(synthetic_root, tmp_path):
    args = common(synthetic_root, tmp_path, "--save_interval", "1", "--max_iterations", "2")
    run_main(TRAIN, *args, check=True)
    run = run_dir(tmp_path)
    before = json.loads((run / "config.json").read_text())["args"]
    proc = run_main(TRAIN, *args, "--n_filters", "4", "--resume", "--accept_changes")
    assert_one_line_error(proc, "does not match")
    assert json.loads((run / "config.json").read_text())["args"] == before
    run_main(TRAIN, *args, "--max_iterations", "3", "--resume", "--accept_changes", check=True)


def test_max_iterations_below_the_iteration_reached_is_refused(synthetic_root, tmp_path):
    args = common(synthetic_root, tmp_path, "--save_interval", "1")
    run_main(TRAIN, *args, "--max_iterations", "3", check=True)
    run = run_dir(tmp_path)
    proc = run_main(TRAIN, *args, "--max_iterations", "2", "--resume", "--accept_changes")
    assert_one_line_error(proc, "--max_iterations 2 is below the iteration this run reached (3)")
    assert json.loads((run / "config.json").read_text())["args"]["max_iterations"] == 3
    assert not list(run.glob("eval_*"))


# -- one run folder, one process ---------------------------------------------------------------------------
def test_a_second_process_on_a_live_run_gets_one_line_naming_the_holder(synthetic_root, tmp_path):
    args = common(synthetic_root, tmp_path, "--max_iterations", "400", "--save_interval", "1")
    run = run_dir(tmp_path)
    proc = start(TRAIN, args)
    try:
        wait_for_iteration(run, 2, proc)
        for extra in ([], ["--resume"], ["--overwrite"]):
            second = run_main(TRAIN, *args, *extra)
            assert_one_line_error(second, "is in use by pid", str(proc.pid))
        assert run.is_dir() and not list(run.parent.glob("vnet.old-*"))
        assert "Namespace(" in (run / "log.txt").read_text()
        assert (run / "log.txt").read_text().count("Namespace(") == 1  # nobody else wrote to its log
    finally:
        proc.kill()
        proc.wait()
    assert is_abandoned(run)  # the lock died with its process


def test_temporary_files_are_unique_and_a_killed_writer_leaves_nothing_behind(finished_copy, synthetic_root):
    from utils.atomic import temporary_name

    names = {temporary_name(finished_copy / "latest.pth") for _ in range(3)}
    assert len(names) == 3 and all(str(os.getpid()) in n.name for n in names)
    stale = finished_copy / ".latest.pth.12345-deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert resume_finished(finished_copy, synthetic_root, "--no_eval").returncode == 0
    assert not stale.exists()


# -- damaged files -----------------------------------------------------------------------------------------
def flip_a_byte(path, offset_fraction=0.6):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


def resume_finished(run, root, *extra):
    return run_main(TRAIN, "--root_path", root, "--output_root", run.parents[2], "--labelnum", "4",
                    "--max_iterations", "2", "--save_interval", "1", *TINY, "--resume", *extra)


def test_a_checkpoint_damaged_without_changing_its_size_is_refused(finished_copy, synthetic_root):
    latest = finished_copy / "latest.pth"
    size = latest.stat().st_size
    flip_a_byte(latest)
    assert latest.stat().st_size == size
    proc = resume_finished(finished_copy, synthetic_root)
    assert_one_line_error(proc, "latest.pth is damaged", "--overwrite")
    assert "weights_only=False" not in proc.stderr
    flip_a_byte(finished_copy / "iter_2.pth")
    proc = run_main("test_3D.py", "--run", finished_copy)
    assert_one_line_error(proc, "iter_2.pth is damaged", "latest.pth")


def test_an_empty_checkpoint_is_one_line(finished_copy, synthetic_root):
    (finished_copy / "iter_2.pth").write_bytes(b"")
    assert_one_line_error(run_main("test_3D.py", "--run", finished_copy), "is empty (0 bytes")
    (finished_copy / "latest.pth").write_bytes(b"")
    assert_one_line_error(resume_finished(finished_copy, synthetic_root), "latest.pth is empty")


def test_a_file_that_is_not_a_checkpoint_never_relays_torchs_advice(finished_copy):
    torch.save({"models": {}, "format": 1, "thing": torch.nn.Identity()}, finished_copy / "odd.pth")
    proc = run_main("test_3D.py", "--run", finished_copy, "--checkpoint", "odd.pth")
    assert_one_line_error(proc, "not written by this repository")
    assert "weights_only" not in proc.stderr


@pytest.mark.parametrize("damage", ["missing", "broken"])
def test_resume_with_a_missing_or_broken_config_is_one_line(finished_copy, synthetic_root, damage):
    config = finished_copy / "config.json"
    if damage == "missing":
        config.unlink()
    else:
        config.write_text('{"script": "train_supervised_3D", "args": ')
    assert_one_line_error(resume_finished(finished_copy, synthetic_root), "config.json", "--overwrite")


def test_test_3d_with_a_config_missing_arguments_names_them(finished_copy):
    config = json.loads((finished_copy / "config.json").read_text())
    del config["args"]["has_dropout"]
    (finished_copy / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_main("test_3D.py", "--run", finished_copy), "lacks", "--has_dropout")


def test_a_run_of_code_older_than_a_flag_is_read_with_the_value_it_was_trained_with(finished_copy):
    config = json.loads((finished_copy / "config.json").read_text())
    del config["args"]["n_filters"]  # runs made before --n_filters existed were all width 16
    (finished_copy / "config.json").write_text(json.dumps(config))
    proc = run_main("test_3D.py", "--run", finished_copy, "--progress", "0", check=True)
    assert "Dice" in proc.stdout


# -- evaluation settings, checked before the first case ----------------------------------------------------
@pytest.mark.parametrize("flags, fragment", [
    (["--patch_size", "40", "40", "24"], "multiple of 16"),
    (["--spacing", "1", "0", "1"], "--spacing must be three positive numbers"),
    (["--spacing", "1", "nan", "1"], "--spacing must be three positive numbers"),
    (["--stride_xy", "0"], "strides must be positive"),
    (["--checkpoint", "iter_5.pth"], "not in"),
])
def test_impossible_evaluation_settings_are_one_line(finished, flags, fragment):
    before = sorted(p.name for p in finished.iterdir())
    proc = run_main("test_3D.py", "--run", finished, *flags)
    assert_one_line_error(proc, fragment)
    assert sorted(p.name for p in finished.iterdir()) == before


def test_a_missing_checkpoint_is_reported_in_the_run_folder(finished):
    proc = run_main("test_3D.py", "--run", finished, "--checkpoint", "iter_5.pth")
    assert_one_line_error(proc, f"not in {finished}", "iter_2.pth", "latest.pth")


def test_a_window_the_networks_cannot_take_fails_before_the_first_case(synthetic_root, tmp_path):
    run_main("train_ucseg_3D.py", "--root_path", synthetic_root, "--output_root", tmp_path, "--labelnum", "4",
             "--max_iterations", "1", "--no_eval", *TINY, "--labeled_bs", "1", check=True)
    run = tmp_path / "synthetic_LA" / "UCSeg_4" / "unet_3D_vnet"
    proc = run_main("test_3D.py", "--run", run, "--patch_size", "48", "48", "16", "--stride_xy", "16")
    assert_one_line_error(proc, "48x48x16", "32x32x16")
    assert not any(p.name.startswith(("eval_", ".partial")) for p in run.iterdir())


def test_an_evaluation_killed_midway_leaves_no_folder_and_the_next_one_cleans_up(finished_copy):
    run = finished_copy
    proc = subprocess.Popen([sys.executable, str(CODE_DIR / "test_3D.py"), "--run", str(run), "--progress",
                             "0", "--stride_xy", "1", "--stride_z", "1"], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=device_env("cpu"))
    partial = wait_for(lambda: list(run.glob(".partial-eval-*")) or proc.poll() is not None)
    assert isinstance(partial, list), "the evaluation ended before it could be killed"
    proc.kill()
    proc.wait()
    assert sorted(p.name for p in run.glob("eval_*")) == ["eval_iter_2"]  # the training's own, nothing new
    run_main("test_3D.py", "--run", run, "--progress", "0", check=True)
    assert not list(run.glob(".partial-eval-*"))
    assert read_summary(run / "eval_iter_2_2")["dice"] == read_summary(run / "eval_iter_2")["dice"]


# -- warnings and the evaluation's report ------------------------------------------------------------------
def test_data_that_looks_wrong_is_named_once(dataset_copy, tmp_path):
    from dataloaders.la_heart import case_path, read_list

    train_ids, test_ids = read_list(dataset_copy / "train.list"), read_list(dataset_copy / "test.list")
    raw = case_path(dataset_copy, train_ids[5])  # an unlabelled case with raw scanner intensities
    rng = np.random.RandomState(0)
    rewrite_case(raw, image=(600 + 200 * rng.rand(40, 40, 24)).astype(np.float32),
                 label=np.zeros((40, 40, 24), np.uint8))
    empty_labelled = case_path(dataset_copy, train_ids[1])
    rewrite_case(empty_labelled, image=rng.randn(40, 40, 24).astype(np.float32),
                 label=np.zeros((40, 40, 24), np.uint8))
    empty_test = case_path(dataset_copy, test_ids[0])
    rewrite_case(empty_test, image=rng.randn(40, 40, 24).astype(np.float32), label=np.zeros((40, 40, 24), np.uint8))

    proc = run_main("train_mt_3D.py", "--root_path", dataset_copy, "--output_root", tmp_path, "--labelnum", "4",
                    "--max_iterations", "1", *TINY, "--labeled_bs", "1", check=True)
    log = (tmp_path / "synthetic_LA" / "MT_4" / "vnet" / "log.txt").read_text()
    for text in ("1 of 8 cases of train.list do not look z-scored", train_ids[5],
                 "1 of the 4 labelled cases have an empty label", train_ids[1],
                 "1 of the 2 evaluated cases have an empty ground truth", test_ids[0]):
        assert text in proc.stdout and text in log, text
    assert log.count("do not look z-scored") == 1 and log.count("empty label") == 1
    assert f"cases with an empty ground truth ({test_ids[0]})" in log  # in the test line too

    run = tmp_path / "synthetic_LA" / "MT_4" / "vnet"
    proc = run_main("test_3D.py", "--run", run, "--progress", "0", check=True)
    assert f"1 cases with an empty ground truth ({test_ids[0]})" in proc.stdout
    assert "empty ground truth" in proc.stderr  # warned before the evaluation as well


# -- data that goes bad during a run -----------------------------------------------------------------------
def test_an_error_in_a_loader_worker_is_one_line(dataset_copy, tmp_path):
    run = run_dir(tmp_path)
    proc = start(TRAIN, common(dataset_copy, tmp_path, "--max_iterations", "400", "--cache", "0",
                               "--num_workers", "1"))
    wait_for_iteration(run, 1, proc)
    for path in (dataset_copy / "2018LA_Seg_Training Set").rglob("*.h5"):
        path.write_bytes(b"\x89HDF\r\n gone bad during the run")
    out, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: while loading a training batch:") and "mri_norm2.h5" in lines[0]


def test_resume_after_the_training_list_changed_is_refused(dataset_copy, tmp_path):
    args = common(dataset_copy, tmp_path, "--max_iterations", "2", "--save_interval", "1")
    run_main(TRAIN, *args, check=True)
    assert json.loads((run_dir(tmp_path) / "config.json").read_text())["training_cases"][:1] == \
        (dataset_copy / "train.list").read_text().split()[:1]
    ids = (dataset_copy / "train.list").read_text().split()
    (dataset_copy / "train.list").write_text("\n".join(ids[1:] + ids[:1]) + "\n")  # other labelled cases
    assert_one_line_error(run_main(TRAIN, *args, "--resume"), "training list", "changed")


def test_test_3d_never_writes_outside_its_folder_for_a_case_id_with_a_separator(finished, dataset_copy):
    (dataset_copy / "test.list").write_text("../../outside\n")
    proc = run_main("test_3D.py", "--run", finished, "--root_path", dataset_copy, "--save_nii")
    assert_one_line_error(proc, "'../../outside'", "not a plain name")


def test_a_full_disk_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    import errno

    from utils.atomic import write_atomically
    from utils.errors import UserError

    target = tmp_path / "latest.pth"
    target.write_bytes(b"the previous checkpoint")

    def full_disk(handle):
        handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="cannot write .*latest.pth: No space left on device; the previous"):
        write_atomically(target, full_disk)
    assert target.read_bytes() == b"the previous checkpoint" and [p.name for p in tmp_path.iterdir()] == [target.name]


# -- issue 27: a hostile test battery's faults ---------------------------------------------------------------
def test_a_learning_rate_that_overflows_the_first_step_ends_in_one_line(synthetic_root, tmp_path):
    """UC-Seg's consistency BCE refused the NaN probabilities of diverged weights with torch's own error; now the
    non-finite loss is reported as in every other method."""
    args = ["--root_path", synthetic_root, "--output_root", tmp_path, "--labelnum", "4", "--no_eval", *TINY,
            "--labeled_bs", "1", "--max_iterations", "3", "--base_lr", "1e30"]
    assert_one_line_error(run_main("train_ucseg_3D.py", *args), "iteration 2: the loss term", "is nan",
                          "no checkpoint was written yet")


TORCH_WRITE_FAILURE = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/7: "
                       "file write failed")


def test_a_full_disk_during_torch_save_is_one_line_and_keeps_the_last_checkpoint(synthetic_root, tmp_path,
                                                                                  monkeypatch):
    """torch.save reports a failed write as a RuntimeError, not an OSError: the run still ends in one line that
    names the folder and its free space, and the latest.pth written before stays whole."""
    real_save = torch.save

    def disk_full_from_the_second_save(obj, handle):
        if obj["iteration"] < 2:
            return real_save(obj, handle)
        handle.write(b"PK\x03\x04 half a record")
        raise RuntimeError(TORCH_WRITE_FAILURE)

    monkeypatch.setattr(torch, "save", disk_full_from_the_second_save)
    run = run_dir(tmp_path)
    proc = run_main(TRAIN, *common(synthetic_root, tmp_path, "--max_iterations", "3", "--save_interval", "1"))
    assert_one_line_error(proc, f"cannot write {run / 'latest.pth'}: PytorchStreamWriter failed writing file data/7: "
                                "file write failed; the previous latest.pth, if any, is intact", f" free in {run})")
    monkeypatch.undo()
    assert weights(run / "latest.pth") and torch.load(run / "latest.pth", weights_only=True)["iteration"] == 1
    assert not list(run.glob(".*.tmp"))


def test_a_runtime_error_that_is_not_a_failed_write_is_not_disguised_as_one(tmp_path):
    from utils.atomic import write_atomically

    def fail(handle):
        raise RuntimeError("Expected all tensors to be on the same device")

    with pytest.raises(RuntimeError, match="same device"):
        write_atomically(tmp_path / "latest.pth", fail)
    assert not list(tmp_path.iterdir())


def test_a_stop_signal_during_the_final_evaluation_prints_the_command_that_evaluates_the_weights(synthetic_root,
                                                                                                 tmp_path):
    run = run_dir(tmp_path)
    args = [a for a in common(synthetic_root, tmp_path, "--max_iterations", "2") if a != "--no_eval"]
    proc = start(TRAIN, [*args, "--stride_xy", "1", "--stride_z", "1"])  # an evaluation of many windows
    assert wait_for(lambda: proc.poll() is not None or list(run.glob(".partial-eval-*"))), "no evaluation"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert f"stopped by SIGTERM during the final evaluation; the weights are saved in {run}" in err
    command = shlex.split(err.strip().splitlines()[-1])
    assert command == ["python", "code/test_3D.py", "--run", str(run)]
    assert (run / "iter_2.pth").is_file() and not list(run.glob("eval_*"))
