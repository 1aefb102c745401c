"""A training run: its directory, logs, configuration, seeding, device, checkpoints and final evaluation.

Everything a method script would otherwise copy from its neighbour lives here, so a script holds only its
method. The run directory is ``<output_root>/{exp}_{labelnum}/{model}/`` (SSL4MIS) and holds

- ``log.txt``: SSL4MIS line format (``[HH:MM:SS.mmm] message``), one line per iteration;
- ``log/``: tensorboardX scalars ``info/lr``, ``info/total_loss``, ``info/<term>``;
- ``config.json``: every argument, the script, git commit, library versions, host, start time;
- ``latest.pth``: the resumable state (networks, optimisers, RNG), rewritten atomically;
- ``iter_<N>.pth``: network weights every ``--snapshot_interval`` iterations and at the end;
- with ``--val_interval N``: a ``val_dice`` line in ``log.txt`` and the scalar ``val/dice`` every N iterations;
- ``eval_<checkpoint>[_nms]/``: the final evaluation (see ``utils.evaluation``).
"""
import datetime as dt
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from dataloaders.registry import get_dataset_spec
from dataloaders.samplers import InfiniteBatches, seed_worker
from utils.args import RUNTIME_FLAGS
from utils.checkpoint import load_checkpoint, load_models, save_checkpoint
from utils.cli import REPO_ROOT
from utils.errors import UserError
from utils.evaluation import (eval_mode, evaluate, format_summary, new_eval_dir, prepare_for_inference,
                              validation_dice)
from utils.lr_schedule import lr_at, set_lr
from utils.runtime import autocast, capture_rng_state, restore_rng_state, seed_everything, select_device

LOG_FORMAT = "[%(asctime)s.%(msecs)03d] %(message)s"
LOG_DATEFMT = "%H:%M:%S"
LATEST = "latest.pth"


def run_directory(args):
    """``<output_root>/{exp}_{labelnum}/{model}``."""
    return Path(args.output_root) / f"{args.exp}_{args.labelnum}" / args.model


def snapshot_name(iteration):
    return f"iter_{iteration}.pth"


def _git(*cmd):
    return subprocess.run(["git", "-C", str(REPO_ROOT), *cmd], capture_output=True, text=True,
                          timeout=10).stdout


def _git_info(run_dir):
    """Commit and dirty flag of the code; with uncommitted edits (a researcher trying an idea), their
    diff is kept as ``git.diff`` in the run directory so that the run can be traced to its code."""
    try:
        commit = _git("rev-parse", "HEAD").strip() or None
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip())
        if dirty:
            (run_dir / "git.diff").write_text(_git("diff", "HEAD"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty, "diff": "git.diff" if dirty else None}


def _versions():
    import h5py
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                "h5py": h5py.__version__}
    try:
        import medpy
        versions["medpy"] = getattr(medpy, "__version__", "unknown")
    except ImportError:
        versions["medpy"] = None
    return versions


class _ConsoleHandler(logging.Handler):
    """Console output through ``tqdm.write`` (keeps the progress bar intact); skips per-iteration lines."""

    def emit(self, record):
        if getattr(record, "console", True):
            tqdm.write(self.format(record), file=sys.stdout)


def _make_logger(log_file):
    logger = logging.getLogger("ssl3d")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
    formatter = logging.Formatter(LOG_FORMAT, datefmt=LOG_DATEFMT)
    for handler in (logging.FileHandler(log_file), _ConsoleHandler()):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def _make_writer(log_dir, logger):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logger.info("tensorboardX is not installed: no tensorboard logs (log.txt has every value)")
        return None
    return SummaryWriter(str(log_dir))


class TrainingRun:
    """Set up (or resume) the run described by ``args`` for the script ``script_file``.

    Creating it validates the run directory against ``--resume``/``--overwrite``, opens the logs, writes
    or checks ``config.json``, seeds everything and selects the device.
    """

    def __init__(self, args, script_file):
        self.args = args
        self.script = Path(script_file).stem
        self.dir = run_directory(args)
        self.device = select_device(args.device)
        if args.amp and self.device.type != "cuda":
            raise UserError("--amp needs a CUDA device (bf16 autocast); drop it on the CPU")
        self._prepare_directory()
        self.logger = _make_logger(self.dir / "log.txt")
        self._write_config()
        seed_everything(args.seed, bool(args.deterministic))
        self.writer = _make_writer(self.dir / "log", self.logger)
        self.logger.info(str(args))
        self._bar = None
        self._validation = None

    # -- directory and configuration -------------------------------------------------------------------
    def _prepare_directory(self):
        exists = self.dir.exists() and any(self.dir.iterdir())
        if self.args.resume:
            if not (self.dir / LATEST).is_file():
                raise UserError(f"--resume: {self.dir} has no {LATEST} to continue from")
            return
        if exists and not self.args.overwrite:
            raise UserError(f"run directory {self.dir} already exists; pass --resume to continue it or "
                            "--overwrite to start afresh (the old one is kept as <dir>.old-<time>)")
        if exists:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            aside = self.dir.with_name(f"{self.dir.name}.old-{stamp}")
            os.replace(self.dir, aside)
            print(f"--overwrite: moved the previous run to {aside}", file=sys.stderr)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _write_config(self):
        path = self.dir / "config.json"
        current = {k: v for k, v in vars(self.args).items()}
        if self.args.resume:
            stored = json.loads(path.read_text())
            changed = {k: (stored["args"].get(k), v) for k, v in current.items()
                       if k not in RUNTIME_FLAGS and stored["args"].get(k) != v}
            if changed:
                detail = ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in sorted(changed.items()))
                raise UserError(f"--resume with settings that differ from the run's config.json: {detail}")
            stored.setdefault("resumed", []).append(dt.datetime.now().isoformat(timespec="seconds"))
            config = stored
        else:
            config = {"script": self.script, "args": current, "command": sys.argv,
                      "git": _git_info(self.dir), "versions": _versions(), "host": socket.gethostname(),
                      "device": str(self.device), "started": dt.datetime.now().isoformat(timespec="seconds")}
        tmp = path.with_name(".config.json.tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, path)

    # -- state ------------------------------------------------------------------------------------------
    def restore(self, models, optimizers):
        """With ``--resume``, load ``latest.pth`` into the networks and optimisers and restore every RNG;
        return the iteration to continue from (0 for a new run)."""
        if not self.args.resume:
            return 0
        path = self.dir / LATEST
        state = load_checkpoint(path, map_location=self.device)
        load_models(state, models, path, self.script)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        restore_rng_state({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state["rng"].items()})
        self.logger.info(f"resumed from {path} at iteration {state['iteration']}")
        return int(state["iteration"])

    def save(self, iteration, models, optimizers):
        """Write ``latest.pth`` every ``--save_interval`` iterations and ``iter_N.pth`` every
        ``--snapshot_interval``, both at the last iteration; then :meth:`validate` (``--val_interval``)."""
        last = iteration == self.args.max_iterations
        weights = {name: m.state_dict() for name, m in models.items()}
        if last or iteration % self.args.snapshot_interval == 0:
            save_checkpoint(self.dir / snapshot_name(iteration),
                            {"script": self.script, "iteration": iteration, "models": weights})
        if last or iteration % self.args.save_interval == 0:
            save_checkpoint(self.dir / LATEST, {
                "script": self.script, "iteration": iteration, "models": weights,
                "optimizers": {name: o.state_dict() for name, o in optimizers.items()},
                "rng": capture_rng_state()})
        self.validate(iteration)

    def validate(self, iteration):
        """With ``--val_interval N``, every N iterations (called by :meth:`save`): the mean Dice of the script's
        ``predict`` on the validation list (sliding window with the run's patch and strides, no
        largest-component step, as SSL4MIS), logged to ``log.txt`` and as ``val/dice``. The networks are in eval
        mode meanwhile and get their own modes back after; nothing draws from an RNG, so the training is the
        same with or without validation."""
        if self._validation is None or iteration % self.args.val_interval:
            return
        predict, models, dataset = self._validation
        with eval_mode(models):
            dice = validation_dice(
                lambda x: predict(models, x), dataset, patch_size=self.args.patch_size,
                stride_xy=self.args.stride_xy, stride_z=self.args.stride_z, num_classes=dataset.num_classes,
                device=self.device, sw_batch_size=self.args.sw_batch_size)
        self.logger.info(f"iteration {iteration} : val_dice : {dice:f} ({len(dataset)} cases of "
                         f"{dataset.SPLIT_FILES['val']})")
        if self.writer is not None:
            self.writer.add_scalar("val/dice", dice, iteration)

    # -- loop helpers -----------------------------------------------------------------------------------
    def sgd(self, parameters):
        """SGD over ``parameters`` with ``--base_lr --momentum --weight_decay`` (every anchor's optimiser)."""
        return torch.optim.SGD(parameters, lr=self.args.base_lr, momentum=self.args.momentum,
                               weight_decay=self.args.weight_decay)

    def begin(self, models, optimizers, train_set, sampler, predict=None):
        """Restore a resumed run (:meth:`restore`), open the endless batch stream at the iteration reached
        and log what the run trains on; return ``(start_iteration, batches)``. ``predict(models, x)``, the
        script's inference, is what ``--val_interval`` validates (:meth:`validate`)."""
        start = self.restore(models, optimizers)
        if self.args.val_interval:
            self._validation = (predict, models, self._validation_set(predict))
        batches = self.data_loader(train_set, InfiniteBatches(sampler, self.args.seed, start))
        if getattr(self.args, "labeled_bs", None) is None:
            cases = f"{len(train_set)} labelled cases"
        else:
            cases = f"{self.args.labelnum} labelled + {len(train_set) - self.args.labelnum} unlabelled cases"
        self.logger.info(f"{cases}, {len(sampler)} iterations per epoch, device {self.device}")
        return start, batches

    def _validation_set(self, predict):
        """The dataset's validation split (``--val_interval``; ``utils.args`` has checked that it has one)."""
        if predict is None:
            raise UserError(f"--val_interval: {self.script} does not hand its predict() to TrainingRun.begin")
        spec = get_dataset_spec(self.args.dataset)
        return spec.dataset_class(self.args.root_path, "val", num_classes=spec.num_classes)

    def next_batch(self, batches):
        """The next batch with every tensor on the run's device."""
        return {key: value.to(self.device, non_blocking=True) if torch.is_tensor(value) else value
                for key, value in next(batches).items()}

    def update_lr(self, iteration, optimizers):
        """Set the learning rate of (0-based) ``iteration`` (``--lr_schedule`` and its flags) on every
        optimiser; return it."""
        args = self.args
        lr = lr_at(iteration, args.base_lr, args.lr_schedule, args.max_iterations, args.lr_step, args.lr_gamma)
        for optimizer in optimizers:
            set_lr(optimizer, lr)
        return lr

    def data_loader(self, dataset, batches):
        """An iterator over batches: ``batches`` is a ``dataloaders.samplers.InfiniteBatches``."""
        generator = torch.Generator().manual_seed(self.args.seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=self.args.num_workers,
            pin_memory=self.device.type == "cuda", generator=generator,
            worker_init_fn=seed_worker)
        return iter(loader)

    def iterations(self, start):
        """Iterations ``start .. max_iterations - 1`` with a tqdm bar showing loss and lr."""
        self._bar = tqdm(range(start, self.args.max_iterations), initial=start, total=self.args.max_iterations,
                         ncols=100, desc=self.script, disable=not self.args.progress, file=sys.stdout)
        return self._bar

    def autocast(self):
        """bf16 autocast on CUDA when ``--amp`` is given."""
        return autocast(self.device, self.args.amp)

    def log(self, iteration, lr, **terms):
        """Log the loss terms of an iteration (1-based count of finished iterations): a ``log.txt`` line in
        SSL4MIS format, tensorboard scalars, and the progress bar. The first term is the total loss."""
        values = {name: value.item() if torch.is_tensor(value) else float(value) for name, value in terms.items()}
        names = list(values)
        line = f"iteration {iteration} : {names[0]} : {values[names[0]]:f}"
        line += "".join(f", {name}: {values[name]:f}" for name in names[1:]) + f", lr: {lr:g}"
        self.logger.info(line, extra={"console": False})
        if self.writer is not None:
            self.writer.add_scalar("info/lr", lr, iteration)
            for name, value in values.items():
                self.writer.add_scalar("info/total_loss" if name == "loss" else f"info/{name}", value, iteration)
        if self._bar is not None:
            self._bar.set_postfix({names[0]: f"{values[names[0]]:.4f}", "lr": f"{lr:.2g}"}, refresh=False)

    # -- end of run -------------------------------------------------------------------------------------
    def finish(self, predict, models, test_dataset, num_classes):
        """Close the logs and evaluate the final weights on the test list (unless ``--no_eval``)."""
        if self._bar is not None:
            self._bar.close()
        self.logger.info(f"training finished at iteration {self.args.max_iterations}; weights in {self.dir}")
        summary = None
        if not self.args.no_eval:
            prepare_for_inference(models, self.device)
            out_dir = new_eval_dir(self.dir, snapshot_name(self.args.max_iterations), self.args.nms)
            summary = evaluate(
                lambda x: predict(models, x), test_dataset, out_dir, patch_size=self.args.patch_size,
                stride_xy=self.args.stride_xy, stride_z=self.args.stride_z, num_classes=num_classes,
                device=self.device, sw_batch_size=self.args.sw_batch_size, nms=bool(self.args.nms),
                protocol_extra={"checkpoint": snapshot_name(self.args.max_iterations),
                                "iteration": self.args.max_iterations, "split": "test"},
                progress=bool(self.args.progress))
            self.logger.info(f"test ({out_dir.name}): {format_summary(summary)}")
            if self.writer is not None:
                self.writer.add_scalar("info/test_dice", summary["dice"]["mean"], self.args.max_iterations)
        if self.writer is not None:
            self.writer.close()
        return summary

