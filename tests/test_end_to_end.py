"""The supervised baseline end to end: train, evaluate, test_3D, resume, from any directory."""
import json
import math

import pytest
import torch

from conftest import (CUDA_ABSENT, REAL_LA, REAL_LA_ABSENT, REPO_ROOT, TINY, assert_same_models, load_saved,
                      read_summary, run_main, run_script, straight_and_resumed)
from dataloaders.la_heart import read_list

TRAIN = "train_supervised_3D.py"


def run_dir(output_root, labelnum, exp="synthetic_LA/Supervised"):
    return output_root / f"{exp}_{labelnum}" / "vnet"


@pytest.mark.parametrize("cwd_name", ["repo_root", "elsewhere"])
def test_train_then_test_3d_reproduces_the_evaluation(synthetic_root, tmp_path, cwd_name, device):
    cwd = REPO_ROOT if cwd_name == "repo_root" else tmp_path
    out = tmp_path / "model"
    trained = run_script(TRAIN, "--root_path", synthetic_root, "--output_root", out, "--labelnum", "4",
                         "--max_iterations", "2", *TINY, cwd=cwd, device=device)
    run = run_dir(out, 4)
    assert "Namespace(" not in trained.stdout + trained.stderr  # the settings go to log.txt, not the console
    assert {"config.json", "log.txt", "latest.pth", "iter_2.pth", "eval_iter_2", "log"} <= {
        p.name for p in run.iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["script"] == "train_supervised_3D" and config["args"]["labelnum"] == 4
    assert config["device"].startswith(device)
    assert {"torch", "numpy"} <= set(config["versions"]) and "commit" in config["git"]
    log = (run / "log.txt").read_text()
    assert "iteration 2 : loss : " in log and "loss_ce: " in log and "test (eval_iter_2)" in log and "Namespace(" in log

    proc = run_script("test_3D.py", "--run", run, "--progress", "0", cwd=cwd, device=device)
    assert "Dice" in proc.stdout
    trained, tested = read_summary(run / "eval_iter_2"), read_summary(run / "eval_iter_2_2")
    for metric in ("dice", "jaccard", "hd95", "asd"):
        assert tested[metric] == trained[metric]
    assert (run / "eval_iter_2" / "metrics.csv").read_text() == (run / "eval_iter_2_2" / "metrics.csv").read_text()
    assert tested["num_cases"] == 2 and tested["protocol"]["stride_xy"] == 16


def test_test_3d_options_write_new_folders(synthetic_root, tmp_path):
    out = tmp_path / "model"
    run_main(TRAIN, "--root_path", synthetic_root, "--output_root", out, "--labelnum", "4",
             "--max_iterations", "2", "--no_eval", *TINY, check=True)
    run = run_dir(out, 4)
    case = read_list(synthetic_root / "test.list")[0]
    run_main("test_3D.py", "--run", run, "--nms", "1", "--save_nii", "--cases", case, "--progress", "0",
             "--checkpoint", "latest.pth", check=True)
    eval_dir = run / "eval_latest_nms"
    summary = read_summary(eval_dir)
    assert summary["num_cases"] == 1 and summary["protocol"]["nms"] is True
    assert {f"{case}_pred.nii.gz", f"{case}_img.nii.gz", f"{case}_gt.nii.gz"} <= {p.name for p in eval_dir.iterdir()}
    import nibabel as nib
    assert nib.load(str(eval_dir / f"{case}_pred.nii.gz")).shape == nib.load(str(eval_dir / f"{case}_gt.nii.gz")).shape


def test_killed_run_resumes_to_the_same_weights(synthetic_root, tmp_path, device):
    common = ["--root_path", synthetic_root, "--labelnum", "4", "--max_iterations", "12", "--save_interval", "4",
              "--no_eval", *TINY]
    straight, resumed, latest, stopped_at = straight_and_resumed(
        TRAIN, common, "synthetic_LA/Supervised_4/vnet", 12, tmp_path, device, resume_args=["--num_workers", "2"])
    assert_same_models(straight, resumed, device)
    assert f"resumed from {latest} at iteration {stopped_at}" in (latest.parent / "log.txt").read_text()


def test_resume_refuses_changed_settings(synthetic_root, tmp_path):
    common = ["--root_path", synthetic_root, "--labelnum", "4", "--output_root", tmp_path, "--no_eval", *TINY]
    run_main(TRAIN, *common, "--max_iterations", "2", check=True)
    proc = run_main(TRAIN, *common, "--max_iterations", "3", "--resume")
    assert proc.returncode == 2 and "--max_iterations 2 -> 3" in proc.stderr


def test_overwrite_keeps_the_old_run(synthetic_root, tmp_path):
    common = ["--root_path", synthetic_root, "--labelnum", "4", "--output_root", tmp_path, "--no_eval",
              "--max_iterations", "1", *TINY]
    run_main(TRAIN, *common, check=True)
    run_main(TRAIN, *common, "--overwrite", check=True)
    siblings = [p.name for p in run_dir(tmp_path, 4).parent.iterdir()]
    assert "vnet" in siblings and any(name.startswith("vnet.old-") for name in siblings)


# every script, with the flags its two tiny iterations need (1 labelled + 1 unlabelled crop, UC-Seg mixing)
SCRIPT_FLAGS = {"train_supervised_3D.py": [], "train_mt_3D.py": ["--labeled_bs", "1"],
                "train_uamt_3D.py": ["--labeled_bs", "1", "--mc_samples", "2"],
                "train_dtc_3D.py": ["--labeled_bs", "1"], "train_cps_3D.py": ["--labeled_bs", "1"],
                "train_ugmcl_3D.py": ["--labeled_bs", "1", "--mc_samples", "2"],
                "train_ucseg_3D.py": ["--labeled_bs", "1", "--mix_start", "1"],
                "train_ugpl_3D.py": ["--labeled_bs", "1"]}


STEP_FLAGS = {"cpu": ["--channels_last"], "cuda": ["--channels_last", "--amp"]}


@pytest.mark.parametrize("script", sorted(SCRIPT_FLAGS))
def test_step_flags_train_and_evaluate(script, synthetic_root, tmp_path, device):
    """The step flags (``--channels_last`` anywhere, ``--amp``, bf16 autocast, on CUDA): every method trains (a
    non-finite loss would stop it), saves its weights and is evaluated."""
    check_step_flags(script, STEP_FLAGS[device], synthetic_root, tmp_path, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_ABSENT)
def test_compile_trains_and_evaluates_on_cuda(synthetic_root, tmp_path):
    """``--compile`` (CUDA only; compiling takes a minute, so only the labelled-only V-Net here): the weights keep
    their usual keys."""
    check_step_flags(TRAIN, ["--compile", "--amp"], synthetic_root, tmp_path, "cuda")


def check_step_flags(script, flags, synthetic_root, tmp_path, device):
    """Train ``script`` for 2 iterations with ``flags`` and evaluate it; the flags are recorded, the weights keep
    their usual keys (``nn.Module.compile`` adds no ``_orig_mod.``) and the evaluation is finite."""
    out = tmp_path / "model"
    run_main(script, "--root_path", synthetic_root, "--output_root", out, "--labelnum", "4", "--max_iterations", "2",
             *flags, *SCRIPT_FLAGS[script], *TINY, device=device, check=True)
    run = next(out.glob("synthetic_LA/*/*/config.json")).parent
    config = json.loads((run / "config.json").read_text())
    assert all(config["args"][flag[2:]] is True for flag in flags)
    assert config["device"].startswith(device)
    assert "iteration 2 : loss : " in (run / "log.txt").read_text()
    assert not any("_orig_mod" in key for weights in load_saved(run / "iter_2.pth")["models"].values()
                   for key in weights)
    summary = read_summary(next(run.glob("eval_iter_2*")))
    assert summary["num_cases"] == 2 and math.isfinite(summary["dice"]["mean"])


@pytest.mark.skipif(REAL_LA is None, reason=REAL_LA_ABSENT)
def test_real_la_small_patch(tmp_path):
    out = tmp_path / "model"
    run_script(TRAIN, "--root_path", REAL_LA, "--output_root", out, "--labelnum", "4", "--max_iterations", "2",
               "--patch_size", "64", "64", "32", "--batch_size", "2", "--num_workers", "0", "--progress", "0",
               "--no_eval", cwd=tmp_path)
    run = run_dir(out, 4, exp="LA/Supervised")
    cases = read_list(REAL_LA / "test.list")[:2]
    run_script("test_3D.py", "--run", run, "--cases", *cases, "--stride_xy", "64", "--stride_z", "32",
               "--progress", "0", cwd=tmp_path)
    summary = read_summary(run / "eval_iter_2")
    assert summary["num_cases"] == 2 and 0.0 <= summary["dice"]["mean"] <= 1.0
