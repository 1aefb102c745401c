"""UGPL (code/train_ugpl_3D.py, networks/resnet_vnet.py): the network, the loss terms, the script end to end."""
import copy
import json
import re

import numpy as np
import pytest
import torch

import train_ugpl_3D as ugpl
from conftest import (REAL_LA, REAL_LA_ABSENT, TINY, assert_one_line_error, assert_same_models, read_summary, run_main,
                      straight_and_resumed)
from dataloaders.la_heart import LAHeart
from dataloaders.transforms import CenterCrop
from networks.net_factory_3d import net_factory_3d
from networks.resnet_vnet import ResNetVNet
from networks.vnet import VNet
from utils.errors import UserError

SCRIPT = "train_ugpl_3D.py"
SHAPE = (16, 16, 8)


def method_args(*flags):
    return ugpl.get_parser().parse_args(["--patch_size", "32", "32", "16", *flags])


def fake_outputs(seed=0, shape=SHAPE, channels=8):
    """Stand-ins for the two networks' ``(logits, features)`` on 2 labelled + 2 unlabelled crops, as leaf
    tensors, so that each loss term's gradient can be traced to the network whose output it reaches."""
    generator = torch.Generator().manual_seed(seed)
    outputs = {}
    for name in ("subnet_a", "subnet_b"):
        logits = (2 * torch.randn(4, 2, *shape, generator=generator)).requires_grad_()
        features = torch.randn(4, channels, *shape, generator=generator).requires_grad_()
        outputs[name] = (logits, features)
    label = (torch.rand(2, *shape, generator=generator) > 0.6).long()
    return outputs, label


def gradients(loss, outputs):
    """Per network, whether ``loss`` sends a non-zero gradient into its logits or features, and whether any
    of it lands on the labelled crops."""
    tensors = [t for name in ("subnet_a", "subnet_b") for t in outputs[name]]
    grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
    reached, labelled = {}, {}
    for i, name in enumerate(("subnet_a", "subnet_b")):
        pair = [g for g in grads[2 * i:2 * i + 2] if g is not None]
        reached[name] = any(g.abs().sum() > 0 for g in pair)
        labelled[name] = any(g[:2].abs().sum() > 0 for g in pair)
    return reached, labelled


# -- network -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch", [(112, 112, 80), (96, 96, 96), (64, 64, 48), (32, 32, 16)])
def test_resnet_encoder_levels_have_the_vnet_skip_shapes(patch):
    with torch.device("meta"):
        resnet, vnet = ResNetVNet(1, 2, 16, has_dropout=True), VNet(1, 2, 16, "batchnorm", has_dropout=True)
        x = torch.empty(2, 1, *patch)
        levels, vnet_levels = resnet.encoder(x), vnet.encoder(x)
        logits, features = resnet(x, return_features=True)
    assert [f.shape for f in levels] == [f.shape for f in vnet_levels]
    assert [f.shape[1] for f in levels] == [16, 32, 64, 128, 256]
    assert levels[0].shape[2:] == patch  # 7^3 stem at stride 1, no max-pooling
    assert logits.shape == (2, 2, *patch) and features["decoder"].shape == (2, 16, *patch)


def test_resnet_vnet_structure_and_size():
    net = net_factory_3d("resnet_vnet", 1, 2, has_dropout=True)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert net.stem[0].kernel_size == (7, 7, 7) and net.stem[0].stride == (1, 1, 1)
    assert sum(p.numel() for p in net.parameters()) == 17_930_354
    with pytest.raises(ValueError, match=r"spatial size \(24, 24, 16\) must be divisible by 16"):
        net.encoder(torch.empty(1, 1, 24, 24, 16, device="meta"))


def test_predict_averages_the_two_softmaxes():
    torch.manual_seed(0)
    nets = ugpl.build_networks(method_args())
    assert set(nets) == {"subnet_a", "subnet_b"} and isinstance(nets["subnet_a"], ResNetVNet)
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        for net in nets.values():
            net.eval()
        prob = ugpl.predict(nets, x)
        expected = (torch.softmax(nets["subnet_a"](x), 1) + torch.softmax(nets["subnet_b"](x), 1)) / 2
    torch.testing.assert_close(prob, expected)
    torch.testing.assert_close(prob.sum(1), torch.ones(1, 32, 32, 16))


# -- loss terms ----------------------------------------------------------------------------------------------

def test_percentile_is_numpys():
    values = torch.randn(1000)
    for q in (0, 20, 37.5, 100):
        assert ugpl.percentile(values, q).item() == pytest.approx(np.percentile(values.numpy(), q), abs=1e-6)
    assert torch.isnan(ugpl.percentile(torch.tensor([1.0, float("nan")]), 20))


def test_entropy_filter_keeps_the_confident_voxels_of_either_network():
    # Ten voxels: A is confident on 0 and 1, B on 2 and 3, both hesitate elsewhere. The 20th percentile of
    # ten entropies lies between the second and third smallest, so each network keeps its two best voxels.
    fg_a = torch.tensor([0.99, 0.01, 0.60, 0.45, 0.50, 0.55, 0.48, 0.52, 0.47, 0.53])
    fg_b = torch.tensor([0.50, 0.45, 0.98, 0.02, 0.55, 0.49, 0.51, 0.46, 0.54, 0.52])

    def logits(fg):
        return torch.log(torch.stack([1 - fg, fg])).view(1, 2, 10, 1, 1)

    target = ugpl.filtered_pseudo_label(logits(fg_a), logits(fg_b), percent=20).flatten()
    ignored = ugpl.IGNORE
    assert target.tolist() == [1, 0, 1, 0] + [ignored] * 6  # voxel 0: union of A's foreground and B's doubt
    # the released code takes the entropy of the logits: log of a negative logit is NaN, nothing is ignored
    code = ugpl.filtered_pseudo_label(logits(fg_a), logits(fg_b), percent=20, code_faithful=True).flatten()
    assert code.tolist() == ((fg_a > 0.5) | (fg_b > 0.5)).long().tolist()


def test_confident_disagreement_is_an_xor_of_confident_foreground():
    def prob(*fg):
        fg = torch.tensor(fg)
        return torch.stack([1 - fg, fg]).view(1, 2, 4, 1, 1)

    mask = ugpl.confident_disagreement(prob(0.9, 0.9, 0.55, 0.1), prob(0.9, 0.2, 0.3, 0.1), threshold=0.6)
    assert mask.flatten().tolist() == [False, True, False, False]  # 0.55 is foreground but not confident


@pytest.mark.parametrize("flags", [[], ["--kl_symmetric"], ["--code_faithful"]])
def test_every_unlabelled_loss_trains_the_network_it_is_meant_to(flags):
    args = method_args(*flags)
    outputs, label = fake_outputs()
    _, terms = ugpl.ugpl_loss(outputs, label, proto_weight=0.1, args=args)
    loser = "subnet_a" if terms["loser_is_a"] else "subnet_b"
    expected = {  # term -> networks it must train; an empty set: no gradient at all (the released code)
        "loss_u_a": {"subnet_a"}, "loss_u_b": {"subnet_b"}, "loss_proto": {loser},
        "loss_kl": {"subnet_a", "subnet_b"} if args.kl_symmetric else {"subnet_a"},
        "loss_cos": {"subnet_a", "subnet_b"}}
    if args.code_faithful:
        expected.update(loss_u_a=set(), loss_u_b=set(), loss_proto=set())
        assert terms["kept_fraction"] == 1  # the entropy filter is off in the released code
    else:
        assert 0.2 <= terms["kept_fraction"] <= 0.4
    for term, networks in expected.items():
        if not networks:
            assert not terms[term].requires_grad, term
            continue
        reached, labelled = gradients(terms[term], outputs)
        assert {name for name, hit in reached.items() if hit} == networks, term
        if term in ("loss_u_a", "loss_u_b", "loss_proto"):
            assert not any(labelled.values()), f"{term} reaches the labelled crops"


def test_prototype_term_is_bounded_and_has_the_right_sign():
    torch.manual_seed(0)
    features = 1000 * torch.randn(2, 8, *SHAPE)
    target = torch.randint(0, 3, (2, *SHAPE))
    prediction = torch.randint(0, 2, (2, *SHAPE))

    def separation(feats):
        flat = feats.movedim(1, -1).reshape(-1, 8)
        fg, bg = (flat[target.flatten() == c].mean(0, keepdim=True) for c in (1, 0))
        return ugpl.unit_distance(fg, bg)

    for push in (True, False):
        leaf = features.clone().requires_grad_()
        loss = ugpl.prototype_contrast(leaf, target, prediction, candidate_ratio=100, push=push)
        assert (-2 <= loss <= 4) and (push or loss >= 0)
        loss.backward()
        stepped = features - 1e5 * leaf.grad
        moved = separation(stepped) - separation(features)
        assert (moved > 0) if push else (moved < 0)  # the paper pushes the prototypes apart, the code pulls
        assert leaf.grad.movedim(1, -1)[target == ugpl.IGNORE].abs().sum() > 0  # candidates move too
    nothing_kept = torch.full_like(target, ugpl.IGNORE)
    assert ugpl.prototype_contrast(features, nothing_kept, prediction, 100) == 0


def test_pseudo_foreground_is_the_foreground_share_of_the_kept_voxels():
    target = torch.tensor([[1, 1, 0, ugpl.IGNORE], [ugpl.IGNORE, ugpl.IGNORE, 0, 1]])
    assert ugpl.pseudo_foreground(target) == pytest.approx(3 / 5)
    assert ugpl.pseudo_foreground(torch.full((2, 3), ugpl.IGNORE)) == 0


def test_union_pseudo_label_follows_the_network_that_calls_more_foreground():
    """One network that calls everything foreground on the unlabelled crops makes the pseudo-label foreground
    everywhere it keeps, whatever the other network says (the union, not the agreement)."""
    outputs, label = fake_outputs()
    logits, features = outputs["subnet_a"]
    logits = logits.detach().clone()
    logits[2:, 1] = logits[2:, 0].abs() + 1
    outputs["subnet_a"] = (logits.requires_grad_(), features)
    _, terms = ugpl.ugpl_loss(outputs, label, proto_weight=0.1, args=method_args())
    assert terms["pseudo_foreground"] == 1 and 0.2 <= terms["kept_fraction"] <= 0.4


def test_pseudo_label_loss_rescales_by_the_kept_fraction_and_ignores_the_rest():
    logits = torch.randn(1, 2, 4, 1, 1)
    target = torch.tensor([1, 0, ugpl.IGNORE, ugpl.IGNORE]).view(1, 4, 1, 1)
    plain = torch.nn.functional.cross_entropy(logits[:, :, :2], target[:, :2])
    torch.testing.assert_close(ugpl.pseudo_label_loss(logits, target, rescale=False), plain)
    torch.testing.assert_close(ugpl.pseudo_label_loss(logits, target, rescale=True), 2 * plain)
    assert ugpl.pseudo_label_loss(logits, torch.full_like(target, ugpl.IGNORE), rescale=True) == 0


# -- the script ----------------------------------------------------------------------------------------------

def train(synthetic_root, out, *flags, device="cpu"):
    """Two iterations of the script on the tiny synthetic data, on ``device``; the run directory."""
    run_main(SCRIPT, "--root_path", synthetic_root, "--output_root", out, "--labelnum", "4",
             "--labeled_bs", "1", "--max_iterations", "2", *TINY, *flags, cwd=out.parent, device=device, check=True)
    return out / "synthetic_LA/UGPL_4/resnet_vnet"


def test_script_trains_evaluates_and_test_3d_reproduces(synthetic_root, tmp_path, device):
    run = train(synthetic_root, tmp_path / "model", device=device)
    config = json.loads((run / "config.json").read_text())
    assert config["script"] == "train_ugpl_3D" and config["args"]["prototype_separation"] == "push"
    log = (run / "log.txt").read_text()
    assert "4 labelled + 4 unlabelled cases" in log and "iteration 2 : loss : " in log
    for term in ("loss_cr_a", "loss_u_b", "loss_kl", "loss_cos", "loss_proto", "kept_fraction", "pseudo_foreground",
                 "loser_is_a"):
        assert f"{term}: " in log
    assert "kept_fraction: 1.000000" not in log
    trained = read_summary(run / "eval_iter_2")
    run_main("test_3D.py", "--run", run, "--progress", "0", cwd=tmp_path, device=device, check=True)
    tested = read_summary(run / "eval_iter_2_2")
    for metric in ("dice", "jaccard", "hd95", "asd"):
        assert tested[metric] == trained[metric]
    proc = run_main("test_3D.py", "--run", run, "--network", "subnet_a", cwd=tmp_path)
    assert_one_line_error(proc, "train_ugpl_3D.py predicts from its networks together (subnet_a, subnet_b)")


def test_recomputed_activations_give_the_same_loss_gradients_and_batch_norm_statistics():
    """``--recompute`` reruns each network's forward pass in the backward pass (dropout replayed, batch-norm
    statistics not updated twice): loss, gradients and running statistics must match the plain pass."""
    args = method_args("--batch_size", "2", "--labeled_bs", "1")
    torch.manual_seed(0)
    nets = {name: net.train() for name, net in ugpl.build_networks(args).items()}
    copies = copy.deepcopy(nets)
    image = torch.randn(2, 1, 32, 32, 16)
    label = (torch.rand(1, 32, 32, 16) > 0.7).long()
    losses = []
    for networks, recomputed in ((nets, False), (copies, True)):
        torch.manual_seed(1)
        outputs = {name: ugpl.forward(net, image, recomputed) for name, net in networks.items()}
        loss, _ = ugpl.ugpl_loss(outputs, label, proto_weight=0.1, args=args)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for name in nets:
        for (key, param), other in zip(nets[name].named_parameters(), copies[name].parameters()):
            assert torch.allclose(param.grad, other.grad, rtol=1e-5, atol=1e-8), (name, key)
        for key, buffer in nets[name].named_buffers():
            assert torch.equal(buffer, copies[name].get_buffer(key)), (name, key)


def test_killed_run_resumes_to_the_same_weights(synthetic_root, tmp_path, device):
    """Both networks, both optimisers and the batch-norm statistics continue exactly after a kill. Four
    iterations leave room for a kill that lands late on a loaded machine."""
    common = ["--root_path", synthetic_root, "--labelnum", "4", "--labeled_bs", "1", "--max_iterations", "4",
              "--save_interval", "1", "--no_eval", "--n_filters", "4", *TINY]
    straight, resumed, _, _ = straight_and_resumed(SCRIPT, common, "synthetic_LA/UGPL_4/resnet_vnet", 4, tmp_path,
                                                   device)
    assert set(straight) == {"subnet_a", "subnet_b"}
    assert_same_models(straight, resumed, device)


def test_script_code_faithful_runs_with_the_filter_off(synthetic_root, tmp_path):
    run = train(synthetic_root, tmp_path / "model", "--code_faithful", "--no_eval")
    assert json.loads((run / "config.json").read_text())["args"]["code_faithful"] is True
    log = (run / "log.txt").read_text()
    assert log.count("kept_fraction: 1.000000") == 2 and (run / "iter_2.pth").is_file()


def test_patch_size_the_resnet_cannot_take_is_a_one_line_error(synthetic_root, tmp_path):
    proc = run_main(SCRIPT, "--root_path", synthetic_root, "--output_root", tmp_path, "--labelnum", "4",
                    "--labeled_bs", "1", *TINY, "--patch_size", "24", "24", "16")
    assert_one_line_error(proc, "each size must be a positive multiple of 16")
    assert not (tmp_path / "LA").exists()


@pytest.mark.parametrize("flags, message", [
    (["--entropy_percentile", "150"], "--entropy_percentile must lie in (0, 100]"),
    (["--candidate_ratio", "0"], "--candidate_ratio must be at least 1"),
])
def test_impossible_method_settings_are_user_errors(synthetic_root, tmp_path, flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        ugpl.main(["--root_path", str(synthetic_root), "--output_root", str(tmp_path), "--labelnum", "4",
                   "--labeled_bs", "1", *TINY, *flags])
    assert not (tmp_path / "LA").exists()


@pytest.mark.skipif(REAL_LA is None, reason=REAL_LA_ABSENT)
def test_finite_loss_on_real_la_crops():
    args = method_args("--patch_size", "64", "64", "48", "--batch_size", "2", "--labeled_bs", "1")
    cases = LAHeart(REAL_LA, "train", num=2, transform=CenterCrop((64, 64, 48)))
    samples = [cases[i] for i in range(2)]
    image = torch.from_numpy(np.stack([s["image"] for s in samples])).unsqueeze(1).float()
    label = torch.from_numpy(samples[0]["label"][None]).long()
    assert label.sum() > 0
    torch.manual_seed(0)
    nets = {name: net.train() for name, net in ugpl.build_networks(args).items()}
    outputs = {name: ugpl.forward(net, image, False) for name, net in nets.items()}
    loss, terms = ugpl.ugpl_loss(outputs, label, proto_weight=0.1, args=args)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in terms.values())
    for net in nets.values():
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
