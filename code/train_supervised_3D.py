"""Labelled-only V-Net: the lower bound of every table (``--labelnum 80`` gives the fully supervised upper bound).

Protocol of UA-MT's supervised baseline (``train_LA.py``; see docs/methods/supervised.md): V-Net with
batchnorm and dropout, batch of 4 labelled 112x112x80 crops with random rotation/flip, loss
``0.5 * (CE + Dice)`` with the V-Net (squared) Dice on the foreground probability, SGD lr 0.01
(momentum 0.9, weight decay 1e-4) x0.1 every 2500 iterations, 6000 iterations, seed 1337. The final weights
are evaluated on the test list with the LA sliding window (stride 18/4).

    python code/train_supervised_3D.py --labelnum 8
    python code/test_3D.py --run model/LA/Supervised_8/vnet
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from dataloaders.registry import get_dataset_spec  # noqa: E402
from dataloaders.training_data import build_training_data  # noqa: E402
from networks.net_factory_3d import PLAIN_VNETS, net_factory_3d  # noqa: E402
from utils import losses  # noqa: E402
from utils.args import finalize_args, training_parser  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.run import TrainingRun  # noqa: E402


def get_parser():
    parser = training_parser(__doc__.splitlines()[0], exp="Supervised", max_iterations=6000, batch_size=4,
                             base_lr=0.01, seed=1337, semi_supervised=False, models=PLAIN_VNETS)
    parser.add_argument("--has_dropout", type=int, choices=(0, 1), default=1,
                        help="Dropout3d(0.5) after the bottleneck and last decoder block (UA-MT: 1)")
    return parser


def build_networks(args):
    """The networks of this method, on the CPU, by name (also used by test_3D.py)."""
    return {"model": net_factory_3d(args.model, in_chns=1, class_num=2, n_filters=args.n_filters,
                                    normalization="batchnorm", has_dropout=bool(args.has_dropout))}


INFERENCE_NETWORK = "model"  # the network predict() reads (test_3D.py --network evaluates another)


def predict(nets, x):
    """Class probabilities for a batch of windows (also used by test_3D.py)."""
    return torch.softmax(nets[INFERENCE_NETWORK](x), dim=1)


def supervised_loss(logits, label):
    """UA-MT's supervised loss: ``0.5 * (CE(logits, y) + DiceLoss(softmax(logits)[:, 1], y == 1))``."""
    loss_ce, loss_dice = losses.ce_and_dice(logits, label)
    return 0.5 * (loss_ce + loss_dice), loss_ce, loss_dice


def main(argv=None):
    args = get_parser().parse_args(argv)
    spec = get_dataset_spec(args.dataset)
    finalize_args(args, spec)

    train_set, test_set, sampler = build_training_data(args, spec, semi_supervised=False)

    run = TrainingRun(args, __file__)
    nets = build_networks(args)
    model = nets["model"].to(run.device).train()
    optimizer = run.sgd(model.parameters())
    start, batches = run.begin(nets, {"optimizer": optimizer}, train_set, sampler, predict=predict)

    for iteration in run.iterations(start):
        batch = run.next_batch(batches)
        image = batch["image"]
        label = batch["label"]
        lr = run.update_lr(iteration, [optimizer])

        with run.autocast():
            logits = model(image)
        loss, loss_ce, loss_dice = supervised_loss(logits.float(), label)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        run.log(iteration + 1, lr, loss=loss, loss_ce=loss_ce, loss_dice=loss_dice)
        run.save(iteration + 1, nets, {"optimizer": optimizer})

    run.finish(predict, nets, test_set, spec.num_classes)


if __name__ == "__main__":
    run_cli(main)
