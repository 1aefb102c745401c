"""UC-Seg: uncertainty-aware cross-training (Huang et al., IEEE TIP 2025; arXiv 2508.09014), official 3D code.

Two subnets of different architectures see the same crops: SSL4MIS's 3D U-Net (instance norm, dropout 0.3)
and a V-Net without normalisation or dropout. One SGD optimiser trains both together with the UPG fusion
head; there is no teacher. Per iteration, on 2 labelled + 2 unlabelled 96^3 crops:

- supervision of each subnet and of the fused head on the labelled crops: per-channel sigmoid BCE + Dice
  against one-hot labels, plus the evidential accuracy-vs-uncertainty term (``utils.evidential``);
- uncertainty-aware pseudo-label generation (UPG): cross-attention between the subnets' evidential
  uncertainty maps weights both logit maps, a 1x1x1 head fuses them; the fused prediction on the unlabelled
  crops, > 0.5 with its largest component kept, supervises both subnets with weight
  0.1 x 150 x sigmoid ramp (15 from iteration 30000);
- cross-subnet consistency preservation (CCP) on the three deepest encoder levels: intra-subnet feature
  enhancement (class prototypes against per-class memory queues, 0.2 x per subnet) and inter-subnet
  consistency (3x3x3 regional InfoNCE between the subnets, 0.1 x);
- from iteration 6000, copy-paste mixing (in the official trainer, not in the abstract): a 64^3 box
  exchanged between labelled and unlabelled crops, a second forward pass, the same terms on it.

SGD lr 0.01 decayed linearly, momentum 0.9, weight decay 1e-5, 50000 iterations, seed 42. Inference: the
fused head (both subnets are needed), sliding window 96^3 at stride 18/4, largest component.
docs/methods/ucseg.md lists every departure from the official code and the flag that switches it.

    python code/train_ucseg_3D.py --labelnum 8       # LA 10 %; --labelnum 4 (5 %), 16 (20 %)
    python code/test_3D.py --run model/LA/UCSeg_8/unet_3D_vnet
"""
import sys
from collections import namedtuple
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dataloaders.registry import get_dataset_spec  # noqa: E402
from dataloaders.training_data import build_training_data  # noqa: E402
from networks.memory_queue import ClassMemoryQueue  # noqa: E402
from networks.net_factory_3d import net_factory_3d  # noqa: E402
from networks.ucseg_fusion import UncertaintyGuidedFusion  # noqa: E402
from utils.args import (add_control_args, add_schedule_flag, check_non_negative, crops_read,  # noqa: E402
                        finalize_args, training_parser)
from utils.cli import run_cli  # noqa: E402
from utils.contrastive import masked_global_pool, prototype_queue_contrast, regional_info_nce  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.evidential import accuracy_uncertainty_loss, au_annealing  # noqa: E402
from utils.metrics import largest_connected_component  # noqa: E402
from utils.mixing import box_size, copy_paste, copy_paste_mask  # noqa: E402
from utils import recompute  # noqa: E402
from utils.ramps import consistency_weight  # noqa: E402
from utils.run import TrainingRun  # noqa: E402

MODEL = "unet_3D_vnet"
NUM_CLASSES = 2
LEVEL_FACTORS = (1, 2, 4, 8, 16)  # encoder width of levels 1..5 of both subnets, in --n_filters
DICE_SMOOTH = 1e-5
GATE_DICE_EPS = 1e-3
DICE_REDUCTIONS = ("slice", "volume")
GATE_DICE = ("soft", "hard")

Outputs = namedtuple("Outputs", ["logits1", "logits2", "fused", "features1", "features2"])


def get_parser():
    parser = training_parser(__doc__.splitlines()[0], exp="UCSeg", max_iterations=50000, batch_size=4,
                             base_lr=0.01, seed=42, labeled_bs=2, model=MODEL,
                             consistency=0.1, consistency_rampup=200.0)
    parser.set_defaults(patch_size=[96, 96, 96], lr_schedule="linear", weight_decay=1e-5, nms=1)
    nets = parser.add_argument_group("UC-Seg networks")
    nets.add_argument("--unet_dropout", type=float, default=0.3,
                      help="dropout after the U-Net's centre and last decoder block (default: 0.3)")
    nets.add_argument("--upg_patch", type=int, default=16,
                      help="edge of the cross-attention's tokens; the patch must be divisible by it (default: 16)")
    nets.add_argument("--upg_dim", type=int, default=1024, help="token embedding width (default: 1024)")
    nets.add_argument("--upg_heads", type=int, default=8, help="attention heads (default: 8)")
    nets.add_argument("--upg_head_dim", type=int, default=128, help="width per head (default: 128)")
    nets.add_argument("--upg_mlp_dim", type=int, default=384,
                      help="hidden width of the residual MLP (default: 384)")
    nets.add_argument("--upg_dropout", type=float, default=0.1,
                      help="dropout in the cross-attention (default: 0.1)")

    method = parser.add_argument_group("UC-Seg losses")
    method.add_argument("--consistency_scale", type=float, default=150.0,
                        help="extra factor on the ramped pseudo-label weight: 0.1 x 150 = 15 (official code)")
    method.add_argument("--dice_reduction", choices=DICE_REDUCTIONS, default="slice",
                        help="Dice sums: per z-slice, class and sample (official code: dims 2, 3) or per "
                             "volume (dims 2, 3, 4)")
    method.add_argument("--au_start", type=float, default=0.01,
                        help="weight of the accurate-but-uncertain term at iteration 0, annealed to 1 (UMIS: 0.01)")
    method.add_argument("--pseudo_lcc", type=int, choices=(0, 1), default=1,
                        help="keep the largest component of pseudo-labels and contrast masks (official nms=1)")
    method.add_argument("--ife_weight", type=float, default=0.2,
                        help="intra-subnet feature enhancement, inside each subnet's loss (embed_c_factor)")
    method.add_argument("--ic_weight", type=float, default=0.1,
                        help="inter-subnet consistency (embed_p_factor)")
    method.add_argument("--contrast_levels", type=int, nargs="+", default=[5, 4, 3],
                        help="encoder levels (1 = full resolution, 5 = 1/16) of both contrast terms "
                             "(default: the three deepest)")
    method.add_argument("--temperature", type=float, default=0.3, help="InfoNCE temperature (default: 0.3)")
    method.add_argument("--queue_size", type=int, default=144, help="entries per class queue (default: 144)")
    method.add_argument("--regions", type=int, default=3,
                        help="regions per axis of the inter-subnet term (default: 3)")
    method.add_argument("--contrast_normalize", type=int, choices=(0, 1), default=0,
                        help="L2-normalise features before the dot products (official code: 0, raw products)")
    method.add_argument("--gate_start", type=float, default=0.2,
                        help="queue writes need labelled Dice > gate_start + gate_slope t/T (default: 0.2)")
    method.add_argument("--gate_slope", type=float, default=0.56, help="see --gate_start (default: 0.56)")
    method.add_argument("--gate_dice", choices=GATE_DICE, default="soft",
                        help="Dice of the gate: sigmoid probabilities (official code, its val_coef's arguments "
                             "are swapped) or the thresholded prediction")
    method.add_argument("--shared_queue_pointer", type=int, choices=(0, 1), default=0,
                        help="1: one write pointer for all classes of a queue (official code's defect)")
    method.add_argument("--diff_weight", type=float, default=0.0,
                        help="cross-subnet prediction BCE with real gradients; the official code adds 0.5 x "
                             "it as a Python float (no gradient), so the default is 0")
    method.add_argument("--mix_start", type=int, default=6000,
                        help="first iteration of the copy-paste branch (default: 6000; >= max_iterations: never)")
    add_schedule_flag(parser, "mix_start")
    method.add_argument("--mix_fraction", type=float, default=2.0 / 3.0,
                        help="box edge as a fraction of the patch: int(96 x 2/3) = 64 (default: 2/3)")
    add_control_args(parser)
    recompute.add_recompute_args(parser)
    return parser


def mixing_enabled(args):
    """Copy-paste mixing pairs labelled with unlabelled crops: never in the control of ``--labelled_only``."""
    return args.mix_start < args.max_iterations and not args.labelled_only


def check_method_args(args):
    """One-line errors for UC-Seg settings that cannot work."""
    if args.upg_patch < 1:
        raise UserError(f"--upg_patch must be at least 1, got {args.upg_patch}")
    if any(size % args.upg_patch for size in args.patch_size):
        raise UserError(f"--patch_size {' '.join(map(str, args.patch_size))}: each size must be a multiple of "
                        f"--upg_patch {args.upg_patch} (the cross-attention's tokens)")
    levels = args.contrast_levels
    if not set(levels) <= {1, 2, 3, 4, 5} or len(set(levels)) != len(levels):
        raise UserError(f"--contrast_levels must be distinct encoder levels 1..5, got {args.contrast_levels}")
    for flag in ("upg_dim", "upg_heads", "upg_head_dim", "upg_mlp_dim", "queue_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("unet_dropout", "upg_dropout"):
        if not 0 <= getattr(args, flag) < 1:
            raise UserError(f"--{flag} must lie in [0, 1), got {getattr(args, flag)}")
    check_non_negative(args, "consistency_scale", "ife_weight", "ic_weight", "diff_weight", "gate_slope")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    if args.regions < 2:
        raise UserError(f"--regions must be at least 2 (a region needs other regions as negatives), "
                        f"got {args.regions}")
    if not 0 < args.au_start <= 1:
        raise UserError(f"--au_start must lie in (0, 1], got {args.au_start}")
    if mixing_enabled(args):
        check_mixing(args)


def check_mixing(args):
    """The copy-paste branch pairs labelled crop i with unlabelled crop i and needs room to place the box."""
    if args.batch_size != 2 * args.labeled_bs:
        raise UserError(f"copy-paste mixing pairs each labelled crop with an unlabelled one: --batch_size "
                        f"{args.batch_size} must be twice --labeled_bs {args.labeled_bs} (or --mix_start "
                        f">= --max_iterations)")
    boxes = box_size(args.patch_size, args.mix_fraction)
    if not 0 < args.mix_fraction < 1 or any(box < 1 or size - box < 1 for size, box in zip(args.patch_size, boxes)):
        raise UserError(f"--mix_fraction {args.mix_fraction} gives a box {boxes} that does not fit strictly "
                        f"inside the patch {args.patch_size}")


def queue_name(subnet, level):
    """Key of the memory queue of ``subnet`` (1 or 2) at encoder ``level``."""
    return f"net{subnet}_level{level}"


def build_networks(args):
    """The two subnets, the UPG head and the memory queues (buffers), on the CPU (also used by test_3D.py)."""
    net1 = net_factory_3d("unet_3D", in_chns=1, class_num=NUM_CLASSES, n_filters=args.n_filters,
                          dropout=args.unet_dropout)
    net2 = net_factory_3d("vnet", in_chns=1, class_num=NUM_CLASSES, n_filters=args.n_filters, normalization="none",
                          has_dropout=False)
    upg = UncertaintyGuidedFusion(args.patch_size, NUM_CLASSES, patch=args.upg_patch, dim=args.upg_dim,
                                  heads=args.upg_heads, head_dim=args.upg_head_dim, mlp_dim=args.upg_mlp_dim,
                                  dropout=args.upg_dropout)
    queues = nn.ModuleDict({
        queue_name(subnet, level): ClassMemoryQueue(NUM_CLASSES, args.n_filters * LEVEL_FACTORS[level - 1],
                                                    args.queue_size, shared_pointer=bool(args.shared_queue_pointer))
        for subnet in (1, 2) for level in args.contrast_levels})
    return {"net1": net1, "net2": net2, "upg": upg, "queues": queues}


def trainable_parameters(nets):
    """Both subnets and the UPG head: the official code's single optimiser (the queues are buffers)."""
    return [p for name in ("net1", "net2", "upg") for p in nets[name].parameters()]


def two_class_probabilities(fused_logits):
    """``[1 - p, p]`` with ``p = sigmoid`` of the foreground channel: the official inference thresholds
    ``p`` at 0.5, which the sliding window's argmax reproduces."""
    foreground = torch.sigmoid(fused_logits[:, 1:2])
    return torch.cat([1.0 - foreground, foreground], dim=1)


def predict(nets, x):
    """Class probabilities of the fused head (the official inference; also test_3D.py)."""
    return two_class_probabilities(nets["upg"](nets["net1"](x), nets["net2"](x)))


def forward(nets, image, levels, recomputed):
    """Both subnets, the fused head, and the encoder features of ``levels``, as float32 :data:`Outputs`;
    ``recomputed``: the subnets' activations are recomputed in the backward pass (``utils.recompute``)."""
    logits1, features1 = recompute.forward(nets["net1"], image, enabled=recomputed, return_features=True)
    logits2, features2 = recompute.forward(nets["net2"], image, enabled=recomputed, return_features=True)
    fused = nets["upg"](logits1, logits2)
    return Outputs(logits1.float(), logits2.float(), fused.float(),
                   [features1["encoder"][level - 1].float() for level in levels],
                   [features2["encoder"][level - 1].float() for level in levels])


def one_hot(label):
    """Class indices [B, X, Y, Z] -> float one-hot [B, 2, X, Y, Z]."""
    return F.one_hot(label.long(), NUM_CLASSES).permute(0, 4, 1, 2, 3).float()


def sigmoid_dice_loss(probs, target, reduction):
    """The official ``dice_loss``: ``1 - (2 sum(p y) + 1e-5) / (sum p + sum y + 1e-5)`` per sample and class
    (background too), averaged. The official sums run over dims (2, 3) only, i.e. per z-slice on 3D crops
    (``slice``); ``volume`` sums over the whole crop."""
    dims = (2, 3) if reduction == "slice" else tuple(range(2, probs.dim()))
    intersection = torch.sum(probs * target, dim=dims)
    union = torch.sum(probs, dim=dims) + torch.sum(target, dim=dims)
    return torch.mean(1.0 - (2.0 * intersection + DICE_SMOOTH) / (union + DICE_SMOOTH))


def segmentation_loss(logits, target, dice_reduction):
    """``L_seg``: per-channel sigmoid BCE (mean; smp's ``SoftBCEWithLogitsLoss``) + Dice of the sigmoid,
    against a one-hot ``target`` of the logits' shape."""
    return F.binary_cross_entropy_with_logits(logits, target) + sigmoid_dice_loss(torch.sigmoid(logits), target,
                                                                                  dice_reduction)


def supervised_loss(logits, label, annealing, args):
    """``L_seg + L_AU`` on labelled crops (each subnet, and the fused head)."""
    return (segmentation_loss(logits, one_hot(label), args.dice_reduction)
            + accuracy_uncertainty_loss(logits, label.long(), annealing))


@torch.no_grad()
def foreground_masks(logits, lcc):
    """One-hot [B, 2, ...] of ``sigmoid(z)[:, 1] >= 0.5``, with the largest component of each sample when
    ``lcc`` (the official ``get_cut_mask``): pseudo-labels and contrast masks, without gradient."""
    foreground = (torch.sigmoid(logits[:, 1]) >= 0.5).to(torch.uint8)
    if lcc:
        kept = [largest_connected_component(mask) for mask in foreground.cpu().numpy()]
        foreground = torch.from_numpy(np.stack(kept)).to(logits.device)
    return one_hot(foreground)


def resize_mask(mask, size):
    """Trilinear resize of a one-hot mask to a feature map's size, thresholded at 0.5 (official code)."""
    return (F.interpolate(mask, size=tuple(size), mode="trilinear", align_corners=False) > 0.5).float()


def feature_enhancement_loss(features, masks, queue, args):
    """Intra-subnet feature enhancement at one level: each class prototype (the mean over all voxels of
    the features times the class mask) contrasted with its class queue's mean (positive) and the other
    class's entries (negatives); mean over classes."""
    masks = resize_mask(masks, features.shape[2:])
    losses = [prototype_queue_contrast(masked_global_pool(features, masks[:, c:c + 1]), queue.positive(c),
                                       queue.negatives(c), args.temperature, bool(args.contrast_normalize))
              for c in range(NUM_CLASSES)]
    return torch.stack(losses).mean()


def ccp_losses(outputs, queues, args):
    """Cross-subnet consistency preservation on one forward pass: ``(IFE_1, IFE_2, IC)``, each averaged over
    the contrast levels. The IFE masks are each subnet's own largest-component prediction."""
    masks = (foreground_masks(outputs.logits1, args.pseudo_lcc), foreground_masks(outputs.logits2, args.pseudo_lcc))
    ife = []
    for subnet, features in ((1, outputs.features1), (2, outputs.features2)):
        per_level = [feature_enhancement_loss(f, masks[subnet - 1], queues[queue_name(subnet, level)], args)
                     for f, level in zip(features, args.contrast_levels)]
        ife.append(torch.stack(per_level).mean())
    ic = torch.stack([regional_info_nce(f1, f2, args.regions, args.temperature, bool(args.contrast_normalize))
                      for f1, f2 in zip(outputs.features1, outputs.features2)]).mean()
    return ife[0], ife[1], ic


def prediction_consistency(logits, other):
    """BCE of one subnet's foreground probability against the other's (detached): the official
    ``loss_diff`` with the gradient it was meant to have (only the last channel counts there too).

    Weights that diverged (a too large ``--base_lr``) give NaN probabilities, which ``binary_cross_entropy``
    refuses, as input or target, with an error (a device-side assert on CUDA); the term is then NaN instead, so
    that the run stops with its one-line report of a non-finite loss (``TrainingRun.log``). Finite inputs give
    the same bits as before."""
    prob = torch.sigmoid(logits[:, -1]).clamp(1e-8, 1 - 1e-7)
    target = torch.sigmoid(other[:, -1]).detach()
    finite = torch.isfinite(prob).all() & torch.isfinite(target).all()
    loss = F.binary_cross_entropy(torch.where(finite, prob, 0.5), torch.where(finite, target, 0.5))
    return torch.where(finite, loss, torch.nan)


@torch.no_grad()
def labelled_dice(logits, label, hard):
    """Foreground Dice of a subnet on the labelled crops, for the queue gate (the official ``val_coef``:
    ``2 sum(p y) / (sum p + sum y + 1e-3)``, 0 when both are empty; ``p`` is the sigmoid probability, or
    the thresholded prediction when ``hard``)."""
    prob = torch.sigmoid(logits[:, 1])
    prob = (prob > 0.5).float() if hard else prob
    target = (label == 1).float()
    denominator = prob.sum() + target.sum()
    return 0.0 if denominator == 0 else float(2.0 * (prob * target).sum() / (denominator + GATE_DICE_EPS))


def queue_gate(iteration, args):
    """Dice a subnet must exceed on the labelled crops for its queues to be written: ``0.2 + 0.56 t/T``."""
    return args.gate_start + args.gate_slope * iteration / args.max_iterations


def enqueue_class_features(queue, features, targets):
    """Write each class's pooled features (mean over all voxels of features x class mask) of every sample."""
    targets = resize_mask(targets, features.shape[2:])
    for c in range(NUM_CLASSES):
        queue.push(c, masked_global_pool(features, targets[:, c:c + 1]))


def update_queues(queues, subnet, features, targets, dice, gate, levels):
    """Write ``subnet``'s queues at every level when its labelled Dice exceeds ``gate``; return whether it did."""
    if dice <= gate:
        return False
    for f, level in zip(features, levels):
        enqueue_class_features(queues[queue_name(subnet, level)], f.detach(), targets)
    return True


def mix_batch(image, targets, labeled_bs, fraction):
    """Copy-paste: labelled crop ``i`` and unlabelled crop ``i`` exchange one random box (shared by the batch);
    with probability 1/2 the labelled crop is outside the box, else inside. ``targets`` are the one-hot
    labels of the labelled crops followed by the pseudo-labels. Returns ``(mixed images, mixed targets)``."""
    mask = copy_paste_mask(image.shape[2:], fraction, device=image.device)
    if float(torch.rand(())) <= 0.5:
        mask = 1.0 - mask
    mixed_image = copy_paste(image[:labeled_bs], image[labeled_bs:], mask)
    mixed_target = copy_paste(targets[:labeled_bs], targets[labeled_bs:], mask)
    return mixed_image, mixed_target


def supervised_total(terms):
    """The labelled part of ``L = (L_1 + L_2) / 2 + L_fuse + ...``: ``(L_sup,1 + L_sup,2) / 2 + L_fuse``."""
    return 0.5 * (terms["loss_sup1"] + terms["loss_sup2"]) + terms["loss_fuse"]


def unsupervised_total(terms, weight, args):
    """The part of ``L`` one pass contributes: ``(U_1 + U_2) / 2 + ic_weight IC`` with
    ``U_k = weight L_uns,k + ife_weight IFE_k + diff_weight L_diff,k``. The official trainer averages each
    term over the plain and the mixed pass before summing; ``L`` is linear in them, so half of each pass's
    part is the same loss."""
    subnet_losses = []
    for k in (1, 2):
        loss = args.ife_weight * terms[f"loss_ife{k}"]
        if f"loss_unsup{k}" in terms:
            loss = weight * terms[f"loss_unsup{k}"] + loss
        if args.diff_weight > 0:
            loss = loss + args.diff_weight * terms[f"loss_diff{k}"]
        subnet_losses.append(loss)
    return 0.5 * (subnet_losses[0] + subnet_losses[1]) + args.ic_weight * terms["loss_ic"]


def pass_terms(outputs, targets, first, queues, args):
    """The unsupervised term of one pass (crops ``first:`` against ``targets``: the unlabelled crops against
    their pseudo-labels, or every mixed crop against its mixed label; none when ``targets`` is None, in the
    control of ``--labelled_only``), and its contrast and prediction-consistency terms over all its crops."""
    ife1, ife2, ic = ccp_losses(outputs, queues, args)
    terms = {"loss_ife1": ife1, "loss_ife2": ife2, "loss_ic": ic,
             "loss_diff1": prediction_consistency(outputs.logits1, outputs.logits2),
             "loss_diff2": prediction_consistency(outputs.logits2, outputs.logits1)}
    if targets is not None:
        terms.update(loss_unsup1=segmentation_loss(outputs.logits1[first:], targets, args.dice_reduction),
                     loss_unsup2=segmentation_loss(outputs.logits2[first:], targets, args.dice_reduction))
    return terms


def leading_crops(outputs, count):
    """The :data:`Outputs` of the first ``count`` crops of a pass (logits, fused logits and features)."""
    return Outputs(outputs.logits1[:count], outputs.logits2[:count], outputs.fused[:count],
                   [f[:count] for f in outputs.features1], [f[:count] for f in outputs.features2])


def ucseg_step(nets, image, label, iteration, args, autocast, recomputed=False):
    """Backpropagate the loss of one iteration on ``image`` (labelled crops first) and the labelled crops'
    ``label``; write the memory queues when the gate opens. Returns ``(loss, terms for the log)``, detached.

    With mixing, the plain pass is backpropagated before the mixed pass is built, so that the two passes'
    graphs never coexist; the gradients accumulate to those of the whole loss. In the control of
    ``--labelled_only`` there are no pseudo-labels and no mixing, and the contrast terms and the queues read
    the labelled crops alone."""
    labeled, queues = args.labeled_bs, nets["queues"]
    with autocast():
        outputs = forward(nets, image, args.contrast_levels, recomputed)
    annealing = au_annealing(iteration, args.max_iterations, args.au_start)
    pseudo = None if args.labelled_only else foreground_masks(outputs.fused[labeled:], args.pseudo_lcc)
    terms = {"loss_sup1": supervised_loss(outputs.logits1[:labeled], label, annealing, args),
             "loss_sup2": supervised_loss(outputs.logits2[:labeled], label, annealing, args),
             "loss_fuse": supervised_loss(outputs.fused[:labeled], label, annealing, args)}
    read = leading_crops(outputs, crops_read(args, image.shape[0]))
    plain = pass_terms(read, pseudo, labeled, queues, args)

    targets = one_hot(label) if pseudo is None else torch.cat([one_hot(label), pseudo])
    gate = queue_gate(iteration, args)
    for k, logits, features in ((1, read.logits1, read.features1), (2, read.logits2, read.features2)):
        dice = labelled_dice(logits[:labeled], label, args.gate_dice == "hard")
        written = update_queues(queues, k, features, targets, dice, gate, args.contrast_levels)
        terms.update({f"dice{k}": dice, f"queue_write{k}": float(written)})

    mixing = mixing_enabled(args) and iteration >= args.mix_start
    weight = args.consistency_scale * consistency_weight(iteration, args.consistency, args.consistency_rampup,
                                                         args.iterations_per_epoch)
    loss = supervised_total(terms) + (0.5 if mixing else 1.0) * unsupervised_total(plain, weight, args)
    loss.backward()
    loss = loss.detach()
    if mixing:
        mixed_image, mixed_target = mix_batch(image, targets, labeled, args.mix_fraction)
        with autocast():
            mixed = forward(nets, mixed_image, args.contrast_levels, recomputed)
        mixed_terms = pass_terms(mixed, mixed_target, 0, queues, args)
        mixed_loss = 0.5 * unsupervised_total(mixed_terms, weight, args)
        mixed_loss.backward()
        loss = loss + mixed_loss.detach()
        for name, value in mixed_terms.items():
            terms[name] = 0.5 * (plain[name] + value)
            terms[f"{name}_mix"] = value
    else:
        terms.update(plain)
    terms.update(consistency_weight=weight, queue_gate=gate, annealing=annealing)
    return loss, {name: value.detach() if torch.is_tensor(value) else value for name, value in terms.items()}


def main(argv=None):
    args = get_parser().parse_args(argv)
    spec = get_dataset_spec(args.dataset)
    finalize_args(args, spec)
    check_method_args(args)
    train_set, test_set, sampler = build_training_data(args, spec)

    run = TrainingRun(args, __file__)
    nets = build_networks(args)
    for net in nets.values():
        net.to(run.device).train()
    optimizer = run.sgd(trainable_parameters(nets))
    start, batches = run.begin(nets, {"optimizer": optimizer}, train_set, sampler, predict=predict)
    recomputed = recompute.recompute_enabled(args.recompute, run.device)

    for iteration in run.iterations(start):
        batch = run.next_batch(batches)
        lr = run.update_lr(iteration, [optimizer])
        optimizer.zero_grad(set_to_none=True)
        loss, terms = ucseg_step(nets, batch["image"], batch["label"][:args.labeled_bs], iteration, args,
                                 run.autocast, recomputed)
        optimizer.step()

        run.log(iteration + 1, lr, loss=loss, **terms)
        run.save(iteration + 1, nets, {"optimizer": optimizer})

    run.finish(predict, nets, test_set, spec.num_classes)


if __name__ == "__main__":
    run_cli(main)
