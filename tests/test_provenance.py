"""Every evaluation records what it measured (``utils.provenance``): the weights by path and hash, the network, the
exact cases of its split, and the code, compared with the code the run was trained with."""
import json
import shutil

import pytest

from conftest import assert_one_line_error, read_summary, run_main, run_script
from utils.own_result import own_evaluation
from utils.provenance import file_sha256, same_code


def test_training_evaluation_records_its_weights_cases_and_code(finished, synthetic_root):
    record = read_summary(finished / "eval_iter_2")["provenance"]
    assert record["checkpoint"] == "iter_2.pth" and record["checkpoint_in_run"]
    assert record["checkpoint_sha256"] == file_sha256(finished / "iter_2.pth")
    assert record["network"] is None and record["split"] == "test" and record["complete_split"]
    assert record["cases"] == (synthetic_root / "test.list").read_text().split()
    assert record["evaluator"] == "train_supervised_3D"
    trained = json.loads((finished / "config.json").read_text())["git"]
    assert record["code"]["commit"] == trained["commit"]
    assert record["code_as_trained"] is True or trained["dirty"]


def test_evaluation_of_other_weights_cases_and_network_says_so(finished_copy, tmp_path, synthetic_root):
    foreign = tmp_path / "elsewhere" / "iter_2.pth"
    foreign.parent.mkdir()
    shutil.copy(finished_copy / "latest.pth", foreign)
    run_main("test_3D.py", "--run", finished_copy, "--checkpoint", foreign, check=True)
    run_main("test_3D.py", "--run", finished_copy, "--cases", "synth_009", check=True)
    by_folder = {folder.name: read_summary(folder)["provenance"] for folder in finished_copy.glob("eval_*")}
    outside = by_folder["eval_iter_2_2"]
    assert not outside["checkpoint_in_run"] and outside["checkpoint"] == str(foreign.resolve())
    assert outside["checkpoint_sha256"] == file_sha256(finished_copy / "latest.pth")
    assert outside["evaluator"] == "test_3D"
    partial = by_folder["eval_iter_2_3"]
    assert partial["cases"] == ["synth_009"] and not partial["complete_split"]


def test_repeated_cases_are_refused(finished_copy):
    proc = run_main("test_3D.py", "--run", finished_copy, "--cases", "synth_009", "synth_009")
    assert_one_line_error(proc, "synth_009", "more than once")
    assert sorted(p.name for p in finished_copy.glob("eval_*")) == ["eval_iter_2"]


@pytest.mark.parametrize("trained, evaluated, diffs, expected", [
    ({"commit": "a", "dirty": False}, {"commit": "a", "dirty": False}, (None, None), True),
    ({"commit": "a", "dirty": False}, {"commit": "b", "dirty": False}, (None, None), False),
    ({"commit": "a", "dirty": False}, {"commit": "a", "dirty": True}, (None, "edit"), False),
    ({"commit": "a", "dirty": True}, {"commit": "a", "dirty": True}, ("edit", "edit"), True),
    ({"commit": "a", "dirty": True}, {"commit": "a", "dirty": True}, ("edit", "other edit"), False),
    ({"commit": None, "dirty": None}, {"commit": "a", "dirty": False}, (None, None), None),
])
def test_same_code_compares_commits_and_edits(tmp_path, trained, evaluated, diffs, expected):
    folders = tmp_path / "run", tmp_path / "eval"
    for folder, diff in zip(folders, diffs):
        folder.mkdir()
        if diff is not None:
            (folder / "git.diff").write_text(diff)
    assert same_code(trained, folders[0], evaluated, folders[1]) is expected


def forge(run, source, name, dice, **record):
    """A copy of the evaluation ``source`` of ``run`` as ``name``, with the Dice ``dice`` and ``record``'s entries
    in its provenance record (``record=None``: no record, as before evaluations kept one)."""
    folder = shutil.copytree(run / source, run / name)
    summary = read_summary(folder)
    summary["dice"]["mean"] = dice
    if record.pop("legacy", False):
        del summary["provenance"]
    summary.get("provenance", {}).update(record)
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_the_table_shows_the_runs_own_number_whatever_else_its_folder_holds(finished_copy, tmp_path):
    run = finished_copy
    own = read_summary(run / "eval_iter_2")["dice"]["mean"]
    foreign = tmp_path / "another_run" / "iter_2.pth"
    foreign.parent.mkdir()
    shutil.copy(run / "latest.pth", foreign)
    run_main("test_3D.py", "--run", run, "--checkpoint", foreign, check=True)     # eval_iter_2_2: other weights
    run_main("test_3D.py", "--run", run, "--cases", "synth_009", check=True)      # eval_iter_2_3: one case
    forge(run, "eval_iter_2", "eval_iter_2_4", 0.11, network="model2")
    forge(run, "eval_iter_2", "eval_iter_2_5", 0.12, split="train")
    forge(run, "eval_iter_2", "eval_iter_2_6", 0.13, checkpoint_sha256="0" * 64)
    forge(run, "eval_iter_2", "eval_iter_2_7", 0.14, cases=["synth_008", "synth_008"])
    forge(run, "eval_iter_2", "eval_iter_2_8", 0.15, code_as_trained=False)
    legacy = forge(run, "eval_iter_2", "eval_iter_2_9", 0.16, legacy=True)
    (legacy / "metrics.csv").write_text((legacy / "metrics.csv").read_text().replace("synth_009", "synth_008"))
    (run / "eval_iter_2").rename(run / "eval_iter_2_99")  # the run's own: found by its record, not its name

    result = own_evaluation(run)
    assert result.chosen.folder.name == "eval_iter_2_99"
    problems = {other.folder.name: " ".join(other.problems) for other in result.others}
    assert "not the run's iter_2.pth" in problems["eval_iter_2_2"]
    assert "1 cases, not the whole test list" in problems["eval_iter_2_3"]
    assert "network model2" in problems["eval_iter_2_4"]
    assert "the train split" in problems["eval_iter_2_5"]
    assert "has changed since it was evaluated" in problems["eval_iter_2_6"]
    assert "cases repeated" in problems["eval_iter_2_7"]
    assert problems["eval_iter_2_8"] == "" and problems["eval_iter_2_9"] == "cases repeated"

    out = tmp_path / "table.md"
    run_script("report/summarize.py", "--model_dir", tmp_path / "model", "--out", out)
    text = out.read_text(encoding="utf-8")
    assert f"| {100 * own:.2f} " in text
    assert not any(f"| {value} " in text for value in ("11.00", "12.00", "13.00", "14.00", "15.00", "16.00"))
    for name in ("eval_iter_2_2", "eval_iter_2_3", "eval_iter_2_4", "eval_iter_2_5", "eval_iter_2_6",
                 "eval_iter_2_7", "eval_iter_2_9"):
        assert f"`synthetic_LA/Supervised_4/vnet/{name}`: not in the table (" in text
    assert ("`synthetic_LA/Supervised_4/vnet/eval_iter_2_8`: not in the table (another evaluation of the run's own "
            "weights; the table uses eval_iter_2_99)") in text

    proc = run_script("utils/own_result.py", run)
    assert proc.stdout.strip() == str(run / "eval_iter_2_99")
    shutil.rmtree(run / "eval_iter_2_99")
    shutil.rmtree(run / "eval_iter_2_8")
    proc = run_script("utils/own_result.py", run, check=False)
    assert proc.returncode == 1 and "no evaluation of the run's own iter_2.pth" in proc.stdout


def test_test_3d_says_where_its_evaluation_stands(finished_copy):
    proc = run_main("test_3D.py", "--run", finished_copy, check=True)
    assert "note: kept apart from the run's result in tables (eval_iter_2 is preferred)" in proc.stdout
    proc = run_main("test_3D.py", "--run", finished_copy, "--cases", "synth_009", check=True)
    assert "note: kept apart from the run's result in tables (1 cases, not the whole test list)" in proc.stdout
    for folder in finished_copy.glob("eval_*"):
        shutil.rmtree(folder)
    proc = run_main("test_3D.py", "--run", finished_copy, check=True)
    assert "the run's result in tables (eval_iter_2)" in proc.stdout


def test_a_run_is_tagged_by_the_data_it_read_never_beside_published_numbers(finished, synthetic_root, tmp_path):
    """A run on synthetic.py's data goes to synthetic_LA/ by default and records its data; given --exp LA/... it is
    still tabled as synthetic_LA, without published numbers; summarize.py without --out writes beside the runs."""
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from dataloaders.data_tag import data_tag

    config = json.loads((finished / "config.json").read_text(encoding="utf-8"))
    assert finished.parent.parent.name == "synthetic_LA"
    assert config["data"]["kind"] == "synthetic" and config["data"]["tag"] == "synthetic_LA"
    assert set(config["data"]["lists_sha256"]) == {"train.list", "test.list"}
    copy = finished / "train_supervised_3D.py"
    assert copy.read_bytes() == (REPO_ROOT / "code" / "train_supervised_3D.py").read_bytes()
    assert config["script_copy"] == {"file": copy.name, "sha256": file_sha256(copy)}
    model = tmp_path / "model"
    shutil.copytree(finished, model / "LA" / "Supervised_4" / "vnet")
    config["args"]["exp"] = "LA/Supervised"
    (model / "LA" / "Supervised_4" / "vnet" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    committed = (REPO_ROOT / "docs" / "results.md").read_bytes()
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "code" / "report" / "summarize.py"), "--model_dir",
                           str(model)], capture_output=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (model / "results.md").read_text(encoding="utf-8")
    assert "| synthetic_LA | Supervised V-Net | 4 |" in table and "| LA |" not in table
    assert "not comparable (data tag synthetic_LA, not the LA data)" in table
    assert (REPO_ROOT / "docs" / "results.md").read_bytes() == committed

    half = tmp_path / "half"
    half.mkdir()
    (half / "resample.json").write_text(json.dumps({"scale": [0.5, 0.5, 0.5]}))
    assert (data_tag("LA", half), data_tag("LA", tmp_path), data_tag("Pancreas", synthetic_root)) == (
        "LA_half", "LA", "synthetic_Pancreas")


def test_a_run_records_every_changed_file_under_code_and_the_untracked_ones_in_its_diff(tmp_path, monkeypatch):
    """A copied method script that git does not track is named with its hash, and its content is in git.diff, so
    the run folder is enough to restore the code that trained; an edit of a tracked file too."""
    import subprocess

    from utils import provenance

    repo = tmp_path / "repo"
    (repo / "code").mkdir(parents=True)
    (repo / "code" / "train_mt_3D.py").write_text("idea = 1\n")
    (repo / ".gitignore").write_text("__pycache__/\n")
    for command in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repo), *command], check=True, capture_output=True)
    monkeypatch.setattr(provenance, "REPO_ROOT", repo)
    clean = provenance.code_record(tmp_path)
    assert clean["dirty"] is False and clean["changed_files"] == {} and len(clean["commit"]) == 40
    (repo / "code" / "train_mymt_3D.py").write_text("idea = 2\n")
    (repo / "code" / "__pycache__").mkdir()
    (repo / "code" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    record = provenance.code_record(tmp_path)
    copy = repo / "code" / "train_mymt_3D.py"
    assert record["dirty"] is True and record["changed_files"] == {"code/train_mymt_3D.py": file_sha256(copy)}
    assert "+idea = 2" in (tmp_path / "git.diff").read_text()
    (repo / "code" / "train_mt_3D.py").write_text("idea = 3\n")
    assert set(provenance.code_record(tmp_path)["changed_files"]) == {"code/train_mt_3D.py", "code/train_mymt_3D.py"}
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path / "not_a_checkout")
    assert provenance.code_record(tmp_path) == {"commit": None, "dirty": None}
