"""UC-Seg (code/train_ucseg_3D.py): evidential uncertainty, memory queues, copy-paste, the UPG head, the
contrast terms, and the script end to end (train, evaluate, test_3D, resume)."""
import contextlib
import copy
import json
import re

import numpy as np
import pytest
import torch

import train_ucseg_3D as ucseg
from conftest import (REAL_LA, REAL_LA_ABSENT, TINY, assert_one_line_error, assert_same_models, read_summary, run_main,
                      straight_and_resumed)
from dataloaders.la_heart import LAHeart
from dataloaders.transforms import CenterCrop
from networks.memory_queue import ClassMemoryQueue
from networks.ucseg_fusion import _patchify, _unpatchify
from networks.unet_3D import UNet3D
from utils.contrastive import regional_info_nce
from utils.evidential import accuracy_uncertainty_loss, au_annealing, dirichlet_uncertainty
from utils.mixing import box_size, copy_paste, copy_paste_mask

SCRIPT = "train_ucseg_3D.py"
SHAPE = (32, 32, 16)
RUN = "synthetic_LA/UCSeg_4/unet_3D_vnet"


def method_args(*flags):
    return ucseg.get_parser().parse_args(["--patch_size", *map(str, SHAPE), "--batch_size", "2",
                                          "--labeled_bs", "1", *flags])


def make_batch():
    """2 crops (the first labelled) and its label: a bright box on noise."""
    torch.manual_seed(0)
    label = torch.zeros(1, *SHAPE, dtype=torch.long)
    label[:, 8:24, 8:24, 4:12] = 1
    image = torch.randn(2, 1, *SHAPE)
    image[:1, 0] += 2.0 * label.float()
    return image, label


def networks(args):
    torch.manual_seed(1)
    nets = ucseg.build_networks(args)
    for net in nets.values():
        net.train()
    return nets


# -- evidential uncertainty ----------------------------------------------------------------------------------
def test_evidential_uncertainty_lies_in_unit_interval_and_peaks_where_logits_are_flat():
    logits = torch.tensor([[0.0, 0.0], [-4.0, 4.0], [4.0, -4.0], [3.0, 6.0], [-30.0, -30.0]]).t()
    u = dirichlet_uncertainty(logits.reshape(1, 2, 5, 1, 1)).flatten()
    assert torch.all(u > 0) and torch.all(u <= 1)
    assert u[0] == pytest.approx(2 / (2 + 2 * np.log(2)), rel=1e-5)  # flat zero logits
    assert u[0] > u[1] and u[0] > u[2] > u[3]  # more evidence, less uncertainty
    assert u[4] == pytest.approx(1.0, abs=1e-9)  # no evidence at all
    random = dirichlet_uncertainty(10 * torch.randn(2, 2, 4, 4, 4))
    assert random.shape == (2, 1, 4, 4, 4) and torch.all(random > 0) and torch.all(random <= 1)


def test_accuracy_uncertainty_loss_anneals_from_wrong_to_right_voxels():
    assert au_annealing(0, 100) == pytest.approx(0.01) and au_annealing(100, 100) == pytest.approx(1.0)
    target = torch.ones(1, 2, 1, 1, dtype=torch.long)
    logits = torch.tensor([[-3.0, 3.0], [3.0, -3.0]]).t().reshape(1, 2, 2, 1, 1)  # right, wrong voxel
    start = accuracy_uncertainty_loss(logits, target, annealing=0.0)  # only the wrong voxel counts
    end = accuracy_uncertainty_loss(logits, target, annealing=1.0)  # only the right voxel counts
    alpha = torch.nn.functional.softplus(torch.tensor([3.0, -3.0])) + 1
    p, u = alpha.max() / alpha.sum(), 2 / alpha.sum()
    assert end.item() == pytest.approx((-p * torch.log(1 - u)).item() / 2, rel=1e-5)
    assert start.item() == pytest.approx((-(1 - p) * torch.log(u)).item() / 2, rel=1e-5)


# -- memory queues -------------------------------------------------------------------------------------------
def test_memory_queue_keeps_its_size_and_overwrites_the_oldest_entries_in_order():
    torch.manual_seed(0)
    queue = ClassMemoryQueue(num_classes=2, dim=3, size=5)
    assert torch.allclose(queue.entries.norm(dim=-1), torch.ones(2, 5))
    initial = queue.entries.clone()
    first, second = torch.arange(9.0).reshape(3, 3), 100 + torch.arange(12.0).reshape(4, 3)
    queue.push(1, first)
    queue.push(1, second)
    assert queue.entries.shape == (2, 5, 3)
    # slots 0..2 got `first`, 3..4 the first two rows of `second`, then 0..1 (the oldest) the last two
    expected = torch.stack([second[2], second[3], first[2], second[0], second[1]])
    assert torch.equal(queue.entries[1], expected) and int(queue.pointer[1]) == 2
    assert torch.equal(queue.entries[0], initial[0]) and int(queue.pointer[0]) == 0  # other class untouched
    assert torch.equal(queue.positive(1), expected.mean(0)) and torch.equal(queue.negatives(1), initial[0])


def test_shared_pointer_reproduces_the_official_interleaving():
    queue = ClassMemoryQueue(num_classes=2, dim=1, size=8, shared_pointer=True)
    initial = queue.entries.clone()
    for step in range(2):
        queue.push(0, torch.full((2, 1), 10.0 + step))
        queue.push(1, torch.full((2, 1), 20.0 + step))
    # class 0 fills slots 0-1 and 4-5, class 1 slots 2-3 and 6-7; the rest of each stays random
    assert queue.entries[0, :, 0].tolist()[0:2] == [10, 10] and queue.entries[0, 4:6, 0].tolist() == [11, 11]
    assert torch.equal(queue.entries[0, 2:4], initial[0, 2:4])
    assert torch.equal(queue.entries[1, 0:2], initial[1, 0:2])


def test_queues_are_written_only_when_the_gate_opens():
    args = method_args("--max_iterations", "100")
    assert ucseg.queue_gate(0, args) == pytest.approx(0.2) and ucseg.queue_gate(100, args) == pytest.approx(0.76)
    queues = ucseg.build_networks(args)["queues"]
    features = [torch.rand(2, 256, 2, 2, 1), torch.rand(2, 128, 4, 4, 2), torch.rand(2, 64, 8, 8, 4)]
    targets = ucseg.one_hot(torch.randint(0, 2, (2, *SHAPE)))
    before = {name: q.entries.clone() for name, q in queues.items()}
    gate = ucseg.queue_gate(50, args)
    assert not ucseg.update_queues(queues, 1, features, targets, dice=gate - 0.01, gate=gate, levels=[5, 4, 3])
    assert all(torch.equal(q.entries, before[name]) for name, q in queues.items())
    assert ucseg.update_queues(queues, 1, features, targets, dice=gate + 0.01, gate=gate, levels=[5, 4, 3])
    for name, queue in queues.items():
        changed = not torch.equal(queue.entries, before[name])
        assert changed == name.startswith("net1") and queue.entries.shape == before[name].shape
    written = queues["net1_level5"].entries[1, :2]
    expected = (features[0] * ucseg.resize_mask(targets, (2, 2, 1))[:, 1:2]).mean(dim=(2, 3, 4))
    assert torch.allclose(written, expected, atol=1e-6)


# -- copy-paste --------------------------------------------------------------------------------------------
def test_copy_paste_mask_mixes_exactly_the_box():
    torch.manual_seed(3)
    for shape in ((96, 96, 96), SHAPE):
        mask = copy_paste_mask(shape)
        box = box_size(shape, 2 / 3)
        zeros = torch.nonzero(mask == 0)
        assert len(zeros) == np.prod(box) and set(mask.unique().tolist()) == {0.0, 1.0}
        low, high = zeros.min(0).values, zeros.max(0).values
        assert (high - low + 1).tolist() == box and all(h < s - 1 for h, s in zip(high.tolist(), shape))
    assert box_size((96, 96, 96), 2 / 3) == [64, 64, 64]
    outside, inside = torch.zeros(2, 1, *SHAPE), torch.ones(2, 1, *SHAPE)
    mask = copy_paste_mask(SHAPE)
    mixed = copy_paste(outside, inside, mask)
    assert torch.equal(mixed[:, 0], (1 - mask).expand(2, *SHAPE))


def test_mix_batch_pairs_labelled_and_unlabelled_crops_with_one_box():
    torch.manual_seed(5)
    image = torch.stack([torch.full((1, *SHAPE), float(v)) for v in (1, 2, 3, 4)])
    targets = ucseg.one_hot(torch.stack([torch.full(SHAPE, v) for v in (1, 1, 0, 0)]))
    mixed, mixed_target = ucseg.mix_batch(image, targets, labeled_bs=2, fraction=2 / 3)
    assert mixed.shape == (2, 1, *SHAPE) and mixed_target.shape == (2, 2, *SHAPE)
    from_labelled = mixed[0, 0] == 1
    assert torch.equal(mixed[1, 0] == 2, from_labelled) and torch.equal((mixed[0, 0] == 3), ~from_labelled)
    assert torch.equal(mixed_target[:, 1] == 1, from_labelled.expand(2, *SHAPE))
    inside = min(from_labelled.sum(), (~from_labelled).sum())
    assert inside == np.prod(box_size(SHAPE, 2 / 3))


# -- networks ----------------------------------------------------------------------------------------------
def test_unet_3d_is_ssl4mis_sized_and_returns_encoder_features():
    net = UNet3D(1, 2).eval()
    assert sum(p.numel() for p in net.parameters()) == 5_884_050
    assert "up_concat4.conv.conv1.0.weight" in net.state_dict() and "final.weight" in net.state_dict()
    logits, features = net(torch.randn(1, 1, *SHAPE), return_features=True)
    assert logits.shape == (1, 2, *SHAPE)
    assert [f.shape[1] for f in features["encoder"]] == [16 * factor for factor in ucseg.LEVEL_FACTORS]
    assert features["encoder"][4].shape[2:] == (2, 2, 1)


def test_token_split_is_undone_exactly():
    volume = torch.randn(2, 1, 32, 48, 16)
    tokens = _patchify(volume, 16)
    assert tokens.shape == (2, 6, 4096) and torch.equal(tokens[0, 1], volume[0, 0, :16, 16:32, :16].flatten())
    assert torch.equal(_unpatchify(tokens, (2, 3, 1), 16, 1), volume)


def test_upg_head_output_shape_and_gradient_into_both_subnets():
    args = method_args()
    nets = networks(args)
    image, _ = make_batch()
    outputs = ucseg.forward(nets, image, args.contrast_levels, False)
    assert outputs.fused.shape == (2, 2, *SHAPE)
    assert nets["upg"].weight_map(outputs.logits1, outputs.logits2).shape == (2, 1, *SHAPE)
    outputs.fused.sum().backward()
    for name, param in (("net1", nets["net1"].final.weight), ("net2", nets["net2"].out_conv.weight),
                        ("attention", nets["upg"].cross_attn.attn.w_q.weight),
                        ("head", nets["upg"].head.stages[0][0].weight)):
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    probs = ucseg.predict({k: v.eval() for k, v in nets.items()}, image)
    assert probs.shape == (2, 2, *SHAPE) and torch.allclose(probs.sum(1), torch.ones(2, *SHAPE))


def test_fusion_head_refuses_windows_of_another_size():
    nets = networks(method_args())
    with pytest.raises(ucseg.UserError, match="built for 32x32x16 crops, got 32x32x32"):
        ucseg.predict(nets, torch.zeros(1, 1, 32, 32, 32))


# -- loss terms ----------------------------------------------------------------------------------------------
def test_regional_info_nce_matches_the_per_region_loop():
    torch.manual_seed(0)
    f1, f2 = torch.rand(2, 8, 6, 6, 6), torch.rand(2, 8, 6, 6, 6)
    p1 = torch.nn.functional.adaptive_avg_pool3d(f1, 3).flatten(2)
    p2 = torch.nn.functional.adaptive_avg_pool3d(f2, 3).flatten(2)
    per_region = []
    for i in range(27):
        positive = (p1[:, :, i] * p2[:, :, i]).sum(1, keepdim=True)
        others = torch.cat([p2[:, :, :i], p2[:, :, i + 1:]], dim=2).permute(1, 0, 2).reshape(8, -1)
        logits = torch.cat([positive, p1[:, :, i] @ others], dim=1) / 0.3
        per_region.append(torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long)))
    expected = torch.stack(per_region).mean().item()
    assert regional_info_nce(f1, f2, 3, 0.3).item() == pytest.approx(expected, rel=1e-5)
    normalized = regional_info_nce(f1, f2, 3, 0.3, normalize=True)
    assert torch.isfinite(normalized) and normalized != regional_info_nce(f1, f2, 3, 0.3)


def test_dice_reductions_and_the_pseudo_label_weight():
    probs, target = torch.zeros(1, 2, 4, 4, 2), torch.zeros(1, 2, 4, 4, 2)
    probs[0, 1, :, :, 0], target[0, 1, :, :, 0] = 1, 1  # right in slice 0; slice 1 empty in both
    target[0, 0, :, :, 1], probs[0, 0] = 1, target[0, 0]
    assert ucseg.sigmoid_dice_loss(probs, target, "volume").item() == pytest.approx(0.0, abs=1e-6)
    probs[0, 1, 0, 0, 1] = 1  # one false positive in the empty slice costs a whole slice's Dice
    assert ucseg.sigmoid_dice_loss(probs, target, "slice").item() > 0.24
    assert ucseg.sigmoid_dice_loss(probs, target, "volume").item() < 0.02
    args = ucseg.get_parser().parse_args([])
    assert args.consistency_scale * ucseg.consistency_weight(30000, 0.1, 200) == pytest.approx(15.0)
    assert args.consistency_scale * ucseg.consistency_weight(0, 0.1, 200) == pytest.approx(15 * np.exp(-5))


def test_step_terms_and_the_prediction_consistency_flag():
    args = method_args("--mix_start", "0")
    nets = networks(args)
    image, label = make_batch()
    loss, terms = ucseg.ucseg_step(nets, image, label, 0, args, contextlib.nullcontext)
    assert torch.isfinite(loss) and "loss_ic_mix" in terms and terms["queue_write1"] in (0.0, 1.0)
    weight = terms["consistency_weight"]
    expected = ucseg.supervised_total(terms) + ucseg.unsupervised_total(terms, weight, args)
    assert loss.item() == pytest.approx(expected.item())
    with_diff = ucseg.unsupervised_total(terms, weight, method_args("--diff_weight", "0.5"))
    half_diff = 0.25 * (terms["loss_diff1"] + terms["loss_diff2"])
    assert with_diff.item() == pytest.approx((ucseg.unsupervised_total(terms, weight, args) + half_diff).item(),
                                             rel=1e-6)
    logits, other = torch.randn(2, 2, 4, 4, 4, requires_grad=True), torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    ucseg.prediction_consistency(logits, other).backward()
    assert logits.grad.abs().sum() > 0 and other.grad is None


def whole_loss_once(nets, image, label, iteration, args):
    """The official trainer's order: both passes built, each term averaged over them, one backward pass."""
    labeled = args.labeled_bs
    outputs = ucseg.forward(nets, image, args.contrast_levels, False)
    annealing = ucseg.au_annealing(iteration, args.max_iterations, args.au_start)
    pseudo = ucseg.foreground_masks(outputs.fused[labeled:], args.pseudo_lcc)
    terms = {"loss_sup1": ucseg.supervised_loss(outputs.logits1[:labeled], label, annealing, args),
             "loss_sup2": ucseg.supervised_loss(outputs.logits2[:labeled], label, annealing, args),
             "loss_fuse": ucseg.supervised_loss(outputs.fused[:labeled], label, annealing, args)}
    plain = ucseg.pass_terms(outputs, pseudo, labeled, nets["queues"], args)
    targets = torch.cat([ucseg.one_hot(label), pseudo])
    gate = ucseg.queue_gate(iteration, args)
    for k, logits, features in ((1, outputs.logits1, outputs.features1), (2, outputs.logits2, outputs.features2)):
        dice = ucseg.labelled_dice(logits[:labeled], label, False)
        ucseg.update_queues(nets["queues"], k, features, targets, dice, gate, args.contrast_levels)
    mixed_image, mixed_target = ucseg.mix_batch(image, targets, labeled, args.mix_fraction)
    mixed = ucseg.pass_terms(ucseg.forward(nets, mixed_image, args.contrast_levels, False), mixed_target, 0,
                             nets["queues"], args)
    terms.update({name: 0.5 * (plain[name] + mixed[name]) for name in plain})
    weight = args.consistency_scale * ucseg.consistency_weight(iteration, args.consistency, args.consistency_rampup,
                                                               args.iterations_per_epoch)
    loss = ucseg.supervised_total(terms) + ucseg.unsupervised_total(terms, weight, args)
    loss.backward()
    return loss


@pytest.mark.parametrize("recomputed", [False, True])
def test_pass_by_pass_backward_gives_the_gradients_of_the_whole_loss(recomputed):
    """The step backpropagates the plain pass before building the mixed one (memory), optionally with
    recomputed activations; the gradients must be those of one backward pass over the whole loss."""
    args = method_args("--mix_start", "0", "--gate_start", "0", "--gate_slope", "0")
    image, label = make_batch()
    nets = networks(args)
    reference = copy.deepcopy(nets)
    torch.manual_seed(7)
    loss, _ = ucseg.ucseg_step(nets, image, label, 3000, args, contextlib.nullcontext, recomputed)
    torch.manual_seed(7)
    expected = whole_loss_once(reference, image, label, 3000, args)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    compared = 0
    for name in ("net1", "net2", "upg"):
        for (key, param), ref in zip(nets[name].named_parameters(), reference[name].parameters()):
            assert (param.grad is None) == (ref.grad is None), (name, key)
            if param.grad is not None:
                assert torch.allclose(param.grad, ref.grad, rtol=1e-4, atol=1e-7), (name, key)
                compared += 1
    assert compared > 20
    for key, value in nets["queues"].state_dict().items():
        assert torch.equal(value, reference["queues"].state_dict()[key]), key


# -- the script ----------------------------------------------------------------------------------------------
def test_script_trains_evaluates_and_test_3d_reproduces(synthetic_root, tmp_path, device):
    out = tmp_path / "model"
    run_main(SCRIPT, "--root_path", synthetic_root, "--output_root", out, "--labelnum", "4", "--labeled_bs", "1",
             "--max_iterations", "2", "--mix_start", "1", *TINY, cwd=tmp_path, device=device, check=True)
    run = out / RUN
    config = json.loads((run / "config.json").read_text())
    assert config["script"] == "train_ucseg_3D" and config["args"]["lr_schedule"] == "linear"
    assert config["args"]["seed"] == 42 and config["args"]["weight_decay"] == 1e-5
    log = (run / "log.txt").read_text()
    assert "iteration 2 : loss : " in log and "4 labelled + 4 unlabelled cases" in log
    for term in ("loss_fuse", "loss_unsup1", "loss_ife2", "loss_ic", "loss_ic_mix", "queue_gate", "dice1"):
        assert f"{term}: " in log, term
    trained = read_summary(run / "eval_iter_2_nms")
    assert trained["protocol"]["nms"] is True
    run_main("test_3D.py", "--run", run, "--progress", "0", cwd=tmp_path, device=device, check=True)
    tested = read_summary(run / "eval_iter_2_nms_2")
    for metric in ("dice", "jaccard", "hd95", "asd"):
        assert tested[metric] == trained[metric]


def test_killed_run_resumes_to_the_same_weights_and_queues(synthetic_root, tmp_path, device):
    """Killed after a save before the last iteration, resumed into mixing iterations: same weights, BN statistics,
    queues. Four iterations leave room for a kill that lands late on a loaded machine."""
    common = ["--root_path", synthetic_root, "--labelnum", "4", "--labeled_bs", "1", "--max_iterations", "4",
              "--save_interval", "1", "--mix_start", "1", "--no_eval", "--n_filters", "4", *TINY]
    straight, resumed, _, _ = straight_and_resumed(SCRIPT, common, RUN, 4, tmp_path, device)
    assert set(straight) == {"net1", "net2", "upg", "queues"} and "net2_level5.entries" in straight["queues"]
    assert_same_models(straight, resumed, device)


def test_impossible_flag_is_a_one_line_error(synthetic_root, tmp_path):
    proc = run_main(SCRIPT, "--root_path", synthetic_root, "--output_root", tmp_path, "--labeled_bs", "1", *TINY,
                    "--upg_patch", "32")
    assert_one_line_error(proc, "each size must be a multiple of --upg_patch 32")
    assert not (tmp_path / "LA").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "3"], "--batch_size 3 must be twice --labeled_bs 1"),
    (["--regions", "1"], "--regions must be at least 2"),
    (["--contrast_levels", "6"], "--contrast_levels must be distinct encoder levels 1..5"),
    (["--mix_fraction", "1"], "--mix_fraction 1.0 gives a box [32, 32, 16] that does not fit"),
    (["--temperature", "0"], "--temperature must be positive"),
])
def test_impossible_settings_are_refused(flags, message):
    args = method_args(*flags)
    with pytest.raises(ucseg.UserError, match=re.escape(message)):
        ucseg.check_method_args(args)


@pytest.mark.skipif(REAL_LA is None, reason=REAL_LA_ABSENT)
def test_finite_loss_on_real_la_crops():
    crop = (64, 64, 32)
    args = ucseg.get_parser().parse_args(["--patch_size", *map(str, crop), "--batch_size", "2",
                                          "--labeled_bs", "1"])
    cases = LAHeart(REAL_LA, "train", num=2, transform=CenterCrop(crop))
    samples = [cases[i] for i in range(2)]
    image = torch.from_numpy(np.stack([s["image"] for s in samples])).unsqueeze(1).float()
    label = torch.from_numpy(samples[0]["label"][None]).long()
    assert label.sum() > 0
    nets = networks(args)
    loss, terms = ucseg.ucseg_step(nets, image, label, 100, args, contextlib.nullcontext)
    assert torch.isfinite(loss) and all(np.isfinite(float(torch.as_tensor(v).detach())) for v in terms.values())
    params = ucseg.trainable_parameters(nets)
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
