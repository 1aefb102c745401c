"""UGPL: dual networks with uncertainty-guided pseudo-labels (Lu, Wu, Chaddad, Daqqaq, Kateb, arXiv 2509.13084).

Two networks see the same crop: subnet A, a 3D ResNet-34 encoder under the V-Net decoder
(``networks/resnet_vnet.py``), and subnet B, the UA-MT V-Net, each with its own SGD optimiser. On every batch
of 2 labelled + 2 unlabelled 112x112x80 crops the loss is

- supervised, per network: CE + Dice + 0.5 x ``L_cr``, the squared error of the foreground probability on
  the labelled voxels where exactly one network is confidently foreground (max probability >= 0.6). The
  network with the lower Dice loss is the iteration's winner, the other the loser;
- cross consistency enhancement: the pseudo-label is the union of both networks' foreground; a voxel is
  ignored where its entropy lies at or above the 20th percentile in both networks; both networks learn the
  kept voxels by CE, scaled by N / N_kept as the code;
- dynamic KL weighting: ``mean(exp(-KL) CE(z_A, argmax z_B)) + mean(KL(p_B || p_A))`` over the whole batch
  (the V-Net teaches the ResNet), plus the code's cosine consistency ``mean(1 - cos(p_A, p_B))``;
- prototype contrast on the loser's last decoder map (unlabelled crops): foreground and background
  prototypes from the kept voxels, ignored voxels pulled to their class prototype, the prototypes pushed
  apart; weight 0.1 with the sigmoid ramp over the 6000 iterations.

SGD lr 0.01 x0.1 at 2500 and 5000, momentum 0.9, weight decay 1e-4, seed 1337; inference averages the two
networks' softmax. Only the abstract and opening of the paper could be read, so the loss terms are named
after its modules and the released code (AIPMLab/Semi-supervised-Segmentation, ``train_LA.py``); in that
code the pseudo-label and prototype terms receive no gradient, which ``--code_faithful`` reproduces.
docs/methods/ugpl.md has the fidelity table.

    python code/train_ugpl_3D.py --labelnum 8
    python code/test_3D.py --run model/LA/UGPL_8/resnet_vnet
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dataloaders.registry import get_dataset_spec  # noqa: E402
from dataloaders.training_data import build_training_data  # noqa: E402
from networks.initialization import kaiming_normal_init  # noqa: E402
from networks.net_factory_3d import net_factory_3d  # noqa: E402
from utils import losses, recompute  # noqa: E402
from utils.args import add_control_args, check_non_negative, crops_read, finalize_args, training_parser  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.ramps import consistency_weight  # noqa: E402
from utils.run import TrainingRun  # noqa: E402

SUBNET_A_CHOICES = ("resnet_vnet", "vnet")
SEPARATIONS = ("push", "pull")
IGNORE = 2
ENTROPY_EPS = 1e-10


def get_parser():
    parser = training_parser(__doc__.splitlines()[0], exp="UGPL", max_iterations=6000, batch_size=4,
                             base_lr=0.01, seed=1337, labeled_bs=2, model="resnet_vnet", models=SUBNET_A_CHOICES,
                             consistency=0.1, consistency_rampup=40.0)
    method = parser.add_argument_group("UGPL (--model is subnet A: resnet_vnet, or vnet for two V-Nets)")
    method.add_argument("--code_faithful", action="store_true",
                        help="the released code's gradients: pseudo-label CE on detached probabilities, "
                             "prototype term without gradient, entropy of the raw logits (filter off)")
    method.add_argument("--cr_weight", type=float, default=0.5,
                        help="alpha, weight of the consistency-regularisation term L_cr (default: 0.5)")
    method.add_argument("--cr_threshold", type=float, default=0.6,
                        help="max probability that makes a foreground prediction confident in L_cr (default: 0.6)")
    method.add_argument("--entropy_percentile", type=float, default=20.0,
                        help="a voxel is ignored when its entropy is at or above this percentile in both "
                             "networks (default: 20)")
    method.add_argument("--kept_rescale", type=int, choices=(0, 1), default=1,
                        help="scale the pseudo-label CE by N / N_kept, as the code (default: 1)")
    method.add_argument("--pseudo_weight", type=float, default=1.0,
                        help="weight of the pseudo-label CE of both networks (default: 1)")
    method.add_argument("--kl_weight", type=float, default=1.0,
                        help="weight of the KL-rectified loss (default: 1)")
    method.add_argument("--kl_symmetric", action="store_true",
                        help="also let the ResNet teach the V-Net (the code: V-Net -> ResNet only)")
    method.add_argument("--cos_weight", type=float, default=1.0,
                        help="weight of the cosine consistency of the code (default: 1)")
    method.add_argument("--prototype_separation", choices=SEPARATIONS, default="push",
                        help="push: subtract the prototype distance (the paper's intent); pull: add it "
                             "(the code)")
    method.add_argument("--candidate_ratio", type=int, default=100,
                        help="k = (uncertain foreground voxels) // this, candidates drawn per class "
                             "(default: 100)")
    method.add_argument("--has_dropout", type=int, choices=(0, 1), default=1,
                        help="Dropout3d(0.5) in both networks, as the code (default: 1)")
    method.add_argument("--rot_flip", type=int, choices=(0, 1), default=0,
                        help="random rotation/flip before the crop (default: 0; the code only crops)")
    add_control_args(parser)
    recompute.add_recompute_args(parser)
    return parser


def check_method_args(args, spec):
    """One-line errors for UGPL settings that cannot work."""
    if spec.num_classes != 2:
        raise UserError(f"UGPL's union pseudo-label and prototypes are binary; {args.dataset} has "
                        f"{spec.num_classes} classes")
    if not 0 < args.entropy_percentile <= 100:
        raise UserError(f"--entropy_percentile must lie in (0, 100], got {args.entropy_percentile}")
    if not 0 <= args.cr_threshold <= 1:
        raise UserError(f"--cr_threshold must lie in [0, 1], got {args.cr_threshold}")
    check_non_negative(args, "cr_weight", "pseudo_weight", "kl_weight", "cos_weight")
    if args.candidate_ratio < 1:
        raise UserError(f"--candidate_ratio must be at least 1, got {args.candidate_ratio}")


def build_networks(args):
    """Subnet A (``--model``, the ResNet-34 V-Net) and subnet B (the V-Net), on the CPU, with the code's
    He-normal weights on every convolution and transposed convolution (also used by test_3D.py)."""
    def network(name):
        net = net_factory_3d(name, in_chns=1, class_num=2, n_filters=args.n_filters, normalization="batchnorm",
                             has_dropout=bool(args.has_dropout))
        return kaiming_normal_init(net, transposed=True)
    return {"subnet_a": network(args.model), "subnet_b": network("vnet")}


def predict(nets, x):
    """The average of the two networks' class probabilities (the code's test)."""
    return 0.5 * (torch.softmax(nets["subnet_a"](x), dim=1) + torch.softmax(nets["subnet_b"](x), dim=1))


def forward(net, image, recomputed):
    """``(logits, last decoder map)`` of ``net`` in float32; ``recomputed``: activations recomputed in the
    backward pass instead of kept (``utils.recompute``)."""
    logits, features = recompute.forward(net, image, enabled=recomputed, return_features=True)
    return logits.float(), features["decoder"].float()


def confident_disagreement(prob_a, prob_b, threshold):
    """``M = XOR(argmax p_A = 1 and max p_A >= t, argmax p_B = 1 and max p_B >= t)``: the voxels where exactly
    one network is confidently foreground (the code's ``conf_diff_mask``; MCF without the threshold)."""
    def confident_foreground(prob):
        top, prediction = prob.max(dim=1)
        return (prediction == 1) & (top >= threshold)
    return confident_foreground(prob_a) ^ confident_foreground(prob_b)


def supervised_loss(logits, label, mask, cr_weight):
    """``L_s = CE + Dice + alpha L_cr`` on the labelled crops, ``L_cr = sum M (p_fg - y)^2 / (sum M + 1e-16)``
    (the code's ``*_supervised_loss``); returns the total and its terms."""
    loss_ce, loss_dice = losses.ce_and_dice(logits, label)
    loss_cr = losses.masked_mean((torch.softmax(logits, dim=1)[:, 1] - label.float()) ** 2, mask)
    return loss_ce + loss_dice + cr_weight * loss_cr, {"ce": loss_ce, "dice": loss_dice, "cr": loss_cr}


def percentile(values, q):
    """The ``q``-th percentile of all elements with numpy's default linear interpolation; NaN when any
    element is NaN, as ``np.percentile`` (which is what switches the code's filter off)."""
    flat = values.flatten()
    if torch.isnan(flat).any():
        return flat.new_tensor(float("nan"))
    ordered = torch.sort(flat).values
    position = q / 100.0 * (flat.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, flat.numel() - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def high_entropy(logits, percent, code_faithful):
    """Voxels whose entropy ``-sum_c p log(p + 1e-10)`` is at or above its ``percent``-th percentile over the
    crops. The entropy is of the softmax; ``code_faithful`` takes it of the raw logits as the code does,
    where a negative logit makes it NaN and so marks no voxel."""
    source = logits if code_faithful else torch.softmax(logits, dim=1)
    entropy = losses.voxel_entropy(source, eps=ENTROPY_EPS)
    return entropy >= percentile(entropy, percent)


def filtered_pseudo_label(logits_a, logits_b, percent, code_faithful=False):
    """The pseudo-label of the cross consistency enhancement (the code's ``compute_uxi_loss*``): the union of
    both networks' foreground, set to ``IGNORE`` where both networks are uncertain (:func:`high_entropy`),
    so a voxel is kept when it is among the most confident of either network. No gradient."""
    with torch.no_grad():
        target = torch.maximum(logits_a.argmax(dim=1), logits_b.argmax(dim=1))
        uncertain = high_entropy(logits_a, percent, code_faithful) & high_entropy(logits_b, percent, code_faithful)
        return target.masked_fill(uncertain, IGNORE)


def pseudo_label_loss(logits, target, rescale, code_faithful=False):
    """``L_u = (N / N_kept) CE(z, y_hat)`` over the kept voxels of the unlabelled crops (``rescale`` keeps the
    factor of the code). ``code_faithful`` feeds the detached softmax as logits, as the code, so the term has
    no gradient. Nothing kept gives 0."""
    kept = target != IGNORE
    inputs = torch.softmax(logits, dim=1).detach() if code_faithful else logits
    loss = losses.cross_entropy(inputs, target, mask=kept, ignore_index=IGNORE)
    if rescale:
        loss = loss * target.numel() / kept.sum().clamp(min=1)
    return loss


def pseudo_foreground(target):
    """The foreground share of the kept voxels of the pseudo-label (0 when nothing is kept), logged: learnt with a
    gradient, the union of two networks' foreground can teach both their own over-segmentation, and this share
    shows that drift while a run trains (results/probes/ugpl_seed42/)."""
    kept = target != IGNORE
    return (target == 1).sum().float() / kept.sum().clamp(min=1)


def kl_rectified_loss(student_logits, teacher_logits):
    """Dynamic KL weighting (the code's ``uncertainty_rectified_loss``, the rectification of Zheng & Yang,
    IJCV 2021): ``mean(exp(-KL) CE(z_s, argmax z_t)) + mean(KL)``, ``KL = sum_c p_t (log p_t - log p_s)``.
    The teacher is detached; ``exp(-KL)`` is not, as in the code. The code's temperature only rescales the
    teacher's logits before the argmax, which it cannot change, so there is none here."""
    teacher_logits = teacher_logits.detach()
    voxel_ce = F.cross_entropy(student_logits, teacher_logits.argmax(dim=1), reduction="none")
    kl = losses.softmax_kl_loss(student_logits, teacher_logits).sum(dim=1)
    return torch.mean(torch.exp(-kl) * voxel_ce) + torch.mean(kl)


def cosine_consistency(prob_a, prob_b):
    """``mean(1 - cos(p_A, p_B))`` over the class dimension (the code's ``consist_loss``), both networks
    trained."""
    return torch.mean(1.0 - F.cosine_similarity(prob_a, prob_b, dim=1))


def unit_distance(x, y):
    """Mean Euclidean distance between the L2-normalised rows of ``x`` [n,C] and ``y`` [m,C] (the code's
    ``loss_fn``), in [0, 2]."""
    return torch.cdist(F.normalize(x, dim=1), F.normalize(y, dim=1)).mean()


def sample_rows(rows, mask, k):
    """``k`` rows of ``rows`` [N,C] drawn without replacement among those where ``mask`` [N] is set."""
    index = torch.nonzero(mask).squeeze(1)
    return rows[index[torch.randperm(index.numel(), device=index.device)[:k]]]


def prototype_contrast(features, target, prediction, candidate_ratio, push=True):
    """The prototype contrast (the code's ``con_loss``) on the loser's last decoder map ``features``
    [U,C,...] of the unlabelled crops, with the pseudo-label ``target`` and the loser's own ``prediction``.

    Prototypes ``P_fg, P_bg`` are the mean features of the kept voxels labelled 1 and 0. ``k = n // ratio``
    of the n ignored voxels the loser calls foreground are drawn, and ``k`` of those it calls background
    (the code's rule). ``L_c = d(C_fg, sg P_fg) + d(C_bg, sg P_bg) -/+ d(P_fg, P_bg)`` with ``d`` of
    :func:`unit_distance`: the candidates move to fixed prototypes, and the prototypes, through the kept
    voxels, move apart (``push``, bounded below by -2) or together (the code's ``+``). A term whose set is
    empty is 0.
    """
    flat = features.movedim(1, -1).reshape(-1, features.shape[1])
    target, prediction = target.reshape(-1), prediction.reshape(-1)
    prototypes = {c: flat[target == c].mean(dim=0, keepdim=True) for c in (0, 1) if (target == c).any()}
    uncertain = target == IGNORE
    k = int((uncertain & (prediction == 1)).sum()) // candidate_ratio
    loss = features.new_zeros(())
    for c, prototype in prototypes.items():
        candidates = uncertain & (prediction == c)
        if k > 0 and candidates.any():
            loss = loss + unit_distance(sample_rows(flat, candidates, k), prototype.detach())
    if len(prototypes) == 2:
        separation = unit_distance(prototypes[1], prototypes[0])
        loss = loss - separation if push else loss + separation
    return loss


def ugpl_loss(outputs, label, proto_weight, args):
    """``L = L_s^A + L_s^B + w_u (L_u^A + L_u^B) + w_kl L_kl + w_cos L_cos + lambda(t) L_c``.

    ``outputs`` maps ``subnet_a``/``subnet_b`` to ``(logits, features)`` on the whole batch (labelled crops
    first). The loser (higher labelled Dice loss; B on a tie, as the code) supplies the features of
    ``L_c``, whose gradient reaches only the loser. In the control of ``--labelled_only`` the terms of the
    unlabelled crops (L_u, L_c) are off and ``L_kl``, ``L_cos`` cover the labelled crops alone. Returns the
    total and a dict of every term for the log.
    """
    labeled, read = args.labeled_bs, crops_read(args, outputs["subnet_a"][0].shape[0])
    (logits_a, _), (logits_b, _) = outputs["subnet_a"], outputs["subnet_b"]
    prob_a, prob_b = torch.softmax(logits_a, dim=1), torch.softmax(logits_b, dim=1)
    mask = confident_disagreement(prob_a[:labeled].detach(), prob_b[:labeled].detach(), args.cr_threshold)
    sup_a, terms_a = supervised_loss(logits_a[:labeled], label, mask, args.cr_weight)
    sup_b, terms_b = supervised_loss(logits_b[:labeled], label, mask, args.cr_weight)
    loss_kl = kl_rectified_loss(logits_a[:read], logits_b[:read])
    if args.kl_symmetric:
        loss_kl = loss_kl + kl_rectified_loss(logits_b[:read], logits_a[:read])
    loss_cos = cosine_consistency(prob_a[:read], prob_b[:read])
    terms = {f"loss_{name}_{net}": value for net, net_terms in (("a", terms_a), ("b", terms_b))
             for name, value in net_terms.items()}
    terms.update(loss_sup_a=sup_a, loss_sup_b=sup_b, loss_kl=loss_kl, loss_cos=loss_cos)
    if args.labelled_only:
        return sup_a + sup_b + args.kl_weight * loss_kl + args.cos_weight * loss_cos, terms
    loser = "subnet_a" if terms_b["dice"] < terms_a["dice"] else "subnet_b"

    target = filtered_pseudo_label(logits_a[labeled:], logits_b[labeled:], args.entropy_percentile,
                                   args.code_faithful)
    loss_u_a = pseudo_label_loss(logits_a[labeled:], target, args.kept_rescale, args.code_faithful)
    loss_u_b = pseudo_label_loss(logits_b[labeled:], target, args.kept_rescale, args.code_faithful)
    loser_logits, loser_features = outputs[loser]
    with torch.set_grad_enabled(torch.is_grad_enabled() and not args.code_faithful):
        loss_proto = prototype_contrast(loser_features[labeled:], target, loser_logits[labeled:].argmax(dim=1),
                                        args.candidate_ratio, push=args.prototype_separation == "push")

    total = (sup_a + sup_b + args.pseudo_weight * (loss_u_a + loss_u_b) + args.kl_weight * loss_kl
             + args.cos_weight * loss_cos + proto_weight * loss_proto)
    terms.update(loss_u_a=loss_u_a, loss_u_b=loss_u_b, loss_proto=loss_proto, proto_weight=proto_weight,
                 kept_fraction=(target != IGNORE).float().mean(), pseudo_foreground=pseudo_foreground(target),
                 loser_is_a=float(loser == "subnet_a"))
    return total, terms


def main(argv=None):
    args = get_parser().parse_args(argv)
    spec = get_dataset_spec(args.dataset)
    finalize_args(args, spec)
    check_method_args(args, spec)
    train_set, test_set, sampler = build_training_data(args, spec, rot_flip=bool(args.rot_flip))

    run = TrainingRun(args, __file__)
    nets = build_networks(args)
    for net in nets.values():
        net.to(run.device).train()
    optimizers = {"optimizer_a": run.sgd(nets["subnet_a"].parameters()),
                  "optimizer_b": run.sgd(nets["subnet_b"].parameters())}
    start, batches = run.begin(nets, optimizers, train_set, sampler, predict=predict)
    recomputed = recompute.recompute_enabled(args.recompute, run.device)

    for iteration in run.iterations(start):
        batch = run.next_batch(batches)
        image = batch["image"]
        label = batch["label"][:args.labeled_bs]
        lr = run.update_lr(iteration, optimizers.values())
        proto_weight = consistency_weight(iteration, args.consistency, args.consistency_rampup,
                                          args.iterations_per_epoch)

        with run.autocast():
            outputs = {name: forward(net, image, recomputed) for name, net in nets.items()}
        loss, terms = ugpl_loss(outputs, label, proto_weight, args)

        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers.values():
            optimizer.step()

        run.log(iteration + 1, lr, loss=loss, **terms)
        run.save(iteration + 1, nets, optimizers)

    run.finish(predict, nets, test_set, spec.num_classes)


if __name__ == "__main__":
    run_cli(main)
