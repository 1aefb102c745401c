"""Cross pseudo supervision (Chen et al., CVPR 2021) with two V-Nets, in the LA protocol of the others.

Two V-Nets of the same architecture start from different initialisations (He-normal and Glorot-normal
convolutions, as SSL4MIS's ``train_cross_pseudo_supervision_3D.py``). Each learns from the labelled crops
(``0.5 * (CE + Dice)``, SSL4MIS's two-class Dice) and, on the unlabelled crops, from the other network's
hard prediction through cross-entropy: ``CE(f1(x), argmax f2(x)) + CE(f2(x), argmax f1(x))``, with weight
0.1 ramped over 40 x 150 iterations. It is the dual-network baseline that UC-Seg and UGPL build on. SGD lr
0.01 x0.1 every 2500, 6000 iterations, batch 2 + 2; inference from the first network, as SSL4MIS
(see docs/methods/cps.md).

    python code/train_cps_3D.py --labelnum 8
    python code/test_3D.py --run model/LA/CPS_8/vnet
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dataloaders.registry import get_dataset_spec  # noqa: E402
from dataloaders.training_data import build_training_data  # noqa: E402
from networks.initialization import kaiming_normal_init, xavier_normal_init  # noqa: E402
from networks.net_factory_3d import PLAIN_VNETS, net_factory_3d  # noqa: E402
from utils import losses  # noqa: E402
from utils.args import add_control_args, finalize_args, training_parser  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.ramps import consistency_weight  # noqa: E402
from utils.run import TrainingRun  # noqa: E402

DICE = losses.DiceLoss(2)


def get_parser():
    parser = training_parser(__doc__.splitlines()[0], exp="CPS", max_iterations=6000, batch_size=4,
                             base_lr=0.01, seed=1337, labeled_bs=2, model="vnet", models=PLAIN_VNETS,
                             consistency=0.1, consistency_rampup=40.0)
    parser.add_argument("--has_dropout", type=int, choices=(0, 1), default=1,
                        help="Dropout3d(0.5) in both V-Nets (SSL4MIS's factory builds its vnet with it: 1)")
    add_control_args(parser)
    return parser


def build_networks(args):
    """The two differently initialised V-Nets, on the CPU (also used by test_3D.py)."""
    def vnet():
        return net_factory_3d(args.model, in_chns=1, class_num=2, n_filters=args.n_filters,
                              normalization="batchnorm", has_dropout=bool(args.has_dropout))
    return {"model1": kaiming_normal_init(vnet()), "model2": xavier_normal_init(vnet())}


INFERENCE_NETWORK = "model1"  # the network predict() reads (test_3D.py --network evaluates another)


def predict(nets, x):
    """Class probabilities of the first network (SSL4MIS evaluates each network alone)."""
    return torch.softmax(nets[INFERENCE_NETWORK](x), dim=1)


def supervised_loss(logits, label):
    """SSL4MIS's ``0.5 * (CE + DiceLoss(2))`` on the labelled crops."""
    return 0.5 * (F.cross_entropy(logits, label) + DICE(torch.softmax(logits, dim=1), label))


def cps_loss(logits1, logits2, label, weight, labeled_bs, labelled_only=False):
    """Both networks' supervised losses ``+ weight *`` the cross pseudo supervision on the unlabelled crops:
    each network's cross-entropy against the other's (detached) argmax (not computed in the control of
    ``--labelled_only``)."""
    loss_sup1 = supervised_loss(logits1[:labeled_bs], label)
    loss_sup2 = supervised_loss(logits2[:labeled_bs], label)
    terms = {"loss_sup1": loss_sup1, "loss_sup2": loss_sup2}
    if labelled_only:
        return loss_sup1 + loss_sup2, terms
    pseudo1 = torch.argmax(logits1[labeled_bs:].detach(), dim=1)
    pseudo2 = torch.argmax(logits2[labeled_bs:].detach(), dim=1)
    loss_cps1 = F.cross_entropy(logits1[labeled_bs:], pseudo2)
    loss_cps2 = F.cross_entropy(logits2[labeled_bs:], pseudo1)
    terms.update(loss_cps1=loss_cps1, loss_cps2=loss_cps2, consistency_weight=weight)
    return loss_sup1 + loss_sup2 + weight * (loss_cps1 + loss_cps2), terms


def main(argv=None):
    args = get_parser().parse_args(argv)
    spec = get_dataset_spec(args.dataset)
    finalize_args(args, spec)
    train_set, test_set, sampler = build_training_data(args, spec)

    run = TrainingRun(args, __file__)
    nets = build_networks(args)
    model1, model2 = nets["model1"].to(run.device).train(), nets["model2"].to(run.device).train()
    optimizers = {"optimizer1": run.sgd(model1.parameters()), "optimizer2": run.sgd(model2.parameters())}
    start, batches = run.begin(nets, optimizers, train_set, sampler, predict=predict)

    for iteration in run.iterations(start):
        batch = run.next_batch(batches)
        image = batch["image"]
        label = batch["label"][:args.labeled_bs]
        lr = run.update_lr(iteration, optimizers.values())
        weight = consistency_weight(iteration, args.consistency, args.consistency_rampup,
                                    args.iterations_per_epoch)

        with run.autocast():
            logits1, logits2 = model1(image), model2(image)
        loss, terms = cps_loss(logits1.float(), logits2.float(), label, weight, args.labeled_bs,
                               bool(args.labelled_only))

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
