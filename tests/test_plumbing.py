"""Sliding window, learning-rate schedules, EMA, checkpoints, RNG capture."""
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from networks.vnet import VNet
from utils.checkpoint import load_checkpoint, load_models, save_checkpoint
from utils.ema import make_teacher, update_ema
from utils.errors import UserError
from utils.lr_schedule import lr_at
from utils.runtime import (MAX_AUTO_WORKERS, auto_num_workers, capture_rng_state, prepare_for_training,
                           quiet_determinism_warnings, restore_rng_state, to_step_layout)
from utils.sliding_window import (check_window, reference_sliding_window, sliding_window_inference,
                                  window_corners, window_starts)

CPU = torch.device("cpu")


def threshold_predict(x):
    """A stand-in network: class 1 where the voxel is positive, as exact one-hot probabilities."""
    fg = (x > 0).float()
    return torch.cat([1 - fg, fg], dim=1)


def test_window_positions_of_an_la_case():
    assert window_starts(190, 112, 18) == [0, 18, 36, 54, 72, 78]
    assert window_starts(142, 112, 18) == [0, 18, 30]
    assert window_starts(88, 80, 4) == [0, 4, 8]
    assert len(window_corners((190, 142, 88), (112, 112, 80), 18, 4)) == 54
    assert window_starts(112, 112, 18) == [0]


@pytest.mark.parametrize("shape", [(40, 37, 21), (20, 18, 9)])  # larger than and smaller than the patch
def test_sliding_window_reconstructs_a_known_volume_exactly(shape):
    rng = np.random.RandomState(0)
    image = rng.randn(*shape).astype(np.float32)
    for sw_batch_size in (1, 3, 100):
        labels, score = sliding_window_inference(threshold_predict, image, (32, 32, 16), 6, 4, 2, CPU,
                                                 sw_batch_size=sw_batch_size)
        assert labels.shape == shape and score.shape == (2,) + shape
        assert np.array_equal(labels, (image > 0).astype(np.uint8))
        assert np.array_equal(score[1], (image > 0).astype(np.float32))


def test_sliding_window_agrees_with_the_one_window_algorithm():
    torch.manual_seed(0)
    net = VNet(1, 2, 8, "batchnorm").eval()
    with torch.no_grad():
        net.out_conv.bias.copy_(torch.tensor([0.0, 0.02]))
    image = np.random.RandomState(1).randn(45, 38, 20).astype(np.float32)
    ref_labels, ref_score = reference_sliding_window(net, image, (32, 32, 16), 9, 4, 2, CPU)
    labels, score = sliding_window_inference(lambda x: torch.softmax(net(x), 1), image, (32, 32, 16), 9, 4, 2,
                                             CPU, sw_batch_size=4)
    assert 0 < ref_labels.mean() < 1  # both classes occur, so equality means something
    assert np.array_equal(labels, ref_labels)
    np.testing.assert_allclose(score, ref_score, atol=1e-5)


def test_window_checks():
    with pytest.raises(UserError, match="without a prediction"):
        check_window((32, 32, 16), 40, 4)
    with pytest.raises(UserError, match="positive"):
        check_window((32, 32, 16), 0, 4)


def test_step_and_poly_schedules():
    assert lr_at(0, 0.01, "step", 6000) == 0.01
    assert lr_at(2499, 0.01, "step", 6000) == 0.01
    assert lr_at(2500, 0.01, "step", 6000) == pytest.approx(0.001)
    assert lr_at(5999, 0.01, "step", 6000) == pytest.approx(0.0001)
    assert lr_at(0, 0.01, "poly", 100) == 0.01
    assert lr_at(50, 0.01, "poly", 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert lr_at(50, 0.01, "linear", 100) == pytest.approx(0.005)
    with pytest.raises(UserError):
        lr_at(0, 0.01, "cyclic", 100)


def test_teacher_gets_no_gradient_and_follows_ema():
    student = torch.nn.Linear(3, 2)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    update_ema(teacher, student, decay=0.99, global_step=1000)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.99 * b + 0.01 * s)
    update_ema(teacher, student, decay=0.99, global_step=0)  # alpha = 0: copy the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.allclose(t, s)


def test_checkpoint_round_trip_is_atomic_and_checked(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = tmp_path / "latest.pth"
    save_checkpoint(path, {"script": "train_a", "iteration": 5, "models": {"model": net.state_dict()},
                           "rng": capture_rng_state()})
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]
    state = load_checkpoint(path)
    other = torch.nn.Linear(3, 2)
    load_models(state, {"model": other}, path, "train_a")
    assert torch.equal(other.weight, net.weight)
    with pytest.raises(UserError, match="written by train_a, not by train_b"):
        load_models(state, {"model": other}, path, "train_b")
    with pytest.raises(UserError, match="does not match"):
        load_models(state, {"model": torch.nn.Linear(4, 2)}, path, "train_a")
    with pytest.raises(UserError, match="holds networks"):
        load_models(state, {"model": other, "teacher": other}, path, "train_a")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="truncated or not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_rng_state_survives_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    save_checkpoint(tmp_path / "c.pth", {"models": {}, "rng": capture_rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(load_checkpoint(tmp_path / "c.pth")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_failed_evaluation_leaves_no_folder(synthetic_root, tmp_path):
    from dataloaders.la_heart import LAHeart
    from utils.evaluation import evaluate

    def refuse(x):
        raise UserError("window refused")

    with pytest.raises(UserError, match="window refused"):
        evaluate(refuse, LAHeart(synthetic_root, "test"), tmp_path, "iter_1.pth", patch_size=(32, 32, 16),
                 stride_xy=16, stride_z=8, num_classes=2, device=CPU, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_recompute_auto_is_on_for_cpu_only():
    from utils.recompute import recompute_enabled

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert recompute_enabled("auto", cpu) and not recompute_enabled("auto", cuda)
    assert recompute_enabled("on", cuda) and not recompute_enabled("off", cpu)


def test_auto_workers_follow_the_machine():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_num_workers(cpu, cpus=64) == 2
    assert auto_num_workers(cuda, cpus=2) == 2
    assert auto_num_workers(cuda, cpus=6) == 5
    assert auto_num_workers(cuda, cpus=64) == MAX_AUTO_WORKERS


def test_auto_workers_are_resolved_before_the_run_and_recorded():
    import train_supervised_3D as supervised
    from dataloaders.registry import get_dataset_spec
    from utils.args import finalize_args

    args = supervised.get_parser().parse_args(["--device", "cpu"])
    assert args.num_workers == "auto"
    args.exp = "LA/Supervised"
    assert finalize_args(args, get_dataset_spec("LA")).num_workers == 2


def test_determinism_warnings_become_one_line_on_cuda_only():
    import warnings

    message = ("upsample_trilinear3d_backward_out_cuda does not have a deterministic implementation, but you set "
               "'torch.use_deterministic_algorithms(True, warn_only=True)'")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert quiet_determinism_warnings(torch.device("cpu"), True) is None
        assert quiet_determinism_warnings(torch.device("cuda"), False) is None
        warnings.warn(message)
        assert len(caught) == 1
        note = quiet_determinism_warnings(torch.device("cuda"), True)
        assert note.startswith("note: --deterministic 1 on CUDA") and "\n" not in note
        warnings.warn(message)
        warnings.warn("another warning")
        assert [str(w.message) for w in caught[1:]] == ["another warning"]


def test_deterministic_mode_is_set_without_loading_the_compiler_until_compile_asks():
    """``seed_everything`` sets PyTorch's deterministic flag (warn only) without importing ``torch._inductor`` (a
    second of every start); ``--compile`` passes the flag on to inductor's copy."""
    script = ("import sys; sys.path.insert(0, 'code'); import torch; from utils.runtime import seed_everything, "
              "prepare_for_training; seed_everything(1, True); "
              "assert torch.are_deterministic_algorithms_enabled(); "
              "assert torch.is_deterministic_algorithms_warn_only_enabled(); "
              "assert 'torch._inductor' not in sys.modules, 'inductor loaded'; "
              "prepare_for_training({'net': torch.nn.Linear(2, 2)}, torch.device('cpu'), compile_models=True); "
              "import torch._inductor.config as inductor; assert inductor.deterministic; "
              "seed_everything(1, False); assert not torch.are_deterministic_algorithms_enabled()")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_channels_last_step_layout_keeps_the_numbers_and_the_state_dict():
    """``--channels_last``: the weights and the image batches change layout, labels do not; the forward pass
    gives the same numbers up to float rounding, and the state dict keeps its keys."""
    torch.manual_seed(0)
    net = VNet(n_channels=1, n_classes=2, n_filters=4, normalization="batchnorm").eval()
    x = torch.randn(2, 1, 32, 32, 16)
    expected = net(x)
    keys = list(net.state_dict())
    prepare_for_training({"model": net}, torch.device("cpu"), channels_last=True)
    assert net.block_one.conv[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    image, label = to_step_layout(x, True), to_step_layout(torch.zeros(2, 32, 32, 16, dtype=torch.long), True)
    assert image.is_contiguous(memory_format=torch.channels_last_3d) and label.is_contiguous()
    assert to_step_layout(x, False) is x
    torch.testing.assert_close(net(image), expected, rtol=1e-4, atol=1e-5)
    assert list(net.state_dict()) == keys


def test_partial_evaluations_killed_before_their_lock_are_cleaned_up(tmp_path):
    """A partial folder without a lock file was killed before it took its lock when the process named in it is
    gone, or when it is a minute old; a fresh one of a live process may be taking its lock now, and is kept."""
    import os
    import subprocess
    import time

    from utils.evaluation import PARTIAL_PREFIX, remove_abandoned_partials

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"{PARTIAL_PREFIX}{gone.pid}-abc"
    old, live = tmp_path / f"{PARTIAL_PREFIX}{os.getpid()}-old", tmp_path / f"{PARTIAL_PREFIX}{os.getpid()}-new"
    for folder in (dead, old, live):
        folder.mkdir()
    os.utime(old, (time.time() - 120, time.time() - 120))
    remove_abandoned_partials(tmp_path)
    assert not dead.exists() and not old.exists() and live.exists()


@pytest.mark.parametrize("script", ["train_supervised_3D", "train_mt_3D", "train_uamt_3D", "train_dtc_3D",
                                    "train_cps_3D", "train_ugmcl_3D", "train_ucseg_3D", "train_ugpl_3D", "test_3D",
                                    "test_released", "gpu_check", "benchmark"])
def test_help_shows_every_default(script):
    """Every flag that has a default says it in --help (UC-Seg's 50000 iterations, per-dataset patches), and a
    number it gives as the default is the one the script parses (UC-Seg's --nms 1, not a text's 0); switches and
    flags without default (used only when given) need none."""
    import argparse
    import importlib
    import re

    parser = importlib.import_module(script).get_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if (isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction))
                or action.default in (None, argparse.SUPPRESS)):
            continue
        text = formatter._expand_help(action)
        assert "default" in text, (script, action.option_strings)
        said = re.search(r"default: (-?[0-9][0-9.e+-]*)(?=[ ,;)]|$)", text)
        default = parser.get_default(action.dest)
        if said and isinstance(default, (int, float)):
            assert float(said.group(1)) == default, (script, action.option_strings, text)
    ucseg_help = " ".join(importlib.import_module("train_ucseg_3D").get_parser().format_help().split())
    assert "--max_iterations MAX_ITERATIONS default: 50000" in ucseg_help



def test_a_stop_python_cannot_raise_where_it_arrives_is_kept_and_raised_at_the_next_safe_point(monkeypatch, capsys):
    """A signal handler's Interrupted raised inside a weakref callback is swallowed by Python ("Exception ignored",
    with a traceback): the hook keeps it silently; the sliding window raises it before its next batch, once; a
    script that returns meanwhile exits with the signal's status."""
    import weakref

    from utils.cli import exit_status
    from utils.errors import Interrupted, keep_swallowed_stop, raise_swallowed_stop

    monkeypatch.setattr(sys, "unraisablehook", keep_swallowed_stop)

    class Anything:
        pass

    def swallow_a_stop():
        thing = Anything()
        ref = weakref.ref(thing, lambda _: (_ for _ in ()).throw(Interrupted(15, "stopped by SIGTERM")))
        del thing
        assert ref() is None

    swallow_a_stop()
    assert "Traceback" not in capsys.readouterr().err
    predicted = []
    with pytest.raises(Interrupted, match="SIGTERM"):
        sliding_window_inference(lambda x: predicted.append(x) or x.repeat(1, 2, 1, 1, 1), np.zeros((8, 8, 8)),
                                 (8, 8, 8), 4, 4, 2, "cpu")
    assert predicted == []
    raise_swallowed_stop()  # raised once only
    assert exit_status(lambda argv: swallow_a_stop(), []) == 128 + 15
    assert "stopped by SIGTERM" in capsys.readouterr().err


def test_a_signal_note_without_a_file_descriptor_and_progress_bars_into_files(monkeypatch):
    """The stop handler's note never fails (pytest's captured stderr has no descriptor: the stop must go through);
    a progress bar updates as tqdm does on a terminal, once a minute into a file or a pipe."""
    import io

    from utils.cli import bar_interval
    from utils.run import signal_note

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    signal_note("SIGINT: stopping\n")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert (bar_interval(Terminal()), bar_interval(io.StringIO()), bar_interval(object())) == (0.1, 60.0, 60.0)


def test_a_long_cpu_run_says_how_long_it_will_take_and_what_to_run_instead(synthetic_root, tmp_path, monkeypatch):
    from conftest import run_main
    from utils import run

    monkeypatch.setattr(run, "CPU_NOTE_HOURS", 0.0)
    proc = run_main("train_supervised_3D.py", "--root_path", synthetic_root, "--output_root", tmp_path, "--labelnum",
                    "4", "--max_iterations", "3", "--patch_size", "32", "32", "16", "--n_filters", "4", "--no_eval",
                    "--progress", "0", "--num_workers", "0", check=True)
    notes = [line for line in proc.stdout.splitlines() if "s per iteration on this CPU" in line]
    assert len(notes) == 1 and "for the 1 iterations left" in notes[0] and "QUICK=1 bash reproduce.sh" in notes[0]
    monkeypatch.setattr(run, "CPU_NOTE_HOURS", 3.0)
    proc = run_main("train_supervised_3D.py", "--root_path", synthetic_root, "--output_root", tmp_path / "short",
                    "--labelnum", "4", "--max_iterations", "3", "--patch_size", "32", "32", "16", "--n_filters", "4",
                    "--no_eval", "--progress", "0", "--num_workers", "0", check=True)
    assert "per iteration on this CPU" not in proc.stdout
