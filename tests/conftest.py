"""Test configuration: make ``code/`` importable the way the scripts see it."""
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CODE_DIR = REPO_ROOT / "code"
if str(CODE_DIR) not in sys.path:
    sys.path.insert(0, str(CODE_DIR))

import contextlib  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from report.same_weights import differences, model_tensors  # noqa: E402
from utils.runtime import use_deterministic_algorithms  # noqa: E402



def find_real_la():
    """The real LA data, where a user or this project keeps it: ``$LA_ROOT``, then ``data/LA`` (data/README.md),
    then ``../shared/data/LA``; None when none holds a ``train.list``."""
    candidates = [os.environ.get("LA_ROOT"), REPO_ROOT / "data" / "LA", REPO_ROOT.parent / "shared" / "data" / "LA"]
    return next((Path(c) for c in candidates if c and (Path(c) / "train.list").is_file()), None)


REAL_LA = find_real_la()
REAL_LA_ABSENT = "real LA data not found ($LA_ROOT, data/LA, ../shared/data/LA: see data/README.md)"
# A small training configuration: 2-iteration runs on tiny synthetic volumes.
TINY = ["--patch_size", "32", "32", "16", "--batch_size", "2", "--stride_xy", "16", "--stride_z", "8",
        "--num_workers", "0", "--progress", "0"]


CUDA_ABSENT = "no CUDA device here (torch.cuda.is_available() is False); the CUDA variant runs on a GPU machine"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason=CUDA_ABSENT))])
def device(request):
    """Every device present, for the tests that train and evaluate: the CPU always, CUDA as well when torch sees
    one (CI has none, so there its variants are skipped, saying why)."""
    return request.param


def device_env(device):
    """The environment of a script run on ``device``: ``cpu`` hides every CUDA device (so that the scripts'
    ``--device auto`` takes the CPU, also on a GPU machine), ``cuda`` leaves them visible (it takes CUDA)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else dict(os.environ)


def assert_same_models(expected, actual, device="cpu"):
    """Two checkpoints' ``models`` (``{name: state dict}``) hold the same tensors: bit for bit on the CPU (shape,
    dtype and bytes, by :func:`report.same_weights.differences`), where a deterministic run is exactly
    reproducible; on CUDA within float32 noise, since some CUDA kernels (5-D cross entropy, trilinear upsampling
    and max-pool backward) accumulate in a varying order even with ``--deterministic 1``."""
    if device == "cpu":
        found = differences(*(model_tensors({"models": models}) for models in (expected, actual)))
        assert not found, found
        return
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].keys() == actual[name].keys(), name
        for key in expected[name]:
            a, b = expected[name][key].cpu(), actual[name][key].cpu()
            if a.is_floating_point():
                assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), (name, key)
            else:
                assert torch.equal(a, b), (name, key)


def load_saved(path):
    """A checkpoint written by a run (on any device), on the CPU."""
    return torch.load(path, weights_only=True, map_location="cpu")


def run_script(script, *args, cwd=REPO_ROOT, check=True, device="cpu"):
    """Run ``code/<script>`` in a fresh interpreter on ``device`` (:func:`device_env`); return the completed
    process (text output)."""
    proc = subprocess.run([sys.executable, str(CODE_DIR / script), *map(str, args)], cwd=cwd,
                          capture_output=True, encoding="utf-8", errors="replace",
                          timeout=600, env=device_env(device))
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_main(script, *args, device="cpu", cwd=None, check=False):
    """Call ``code/<script>``'s ``main`` in this interpreter the way its ``run_cli`` does in a fresh one (one-line
    errors, exit status) and return a completed process with its output. For inputs refused before a run starts,
    and for runs whose process does not matter to the test (a reference run, a resume to completion): it saves
    the 2-4 s of a fresh interpreter and its torch import. The state a script sets for the process (signal
    handlers, seeds, deterministic mode, its logger, warning filters, environment, working directory, the frozen
    garbage collector) is put back afterwards; ``device="cpu"`` hides CUDA as :func:`device_env` does. ``cwd``:
    the working directory during the call; ``check``: a non-zero exit fails the test with the output."""
    return call_main(importlib.import_module(Path(script).stem).main, *args, device=device, cwd=cwd, check=check)


def call_main(main, *args, device="cpu", cwd=None, check=False):
    """:func:`run_main` for any entry point's ``main`` (a data script's, for example)."""
    from utils.cli import run_cli

    argv = [str(arg) for arg in args]
    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    with script_process_state(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            mock.patch("torch.cuda.is_available", return_value=torch.cuda.is_available() and device != "cpu"):
        if cwd is not None:
            os.chdir(cwd)
        try:
            run_cli(main, argv)
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    proc = subprocess.CompletedProcess([main.__module__, *argv], status, stdout.getvalue(), stderr.getvalue())
    if check and status != 0:
        raise AssertionError(f"{main.__module__} exited {status}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


# the warning filters of a fresh interpreter (Python's defaults, less those for __main__), so that a warning shows
# on stderr as in a script
FRESH_INTERPRETER_WARNINGS = [("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning),
                              ("ignore", ImportWarning), ("ignore", ResourceWarning)]


def print_warning(message, category, filename, lineno, file=None, line=None):
    """Show a warning on stderr as a fresh interpreter does (pytest would otherwise record it silently)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def script_process_state():
    """Put back, on leaving, what a script's ``main`` sets for its whole process (see :func:`run_main`)."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    environ, cwd = dict(os.environ), os.getcwd()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
                     torch.backends.cudnn.deterministic, torch.utils.deterministic.fill_uninitialized_memory)
    logger = logging.getLogger("ssl3d")
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category in FRESH_INTERPRETER_WARNINGS:
                warnings.simplefilter(action, category)
            warnings.showwarning = print_warning
            yield
    finally:
        gc.unfreeze()
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = deterministic[2:4]
        torch.utils.deterministic.fill_uninitialized_memory = deterministic[4]


def kill_after_first_save(script, args, run_dir, device="cpu"):
    """Start ``code/<script>`` with ``args`` on ``device`` and SIGKILL it as soon as ``run_dir/latest.pth``
    exists; return that path (the test checks how far the run got)."""
    proc = subprocess.Popen([sys.executable, str(CODE_DIR / script), *map(str, args)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=device_env(device))
    latest = run_dir / "latest.pth"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return latest


def straight_and_resumed(script, args, run, iterations, tmp_path, device="cpu", resume_args=()):
    """Train ``code/<script>`` with ``args`` (``--max_iterations iterations`` among them) twice: straight into
    ``tmp_path/straight``, and into ``tmp_path/killed`` SIGKILLed after its first save, then resumed (with
    ``resume_args`` added). ``run`` is the run folder below an output root. Returns the straight and the resumed
    run's final ``models``, the killed run's ``latest.pth`` and the iteration it was killed at; the caller compares
    the models with assert_same_models."""
    run_main(script, *args, "--output_root", tmp_path / "straight", device=device, check=True)
    killed = ["--output_root", tmp_path / "killed", *args]
    latest = kill_after_first_save(script, killed, tmp_path / "killed" / run, device=device)
    stopped_at = load_saved(latest)["iteration"]
    final = f"iter_{iterations}.pth"
    assert stopped_at < iterations and not (latest.parent / final).exists(), "the run finished before the kill"
    run_main(script, *killed, "--resume", *resume_args, device=device, check=True)
    straight = load_saved(tmp_path / "straight" / run / final)["models"]
    return straight, load_saved(latest.parent / final)["models"], latest, stopped_at


def assert_one_line_error(proc, *fragments):
    """The process failed as the README promises: exit status 2 and one ``error:`` line on stderr holding
    every fragment, without a traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0] and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def first_train_case(root):
    """The h5 file of the first case of ``train.list`` (a labelled case)."""
    from dataloaders.la_heart import case_path, read_list

    return case_path(root, read_list(root / "train.list")[0])


def rewrite_case(path, **datasets):
    """Replace an h5 case file by one holding ``datasets`` (name -> array)."""
    import h5py

    path.unlink()
    with h5py.File(path, "w") as handle:
        for key, value in datasets.items():
            handle.create_dataset(key, data=value)


def wait_for(condition, timeout=120, interval=0.002):
    """Poll ``condition()`` until it returns something true (returned) or ``timeout`` seconds pass (None)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    return None


def read_summary(eval_dir):
    return json.loads((eval_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def finished(synthetic_root, tmp_path_factory):
    """The run folder of a finished and evaluated 2-iteration labelled-only run (``iter_1.pth``, ``iter_2.pth``,
    ``latest.pth``, ``eval_iter_2``), trained once; tests that change it work on a copy (``finished_copy``)."""
    out = tmp_path_factory.mktemp("finished")
    run_main("train_supervised_3D.py", "--root_path", synthetic_root, "--output_root", out, "--labelnum", "4",
             "--max_iterations", "2", "--save_interval", "1", *TINY, check=True)
    return out / "synthetic_LA" / "Supervised_4" / "vnet"


@pytest.fixture
def finished_copy(finished, tmp_path):
    """A copy of the finished run at ``tmp_path/model/synthetic_LA/Supervised_4/vnet`` (output root
    ``tmp_path/model``)."""
    return shutil.copytree(finished, tmp_path / "model" / "synthetic_LA" / "Supervised_4" / "vnet")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic LA-layout dataset (8 train, 2 test cases), written once per session."""
    from dataloaders.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "LA", num_cases=10, num_test=2,
                                  shape=(48, 48, 24), seed=0)


@pytest.fixture
def dataset_copy(synthetic_root, tmp_path):
    """A private copy of the synthetic dataset, for tests that corrupt it."""
    return shutil.copytree(synthetic_root, tmp_path / "LA")


@contextlib.contextmanager
def held_by_another_process(folder):
    """``folder``'s lock (``utils.folder_lock``) held by a live child process for the block; yields its pid. A lock
    of this process would not do: POSIX record locks belong to a process, which may always take its own."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from utils.folder_lock import FolderLock; "
                               f"FolderLock({str(folder)!r}).acquire(); print('locked', flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True, cwd=CODE_DIR)
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
