"""A training run: its directory, logs, configuration, seeding, device, checkpoints and final evaluation.

Everything a method script would otherwise copy from its neighbour lives here, so a script holds only its
method. The run directory is ``<output_root>/{exp}_{labelnum}/{model}/`` (SSL4MIS) and holds

- ``log.txt``: SSL4MIS line format (``[HH:MM:SS.mmm] message``), one line per iteration;
- ``log/``: tensorboardX scalars ``info/lr``, ``info/total_loss``, ``info/<term>``;
- ``config.json``: every argument, the script, git commit, library versions, host, start time;
- ``latest.pth``: the resumable state (networks, optimisers, RNG), rewritten atomically every
  ``--save_interval`` iterations, every ``--save_minutes`` minutes, and when SIGINT or SIGTERM stops the run;
- ``iter_<N>.pth``: network weights every ``--snapshot_interval`` iterations and at the end;
- with ``--val_interval N``: a ``val_dice`` line in ``log.txt`` and the scalar ``val/dice`` every N iterations;
- ``eval_<checkpoint>[_nms]/``: the final evaluation (see ``utils.evaluation``);
- ``.lock``: held by the one process that trains in the folder (``utils.folder_lock``).

What a run survives (the README's "What survives what"): SIGKILL or a power cut at any moment loses at most the
iterations since the last save, and ``--resume`` continues bit-exactly (a deterministic CPU run ends with the
same weights); SIGINT and SIGTERM save at the end of the current iteration, print the command that resumes and
exit ``128 + signal``; a loss or a weight that turns NaN or infinite stops the run before anything is saved.
"""
import atexit
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import shlex
import socket
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dataloaders.data_tag import data_record
from dataloaders.registry import get_dataset_spec
from dataloaders.samplers import InfiniteBatches, seed_worker
from utils.args import RUNTIME_FLAGS, stored_args
from utils.atomic import write_atomically, write_json
from utils.checkpoint import load_checkpoint, load_models, save_checkpoint
from utils.cli import bar_interval, install_stop_handlers
from utils.errors import Interrupted, UserError, signal_name
from utils.evaluation import (check_evaluation_dependencies, eval_mode, evaluate, format_summary,
                              prepare_for_inference, selection_record, validation_dice)
from utils.folder_lock import LOCK_FILE, FolderLock
from utils.lr_schedule import lr_at, set_lr
from utils.provenance import code_record, file_sha256
from utils.run_files import BEST_VAL, LATEST, aside_name, snapshot_name
from utils.runtime import (autocast, capture_rng_state, prepare_for_training, quiet_determinism_warnings,
                           restore_rng_state, seed_everything, select_device, to_step_layout)

LOG_FORMAT = "[%(asctime)s.%(msecs)03d] %(message)s"
LOG_DATEFMT = "%H:%M:%S"
PREFETCH_BATCHES = 4  # per loader worker (PyTorch's default is 2)
_UNREAD = object()  # TrainingRun._best before best_val.pth was looked at


CPU_NOTE_HOURS = 3.0  # a CPU run whose rest takes longer gets a note after its second iteration (_time_steps)


def signal_note(text):
    """Write ``text`` to stderr from a signal handler, unbuffered (a ``print`` there may fail with a reentrant
    call); a stderr without a file descriptor (a test runner capturing the output of an in-process run) gets
    nothing, so that the handler never fails and the stop goes through."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError, AttributeError):
        pass


def run_directory(args):
    """``<output_root>/{exp}_{labelnum}/{model}``."""
    return Path(args.output_root) / f"{args.exp}_{args.labelnum}" / args.model


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


def changed_settings(stored, current):
    """``{flag: (stored value, current value)}`` for every setting of ``current`` (a dict of arguments) that
    differs from ``stored`` (the run's ``config.json`` arguments), the flags that do not change what a run
    computes (``RUNTIME_FLAGS``) aside."""
    return {k: (stored.get(k), v) for k, v in current.items() if k not in RUNTIME_FLAGS and stored.get(k) != v}


def describe_changes(changes):
    """``--base_lr 0.01 -> 0.02, --labelnum 8 -> 16``."""
    return ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in sorted(changes.items()))


def resume_command(argv=None):
    """The command that continues the run started by ``argv`` (default ``sys.argv``): the same flags without
    ``--overwrite``, with ``--resume``."""
    argv = list(sys.argv if argv is None else argv)
    flags = [flag for flag in argv[1:] if flag != "--overwrite"]
    if "--resume" not in flags:
        flags.append("--resume")
    return shlex.join(["python", argv[0], *flags])


def first_non_finite(values):
    """``(name, value)`` of the term to blame when some of ``values`` (name -> float, the total first) are not
    finite: the first non-finite term after the total, else the total; None when all are finite."""
    bad = [(name, value) for name, value in values.items() if not math.isfinite(value)]
    if not bad:
        return None
    total = next(iter(values))
    return next(((name, value) for name, value in bad if name != total), bad[0])


def non_finite_weight(weights):
    """``(network, key)`` of the first floating-point tensor in ``weights`` (name -> state dict) holding a NaN
    or an infinity, else None."""
    for name, state in weights.items():
        for key, tensor in state.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return name, key
    return None


def loader_error_message(exc):
    """One line for an exception that a data loader worker raised: PyTorch re-raises it in the main process
    with the worker's whole traceback in its message (``Caught DataError in DataLoader worker process 0.
    Original Traceback ...``); the last line of that traceback holds the original message."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        match = re.match(r"^[\w.]+: (.*)$", lines[-1].strip())
        return match[1] if match else lines[-1].strip()
    return lines[0] if lines else type(exc).__name__


def shut_down_workers(iterator):
    """Stop a data loader's workers at the process's exit, whatever way it exits.

    The workers ignore SIGTERM (``dataloaders.samplers.seed_worker``), so the loader must stop them through
    their queues; it does so when the iterator is garbage-collected, which an exit through an exception may
    not reach before ``multiprocessing`` joins its children (and waits forever on a worker that ignored its
    SIGTERM). Registered with ``atexit`` after PyTorch's own exit hook, so it runs before that hook turns the
    shutdown into a no-op."""
    shut_down = getattr(iterator, "_shutdown_workers", None)
    if shut_down is not None:
        shut_down()


class TrainingRun:
    """Set up (or resume) the run described by ``args`` for the script ``script_file``.

    Creating it validates the run directory against ``--resume``/``--overwrite``, takes the folder's lock,
    opens the logs, writes or checks ``config.json``, seeds everything and selects the device.
    """

    def __init__(self, args, script_file):
        self.args = args
        self.script = Path(script_file).stem
        self.script_file = Path(script_file)
        self.dir = run_directory(args)
        self.device = select_device(args.device)
        if args.amp and self.device.type != "cuda":
            raise UserError("--amp needs a CUDA device (bf16 autocast); drop it on the CPU")
        if args.compile and self.device.type != "cuda":
            raise UserError("--compile is for CUDA devices (on the CPU compiling takes minutes and is untested "
                            "here); drop it on the CPU")
        check_evaluation_dependencies()
        self._bar = None
        self._validation = None
        self._best = _UNREAD
        self._stop_signal = None
        self._accepted_changes = None  # (time, changed settings) of --accept_changes, until the first step
        self._saved_iteration = None
        self._last_save_time = time.monotonic()
        self._step_times = []  # the time at the end of each of the first iterations of this process
        self._lock = self._prepare_directory()
        try:
            self._open()
        except BaseException:  # refused settings, a failed write: the folder is free at once, not at exit
            self._lock.release()
            raise

    def _open(self):
        """Open the logs, write or check ``config.json``, seed everything (the folder is locked)."""
        self.logger = _make_logger(self.dir / "log.txt")
        self._write_config()
        seed_everything(self.args.seed, bool(self.args.deterministic))
        self.writer = _make_writer(self.dir / "log", self.logger)
        self.logger.info(str(self.args), extra={"console": False})  # every setting, in log.txt (and config.json)
        determinism_note = quiet_determinism_warnings(self.device, self.args.deterministic)
        if determinism_note:
            self.logger.info(determinism_note)

    # -- directory and configuration -------------------------------------------------------------------
    def _holds_anything(self):
        return self.dir.is_dir() and any(p.name != LOCK_FILE for p in self.dir.iterdir())

    def _prepare_directory(self):
        """Create (or, with ``--resume``, find) the run folder and lock it; return the lock.

        ``--overwrite`` moves an existing folder aside only after taking its lock, so a run that is still
        training is never moved from under its process."""
        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run folder {self.dir}: {exc.strerror or exc} "
                            f"(--output_root {self.args.output_root})") from None
        if self.args.resume:
            if not self.dir.is_dir():
                raise UserError(f"--resume: there is no run to continue at {self.dir} (no {LATEST}); "
                                "start it without --resume")
            return self._lock_folder()
        if self._holds_anything():
            if not self.args.overwrite:
                self._lock_folder().release()  # a folder another process trains in is named as such
                raise UserError(f"run directory {self.dir} already exists; pass --resume to continue it or "
                                "--overwrite to start afresh (the old one is kept as <dir>.old-<time>)")
            self._move_aside()
        try:
            self.dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run folder {self.dir}: {exc.strerror or exc}") from None
        lock = self._lock_folder()
        if self._holds_anything():
            lock.release()
            raise UserError(f"run directory {self.dir} was started by another process meanwhile; pass --resume "
                            "to continue it")
        return lock

    def _move_aside(self):
        """``--overwrite``: move the old run to ``<dir>.old-<time>`` while holding its lock."""
        old_lock = self._lock_folder()
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = self.dir.with_name(aside_name(self.dir.name, stamp))
        os.replace(self.dir, aside)
        old_lock.release()
        print(f"--overwrite: moved the previous run to {aside}", file=sys.stderr)

    def _lock_folder(self):
        """Take the run folder's lock (one line naming the holder when another process has it) and remove the
        temporary files that a killed writer may have left (only the holder writes there)."""
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise UserError(f"run folder {self.dir} is not writable")
        lock = FolderLock(self.dir).acquire("run folder")
        for leftover in self.dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        return lock

    def _stored_config(self):
        """``--resume``: the run's ``config.json``, or None when the run stopped before it wrote anything to
        resume from (then the run starts over in its folder). One-line errors when it is missing beside a
        checkpoint, unreadable, or written by another script."""
        path = self.dir / "config.json"
        if not path.is_file():
            if (self.dir / LATEST).is_file():
                raise UserError(f"--resume: {path} is missing, so the settings of {LATEST} cannot be checked; "
                                "restore it, or start afresh with --overwrite")
            return None
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(stored, dict) or not isinstance(stored.get("args"), dict):
                raise ValueError("no 'args' object")
        except (OSError, ValueError) as exc:
            raise UserError(f"--resume: {path} cannot be read ({type(exc).__name__}: {exc}); restore it, or "
                            "start afresh with --overwrite") from None
        if stored.get("script") != self.script:
            raise UserError(f"--resume: {self.dir} is a run of {stored.get('script')}, not of {self.script}")
        return stored

    def _write_config(self):
        path = self.dir / "config.json"
        current = dict(vars(self.args))
        stored = self._stored_config() if self.args.resume else None
        now = dt.datetime.now().isoformat(timespec="seconds")
        if stored is None:
            config = {"script": self.script, "args": current, "command": sys.argv,
                      "data": data_record(self.args.dataset, self.args.root_path),
                      "git": code_record(self.dir), "script_copy": self._copy_script(),
                      "versions": _versions(), "host": socket.gethostname(),
                      "device": str(self.device), "threads": torch.get_num_threads(), "started": now}
        else:
            config = stored
            changed = changed_settings(stored_args(stored), current)
            if changed:
                detail = describe_changes(changed)
                if not self.args.accept_changes:
                    raise UserError(f"--resume with settings that differ from the run's config.json: {detail} "
                                    "(add --accept_changes to continue with the new ones)")
                self._accepted_changes = (now, changed)
            config.setdefault("resumed", []).append(now)
            if changed:
                self.logger.info(f"--accept_changes: continuing with {detail} (written to config.json after the "
                                 "first iteration)")
            if config.get("threads", torch.get_num_threads()) != torch.get_num_threads():
                self.logger.info(f"warning: the run started with {config['threads']} compute threads and goes on "
                                 f"with {torch.get_num_threads()}; on the CPU the thread count changes the "
                                 "arithmetic, so its weights will differ from an uninterrupted run's")
        write_json(path, config)

    def _copy_script(self):
        """Copy the method script into the run folder (a copied script trying an idea may be in no commit) and
        return the copy's name and SHA-256 for ``config.json``."""
        copy = self.dir / self.script_file.name
        write_atomically(copy, lambda handle: handle.write(self.script_file.read_bytes()))
        return {"file": copy.name, "sha256": file_sha256(copy)}

    # -- state ------------------------------------------------------------------------------------------
    def restore(self, models, optimizers):
        """With ``--resume``, load ``latest.pth`` into the networks and optimisers and restore every RNG;
        return the iteration to continue from (0 for a new run, and for a run stopped before its first
        checkpoint: nothing was learnt, so it starts over)."""
        if not self.args.resume:
            return 0
        path = self.dir / LATEST
        if not path.is_file():
            snapshots = sorted(p.name for p in self.dir.glob("iter_*.pth"))
            if snapshots:
                raise UserError(f"--resume: {self.dir} has weights ({', '.join(snapshots)}) but no {LATEST}, so "
                                "the run cannot continue exactly; start it afresh with --overwrite")
            self.logger.info(f"--resume: the run stopped before its first {LATEST}; starting from iteration 0")
            return 0
        state = load_checkpoint(path, map_location=self.device,
                                hint="the run cannot continue from it; start it afresh with --overwrite (the "
                                     "damaged run is kept aside), or evaluate one of its iter_N.pth with "
                                     "code/test_3D.py --checkpoint")
        if int(state["iteration"]) > self.args.max_iterations:
            raise UserError(f"--max_iterations {self.args.max_iterations} is below the iteration this run reached "
                            f"({state['iteration']}); its weights are past that point (evaluate an earlier "
                            "iter_N.pth with code/test_3D.py --checkpoint, or continue with a larger value)")
        load_models(state, models, path, self.script)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        restore_rng_state({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state["rng"].items()})
        self._saved_iteration = int(state["iteration"])
        self.logger.info(f"resumed from {path} at iteration {state['iteration']}")
        return int(state["iteration"])

    def save(self, iteration, models, optimizers):
        """Write ``iter_N.pth`` every ``--snapshot_interval`` iterations, :meth:`validate` (``--val_interval``),
        then write ``latest.pth`` every ``--save_interval`` iterations, every ``--save_minutes`` minutes and when a
        stop signal arrived (both files at the last iteration), and stop if a signal asked for it.

        Weights holding a NaN or an infinity are never written: the run stops with one line and the last
        checkpoint stays as it was."""
        args = self.args
        self._record_accepted_changes()
        last = iteration == args.max_iterations
        if last or iteration % args.snapshot_interval == 0:
            save_checkpoint(self.dir / snapshot_name(iteration), {
                "script": self.script, "iteration": iteration, "models": self._finite_weights(iteration, models)})
        self._time_steps(iteration)
        self.validate(iteration)  # before latest.pth: a run resumed from it never skips a validation
        time_due = args.save_minutes > 0 and time.monotonic() - self._last_save_time >= 60 * args.save_minutes
        if last or iteration % args.save_interval == 0 or time_due or self._stop_signal is not None:
            self._save_latest(iteration, models, optimizers)
        if self._stop_signal is not None:
            if self._saved_iteration != iteration:  # the signal came while the files above were written
                self._save_latest(iteration, models, optimizers)
            self._stop(iteration)

    def _time_steps(self, iteration):
        """After the second iteration of this process (the first one includes the loader's start), on the CPU,
        when the rest of the run would take :data:`CPU_NOTE_HOURS` hours or more, say in one line how long it
        will take here and what to run instead (a paper's protocol takes days on a CPU)."""
        if len(self._step_times) >= 2:
            return
        self._step_times.append(time.monotonic())
        if len(self._step_times) < 2 or self.device.type != "cpu":
            return
        seconds = self._step_times[1] - self._step_times[0]
        left = self.args.max_iterations - iteration
        if seconds * left >= 3600 * CPU_NOTE_HOURS:
            self.logger.info(f"note: {seconds:.1f} s per iteration on this CPU, so about {seconds * left / 3600:.0f} h "
                             f"for the {left} iterations left. On a CPU, the CPU protocol (QUICK=1 bash "
                             "reproduce.sh, docs/cpu_protocol.md) or a narrower network on smaller crops "
                             "(--n_filters 8 --patch_size 64 64 32) take hours, not days; or use a GPU")

    def _record_accepted_changes(self):
        """Write the settings that ``--accept_changes`` took into ``config.json``, once the resumed run has loaded
        its checkpoint with them and taken a step (or, finished already, reached its evaluation): a change that
        cannot work (another ``--n_filters``) stops the run before, and leaves the configuration that matches the
        run's checkpoints."""
        if self._accepted_changes is None:
            return
        now, changed = self._accepted_changes
        path = self.dir / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["args"] = {**stored_args(config), **{k: new for k, (_, new) in changed.items()}}
        config.setdefault("changes", []).append({"time": now, "flags": {k: list(v) for k, v in changed.items()}})
        write_json(path, config)
        self._accepted_changes = None

    def _save_latest(self, iteration, models, optimizers):
        save_checkpoint(self.dir / LATEST, {
            "script": self.script, "iteration": iteration, "models": self._finite_weights(iteration, models),
            "optimizers": {name: o.state_dict() for name, o in optimizers.items()}, "rng": capture_rng_state()})
        self._saved_iteration, self._last_save_time = iteration, time.monotonic()

    def _finite_weights(self, iteration, models):
        """The networks' state dicts, after checking that they hold no NaN or infinity (else :meth:`_fail`)."""
        weights = {name: m.state_dict() for name, m in models.items()}
        found = non_finite_weight(weights)
        if found is not None:
            self._fail(f"iteration {iteration}: network {found[0]!r} holds NaN or infinite values ({found[1]})")
        return weights

    def _fail(self, problem):
        """Stop the run for a numerical problem, naming what the user can do; nothing is saved."""
        if self._saved_iteration is None:
            kept = "no checkpoint was written yet; start again with other settings and --overwrite"
        else:
            kept = (f"{LATEST} of iteration {self._saved_iteration} is intact: continue it with other settings "
                    f"(--resume --accept_changes and, for example, a lower --base_lr) or start afresh with "
                    f"--overwrite")
        message = f"{problem}; the run stopped without saving, {kept}"
        self.logger.info(f"error: {message}", extra={"console": False})
        self._close_bar()
        raise UserError(message)

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
        best = self.best_validation()
        improved = best is None or dice > best["val_dice"]
        if improved:
            save_checkpoint(self.dir / BEST_VAL, {"script": self.script, "iteration": iteration, "val_dice": dice,
                                                 "models": self._finite_weights(iteration, models)})
            self._best = {"iteration": iteration, "val_dice": dice}
        self.logger.info(f"iteration {iteration} : val_dice : {dice:f} ({dataset.description})"
                         + (f"; the best so far, saved as {BEST_VAL}" if improved else
                            f"; the best is {best['val_dice']:f} at iteration {best['iteration']}"))
        if self.writer is not None:
            self.writer.add_scalar("val/dice", dice, iteration)

    def best_validation(self):
        """``{'iteration', 'val_dice'}`` of the run's ``best_val.pth``, or None before the first validation. The
        file itself is the record, read once per process, so a resumed run keeps comparing with the best it had (a
        deterministic rerun of the iterations since its last save validates to the same Dice and keeps the file as
        it is); :meth:`validate` keeps it up to date after that."""
        if self._best is _UNREAD:
            path = self.dir / BEST_VAL
            self._best = None
            if path.is_file():
                state = load_checkpoint(path, map_location="cpu", hint=f"remove it to let the next validation "
                                                                       f"write a new {BEST_VAL}")
                self._best = {"iteration": int(state["iteration"]), "val_dice": float(state["val_dice"])}
        return self._best

    # -- stop signals -----------------------------------------------------------------------------------
    def _request_stop(self, signum, frame):
        """Signal handler of the training loop: remember the signal; :meth:`save` saves and stops at the end
        of the current iteration. Further signals change nothing (a scheduler and a shell may both send
        one); SIGKILL stops at once."""
        if self._stop_signal is None:
            self._stop_signal = signum
            note = (f"\n{signal_name(signum)}: stopping at the end of this iteration after saving {LATEST} "
                    f"(kill -9 {os.getpid()} stops at once and loses the iterations since the last save)\n")
            signal_note(note)

    def _stop(self, iteration):
        """Leave the loop after the save of a stop signal with :class:`~utils.errors.Interrupted`, which
        ``run_cli`` turns into the message and exit status ``128 + signal``."""
        name = signal_name(self._stop_signal)
        if iteration == self.args.max_iterations:
            message = (f"stopped by {name} after the last iteration; the weights are in "
                       f"{self.dir / snapshot_name(iteration)}. Evaluate them with:\n"
                       f"  python code/test_3D.py --run {shlex.quote(str(self.dir))}")
        else:
            message = (f"stopped by {name} after iteration {iteration}; {LATEST} is saved. Resume with:\n"
                       f"  {resume_command()}")
        self.logger.info(message, extra={"console": False})  # log.txt too says how to go on
        self._close_bar()
        raise Interrupted(self._stop_signal, message)

    def _stop_evaluation(self, signum, frame):
        """Signal handler of the final evaluation: stop at once with :class:`~utils.errors.Interrupted`, whose
        message gives the command that evaluates the saved weights."""
        raise Interrupted(signum, f"stopped by {signal_name(signum)} during the final evaluation; the weights are "
                                  f"saved in {self.dir}. Evaluate them with:\n"
                                  f"  python code/test_3D.py --run {shlex.quote(str(self.dir))}")

    # -- loop helpers -----------------------------------------------------------------------------------
    def sgd(self, parameters):
        """SGD over ``parameters`` with ``--base_lr --momentum --weight_decay`` (every anchor's optimiser)."""
        return torch.optim.SGD(parameters, lr=self.args.base_lr, momentum=self.args.momentum,
                               weight_decay=self.args.weight_decay)

    def begin(self, models, optimizers, train_set, sampler, predict=None):
        """Restore a resumed run (:meth:`restore`), open the endless batch stream at the iteration reached
        and log what the run trains on, with every warning about its data; return
        ``(start_iteration, batches)``. ``predict(models, x)``, the script's inference, is what
        ``--val_interval`` validates (:meth:`validate`)."""
        self._record_training_cases(train_set)
        start = self.restore(models, optimizers)
        prepare_for_training(models, self.device, self.args.channels_last, self.args.compile)
        if self.args.val_interval:
            self._validation = (predict, models, self._validation_set(predict, train_set))
        batches = self.data_loader(train_set, InfiniteBatches(sampler, self.args.seed, start))
        if getattr(self.args, "labeled_bs", None) is None:
            cases = f"{len(train_set)} labelled cases"
        else:
            cases = f"{self.args.labelnum} labelled + {len(train_set) - self.args.labelnum} unlabelled cases"
        epochs = f"{len(sampler)} iterations per pass over the data"
        if hasattr(self.args, "iterations_per_epoch"):  # another epoch: the unit of the consistency ramps
            epochs += f" (the ramps count epochs of --iterations_per_epoch {self.args.iterations_per_epoch:g})"
        self.logger.info(f"{cases}, {epochs}, device {self.device}")
        for warning in getattr(train_set, "warnings", ()):
            self.logger.info(f"warning: {warning}")
        self._last_save_time = time.monotonic()
        return start, batches

    def _record_training_cases(self, train_set):
        """Keep the training cases in ``config.json`` (in order: the first ``--labelnum`` are the labelled ones),
        the labelled ones and the held-out validation cases also by name, and how many cases the training list
        holds (``listed_training_cases``: a table tells the all-labels run from it without the data); log the
        labelled ones when they were drawn (``--label_seed``); a resumed run whose cases changed since it started
        stops, rather than training on other cases."""
        path = self.dir / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        cases = list(train_set.case_ids)
        validation = list(getattr(train_set, "validation_cases", []))
        stored = config.get("training_cases")
        if stored is not None and (stored != cases or config.get("validation_cases", []) != validation):
            raise UserError(f"--resume: the training list under {self.args.root_path} changed since the run started "
                            f"({len(stored)} cases then, {len(cases)} now, or another order); restore it, or start "
                            "afresh with --overwrite")
        if self.args.label_seed is not None:
            self.logger.info(f"labelled cases (--label_seed {self.args.label_seed}): "
                             f"{', '.join(cases[:self.args.labelnum])}")
        if stored is None:
            config.update(training_cases=cases, labelled_cases=cases[:self.args.labelnum], validation_cases=validation,
                          listed_training_cases=getattr(train_set, "listed_cases", None))
            write_json(path, config)

    def _validation_set(self, predict, train_set):
        """The validation set of ``--val_interval``: the ``--val_num`` cases held out of the training list, else the
        dataset's validation list (``utils.args`` has checked that there is one)."""
        if predict is None:
            raise UserError(f"--val_interval: {self.script} does not hand its predict() to TrainingRun.begin")
        spec = get_dataset_spec(self.args.dataset)
        if self.args.val_num:
            dataset = spec.dataset_class(self.args.root_path, "train", num_classes=spec.num_classes,
                                         case_ids=train_set.validation_cases)
            dataset.description = f"{len(dataset)} cases held out of {spec.dataset_class.SPLIT_FILES['train']}"
        else:
            dataset = spec.dataset_class(self.args.root_path, "val", num_classes=spec.num_classes)
            dataset.description = f"{len(dataset)} cases of {spec.dataset_class.SPLIT_FILES['val']}"
        return dataset

    def next_batch(self, batches):
        """The next batch with every tensor on the run's device; an error in a loader worker (a case file
        that went bad during the run) is one line, not the worker's traceback."""
        try:
            batch = next(batches)
        except (UserError, OSError) as exc:
            raise UserError(f"while loading a training batch: {loader_error_message(exc)}") from None
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            raise UserError(f"{loader_error_message(exc)} (out of memory? try fewer --num_workers, or "
                            "--num_workers 0 to see the error in the main process)") from None
        return {key: to_step_layout(value.to(self.device, non_blocking=True), self.args.channels_last)
                if torch.is_tensor(value) else value for key, value in batch.items()}

    def update_lr(self, iteration, optimizers):
        """Set the learning rate of (0-based) ``iteration`` (``--lr_schedule`` and its flags) on every
        optimiser; return it."""
        args = self.args
        lr = lr_at(iteration, args.base_lr, args.lr_schedule, args.max_iterations, args.lr_step, args.lr_gamma)
        for optimizer in optimizers:
            set_lr(optimizer, lr)
        return lr

    def data_loader(self, dataset, batches):
        """An iterator over batches: ``batches`` is a ``dataloaders.samplers.InfiniteBatches``. It is the one
        iterator of the run, so its workers live as long as the run (what ``persistent_workers`` would give);
        each keeps :data:`PREFETCH_BATCHES` batches ready, which absorbs a slow crop on a fast device."""
        generator = torch.Generator().manual_seed(self.args.seed)
        workers = self.args.num_workers
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=workers,
            pin_memory=self.device.type == "cuda", generator=generator,
            worker_init_fn=seed_worker, prefetch_factor=PREFETCH_BATCHES if workers else None)
        iterator = iter(loader)
        atexit.register(shut_down_workers, iterator)
        return iterator

    def iterations(self, start):
        """Iterations ``start .. max_iterations - 1`` with a tqdm bar showing loss and lr. From here on SIGINT
        and SIGTERM stop the run at the end of an iteration, after saving it (:meth:`save`)."""
        install_stop_handlers(self._request_stop)
        self._bar = tqdm(range(start, self.args.max_iterations), initial=start, total=self.args.max_iterations,
                         ncols=100, desc=self.script, disable=not self.args.progress, file=sys.stdout,
                         mininterval=bar_interval(sys.stdout))
        return self._bar

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def autocast(self):
        """bf16 autocast on CUDA when ``--amp`` is given."""
        return autocast(self.device, self.args.amp)

    def log(self, iteration, lr, **terms):
        """Log the loss terms of an iteration (1-based count of finished iterations): a ``log.txt`` line in
        SSL4MIS format, tensorboard scalars, and the progress bar. The first term is the total loss.

        A term that is NaN or infinite stops the run here, before :meth:`save` could write the damage, with
        a line naming the iteration and the term."""
        values = {name: value.item() if torch.is_tensor(value) else float(value) for name, value in terms.items()}
        names = list(values)
        line = f"iteration {iteration} : {names[0]} : {values[names[0]]:f}"
        line += "".join(f", {name}: {values[name]:f}" for name in names[1:]) + f", lr: {lr:g}"
        self.logger.info(line, extra={"console": False})
        culprit = first_non_finite(values)
        if culprit is not None:
            self._fail(f"iteration {iteration}: the loss term {culprit[0]} is {culprit[1]}")
        if self.writer is not None:
            self.writer.add_scalar("info/lr", lr, iteration)
            for name, value in values.items():
                self.writer.add_scalar("info/total_loss" if name == "loss" else f"info/{name}", value, iteration)
        if self._bar is not None:
            self._bar.set_postfix({names[0]: f"{values[names[0]]:.4f}", "lr": f"{lr:.2g}"}, refresh=False)

    # -- end of run -------------------------------------------------------------------------------------
    def finish(self, predict, models, test_dataset, num_classes):
        """Close the logs and evaluate the final weights on the test list (unless ``--no_eval``), then the weights
        that validation selected (``best_val.pth``, when ``--val_interval`` kept one), each into its own
        ``eval_*`` folder; then free the folder's lock. A signal now stops the evaluation at once: the weights
        are saved, and ``test_3D.py`` evaluates them."""
        install_stop_handlers(self._stop_evaluation)
        self._record_accepted_changes()  # a finished run resumed with changes takes no step
        self._close_bar()
        self.logger.info(f"training finished at iteration {self.args.max_iterations}; weights in {self.dir}")
        summary = None
        if not self.args.no_eval:
            prepare_for_inference(models, self.device)
            last = self.args.max_iterations
            summary = self._evaluate(predict, models, test_dataset, num_classes, snapshot_name(last), last)
            if self.writer is not None:
                self.writer.add_scalar("info/test_dice", summary["dice"]["mean"], self.args.max_iterations)
            if (self.dir / BEST_VAL).is_file():
                state = load_checkpoint(self.dir / BEST_VAL, map_location=self.device)
                load_models(state, models, self.dir / BEST_VAL, self.script)
                self._evaluate(predict, models, test_dataset, num_classes, BEST_VAL, int(state["iteration"]),
                               selection_record(state))
        if self.writer is not None:
            self.writer.close()
        self._lock.release()
        return summary

    def _evaluate(self, predict, models, test_dataset, num_classes, checkpoint, iteration, extra=None):
        """Evaluate the networks as they are, the weights of ``checkpoint`` (of ``iteration``), on the test list
        with the run's settings; log the result and return its summary."""
        summary, out_dir = evaluate(
            lambda x: predict(models, x), test_dataset, self.dir, checkpoint, patch_size=self.args.patch_size,
            stride_xy=self.args.stride_xy, stride_z=self.args.stride_z, num_classes=num_classes,
            device=self.device, sw_batch_size=self.args.sw_batch_size, nms=bool(self.args.nms),
            protocol_extra={"checkpoint": checkpoint, "iteration": iteration, "split": "test", **(extra or {})},
            source={"weights": self.dir / checkpoint, "network": None, "evaluator": self.script},
            progress=bool(self.args.progress))
        self.logger.info(f"test ({out_dir.name}): {format_summary(summary)}")
        return summary
