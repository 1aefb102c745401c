"""UA-MT: uncertainty-aware mean teacher (Yu et al., MICCAI 2019), the LA protocol of its repository.

Mean teacher whose consistency term keeps only the voxels the teacher is certain about: T = 8 noisy
MC-dropout passes of the teacher give the entropy of its mean prediction, and a voxel takes part while that
entropy lies below a threshold ramped from 0.75 ln 2 to ln 2 over training. Supervised loss
``0.5 * (CE + Dice)`` on the labelled crops, consistency ``sum(mask * mse) / (2 sum(mask))`` on the
unlabelled crops with weight 0.1 ramped over 40 x 150 iterations, SGD lr 0.01 x0.1 every 2500, 6000
iterations (``train_LA_meanteacher_certainty_unlabel.py``; see docs/methods/uamt.md).

    python code/train_uamt_3D.py --labelnum 8
    python code/test_3D.py --run model/LA/UAMT_8/vnet
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from dataloaders.registry import get_dataset_spec  # noqa: E402
from dataloaders.training_data import build_training_data  # noqa: E402
from networks.net_factory_3d import PLAIN_VNETS, net_factory_3d  # noqa: E402
from utils import losses  # noqa: E402
from utils.args import (add_control_args, add_mean_teacher_args, add_uncertainty_args,  # noqa: E402
                        check_mc_dropout, finalize_args, training_parser)
from utils.cli import run_cli  # noqa: E402
from utils.ema import make_teacher, teacher_input, update_ema  # noqa: E402
from utils.ramps import consistency_weight, uncertainty_threshold  # noqa: E402
from utils.run import TrainingRun  # noqa: E402
from utils.uncertainty import certain_mask, mc_dropout_uncertainty  # noqa: E402


def get_parser():
    parser = training_parser(__doc__.splitlines()[0], exp="UAMT", max_iterations=6000, batch_size=4,
                             base_lr=0.01, seed=1337, labeled_bs=2, model="vnet", models=PLAIN_VNETS,
                             consistency=0.1, consistency_rampup=40.0)
    add_mean_teacher_args(parser, ema_decay=0.99)
    add_uncertainty_args(parser, mc_samples=8, threshold_start=0.75, threshold_end=1.0)
    add_control_args(parser)
    parser.add_argument("--has_dropout", type=int, choices=(0, 1), default=1,
                        help="Dropout3d(0.5) after the bottleneck and the last decoder block; the teacher's "
                             "MC passes need it (default: 1)")
    return parser


def build_networks(args):
    """Student (``model``) and EMA teacher (``ema_model``), on the CPU (also used by test_3D.py)."""
    model = net_factory_3d(args.model, in_chns=1, class_num=2, n_filters=args.n_filters, normalization="batchnorm",
                           has_dropout=bool(args.has_dropout))
    return {"model": model, "ema_model": make_teacher(model)}


INFERENCE_NETWORK = "model"  # the network predict() reads (test_3D.py --network evaluates another)


def predict(nets, x):
    """Class probabilities of the student (also used by test_3D.py)."""
    return torch.softmax(nets[INFERENCE_NETWORK](x), dim=1)


def teacher_targets(teacher, unlabeled, mc_samples):
    """The teacher's logits on a noisy copy of the unlabelled crops and the entropy of ``mc_samples``
    further noisy MC-dropout passes, without gradient."""
    with torch.no_grad():
        teacher_logits = teacher(teacher_input(unlabeled))
        _, uncertainty = mc_dropout_uncertainty(lambda x: torch.softmax(teacher(x), dim=1), unlabeled,
                                                passes=mc_samples)
    return teacher_logits.float(), uncertainty.float()


def uamt_loss(logits, label, teacher, threshold, weight, labeled_bs):
    """``0.5 * (CE + Dice)`` on the labelled crops ``+ weight * masked mean (softmax(s) - softmax(t))^2``
    over the unlabelled voxels whose teacher uncertainty is below ``threshold``; ``teacher`` is the output of
    :func:`teacher_targets` (None: the control of ``--labelled_only``, the supervised part alone)."""
    loss_ce, loss_dice = losses.ce_and_dice(logits[:labeled_bs], label)
    total = 0.5 * (loss_ce + loss_dice)
    terms = {"loss_ce": loss_ce, "loss_dice": loss_dice}
    if teacher is None:
        return total, terms
    teacher_logits, uncertainty = teacher
    mask = certain_mask(uncertainty, threshold)
    loss_consistency = losses.masked_mean(losses.softmax_mse_loss(logits[labeled_bs:], teacher_logits), mask)
    terms.update(loss_consistency=loss_consistency, consistency_weight=weight, threshold=threshold,
                 certain_fraction=mask.mean())
    return total + weight * loss_consistency, terms


def main(argv=None):
    args = get_parser().parse_args(argv)
    spec = get_dataset_spec(args.dataset)
    finalize_args(args, spec)
    check_mc_dropout(args)
    train_set, test_set, sampler = build_training_data(args, spec)

    run = TrainingRun(args, __file__)
    nets = build_networks(args)
    model = nets["model"].to(run.device).train()
    teacher = nets["ema_model"].to(run.device).train()  # train mode: dropout on for the MC passes
    optimizer = run.sgd(model.parameters())
    start, batches = run.begin(nets, {"optimizer": optimizer}, train_set, sampler, predict=predict)

    for iteration in run.iterations(start):
        batch = run.next_batch(batches)
        image = batch["image"]
        label = batch["label"][:args.labeled_bs]
        lr = run.update_lr(iteration, [optimizer])
        weight = consistency_weight(iteration, args.consistency, args.consistency_rampup,
                                    args.iterations_per_epoch)
        threshold = uncertainty_threshold(iteration, args.max_iterations, args.threshold_start, args.threshold_end)

        with run.autocast():
            targets = None if args.labelled_only else teacher_targets(teacher, image[args.labeled_bs:],
                                                                       args.mc_samples)
            logits = model(image)
        loss, terms = uamt_loss(logits.float(), label, targets, threshold, weight, args.labeled_bs)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(teacher, model, args.ema_decay, iteration)

        run.log(iteration + 1, lr, loss=loss, **terms)
        run.save(iteration + 1, nets, {"optimizer": optimizer})

    run.finish(predict, nets, test_set, spec.num_classes)


if __name__ == "__main__":
    run_cli(main)
