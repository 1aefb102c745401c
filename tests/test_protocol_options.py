"""Protocol options of the shared base: the labelled cases drawn with ``--label_seed``, the validation cases held out
with ``--val_num`` and the weights that validation selects (``best_val.pth``), evaluated beside the final ones."""
import json

import pytest
import torch

from conftest import TINY, assert_one_line_error, kill_after_first_save, load_saved, read_summary, run_main
from dataloaders.la_heart import read_list
from dataloaders.registry import get_dataset_spec
from dataloaders.training_data import build_training_data, split_training_cases
from utils.args import finalize_args

IDS = [f"case{i:02d}" for i in range(20)]


def test_without_options_the_first_cases_are_labelled_as_in_the_papers():
    assert split_training_cases(IDS, 8) == (IDS[:8], IDS[8:], [])


def test_the_draw_is_seeded_disjoint_nested_and_in_list_order():
    labelled, unlabelled, validation = split_training_cases(IDS, 8, label_seed=3)
    assert (labelled, unlabelled) == split_training_cases(IDS, 8, label_seed=3)[:2]
    assert labelled != IDS[:8] and labelled != split_training_cases(IDS, 8, label_seed=4)[0]
    assert len(labelled) == 8 and not set(labelled) & set(unlabelled) and validation == []
    assert sorted(labelled + unlabelled) == IDS
    assert labelled == sorted(labelled) and unlabelled == sorted(unlabelled)  # IDS is sorted: list order kept
    assert set(labelled) <= set(split_training_cases(IDS, 16, label_seed=3)[0])


def test_validation_cases_are_the_last_and_leave_both_pools():
    for seed in (None, 0, 3):
        labelled, unlabelled, validation = split_training_cases(IDS, 8, label_seed=seed, val_num=4)
        assert validation == IDS[-4:]
        assert not set(validation) & set(labelled + unlabelled)
        assert sorted(labelled + unlabelled) == IDS[:-4] and len(labelled) == 8


def script_data(script, synthetic_root, *flags, **options):
    """The training data that ``script``'s parser and the shared set-up give for ``flags``."""
    module = __import__(script)
    semi = [] if script == "train_supervised_3D" else ["--labeled_bs", "1"]
    args = module.get_parser().parse_args(["--root_path", str(synthetic_root), "--labelnum", "3", "--no_eval",
                                           "--batch_size", "2", *semi, *map(str, flags)])
    args.exp = "LA/test"
    finalize_args(args, get_dataset_spec("LA"))
    return build_training_data(args, get_dataset_spec("LA"), **options).train_set


def test_every_method_gets_the_same_draw(synthetic_root):
    train_ids = read_list(synthetic_root / "train.list")
    expected = split_training_cases(train_ids, 3, label_seed=5)[0]
    supervised = script_data("train_supervised_3D", synthetic_root, "--label_seed", "5", semi_supervised=False)
    dtc = script_data("train_dtc_3D", synthetic_root, "--label_seed", "5", signed_distance=True)
    mt = script_data("train_mt_3D", synthetic_root, "--label_seed", "5")
    assert supervised.case_ids == expected
    assert dtc.case_ids[:3] == mt.case_ids[:3] == expected and dtc.case_ids == mt.case_ids
    assert sorted(mt.case_ids) == sorted(train_ids)
    sample = dtc[(0, 1)]
    assert sample["case"] == expected[0]
    assert not torch.isnan(torch.as_tensor(sample["sdf"])).any()  # a labelled case gets its distance map


@pytest.mark.parametrize("flags, fragment", [
    (["--val_num", "2"], "--val_num 2 needs --val_interval N"),
    (["--val_num", "8", "--val_interval", "1"], "--val_num 8 holds out every case of train.list"),
    (["--val_num", "6", "--val_interval", "1"], "less --val_num 6 and leave unlabelled cases; at most 1"),
    (["--label_seed", "-1"], "--label_seed must be >= 0"),
    (["--val_interval", "2"], "hold cases of the training list out with --val_num K"),
])
def test_impossible_protocol_options_are_one_line(synthetic_root, tmp_path, flags, fragment):
    proc = run_main("train_mt_3D.py", "--root_path", synthetic_root, "--output_root", tmp_path / "model",
                    "--labelnum", "2", "--max_iterations", "1", "--labeled_bs", "1", *TINY, *flags)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "model").exists()


def supervised_args(synthetic_root, output_root, *flags):
    """The flags of a 6-iteration labelled-only run with 2 validation cases, validated every 2 iterations."""
    return ["--root_path", synthetic_root, "--output_root", output_root, "--labelnum", "3", "--max_iterations", "6",
            "--val_num", "2", "--val_interval", "2", "--label_seed", "7", *TINY, *flags]


def supervised_run(synthetic_root, output_root, *flags):
    """The folder of the run of :func:`supervised_args`, trained."""
    run_main("train_supervised_3D.py", *supervised_args(synthetic_root, output_root, *flags), check=True)
    return output_root / "synthetic_LA" / "Supervised_3" / "vnet"


def validation_lines(run):
    """``{iteration: val_dice}`` from the run's log (the last line of an iteration validated twice)."""
    lines = [line for line in (run / "log.txt").read_text().splitlines() if " : val_dice : " in line]
    return {int(line.split("iteration ")[1].split(" ")[0]): float(line.split(" : val_dice : ")[1].split(" ")[0])
            for line in lines}


@pytest.fixture(scope="module")
def validated(synthetic_root, tmp_path_factory):
    """The run of :func:`supervised_args`, trained and evaluated once for the tests that read it."""
    return supervised_run(synthetic_root, tmp_path_factory.mktemp("validated") / "model")


def test_the_best_validated_weights_are_kept_and_evaluated_beside_the_final_ones(synthetic_root, validated):
    run = validated
    config = json.loads((run / "config.json").read_text())
    train_ids = read_list(synthetic_root / "train.list")
    labelled, _, validation = split_training_cases(train_ids, 3, label_seed=7, val_num=2)
    assert config["labelled_cases"] == labelled and config["validation_cases"] == validation
    assert config["training_cases"][:3] == labelled and not set(validation) & set(config["training_cases"])
    assert f"labelled cases (--label_seed 7): {', '.join(labelled)}" in (run / "log.txt").read_text()
    scores = validation_lines(run)
    assert sorted(scores) == [2, 4, 6]
    best = load_saved(run / "best_val.pth")
    first_best = min(i for i in scores if scores[i] == max(scores.values()))
    assert best["iteration"] == first_best and best["val_dice"] == pytest.approx(scores[first_best], abs=1e-6)
    final, selected = read_summary(run / "eval_iter_6"), read_summary(run / "eval_best_val")
    assert selected["protocol"]["selected_on"] == "validation" and selected["protocol"]["iteration"] == first_best
    assert final["protocol"]["iteration"] == 6 and "selected_on" not in final["protocol"]
    assert final["num_cases"] == selected["num_cases"] == 2


def test_a_killed_run_keeps_the_same_best_validated_weights(synthetic_root, validated, tmp_path):
    straight = validated
    args = supervised_args(synthetic_root, tmp_path / "killed", "--save_interval", "3", "--no_eval")
    latest = kill_after_first_save("train_supervised_3D.py", args,
                                   tmp_path / "killed" / "synthetic_LA" / "Supervised_3" / "vnet")
    assert load_saved(latest)["iteration"] < 6, "the run finished before it could be killed"
    run_main("train_supervised_3D.py", *args, "--resume", check=True)
    expected, actual = load_saved(straight / "best_val.pth"), load_saved(latest.parent / "best_val.pth")
    assert (expected["iteration"], expected["val_dice"]) == (actual["iteration"], actual["val_dice"])
    for key, value in expected["models"]["model"].items():
        assert torch.equal(value, actual["models"]["model"][key]), key
