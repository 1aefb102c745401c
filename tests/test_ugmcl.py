"""UG-MCL (code/train_ugmcl_3D.py): the loss terms, the teacher, and the script end to end."""
import json

import numpy as np
import pytest
import torch

import train_ugmcl_3D as ugmcl
from conftest import (REAL_LA, REAL_LA_ABSENT, TINY, assert_one_line_error, assert_same_models, read_summary, run_main,
                      straight_and_resumed)
from dataloaders.la_heart import LAHeart
from dataloaders.registry import get_dataset_spec
from dataloaders.training_data import build_training_data
from dataloaders.transforms import CenterCrop
from utils.args import finalize_args
from utils.ema import update_ema
from utils.losses import compute_sdf

SCRIPT = "train_ugmcl_3D.py"
SHAPE = (32, 32, 16)


def method_args(*flags):
    return ugmcl.get_parser().parse_args(["--patch_size", *map(str, SHAPE), *flags])


def blob_labels(batch, shape=SHAPE):
    """Binary ellipsoids of random centres, one per item."""
    rng = np.random.RandomState(0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    labels = []
    for _ in range(batch):
        centre = np.array(shape) * rng.uniform(0.35, 0.65, 3)
        radius = np.array(shape) * 0.25
        labels.append((((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) < 1)
    return torch.from_numpy(np.stack(labels).astype(np.int64))


def make_batch(args, batch=4):
    torch.manual_seed(0)
    label = blob_labels(args.labeled_bs)
    image = torch.randn(batch, 1, *SHAPE)
    image[:args.labeled_bs, 0] += 2.0 * label.float()
    sdf_target = torch.from_numpy(compute_sdf(label.numpy(), tuple(label.shape)))
    return image, label, sdf_target


def networks(args):
    torch.manual_seed(1)
    nets = ugmcl.build_networks(args)
    return nets["model"].train(), nets["ema_model"].train()


def step_loss(args, model, teacher, iteration=100):
    image, label, sdf_target = make_batch(args)
    targets = ugmcl.teacher_targets(teacher, image, args) if ugmcl.uses_teacher(args) else None
    weight = 0.1 if args.consistency else 0.0
    return ugmcl.ugmcl_loss(model(image), label, sdf_target, targets, threshold=0.6, weight=weight, args=args)


def test_training_data_has_signed_distances_for_the_labelled_cases_only(synthetic_root):
    """The loader's workers compute the two distance transforms for the labelled crops only (the loss reads
    ``sdf[:labeled_bs]``); an unlabelled crop carries NaN."""
    args = ugmcl.get_parser().parse_args(["--root_path", str(synthetic_root), "--labelnum", "4", "--labeled_bs", "1",
                                          "--no_eval", *TINY])
    train_set = build_training_data(finalize_args(args, get_dataset_spec("LA")), get_dataset_spec("LA"),
                                    signed_distance=True).train_set
    labelled, unlabelled = train_set[(3, 0)], train_set[(4, 0)]
    assert np.isfinite(labelled["sdf"]).all() and labelled["sdf"].min() < 0 < labelled["sdf"].max()
    assert np.array_equal(labelled["sdf"], compute_sdf(labelled["label"].numpy()[None], (1, 32, 32, 16))[0])
    assert unlabelled["sdf"].shape == (32, 32, 16) and np.isnan(unlabelled["sdf"]).all()


def test_sdf_to_probability_maps_inside_to_one():
    sdf = torch.tensor([-0.5, -0.01, 0.0, 0.01, 0.5])
    prob = ugmcl.sdf_to_probability(sdf, 1500.0)
    assert prob[0] > 1 - 1e-6 and prob[1] > 0.9999 and prob[2] == 0.5
    assert prob[3] < 1e-4 and prob[4] < 1e-6


def test_teacher_gets_no_gradient_and_changes_only_through_ema():
    args = method_args()
    model, teacher = networks(args)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, terms = step_loss(args, model, teacher)
    assert terms["loss_intra"] > 0 and terms["loss_cross"] > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    optimizer.step()
    after_step = teacher.state_dict()
    for name, _ in teacher.named_parameters():
        assert torch.equal(after_step[name], before[name]), name
    update_ema(teacher, model, args.ema_decay, global_step=1000)
    student = dict(model.named_parameters())
    for name, param in teacher.named_parameters():
        expected = 0.99 * before[name] + 0.01 * student[name].detach()
        torch.testing.assert_close(param, expected)
    assert any(not torch.equal(teacher.state_dict()[n], before[n]) for n, _ in teacher.named_parameters())


def test_each_unsupervised_term_reaches_both_heads():
    args = method_args()
    model, teacher = networks(args)
    image, _, _ = make_batch(args)
    targets = ugmcl.teacher_targets(teacher, image, args)
    logits, sdf = model(image)
    mask = torch.ones_like(targets[2])
    for loss in (ugmcl.cross_task_consistency(logits, sdf, args.sdf_k),
                 ugmcl.intra_task_consistency(logits, sdf, targets[0], targets[1], mask, 0.75)[0]):
        model.zero_grad()
        loss.backward(retain_graph=True)
        assert model.out_conv.weight.grad.abs().sum() > 0  # segmentation head
        assert model.out_conv_sdf.weight.grad.abs().sum() > 0  # distance head


def test_beta_selects_the_intra_task_terms_and_the_mask_restricts_them():
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 4, 4, 4)
    sdf, teacher_sdf = torch.rand(2, 1, 4, 4, 4), torch.rand(2, 1, 4, 4, 4)
    mask = torch.ones(2, 1, 4, 4, 4)
    total, seg, dist = ugmcl.intra_task_consistency(logits, sdf, teacher_logits, teacher_sdf, mask, 0.75)
    assert total == pytest.approx(0.75 * seg.item() + 0.25 * dist.item())
    assert ugmcl.intra_task_consistency(logits, sdf, teacher_logits, teacher_sdf, mask, 1.0)[0] == seg
    empty = ugmcl.intra_task_consistency(logits, sdf, teacher_logits, teacher_sdf, 0 * mask, 0.75)[0]
    assert empty.item() == 0.0


@pytest.mark.parametrize("flags", [["--consistency", "0"], ["--intra_weight", "0", "--cross_weight", "0"]])
def test_zero_consistency_weights_give_the_supervised_loss_exactly(flags):
    args = method_args(*flags)
    model, teacher = networks(args)
    image, label, sdf_target = make_batch(args)
    outputs = model(image)
    supervised, _ = ugmcl.supervised_loss(outputs[0][:2], outputs[1][:2], label, sdf_target, args)
    targets = ugmcl.teacher_targets(teacher, image, args)  # present, but weighted by zero
    total, _ = ugmcl.ugmcl_loss(outputs, label, sdf_target, targets, threshold=0.6,
                                weight=args.consistency, args=args)
    assert torch.equal(total, supervised)


def test_sdf_loss_variants():
    args = method_args()
    _, label, sdf_target = make_batch(args)
    logits = torch.zeros(2, 2, *SHAPE)
    exact = sdf_target.unsqueeze(1)
    assert ugmcl.supervised_loss(logits, exact, label, sdf_target, args)[1]["loss_sdf"] == 0
    code = method_args("--sdf_loss", "mask_dice")
    loss_sdf = ugmcl.supervised_loss(logits, exact, label, sdf_target, code)[1]["loss_sdf"]
    flipped = ugmcl.supervised_loss(logits, -exact, label, sdf_target, code)[1]["loss_sdf"]
    # sigmoid(-1500 T(y)) is the label except on the inner boundary, where T(y) = 0 gives 0.5
    assert 0 <= loss_sdf < 0.1 and flipped > 0.9


def test_script_trains_evaluates_and_test_3d_reproduces(synthetic_root, tmp_path, device):
    out = tmp_path / "model"
    run_main(SCRIPT, "--root_path", synthetic_root, "--output_root", out, "--labelnum", "4", "--labeled_bs", "1",
             "--max_iterations", "3", "--mc_samples", "2", *TINY, cwd=tmp_path, device=device, check=True)
    run = out / "synthetic_LA/UGMCL_4" / "vnet_sdf"
    config = json.loads((run / "config.json").read_text())
    assert config["script"] == "train_ugmcl_3D" and config["args"]["beta"] == 0.75
    log = (run / "log.txt").read_text()
    for term in ("loss_sdf", "loss_intra", "loss_cross", "certain_fraction", "consistency_weight"):
        assert "iteration 3 : loss : " in log and f"{term}: " in log
    assert "4 labelled + 4 unlabelled cases" in log
    trained = read_summary(run / "eval_iter_3_nms")
    assert trained["protocol"]["nms"] is True
    run_main("test_3D.py", "--run", run, "--progress", "0", cwd=tmp_path, device=device, check=True)
    tested = read_summary(run / "eval_iter_3_nms_2")
    for metric in ("dice", "jaccard", "hd95", "asd"):
        assert tested[metric] == trained[metric]


def test_killed_run_resumes_to_the_same_student_and_teacher(synthetic_root, tmp_path, device):
    common = ["--root_path", synthetic_root, "--labelnum", "4", "--labeled_bs", "1", "--max_iterations", "6",
              "--save_interval", "2", "--mc_samples", "2", "--no_eval", "--n_filters", "4", *TINY]
    straight, resumed, _, _ = straight_and_resumed(SCRIPT, common, "synthetic_LA/UGMCL_4/vnet_sdf", 6, tmp_path,
                                                   device)
    assert set(straight) == {"model", "ema_model"}
    assert_same_models(straight, resumed, device)


@pytest.mark.parametrize("flags, message", [
    (["--labeled_bs", "2"], "--labeled_bs 2 must be at least 1 and smaller than --batch_size 2"),
    (["--beta", "1.5"], "--beta must lie in [0, 1]"),
    (["--ema_decay", "2"], "--ema_decay must lie in [0, 1]"),
    (["--has_dropout", "0"], "--has_dropout 0 makes the teacher's MC-dropout passes identical"),
    (["--labelnum", "8"], "--labelnum 8 is larger than train.list allows"),
])
def test_impossible_settings_are_one_line_errors(synthetic_root, tmp_path, flags, message):
    proc = run_main(SCRIPT, "--root_path", synthetic_root, "--output_root", tmp_path, "--labeled_bs", "1", *TINY,
                    *flags)
    assert_one_line_error(proc, message)
    assert not (tmp_path / "LA").exists()


@pytest.mark.skipif(REAL_LA is None, reason=REAL_LA_ABSENT)
def test_finite_loss_on_real_la_crops():
    args = ugmcl.get_parser().parse_args(["--patch_size", "64", "64", "48", "--mc_samples", "2"])
    cases = LAHeart(REAL_LA, "train", num=4, transform=CenterCrop((64, 64, 48)))
    samples = [cases[i] for i in range(4)]
    image = torch.from_numpy(np.stack([s["image"] for s in samples])).unsqueeze(1).float()
    label = torch.from_numpy(np.stack([s["label"] for s in samples[:2]])).long()
    sdf_target = torch.from_numpy(compute_sdf(label.numpy(), tuple(label.shape)))
    assert label.sum() > 0
    model, teacher = networks(args)
    targets = ugmcl.teacher_targets(teacher, image, args)
    loss, terms = ugmcl.ugmcl_loss(model(image), label, sdf_target, targets, threshold=0.6, weight=0.1, args=args)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
