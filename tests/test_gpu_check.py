"""The prepared GPU check (code/gpu_check.py), exercised on the CPU with --tiny: every step writes its table, a
protocol run the budget stops is saved and continued by the next call."""
import torch

from conftest import run_main, run_script
from gpu_check import FLAG_VARIANTS, flag_lines, step_lines, step_variants


def check(synthetic_root, tmp_path, *flags):
    return run_script("gpu_check.py", "--root_path", synthetic_root, "--device", "cpu", "--tiny",
                      "--output_root", tmp_path / "runs", "--out", tmp_path / "page.md", *flags)


def test_steps_write_their_tables(synthetic_root, tmp_path):
    check(synthetic_root, tmp_path, "--steps", "step", "loader", "--methods", "supervised", "dtc",
          "--iterations", "3", "--warmup", "1", "--loader_batches", "2")
    page = (tmp_path / "page.md").read_text(encoding="utf-8")
    assert "device: CPU" in page and "## Step and loader" in page and "## Full protocol" not in page
    rows = {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in page.splitlines()
                                          if line.startswith("| "))}
    for method in ("supervised", "dtc"):
        patch, seconds, amp, one_worker, auto_workers, ratio, needed = rows[method][1:8]
        assert patch == "32x32x16, 2" and float(seconds) > 0 and amp == "–"
        assert float(one_worker) > 0 and auto_workers.endswith("(2)") and float(ratio) > 0 and int(needed) >= 1
    assert "## Step flags" not in page


def test_the_flags_are_timed_on_cuda_and_tabulated():
    """On CUDA every method runs plain and with --amp, and the V-Net also with each step flag; the tables put
    each flag against the plain step and derive the workers needed from one worker's time."""
    cpu = step_variants(torch.device("cpu"), ["supervised", "dtc"])
    assert cpu == [("supervised", ()), ("dtc", ())]
    cuda = step_variants(torch.device("cuda"), ["supervised", "dtc"])
    assert cuda[:4] == [("supervised", ()), ("supervised", ("--amp",)), ("dtc", ()), ("dtc", ("--amp",))]
    assert cuda[4:] == [("supervised", flags) for flags in FLAG_VARIANTS]
    steps = [{"method": "supervised", "flags": [], "seconds": 0.1, "patch": [112, 112, 80], "batch_size": 4},
             {"method": "supervised", "flags": ["--amp"], "seconds": 0.05, "patch": [112, 112, 80], "batch_size": 4},
             {"method": "supervised", "flags": ["--amp", "--compile"], "seconds": 0.04}]
    assert flag_lines(steps)[2:] == ["| (none) | 0.100 | 1.00x |", "| --amp | 0.050 | 0.50x |",
                                     "| --amp --compile | 0.040 | 0.40x |"]
    loaders = [{"method": "supervised", "one_worker": 0.26, "workers": 8, "seconds": 0.04}]
    expected = "| supervised | 112x112x80, 4 | 0.100 | 0.050 | 0.260 | 0.040 (8) | 0.4 | 6 |"
    assert step_lines(steps, loaders)[2] == expected


def test_a_protocol_run_stopped_by_the_budget_is_continued_by_the_next_call(synthetic_root, tmp_path):
    check(synthetic_root, tmp_path, "--steps", "protocol", "--budget_minutes", "0.34")
    assert "stopped by the budget" in (tmp_path / "page.md").read_text(encoding="utf-8")
    stopped_before_config = tmp_path / "runs" / "LA" / "uamt_4" / "vnet"  # a stop that came before config.json
    stopped_before_config.mkdir(parents=True, exist_ok=True)
    (stopped_before_config / "log.txt").write_text("[00:00:00.000] started\n", encoding="utf-8")
    check(synthetic_root, tmp_path, "--steps", "protocol")
    rows = [line.split(" | ") for line in (tmp_path / "page.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| supervised") or line.startswith("| uamt")]
    assert len(rows) == 2 and all(0 <= float(row[2]) <= 100 for row in rows)
    assert "--max_iterations 4" in rows[0][-1]


def test_bad_settings_are_one_line(synthetic_root, tmp_path):
    proc = run_main("gpu_check.py", "--root_path", tmp_path, "--device", "cpu")
    assert proc.returncode == 2 and "no train.list" in proc.stderr and "Traceback" not in proc.stderr
