"""The prepared GPU check: on one GPU, within a time budget, what a researcher needs to know before trusting a
long run there, written to one page (default docs/benchmarks_gpu.md).

    python code/gpu_check.py --root_path data/LA                          # on the GPU machine (8 minutes)
    python code/gpu_check.py --root_path data/LA --steps protocol          # continue a protocol run it stopped
    python code/gpu_check.py --root_path data/synthetic_LA --device cpu --tiny --out /tmp/gpu_check.md

Steps, in this order (``--steps`` chooses), each within what is left of ``--budget_minutes``:

1. ``tests``: the CUDA variants of the tests that train and evaluate (``pytest tests -k cuda``);
2. ``step``: seconds per iteration of every method at its paper's patch and batch, without and with ``--amp``
   (bf16 autocast, CUDA only), from the log lines of a short run (``--iterations``; the first ``--warmup`` are
   left out); then the labelled-only V-Net with the other step flags (:data:`FLAG_VARIANTS`: channels-last,
   torch.compile), which decide the defaults a GPU user should pass;
3. ``loader``: seconds per batch of each method's own data loader (the script's own data set-up) with one worker
   and with the workers ``--num_workers auto`` gives, beside its step: a loader slower than the step starves the
   GPU, and one worker's time over the step's is how many workers the method needs on this device;
4. ``protocol``: the labelled-only V-Net's LA-8 full protocol (6000 iterations) with its evaluation, then
   UA-MT's if time is left. A run the budget stops gets SIGTERM, saves, and continues from there the next
   time this command runs (its runs live in ``--output_root``).

``--tiny`` exercises every step on the CPU with small crops and a few iterations (what CI can check).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datetime as dt  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from benchmark import METHODS, iteration_seconds, log_times  # noqa: E402
from dataloaders.samplers import InfiniteBatches, seed_worker  # noqa: E402
from utils.atomic import write_atomically  # noqa: E402
from utils.cli import REPO_ROOT, ArgumentParser, output_path, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.run_files import is_set_aside  # noqa: E402
from utils.runtime import select_device  # noqa: E402

STEPS = ("tests", "step", "loader", "protocol")
# method -> script module: the supervised baseline and benchmark.py's method table
SCRIPTS = {"supervised": "train_supervised_3D",
           **{method: script[:-len(".py")] for method, (script, _) in METHODS.items()}}
PROTOCOL_METHODS = ("supervised", "uamt")
PROTOCOL_LABELNUM = 8
# --tiny: crops and batches small enough for the CPU and for synthetic volumes (UC-Seg mixes from the start)
TINY_FLAGS = ["--patch_size", "32", "32", "16", "--batch_size", "2", "--stride_xy", "16", "--stride_z", "8"]
TINY_METHOD_FLAGS = {"supervised": [], "ucseg": ["--labeled_bs", "1", "--mix_start", "1"],
                     "uamt": ["--labeled_bs", "1", "--mc_samples", "2"],
                     "ugmcl": ["--labeled_bs", "1", "--mc_samples", "2"]}
# the step flags timed on the labelled-only V-Net besides plain and --amp (CUDA only: --compile is refused on the CPU)
FLAG_VARIANTS = (("--channels_last",), ("--amp", "--channels_last"), ("--amp", "--compile"))
TINY_PROTOCOL_ITERATIONS = 4
TINY_LABELNUM = 4
STOP_GRACE_SECONDS = 120  # what a stopped run gets to finish its iteration and save
RESERVE_SECONDS = 20  # kept for writing the page


def get_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root_path", default="data/LA", help="LA data root (default: data/LA)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to exercise the check")
    parser.add_argument("--budget_minutes", type=float, default=8.0, help="wall-clock budget (default: 8)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run (default: all)")
    parser.add_argument("--methods", nargs="+", choices=sorted(SCRIPTS), default=list(SCRIPTS),
                        help="methods of the step and loader steps (default: all)")
    parser.add_argument("--iterations", type=int, default=20, help="iterations of each timed run (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="first iterations not timed (default: 3)")
    parser.add_argument("--loader_batches", type=int, default=20, help="batches timed per loader (default: 20)")
    parser.add_argument("--tiny", action="store_true", help="small crops and few iterations: exercise it on a CPU")
    parser.add_argument("--output_root", default="model/gpu_check", help="where the runs go (default: model/gpu_check)")
    parser.add_argument("--out", default="docs/benchmarks_gpu.md", help="the page written (default: "
                        "docs/benchmarks_gpu.md)")
    return parser


def check_args(args):
    """One-line errors for settings that leave nothing to check, before any step starts."""
    select_device(args.device)
    if args.budget_minutes <= 0:
        raise UserError(f"--budget_minutes must be positive, got {args.budget_minutes}")
    if args.iterations <= args.warmup or args.warmup < 0:
        raise UserError(f"--iterations ({args.iterations}) must exceed --warmup ({args.warmup}) >= 0")
    if args.loader_batches < 1:
        raise UserError(f"--loader_batches must be at least 1, got {args.loader_batches}")
    if not (Path(args.root_path) / "train.list").is_file():
        raise UserError(f"no train.list under {args.root_path} (see data/README.md)")


class Budget:
    """The seconds left before the deadline, less what is kept for writing the page."""

    def __init__(self, minutes):
        self.deadline = time.monotonic() + 60 * minutes

    def left(self):
        return self.deadline - time.monotonic() - RESERVE_SECONDS


def run_within(command, budget, log_path):
    """Run ``command`` (output to ``log_path``) until it ends or the budget runs out; then SIGTERM, which the
    training scripts answer by saving and exiting 143. Returns ``(exit status, stopped by the budget)``."""
    with open(log_path, "w") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            return proc.wait(timeout=max(budget.left(), 1)), False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=STOP_GRACE_SECONDS), True
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(), True


def tail(path, lines=3):
    """The last ``lines`` lines of a log, on one line (what a failed step reports)."""
    return " / ".join(Path(path).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-lines:])


# -- steps ------------------------------------------------------------------------------------------------------
def run_tests(args, budget, work):
    """The CUDA variants of the test suite; the summary line pytest prints."""
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "tests", "-k", "cuda"]
    status, stopped = run_within(command, budget, work / "tests.txt")
    return {"command": shlex.join(["python", *command[1:]]), "status": status, "stopped": stopped,
            "summary": tail(work / "tests.txt", 1)}


def script_flags(args, method):
    """The flags every run of ``method``'s script gets here: data, device, no progress bar; ``--tiny`` crops."""
    flags = ["--root_path", str(args.root_path), "--device", args.device, "--progress", "0"]
    if args.tiny:
        flags += TINY_FLAGS + TINY_METHOD_FLAGS.get(method, ["--labeled_bs", "1"]) + ["--labelnum", str(TINY_LABELNUM)]
    return flags


def step_variants(device, methods):
    """``(method, flags)`` of every timed run: each method plain and, on CUDA, with ``--amp``; then, on CUDA, the
    labelled-only V-Net with each of :data:`FLAG_VARIANTS`."""
    flag_sets = [()] + ([("--amp",)] if device.type == "cuda" else [])
    variants = [(method, flags) for method in methods for flags in flag_sets]
    if device.type == "cuda" and "supervised" in methods:
        variants += [("supervised", flags) for flags in FLAG_VARIANTS]
    return variants


def time_step(args, method, flags, budget, work):
    """Median seconds per iteration of a short run of ``method``'s script with ``flags``, or the reason it has
    none. The run goes to a scratch folder of the check, emptied first."""
    name = "_".join([method, *(flag[2:] for flag in flags)])
    scratch = work / "step" / name
    shutil.rmtree(scratch, ignore_errors=True)
    command = [sys.executable, str(REPO_ROOT / "code" / f"{SCRIPTS[method]}.py"), *script_flags(args, method),
               "--output_root", str(scratch), "--exp", "gpu_check/run", "--max_iterations", str(args.iterations),
               "--no_eval", *flags]
    status, stopped = run_within(command, budget, work / f"step_{name}.txt")
    if status != 0:
        return {"method": method, "flags": list(flags), "error": "stopped by the budget" if stopped else
                tail(work / f"step_{name}.txt")}
    log = next(scratch.glob("gpu_check/run_*/*/log.txt"))
    seconds = iteration_seconds(log_times(log), args.warmup)
    config = json.loads((log.parent / "config.json").read_text(encoding="utf-8"))["args"]
    return {"method": method, "flags": list(flags), "seconds": statistics.median(seconds),
            "patch": config["patch_size"], "batch_size": config["batch_size"]}


class _Captured(Exception):
    """Raised from inside a script's ``main`` once its training data is built."""


def script_training_data(method, argv):
    """``(train_set, sampler, args)`` exactly as ``method``'s script builds them: its ``main`` runs with
    ``argv`` until its call of ``build_training_data`` returns (nothing is trained, no run folder written)."""
    module = importlib.import_module(SCRIPTS[method])
    original, captured = module.build_training_data, {}

    def capture(run_args, *rest, **options):
        captured["data"], captured["args"] = original(run_args, *rest, **options), run_args
        raise _Captured

    module.build_training_data = capture
    try:
        module.main(argv)
    except _Captured:
        pass
    finally:
        module.build_training_data = original
    return captured["data"].train_set, captured["data"].sampler, captured["args"]


def time_loader(args, method, budget):
    """Seconds per batch of ``method``'s data loader with one worker and with the workers of ``--num_workers
    auto`` (in each, the first batch, which starts the workers, is not timed)."""
    if budget.left() <= 0:
        return {"method": method, "error": "no budget left"}
    argv = script_flags(args, method) + ["--output_root", str(output_path(args.output_root) / "loader"), "--no_eval"]
    try:
        train_set, sampler, run_args = script_training_data(method, argv)
    except UserError as error:
        return {"method": method, "error": f"error: {error}"}
    one = seconds_per_batch(train_set, sampler, run_args, 1, args)
    return {"method": method, "one_worker": one, "workers": run_args.num_workers,
            "seconds": one if run_args.num_workers == 1 else
            seconds_per_batch(train_set, sampler, run_args, run_args.num_workers, args)}


def seconds_per_batch(train_set, sampler, run_args, workers, args):
    """Mean seconds per batch over ``--loader_batches`` batches of a loader with ``workers`` workers."""
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=InfiniteBatches(sampler, run_args.seed, 0),
                                         num_workers=workers, worker_init_fn=seed_worker,
                                         pin_memory=select_device(args.device).type == "cuda")
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in range(args.loader_batches):
        next(batches)
    seconds = (time.perf_counter() - start) / args.loader_batches
    del batches
    return seconds


def run_protocol(args, method, budget, work):
    """``method``'s LA-8 protocol (its script's defaults; ``--tiny``: a few iterations), continued when a
    previous call left it unfinished; its test metrics when it finished."""
    output_root, labelnum = output_path(args.output_root), TINY_LABELNUM if args.tiny else PROTOCOL_LABELNUM
    command = [sys.executable, str(REPO_ROOT / "code" / f"{SCRIPTS[method]}.py"), *script_flags(args, method),
               "--labelnum", str(labelnum), "--output_root", str(output_root), "--exp", f"LA/{method}"]
    if args.tiny:
        command += ["--max_iterations", str(TINY_PROTOCOL_ITERATIONS)]
    started_runs = [path for path in output_root.glob(f"LA/{method}_{labelnum}/*")
                    if path.is_dir() and not is_set_aside(path.name)]  # stopped even before config.json: resumable
    summaries = sorted(output_root.glob(f"LA/{method}_{labelnum}/*/eval_iter_*/summary.json"))
    shown = shlex.join(["python", f"code/{SCRIPTS[method]}.py", *command[2:]])
    result = {"method": method, "labelnum": labelnum, "command": shown}
    if summaries:
        return {**result, "summary": json.loads(summaries[-1].read_text(encoding="utf-8")), "minutes": None}
    if started_runs:
        command.append("--resume")
    if budget.left() <= 0:
        return {**result, "error": "no budget left"}
    started = time.monotonic()
    status, stopped = run_within(command, budget, work / f"protocol_{method}.txt")
    result["minutes"] = (time.monotonic() - started) / 60
    summaries = sorted(output_root.glob(f"LA/{method}_{labelnum}/*/eval_iter_*/summary.json"))
    if status == 0 and summaries:
        return {**result, "summary": json.loads(summaries[-1].read_text(encoding="utf-8"))}
    if stopped:
        return {**result, "error": "stopped by the budget; saved, and this command continues it"}
    return {**result, "error": tail(work / f"protocol_{method}.txt")}


# -- the page ---------------------------------------------------------------------------------------------------
def device_lines(device):
    """What the figures depend on: the device, the versions, the date."""
    lines = [f"- date: {dt.datetime.now().isoformat(timespec='minutes')}", f"- torch {torch.__version__}"]
    if device.type == "cuda":
        lines += [f"- device: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, cuDNN "
                  f"{torch.backends.cudnn.version()}"]
    else:
        lines += ["- device: CPU (an exercise of the check, not a GPU measurement)"]
    return lines


def step_lines(steps, loaders):
    """The table of seconds per iteration (plain and --amp) with each loader's seconds per batch beside them, and
    the workers each method needs to keep its fastest step fed."""
    loader = {entry["method"]: entry for entry in loaders}
    lines = ["| method | patch, batch | s/it | s/it with --amp | loader s/batch, 1 worker | loader s/batch "
             "(auto workers) | loader / step | workers needed |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in dict.fromkeys(entry["method"] for entry in steps + loaders):
        plain = next((e for e in steps if e["method"] == method and not e["flags"]), {})
        amp = next((e for e in steps if e["method"] == method and e["flags"] == ["--amp"]), {})
        feed = loader.get(method, {})
        setting = f"{'x'.join(map(str, plain['patch']))}, {plain['batch_size']}" if "patch" in plain else "–"
        fastest = min((e["seconds"] for e in (plain, amp) if "seconds" in e), default=None)
        # two significant digits: a loader far faster than the step still shows a ratio above 0
        ratio = f"{feed['seconds'] / plain['seconds']:.2g}" if "seconds" in feed and "seconds" in plain else "–"
        needed = str(math.ceil(feed["one_worker"] / fastest)) if "one_worker" in feed and fastest else "–"
        one = f"{feed['one_worker']:.3f}" if "one_worker" in feed else cell(feed)
        workers = f" ({feed['workers']})" if "workers" in feed else ""
        lines.append(f"| {method} | {setting} | {cell(plain)} | {cell(amp)} | {one} | {cell(feed)}{workers} | "
                     f"{ratio} | {needed} |")
    return lines


def flag_lines(steps):
    """The table of the labelled-only V-Net's step with each flag set, against its plain step."""
    runs = [e for e in steps if e["method"] == "supervised"]
    plain = next((e for e in runs if not e["flags"]), {})
    lines = ["| flags | s/it | vs plain |", "| --- | --- | --- |"]
    for entry in runs:
        ratio = f"{entry['seconds'] / plain['seconds']:.2f}x" if "seconds" in entry and "seconds" in plain else "–"
        lines.append(f"| {' '.join(entry['flags']) or '(none)'} | {cell(entry)} | {ratio} |")
    return lines


def cell(entry):
    """Seconds with three decimals, or the reason there are none."""
    if "seconds" in entry:
        return f"{entry['seconds']:.3f}"
    return entry.get("error", "–").replace("|", "/")


def protocol_lines(protocols):
    """The table of the protocol runs: test metrics (or why there are none), minutes, command."""
    lines = ["| method | labelled | Dice (%) | Jaccard (%) | 95HD | ASD | minutes | command |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in protocols:
        summary = entry.get("summary")
        metrics = ([f"{100 * summary[k]['mean']:.2f}" for k in ("dice", "jaccard")]
                   + [f"{summary[k]['mean']:.2f}" for k in ("hd95", "asd")]) if summary else \
            [entry.get("error", "–").replace("|", "/")] + ["–"] * 3
        minutes = "(earlier)" if entry.get("minutes") is None else f"{entry['minutes']:.1f}"
        lines.append(f"| {entry['method']} | {entry['labelnum']} | {' | '.join(metrics)} | {minutes} | "
                     f"`{entry['command']}` |")
    return lines


def render(args, device, results):
    """The page: the command, the device, and a section per step that ran."""
    lines = ["# GPU check", "", f"Written by `python code/gpu_check.py {shlex.join(sys.argv[1:])}`.", ""]
    lines += device_lines(device)
    if "tests" in results:
        tests = results["tests"]
        lines += ["", "## CUDA tests", "", f"`{tests['command']}`: {tests['summary']}"
                  + (" (stopped by the budget)" if tests["stopped"] else "")]
    if results.get("step") or results.get("loader"):
        lines += ["", "## Step and loader", "",
                  f"Median seconds per iteration of {args.iterations}-iteration runs (the first {args.warmup} left "
                  "out) at each script's defaults, and seconds per batch of its data loader with one worker and with "
                  "the workers of `--num_workers auto`; a loader/step ratio above 1 means the loader starves the "
                  "device, and the workers needed are one worker's time over the faster step's, rounded up.", ""]
        lines += step_lines(results.get("step", []), results.get("loader", []))
    if len([e for e in results.get("step", []) if e["method"] == "supervised"]) > 2:
        lines += ["", "## Step flags (labelled-only V-Net)", "",
                  "What each flag does to the step; the faster ones are what to pass on this device.", ""]
        lines += flag_lines(results["step"])
    if results.get("protocol"):
        lines += ["", "## Full protocol", ""] + protocol_lines(results["protocol"])
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.root_path = resolve_path(args.root_path)
    check_args(args)
    device = select_device(args.device)
    budget = Budget(args.budget_minutes)
    out = output_path(args.out)
    work = output_path(args.output_root) / "work"
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if "tests" in args.steps:
        results["tests"] = run_tests(args, budget, work)
    if "step" in args.steps:
        results["step"] = [time_step(args, method, flags, budget, work)
                           for method, flags in step_variants(device, args.methods)]
    if "loader" in args.steps:
        results["loader"] = [time_loader(args, method, budget) for method in args.methods]
    if "protocol" in args.steps:
        results["protocol"] = [run_protocol(args, method, budget, work) for method in PROTOCOL_METHODS]
    page = render(args, device, results)
    write_atomically(out, lambda handle: handle.write(page.encode("utf-8")))
    print(f"written to {out}")


if __name__ == "__main__":
    run_cli(main)
