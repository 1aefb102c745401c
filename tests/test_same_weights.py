"""Bit-for-bit comparison of checkpoints (code/report/same_weights.py)."""
import pytest
import torch

from conftest import assert_one_line_error, assert_same_models, call_main
from report.same_weights import differences, main
from utils.checkpoint import save_checkpoint


def write(path, **networks):
    save_checkpoint(path, {"script": "train_mt_3D", "iteration": 1, "models": networks})
    return path


def test_equal_checkpoints_exit_zero(tmp_path):
    weights = {"conv.weight": torch.arange(6.0).reshape(2, 3), "bn.num_batches_tracked": torch.tensor(3)}
    first = write(tmp_path / "a.pth", model=weights, ema_model=weights)
    second = write(tmp_path / "b.pth", model={k: v.clone() for k, v in weights.items()}, ema_model=weights)
    proc = call_main(main, first, second, check=True)
    assert "the same weights, bit for bit: 4 tensors of 2 network(s)" in proc.stdout


def test_a_difference_of_one_ulp_is_found_and_named(tmp_path):
    weights = torch.ones(3)
    nudged = weights.clone()
    nudged[1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    first = write(tmp_path / "a.pth", model={"w": weights, "b": torch.zeros(2)})
    second = write(tmp_path / "b.pth", model={"w": nudged, "b": torch.zeros(2)})
    proc = call_main(main, first, second)
    assert proc.returncode == 1
    assert "DIFFERENT: 1 of 2 tensors: model/w (largest difference 1.19e-07)" in proc.stdout


def test_names_shapes_and_dtypes_that_differ_are_reported():
    first = {"m/a": torch.zeros(2), "m/b": torch.zeros(2), "m/only1": torch.zeros(1)}
    second = {"m/a": torch.zeros(3), "m/b": torch.zeros(2, dtype=torch.float64), "m/only2": torch.zeros(1)}
    assert differences(first, second) == [
        "m/only1 only in the first", "m/only2 only in the second",
        "m/a ((2,) torch.float32 against (3,) torch.float32)",
        "m/b ((2,) torch.float32 against (2,) torch.float64)"]
    assert differences(first, dict(first)) == []


def test_the_comparison_is_of_bits():
    nan = torch.tensor([float("nan"), 1.0])
    assert differences({"m/w": nan}, {"m/w": nan.clone()}) == []
    assert differences({"m/w": torch.tensor([0.0])}, {"m/w": torch.tensor([-0.0])}) == ["m/w (largest difference 0)"]
    assert differences({"m/n": torch.tensor(3)}, {"m/n": torch.tensor(3)}) == []  # 0-d, integer


def test_a_missing_or_foreign_file_is_one_line(tmp_path):
    present = write(tmp_path / "a.pth", model={"w": torch.ones(1)})
    assert_one_line_error(call_main(main, present, tmp_path / "missing.pth"), "not found")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert_one_line_error(call_main(main, present, tmp_path / "text.pth"), "text.pth")


def test_the_tests_helper_compares_bits_on_the_cpu():
    """conftest.assert_same_models, which the resume and fault tests use, holds CPU runs to this tool's standard:
    -0.0 is not 0.0 and float64 is not float32 (torch.equal would call both pairs equal)."""
    same = {"model": {"w": torch.zeros(2)}}
    assert_same_models(same, {"model": {"w": torch.zeros(2)}})
    for other in (torch.tensor([0.0, -0.0]), torch.zeros(2, dtype=torch.float64)):
        with pytest.raises(AssertionError, match="model/w"):
            assert_same_models(same, {"model": {"w": other}})
