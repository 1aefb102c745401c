"""Mean teacher (Tarvainen & Valpola, NeurIPS 2017) for 3D segmentation, in the UA-MT lineage's LA protocol.

The student V-Net learns from the labelled crops (``0.5 * (CE + Dice)``) and from agreeing with its EMA
teacher on the unlabelled crops: the mean squared difference of their softmax outputs, the teacher seeing
the crops with clamped Gaussian noise. The consistency weight ramps up to 0.1 (sigmoid ramp, 40 "epochs"
of 150 iterations = 6000). Everything else is UA-MT's LA protocol without the uncertainty mask (see
docs/methods/mt.md).

    python code/train_mt_3D.py --labelnum 8
    python code/test_3D.py --run model/LA/MT_8/vnet
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from dataloaders.registry import get_dataset_spec  # noqa: E402
from dataloaders.training_data import build_training_data  # noqa: E402
from networks.net_factory_3d import PLAIN_VNETS, net_factory_3d  # noqa: E402
from utils import losses  # noqa: E402
from utils.args import add_control_args, add_mean_teacher_args, finalize_args, training_parser  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.ema import make_teacher, teacher_input, update_ema  # noqa: E402
from utils.ramps import consistency_weight  # noqa: E402
from utils.run import TrainingRun  # noqa: E402


def get_parser():
    parser = training_parser(__doc__.splitlines()[0], exp="MT", max_iterations=6000, batch_size=4,
                             base_lr=0.01, seed=1337, labeled_bs=2, model="vnet", models=PLAIN_VNETS,
                             consistency=0.1, consistency_rampup=40.0)
    add_mean_teacher_args(parser, ema_decay=0.99)
    add_control_args(parser)
    parser.add_argument("--has_dropout", type=int, choices=(0, 1), default=1,
                        help="Dropout3d(0.5) after the bottleneck and the last decoder block (default: 1)")
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


def mean_teacher_loss(logits, label, teacher_logits, weight, labeled_bs):
    """``0.5 * (CE + Dice)`` on the labelled crops ``+ weight * mean (softmax(s) - softmax(t))^2`` on the
    unlabelled ones; ``teacher_logits`` belong to the unlabelled crops (None: the control of
    ``--labelled_only``, the supervised part alone). Returns the total and its terms."""
    loss_ce, loss_dice = losses.ce_and_dice(logits[:labeled_bs], label)
    total = 0.5 * (loss_ce + loss_dice)
    terms = {"loss_ce": loss_ce, "loss_dice": loss_dice}
    if teacher_logits is None:
        return total, terms
    loss_consistency = losses.softmax_mse_loss(logits[labeled_bs:], teacher_logits).mean()
    terms.update(loss_consistency=loss_consistency, consistency_weight=weight)
    return total + weight * loss_consistency, terms


def teacher_prediction(teacher, unlabeled):
    """The teacher's logits on a noisy copy of the unlabelled crops, without gradient, in float32."""
    with torch.no_grad():
        return teacher(teacher_input(unlabeled)).float()


def main(argv=None):
    args = get_parser().parse_args(argv)
    spec = get_dataset_spec(args.dataset)
    finalize_args(args, spec)
    train_set, test_set, sampler = build_training_data(args, spec)

    run = TrainingRun(args, __file__)
    nets = build_networks(args)
    model = nets["model"].to(run.device).train()
    teacher = nets["ema_model"].to(run.device).train()  # train mode, as in the anchors (dropout on)
    optimizer = run.sgd(model.parameters())
    start, batches = run.begin(nets, {"optimizer": optimizer}, train_set, sampler, predict=predict)

    for iteration in run.iterations(start):
        batch = run.next_batch(batches)
        image = batch["image"]
        label = batch["label"][:args.labeled_bs]
        lr = run.update_lr(iteration, [optimizer])
        weight = consistency_weight(iteration, args.consistency, args.consistency_rampup,
                                    args.iterations_per_epoch)

        with run.autocast():
            teacher_logits = None if args.labelled_only else teacher_prediction(teacher, image[args.labeled_bs:])
            logits = model(image)
        loss, terms = mean_teacher_loss(logits.float(), label, teacher_logits, weight, args.labeled_bs)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(teacher, model, args.ema_decay, iteration)

        run.log(iteration + 1, lr, loss=loss, **terms)
        run.save(iteration + 1, nets, {"optimizer": optimizer})

    run.finish(predict, nets, test_set, spec.num_classes)


if __name__ == "__main__":
    run_cli(main)
