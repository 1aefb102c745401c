"""Benchmarks on real LA data: sliding-window inference (ours vs the anchors' loop), training iterations
of the supervised baseline (the real script vs a bare loop), the iteration cost of each method script
relative to the supervised script, and each method's inference time per LA case. What they measure:
docs/benchmarks.md.

    python code/benchmark.py --root_path /work/shared/data/LA --json benchmark.json
    python code/benchmark.py --only inference --repeats 3
    python code/benchmark.py --only training --rounds 3 --iterations 4
    python code/benchmark.py --only methods --methods ugmcl --rounds 3 --iterations 3
    python code/benchmark.py --only evaluation --eval_repeats 2
    python code/benchmark.py --only throughput --methods mt ugmcl --rounds 2 --iterations 40 --root_path data/LA_half \
        --script_args "--labelnum 6 --n_filters 8 --patch_size 48 48 32"

Everything runs on the CPU. Each comparison alternates its two variants in one invocation (A B A B ...)
and reports the median of the ratios of neighbouring runs, so load from other users of the machine falls
on both alike. Requirements checked: inference at least 1.3x faster than the reference with identical label
maps (a mismatch exits 1); training plumbing at most 5% slower per iteration than the bare loop; peak
memory of the training run at most 6 GiB; peak memory of a method's run at most its limit in ``METHODS``.
The throughput benchmark (only when named) asks how a table is trained fastest on this machine: one run at a
time with every core's threads, or two runs at once with half the threads each (``reproduce.sh`` ``JOBS=2``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import concurrent.futures  # noqa: E402
import datetime as dt  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_supervised_3D  # noqa: E402
from dataloaders.la_heart import LAHeart  # noqa: E402
from dataloaders.registry import get_dataset_spec  # noqa: E402
from dataloaders.transforms import CenterCrop  # noqa: E402
from networks.vnet import VNet  # noqa: E402
from utils.args import finalize_args  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.cli import ArgumentParser, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.evaluation import prepare_for_inference  # noqa: E402
from utils.sliding_window import (channels_last, keep_freed_memory, padding_for,  # noqa: E402
                                  reference_sliding_window, sliding_window_inference, window_corners)

CPU = torch.device("cpu")
PATCH = (112, 112, 80)
STRIDE_XY, STRIDE_Z = 18, 4
NUM_CLASSES = 2
TRAIN_BATCH = 4
MIN_SPEEDUP = 1.3
MAX_OVERHEAD = 0.05
MAX_RSS_GIB = 6.0
GIB = 1024 ** 3
# method name -> (training script, peak-memory limit in GiB on the CPU where an issue sets one)
METHODS = {"mt": ("train_mt_3D.py", None), "uamt": ("train_uamt_3D.py", None), "dtc": ("train_dtc_3D.py", None),
           "cps": ("train_cps_3D.py", None), "ugmcl": ("train_ugmcl_3D.py", 8.0),
           "ucseg": ("train_ucseg_3D.py", 10.0), "ugpl": ("train_ugpl_3D.py", 10.0)}
LOG_LINE = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\.(\d{3})\] iteration (\d+) :")


def get_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root_path", default="data/LA", help="LA data root (default: data/LA)")
    parser.add_argument("--only", choices=("inference", "training", "methods", "evaluation", "throughput"),
                        default=None, help="run one benchmark (default: the first four; throughput only when named)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of every variant (default: torch's, one per core)")

    inference = parser.add_argument_group("inference")
    inference.add_argument("--case", default=None, help="test case id (default: the first of test.list)")
    inference.add_argument("--checkpoint", default=None,
                           help="weights from a run's checkpoint (default: seeded random weights, balanced)")
    inference.add_argument("--repeats", type=int, default=3, help="reference/ours pairs (default: 3)")
    inference.add_argument("--sw_batch_size", type=int, default=4, help="ours: windows per forward (default: 4)")
    inference.add_argument("--memory_format", choices=("channels_last", "contiguous"), default="channels_last",
                           help="ours: the network's memory format (default: channels_last)")
    inference.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                           help="ours: keep_freed_memory() in its process, or malloc's defaults (default: tuned)")

    training = parser.add_argument_group("training")
    training.add_argument("--rounds", type=int, default=3, help="ours/bare pairs of runs (default: 3)")
    training.add_argument("--iterations", type=int, default=4, help="iterations per run (default: 4)")
    training.add_argument("--warmup", type=int, default=1,
                          help="leading iterations of each run left out of the timing (default: 1)")
    training.add_argument("--script_args", default="",
                          help='ours: extra flags for the training script, e.g. "--deterministic 0"')

    methods = parser.add_argument_group("methods (uses --rounds, --iterations, --warmup)")
    methods.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS),
                         help="method scripts to time against the supervised script, or (throughput) with the "
                              "supervised script (default: all)")
    methods.add_argument("--eval_repeats", type=int, default=2,
                         help="evaluation: rounds over the scripts, one inference of the case each (default: 2)")
    return parser


def check_args(args):
    """One-line errors for counts that leave nothing to measure."""
    for flag in ("repeats", "rounds", "sw_batch_size", "eval_repeats"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 1 or args.iterations <= args.warmup:
        raise UserError(f"--warmup must be at least 1 (the first iteration has no start time in log.txt) and "
                        f"smaller than --iterations, got --warmup {args.warmup} --iterations {args.iterations}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")


# -- machine ------------------------------------------------------------------------------------------------
def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads):
    """What the figures depend on: CPU, core count, torch version and threads, current load."""
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": threads or torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(), "loadavg_start": list(os.getloadavg()),
            "date": dt.datetime.now().isoformat(timespec="seconds")}


def paired_ratios(numerators, denominators):
    """Per pair of neighbouring runs, the ratio of their median seconds: load that changes between pairs
    (other users of the machine) cancels, which pooling all runs would not do."""
    return [statistics.median(a) / statistics.median(b) for a, b in zip(numerators, denominators)]


def timed(function):
    """``(seconds, result)`` of one call."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


# -- inference ----------------------------------------------------------------------------------------------
def load_test_case(root, case):
    """``(case_id, image)`` of ``case`` (default: the first of test.list) from the LA root."""
    ids = LAHeart.list_ids(root, "test")
    dataset = LAHeart(root, "test", case_ids=[case or ids[0]])
    sample = dataset.load(0)
    return sample["case"], sample["image"]


def window_count(shape, patch):
    """Sliding windows of ``patch`` over a case of ``shape`` (padded as the inference pads it) at the LA strides."""
    padded = [size + left + right for size, (left, right) in zip(shape, padding_for(shape, patch))]
    return len(window_corners(padded, patch, STRIDE_XY, STRIDE_Z))


def central_window(image):
    """The patch-sized window at the centre of the (zero-padded) volume, as ``[1, 1, px, py, pz]``."""
    padded = np.pad(image, padding_for(image.shape, PATCH))
    corner = [(size - patch) // 2 for size, patch in zip(padded.shape, PATCH)]
    window = padded[tuple(slice(c, c + p) for c, p in zip(corner, PATCH))]
    return torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))[None, None]


@torch.no_grad()
def balance_classes(net, image):
    """Shift the class-1 bias of the output convolution so that the median foreground margin (logit 1 minus
    logit 0) on the central window is 0; return the shift. A random network otherwise tends to predict one
    class almost everywhere, and identical label maps would prove little."""
    logits = net(central_window(image))
    shift = -torch.median(logits[:, 1] - logits[:, 0]).item()
    net.out_conv.bias[1] += shift
    return shift


def load_weights(net, path):
    """Load a run checkpoint's V-Net (the network named ``model``, or the only one) into ``net``."""
    state = load_checkpoint(path)
    models = state["models"]
    name = "model" if "model" in models else (next(iter(models)) if len(models) == 1 else None)
    if name is None:
        raise UserError(f"checkpoint {path} holds networks {sorted(models)}; give one with a single network "
                        "or one named 'model'")
    try:
        net.load_state_dict(models[name], strict=True)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path}: network {name!r} is not a VNet(1, 2, 16, batchnorm): "
                        f"{str(exc).splitlines()[0]}") from None
    return f"checkpoint {path} (network {name!r}, iteration {state.get('iteration')})"


def inference_network(args, image):
    """The benchmark's ``VNet(1, 2, 16, 'batchnorm')`` in eval mode and a line saying where its weights
    come from."""
    torch.manual_seed(args.seed)
    net = VNet(1, NUM_CLASSES, 16, "batchnorm", has_dropout=False).eval()
    if args.checkpoint:
        return net, load_weights(net, resolve_path(args.checkpoint))
    shift = balance_classes(net, image)
    return net, (f"random (seed {args.seed}), out_conv class-1 bias shifted by {shift:+.4g} so that half of "
                 "the central window is foreground")


def variant_runner(variant, args, image):
    """Prepare ``variant`` in this process and return a call that predicts the whole case with it:
    'reference' is the anchors' loop on the network as built; 'ours' is :func:`sliding_window_inference`
    with ``--memory_format``, ``--allocator`` and ``--sw_batch_size``."""
    net, weights = inference_network(args, image)
    facts = {"weights": weights, "fingerprint": float(sum(v.double().sum() for v in net.state_dict().values()))}
    if variant == "reference":
        warm_up(net, 1)
        return (lambda: reference_sliding_window(net, image, PATCH, STRIDE_XY, STRIDE_Z, NUM_CLASSES, CPU)), facts
    facts["allocator_tuned"] = keep_freed_memory() if args.allocator == "tuned" else False
    if args.memory_format == "channels_last":
        channels_last(net)
    warm_up(net, args.sw_batch_size)
    return (lambda: sliding_window_inference(lambda x: torch.softmax(net(x), dim=1), image, PATCH, STRIDE_XY,
                                             STRIDE_Z, NUM_CLASSES, CPU, sw_batch_size=args.sw_batch_size)), facts


@torch.inference_mode()
def warm_up(net, batch_size):
    """One forward pass at the batch size the variant uses, so oneDNN's one-off set-up is not timed."""
    net(torch.zeros((batch_size, 1) + PATCH))


_WORKER = {}


def inference_setup(variant, args):
    """In a variant's worker process: load the case, prepare the variant, and say what was prepared."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    case_id, image = load_test_case(args.root_path, args.case)
    _WORKER["run"], facts = variant_runner(variant, args, image)
    return {"case": case_id, "shape": list(image.shape), **facts}


def inference_repeat():
    """In a variant's worker process: one timed prediction of the case, and the process's peak RSS."""
    seconds, (labels, score) = timed(_WORKER["run"])
    return {"seconds": seconds, "labels": labels, "score": score,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def worker_pool():
    """A fresh spawned process (its own allocator settings, threads and peak RSS) that keeps its state
    between tasks."""
    return concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def compare_predictions(reference, ours):
    """Differing label voxels, the largest score difference, and how many voxels were close enough to a
    tie for that difference to flip them (reference class margin at most twice the difference)."""
    difference = float(np.abs(ours["score"] - reference["score"]).max())
    margin = np.abs(reference["score"][1] - reference["score"][0])
    return {"differing_voxels": int(np.count_nonzero(ours["labels"] != reference["labels"])),
            "max_abs_score_diff": difference, "voxels_near_tie": int(np.count_nonzero(margin <= 2 * difference)),
            "foreground_fraction": float(reference["labels"].mean())}


def bench_inference(args):
    """Time the reference and ours on one full LA case, each in its own worker process, interleaved
    ``--repeats`` times; check that they predict the same."""
    variants = ("reference", "ours")
    results = {variant: [] for variant in variants}
    comparisons = []
    with worker_pool() as reference_pool, worker_pool() as ours_pool:
        pools = dict(zip(variants, (reference_pool, ours_pool)))
        facts = {variant: pool.submit(inference_setup, variant, args).result() for variant, pool in pools.items()}
        if facts["reference"]["fingerprint"] != facts["ours"]["fingerprint"]:
            raise UserError("the two worker processes built different networks; the comparison would be void")
        for _ in range(args.repeats):
            for variant, pool in pools.items():
                results[variant].append(pool.submit(inference_repeat).result())
            comparisons.append(compare_predictions(results["reference"][-1], results["ours"][-1]))
    seconds = {variant: [r["seconds"] for r in runs] for variant, runs in results.items()}
    medians = {variant: statistics.median(values) for variant, values in seconds.items()}
    ratios = paired_ratios([[s] for s in seconds["reference"]], [[s] for s in seconds["ours"]])
    shape = facts["reference"]["shape"]
    return {"case": facts["reference"]["case"], "shape": shape, "windows": window_count(shape, PATCH),
            "patch": list(PATCH), "stride_xy": STRIDE_XY, "stride_z": STRIDE_Z,
            "weights": facts["reference"]["weights"], "sw_batch_size": args.sw_batch_size,
            "memory_format": args.memory_format, "allocator_tuned": facts["ours"]["allocator_tuned"],
            "seconds": seconds, "median_seconds": medians, "pair_speedups": ratios,
            "speedup": statistics.median(ratios),
            "peak_rss_bytes": {variant: max(r["peak_rss_bytes"] for r in runs) for variant, runs in results.items()},
            "differing_voxels": max(c["differing_voxels"] for c in comparisons),
            "max_abs_score_diff": max(c["max_abs_score_diff"] for c in comparisons),
            "voxels_near_tie": max(c["voxels_near_tie"] for c in comparisons),
            "foreground_fraction": comparisons[0]["foreground_fraction"]}


# -- training: ours (the real script in a subprocess) ---------------------------------------------------------
def log_times(log_file):
    """``{iteration: seconds since midnight}`` from the per-iteration lines of a run's ``log.txt``
    (a run that passes midnight keeps counting upwards)."""
    times, day = {}, 0.0
    for line in Path(log_file).read_text().splitlines():
        match = LOG_LINE.match(line)
        if match:
            hours, minutes, secs, millis, iteration = (int(g) for g in match.groups())
            stamp = hours * 3600 + minutes * 60 + secs + millis / 1000 + day
            if times and stamp < max(times.values()):
                day += 86400
                stamp += 86400
            times[iteration] = stamp
    return times


def iteration_seconds(times, warmup):
    """Durations of iterations ``warmup + 1 ..`` as the gaps between consecutive log lines."""
    return [times[i] - times[i - 1] for i in sorted(times) if i > warmup]


def seconds_of_day(path):
    """A file's modification time as seconds since local midnight (the clock of log.txt)."""
    stamp = dt.datetime.fromtimestamp(path.stat().st_mtime)
    return stamp.hour * 3600 + stamp.minute * 60 + stamp.second + stamp.microsecond / 1e6


def script_command(script, args, output_root):
    """``code/<script>`` with its defaults (and ``--script_args``), cut to ``--iterations``, on the CPU like
    the bare loop, without the final evaluation."""
    return [sys.executable, str(Path(__file__).resolve().parent / script),
            "--root_path", str(args.root_path), "--output_root", str(output_root),
            "--max_iterations", str(args.iterations), "--seed", str(args.seed), "--device", "cpu", "--no_eval",
            "--progress", "0", *shlex.split(args.script_args)]


def run_and_measure(command, log_path, threads):
    """Run ``command`` with its output in ``log_path`` (and ``threads`` torch threads when given); return
    the child's peak RSS in bytes (the largest of the process and its own children, i.e. the data loader
    workers, as ``wait4`` reports it)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log_path, "w") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-5:]).strip()
        raise UserError(f"the training script exited {proc.returncode}: {tail}")
    return usage.ru_maxrss * 1024


def run_ours(args, workdir, script="train_supervised_3D.py"):
    """One run of a real script: timed iterations, peak RSS, and the final checkpoint write (which comes
    after the last iteration's log line, so outside the timed iterations)."""
    rss = run_and_measure(script_command(script, args, workdir), workdir / "stdout.txt", args.threads)
    run_dir = next(workdir.glob("**/log.txt")).parent
    times = log_times(run_dir / "log.txt")
    checkpoint_seconds = seconds_of_day(run_dir / "latest.pth") - times[max(times)]
    config = json.loads((run_dir / "config.json").read_text())["args"]
    return {"iteration_seconds": iteration_seconds(times, args.warmup), "peak_rss_bytes": rss,
            "final_checkpoint_seconds": checkpoint_seconds % 86400,
            "patch": config["patch_size"], "batch_size": config["batch_size"]}


# -- training: the bare loop (a spawned process, for its own peak RSS) ----------------------------------------
def preloaded_batch(root):
    """A batch like the script's: centre crops of the first four training cases, image ``[4, 1, X, Y, Z]``
    float and label ``[4, X, Y, Z]`` long."""
    dataset = LAHeart(root, "train", num=TRAIN_BATCH, transform=CenterCrop(PATCH))
    samples = [dataset[i] for i in range(TRAIN_BATCH)]
    image = torch.from_numpy(np.stack([s["image"] for s in samples]).astype(np.float32)).unsqueeze(1)
    label = torch.from_numpy(np.stack([s["label"] for s in samples]).astype(np.int64))
    return image, label


def bare_loop(root, iterations, warmup, seed, threads):
    """The script's network, loss and optimiser (with its default flags) on a preloaded batch, nothing else;
    returns the durations of iterations ``warmup + 1 ..`` and this process's peak RSS in bytes."""
    if threads is not None:
        torch.set_num_threads(threads)
    image, label = preloaded_batch(root)
    script = train_supervised_3D.get_parser().parse_args([])
    torch.manual_seed(seed)
    model = train_supervised_3D.build_networks(script)["model"].train()
    optimizer = torch.optim.SGD(model.parameters(), lr=script.base_lr, momentum=script.momentum,
                                weight_decay=script.weight_decay)
    stamps = [time.perf_counter()]
    for _ in range(iterations):
        loss, _, _ = train_supervised_3D.supervised_loss(model(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    durations = [end - start for start, end in zip(stamps[:-1], stamps[1:])]
    return {"iteration_seconds": durations[warmup:],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_bare(args):
    """One bare-loop run in a fresh spawned process."""
    with worker_pool() as pool:
        return pool.submit(bare_loop, str(args.root_path), args.iterations, args.warmup, args.seed,
                           args.threads).result()


def bench_training(args):
    """``--rounds`` x (a run of the real script, a bare-loop run), each ``--iterations`` long; the overhead
    is the median over rounds of the round's ours/bare ratio."""
    runs = {"ours": [], "bare": []}
    loads = []
    with tempfile.TemporaryDirectory(prefix="ssl3d-benchmark-") as tmp:
        for round_index in range(args.rounds):
            workdir = Path(tmp) / f"round_{round_index}"
            workdir.mkdir()
            loads.append(os.getloadavg()[0])
            runs["ours"].append(run_ours(args, workdir))
            runs["bare"].append(run_bare(args))
    rounds = {name: [run["iteration_seconds"] for run in results] for name, results in runs.items()}
    seconds = {name: [s for run in per_round for s in run] for name, per_round in rounds.items()}
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    overheads = [ratio - 1 for ratio in paired_ratios(rounds["ours"], rounds["bare"])]
    checkpoint = statistics.median(run["final_checkpoint_seconds"] for run in runs["ours"])
    return {"batch_size": TRAIN_BATCH, "patch": list(PATCH), "iterations_per_run": args.iterations,
            "warmup": args.warmup, "rounds": args.rounds, "script_args": args.script_args,
            "seconds_per_round": rounds, "loadavg_per_round": loads, "median_seconds": medians,
            "round_overheads": overheads, "overhead": statistics.median(overheads),
            "peak_rss_bytes": {name: max(run["peak_rss_bytes"] for run in results)
                               for name, results in runs.items()},
            "final_checkpoint_seconds": checkpoint}


# -- methods: each method script against the supervised script ----------------------------------------------
def bench_methods(args):
    """``--rounds`` x (the supervised script, then each method script), each ``--iterations`` long with its
    own defaults (batch and patch of its paper); per method the cost is the median over rounds of the
    round's method/supervised ratio of median iteration times."""
    names = ["supervised", *args.methods]
    scripts = {"supervised": "train_supervised_3D.py", **{m: METHODS[m][0] for m in args.methods}}
    runs = {name: [] for name in names}
    loads = []
    with tempfile.TemporaryDirectory(prefix="ssl3d-benchmark-") as tmp:
        for round_index in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for name in names:
                workdir = Path(tmp) / f"round_{round_index}_{name}"
                workdir.mkdir()
                runs[name].append(run_ours(args, workdir, scripts[name]))
    rounds = {name: [run["iteration_seconds"] for run in results] for name, results in runs.items()}
    result = {"iterations_per_run": args.iterations, "warmup": args.warmup, "rounds": args.rounds,
              "script_args": args.script_args, "loadavg_per_round": loads, "seconds_per_round": rounds,
              "setting": {name: {"patch": results[0]["patch"], "batch_size": results[0]["batch_size"]}
                          for name, results in runs.items()},
              "median_seconds": {name: statistics.median(s for run in per_round for s in run)
                                 for name, per_round in rounds.items()},
              "peak_rss_bytes": {name: max(run["peak_rss_bytes"] for run in results)
                                 for name, results in runs.items()}}
    result["round_ratios"] = {m: paired_ratios(rounds[m], rounds["supervised"]) for m in args.methods}
    result["ratio"] = {m: statistics.median(r) for m, r in result["round_ratios"].items()}
    return result


# -- throughput: one run with every core's threads against two runs at once ---------------------------------
def start_run(command, log_path, threads):
    """Start ``command`` with its output in ``log_path`` and ``threads`` compute threads (OMP_NUM_THREADS)."""
    output = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    output.close()
    return proc


def finished_run_times(proc, workdir):
    """Wait for a run started by :func:`start_run`; its ``{iteration: second of the day}``."""
    if proc.wait() != 0:
        tail = "".join((workdir / "stdout.txt").read_text().splitlines(keepends=True)[-5:]).strip()
        raise UserError(f"the training script exited {proc.returncode}: {tail}")
    return log_times(next(workdir.glob("**/log.txt")))


def overlapping_seconds(times, end, warmup):
    """Durations of iterations ``warmup + 1 ..`` that ended by ``end`` (while the other run still ran)."""
    return [times[i] - times[i - 1] for i in sorted(times) if i > warmup and times[i] <= end]


def throughput_round(args, script, tmp, round_index):
    """One run of ``script`` alone with every core's threads, then two at once (seeds ``--seed`` and
    ``--seed + 1``) with half the threads each: the median seconds per iteration of each, the pair's counted only
    while both ran."""
    cores = os.cpu_count() or 1
    alone = Path(tmp) / f"{round_index}_{script}_alone"
    alone.mkdir()
    times = finished_run_times(start_run(script_command(script, args, alone), alone / "stdout.txt", cores), alone)
    pair = []
    for offset in (0, 1):
        workdir = Path(tmp) / f"{round_index}_{script}_pair{offset}"
        workdir.mkdir()
        command = script_command(script, args, workdir)
        command[command.index("--seed") + 1] = str(args.seed + offset)
        pair.append((workdir, start_run(command, workdir / "stdout.txt", max(1, cores // 2))))
    pair_times = [finished_run_times(proc, workdir) for workdir, proc in pair]
    end = min(max(t.values()) for t in pair_times)
    together = [s for t in pair_times for s in overlapping_seconds(t, end, args.warmup)]
    return {"alone": statistics.median(iteration_seconds(times, args.warmup)),
            "together": statistics.median(together)}


def bench_throughput(args):
    """``--rounds`` x, for the supervised script and each of ``--methods``: :func:`throughput_round`. Two runs at
    once train ``2 x alone / together`` times as many iterations per second as one run at a time (the median
    over rounds); above 1, ``JOBS=2`` trains a table faster."""
    scripts = {"supervised": "train_supervised_3D.py", **{m: METHODS[m][0] for m in args.methods}}
    per_round = {name: [] for name in scripts}
    loads = []
    with tempfile.TemporaryDirectory(prefix="ssl3d-benchmark-") as tmp:
        for round_index in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for name, script in scripts.items():
                per_round[name].append(throughput_round(args, script, tmp, round_index))
    return {"iterations_per_run": args.iterations, "warmup": args.warmup, "rounds": args.rounds,
            "script_args": args.script_args, "cores": os.cpu_count(), "loadavg_per_round": loads,
            "seconds_per_round": per_round,
            "speedup": {name: statistics.median(2 * r["alone"] / r["together"] for r in rounds)
                        for name, rounds in per_round.items()}}


def throughput_rows(result):
    rows = [("setting", f"{result['rounds']} rounds x {result['iterations_per_run']} iterations per run, first "
                        f"{result['warmup']} untimed; flags: {result['script_args'] or 'the scripts defaults'}", "")]
    for name, speedup in result["speedup"].items():
        rounds = result["seconds_per_round"][name]
        detail = " | ".join(f"{r['alone']:.3f} s/it alone, {r['together']:.3f} s/it each of two" for r in rounds)
        rows.append((name, f"two at once {speedup:.2f}x the iterations per second of one at a time ({detail})", ""))
    return rows


# -- evaluation: each method's inference on one LA case --------------------------------------------------------
def method_inference_setup(script, args):
    """In a method's worker process: the script's networks (seeded random weights; the time does not depend on
    them) with its own ``predict``, patch and inference preparation, and the LA case; one warm-up window batch."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    module = importlib.import_module(Path(script).stem)
    script_args = finalize_args(module.get_parser().parse_args([]), get_dataset_spec("LA"))
    patch = tuple(script_args.patch_size)
    torch.manual_seed(args.seed)
    nets = module.build_networks(script_args)
    prepare_for_inference(nets, CPU)
    case_id, image = load_test_case(args.root_path, args.case)
    with torch.inference_mode():
        module.predict(nets, torch.zeros((args.sw_batch_size, 1) + patch))
    _WORKER["run"] = lambda: sliding_window_inference(lambda x: module.predict(nets, x), image, patch, STRIDE_XY,
                                                      STRIDE_Z, NUM_CLASSES, CPU, sw_batch_size=args.sw_batch_size)
    return {"case": case_id, "shape": list(image.shape), "patch": list(patch),
            "windows": window_count(image.shape, patch)}


def bench_evaluation(args):
    """Seconds of one sliding-window inference of a full LA case at stride 18/4 per method script (the bulk of
    ``test_3D.py``'s time per case; the metrics come on top), each script in a fresh worker process, the
    scripts taken in turn ``--eval_repeats`` times."""
    scripts = {"supervised": "train_supervised_3D.py", **{m: METHODS[m][0] for m in args.methods}}
    facts, seconds = {}, {name: [] for name in scripts}
    for _ in range(args.eval_repeats):
        for name, script in scripts.items():
            with worker_pool() as pool:  # one process at a time: eight would not fit in memory together
                facts[name] = pool.submit(method_inference_setup, script, args).result()
                seconds[name].append(pool.submit(inference_repeat).result()["seconds"])
    return {"case": facts["supervised"]["case"], "shape": facts["supervised"]["shape"],
            "stride_xy": STRIDE_XY, "stride_z": STRIDE_Z, "sw_batch_size": args.sw_batch_size,
            "facts": facts, "seconds": seconds,
            "median_seconds": {name: statistics.median(values) for name, values in seconds.items()}}


def evaluation_rows(result):
    rows = [("case", f"{result['case']} {'x'.join(map(str, result['shape']))}, stride "
                     f"{result['stride_xy']}/{result['stride_z']}, sw_batch_size {result['sw_batch_size']}", "")]
    for name, median in result["median_seconds"].items():
        facts = result["facts"][name]
        rows.append((name, f"{median:.2f} s/case ({facts['windows']} windows of "
                           f"{'x'.join(map(str, facts['patch']))}; runs: {_runs(result['seconds'][name])})", ""))
    return rows


# -- report -------------------------------------------------------------------------------------------------
def verdict(ok):
    return "PASS" if ok else "FAIL"


def inference_rows(result):
    medians = result["median_seconds"]
    rss = result["peak_rss_bytes"]
    equal = result["differing_voxels"] == 0
    return [
        ("case", f"{result['case']} {'x'.join(map(str, result['shape']))}, {result['windows']} windows "
                 f"of {'x'.join(map(str, result['patch']))}, stride {result['stride_xy']}/{result['stride_z']}", ""),
        ("weights", result["weights"], ""),
        ("reference s/case", f"{medians['reference']:.2f}  (runs: {_runs(result['seconds']['reference'])})", ""),
        ("ours s/case", f"{medians['ours']:.2f}  (runs: {_runs(result['seconds']['ours'])}; sw_batch_size "
                        f"{result['sw_batch_size']}, {result['memory_format']}, allocator "
                        f"{'tuned' if result['allocator_tuned'] else 'default'})", ""),
        ("speed-up", f"{result['speedup']:.2f}x  (median of the pairs: {_runs(result['pair_speedups'])})",
         f"{verdict(result['speedup'] >= MIN_SPEEDUP)} (>= {MIN_SPEEDUP}x)"),
        ("label maps", f"{result['differing_voxels']} differing voxels, foreground "
                       f"{100 * result['foreground_fraction']:.1f}%", verdict(equal) + " (identical)"),
        ("score maps", f"max |diff| {result['max_abs_score_diff']:.3g}; {result['voxels_near_tie']} voxels "
                       "within twice that of a tie", ""),
        ("peak RSS", f"reference {rss['reference'] / GIB:.2f} GiB, ours {rss['ours'] / GIB:.2f} GiB", ""),
    ]


def training_rows(result):
    medians = result["median_seconds"]
    rss = result["peak_rss_bytes"]
    return [
        ("setting", f"batch {result['batch_size']} x {'x'.join(map(str, result['patch']))}, {result['rounds']} "
                    f"rounds x {result['iterations_per_run']} iterations, first {result['warmup']} untimed; "
                    f"script flags: {result['script_args'] or 'defaults'}", ""),
        ("ours s/iteration", f"{medians['ours']:.2f}  (by round: {_rounds(result['seconds_per_round']['ours'])})", ""),
        ("bare s/iteration", f"{medians['bare']:.2f}  (by round: {_rounds(result['seconds_per_round']['bare'])})", ""),
        ("plumbing overhead", f"{100 * result['overhead']:+.1f}%  (median of the rounds: "
                              f"{' '.join(f'{100 * o:+.1f}%' for o in result['round_overheads'])})",
         f"{verdict(result['overhead'] <= MAX_OVERHEAD)} (<= {100 * MAX_OVERHEAD:.0f}%)"),
        ("peak RSS ours", f"{rss['ours'] / GIB:.2f} GiB", f"{verdict(rss['ours'] <= MAX_RSS_GIB * GIB)} "
                                                         f"(<= {MAX_RSS_GIB:.0f} GiB)"),
        ("peak RSS bare", f"{rss['bare'] / GIB:.2f} GiB", ""),
        ("final checkpoint", f"{result['final_checkpoint_seconds']:.2f} s after the last iteration (untimed; the "
                             "script writes one every --save_interval iterations, 200 by default)", ""),
    ]


def methods_rows(result):
    medians = result["median_seconds"]
    rss = result["peak_rss_bytes"]

    def setting(name):
        info = result["setting"][name]
        return f"batch {info['batch_size']} x {'x'.join(map(str, info['patch']))}"

    rows = [("setting", f"each script's defaults, {result['rounds']} rounds x {result['iterations_per_run']} "
                        f"iterations, first {result['warmup']} untimed", ""),
            ("supervised", f"{setting('supervised')}: {medians['supervised']:.2f} s/iteration, peak RSS "
                           f"{rss['supervised'] / GIB:.2f} GiB (by round: "
                           f"{_rounds(result['seconds_per_round']['supervised'])})", "")]
    for method, ratio in result["ratio"].items():
        limit = METHODS[method][1]
        check = "" if limit is None else f"{verdict(rss[method] <= limit * GIB)} (<= {limit:.0f} GiB)"
        rows.append((method, f"{setting(method)}: {medians[method]:.2f} s/iteration = {ratio:.2f}x supervised "
                             f"(rounds: {_runs(result['round_ratios'][method])}), peak RSS "
                             f"{rss[method] / GIB:.2f} GiB", check))
    return rows


def _runs(values):
    return " ".join(f"{v:.2f}" for v in values)


def _rounds(per_round):
    return " | ".join(_runs(values) for values in per_round)


def print_table(title, rows):
    print(f"\n{title}")
    width = max(len(name) for name, _, _ in rows)
    for name, value, check in rows:
        print(f"  {name:<{width}}  {value}" + (f"  [{check}]" if check else ""))


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    args.root_path = resolve_path(args.root_path)
    if not args.root_path.is_dir():
        raise UserError(f"LA data root {args.root_path} not found (pass --root_path)")
    report = {"machine": machine_info(args.threads), "args": {k: str(v) for k, v in vars(args).items()}}
    machine = report["machine"]
    print(f"{machine['cpu']}, {machine['cpu_count']} cores; torch {machine['torch']}, "
          f"{machine['torch_threads']} threads; load average {machine['loadavg_start'][0]:.2f}")
    if args.only in (None, "inference"):
        report["inference"] = bench_inference(args)
        print_table("sliding-window inference (one LA case)", inference_rows(report["inference"]))
    if args.only in (None, "training"):
        report["training"] = bench_training(args)
        print_table("training iteration (supervised baseline)", training_rows(report["training"]))
    if args.only in (None, "methods"):
        report["methods"] = bench_methods(args)
        print_table("method iteration cost (each against the supervised script)", methods_rows(report["methods"]))
    if args.only in (None, "evaluation"):
        report["evaluation"] = bench_evaluation(args)
        print_table("inference per LA case (each method's predict)", evaluation_rows(report["evaluation"]))
    if args.only == "throughput":
        report["throughput"] = bench_throughput(args)
        print_table(f"training throughput on {os.cpu_count()} cores: two runs at once with half the threads each, "
                    "against one run at a time", throughput_rows(report["throughput"]))
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        path = resolve_path(args.json, Path.cwd())
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults: {path}")
    return 1 if report.get("inference", {}).get("differing_voxels", 0) else 0


if __name__ == "__main__":
    run_cli(main)
