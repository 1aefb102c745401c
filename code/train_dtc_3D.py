"""DTC: dual-task consistency (Luo et al., AAAI 2021), the LA protocol of its repository (``train_la_dtc.py``).

One V-Net with two heads on its last decoder map: a one-channel segmentation logit (sigmoid) and a tanh
signed-distance map. Labelled crops: Dice on the segmentation plus ``beta = 0.3`` x the mean squared error
between the distance head and the normalised signed distance map of the label. Every crop, labelled or not:
the dual-task consistency ``mean (sigmoid(seg) - sigmoid(-1500 sdf))^2``, weight 1.0 ramped over
40 x 150 iterations. SGD lr 0.01 x0.1 every 2500, 6000 iterations, batch 2 + 2, seed 1337; inference from
the segmentation head with the largest component kept (see docs/methods/dtc.md).

    python code/train_dtc_3D.py --labelnum 8
    python code/test_3D.py --run model/LA/DTC_8/vnet_sdf
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dataloaders.registry import get_dataset_spec  # noqa: E402
from dataloaders.training_data import build_training_data  # noqa: E402
from networks.net_factory_3d import net_factory_3d  # noqa: E402
from utils import losses  # noqa: E402
from utils.args import add_control_args, check_non_negative, crops_read, finalize_args, training_parser  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.ramps import consistency_weight  # noqa: E402
from utils.run import TrainingRun  # noqa: E402


def get_parser():
    parser = training_parser(__doc__.splitlines()[0], exp="DTC", max_iterations=6000, batch_size=4,
                             base_lr=0.01, seed=1337, labeled_bs=2, model="vnet_sdf",
                             consistency=1.0, consistency_rampup=40.0)
    parser.set_defaults(nms=1)
    method = parser.add_argument_group("DTC")
    method.add_argument("--beta", type=float, default=0.3, help="weight of the SDF regression (default: 0.3)")
    method.add_argument("--sdf_k", type=float, default=1500.0,
                        help="k of the transform sigmoid(-k sdf) from distance to mask (default: 1500)")
    method.add_argument("--ce_weight", type=float, default=0.0,
                        help="weight of a BCE term on the labelled crops; DTC computes it but leaves it out "
                             "of the loss (default: 0)")
    method.add_argument("--has_dropout", type=int, choices=(0, 1), default=1,
                        help="Dropout3d(0.5) after the bottleneck and the last decoder block (default: 1)")
    add_control_args(parser)
    return parser


def build_networks(args):
    """The dual-task V-Net (one segmentation channel, one distance channel), on the CPU."""
    return {"model": net_factory_3d(args.model, in_chns=1, class_num=1, n_filters=args.n_filters,
                                    normalization="batchnorm", has_dropout=bool(args.has_dropout))}


INFERENCE_NETWORK = "model"  # the network predict() reads (test_3D.py --network evaluates another)


def predict(nets, x):
    """``[1 - p, p]`` with ``p = sigmoid(segmentation logit)``: the argmax is DTC's ``p > 0.5``."""
    logits, _ = nets[INFERENCE_NETWORK](x)
    foreground = torch.sigmoid(logits)
    return torch.cat([1 - foreground, foreground], dim=1)


def dtc_loss(logits, sdf, label, sdf_target, weight, args):
    """``Dice(sigmoid(seg), y) + beta MSE(sdf, T(y)) [+ ce_weight BCE]`` on the labelled crops
    ``+ weight * mean (sigmoid(seg) - sigmoid(-k sdf))^2`` over the whole batch (DTC, Eq. of L_DTC), or over
    the labelled crops alone in the control of ``--labelled_only``."""
    labeled, read = args.labeled_bs, crops_read(args, logits.shape[0])
    probs = torch.sigmoid(logits)
    loss_dice = losses.dice_loss(probs[:labeled, 0], label == 1)
    loss_sdf = torch.mean((sdf[:labeled, 0] - sdf_target) ** 2)
    loss_ce = F.binary_cross_entropy_with_logits(logits[:labeled, 0], label.float())
    loss_consistency = torch.mean((torch.sigmoid(-args.sdf_k * sdf[:read]) - probs[:read]) ** 2)
    supervised = loss_dice + args.beta * loss_sdf + args.ce_weight * loss_ce
    return supervised + weight * loss_consistency, {
        "loss_dice": loss_dice, "loss_sdf": loss_sdf, "loss_ce": loss_ce,
        "loss_consistency": loss_consistency, "consistency_weight": weight}


def main(argv=None):
    args = get_parser().parse_args(argv)
    spec = get_dataset_spec(args.dataset)
    finalize_args(args, spec)
    check_non_negative(args, "beta", "sdf_k", "ce_weight")
    train_set, test_set, sampler = build_training_data(args, spec, signed_distance=True)

    run = TrainingRun(args, __file__)
    nets = build_networks(args)
    model = nets["model"].to(run.device).train()
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

        with run.autocast():
            logits, sdf = model(image)
        loss, terms = dtc_loss(logits.float(), sdf.float(), label, sdf_target, weight, args)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        run.log(iteration + 1, lr, loss=loss, **terms)
        run.save(iteration + 1, nets, {"optimizer": optimizer})

    run.finish(predict, nets, test_set, spec.num_classes)


if __name__ == "__main__":
    run_cli(main)
