"""The prepared GPU check (code/gpu_check.py), exercised on the CPU with --tiny: every step writes its table, a
protocol run the budget stops is saved and continued by the next call."""
from conftest import run_script


def check(synthetic_root, tmp_path, *flags):
    return run_script("gpu_check.py", "--root_path", synthetic_root, "--device", "cpu", "--tiny",
                      "--output_root", tmp_path / "runs", "--out", tmp_path / "page.md", *flags)


def test_steps_write_their_tables(synthetic_root, tmp_path):
    check(synthetic_root, tmp_path, "--steps", "step", "loader", "--methods", "supervised", "dtc",
          "--iterations", "3", "--warmup", "1", "--loader_batches", "2")
    page = (tmp_path / "page.md").read_text(encoding="utf-8")
    assert "device: CPU" in page and "## Step and loader" in page and "## Full protocol" not in page
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in page.splitlines() if line.startswith("| ")}
    for method in ("supervised", "dtc"):
        patch, seconds, amp, loader = rows[method][1:5]
        assert patch == "32x32x16, 2" and float(seconds) > 0 and amp == "–" and float(loader.split()[0]) > 0


def test_a_protocol_run_stopped_by_the_budget_is_continued_by_the_next_call(synthetic_root, tmp_path):
    check(synthetic_root, tmp_path, "--steps", "protocol", "--budget_minutes", "0.34")
    assert "stopped by the budget" in (tmp_path / "page.md").read_text(encoding="utf-8")
    check(synthetic_root, tmp_path, "--steps", "protocol")
    rows = [line.split(" | ") for line in (tmp_path / "page.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| supervised") or line.startswith("| uamt")]
    assert len(rows) == 2 and all(0 <= float(row[2]) <= 100 for row in rows)
    assert "--max_iterations 4" in rows[0][-1]


def test_bad_settings_are_one_line(synthetic_root, tmp_path):
    proc = run_script("gpu_check.py", "--root_path", tmp_path, "--device", "cpu", check=False)
    assert proc.returncode == 2 and "no train.list" in proc.stderr and "Traceback" not in proc.stderr
