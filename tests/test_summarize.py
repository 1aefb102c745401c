"""Tests of the results table (code/report/summarize.py) and the figures (code/report/plots.py) on fabricated run
directories: config.json, log.txt and evaluation folders as the training scripts write them, no training."""
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import held_by_another_process
from report import plots, summarize

REPO_ROOT = Path(__file__).resolve().parents[1]
SUMMARIZE = REPO_ROOT / "code" / "report" / "summarize.py"
ITERATIONS = 100
CASES = ("case_a", "case_b")
SEEDS = (1337, 2024, 42)
NUM_TRAIN = 20
SUPERVISED = ("train_supervised_3D", "Supervised", "vnet", 0)
UGMCL = ("train_ugmcl_3D", "UGMCL", "vnet_sdf", 1)
DECOY_DICE = 0.05  # the mean Dice of every evaluation folder the table must not use


def metrics_of(method, labelnum, seed):
    """Per-run test-set means of a fabricated run (Dice and Jaccard as fractions, distances in voxels)."""
    dice = 0.70 + 0.01 * labelnum + (0.05 if method == "UGMCL" else 0) + 0.003 * SEEDS.index(seed) ** 2
    return {"dice": dice, "jaccard": dice - 0.1, "hd95": 20.0 - labelnum / 2 + SEEDS.index(seed),
            "asd": 3.0 + 0.1 * SEEDS.index(seed)}


def write_eval(run_dir, name, means, nms, with_nii, checkpoint=f"iter_{ITERATIONS}.pth", **protocol_extra):
    """An evaluation folder like utils.evaluation writes: metrics.csv (two cases whose means are ``means``),
    summary.json (of ``checkpoint``), and with ``with_nii`` small NIfTI volumes of case_a."""
    folder = run_dir / name
    folder.mkdir()
    per_case = {case: {k: v + (0.01 if i else -0.01) for k, v in means.items()} for i, case in enumerate(CASES)}
    lines = ["case,dice,jaccard,hd95,asd,empty_pred,empty_gt"]
    lines += [f"{case},{m['dice']},{m['jaccard']},{m['hd95']},{m['asd']},False,False" for case, m in per_case.items()]
    lines += [f"mean,{','.join(str(means[k]) for k in ('dice', 'jaccard', 'hd95', 'asd'))},,",
              "std,0.01,0.01,0.01,0.01,,"]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    summary = {key: {"mean": value, "std": 0.01, "n": len(CASES)} for key, value in means.items()}
    summary.update(num_cases=len(CASES), num_empty_pred=0, num_empty_gt=0, protocol={
        "patch_size": [32, 32, 16], "stride_xy": 16, "stride_z": 8, "nms": bool(nms), "units": "voxels",
        "spacing": None, "seconds": 1.0, "checkpoint": checkpoint, "iteration": ITERATIONS, "split": "test",
        **protocol_extra})
    (folder / "summary.json").write_text(json.dumps(summary))
    if with_nii:
        gt = np.zeros((16, 16, 8), np.uint8)
        gt[4:12, 4:12, 2:6] = 1
        pred = np.roll(gt, 1, axis=0)
        image = gt + np.random.default_rng(0).normal(0, 0.3, gt.shape).astype(np.float32)
        for kind, volume in (("pred", pred), ("img", image), ("gt", gt)):
            nib.save(nib.Nifti1Image(volume, np.eye(4)), str(folder / f"case_a_{kind}.nii.gz"))


def make_run(model_dir, root, method, labelnum, seed, *, tag="LA", state="evaluated", label_seed=None):
    """A run directory at reproduce.sh's place. ``state``: "evaluated" (final checkpoint, log, the evaluation
    of the run's protocol and a decoy of the other LCC setting), "unevaluated" (checkpoint and log only) or
    "config" (config.json only: a run that failed at once). With ``label_seed`` the run's labelled cases are that
    draw (``--label_seed``), which adds 2 points of Dice per unit of the seed."""
    script, exp, model, nms = method
    run_dir = model_dir / f"{tag}_seed{seed}" / f"{exp}_{labelnum}" / model
    run_dir.mkdir(parents=True)
    args = {"dataset": "LA", "root_path": str(root), "labelnum": labelnum, "patch_size": [32, 32, 16],
            "exp": f"{tag}_seed{seed}/{exp}", "model": model, "seed": seed, "max_iterations": ITERATIONS,
            "stride_xy": 16, "stride_z": 8, "nms": nms}
    if label_seed is not None:
        args["label_seed"] = label_seed
    (run_dir / "config.json").write_text(json.dumps({"script": script, "args": args, "command": [],
                                                     "git": {"commit": None}}))
    if state == "config":
        return run_dir
    (run_dir / f"iter_{ITERATIONS}.pth").write_bytes(b"")
    (run_dir / "log.txt").write_text("".join(
        f"[00:00:0{i}.000] iteration {i} : loss : {1 / i:f}, loss_seg: {0.5 / i:f}, consistency_weight: "
        f"{0.01 * i:f}, lr: 0.01\n" for i in range(1, 4)) + "[00:00:04.000] iteration 3 : val_dice : 0.5\n")
    if state == "evaluated":
        means = metrics_of(exp, labelnum, seed)
        means["dice"] += 0.02 * (label_seed or 0)
        decoy = {**means, "dice": DECOY_DICE}
        write_eval(run_dir, f"eval_iter_{ITERATIONS}" + ("_nms" if nms else ""), means, nms, with_nii=True)
        write_eval(run_dir, f"eval_iter_{ITERATIONS}" + ("" if nms else "_nms"), decoy, not nms, with_nii=False)
        write_eval(run_dir, f"eval_iter_{ITERATIONS}_ema_model", decoy, nms, with_nii=False, network="ema_model")
    return run_dir


def data_and_model_dirs(base):
    """``(data root with a train.list of NUM_TRAIN cases, model folder to fill)`` under ``base``."""
    root = base / "data"
    root.mkdir()
    (root / "train.list").write_text("".join(f"case_{i}\n" for i in range(NUM_TRAIN)))
    return root, base / "model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Supervised and UG-MCL at 8 and 16 labels over three seeds (UG-MCL without seed 42, supervised at 16
    with seed 42 trained but not evaluated), a UG-MCL run at 4 labels that failed at once, the all-labels
    supervised run, and one supervised run on another data tag."""
    root, model_dir = data_and_model_dirs(tmp_path_factory.mktemp("summary"))
    for labelnum in (8, 16):
        for seed in SEEDS:
            failed = labelnum == 16 and seed == 42
            make_run(model_dir, root, SUPERVISED, labelnum, seed, state="unevaluated" if failed else "evaluated")
            if seed != 42:
                make_run(model_dir, root, UGMCL, labelnum, seed)
    make_run(model_dir, root, UGMCL, 4, 1337, state="config")
    make_run(model_dir, root, SUPERVISED, NUM_TRAIN, 1337)
    make_run(model_dir, root, SUPERVISED, 8, 1337, tag="synthetic")
    return model_dir


@pytest.fixture(scope="module")
def table(model_dir, tmp_path_factory):
    """``{(tag, method, labelled): {column: cell}}`` of the markdown written by the CLI, and the document."""
    out = tmp_path_factory.mktemp("out") / "results.md"
    proc = subprocess.run([sys.executable, str(SUMMARIZE), "--model_dir", str(model_dir), "--out", str(out),
                           "--title", "Test results", "--note", "A note."], capture_output=True, text=True,
                          timeout=60, cwd=model_dir)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text(encoding="utf-8")
    lines = [line for line in text.split("## Paired comparison")[0].splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        rows[(cells["data"], cells["method"], int(cells["labelled"]))] = cells
    return rows, text


def expected_cell(method, labelnum, seeds, key, scale):
    """``mean ± std`` over ``seeds`` computed here from the fabricated per-run means."""
    values = [scale * metrics_of(method, labelnum, seed)[key] for seed in seeds]
    std = f"{statistics.stdev(values):.2f}" if len(values) > 1 else "–"
    return f"{statistics.fmean(values):.2f} ± {std}"


def test_rows_and_order(table):
    rows, text = table
    assert list(rows) == [("LA", "UG-MCL", 4), ("LA", "Supervised V-Net", 8), ("LA", "UG-MCL", 8),
                          ("LA", "Supervised V-Net", 16), ("LA", "UG-MCL", 16), ("LA", "V-Net (all labels)", 20),
                          ("synthetic", "Supervised V-Net", 8)]
    assert text.startswith("# Test results\n\nA note.\n")


@pytest.mark.parametrize("method, label, labelnum, seeds", [
    ("Supervised", "Supervised V-Net", 8, SEEDS), ("Supervised", "Supervised V-Net", 16, (1337, 2024)),
    ("UGMCL", "UG-MCL", 8, (1337, 2024)), ("UGMCL", "UG-MCL", 16, (1337, 2024)),
    ("Supervised", "V-Net (all labels)", NUM_TRAIN, (1337,))])
def test_means_and_stds_over_seeds(table, method, label, labelnum, seeds):
    """Each cell is the mean and sample std over seeds of the run's own protocol evaluation (never the decoy
    of the other LCC setting); Dice and Jaccard in %."""
    cells = table[0][("LA", label, labelnum)]
    for key, column, scale in (("dice", "Dice (%)", 100), ("jaccard", "Jaccard (%)", 100), ("hd95", "95HD", 1),
                               ("asd", "ASD", 1)):
        assert cells[column] == expected_cell(method, labelnum, seeds, key, scale)


def test_seeds_missing_and_failed(table):
    rows = table[0]
    assert rows[("LA", "Supervised V-Net", 8)]["seeds"] == "3 of 3"
    assert rows[("LA", "UG-MCL", 8)]["seeds"] == "2 of 3 (missing 42)"
    assert rows[("LA", "Supervised V-Net", 16)]["seeds"] == "2 of 3 (failed 42)"
    assert rows[("LA", "V-Net (all labels)", NUM_TRAIN)]["seeds"] == "1 of 3 (missing 42, 2024)"
    assert rows[("synthetic", "Supervised V-Net", 8)]["seeds"] == "1 of 1"


def test_failed_runs_have_no_numbers(table):
    rows, text = table
    failed = rows[("LA", "UG-MCL", 4)]
    for column in ("Dice (%)", "Jaccard (%)", "95HD", "ASD"):
        assert failed[column] == "failed / not evaluated"
    assert failed["seeds"] == "0 of 3 (failed 1337; missing 42, 2024)"
    assert not re.search(r"\d+\.\d\d ±", "|".join(failed.values()))
    notes = text.split("Notes:")[1]
    assert "`LA_seed1337/UGMCL_4/vnet_sdf` (seed 1337): failed / not evaluated: no final checkpoint " \
           f"iter_{ITERATIONS}.pth" in notes
    assert f"`LA_seed42/Supervised_16/vnet` (seed 42): failed / not evaluated: iter_{ITERATIONS}.pth has no test " \
           "evaluation" in notes


def test_protocol_column_names_the_evaluation_used(table):
    rows = table[0]
    assert rows[("LA", "UG-MCL", 8)]["protocol"] == (
        f"{ITERATIONS} it, patch 32×32×16, stride 16/8, iter_{ITERATIONS}.pth (eval_iter_{ITERATIONS}_nms), "
        "LCC on, voxels, 2 test cases")
    assert rows[("LA", "Supervised V-Net", 8)]["protocol"] == (
        f"{ITERATIONS} it, patch 32×32×16, stride 16/8, iter_{ITERATIONS}.pth (eval_iter_{ITERATIONS}), "
        "LCC off, voxels, 2 test cases")
    assert rows[("LA", "UG-MCL", 4)]["protocol"].endswith("LCC on (configured, not evaluated)")


def test_published_columns(table):
    rows = table[0]
    supervised = rows[("LA", "Supervised V-Net", 8)]
    assert [supervised[f"published {c}"] for c in ("Dice (%)", "Jaccard (%)", "95HD", "ASD")] == \
        ["82.74", "71.70", "13.33", "3.26"]
    assert "docs/methods/supervised.md" in supervised["published source"]
    ugmcl = rows[("LA", "UG-MCL", 16)]
    assert [ugmcl[f"published {c}"] for c in ("Dice (%)", "Jaccard (%)", "95HD", "ASD")] == \
        ["90.16", "82.18", "6.50", "1.98"]
    assert ugmcl["published source"] == "UG-MCL paper Table 3 (docs/methods/ugmcl.md)"
    assert rows[("LA", "UG-MCL", 8)]["published Dice (%)"] == "–"
    assert rows[("LA", "UG-MCL", 8)]["published source"] == "none in docs/methods/*.md"
    assert rows[("LA", "V-Net (all labels)", NUM_TRAIN)]["published source"] == "none in docs/methods/*.md"
    other = rows[("synthetic", "Supervised V-Net", 8)]
    assert other["published Dice (%)"] == "–" and other["published source"].startswith("not comparable")


def test_published_numbers_are_quoted_from_the_method_docs():
    """Every published value is printed, as is, in the method doc its source names."""
    for (method, _, _), entries in summarize.PUBLISHED.items():
        assert method in {m.key for m in summarize.METHODS.values()}
        for entry in entries:
            doc = re.search(r"\((docs/methods/\w+\.md)\)$", entry.source)[1]
            text = (REPO_ROOT / doc).read_text(encoding="utf-8")
            for value in (entry.dice, entry.jaccard, entry.hd95, entry.asd):
                assert value is None or value in text, (doc, value)


def test_a_run_that_a_live_process_trains_is_training_not_failed(tmp_path):
    """A table made while the runs train (reproduce.sh still going) says which are training, never "failed";
    once the trainer is gone, the same folder is a failed run again."""
    root, model_dir = data_and_model_dirs(tmp_path)
    make_run(model_dir, root, SUPERVISED, 8, 1337)
    run = make_run(model_dir, root, UGMCL, 8, 1337, state="unevaluated")
    out = tmp_path / "results.md"
    command = [sys.executable, str(SUMMARIZE), "--model_dir", str(model_dir), "--out", str(out)]
    with held_by_another_process(run) as pid:
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        row = next(line for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("| LA | UG-MCL |"))
        assert "| training | training | training | training | 0 of 1 (training 1337) |" in row
        assert f"`LA_seed1337/UGMCL_8/vnet_sdf` (seed 1337): training (pid {pid} on " in out.read_text(encoding="utf-8")
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    row = next(line for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("| LA | UG-MCL |"))
    assert "| failed / not evaluated | failed / not evaluated |" in row and "(failed 1337)" in row


def test_a_run_stopped_before_its_end_with_a_checkpoint_is_unfinished_not_failed(tmp_path):
    """A run stopped by a signal at the end of a session (latest.pth, no final weights, no live process) is
    "unfinished" and its note says how it continues; one that stopped before its first save has nothing to
    resume from and stays "failed", as does one whose final weights were never evaluated."""
    root, model_dir = data_and_model_dirs(tmp_path)
    make_run(model_dir, root, SUPERVISED, 8, 1337)
    run = make_run(model_dir, root, UGMCL, 8, 1337, state="config")
    out = tmp_path / "results.md"

    def ugmcl_row():
        summarize.main(["--model_dir", str(model_dir), "--out", str(out)])
        text = out.read_text(encoding="utf-8")
        return next(line for line in text.splitlines() if line.startswith("| LA | UG-MCL |")), text

    row, _ = ugmcl_row()
    assert "| failed / not evaluated |" in row and "(failed 1337)" in row
    (run / "latest.pth").write_bytes(b"state")
    row, text = ugmcl_row()
    assert "| unfinished | unfinished | unfinished | unfinished | 0 of 1 (unfinished 1337) |" in row
    assert (f"`LA_seed1337/UGMCL_8/vnet_sdf` (seed 1337): unfinished: stopped before iter_{ITERATIONS}.pth, no "
            "number yet; `--resume` (or the same reproduce.sh command) continues it from latest.pth") in text
    assert "failed" not in row
    (run / f"iter_{ITERATIONS}.pth").write_bytes(b"")
    row, _ = ugmcl_row()
    assert "| failed / not evaluated |" in row and "(failed 1337)" in row


@pytest.mark.parametrize("make_dir, message", [(False, "error: model folder "), (True, "error: no runs under ")])
def test_cli_one_line_error(tmp_path, make_dir, message):
    model_dir = tmp_path / "model"
    if make_dir:
        model_dir.mkdir()
    proc = subprocess.run([sys.executable, str(SUMMARIZE), "--model_dir", str(model_dir), "--out",
                           str(tmp_path / "results.md")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(message)
    assert not (tmp_path / "results.md").exists()


def test_parse_log_tolerates_unknown_terms_and_resumes(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("[00:00:00.000] Namespace(max_iterations=100, lr_step=2500)\n"
                   "[00:00:01.000] iteration 1 : loss : 0.900000, loss_seg: 0.500000, lr: 0.01\n"
                   "[00:00:02.000] iteration 2 : loss : 0.800000, loss_new_term: 1e-05, lr: 0.001\n"
                   "[00:00:03.000] resumed from latest.pth at iteration 1\n"
                   "[00:00:04.000] iteration 2 : loss : 0.700000, lr: 0.001\n"
                   "[00:00:05.000] iteration 2 : val_dice : 0.420000 (4 cases of val.list)\n")
    curves = plots.parse_log(log)
    assert curves == {"loss": {1: 0.9, 2: 0.7}, "loss_seg": {1: 0.5}, "lr": {1: 0.01, 2: 0.001},
                      "loss_new_term": {2: 1e-05}, "val_dice": {2: 0.42}}


def test_plots_write_the_expected_figures(model_dir, tmp_path):
    """Dice against labelled cases per tag, curves per run group with a log, an overlay per labelled count from
    the saved NIfTI volumes (no network is run)."""
    out = tmp_path / "figures"
    plots.main(["--model_dir", str(model_dir), "--out", str(out)])
    expected = {"dice_vs_labelled_LA.png", "dice_vs_labelled_synthetic.png",
                "overlay_LA_8_case_a.png", "overlay_LA_16_case_a.png", f"overlay_LA_{NUM_TRAIN}_case_a.png",
                "overlay_synthetic_8_case_a.png",
                "curves_LA_Supervised_V-Net_8.png", "curves_LA_Supervised_V-Net_16.png",
                "curves_LA_UG-MCL_8.png", "curves_LA_UG-MCL_16.png", f"curves_LA_V-Net_all_labels_{NUM_TRAIN}.png",
                "curves_synthetic_Supervised_V-Net_8.png", "paired_LA_8.png", "paired_LA_16.png"}
    assert {path.name for path in out.iterdir()} == expected
    for name in expected:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_methods_with_equal_values_are_dodged_apart():
    """Figure (a) shifts each method around the labelled count, within a third of the smallest gap, so that equal
    means stay visible side by side."""
    assert plots.dodge(1, [8, 16]) == [0.0]
    shifts = plots.dodge(3, [4, 8, 16])
    assert shifts == pytest.approx([-2 / 3, 0.0, 2 / 3])
    assert plots.dodge(2, [8]) == pytest.approx([-1 / 6, 1 / 6])


def test_every_series_of_the_dice_figure_is_told_apart_and_a_control_matches_its_method():
    """Sixteen series (the CPU table: eight methods' rows and seven controls) would repeat matplotlib's ten-colour
    cycle; here each method has its own colour and marker, and its control the same ones, hollow and dashed."""
    methods = ["Supervised V-Net"] + [f"M{index}" for index in range(7)]
    controls = {f"M{index}: own control": f"M{index}" for index in range(7)}
    labels = [label for method in methods for label in (method, f"{method}: own control") if label in
              [*methods, *controls]]
    styles = plots.series_styles(labels, controls)
    filled = [(styles[m]["color"], styles[m]["marker"]) for m in methods]
    assert len(set(filled)) == len(methods)
    for control, method in controls.items():
        assert (styles[control]["color"], styles[control]["marker"]) == (styles[method]["color"],
                                                                          styles[method]["marker"])
        assert styles[control]["markerfacecolor"] == "white" and styles[control]["linestyle"] == "--"
        assert "markerfacecolor" not in styles[method]
    orphan = plots.series_styles(["A", "B: own control"], {"B: own control": "B"})
    assert orphan["B: own control"]["color"] != orphan["A"]["color"]


def comparison_table(text):
    """``{(method, labelled): {column: cell}}`` of the paired-comparison table."""
    lines = [line for line in text.split("## Paired comparison")[1].splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        rows[(cells["method"], cells["labelled"])] = cells
    return rows


def test_paired_comparison_with_the_labelled_only_v_net(table):
    """UG-MCL's per-case Dice is the labelled-only V-Net's + 5 points on every case of the seeds both have; the
    all-labels run (seed 1337) is 12 points above the 8-label V-Net and 4 above the 16-label one."""
    rows = comparison_table(table[1])
    assert set(rows) == {("UG-MCL", "8"), ("UG-MCL", "16"), ("V-Net (all labels)", f"{NUM_TRAIN} vs 8"),
                         ("V-Net (all labels)", f"{NUM_TRAIN} vs 16")}
    ugmcl = rows[("UG-MCL", "8")]
    assert ugmcl["pairs (seed × case)"] == "4" and ugmcl["ΔDice mean (points)"] == "+5.00"
    assert ugmcl["95 % CI (bootstrap)"] == "[+5.00, +5.00]" and ugmcl["better / worse"] == "4 / 0"
    assert rows[("UG-MCL", "16")]["pairs (seed × case)"] == "4"  # seed 42 of the 16-label V-Net is not evaluated
    band = rows[("V-Net (all labels)", f"{NUM_TRAIN} vs 8")]
    assert band["pairs (seed × case)"] == "2" and band["ΔDice mean (points)"] == "+12.00"
    # a band of two pairs cannot be significant (Wilcoxon p 0.5): no share of it (band_share below)
    assert band["Wilcoxon p"] == "0.5" and band["share of the band"] == "–" and ugmcl["share of the band"] == "–"
    assert "LCC on, the labelled-only V-Net with LCC off" in table[1]  # UG-MCL's protocol differs, and says so


@pytest.fixture(scope="module")
def protocol_options_text(tmp_path_factory):
    """The document for runs on two labelled draws (1 and 2) over two training seeds, supervised and UG-MCL, one
    of them with weights selected on validation; known answers: draw 1 is 80.00 and 80.30 % (supervised), draw
    2 two points higher, UG-MCL five points above the supervised run of its draw."""
    root, model_dir = data_and_model_dirs(tmp_path_factory.mktemp("options"))
    for label_seed in (1, 2):
        for seed in SEEDS[:2]:
            make_run(model_dir, root, SUPERVISED, 8, seed, tag=f"LA_draw{label_seed}", label_seed=label_seed)
            make_run(model_dir, root, UGMCL, 8, seed, tag=f"LA_draw{label_seed}", label_seed=label_seed)
    make_run(model_dir, root, SUPERVISED, 8, 1337, tag="LA_draw5")  # a tag that only looks like a draw: not one
    selected = model_dir / "LA_draw1_seed1337" / "Supervised_8" / "vnet"
    write_eval(selected, "eval_best_val", {**metrics_of("Supervised", 8, 1337), "dice": 0.81}, False, False,
               checkpoint="best_val.pth", iteration=60, val_dice=0.77, selected_on="validation")
    return summarize.render(summarize.collect(model_dir), "Options")


def markdown_rows(text, heading):
    """``[{column: cell}]`` of the first table under ``heading``."""
    section = text.split(heading)[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_the_spread_over_labelled_draws_is_separated_from_the_seeds(protocol_options_text):
    rows = {row["method"]: row for row in markdown_rows(protocol_options_text, "## Spread over labelled subsets")}
    supervised = rows["Supervised V-Net"]
    assert supervised["per draw: Dice (%) over training seeds"] == \
        "draw 1: 80.15 ± 0.21 (2 seeds)<br>draw 2: 82.15 ± 0.21 (2 seeds)"
    assert supervised["across draws: mean ± sd of the draws' means"] == "81.15 ± 1.41 (2 draws)"
    assert supervised["within a draw: pooled sd over training seeds"] == "0.21"
    assert supervised["larger spread"] == "the labelled draw"
    assert set(rows) == {"Supervised V-Net", "UG-MCL"}


def test_each_draw_is_compared_with_the_labelled_only_run_of_the_same_draw(protocol_options_text):
    rows = markdown_rows(protocol_options_text, "## Paired comparison")
    assert [row["method"] for row in rows] == ["UG-MCL (labelled draw 1)", "UG-MCL (labelled draw 2)"]
    assert all(row["ΔDice mean (points)"] == "+5.00" and row["pairs (seed × case)"] == "4" for row in rows)


def test_validation_selected_weights_are_shown_beside_the_final_ones(protocol_options_text):
    assert "No number here was selected on the test set" in protocol_options_text
    rows = markdown_rows(protocol_options_text, "## Weights selected on validation")
    assert rows == [{"run": "`LA_draw1_seed1337/Supervised_8/vnet`", "seed": "1337", "Dice, final weights (%)": "80.00",
                     "Dice, weights best on validation (%)": "81.00", "selected at iteration": "60",
                     "validation Dice (%)": "77.00"}]


@pytest.mark.parametrize("labelnums, count", [([4], 10), ([4, 8, 16], 10), ([8], 1)])
def test_the_dice_figure_keeps_every_dodged_marker_inside(labelnums, count):
    """Ten methods at one labelled count: the outermost markers were clipped at the figure's edges."""
    shifts = plots.dodge(count, labelnums)
    low, high = plots.x_limits(labelnums, shifts)
    spread = max(abs(shift) for shift in shifts)
    assert low <= min(labelnums) - 2 * spread and high >= max(labelnums) + 2 * spread
    assert low <= min(labelnums) - 0.5 and high >= max(labelnums) + 0.5


def share_of(method_differences, band_differences):
    """band_share of a method with these ``{(seed, case): difference}`` against the labelled-only V-Net, whose
    band (the all-labels V-Net against the same run) has these."""
    from types import SimpleNamespace

    from report.paired import compare

    baseline = object()

    def comparison(upper_bound, differences):
        return SimpleNamespace(row=SimpleNamespace(upper_bound=upper_bound), baseline=baseline,
                               differences=list(differences.items()), stats=compare(list(differences.values())))

    method = comparison(False, method_differences)
    return summarize.band_share(method, [method, comparison(True, band_differences)])


BAND_CASES = [f"case{index}" for index in range(10)]


@pytest.mark.parametrize("band, share", [([12.0 + index / 10 for index in range(10)], 100 * 5 / 12.45),
                                         ([30.0, -20.0] * 5, None), ([0.01] * 10, None),
                                         ([-3.0 - index / 10 for index in range(10)], None)])
def test_a_share_of_the_band_only_for_a_band_of_a_point_or_more_that_is_significant(band, share):
    """A band of 0.01 points would make a 5-point gain a 50,000 % share; a band of 5 points that may be noise
    (p 0.22), none."""
    method = {(1337, case): 5.0 for case in BAND_CASES}
    result = share_of(method, {(1337, case): value for case, value in zip(BAND_CASES, band)})
    assert result == (None if share is None else pytest.approx(share))


def test_a_method_with_fewer_seeds_than_the_bounds_is_placed_in_the_band_of_its_seeds():
    """Seed 1337's band is 10 points, seed 2024's 30: a method trained with seed 1337 alone that gains 5 points is
    half-way (50 %), not at a quarter of the two seeds' mean band (25 %); a band without one of its pairs, none."""
    band = {(1337, case): 10.0 + index / 100 for index, case in enumerate(BAND_CASES)}
    band.update({(2024, case): 30.0 + index / 100 for index, case in enumerate(BAND_CASES)})
    method = {(1337, case): 5.0 for case in BAND_CASES}
    assert share_of(method, band) == pytest.approx(100 * 5 / 10.045)
    assert share_of(method | {(42, BAND_CASES[0]): 5.0}, band) is None
