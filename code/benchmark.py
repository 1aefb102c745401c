"""Benchmarks on real LA data: sliding-window inference (ours vs the anchors' loop) and training iterations
of the supervised baseline (the real script vs a bare loop). What they measure: docs/benchmarks.md.

    python code/benchmark.py --root_path /work/shared/data/LA --json benchmark.json
    python code/benchmark.py --only inference --repeats 3
    python code/benchmark.py --only training --rounds 2 --iterations 4

Each comparison runs its two variants interleaved in one invocation (A B A B ...) and reports medians, so
load from other processes falls on both alike. Requirements checked: inference at least 1.3x faster than
the reference with identical label maps (a mismatch exits 1); training plumbing at most 5% slower per
iteration than the bare loop; peak memory of the training run at most 6 GiB.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import copy  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_supervised_3D  # noqa: E402
from dataloaders.la_heart import LAHeart  # noqa: E402
from dataloaders.transforms import CenterCrop  # noqa: E402
from networks.vnet import VNet  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.cli import ArgumentParser, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.sliding_window import (channels_last, padding_for, reference_sliding_window,  # noqa: E402
                                  sliding_window_inference, window_corners)

CPU = torch.device("cpu")
PATCH = (112, 112, 80)
STRIDE_XY, STRIDE_Z = 18, 4
NUM_CLASSES = 2
TRAIN_BATCH = 4
MIN_SPEEDUP = 1.3
MAX_OVERHEAD = 0.05
MAX_RSS_GIB = 6.0
GIB = 1024 ** 3
LOG_LINE = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\.(\d{3})\] iteration (\d+) :")


def get_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root_path", default="data/LA", help="LA data root (default: data/LA)")
    parser.add_argument("--only", choices=("inference", "training"), default=None,
                        help="run one benchmark (default: both)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in this process (default: torch's, one per core)")

    inference = parser.add_argument_group("inference")
    inference.add_argument("--case", default=None, help="test case id (default: the first of test.list)")
    inference.add_argument("--checkpoint", default=None,
                           help="weights from a run's checkpoint (default: seeded random weights, balanced)")
    inference.add_argument("--repeats", type=int, default=3, help="reference/ours pairs (default: 3)")
    inference.add_argument("--sw_batch_size", type=int, default=4, help="ours: windows per forward (default: 4)")
    inference.add_argument("--memory_format", choices=("channels_last", "contiguous"), default="channels_last",
                           help="ours: the network's memory format (default: channels_last)")

    training = parser.add_argument_group("training")
    training.add_argument("--rounds", type=int, default=2, help="ours/bare pairs of runs (default: 2)")
    training.add_argument("--iterations", type=int, default=4, help="iterations per run (default: 4)")
    training.add_argument("--warmup", type=int, default=1,
                          help="leading iterations of each run left out of the timing (default: 1)")
    training.add_argument("--num_workers", type=int, default=None,
                          help="ours: data loader workers (default: the script's, 2)")
    return parser


def check_args(args):
    """One-line errors for counts that leave nothing to measure."""
    for flag in ("repeats", "rounds", "sw_batch_size"):
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


def machine_info():
    """What the figures depend on: CPU, core count, torch version and threads, current load."""
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(), "loadavg_start": list(os.getloadavg()),
            "date": dt.datetime.now().isoformat(timespec="seconds")}


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


def ours_network(net, memory_format):
    """A copy of ``net`` in the memory format ours runs with (the reference keeps the original)."""
    ours = copy.deepcopy(net)
    return channels_last(ours) if memory_format == "channels_last" else ours


@torch.inference_mode()
def warm_up(reference_net, ours_net, sw_batch_size):
    """One forward pass of each network at its batch size, so oneDNN's one-off set-up is not timed."""
    window = torch.zeros((1, 1) + PATCH)
    reference_net(window)
    ours_net(window.expand(sw_batch_size, -1, -1, -1, -1).contiguous())


def compare_predictions(reference, ours):
    """Differing label voxels, the largest score difference, and the reference's smallest class margin
    (a label can only flip where the margin is below the score difference)."""
    ref_labels, ref_score = reference
    labels, score = ours
    return {"differing_voxels": int(np.count_nonzero(labels != ref_labels)),
            "max_abs_score_diff": float(np.abs(score - ref_score).max()),
            "min_reference_margin": float(np.abs(ref_score[1] - ref_score[0]).min()),
            "foreground_fraction": float(ref_labels.mean())}


def bench_inference(args):
    """Time the reference and ours on one full LA case, interleaved ``--repeats`` times; check equality."""
    case_id, image = load_test_case(args.root_path, args.case)
    reference_net, weights = inference_network(args, image)
    ours_net = ours_network(reference_net, args.memory_format)

    def run_reference():
        return reference_sliding_window(reference_net, image, PATCH, STRIDE_XY, STRIDE_Z, NUM_CLASSES, CPU)

    def run_ours():
        return sliding_window_inference(lambda x: torch.softmax(ours_net(x), dim=1), image, PATCH, STRIDE_XY,
                                        STRIDE_Z, NUM_CLASSES, CPU, sw_batch_size=args.sw_batch_size)

    warm_up(reference_net, ours_net, args.sw_batch_size)
    seconds = {"reference": [], "ours": []}
    comparisons = []
    for _ in range(args.repeats):
        reference_seconds, reference = timed(run_reference)
        ours_seconds, ours = timed(run_ours)
        seconds["reference"].append(reference_seconds)
        seconds["ours"].append(ours_seconds)
        comparisons.append(compare_predictions(reference, ours))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    padded = [s + left + right for s, (left, right) in zip(image.shape, padding_for(image.shape, PATCH))]
    return {"case": case_id, "shape": list(image.shape),
            "windows": len(window_corners(padded, PATCH, STRIDE_XY, STRIDE_Z)),
            "patch": list(PATCH), "stride_xy": STRIDE_XY, "stride_z": STRIDE_Z, "weights": weights,
            "sw_batch_size": args.sw_batch_size, "memory_format": args.memory_format,
            "seconds": seconds, "median_seconds": medians,
            "speedup": medians["reference"] / medians["ours"],
            "differing_voxels": max(c["differing_voxels"] for c in comparisons),
            "max_abs_score_diff": max(c["max_abs_score_diff"] for c in comparisons),
            "min_reference_margin": comparisons[0]["min_reference_margin"],
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


def ours_command(args, output_root):
    """The supervised script with its defaults, cut to ``--iterations`` and without the final evaluation."""
    command = [sys.executable, str(Path(train_supervised_3D.__file__).resolve()),
               "--root_path", str(args.root_path), "--output_root", str(output_root),
               "--max_iterations", str(args.iterations), "--seed", str(args.seed), "--no_eval", "--progress", "0"]
    if args.num_workers is not None:
        command += ["--num_workers", str(args.num_workers)]
    return command


def run_and_measure(command, log_path):
    """Run ``command`` with its output in ``log_path``; return the child's peak RSS in bytes (the largest
    of the process and its own children, i.e. the data loader workers, as ``wait4`` reports it)."""
    with open(log_path, "w") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-5:]).strip()
        raise UserError(f"the training script exited {proc.returncode}: {tail}")
    return usage.ru_maxrss * 1024


def run_ours(args, workdir):
    """One run of the real script: timed iterations, peak RSS, and the final checkpoint write (which comes
    after the last iteration's log line, so outside the timed iterations)."""
    rss = run_and_measure(ours_command(args, workdir), workdir / "stdout.txt")
    run_dir = workdir / "LA" / "Supervised_8" / "vnet"
    times = log_times(run_dir / "log.txt")
    checkpoint_seconds = seconds_of_day(run_dir / "latest.pth") - times[max(times)]
    return {"iteration_seconds": iteration_seconds(times, args.warmup), "peak_rss_bytes": rss,
            "final_checkpoint_seconds": checkpoint_seconds % 86400}


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
    """The script's network, loss and optimiser on a preloaded batch, nothing else; returns the durations
    of iterations ``warmup + 1 ..`` and this process's peak RSS in bytes."""
    if threads is not None:
        torch.set_num_threads(threads)
    image, label = preloaded_batch(root)
    torch.manual_seed(seed)
    model = train_supervised_3D.build_networks(argparse.Namespace(model="vnet", has_dropout=1))["model"].train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
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
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(bare_loop, str(args.root_path), args.iterations, args.warmup, args.seed,
                           args.threads).result()


def bench_training(args):
    """``--rounds`` x (a run of the real script, a bare-loop run), each ``--iterations`` long."""
    runs = {"ours": [], "bare": []}
    with tempfile.TemporaryDirectory(prefix="ssl3d-benchmark-") as tmp:
        for round_index in range(args.rounds):
            workdir = Path(tmp) / f"round_{round_index}"
            workdir.mkdir()
            runs["ours"].append(run_ours(args, workdir))
            runs["bare"].append(run_bare(args))
    seconds = {name: [s for run in results for s in run["iteration_seconds"]] for name, results in runs.items()}
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    checkpoint = statistics.median(run["final_checkpoint_seconds"] for run in runs["ours"])
    return {"batch_size": TRAIN_BATCH, "patch": list(PATCH), "iterations_per_run": args.iterations,
            "warmup": args.warmup, "rounds": args.rounds, "num_workers": args.num_workers,
            "seconds": seconds, "median_seconds": medians, "overhead": medians["ours"] / medians["bare"] - 1,
            "peak_rss_bytes": {name: max(run["peak_rss_bytes"] for run in results)
                               for name, results in runs.items()},
            "final_checkpoint_seconds": checkpoint}


# -- report -------------------------------------------------------------------------------------------------
def verdict(ok):
    return "PASS" if ok else "FAIL"


def inference_rows(result):
    medians = result["median_seconds"]
    equal = result["differing_voxels"] == 0
    return [
        ("case", f"{result['case']} {'x'.join(map(str, result['shape']))}, {result['windows']} windows "
                 f"of {'x'.join(map(str, result['patch']))}, stride {result['stride_xy']}/{result['stride_z']}", ""),
        ("weights", result["weights"], ""),
        ("reference s/case", f"{medians['reference']:.2f}  (runs: {_runs(result['seconds']['reference'])})", ""),
        ("ours s/case", f"{medians['ours']:.2f}  (runs: {_runs(result['seconds']['ours'])}; sw_batch_size "
                        f"{result['sw_batch_size']}, {result['memory_format']})", ""),
        ("speed-up", f"{result['speedup']:.2f}x", f"{verdict(result['speedup'] >= MIN_SPEEDUP)} (>= {MIN_SPEEDUP}x)"),
        ("label maps", f"{result['differing_voxels']} differing voxels, foreground "
                       f"{100 * result['foreground_fraction']:.1f}%", verdict(equal) + " (identical)"),
        ("score maps", f"max |diff| {result['max_abs_score_diff']:.3g}, smallest reference class margin "
                       f"{result['min_reference_margin']:.3g}", ""),
    ]


def training_rows(result):
    medians = result["median_seconds"]
    rss = result["peak_rss_bytes"]
    return [
        ("setting", f"batch {result['batch_size']} x {'x'.join(map(str, result['patch']))}, {result['rounds']} "
                    f"rounds x {result['iterations_per_run']} iterations, first {result['warmup']} untimed", ""),
        ("ours s/iteration", f"{medians['ours']:.2f}  (iterations: {_runs(result['seconds']['ours'])})", ""),
        ("bare s/iteration", f"{medians['bare']:.2f}  (iterations: {_runs(result['seconds']['bare'])})", ""),
        ("plumbing overhead", f"{100 * result['overhead']:+.1f}%",
         f"{verdict(result['overhead'] <= MAX_OVERHEAD)} (<= {100 * MAX_OVERHEAD:.0f}%)"),
        ("peak RSS ours", f"{rss['ours'] / GIB:.2f} GiB", f"{verdict(rss['ours'] <= MAX_RSS_GIB * GIB)} "
                                                         f"(<= {MAX_RSS_GIB:.0f} GiB)"),
        ("peak RSS bare", f"{rss['bare'] / GIB:.2f} GiB", ""),
        ("final checkpoint", f"{result['final_checkpoint_seconds']:.2f} s after the last iteration (untimed; "
                             "every 200 iterations with --save_interval 200)", ""),
    ]


def _runs(values):
    return " ".join(f"{v:.2f}" for v in values)


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
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    machine = report["machine"]
    print(f"{machine['cpu']}, {machine['cpu_count']} cores; torch {machine['torch']}, "
          f"{machine['torch_threads']} threads; load average {machine['loadavg_start'][0]:.2f}")
    if args.only in (None, "inference"):
        report["inference"] = bench_inference(args)
        print_table("sliding-window inference (one LA case)", inference_rows(report["inference"]))
    if args.only in (None, "training"):
        report["training"] = bench_training(args)
        print_table("training iteration (supervised baseline)", training_rows(report["training"]))
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        path = resolve_path(args.json, Path.cwd())
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults: {path}")
    return 1 if report.get("inference", {}).get("differing_voxels", 0) else 0


if __name__ == "__main__":
    run_cli(main)
