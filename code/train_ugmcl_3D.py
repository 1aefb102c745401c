"""UG-MCL: uncertainty-guided mutual consistency learning (Zhang et al., AIIM 2022; arXiv 2112.02508v2).

A dual-task V-Net (segmentation head + signed-distance head on the last decoder map) is the student; its
EMA copy is the teacher. Every iteration the student learns from

- the labelled crops (Sec. 3.1, ``L_sup``): CE + Dice on the segmentation and the regression of the
  normalised signed distance map ``T(y)`` (``L_dis``);
- intra-task consistency with the teacher (Sec. 3.2, ``L_itc``): ``beta`` x the segmentation term plus
  ``1 - beta`` x the distance term, each a squared difference averaged over the voxels whose teacher
  uncertainty (entropy of the mean of T = 8 MC-dropout passes) lies below a threshold ramped from
  0.75 ln 2 to ln 2;
- cross-task consistency (Sec. 3.3, ``L_ctc``): the segmentation probability against the distance map
  turned into a probability, ``sigmoid(-k * sdf)``, k = 1500.

``L = L_sup + lambda(t) * (L_itc + L_ctc)`` (Sec. 3.4), lambda ramped to 0.1 with the sigmoid ramp-up over
the 6000 iterations. The paper's equations are named here by their symbols (the numbering of the
AIIM version could not be checked). Defaults are the paper's LA setting (Sec. 4.2); docs/methods/ugmcl.md
lists where the released code differs and the flag that switches each choice.

    python code/train_ugmcl_3D.py --labelnum 16
    python code/test_3D.py --run model/LA/UGMCL_16/vnet_sdf
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from dataloaders.registry import get_dataset_spec  # noqa: E402
from dataloaders.training_data import build_training_data  # noqa: E402
from networks.net_factory_3d import net_factory_3d  # noqa: E402
from utils import losses  # noqa: E402
from utils.args import (add_control_args, add_mean_teacher_args, add_uncertainty_args,  # noqa: E402
                        check_mc_dropout, check_non_negative, crops_read, finalize_args, training_parser)
from utils.cli import run_cli  # noqa: E402
from utils.ema import make_teacher, teacher_input, update_ema  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.ramps import consistency_weight, uncertainty_threshold  # noqa: E402
from utils.run import TrainingRun  # noqa: E402
from utils.uncertainty import certain_mask, mc_dropout_uncertainty  # noqa: E402

SDF_LOSSES = ("mse", "mask_dice")
INTRA_SCOPES = ("batch", "unlabeled")


def get_parser():
    parser = training_parser(__doc__.splitlines()[0], exp="UGMCL", max_iterations=6000, batch_size=4,
                             base_lr=0.01, seed=1337, labeled_bs=2, model="vnet_sdf",
                             consistency=0.1, consistency_rampup=40.0)
    parser.set_defaults(nms=1)
    add_mean_teacher_args(parser, ema_decay=0.99)
    add_uncertainty_args(parser, mc_samples=8, threshold_start=0.75, threshold_end=1.0)
    method = parser.add_argument_group("UG-MCL")
    method.add_argument("--beta", type=float, default=0.75,
                        help="weight of the segmentation term in L_itc; 1 - beta weighs the distance term "
                             "(paper: 0.75; released code: 1)")
    method.add_argument("--sdf_k", type=float, default=1500.0,
                        help="k of the distance-to-probability transform sigmoid(-k sdf) (default: 1500)")
    method.add_argument("--seg_weight", type=float, default=1.0,
                        help="factor on CE + Dice in L_sup (paper: 1; released code and UA-MT: 0.5)")
    method.add_argument("--sdf_weight", type=float, default=1.0,
                        help="factor on L_dis in L_sup (paper: 1; 0 trains no distance on labels)")
    method.add_argument("--sdf_loss", choices=SDF_LOSSES, default="mse",
                        help="L_dis: mse = regression of T(y) (paper); mask_dice = Dice of sigmoid(-k sdf) "
                             "against the label (released code)")
    method.add_argument("--intra_weight", type=float, default=1.0,
                        help="factor on L_itc inside the ramped weight (0: no teacher, no uncertainty)")
    method.add_argument("--cross_weight", type=float, default=1.0, help="factor on L_ctc inside the ramped weight")
    method.add_argument("--intra_scope", choices=INTRA_SCOPES, default="batch",
                        help="crops that L_itc covers: the whole batch (released code) or the unlabelled "
                             "part (UA-MT on LA)")
    method.add_argument("--has_dropout", type=int, choices=(0, 1), default=1,
                        help="Dropout3d(0.5) after the bottleneck and the last decoder block; the teacher's "
                             "MC passes need it (default: 1)")
    add_control_args(parser)
    return parser


def check_method_args(args):
    """One-line errors for UG-MCL settings that cannot work."""
    if not 0 <= args.beta <= 1:
        raise UserError(f"--beta must lie in [0, 1], got {args.beta}")
    check_non_negative(args, "sdf_k", "seg_weight", "sdf_weight", "intra_weight", "cross_weight")
    if uses_teacher(args):
        check_mc_dropout(args)


def uses_teacher(args):
    """The teacher and its uncertainty are only needed when L_itc has a non-zero weight and crops to cover
    (none in the control of ``--labelled_only`` when it covers the unlabelled crops alone)."""
    return args.consistency > 0 and args.intra_weight > 0 and not (args.labelled_only
                                                                    and args.intra_scope == "unlabeled")


def intra_crops(args, batch_size):
    """``slice`` of the batch that L_itc covers: ``--intra_scope``, cut to the labelled crops in the control of
    ``--labelled_only``."""
    return slice(0 if args.intra_scope == "batch" else args.labeled_bs, crops_read(args, batch_size))


def build_networks(args):
    """Student (``model``) and EMA teacher (``ema_model``), on the CPU (also used by test_3D.py)."""
    model = net_factory_3d(args.model, in_chns=1, class_num=2, n_filters=args.n_filters, normalization="batchnorm",
                           has_dropout=bool(args.has_dropout))
    return {"model": model, "ema_model": make_teacher(model)}


INFERENCE_NETWORK = "model"  # the network predict() reads (test_3D.py --network evaluates another)


def predict(nets, x):
    """Class probabilities of the student's segmentation head (the paper's inference; also test_3D.py)."""
    logits, _ = nets[INFERENCE_NETWORK](x)
    return torch.softmax(logits, dim=1)


def sdf_to_probability(sdf, k):
    """``sigmoid(-k * sdf)``: the approximate inverse of the signed distance transform (DTC's T^-1), near 1
    inside the object (negative distance) and near 0 outside."""
    return torch.sigmoid(-k * sdf)


def supervised_loss(logits, sdf, label, sdf_target, args):
    """``L_sup = seg_weight * (CE + Dice) + sdf_weight * L_dis`` on the labelled crops (Sec. 3.1).

    ``L_dis`` is the mean squared error between the tanh distance head and ``T(y)`` (``--sdf_loss mse``),
    or the released code's Dice of ``sigmoid(-k sdf)`` against the label (``mask_dice``).
    """
    loss_ce, loss_dice = losses.ce_and_dice(logits, label)
    if args.sdf_loss == "mse":
        loss_sdf = torch.mean((sdf[:, 0] - sdf_target) ** 2)
    else:
        loss_sdf = losses.dice_loss(sdf_to_probability(sdf[:, 0], args.sdf_k), label == 1)
    total = args.seg_weight * (loss_ce + loss_dice) + args.sdf_weight * loss_sdf
    return total, {"loss_ce": loss_ce, "loss_dice": loss_dice, "loss_sdf": loss_sdf}


def intra_task_consistency(logits, sdf, teacher_logits, teacher_sdf, mask, beta):
    """``L_itc = beta * mean_certain ||p - p'||^2 + (1 - beta) * mean_certain (d - d')^2`` (Sec. 3.2).

    ``p, d`` are the student's class probabilities and distance map, ``p', d'`` the teacher's, and the
    means run over the voxels of ``mask`` (certain teacher voxels), averaged over channels as in UA-MT.
    """
    probs, teacher_probs = torch.softmax(logits, dim=1), torch.softmax(teacher_logits, dim=1)
    seg_term = losses.masked_mean((probs - teacher_probs) ** 2, mask)
    sdf_term = losses.masked_mean((sdf - teacher_sdf) ** 2, mask)
    return beta * seg_term + (1 - beta) * sdf_term, seg_term, sdf_term


def cross_task_consistency(logits, sdf, k):
    """``L_ctc = mean ||p_fg - sigmoid(-k d)||^2`` over every voxel of the batch (Sec. 3.3), with ``d`` the
    separate distance head (DTC's form). With two classes this equals comparing both channels against
    ``(1 - sigmoid(-k d), sigmoid(-k d))`` (the two squared errors are equal). The released (BraTS) code has no
    distance head: it compares each softmax channel ``c`` with ``sigmoid(-k tanh(z_c))`` of the same logits
    (docs/methods/ugmcl.md).
    """
    return torch.mean((torch.softmax(logits, dim=1)[:, 1:2] - sdf_to_probability(sdf, k)) ** 2)


def teacher_targets(teacher, image, args):
    """The teacher's prediction on a noisy copy of ``image`` and the uncertainty of ``args.mc_samples``
    MC-dropout passes (each with its own noise), without gradient: ``(logits, sdf, uncertainty)``."""
    with torch.no_grad():
        teacher_logits, teacher_sdf = teacher(teacher_input(image))
        _, uncertainty = mc_dropout_uncertainty(lambda x: torch.softmax(teacher(x)[0], dim=1), image,
                                                passes=args.mc_samples)
    return teacher_logits.float(), teacher_sdf.float(), uncertainty.float()


def ugmcl_loss(outputs, label, sdf_target, teacher, threshold, weight, args):
    """``L = L_sup + weight * (intra_weight * L_itc + cross_weight * L_ctc)`` (Sec. 3.4).

    ``outputs`` is the student's ``(logits, sdf)`` on the whole batch (labelled crops first), ``teacher``
    the output of :func:`teacher_targets` on the crops of :func:`intra_crops` (None when L_itc is off).
    L_ctc covers the whole batch, or the labelled crops alone in the control of ``--labelled_only``.
    Returns the total and a dict of every term for the log.
    """
    logits, sdf = outputs
    labeled, read = args.labeled_bs, crops_read(args, logits.shape[0])
    total, terms = supervised_loss(logits[:labeled], sdf[:labeled], label, sdf_target, args)
    loss_cross = cross_task_consistency(logits[:read], sdf[:read], args.sdf_k)
    unsupervised = args.cross_weight * loss_cross
    terms.update(loss_cross=loss_cross, consistency_weight=weight)
    if teacher is not None:
        teacher_logits, teacher_sdf, uncertainty = teacher
        crops = intra_crops(args, logits.shape[0])
        mask = certain_mask(uncertainty, threshold)
        loss_intra, intra_seg, intra_sdf = intra_task_consistency(
            logits[crops], sdf[crops], teacher_logits, teacher_sdf, mask, args.beta)
        unsupervised = unsupervised + args.intra_weight * loss_intra
        terms.update(loss_intra=loss_intra, loss_intra_seg=intra_seg, loss_intra_sdf=intra_sdf,
                     threshold=threshold, certain_fraction=mask.mean())
    return total + weight * unsupervised, terms


def main(argv=None):
    args = get_parser().parse_args(argv)
    spec = get_dataset_spec(args.dataset)
    finalize_args(args, spec)
    check_method_args(args)
    train_set, test_set, sampler = build_training_data(args, spec, signed_distance=True)

    run = TrainingRun(args, __file__)
    nets = build_networks(args)
    model = nets["model"].to(run.device).train()
    teacher = nets["ema_model"].to(run.device).train()  # train mode: dropout on for the MC passes, as UA-MT
    optimizer = run.sgd(model.parameters())
    start, batches = run.begin(nets, {"optimizer": optimizer}, train_set, sampler, predict=predict)

    for iteration in run.iterations(start):
        batch = run.next_batch(batches)
        image = batch["image"]
        label = batch["label"][:args.labeled_bs]
        sdf_target = batch["sdf"][:args.labeled_bs]
        lr = run.update_lr(iteration, [optimizer])
        weight = consistency_weight(iteration, args.consistency, args.consistency_rampup,
                                    args.iterations_per_epoch)
        threshold = uncertainty_threshold(iteration, args.max_iterations, args.threshold_start, args.threshold_end)

        with run.autocast():
            scope = image[intra_crops(args, image.shape[0])]
            targets = teacher_targets(teacher, scope, args) if uses_teacher(args) else None
            logits, sdf = model(image)
        loss, terms = ugmcl_loss((logits.float(), sdf.float()), label, sdf_target, targets, threshold, weight, args)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(teacher, model, args.ema_decay, iteration)

        run.log(iteration + 1, lr, loss=loss, **terms)
        run.save(iteration + 1, nets, {"optimizer": optimizer})

    run.finish(predict, nets, test_set, spec.num_classes)


if __name__ == "__main__":
    run_cli(main)
