"""The table's gain over each method's own control, and the files that define a table: summarize.py copies them
(``--run_files``) and writes the same table from them alone, and the committed tables are what their committed run
files give."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, call_main, held_by_another_process
from report import summarize, wall_times
from report.wall_times import COST
from report.paired import compare

SUMMARIZE = REPO_ROOT / "code" / "report" / "summarize.py"
CASES = ("c1", "c2", "c3", "c4")
SEEDS = (1337, 2024)
ITERATIONS = 50
NUM_TRAIN = 12
# per-case Dice (%) of each run, by (exp, labelnum) and seed: the control of MT is better than the labelled-only
# V-Net on every case in both seeds, MT on c1-c3 in both seeds, and MT better than its control on c1 and c2
DICE = {("Supervised", 4): {1337: (60, 50, 40, 70), 2024: (62, 48, 41, 69)},
        ("Supervised", NUM_TRAIN): {1337: (80, 75, 70, 85), 2024: (81, 76, 69, 86)},
        ("MT", 4): {1337: (70, 62, 45, 69), 2024: (71, 60, 47, 70)},
        ("MT_control", 4): {1337: (65, 55, 46, 73), 2024: (66, 54, 45, 71)}}
SCRIPTS = {"Supervised": "train_supervised_3D", "MT": "train_mt_3D", "MT_control": "train_mt_3D"}


def make_run(model_dir, exp, labelnum, seed):
    """A finished, evaluated run at reproduce.sh's place, with its weights and log (which the run files leave
    out) and per-case metrics from :data:`DICE`."""
    run = model_dir / f"LA_half_quick_seed{seed}" / f"{exp}_{labelnum}" / "vnet"
    run.mkdir(parents=True)
    args = {"dataset": "LA", "root_path": "/nowhere/LA_half", "labelnum": labelnum,
            "exp": f"LA_half_quick_seed{seed}/{exp}", "model": "vnet", "seed": seed, "max_iterations": ITERATIONS,
            "nms": 0, "patch_size": [48, 48, 32], "stride_xy": 16, "stride_z": 8, "n_filters": 8,
            "labelled_only": int(exp.endswith("_control"))}
    config = {"script": SCRIPTS[exp], "args": args, "listed_training_cases": NUM_TRAIN}
    (run / "config.json").write_text(json.dumps(config))
    (run / f"iter_{ITERATIONS}.pth").write_bytes(b"weights")
    (run / "log.txt").write_text("[00:00:01.000] iteration 1 : loss : 0.5\n")
    folder = run / f"eval_iter_{ITERATIONS}"
    folder.mkdir()
    dice = [d / 100 for d in DICE[exp, labelnum][seed]]
    rows = [f"{case},{d},{d - 0.1},5.0,1.0,False,False" for case, d in zip(CASES, dice)]
    mean = sum(dice) / len(dice)
    (folder / "metrics.csv").write_text("case,dice,jaccard,hd95,asd,empty_pred,empty_gt\n" + "\n".join(rows)
                                        + f"\nmean,{mean},{mean - 0.1},5.0,1.0,,\nstd,0.1,0.1,0,0,,\n")
    summary = {key: {"mean": value, "std": 0.1, "n": 4} for key, value in
               (("dice", mean), ("jaccard", mean - 0.1), ("hd95", 5.0), ("asd", 1.0))}
    summary.update(num_cases=4, num_empty_pred=0, protocol={
        "patch_size": [48, 48, 32], "stride_xy": 16, "stride_z": 8, "nms": False, "units": "voxels",
        "checkpoint": f"iter_{ITERATIONS}.pth", "iteration": ITERATIONS, "split": "test"})
    (folder / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def model_dir(tmp_path):
    model = tmp_path / "model"
    for (exp, labelnum), by_seed in DICE.items():
        for seed in by_seed:
            make_run(model, exp, labelnum, seed)
    return model


def paired_rows(text):
    """``{method: {column: cell}}`` of the paired table."""
    section = text.split("## Paired comparison")[1]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return {cells["method"]: cells for cells in
            (dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:])}


def summarize_cli(*args, cwd):
    proc = subprocess.run([sys.executable, str(SUMMARIZE), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_each_method_is_compared_with_its_own_control(model_dir, tmp_path):
    out = tmp_path / "results.md"
    summarize_cli("--model_dir", model_dir, "--out", out, cwd=tmp_path)
    text = out.read_text(encoding="utf-8")
    assert re.search(r"^\| LA_half_quick \| Mean teacher: own control \| 4 \|", text, re.M)
    rows = paired_rows(text)
    assert set(rows) == {"Mean teacher", "Mean teacher: own control", "V-Net (all labels)"}
    # the table reads the fractions of metrics.csv back into %, as here
    gains = [100 * (a / 100) - 100 * (b / 100) for seed in SEEDS
             for a, b in zip(DICE["MT", 4][seed], DICE["MT_control", 4][seed])]
    stats = compare(gains)
    assert stats.median == pytest.approx(3.5)
    assert rows["Mean teacher"]["gain over its own control"] == (
        f"{stats.mean:+.2f} [{stats.low:+.2f}, {stats.high:+.2f}], p {stats.p_value:.2g}, median {stats.median:+.2f}")
    assert rows["Mean teacher: own control"]["gain over its own control"] == "–"
    per_seed = {seed: sum(a - b for a, b in zip(DICE["MT", 4][seed], DICE["MT_control", 4][seed])) / 4
                for seed in SEEDS}
    assert rows["Mean teacher"]["gain over its own control, per seed"] == ", ".join(
        f"{seed}: {per_seed[seed]:+.2f}" for seed in sorted(SEEDS))
    assert rows["Mean teacher: own control"]["gain over its own control, per seed"] == "–"
    # against the labelled-only V-Net: the control is better on every case in both seeds, MT on three of four
    assert rows["Mean teacher: own control"]["cases better in every seed"] == "4 of 4"
    assert rows["Mean teacher"]["cases better in every seed"] == "3 of 4"
    band = [a - b for seed in SEEDS for a, b in zip(DICE["Supervised", NUM_TRAIN][seed], DICE["Supervised", 4][seed])]
    assert rows["V-Net (all labels)"]["median (points)"] == f"{compare(band).median:+.2f}"


def test_the_run_files_alone_give_the_same_table(model_dir, tmp_path, monkeypatch):
    """``--run_files`` copies config.json and the evaluations' summary.json and metrics.csv (no weights, no logs)
    with the table's title, note and file; ``summarize.py --model_dir <run files>`` then writes the same document
    from them alone."""
    monkeypatch.setattr(summarize, "REPO_ROOT", tmp_path)
    files, out = tmp_path / "results" / "LA_half_quick", tmp_path / "docs" / "results_quick.md"
    summarize.main(["--model_dir", str(model_dir), "--run_files", str(files), "--out", str(out), "--title", "T",
                    "--note", "A note."])
    first = out.read_text(encoding="utf-8")
    assert first.startswith("# T\n\nA note.\n") and "from 8 runs under `results/LA_half_quick`" in first
    kept = sorted(str(p.relative_to(files)) for p in files.rglob("*") if p.is_file())
    assert kept == sorted(["table.json"] + [f"LA_half_quick_seed{seed}/{exp}_{labelnum}/vnet/{name}"
                                            for (exp, labelnum) in DICE for seed in SEEDS
                                            for name in ("config.json", f"eval_iter_{ITERATIONS}/metrics.csv",
                                                         f"eval_iter_{ITERATIONS}/summary.json")])
    out.unlink()
    summarize.main(["--model_dir", str(files)])
    assert out.read_text(encoding="utf-8") == first


def test_a_run_the_model_folder_lost_keeps_its_run_files_and_a_run_trained_again_replaces_them(
        model_dir, tmp_path, monkeypatch, capsys):
    """A table that grows across machines: the next export keeps the committed files of a run whose folder the
    model folder no longer holds (and says so), takes a run the model folder holds from there, and drops a run only
    when its folder of run files is removed."""
    monkeypatch.setattr(summarize, "REPO_ROOT", tmp_path)
    files, out = tmp_path / "results" / "LA_half_quick", tmp_path / "docs" / "results_quick.md"
    summarize.main(["--model_dir", str(model_dir), "--run_files", str(files), "--out", str(out)])
    first = out.read_text(encoding="utf-8")
    lost = Path("LA_half_quick_seed2024") / "MT_control_4" / "vnet"
    shutil.rmtree(model_dir / lost.parent)
    retrained = model_dir / "LA_half_quick_seed2024" / "MT_4" / "vnet" / f"eval_iter_{ITERATIONS}" / "metrics.csv"
    retrained.write_text(retrained.read_text(encoding="utf-8").replace("0.71,", "0.91,"), encoding="utf-8")
    capsys.readouterr()
    summarize.main(["--model_dir", str(model_dir), "--run_files", str(files)])
    assert f"kept the run files of 1 run that {model_dir} does not hold: {lost.as_posix()}" in capsys.readouterr().out
    assert (files / lost / f"eval_iter_{ITERATIONS}" / "metrics.csv").is_file()
    assert (files / "LA_half_quick_seed2024" / "MT_4" / "vnet" / retrained.parent.name / "metrics.csv").read_text(
        encoding="utf-8") == retrained.read_text(encoding="utf-8")
    second = out.read_text(encoding="utf-8")
    assert "from 8 runs under" in second and second != first
    shutil.rmtree(files / lost.parent)
    summarize.main(["--model_dir", str(model_dir), "--run_files", str(files)])
    assert "from 7 runs under" in out.read_text(encoding="utf-8") and not (files / lost.parent).exists()


def test_the_run_files_keep_each_runs_cost_and_the_cost_document_comes_from_them(model_dir, tmp_path,
                                                                                  monkeypatch):
    """A run whose log says it finished gets a cost.json in its run files (the logs are not kept), and
    wall_times.py writes the same document from the run files as from the model folder, also once the model
    folder is gone."""
    monkeypatch.setattr(summarize, "REPO_ROOT", tmp_path)
    for unfinished in model_dir.rglob("log.txt"):
        unfinished.unlink()
    log = model_dir / "LA_half_quick_seed1337" / "MT_4" / "vnet" / "log.txt"
    log.write_text("[10:00:00.000] Namespace(dataset='LA')\n" + "".join(
        f"[10:00:{2 * i:02d}.000] iteration {i} : loss : 0.5\n" for i in range(1, 6))
        + "[10:01:00.000] training finished at iteration 50; weights in x\n", encoding="utf-8")
    files = tmp_path / "files"
    summarize.main(["--model_dir", str(model_dir), "--run_files", str(files), "--out", str(tmp_path / "t.md")])
    assert sorted(p.parent.relative_to(files).as_posix() for p in files.rglob(COST)) == [
        "LA_half_quick_seed1337/MT_4/vnet"]
    from_logs = call_main(wall_times.main, model_dir, check=True).stdout
    shutil.rmtree(model_dir)
    assert call_main(wall_times.main, files, check=True).stdout == from_logs
    assert "| LA_half_quick_seed1337/MT_4/vnet | 50 | 2.00 | 0.03 |" in from_logs


@pytest.mark.parametrize("state", ["training", "stopped"])
def test_run_files_kept_while_a_run_is_unfinished_leave_it_out_and_say_so(model_dir, tmp_path, monkeypatch, state):
    """A table committed mid-protocol: the run that a live process trains, or that a signal stopped before its
    final weights (latest.pth kept, to be resumed in a later session), has no numbers yet, so its files are not
    kept (they would read as a failed run), and the document names it, also when rebuilt from the files."""
    monkeypatch.setattr(summarize, "REPO_ROOT", tmp_path)
    unfinished = model_dir / "LA_half_quick_seed2024" / "MT_control_4" / "vnet"
    shutil.rmtree(unfinished / f"eval_iter_{ITERATIONS}")
    files, out = tmp_path / "results" / "LA_half_quick", tmp_path / "docs" / "results_quick.md"
    arguments = ["--model_dir", str(model_dir), "--run_files", str(files), "--out", str(out)]
    if state == "training":
        with held_by_another_process(unfinished):
            summarize.main(arguments)
    else:
        (unfinished / f"iter_{ITERATIONS}.pth").rename(unfinished / "latest.pth")
        summarize.main(arguments)
    first = out.read_text(encoding="utf-8")
    assert not (files / "LA_half_quick_seed2024" / "MT_control_4").exists()
    assert "from 7 runs under `results/LA_half_quick`. Left out: 1 run unfinished (training, or stopped to be " \
           "resumed) when these run files were kept (`LA_half_quick_seed2024/MT_control_4/vnet`)." in first
    assert "failed" not in first
    out.unlink()
    summarize.main(["--model_dir", str(files)])
    assert out.read_text(encoding="utf-8") == first


COMMITTED_RUN_FILES = sorted(path.parent for path in (REPO_ROOT / "results").rglob("table.json"))


@pytest.mark.parametrize("run_files", COMMITTED_RUN_FILES, ids=lambda path: path.name)
def test_committed_run_files_give_the_committed_table(run_files, tmp_path):
    """Every committed folder of run files (results/<protocol>/, results/probes/<probe>/) gives, through
    summarize.py alone, exactly the committed table it names."""
    table = json.loads((run_files / "table.json").read_text(encoding="utf-8"))
    out = tmp_path / "table.md"
    summarize_cli("--model_dir", run_files.relative_to(REPO_ROOT), "--out", out, cwd=REPO_ROOT)
    assert out.read_text(encoding="utf-8") == (REPO_ROOT / table["out"]).read_text(encoding="utf-8")


MACHINE_CHECKS = sorted((REPO_ROOT / "results" / "probes").glob("machine_check*"))


@pytest.mark.parametrize("probe", MACHINE_CHECKS, ids=lambda path: path.name)
def test_each_new_machine_reproduces_a_run_of_the_first(probe):
    """results/probes/machine_check*/ each hold the labelled-only V-Net at seed 2024 retrained on a machine the
    project moved to, later and from a later commit than the run of the CPU table trained on the first machine:
    same arguments but its output folder, and per-case metrics equal byte for byte (docs/cpu_protocol.md, "The
    table so far")."""
    run = Path("LA_half_quick_seed2024") / "Supervised_4" / "vnet"
    old, new = REPO_ROOT / "results" / "LA_half_quick" / run, probe / run
    configs = [json.loads((folder / "config.json").read_text(encoding="utf-8")) for folder in (old, new)]
    assert configs[0]["started"] < configs[1]["started"]
    assert configs[0]["git"]["commit"] != configs[1]["git"]["commit"]
    arguments = [{k: v for k, v in c["args"].items() if k != "output_root"} for c in configs]
    assert arguments[0] == arguments[1]
    metrics = Path("eval_iter_3375") / "metrics.csv"
    assert (old / metrics).read_bytes() == (new / metrics).read_bytes()


def test_the_machine_checks_are_found():
    """Both machine checks are committed (the parametrised test above would pass on none)."""
    assert [probe.name for probe in MACHINE_CHECKS] == ["machine_check", "machine_check_2026-12-07"]


def test_the_cpu_table_is_committed_with_its_run_files():
    """docs/results_quick.md, the table of QUICK=1, is one of the tables its committed run files give."""
    assert REPO_ROOT / "results" / "LA_half_quick" in COMMITTED_RUN_FILES
    table = json.loads((REPO_ROOT / "results" / "LA_half_quick" / "table.json").read_text(encoding="utf-8"))
    assert table["out"] == "docs/results_quick.md"


def test_the_prose_counts_the_runs_the_cpu_table_holds():
    """Every "N of (its, the) 48 runs" or "all 48 runs" that the README and docs/cpu_protocol.md (which must say it)
    and the table's own note (which says it while the table is partial) say of the CPU table names the runs the
    committed table was generated from (its "from N runs"), so a table that grows cannot leave its description
    behind."""
    table = (REPO_ROOT / "docs" / "results_quick.md").read_text(encoding="utf-8")
    generated = int(re.search(r"from (\d+) runs under `results/LA_half_quick`", table)[1])
    for doc, required in (("README.md", True), ("docs/cpu_protocol.md", True), ("docs/results_quick.md", False)):
        text = " ".join((REPO_ROOT / doc).read_text(encoding="utf-8").split())
        counts = [int(n or 48) for n in re.findall(r"\b(?:(\d+) of (?:its |the )?|all )48 runs", text)]
        assert counts or not required, f"{doc} does not say how many of the 48 runs the CPU table holds"
        assert set(counts) <= {generated}, (doc, counts, generated)


def test_the_result_figures_come_from_the_run_files_alone(model_dir, tmp_path, monkeypatch):
    """plots.py on a folder of run files writes the figures that need only evaluations (Dice against labelled
    cases, the strips against the labelled-only V-Net and against each method's own control), and leaves out the
    curves (no logs) and the overlay (no weights) with a line on stderr, not a traceback."""
    monkeypatch.setattr(summarize, "REPO_ROOT", tmp_path)
    files = tmp_path / "files"
    summarize.main(["--model_dir", str(model_dir), "--run_files", str(files), "--out", str(tmp_path / "t.md")])
    out = tmp_path / "figures"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "code" / "report" / "plots.py"), "--model_dir", str(files),
                           "--out", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.png")) == [
        "dice_vs_labelled_LA_half_quick.png", "paired_LA_half_quick_4.png", "paired_control_LA_half_quick_4.png"]
    assert "Traceback" not in proc.stderr and "overlay" in proc.stderr


def test_the_cpu_tables_cost_comes_from_its_run_files():
    """Every run row of docs/cost_quick.md is what wall_times.py reads from the committed run files
    (results/LA_half_quick: each run's cost.json), and every run of those files with a cost has its row."""
    committed = [line for line in (REPO_ROOT / "docs" / "cost_quick.md").read_text(encoding="utf-8").splitlines()
                 if line.startswith("| LA_half_quick")]
    generated = call_main(wall_times.main, REPO_ROOT / "results" / "LA_half_quick", check=True).stdout
    assert committed == [line for line in generated.splitlines() if line.startswith("| LA_half_quick")]
