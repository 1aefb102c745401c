"""The matched controls (``--labelled_only 1``, docs/cpu_protocol.md): in every semi-supervised script, each loss
term that reads an unlabelled crop is switched off, or restricted to the labelled crops where the method computes
it over the whole batch, while the networks still see the whole batch. Each test also runs the method itself, so
that it fails if the unlabelled crops never mattered."""
import contextlib
import copy
import json
import re

import pytest
import torch

import train_cps_3D as cps
import train_dtc_3D as dtc
import train_mt_3D as mt
import train_uamt_3D as uamt
import train_ucseg_3D as ucseg
import train_ugmcl_3D as ugmcl
import train_ugpl_3D as ugpl
from conftest import TINY, run_main
from utils.losses import compute_sdf

SHAPE = (32, 32, 16)
LABELED_BS = 2
BATCH = 4
CONTROLLED = [mt, uamt, dtc, cps, ugmcl, ucseg, ugpl]


def labels():
    label = torch.zeros(LABELED_BS, *SHAPE, dtype=torch.long)
    label[:, 8:24, 8:24, 4:12] = 1
    return label


def outputs(channels):
    """Network outputs of a batch of 4 crops (2 labelled first) that the test differentiates."""
    return torch.randn(BATCH, channels, *SHAPE, requires_grad=True)


def parse(module, labelled_only, *flags):
    return module.get_parser().parse_args(["--patch_size", *map(str, SHAPE), "--labelled_only", str(labelled_only),
                                           *flags])


def unlabelled_gradient(loss, *tensors):
    """Sum of the absolute gradients of ``loss`` that reach the unlabelled crops of ``tensors``."""
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return sum(float(g[LABELED_BS:].abs().sum()) for g in grads if g is not None)


def reaches_unlabelled(labelled_only):
    """What the gradient to the unlabelled crops must be: none in the control, some in the method."""
    return (lambda gradient: gradient == 0) if labelled_only else (lambda gradient: gradient > 0)


@pytest.mark.parametrize("labelled_only", [0, 1])
def test_mean_teacher_and_uamt_controls_have_no_teacher_term(labelled_only):
    torch.manual_seed(0)
    logits, label = outputs(2), labels()
    teacher_logits = None if labelled_only else torch.randn(BATCH - LABELED_BS, 2, *SHAPE)
    loss, terms = mt.mean_teacher_loss(logits, label, teacher_logits, 0.1, LABELED_BS)
    assert reaches_unlabelled(labelled_only)(unlabelled_gradient(loss, logits))
    assert ("loss_consistency" in terms) != bool(labelled_only)
    teacher = None if labelled_only else (teacher_logits, torch.zeros(BATCH - LABELED_BS, 1, *SHAPE))
    loss, terms = uamt.uamt_loss(logits, label, teacher, 1.0, 0.1, LABELED_BS)
    assert reaches_unlabelled(labelled_only)(unlabelled_gradient(loss, logits))


@pytest.mark.parametrize("labelled_only", [0, 1])
def test_dtc_control_keeps_the_consistency_of_the_labelled_crops(labelled_only):
    torch.manual_seed(0)
    args = parse(dtc, labelled_only)
    logits, sdf, label = outputs(1), outputs(1), labels()
    sdf_target = torch.from_numpy(compute_sdf(label.numpy(), tuple(label.shape)))
    loss, terms = dtc.dtc_loss(logits, sdf, label, sdf_target, 1.0, args)
    assert reaches_unlabelled(labelled_only)(unlabelled_gradient(loss, logits, sdf))
    labelled = torch.mean((torch.sigmoid(-args.sdf_k * sdf[:LABELED_BS]) - torch.sigmoid(logits[:LABELED_BS])) ** 2)
    assert torch.equal(terms["loss_consistency"], labelled) == bool(labelled_only)


@pytest.mark.parametrize("labelled_only", [0, 1])
def test_cps_control_has_no_cross_term(labelled_only):
    torch.manual_seed(0)
    logits1, logits2, label = outputs(2), outputs(2), labels()
    loss, terms = cps.cps_loss(logits1, logits2, label, 0.1, LABELED_BS, bool(labelled_only))
    assert reaches_unlabelled(labelled_only)(unlabelled_gradient(loss, logits1, logits2))
    assert ("loss_cps1" in terms) != bool(labelled_only)


@pytest.mark.parametrize("labelled_only", [0, 1])
@pytest.mark.parametrize("scope", ugmcl.INTRA_SCOPES)
def test_ugmcl_control_keeps_both_consistencies_on_the_labelled_crops(labelled_only, scope):
    torch.manual_seed(0)
    args = parse(ugmcl, labelled_only, "--intra_scope", scope)
    logits, sdf, label = outputs(2), outputs(1), labels()
    sdf_target = torch.from_numpy(compute_sdf(label.numpy(), tuple(label.shape)))
    crops = ugmcl.intra_crops(args, BATCH)
    count = len(range(BATCH)[crops])
    teacher = None
    if ugmcl.uses_teacher(args):
        teacher = (torch.randn(count, 2, *SHAPE), torch.randn(count, 1, *SHAPE), torch.zeros(count, 1, *SHAPE))
    loss, terms = ugmcl.ugmcl_loss((logits, sdf), label, sdf_target, teacher, 1.0, 0.1, args)
    assert reaches_unlabelled(labelled_only)(unlabelled_gradient(loss, logits, sdf))
    # the control keeps L_itc where it covers labelled crops (the released code's whole-batch scope)
    assert ("loss_intra" in terms) == (scope == "batch" or not labelled_only)
    assert count == {("batch", 0): 4, ("batch", 1): 2, ("unlabeled", 0): 2, ("unlabeled", 1): 0}[scope, labelled_only]


@pytest.mark.parametrize("labelled_only", [0, 1])
def test_ugpl_control_keeps_the_labelled_terms_of_both_networks(labelled_only):
    torch.manual_seed(0)
    args = parse(ugpl, labelled_only)
    logits_a, logits_b, features_a, features_b = outputs(2), outputs(2), outputs(8), outputs(8)
    nets = {"subnet_a": (logits_a, features_a), "subnet_b": (logits_b, features_b)}
    loss, terms = ugpl.ugpl_loss(nets, labels(), 0.1, args)
    assert reaches_unlabelled(labelled_only)(unlabelled_gradient(loss, logits_a, logits_b, features_a, features_b))
    assert ("loss_u_a" in terms) != bool(labelled_only) and ("loss_proto" in terms) != bool(labelled_only)
    assert terms["loss_kl"] > 0 and terms["loss_cos"] > 0


@pytest.mark.parametrize("labelled_only", [0, 1])
def test_ucseg_control_is_blind_to_the_unlabelled_crops(labelled_only):
    """UC-Seg's subnets normalise each crop on its own (instance norm, none); its fusion head's batch norm is the
    one coupling of the crops, and it is put on running statistics here. Then in the control the whole step
    (losses, gradients of every parameter, the queues) must not change when the unlabelled crops change; with
    mixing on from the first iteration and the queue gate open, the method's step must."""
    args = ucseg.get_parser().parse_args(["--patch_size", *map(str, SHAPE), "--labelled_only", str(labelled_only),
                                          "--mix_start", "0", "--gate_start", "0", "--gate_slope", "0"])
    torch.manual_seed(1)
    nets = ucseg.build_networks(args)
    for net in nets.values():
        net.train()
    nets["upg"].head.eval()
    torch.manual_seed(0)
    image, label = torch.randn(BATCH, 1, *SHAPE), labels()
    image[:LABELED_BS, 0] += 2.0 * label.float()
    other = image.clone()
    other[LABELED_BS:] = torch.randn(BATCH - LABELED_BS, 1, *SHAPE)
    steps = []
    for batch in (image, other):
        copied = copy.deepcopy(nets)
        torch.manual_seed(7)
        loss, terms = ucseg.ucseg_step(copied, batch, label, 10, args, contextlib.nullcontext)
        steps.append((loss, terms, copied))
    (loss, terms, first), (other_loss, _, second) = steps
    assert ("loss_unsup1" in terms) != bool(labelled_only) and ("loss_ic_mix" in terms) != bool(labelled_only)
    same = torch.equal(loss, other_loss)
    for name in ("net1", "net2", "upg"):
        for param, other_param in zip(first[name].parameters(), second[name].parameters()):
            same = same and (param.grad is None) == (other_param.grad is None) and (
                param.grad is None or torch.equal(param.grad, other_param.grad))
    for key, value in first["queues"].state_dict().items():
        same = same and torch.equal(value, second["queues"].state_dict()[key])
    assert same == bool(labelled_only)


# terms of a log line that read unlabelled crops, in each script's log
UNLABELLED_TERMS = {mt: ["loss_consistency"], uamt: ["loss_consistency", "certain_fraction"], dtc: [],
                    cps: ["loss_cps1", "loss_cps2"], ugmcl: [], ucseg: ["loss_unsup1", "loss_unsup2"],
                    ugpl: ["loss_u_a", "loss_u_b", "loss_proto", "kept_fraction", "pseudo_foreground"]}


@pytest.mark.parametrize("module", CONTROLLED, ids=lambda m: m.__name__)
def test_every_semi_supervised_script_trains_its_control(module, synthetic_root, tmp_path):
    """Each script takes ``--labelled_only 1``, records it, and logs none of its unlabelled terms."""
    extra = ["--labeled_bs", "1"] + (["--mix_start", "0"] if module is ucseg else [])
    run_main(f"{module.__name__}.py", "--root_path", synthetic_root, "--output_root", tmp_path, "--labelnum", "4",
             "--max_iterations", "2", "--exp", "control", "--labelled_only", "1", "--no_eval", *TINY, *extra,
             check=True)
    run = next(tmp_path.glob("control_4/*"))
    assert json.loads((run / "config.json").read_text())["args"]["labelled_only"] == 1
    log = (run / "log.txt").read_text()
    assert re.search(r"iteration 2 : loss : [0-9.]+", log)
    for term in UNLABELLED_TERMS[module]:
        assert f"{term}:" not in log, term


def test_the_labelled_only_v_net_has_no_control_flag():
    """The supervised script has no unlabelled crops: the flag would mean nothing, so it is refused."""
    proc = run_main("train_supervised_3D.py", "--labelled_only", "1")
    assert proc.returncode == 2 and "--labelled_only" in proc.stderr
