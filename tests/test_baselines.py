"""The baselines of the comparison tables: mean teacher, UA-MT, DTC, cross pseudo supervision."""
import json

import pytest
import torch

import train_cps_3D as cps
import train_dtc_3D as dtc
import train_mt_3D as mt
import train_uamt_3D as uamt
from conftest import TINY, assert_same_models, load_saved, read_summary, run_main, straight_and_resumed
from utils.ema import update_ema
from utils.losses import compute_sdf
from utils.ramps import LN2

SHAPE = (32, 32, 16)
LABELED_BS = 2


def batch(seed=0):
    """4 crops (2 labelled first) and the labels of the labelled ones: a bright box on noise."""
    torch.manual_seed(seed)
    label = torch.zeros(LABELED_BS, *SHAPE, dtype=torch.long)
    label[:, 8:24, 8:24, 4:12] = 1
    image = torch.randn(4, 1, *SHAPE)
    image[:LABELED_BS, 0] += 2.0 * label.float()
    return image, label


def parse(module, *flags):
    return module.get_parser().parse_args(["--patch_size", *map(str, SHAPE), *flags])


def grads(module):
    return [p.grad for p in module.parameters()]


# -- mean teacher and UA-MT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [mt, uamt])
def test_teacher_gets_no_gradient_and_follows_the_student_by_ema(module):
    args = parse(module, "--mc_samples", "2") if module is uamt else parse(module)
    torch.manual_seed(1)
    nets = module.build_networks(args)
    model, teacher = nets["model"].train(), nets["ema_model"].train()
    image, label = batch()
    if module is mt:
        with torch.no_grad():
            teacher_logits = teacher(image[LABELED_BS:])
        loss, terms = mt.mean_teacher_loss(model(image), label, teacher_logits, 0.1, LABELED_BS)
    else:
        teacher_logits, uncertainty = uamt.teacher_targets(teacher, image[LABELED_BS:], 2)
        loss, terms = uamt.uamt_loss(model(image), label, (teacher_logits, uncertainty), LN2 + 1, 0.1, LABELED_BS)
    assert terms["loss_consistency"] > 0
    loss.backward()
    assert all(g is None for g in grads(teacher)) and all(g is not None for g in grads(model))
    before = [p.clone() for p in teacher.parameters()]
    update_ema(teacher, model, 0.99, global_step=500)
    for old, new, student in zip(before, teacher.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * student.detach())


@pytest.mark.parametrize("module", [mt, uamt])
def test_consistency_reaches_only_the_unlabelled_crops(module):
    logits = torch.randn(4, 2, *SHAPE, requires_grad=True)
    teacher_logits = torch.randn(2, 2, *SHAPE)
    _, label = batch()
    if module is mt:
        _, terms = mt.mean_teacher_loss(logits, label, teacher_logits, 0.1, LABELED_BS)
    else:
        uncertainty = torch.rand(2, 1, *SHAPE) * LN2
        _, terms = uamt.uamt_loss(logits, label, (teacher_logits, uncertainty), 0.5, 0.1, LABELED_BS)
    terms["loss_consistency"].backward()
    assert logits.grad[:LABELED_BS].abs().sum() == 0 and logits.grad[LABELED_BS:].abs().sum() > 0


def test_uamt_threshold_extremes():
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(4, 2, *SHAPE), torch.randn(2, 2, *SHAPE)
    uncertainty = torch.rand(2, 1, *SHAPE) * LN2
    _, label = batch()
    nothing = uamt.uamt_loss(logits, label, (teacher_logits, uncertainty), 0.0, 0.1, LABELED_BS)[1]
    assert nothing["loss_consistency"] == 0 and nothing["certain_fraction"] == 0
    everything = uamt.uamt_loss(logits, label, (teacher_logits, uncertainty), LN2 + 1e-3, 0.1, LABELED_BS)[1]
    plain = mt.mean_teacher_loss(logits, label, teacher_logits, 0.1, LABELED_BS)[1]
    torch.testing.assert_close(everything["loss_consistency"], plain["loss_consistency"])


# -- DTC ----------------------------------------------------------------------------------------------------
def test_dtc_consistency_reaches_both_heads_and_zero_weight_is_supervised():
    args = parse(dtc)
    torch.manual_seed(1)
    model = dtc.build_networks(args)["model"].train()
    image, label = batch()
    sdf_target = torch.from_numpy(compute_sdf(label.numpy(), tuple(label.shape)))
    logits, sdf = model(image)
    assert logits.shape[1] == 1 and sdf.shape[1] == 1
    _, terms = dtc.dtc_loss(logits, sdf, label, sdf_target, 1.0, args)
    terms["loss_consistency"].backward(retain_graph=True)
    assert model.out_conv.weight.grad.abs().sum() > 0 and model.out_conv_sdf.weight.grad.abs().sum() > 0
    total, terms = dtc.dtc_loss(logits, sdf, label, sdf_target, 0.0, args)
    assert torch.equal(total, terms["loss_dice"] + 0.3 * terms["loss_sdf"])  # BCE computed, not added


def test_dtc_prediction_is_the_sigmoid_threshold():
    args = parse(dtc)
    model = dtc.build_networks(args)["model"].eval()
    x = torch.randn(1, 1, *SHAPE)
    with torch.no_grad():
        probs = dtc.predict({"model": model}, x)
        foreground = torch.sigmoid(model(x)[0])
    assert torch.allclose(probs.sum(dim=1), torch.ones(1, *SHAPE))
    assert torch.equal(probs.argmax(dim=1), (foreground[:, 0] > 0.5).long())


# -- cross pseudo supervision -------------------------------------------------------------------------------
def test_cps_networks_start_apart_and_each_learns_from_the_other_without_feeding_it():
    args = parse(cps)
    torch.manual_seed(1)
    nets = cps.build_networks(args)
    model1, model2 = nets["model1"].train(), nets["model2"].train()
    assert not torch.equal(model1.block_one.conv[0].weight, model2.block_one.conv[0].weight)
    image, label = batch()
    logits1, logits2 = model1(image), model2(image)
    _, terms = cps.cps_loss(logits1, logits2, label, 0.1, LABELED_BS)
    terms["loss_cps1"].backward(retain_graph=True)
    assert all(g is None for g in grads(model2)) and any(g.abs().sum() > 0 for g in grads(model1))
    model1.zero_grad(set_to_none=True)
    terms["loss_cps2"].backward()
    assert all(g is None for g in grads(model1)) and any(g.abs().sum() > 0 for g in grads(model2))


def test_cps_loss_is_zero_pseudo_weighted_supervised_when_weight_is_zero():
    torch.manual_seed(0)
    logits1, logits2 = torch.randn(4, 2, *SHAPE), torch.randn(4, 2, *SHAPE)
    _, label = batch()
    total, terms = cps.cps_loss(logits1, logits2, label, 0.0, LABELED_BS)
    assert torch.equal(total, terms["loss_sup1"] + terms["loss_sup2"])
    agree, _ = cps.cps_loss(logits1, logits1, label, 1.0, LABELED_BS)
    assert agree > total  # a network's own argmax still costs cross-entropy: the term is not trivially 0


# -- the scripts end to end ---------------------------------------------------------------------------------
SCRIPTS = {"mt": ("train_mt_3D.py", "MT", "vnet", [], mt, "ema_model"),
           "uamt": ("train_uamt_3D.py", "UAMT", "vnet", ["--mc_samples", "2"], uamt, "ema_model"),
           "dtc": ("train_dtc_3D.py", "DTC", "vnet_sdf", [], dtc, None),
           "cps": ("train_cps_3D.py", "CPS", "vnet", [], cps, "model2")}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_trains_evaluates_and_test_3d_reproduces(name, synthetic_root, tmp_path, device):
    script, exp, model, flags, module, other = SCRIPTS[name]
    out = tmp_path / "model"
    run_main(script, "--root_path", synthetic_root, "--output_root", out, "--labelnum", "4", "--labeled_bs", "1",
             "--max_iterations", "2", *flags, *TINY, cwd=tmp_path, device=device, check=True)
    run = out / f"synthetic_LA/{exp}_4" / model
    assert json.loads((run / "config.json").read_text())["script"] == script[:-3]
    log = (run / "log.txt").read_text()
    assert "iteration 2 : loss : " in log and "consistency_weight: " in log
    trained_dir = next(run.glob("eval_iter_2*"))
    run_main("test_3D.py", "--run", run, "--progress", "0", cwd=tmp_path, device=device, check=True)
    tested_dir = next(p for p in run.glob("eval_iter_2*") if p != trained_dir)
    trained, tested = read_summary(trained_dir), read_summary(tested_dir)
    for metric in ("dice", "jaccard", "hd95", "asd"):
        assert tested[metric] == trained[metric]
    if other:
        assert_network_flag_evaluates(run, module.INFERENCE_NETWORK, other, trained, tmp_path, device)


def assert_network_flag_evaluates(run, own, other, default, cwd, device):
    """``test_3D.py --network other`` gives, case for case, the evaluation of a checkpoint in which ``other``'s
    weights stand in ``own``'s place, and not the method's default one."""
    run_main("test_3D.py", "--run", run, "--network", other, "--progress", "0", cwd=cwd, device=device, check=True)
    state = load_saved(run / "iter_2.pth")
    state["models"][own] = state["models"][other]
    torch.save(state, run / "swapped.pth")
    run_main("test_3D.py", "--run", run, "--checkpoint", "swapped.pth", "--progress", "0", cwd=cwd, device=device,
             check=True)
    by_flag, by_weights = run / f"eval_iter_2_{other}", run / "eval_swapped"
    assert read_summary(by_flag)["protocol"]["network"] == other
    assert (by_flag / "metrics.csv").read_text() == (by_weights / "metrics.csv").read_text()
    assert any(read_summary(by_flag)[m] != default[m] for m in ("dice", "jaccard", "hd95", "asd"))


def test_cps_killed_run_resumes_both_networks_and_optimisers(synthetic_root, tmp_path, device):
    common = ["--root_path", synthetic_root, "--labelnum", "4", "--labeled_bs", "1", "--max_iterations", "6",
              "--save_interval", "2", "--no_eval", "--n_filters", "4", *TINY]
    straight, resumed, _, _ = straight_and_resumed("train_cps_3D.py", common, "synthetic_LA/CPS_4/vnet", 6, tmp_path,
                                                   device)
    assert set(straight) == {"model1", "model2"}
    assert_same_models(straight, resumed, device)
