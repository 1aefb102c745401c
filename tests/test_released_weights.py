"""Released weights under our evaluator (code/test_released.py): state dicts with the anchors' key names (UA-MT's
V-Net, DTC's dual-task V-Net) load into our networks and predict what the networks they came from predict."""
import pytest
import torch

import train_dtc_3D
import train_supervised_3D
from conftest import assert_one_line_error, read_summary, run_main
from test_released import load_released
from utils.errors import UserError

DTC_NAMES = {"out_conv.": "out_conv2.", "out_conv_sdf.": "out_conv."}  # ours -> DTC's (code/networks/vnet_sdf.py)


def as_anchor(state, names, prefix=""):
    """``state`` under an anchor's key names (``names``: our prefix -> theirs), optionally DataParallel's."""
    def rename(key):
        for ours, theirs in names.items():
            if key.startswith(ours):
                return theirs + key[len(ours):]
        return key
    return {prefix + rename(key): value for key, value in state.items()}


def released_file(tmp_path, script, names, prefix=""):
    """A network of ``script`` with seeded random weights, saved as the anchor saves it; the network, the path."""
    torch.manual_seed(0)
    nets = script.build_networks(script.get_parser().parse_args([]))
    for parameter in nets["model"].parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    path = tmp_path / "released" / "best_model.pth"
    path.parent.mkdir()
    torch.save(as_anchor(nets["model"].state_dict(), names, prefix), path)
    return nets, path


@pytest.mark.parametrize("arch, script, names, prefix", [
    ("vnet", train_supervised_3D, {}, ""), ("dtc", train_dtc_3D, DTC_NAMES, ""),
    ("dtc", train_dtc_3D, DTC_NAMES, "module."),
])
def test_anchor_state_dicts_load_and_predict_the_same(tmp_path, arch, script, names, prefix):
    original, path = released_file(tmp_path, script, names, prefix)
    nets, predict = load_released(path, arch)
    x = torch.randn(1, 1, 32, 32, 16)
    original["model"].eval()
    nets["model"].eval()
    with torch.no_grad():
        expected, actual = script.predict(original, x), predict(nets, x)
    assert torch.equal(expected, actual) and actual.shape == (1, 2, 32, 32, 16)


def test_a_file_of_another_architecture_is_one_line(tmp_path):
    _, path = released_file(tmp_path, train_dtc_3D, DTC_NAMES)
    with pytest.raises(UserError, match=r"does not fit --arch vnet .*unexpected: out_conv2.bias, out_conv2.weight"):
        load_released(path, "vnet")
    torch.save({"block_one.conv.0.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="missing: .*in all"):
        load_released(path, "vnet")


def test_released_weights_are_evaluated_like_our_runs(tmp_path, synthetic_root):
    _, path = released_file(tmp_path, train_dtc_3D, DTC_NAMES)
    out = tmp_path / "evaluated"
    run_main("test_released.py", "--weights", path, "--arch", "dtc", "--root_path", synthetic_root, "--out", out,
             "--patch_size", "32", "32", "16", "--stride_xy", "16", "--stride_z", "8", "--progress", "0", check=True)
    summary = read_summary(out / "eval_best_model")
    assert summary["num_cases"] == 2 and summary["protocol"]["arch"] == "dtc"
    assert summary["protocol"]["checkpoint"] == "best_model.pth" and summary["protocol"]["stride_xy"] == 16
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    proc = run_main("test_released.py", "--weights", tmp_path / "garbage.pth", "--arch", "vnet", "--root_path",
                    synthetic_root)
    assert_one_line_error(proc, "cannot be read as plain tensors")
