"""Fault injection through ``reproduce.sh``: a short deterministic run is killed by SIGKILL, SIGINT and SIGTERM at
random iterations (before its first checkpoint, mid-run, during a save) and its evaluation is killed mid-way; each
time ``reproduce.sh`` is simply called again. The final weights and metrics must equal those of an uninterrupted
call, bit for bit, and no step may leave anything a later call mistakes for finished work."""
import os
import random
import signal
import subprocess

import pytest
import torch

from conftest import REPO_ROOT, assert_same_models, wait_for

ITERATIONS = 20
SAVE_INTERVAL = 5


def environment(tmp_path, output, **extra):
    return {**os.environ, "DATA_ROOT": str(tmp_path / "no_data"), "SYNTHETIC_ROOT": str(tmp_path / "synthetic"),
            "SYNTHETIC_SHAPE": "48 48 32", "QUICK_PATCH": "32 32 16", "QUICK_ITERATIONS": str(ITERATIONS),
            "QUICK_WIDTH": "8", "METHODS": "supervised", "UPPER_BOUND": "0", "PLOTS": "0", "DEVICE": "cpu",
            "EXTRA_ARGS": f"--save_interval {SAVE_INTERVAL} --progress 0", "OUTPUT_ROOT": str(tmp_path / output),
            **extra}


def start(tmp_path, output, **extra):
    """``bash reproduce.sh`` in its own process group, as a terminal or a scheduler runs it."""
    return subprocess.Popen(["bash", str(REPO_ROOT / "reproduce.sh")], cwd=tmp_path,
                            env=environment(tmp_path, output, **extra),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            encoding="utf-8", errors="replace")


def finish(proc):
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def run_folder(tmp_path, output):
    return tmp_path / output / "quickstart_synthetic_seed1337" / "Supervised_4" / "vnet"


def logged(run, iteration):
    log = run / "log.txt"
    return log.is_file() and f"iteration {iteration} : loss" in log.read_text()


def latest_iteration(run):
    return torch.load(run / "latest.pth", weights_only=True)["iteration"]


def kill_when(proc, condition, signum, group=True):
    """Send ``signum`` to the process group (or to bash alone) as soon as ``condition()`` holds."""
    assert wait_for(lambda: condition() or proc.poll() is not None, timeout=300, interval=0.0005), "no progress"
    assert proc.poll() is None, finish(proc)[1]
    if group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    return finish(proc)


def kill_during_a_checkpoint_write(tmp_path, run):
    """SIGKILL the run while it writes ``latest.pth``. The kill races the write (a width-8 checkpoint takes about
    90 ms here, and the polling test can be descheduled that long on two busy cores), so a kill that lands after the
    write finished is simply another kill between iterations, and the next save is tried, as long as one remains
    before the iterations the SIGTERM step needs."""
    partial = ".latest.pth.*.tmp"
    while latest_iteration(run) < ITERATIONS - SAVE_INTERVAL:
        before = latest_iteration(run)
        kill_when(start(tmp_path, "faulty"), lambda: list(run.glob(partial)), signal.SIGKILL)
        if list(run.glob(partial)):
            assert latest_iteration(run) == before  # the previous latest.pth, intact
            return
    pytest.fail("every kill landed after the checkpoint write it aimed at")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("faults")
    status, out = finish(start(tmp_path, "straight"))
    assert status == 0, out
    return tmp_path


def test_runs_killed_anywhere_end_bitwise_equal_to_an_uninterrupted_one(reference):
    tmp_path, rng = reference, random.Random(14)
    run = run_folder(tmp_path, "faulty")

    before_first_save = rng.randint(1, SAVE_INTERVAL - 1)
    kill_when(start(tmp_path, "faulty"), lambda: logged(run, before_first_save), signal.SIGKILL)
    assert not (run / "latest.pth").exists()  # killed before its first checkpoint: only config and log

    ctrl_c_at = rng.randint(SAVE_INTERVAL + 1, 2 * SAVE_INTERVAL - 2)  # leaves two saves for the kill in a write
    status, out = kill_when(start(tmp_path, "faulty"), lambda: logged(run, ctrl_c_at), signal.SIGINT)
    assert status == 130 and "stopped by a signal" in out, out
    assert "starting from iteration 0" in (run / "log.txt").read_text()
    assert latest_iteration(run) >= ctrl_c_at and "Traceback" not in out

    kill_during_a_checkpoint_write(tmp_path, run)

    resumed_at = latest_iteration(run)
    term_at = rng.randint(resumed_at + 1, ITERATIONS - 3)
    status, out = kill_when(start(tmp_path, "faulty"), lambda: logged(run, term_at), signal.SIGTERM, group=False)
    assert status == 143 and "stopped by a signal" in out, out  # reproduce.sh passed its SIGTERM on
    assert latest_iteration(run) >= term_at

    kill_when(start(tmp_path, "faulty"), lambda: list(run.glob(".partial-eval-*")), signal.SIGKILL)
    assert (run / f"iter_{ITERATIONS}.pth").is_file()
    assert not list(run.glob("eval_*")), "a killed evaluation left a folder that looks finished"

    status, out = finish(start(tmp_path, "faulty"))
    assert status == 0, out
    assert "FAILED" not in out and not list(run.glob(".*.tmp")) and not list(run.glob(".partial-eval-*"))
    straight = run_folder(tmp_path, "straight")
    expected = torch.load(straight / f"iter_{ITERATIONS}.pth", weights_only=True)["models"]["model"]
    got = torch.load(run / f"iter_{ITERATIONS}.pth", weights_only=True)["models"]["model"]
    assert_same_models({"model": expected}, {"model": got})
    eval_name = f"eval_iter_{ITERATIONS}"
    assert (run / eval_name / "metrics.csv").read_text() == (straight / eval_name / "metrics.csv").read_text()
    table = (tmp_path / "faulty" / "results.md").read_text(encoding="utf-8")
    assert "failed" not in table and "1 of 1" in table


def test_a_second_reproduce_on_the_same_output_is_refused(reference):
    proc = start(reference, "busy")
    try:
        assert wait_for(lambda: (run_folder(reference, "busy") / "log.txt").exists() or proc.poll() is not None)
        second = subprocess.run(["bash", str(REPO_ROOT / "reproduce.sh")], cwd=reference,
                                env=environment(reference, "busy"), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "still working in" in second.stderr, second.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_signal_stops_every_parallel_job_and_the_next_call_continues_them(reference):
    """Two jobs (the labelled-only run and the upper bound) stopped by a SIGTERM to reproduce.sh, then continued."""
    tmp_path, jobs = reference, {"JOBS": "2", "UPPER_BOUND": "1"}
    run = run_folder(tmp_path, "parallel")
    status, out = kill_when(start(tmp_path, "parallel", **jobs), lambda: logged(run, 3), signal.SIGTERM, group=False)
    assert status == 143 and "stopped by a signal" in out, out
    assert not (run / f"iter_{ITERATIONS}.pth").exists() and latest_iteration(run) < ITERATIONS
    status, out = finish(start(tmp_path, "parallel", **jobs))
    assert status == 0 and out.count(": done") == 2, out
    straight = torch.load(run_folder(tmp_path, "straight") / f"iter_{ITERATIONS}.pth", weights_only=True)
    resumed = torch.load(run / f"iter_{ITERATIONS}.pth", weights_only=True)
    assert_same_models(straight["models"], resumed["models"])
