"""reproduce.sh in its synthetic quick path: every method trains and is evaluated, the table and the figures
are written; a second call skips what exists, reports a failed run, goes on, and exits non-zero."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

METHOD_NAMES = ("Supervised V-Net", "Mean teacher", "UA-MT", "DTC", "CPS", "UG-MCL", "UC-Seg", "UGPL",
                "V-Net (all labels)")


def reproduce(tmp_path, **env):
    """``bash reproduce.sh`` without data (the synthetic quick path), tiny (networks of width 4) and writing only
    under tmp_path."""
    settings = {"DATA_ROOT": str(tmp_path / "no_data"), "SYNTHETIC_ROOT": str(tmp_path / "synthetic"),
                "SYNTHETIC_SHAPE": "48 48 32", "QUICK_PATCH": "32 32 16", "QUICK_ITERATIONS": "2", "QUICK_WIDTH": "4",
                "OUTPUT_ROOT": str(tmp_path / "runs"), "DEVICE": "cpu", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(REPO_ROOT / "reproduce.sh")], cwd=tmp_path, capture_output=True,
                          encoding="utf-8", errors="replace", env={**os.environ, **settings}, timeout=1200)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reproduce")
    return tmp_path, reproduce(tmp_path)


def test_quick_path_trains_evaluates_and_tabulates_every_method(quick):
    tmp_path, proc = quick
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "No dataset at" in proc.stdout and "FAILED" not in proc.stdout
    assert "== [1/9] no estimate of the time left yet" in proc.stdout and "== [9/9] " in proc.stdout
    runs = tmp_path / "runs" / "quickstart_synthetic_seed1337"
    evaluated = sorted(p.parents[2].name for p in runs.glob("*/*/eval_iter_2*/summary.json"))
    assert evaluated == sorted(["Supervised_4", "MT_4", "UAMT_4", "DTC_4", "CPS_4", "UGMCL_4", "UCSeg_4", "UGPL_4",
                                "Supervised_16"])
    table = (tmp_path / "runs" / "results.md").read_text(encoding="utf-8")
    results, paired = table.split("## Paired comparison with the labelled-only V-Net")
    rows = [line for line in results.splitlines() if line.startswith("| quickstart_synthetic |")]
    assert sorted(row.split(" | ")[1] for row in rows) == sorted(METHOD_NAMES)
    assert all("failed" not in row and "1 of 1" in row for row in rows)
    compared = [line.split(" | ")[1] for line in paired.splitlines() if line.startswith("| quickstart_synthetic |")]
    assert sorted(compared) == sorted(set(METHOD_NAMES) - {"Supervised V-Net"})
    assert "the numbers mean nothing" in table
    figures = {p.name for p in (tmp_path / "runs" / "figures").glob("*.png")}
    assert "dice_vs_labelled_quickstart_synthetic.png" in figures
    assert sum(name.startswith("curves_") for name in figures) == 9
    assert "paired_quickstart_synthetic_4.png" in figures
    assert any(name.startswith("overlay_") for name in figures)


def test_second_call_skips_finished_runs_and_reports_a_failure_without_stopping(quick):
    """A second call skips what exists; a run that fails (its evaluation here) is reported while the others go
    on, and the call exits 1; an unknown method stops the call in one line before anything runs."""
    tmp_path, _ = quick
    proc = reproduce(tmp_path, METHODS="supervised nosuch mt", PLOTS="0")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: unknown method 'nosuch': there is no code/train_nosuch_3D.py (known: "
                                        "cps dtc mt supervised uamt ucseg ugmcl ugpl)"]
    proc = reproduce(tmp_path, METHODS="supervised mt", LABELNUMS="4 99", PLOTS="0")  # 99 labels: refused
    assert proc.returncode == 1
    out = proc.stdout
    assert out.rstrip().endswith("FAILED: supervised/99/1337 mt/99/1337"), out[-2000:]
    assert out.count("trained already") == 3 and out.count("evaluated already") == 3


def test_a_run_whose_own_evaluation_was_lost_is_evaluated_again_whatever_else_it_holds(quick, tmp_path):
    """Only evaluations that are not the run's result are left (one case, another network): reproduce.sh
    evaluates the run again instead of taking their folders as done, and the table shows the new result."""
    source, _ = quick
    run = tmp_path / "runs" / "quickstart_synthetic_seed1337" / "MT_4" / "vnet"
    shutil.copytree(source / "runs" / "quickstart_synthetic_seed1337" / "MT_4" / "vnet", run)
    (run / "eval_iter_2").rename(run / "eval_iter_2_ema_model")
    summary = json.loads((run / "eval_iter_2_ema_model" / "summary.json").read_text())
    summary["provenance"]["network"] = "ema_model"
    (run / "eval_iter_2_ema_model" / "summary.json").write_text(json.dumps(summary))
    test_3d = subprocess.run([sys.executable, str(REPO_ROOT / "code" / "test_3D.py"), "--run", str(run), "--cases",
                              summary["provenance"]["cases"][0], "--progress", "0"], capture_output=True,
                             encoding="utf-8", timeout=600)
    assert "note: kept apart from the run's result in tables" in test_3d.stdout, test_3d.stdout + test_3d.stderr
    proc = reproduce(tmp_path, METHODS="mt", UPPER_BOUND="0", PLOTS="0",
                     SYNTHETIC_ROOT=str(source / "synthetic"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "trained already" in proc.stdout and "evaluated already" not in proc.stdout
    assert "the run's result in tables (eval_iter_2_2)" in proc.stdout  # eval_iter_2: the one case
    table = (tmp_path / "runs" / "results.md").read_text(encoding="utf-8")
    assert "`quickstart_synthetic_seed1337/MT_4/vnet/eval_iter_2_ema_model`: not in the table (network ema_model" \
        in table
    row = next(line for line in table.splitlines() if line.startswith("| quickstart_synthetic | Mean teacher"))
    assert "1 of 1" in row and "failed" not in row


def test_a_finished_run_made_with_other_settings_is_reported_not_reused(quick):
    tmp_path, _ = quick
    proc = reproduce(tmp_path, METHODS="supervised", UPPER_BOUND="0", PLOTS="0", EXTRA_ARGS="--base_lr 0.02")
    assert proc.returncode == 1
    assert "trained with other settings: --base_lr 0.01 -> 0.02" in proc.stdout + proc.stderr
    assert "trained already" not in proc.stdout and proc.stdout.rstrip().endswith("FAILED: supervised/4/1337")


def first_tables(tmp_path, output="runs"):
    """The rows of the results table and of the paired comparison (everything but the header note)."""
    text = (tmp_path / output / "results.md").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.startswith("| quickstart_synthetic |")]


def test_jobs_run_in_parallel_and_give_the_sequential_table(quick, tmp_path):
    """The labelled-only run and the upper bound, two at a time: their rows are the sequential call's, case for
    case."""
    sequential, _ = quick
    proc = reproduce(tmp_path, JOBS="2", PLOTS="0", METHODS="supervised")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count(": started") == 2 and proc.stdout.count(": done") == 2
    assert "[2/2] supervised 16 1337: started" in proc.stdout
    logs = sorted(p.name for p in (tmp_path / "runs" / "logs").iterdir())
    assert logs == ["supervised_16_seed1337.log", "supervised_4_seed1337.log"]
    ours = first_tables(tmp_path)
    assert len(ours) == 3  # two rows; the all-labels run's paired comparison
    assert set(ours) <= set(first_tables(sequential))
    workers = {json.loads(config.read_text())["args"]["num_workers"]
               for config in (tmp_path / "runs").glob("*/*/*/config.json")}
    assert workers == {max(2, len(os.sched_getaffinity(0)) // 2 - 1)}


def test_print_jobs_lists_a_command_per_run_that_runs_it_alone(quick):
    tmp_path, _ = quick
    proc = reproduce(tmp_path, PRINT_JOBS="1")
    assert proc.returncode == 0
    commands = [line for line in proc.stdout.splitlines() if line.startswith("env ")]
    assert len(commands) == 9 and all("SUMMARY=0" in line and "UPPER_BOUND=0" in line for line in commands)
    assert "METHODS=supervised LABELNUMS=16 SEEDS=1337" in commands[-1]
    table = (tmp_path / "runs" / "results.md").stat().st_mtime_ns
    job = subprocess.run(commands[1], shell=True, cwd=tmp_path, capture_output=True, encoding="utf-8", timeout=600)
    assert job.returncode == 0, job.stdout + job.stderr
    assert "== mt, 4 labels, seed 1337: trained already" in job.stdout and "evaluated already" in job.stdout
    assert (tmp_path / "runs" / "results.md").stat().st_mtime_ns == table  # SUMMARY=0 writes no table


def test_jobs_must_be_a_positive_number(tmp_path):
    proc = reproduce(tmp_path, JOBS="0")
    assert proc.returncode == 2 and "JOBS must be a positive whole number" in proc.stderr


def test_labelled_draws_and_validation_selection(tmp_path):
    """LABEL_SEEDS: every method on each draw of the labelled cases (the same draw for all), compared with the
    labelled-only run of its draw, the two spreads apart; VAL_NUM: cases held out and validated, the weights best
    on validation evaluated beside the final ones; PRINT_JOBS names the draw of each command."""
    proc = reproduce(tmp_path, METHODS="supervised mt", LABEL_SEEDS="1 2", VAL_NUM="2", PLOTS="0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = tmp_path / "runs"
    configs = {path.parent.relative_to(runs).parts[0] + "/" + path.parent.parent.name:
               json.loads(path.read_text()) for path in runs.glob("*/*/*/config.json")}
    assert sorted(configs) == ["quickstart_synthetic_draw1_seed1337/MT_4", "quickstart_synthetic_draw1_seed1337/"
                               "Supervised_4", "quickstart_synthetic_draw2_seed1337/MT_4",
                               "quickstart_synthetic_draw2_seed1337/Supervised_4",
                               "quickstart_synthetic_seed1337/Supervised_14"]
    for draw in (1, 2):
        supervised, mt = (configs[f"quickstart_synthetic_draw{draw}_seed1337/{exp}_4"] for exp in ("Supervised", "MT"))
        assert supervised["labelled_cases"] == mt["labelled_cases"] and mt["args"]["label_seed"] == draw
        assert len(mt["validation_cases"]) == 2 and not set(mt["validation_cases"]) & set(mt["training_cases"])
    assert configs["quickstart_synthetic_draw1_seed1337/MT_4"]["labelled_cases"] != \
        configs["quickstart_synthetic_draw2_seed1337/MT_4"]["labelled_cases"]
    assert len(list(runs.glob("*/*/*/eval_best_val/summary.json"))) == 5
    table = (runs / "results.md").read_text(encoding="utf-8")
    assert "## Spread over labelled subsets" in table and "## Weights selected on validation" in table
    paired = table.split("## Paired comparison with the labelled-only V-Net")[1]
    compared = sorted(line.split(" | ")[1:3] for line in paired.splitlines() if line.startswith("| quickstart"))
    assert compared == [["Mean teacher (labelled draw 1)", "4"], ["Mean teacher (labelled draw 2)", "4"],
                        ["V-Net (all labels)", "14 vs 4"], ["V-Net (all labels)", "14 vs 4"]]
    listed = [line for line in reproduce(tmp_path, METHODS="mt", LABEL_SEEDS="1 2", VAL_NUM="2",
                                         PRINT_JOBS="1").stdout.splitlines() if line.startswith("env ")]
    assert [("LABEL_SEEDS=1" in line, "LABEL_SEEDS=2" in line) for line in listed] == [(True, False), (False, True)]


def quick_la(tmp_path, **env):
    """``QUICK=1 bash reproduce.sh`` on a stand-in for LA whose half-resolution copy already exists (so nothing
    is resampled): 10 training cases."""
    for folder in ("LA", "LA_half"):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "train.list").write_text("".join(f"case{i}\n" for i in range(10)))
    (tmp_path / "LA_half" / "resample.json").write_text("{}")
    settings = {"DATA_ROOT": str(tmp_path / "LA"), "HALF_ROOT": str(tmp_path / "LA_half"), "QUICK": "1",
                "DEVICE": "cpu", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(REPO_ROOT / "reproduce.sh")], cwd=tmp_path, capture_output=True,
                          encoding="utf-8", errors="replace", env={**os.environ, **settings}, timeout=300)


def test_the_cpu_protocol_runs_every_method_with_its_control_for_three_seeds(tmp_path):
    """QUICK=1's table: 4 labels, per seed (1337, 2024, 42) the labelled-only V-Net, each semi-supervised method
    followed by its matched control, and the all-labels V-Net."""
    proc = quick_la(tmp_path, PRINT_JOBS="1")
    assert proc.returncode == 0, proc.stderr
    jobs = [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in proc.stdout.splitlines()]
    methods = ["supervised"] + [f"{m}{suffix}" for m in ("mt", "uamt", "dtc", "cps", "ugmcl", "ucseg", "ugpl")
                                for suffix in ("", "_control")]
    expected = [(method, "4", seed) for seed in ("1337", "2024", "42")
                for method in methods + ["supervised"]]
    assert [(j["METHODS"], j["LABELNUMS"], j["SEEDS"]) for j in jobs] == [
        (m, "10" if i % 16 == 15 else n, s) for i, (m, n, s) in enumerate(expected)]
    assert all(j["CONTROLS"] == "0" and j["UPPER_BOUND"] == "0" for j in jobs)


def test_another_output_root_keeps_the_committed_table_and_a_control_needs_a_method(tmp_path):
    """With its own OUTPUT_ROOT, a QUICK=1 call writes its table beside its runs, not over docs/results_quick.md;
    the labelled-only V-Net has no control, which stops the call in one line before anything runs."""
    proc = quick_la(tmp_path, OUTPUT_ROOT=str(tmp_path / "probe"), METHODS="mt", PRINT_JOBS="1")
    assert proc.returncode == 0 and "mt_control" in proc.stdout
    proc = quick_la(tmp_path, OUTPUT_ROOT=str(tmp_path / "probe"), METHODS="supervised_control", PLOTS="0")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: METHODS names supervised_control, but code/train_supervised_3D.py "
                                        "has no matched control (--labelled_only)"]
    proc = quick_la(tmp_path, OUTPUT_ROOT=str(tmp_path / "probe"), METHODS="mt", CONTROLS="0", PLOTS="0")
    assert proc.returncode == 1  # the stand-in LA holds no volumes: the run fails, the call goes on to the table
    assert f"2 at a time; table {tmp_path / 'probe' / 'results.md'}\n" in proc.stdout
    assert "results_quick.md" not in proc.stdout


def test_the_upper_bound_counts_a_windows_edited_list_as_the_scripts_read_it(tmp_path):
    """A train.list saved on Windows (CRLF line ends, lines of spaces, a last line without its end) holds as many
    cases for reproduce.sh's all-labels run as the scripts read from it; a list they refuse stops it in one line."""
    from dataloaders.h5_dataset import read_list

    data = tmp_path / "synthetic"
    data.mkdir()
    (data / "train.list").write_bytes(b"case0\r\n  \r\ncase1 \r\n\r\n\t\r\ncase2\r\ncase3\r\ncase4\r\ncase5")
    proc = reproduce(tmp_path, METHODS="supervised", PRINT_JOBS="1")
    assert proc.returncode == 0, proc.stderr
    jobs = [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in proc.stdout.splitlines()
            if line.startswith("env ")]
    assert [job["LABELNUMS"] for job in jobs] == ["4", "6"] and len(read_list(data / "train.list")) == 6
    (data / "train.list").write_bytes(b"case0\r\ncaf\xe9\r\n")
    proc = reproduce(tmp_path, METHODS="supervised", PRINT_JOBS="1")
    assert proc.returncode == 2 and "env " not in proc.stdout
    assert proc.stderr.strip().splitlines() == [f"error: split list {data / 'train.list'} is not UTF-8 text (byte "
                                                 "0xe9 at offset 10); save it as UTF-8, one case id per line"]


def test_help_prints_the_usage_and_trains_nothing(tmp_path):
    proc = subprocess.run(["bash", str(REPO_ROOT / "reproduce.sh"), "--help"], cwd=tmp_path, capture_output=True,
                          encoding="utf-8", timeout=60, env={**os.environ, "OUTPUT_ROOT": str(tmp_path / "runs")})
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("Train and evaluate every method") and "Environment: DATA_ROOT" in proc.stdout
    assert "#" not in proc.stdout.splitlines()[0] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, env, message", [
    (["-x"], {}, "reproduce.sh takes no arguments, its settings are environment variables"),
    ([], {"LABELNUM": "4"}, "LABELNUM is not a setting of reproduce.sh; did you mean LABELNUMS?"),
    ([], {"METHOD": "mt"}, "METHOD is not a setting of reproduce.sh; did you mean METHODS?"),
    ([], {"SEED": "1"}, "did you mean SEEDS?"),
    ([], {"OUTPUT_DIR": "x"}, "did you mean OUTPUT_ROOT?"),
    ([], {"quick": "1"}, "did you mean QUICK?"),
])
def test_unknown_arguments_and_misspelled_settings_stop_before_anything_runs(tmp_path, argv, env, message):
    settings = {**os.environ, "OUTPUT_ROOT": str(tmp_path / "runs"), "DATA_ROOT": str(tmp_path / "no_data"), **env}
    proc = subprocess.run(["bash", str(REPO_ROOT / "reproduce.sh"), *argv], cwd=tmp_path, capture_output=True,
                          encoding="utf-8", timeout=60, env=settings)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "no_data").exists()


def copy_of_the_project(tmp_path):
    """The scripts (code/ and reproduce.sh) copied to tmp_path, so that a test may add a method script."""
    root = tmp_path / "project"
    shutil.copytree(REPO_ROOT / "code", root / "code", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "reproduce.sh", root)
    return root


def test_a_copied_method_script_runs_through_reproduce_sh_with_its_control_and_reaches_the_table(tmp_path):
    """README "Try an idea": copy a script, give its runs a name, change the idea; reproduce.sh reads its protocol
    from it (no array to edit), shrinks its schedule like mt's, trains it and its control, and the table shows it
    with its gain over its own control; paired.py compares it with the method it changes."""
    root = copy_of_the_project(tmp_path)
    script = (root / "code" / "train_mt_3D.py").read_text(encoding="utf-8")
    assert 'exp="MT"' in script and "consistency=0.1," in script
    (root / "code" / "train_mymt_3D.py").write_text(
        script.replace('exp="MT"', 'exp="MyMT"').replace("consistency=0.1,", "consistency=1.0,"), encoding="utf-8")
    protocol = subprocess.run([sys.executable, str(root / "code" / "train_mymt_3D.py"), "--print_protocol"],
                              capture_output=True, encoding="utf-8", timeout=120)
    assert protocol.returncode == 0 and protocol.stdout.splitlines()[:2] == ["exp MyMT", "model vnet"]
    settings = {"DATA_ROOT": str(tmp_path / "no_data"), "SYNTHETIC_ROOT": str(tmp_path / "synthetic"),
                "SYNTHETIC_SHAPE": "48 48 32", "QUICK_PATCH": "32 32 16", "QUICK_ITERATIONS": "2", "QUICK_WIDTH": "4",
                "OUTPUT_ROOT": str(tmp_path / "runs"), "DEVICE": "cpu", "PLOTS": "0", "UPPER_BOUND": "0",
                "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(root / "reproduce.sh")], cwd=tmp_path, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=1200,
                          env={**os.environ, **settings, "METHODS": "supervised mt mymt mymt_control"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = tmp_path / "runs" / "quickstart_synthetic_seed1337"
    mt, mymt = (json.loads((runs / f"{exp}_4" / "vnet" / "config.json").read_text(encoding="utf-8"))["args"]
                for exp in ("MT", "MyMT"))
    assert {key: value for key, value in mymt.items() if mt[key] != value} == {
        "exp": "quickstart_synthetic_seed1337/MyMT", "consistency": 1.0}
    assert mt["iterations_per_epoch"] == 0.05 and mt["lr_step"] == 1  # 150 and 2500 of 6000, shrunk to 2
    assert (runs / "MyMT_4" / "vnet" / "train_mymt_3D.py").read_text(encoding="utf-8") == (
        root / "code" / "train_mymt_3D.py").read_text(encoding="utf-8")
    table = (tmp_path / "runs" / "results.md").read_text(encoding="utf-8")
    assert "| train_mymt_3D | 4 |" in table and "| train_mymt_3D: own control | 4 |" in table
    paired = table[table.index("## Paired comparison"):]
    paired_row = next(line for line in paired.splitlines() if line.startswith("| quickstart_synthetic | train_mymt"))
    gain, per_seed = (cell.strip() for cell in paired_row.split("|")[-3:-1])
    assert gain not in ("", "–") and per_seed.startswith("1337: ")  # its gain over its own control: pooled, per seed
    compared = subprocess.run([sys.executable, str(root / "code" / "report" / "paired.py"),
                               str(runs / "MT_4" / "vnet" / "eval_iter_2"),
                               str(runs / "MyMT_4" / "vnet" / "eval_iter_2")],
                              capture_output=True, encoding="utf-8", timeout=120)
    assert compared.returncode == 0 and "Wilcoxon p" in compared.stdout


@pytest.mark.parametrize("change, message", [
    (lambda text: text, "methods mt and mymt both name their runs MT"),
    (lambda text: text.replace("def get_parser():", "def get_parser(:"), "code/train_mymt_3D.py cannot say its "
                                                                          "protocol: SyntaxError"),
    (lambda text: text.replace("def get_parser():", "def the_parser():"), "code/train_mymt_3D.py cannot say its "
                                                                          "protocol: AttributeError"),
])
def test_a_copied_script_that_cannot_say_its_protocol_stops_reproduce_sh_before_anything_runs(tmp_path, change,
                                                                                              message):
    root = copy_of_the_project(tmp_path)
    (root / "code" / "train_mymt_3D.py").write_text(change((root / "code" / "train_mt_3D.py").read_text()))
    settings = {"DATA_ROOT": str(tmp_path / "no_data"), "PYTHON": sys.executable, "METHODS": "mt mymt",
                "SYNTHETIC_ROOT": str(tmp_path / "synthetic"), "OUTPUT_ROOT": str(tmp_path / "runs")}
    proc = subprocess.run(["bash", str(root / "reproduce.sh")], cwd=tmp_path, capture_output=True, encoding="utf-8",
                          timeout=300, env={**os.environ, **settings})
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "synthetic").exists() and not (tmp_path / "runs").exists()
