"""The cluster path on a real SLURM: the README's job array, a time limit, a duplicated task, a cancelled array.

They need a SLURM controller that answers (``sinfo``); ``bash tests/cluster/slurm_cluster.sh start`` starts a
single-node one on this machine (README "On a cluster"), then::

    SLURM_CONF=/tmp/ssl3d-slurm/slurm.conf python -m pytest -q tests/cluster

Without ``sbatch``, or without a controller, every test here is skipped with the reason. Each task runs a line of
``PRINT_JOBS=1 bash reproduce.sh`` on synthetic data (tiny networks, one compute thread, so that a run is
bitwise the same wherever and however often it is interrupted).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from utils.folder_lock import LOCK_FILE, live_holder

SBATCH = shutil.which("sbatch")


def controller_answers():
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


pytestmark = [
    pytest.mark.skipif(SBATCH is None, reason="no sbatch here: tests/cluster/slurm_cluster.sh start (INSTALL=1) "
                                              "starts a single-node SLURM cluster"),
    pytest.mark.skipif(SBATCH is not None and not controller_answers(),
                       reason="no SLURM controller answers (sinfo): bash tests/cluster/slurm_cluster.sh start, then "
                              "export the SLURM_CONF it prints"),
]

# tiny runs on the synthetic quick start's data; one compute thread, the same for every task and every call
SETTINGS = {"SYNTHETIC_SHAPE": "48 48 32", "QUICK_PATCH": "32 32 16", "QUICK_WIDTH": "4", "DEVICE": "cpu",
            "OMP_NUM_THREADS": "1", "PLOTS": "0"}


def reproduce(tmp_path, output, **env):
    """``bash reproduce.sh`` on the synthetic data under ``tmp_path`` into ``tmp_path/output``."""
    settings = {"DATA_ROOT": str(tmp_path / "no_data"), "SYNTHETIC_ROOT": str(tmp_path / "synthetic"),
                "OUTPUT_ROOT": str(tmp_path / output), "PYTHON": sys.executable, **SETTINGS, **env}
    return subprocess.run(["bash", str(REPO_ROOT / "reproduce.sh")], cwd=tmp_path, capture_output=True,
                          encoding="utf-8", errors="replace", env={**os.environ, **settings}, timeout=1800)


def write_jobs(tmp_path, output, **env):
    """``PRINT_JOBS=1 bash reproduce.sh > jobs.txt``, as the README says; returns the lines."""
    proc = reproduce(tmp_path, output, PRINT_JOBS="1", **env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("env ")]
    (tmp_path / "jobs.txt").write_text("\n".join(lines) + "\n")
    return lines


def readme_script(tasks, limit):
    """The README's SLURM script as written, with the array's size, the time limit and the partition filled in."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "#SBATCH" in b)
    assert "--array=1-17" in block and "--time=12:00:00" in block
    script = block.replace("--array=1-17", f"--array=1-{tasks}").replace("--time=12:00:00", f"--time={limit}")
    return script.replace("#!/bin/bash\n", "#!/bin/bash\n#SBATCH --partition=debug\n", 1)


def submit(tmp_path, script):
    """Submit ``script`` from ``tmp_path`` (where jobs.txt is); returns the array's job id."""
    path = tmp_path / "array.sh"
    path.write_text(script)
    proc = subprocess.run([SBATCH, "--parsable", str(path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait_for(job, runs, timeout=1200):
    """Wait until no task of ``job`` is pending or running, and no process holds a run folder under ``runs``:
    squeue stops listing a cancelled array at once, while its runs still save ``latest.pth`` (within KillWait)."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip() or \
            any(live_holder(lock.parent) for lock in Path(runs).rglob(LOCK_FILE)):
        assert time.monotonic() < deadline, f"job {job} still queued or its runs still held after {timeout} s"
        time.sleep(2)


def task_output(tmp_path, job, task):
    return (tmp_path / f"slurm-{job}_{task}.out").read_text(encoding="utf-8", errors="replace")


def task_state(job, task):
    """``JobState`` of one task (the controller keeps finished jobs for MinJobAge, an hour in our cluster)."""
    shown = subprocess.run(["scontrol", "show", "job", f"{job}_{task}"], capture_output=True, text=True).stdout
    return re.search(r"JobState=(\S+)", shown).group(1)


def same_table(tmp_path, first, second):
    """The two tables' text with their folders' names made equal."""
    texts = [(tmp_path / name / "results.md").read_text(encoding="utf-8").replace(str(tmp_path / name), "RUNS")
             for name in (first, second)]
    return texts[0] == texts[1]


def resumed_times(run):
    """When the run was resumed, as its config.json records it."""
    return json.loads((run / "config.json").read_text(encoding="utf-8")).get("resumed", [])


def final_weights(run, iterations):
    return torch.load(run / f"iter_{iterations}.pth", weights_only=True)["models"]


def test_the_readme_array_trains_every_run_and_a_plain_call_then_writes_the_sequential_table(tmp_path):
    lines = write_jobs(tmp_path, "array", METHODS="supervised mt", QUICK_ITERATIONS="4")
    assert len(lines) == 3  # the labelled-only V-Net, the mean teacher, the all-labels V-Net
    job = submit(tmp_path, readme_script(len(lines), "00:20:00"))
    wait_for(job, tmp_path)
    for task in range(1, len(lines) + 1):
        assert task_state(job, task) == "COMPLETED", task_output(tmp_path, job, task)
        assert "training ->" in task_output(tmp_path, job, task)
    after = reproduce(tmp_path, "array", METHODS="supervised mt", QUICK_ITERATIONS="4")
    assert after.returncode == 0, after.stdout[-2000:]
    assert after.stdout.count("trained already") == 3 and "training ->" not in after.stdout
    sequential = reproduce(tmp_path, "sequential", METHODS="supervised mt", QUICK_ITERATIONS="4")
    assert sequential.returncode == 0, sequential.stdout[-2000:]
    assert same_table(tmp_path, "array", "sequential")


def test_a_task_at_its_time_limit_saves_and_a_resubmitted_array_resumes_to_the_same_weights(tmp_path):
    """SLURM sends SIGTERM at the time limit (SIGKILL after KillWait): the run saves latest.pth and stops with
    status 143; submitting the array again resumes it, to the weights of an uninterrupted run, bit for bit."""
    iterations = "6000"  # more than a minute of training on any machine we know
    lines = write_jobs(tmp_path, "limited", METHODS="supervised", UPPER_BOUND="0", QUICK_ITERATIONS=iterations)
    job = submit(tmp_path, readme_script(len(lines), "00:01:00"))
    wait_for(job, tmp_path)
    out = task_output(tmp_path, job, 1)
    assert task_state(job, 1) == "TIMEOUT", out
    assert re.search(r"stopped by SIGTERM after iteration \d+; latest\.pth is saved", out), out
    assert "!! stopped by a signal" in out
    run = next((tmp_path / "limited").glob("*/Supervised_4/vnet"))
    assert (run / "latest.pth").is_file() and not (run / f"iter_{iterations}.pth").exists()
    again = submit(tmp_path, readme_script(len(lines), "00:20:00"))
    wait_for(again, tmp_path)
    assert task_state(again, 1) == "COMPLETED", task_output(tmp_path, again, 1)
    assert len(resumed_times(run)) == 1
    straight = reproduce(tmp_path, "straight", METHODS="supervised", UPPER_BOUND="0", QUICK_ITERATIONS=iterations)
    assert straight.returncode == 0, straight.stdout[-2000:]
    reference = next((tmp_path / "straight").glob("*/Supervised_4/vnet"))
    resumed, uninterrupted = final_weights(run, iterations), final_weights(reference, iterations)
    assert all(torch.equal(resumed[net][key], uninterrupted[net][key]) for net in resumed for key in resumed[net])


def test_two_tasks_on_one_run_folder_leave_it_whole(tmp_path):
    """A duplicated line of jobs.txt: both tasks start at once; one trains, the other is refused in one line."""
    lines = write_jobs(tmp_path, "twice", METHODS="supervised", UPPER_BOUND="0", QUICK_ITERATIONS="300")
    (tmp_path / "jobs.txt").write_text(lines[0] + "\n" + lines[0] + "\n")
    job = submit(tmp_path, readme_script(2, "00:20:00"))
    wait_for(job, tmp_path)
    outputs = [task_output(tmp_path, job, task) for task in (1, 2)]
    states = [task_state(job, task) for task in (1, 2)]
    # the later task meets the folder locked by the earlier one: one line naming it, no training
    refused = [out for out in outputs if re.search(r"^error: run folder .* is in use by pid", out, re.M)]
    assert sorted(states) == ["COMPLETED", "FAILED"] and len(refused) == 1, outputs
    after = reproduce(tmp_path, "twice", METHODS="supervised", UPPER_BOUND="0", QUICK_ITERATIONS="300")
    assert after.returncode == 0 and "trained already" in after.stdout and "evaluated already" in after.stdout


def test_a_cancelled_array_leaves_every_run_resumable(tmp_path):
    iterations = "3000"
    lines = write_jobs(tmp_path, "cancelled", METHODS="supervised mt", UPPER_BOUND="0", QUICK_ITERATIONS=iterations)
    job = submit(tmp_path, readme_script(len(lines), "00:20:00"))
    logs = []
    deadline = time.monotonic() + 600
    while len(logs) < 2 or not all("iteration 20 :" in log.read_text() for log in logs):
        assert time.monotonic() < deadline, "the runs did not reach iteration 20"
        time.sleep(2)
        logs = list((tmp_path / "cancelled").glob("*/*/vnet/log.txt"))
    subprocess.run(["scancel", job], check=True, timeout=60)
    wait_for(job, tmp_path)
    for run in (log.parent for log in logs):
        assert (run / "latest.pth").is_file() and not (run / f"iter_{iterations}.pth").exists()
    after = reproduce(tmp_path, "cancelled", METHODS="supervised mt", UPPER_BOUND="0", QUICK_ITERATIONS=iterations,
                      JOBS="2")
    assert after.returncode == 0, after.stdout[-2000:]
    assert all((log.parent / f"iter_{iterations}.pth").is_file() for log in logs)
    assert all(len(resumed_times(log.parent)) == 1 for log in logs)
