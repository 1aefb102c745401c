"""The command-line flags every training script shares (SSL4MIS names), and their validation.

A method script calls :func:`training_parser` with its paper's defaults, adds its own flags, and calls
:func:`finalize_args` after parsing, which fills dataset-dependent defaults and rejects impossible values
with one-line errors.
"""
import argparse
import math
from pathlib import Path, PurePath

from dataloaders.data_tag import data_tag
from utils.cli import REPO_ROOT, ArgumentParser, resolve_path
from utils.errors import UserError
from utils.lr_schedule import SCHEDULES
from utils.runtime import MAX_AUTO_WORKERS, auto_num_workers, select_device
from utils.sliding_window import check_window

# Flags that may differ when a run is resumed: they change where and how fast it runs or how often it saves,
# not what it computes (a run folder may also be moved: --output_root).
RUNTIME_FLAGS = ("resume", "overwrite", "accept_changes", "device", "num_workers", "cache", "sw_batch_size",
                 "no_eval", "progress", "recompute", "val_interval", "save_interval", "save_minutes", "output_root",
                 "channels_last", "compile")

# The largest --seed: torch's generators take seeds of 64 bits, without sign (numpy's take any size).
MAX_SEED = 2 ** 64 - 1

# Settings that got a flag after runs had been made, with the value every earlier run used: a run's stored
# arguments are completed with them (``stored_args``), so that older runs are still evaluated and resumed as
# they were trained.
SETTINGS_BEFORE_THEIR_FLAG = {"n_filters": 16, "label_seed": None, "val_num": 0, "channels_last": False,
                              "compile": False}


def workers(text):
    """``--num_workers``: ``auto`` or a whole number (checked in :func:`check_args`)."""
    return text if text == "auto" else int(text)


def stored_args(config):
    """The arguments of a run's ``config.json`` (a dict), completed with :data:`SETTINGS_BEFORE_THEIR_FLAG`."""
    return {**SETTINGS_BEFORE_THEIR_FLAG, **config["args"]}


def training_parser(description, *, exp, max_iterations, batch_size, base_lr, seed=1337,
                    semi_supervised=True, labeled_bs=2, model="vnet", models=None, consistency=0.1,
                    consistency_rampup=40.0):
    """An :class:`ArgumentParser` with the shared flags and the method's defaults.

    ``--model`` accepts ``models``, the networks the script can train (default: ``model`` alone), so that a
    name it cannot build or train is refused by the parser, before a run folder exists.

    Semi-supervised scripts also get ``--labeled_bs`` and the SSL4MIS consistency weight flags
    (``--consistency``, the maximum weight; ``--consistency_rampup``, the sigmoid ramp-up length in
    "epochs" of 150 iterations, see ``utils.ramps.consistency_weight``).
    """
    parser = ArgumentParser(description=description)
    # the flags counted in iterations, which a shorter protocol shrinks in proportion (add_schedule_flag)
    parser.schedule_flags = ["lr_step"] + (["iterations_per_epoch"] if semi_supervised else [])
    parser.add_argument("--print_protocol", action=PrintProtocol,
                        help="print the protocol reproduce.sh reads from this script (its run folder name, "
                             "network, schedule, controls) and exit")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="LA", help="LA, Pancreas or BraTS2019 (default: LA)")
    data.add_argument("--root_path", default=None,
                      help="data root (default: the dataset's folder under data/: data/LA, data/Pancreas, "
                           "data/BraTS2019)")
    data.add_argument("--labelnum", type=int, default=None,
                      help="number of labelled cases: the first N of the training list (default: the dataset's "
                           "10 %%: 8 for LA, 6 for Pancreas, 25 for BraTS2019)")
    data.add_argument("--label_seed", type=int, default=None,
                      help="draw the labelled cases at random with this seed, the same draw for every method "
                           "(default: none, the first --labelnum of the list, as the papers)")
    data.add_argument("--val_num", type=int, default=0,
                      help="hold the last N cases of the training list out as a validation set: validated every "
                           "--val_interval iterations, the best weights kept as best_val.pth and evaluated beside "
                           "the final ones (default: 0, the papers' protocol; LA and Pancreas)")
    data.add_argument("--patch_size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                      help="training crop, each divisible by 16 (default: the method's, else the dataset's: "
                           "112 112 80 for LA, 96 96 96 for Pancreas and BraTS2019)")
    data.add_argument("--num_workers", type=workers, default="auto",
                      help="data loader workers, or auto: 2 on the CPU; on a GPU every usable CPU but one, 2 to "
                           f"{MAX_AUTO_WORKERS} (default: auto). The batches do not depend on it")
    data.add_argument("--cache", type=int, choices=(0, 1), default=1,
                      help="keep the training volumes in memory (default: 1; about 12 MB per LA case)")

    run = parser.add_argument_group("run")
    run.add_argument("--exp", default=f"{{dataset}}/{exp}",
                     help="experiment name; the run goes to <output_root>/<exp>_<labelnum>/<model> (default: "
                          f"<data tag>/{exp}: LA/{exp} on LA, synthetic_LA/{exp} on synthetic.py's data, "
                          f"LA_half/{exp} on resample.py's half-resolution copy)")
    run.add_argument("--model", default=model, choices=models or (model,),
                     help="network name, one of those this method can train, also the last folder of the run "
                          "directory (default: %(default)s)")
    run.add_argument("--n_filters", type=int, default=16,
                     help="width of the networks: channels of the first encoder level, doubled at each of the "
                          "next four (default: 16, every paper's; a narrower network, the same for every "
                          "method, is a cheaper protocol)")
    run.add_argument("--output_root", default=str(REPO_ROOT / "model"),
                     help="where run directories go (default: model/ of the repository)")
    run.add_argument("--seed", type=int, default=seed, help="training seed (default: %(default)s)")
    run.add_argument("--deterministic", type=int, choices=(0, 1), default=1,
                     help="1: deterministic algorithms and no cuDNN benchmarking (default: 1)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    run.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    run.add_argument("--channels_last", action="store_true",
                     help="train in the channels-last-3d memory layout (the same step up to float rounding; "
                          "whether it is faster depends on the device: docs/benchmarks.md)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the networks' forward passes (CUDA only; the first iterations compile)")
    run.add_argument("--resume", action="store_true", help="continue the run in its directory from latest.pth")
    run.add_argument("--accept_changes", action="store_true",
                     help="with --resume: continue with settings that differ from the run's config.json (for "
                          "example a lower --base_lr after a NaN loss); the change is recorded there")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh; an existing run directory is moved aside to <dir>.old-<time>")
    run.add_argument("--save_interval", type=int, default=200,
                     help="write the resumable latest.pth every N iterations (default: 200)")
    run.add_argument("--save_minutes", type=float, default=10.0,
                     help="also write latest.pth when this many minutes have passed since the last save "
                          "(default: 10; 0: only every --save_interval)")
    run.add_argument("--snapshot_interval", type=int, default=1000,
                     help="keep weights iter_N.pth every N iterations (default: 1000; the last is always kept)")
    run.add_argument("--progress", type=int, choices=(0, 1), default=1, help="show progress bars (default: 1)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max_iterations", type=int, default=max_iterations, help="default: %(default)s")
    optim.add_argument("--batch_size", type=int, default=batch_size, help="crops per iteration (default: %(default)s)")
    if semi_supervised:
        optim.add_argument("--labeled_bs", type=int, default=labeled_bs,
                           help="labelled crops per batch; the rest of the batch is unlabelled (default: %(default)s)")
    if semi_supervised:
        optim.add_argument("--consistency", type=float, default=consistency,
                           help="maximum weight of the unsupervised loss (default: %(default)s)")
        optim.add_argument("--consistency_rampup", type=float, default=consistency_rampup,
                           help="sigmoid ramp-up length in epochs of --iterations_per_epoch iterations "
                                "(default: %(default)s)")
        optim.add_argument("--iterations_per_epoch", type=float, default=150.0,
                           help="the ramp's epoch: 150 iterations in UA-MT's LA code and its lineage; a shorter "
                                "schedule shrinks it in proportion (default: %(default)s)")
    optim.add_argument("--base_lr", type=float, default=base_lr, help="SGD learning rate (default: %(default)s)")
    optim.add_argument("--lr_schedule", choices=SCHEDULES, default="step", help="default: %(default)s")
    optim.add_argument("--lr_step", type=int, default=2500,
                       help="step schedule: iterations per decay (default: %(default)s)")
    optim.add_argument("--lr_gamma", type=float, default=0.1, help="step schedule: decay factor (default: %(default)s)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    optim.add_argument("--weight_decay", type=float, default=1e-4, help="SGD weight decay (default: %(default)s)")

    evaluation = parser.add_argument_group("final evaluation (sliding window on the test list)")
    evaluation.add_argument("--no_eval", action="store_true", help="skip the evaluation at the end")
    evaluation.add_argument("--stride_xy", type=int, default=None,
                            help="default: the dataset's (LA 18, Pancreas 16, BraTS2019 64)")
    evaluation.add_argument("--stride_z", type=int, default=None,
                            help="default: the dataset's (LA 4, Pancreas 16, BraTS2019 64)")
    evaluation.add_argument("--nms", type=int, choices=(0, 1), default=0,
                            help="keep the largest connected component")
    evaluation.add_argument("--sw_batch_size", type=int, default=4,
                            help="windows per forward pass (default: %(default)s)")
    validation = parser.add_argument_group("periodic validation (sliding window on the validation list)")
    validation.add_argument("--val_interval", type=int, default=0,
                            help="every N iterations, log the mean Dice on the validation set (BraTS2019's "
                                 "val.txt, or the --val_num cases) as val/dice and keep the best weights as "
                                 "best_val.pth; the training is unchanged (default: 0, off)")
    return parser


def add_schedule_flag(parser, dest):
    """Declare the flag ``dest`` of a :func:`training_parser` as counted in iterations (as UC-Seg's
    ``--mix_start``): ``reproduce.sh``'s shorter protocols shrink it with ``--max_iterations``."""
    parser.schedule_flags.append(dest)


def protocol(parser):
    """A training script's protocol as its parser's defaults say it, what ``reproduce.sh`` needs to run it
    (``utils/protocols.py``): ``exp``, the run folder's name (``--exp`` without its ``<dataset>/``); ``model``;
    ``max_iterations``; ``semi_supervised`` (it has ``--labeled_bs``); ``control`` (it has ``--labelled_only``,
    its matched control); ``recompute`` (it has ``--recompute``); ``schedule``, the flags counted in
    iterations with their defaults (``--lr_step`` only under the step schedule)."""
    dests = {action.dest for action in parser._actions}
    schedule = {dest: parser.get_default(dest) for dest in parser.schedule_flags}
    if parser.get_default("lr_schedule") != "step":
        schedule.pop("lr_step", None)
    return {"exp": str(parser.get_default("exp")).rsplit("/", 1)[-1], "model": parser.get_default("model"),
            "max_iterations": parser.get_default("max_iterations"), "semi_supervised": "labeled_bs" in dests,
            "control": "labelled_only" in dests, "recompute": "recompute" in dests, "schedule": schedule}


def protocol_text(parser):
    """:func:`protocol` as text: yes/no as 1/0, the schedule as the flags that give it (``--lr_step 2500 ...``)."""
    described = protocol(parser)
    described["schedule"] = " ".join(f"--{flag} {value}" for flag, value in described["schedule"].items())
    return {name: int(value) if isinstance(value, bool) else value for name, value in described.items()}


class PrintProtocol(argparse.Action):
    """``--print_protocol``: print :func:`protocol` as ``name value`` lines (1/0 for yes/no) and exit, as
    ``--help`` does."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        for name, value in protocol_text(parser).items():
            print(name, value)
        parser.exit(0)


def add_mean_teacher_args(parser, ema_decay=0.99):
    """``--ema_decay`` of a mean-teacher script (``utils.ema.update_ema``)."""
    group = parser.add_argument_group("mean teacher")
    group.add_argument("--ema_decay", type=float, default=ema_decay,
                       help="EMA decay of the teacher's weights (default: %(default)s)")
    return group


def add_control_args(parser):
    """``--labelled_only`` of a semi-supervised script: its matched control (docs/cpu_protocol.md, "Matched
    controls"). Each script implements it in its own loss, by one rule: a loss term that reads only unlabelled
    crops is switched off, one that the method computes over the whole batch is computed over the labelled
    crops alone; the networks still see the whole batch."""
    parser.add_argument("--labelled_only", type=int, choices=(0, 1), default=0,
                        help="1: the method's matched control: every loss term that reads an unlabelled crop is "
                             "switched off, or restricted to the labelled crops where the method computes it over "
                             "the whole batch; the networks still see every crop of the batch, so batch norm, "
                             "dropout, the heads and the schedule are the method's (default: 0)")


def crops_read(args, batch_size):
    """How many leading crops of a batch of ``batch_size`` a whole-batch loss term reads: every crop, or only
    the labelled ones under ``--labelled_only 1``."""
    return args.labeled_bs if args.labelled_only else batch_size


def add_uncertainty_args(parser, mc_samples=8, threshold_start=0.75, threshold_end=1.0):
    """Flags of UA-MT's Monte-Carlo dropout uncertainty (``utils.uncertainty``)."""
    group = parser.add_argument_group("uncertainty")
    group.add_argument("--mc_samples", type=int, default=mc_samples,
                       help="T, stochastic teacher passes per iteration (default: %(default)s)")
    group.add_argument("--threshold_start", type=float, default=threshold_start,
                       help="uncertainty threshold at iteration 0, as a fraction of ln 2 (default: %(default)s)")
    group.add_argument("--threshold_end", type=float, default=threshold_end,
                       help="threshold reached (sigmoid ramp) at the last iteration, fraction of ln 2 "
                            "(default: %(default)s)")
    return group


def check_mc_dropout(args):
    """MC-dropout uncertainty needs dropout: without it the teacher's passes differ only by input noise."""
    if not args.has_dropout and args.mc_samples > 1:
        raise UserError("--has_dropout 0 makes the teacher's MC-dropout passes identical up to input noise; "
                        "keep dropout, or pass --mc_samples 1 to accept that")


def finalize_args(args, dataset_spec):
    """Fill dataset defaults (root, labelled count, patch, strides) and reject impossible settings."""
    if args.root_path is None:
        args.root_path = str(REPO_ROOT / dataset_spec.default_root)
    else:
        args.root_path = str(resolve_path(args.root_path))
    if args.labelnum is None:
        args.labelnum = dataset_spec.labelnum
    args.patch_size = list(args.patch_size or dataset_spec.patch_size)
    args.stride_xy = dataset_spec.stride_xy if args.stride_xy is None else args.stride_xy
    args.stride_z = dataset_spec.stride_z if args.stride_z is None else args.stride_z
    args.output_root = str(resolve_path(args.output_root))
    args.exp = args.exp.replace("{dataset}", data_tag(dataset_spec.name, args.root_path))
    if args.num_workers == "auto":
        args.num_workers = auto_num_workers(select_device(args.device))
    check_args(args)
    check_validation(args, dataset_spec)
    return args


def check_finite(args):
    """Every floating-point flag (and every element of a list of them) must be a finite number: argparse
    accepts ``nan`` and ``inf``, which would train a run of NaN weights."""
    for name, value in vars(args).items():
        for element in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(element, float) and not math.isfinite(element):
                raise UserError(f"--{name} must be a finite number, got {element}")


def check_run_location(args):
    """``--exp`` names folders inside ``--output_root``: a relative path without ``..``, so that a run never
    lands, or moves a folder aside, outside the output root (``--model``, the last folder, is one of the
    script's network names, which the parser checks)."""
    exp = PurePath(args.exp)
    if exp.is_absolute() or ".." in exp.parts or not exp.parts:
        raise UserError(f"--exp {args.exp!r} must be a relative path inside --output_root (no '..', not absolute)")
    root = Path(args.output_root).resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"--output_root {args.output_root} is a file, not a folder")


def check_args(args):
    """One-line errors for flag values and combinations that cannot work, found before anything is trained:
    the evaluation's settings included, so that a run never trains for hours to fail at its evaluation."""
    check_finite(args)
    if any(p < 16 or p % 16 for p in args.patch_size):
        raise UserError(f"--patch_size {' '.join(map(str, args.patch_size))}: each size must be a positive "
                        "multiple of 16 (the V-Net halves the resolution four times)")
    check_window(args.patch_size, args.stride_xy, args.stride_z)
    if args.labelnum < 1:
        raise UserError(f"--labelnum must be at least 1, got {args.labelnum}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must lie in 0..{MAX_SEED} (what torch's generators take), got {args.seed}")
    if args.label_seed is not None and args.label_seed < 0:
        raise UserError(f"--label_seed must be >= 0, got {args.label_seed}")
    for flag in ("max_iterations", "batch_size", "save_interval", "snapshot_interval", "sw_batch_size", "lr_step",
                 "n_filters"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.base_lr <= 0:
        raise UserError(f"--base_lr must be positive, got {args.base_lr}")
    check_non_negative(args, "lr_gamma", "momentum", "weight_decay", "save_minutes")
    if args.accept_changes and not args.resume:
        raise UserError("--accept_changes only applies to --resume")
    labeled_bs = getattr(args, "labeled_bs", None)
    if labeled_bs is not None and not 1 <= labeled_bs < args.batch_size:
        raise UserError(f"--labeled_bs {labeled_bs} must be at least 1 and smaller than --batch_size "
                        f"{args.batch_size}, so that each batch holds labelled and unlabelled crops")
    check_non_negative(args, *(flag for flag in ("consistency", "consistency_rampup", "threshold_start",
                                                  "threshold_end") if hasattr(args, flag)))
    ema_decay = getattr(args, "ema_decay", None)
    if ema_decay is not None and not 0 <= ema_decay <= 1:
        raise UserError(f"--ema_decay must lie in [0, 1], got {ema_decay}")
    mc_samples = getattr(args, "mc_samples", None)
    if mc_samples is not None and mc_samples < 1:
        raise UserError(f"--mc_samples must be at least 1, got {mc_samples}")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the run, or start it afresh")
    check_run_location(args)


def check_validation(args, dataset_spec):
    """``--val_interval`` needs a validation set: the dataset's list (BraTS2019's val.txt) or, on LA and
    Pancreas, ``--val_num`` cases held out of the training list; ``--val_num`` needs ``--val_interval``."""
    check_non_negative(args, "val_interval", "val_num")
    splits = dataset_spec.dataset_class.SPLIT_FILES
    if args.val_num and "val" in splits:
        raise UserError(f"--val_num: dataset {dataset_spec.name} has its own validation list "
                        f"({splits['val']}); use --val_interval alone")
    if args.val_num and not args.val_interval:
        raise UserError(f"--val_num {args.val_num} needs --val_interval N: how many iterations apart to validate")
    if args.val_interval and "val" not in splits and not args.val_num:
        raise UserError(f"--val_interval: dataset {dataset_spec.name} has no validation list (only "
                        f"{', '.join(splits.values())}); hold cases of the training list out with --val_num K")


def check_non_negative(args, *flags):
    """One-line error for the first of ``flags`` (names of ``args`` attributes) that is negative."""
    for flag in flags:
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0, got {getattr(args, flag)}")


def check_labelnum(args, num_train, semi_supervised=True):
    """``--labelnum`` must fit the training list less the ``--val_num`` cases held out (and leave unlabelled
    cases for semi-supervision)."""
    if args.val_num >= num_train:
        raise UserError(f"--val_num {args.val_num} holds out every case of train.list ({num_train} cases)")
    held_out = f", less --val_num {args.val_num}" if args.val_num else ""
    limit = num_train - args.val_num - (1 if semi_supervised else 0)
    if args.labelnum > limit:
        leftover = " and leave unlabelled cases" if semi_supervised else ""
        raise UserError(f"--labelnum {args.labelnum} is larger than train.list allows ({num_train} cases"
                        f"{held_out}{leftover}; at most {limit})")


def add_evaluation_args(parser):
    """The flags that ``test_3D.py`` and ``test_released.py`` share, with the same meaning and defaults: which
    cases, windows per forward pass, the spacing of the distance metrics, NIfTI output, device and progress bar.
    (The window itself, ``--patch_size``, the strides and ``--nms``, defaults to the run's settings in one and
    to the dataset's in the other, so each script defines those.)"""
    parser.add_argument("--cases", nargs="+", default=None, help="evaluate only these case ids")
    parser.add_argument("--sw_batch_size", type=int, default=4, help="windows per forward pass (default: 4)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None,
                        help="voxel spacing for HD95/ASD in mm (default: voxel units, as the papers)")
    parser.add_argument("--save_nii", action="store_true", help="also write predictions as NIfTI")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--progress", type=int, choices=(0, 1), default=1, help="a progress bar (default: 1)")
