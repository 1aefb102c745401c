"""What the finished runs under a folder cost to train, read from their logs.

Every run's ``log.txt`` holds one line per iteration, stamped with the time of day. The time between two
consecutive iterations of one process is what that iteration took; a run's cost is estimated as the median of
those times, multiplied by its iterations. The median leaves out what a wall-clock span would count: the hours a
run lay stopped between two sessions, the iterations a resumed run computed again after its last checkpoint, and
a stretch while something else shared the CPU. It leaves in what each run shared all the time (in ``QUICK=1``'s
table: another run beside it, one compute thread each), so the figures hold for the conditions they were
measured in, which the document should name.

A run's logs are not kept with the files that define a table (``summarize.py --run_files``): its cost is, as
``cost.json`` (:func:`write_cost`), so that a folder of run files gives the document too, also for runs whose logs
are gone. A run folder with a ``log.txt`` is costed from it; one without, from its ``cost.json``.

    python code/report/wall_times.py model/reproduce/LA_half_quick --out docs/cost_quick.md
    python code/report/wall_times.py results/LA_half_quick --out docs/cost_quick.md   # from the run files
"""
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

from utils.atomic import write_atomically, write_json  # noqa: E402
from utils.cli import ArgumentParser, output_path, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402

LOG = "log.txt"
COST = "cost.json"  # a run's cost where its log is not kept: {"iterations": ..., "seconds_per_iteration": ...}
DAY_SECONDS = 24 * 3600
STAMP = re.compile(r"^\[(\d\d):(\d\d):(\d\d(?:\.\d+)?)\] (.*)$")  # utils.run.LOG_FORMAT (not imported: it brings torch)
ITERATION = re.compile(r"^iteration (\d+) : ")
PROCESS_START = "Namespace("  # the first line each process writes (its arguments)
FINISHED = re.compile(r"^training finished at iteration (\d+)")


@dataclass(frozen=True)
class RunCost:
    """One finished run: its folder relative to the root, iterations, and the median seconds of one."""

    run: str
    iterations: int
    seconds_per_iteration: float

    @property
    def hours(self):
        return self.iterations * self.seconds_per_iteration / 3600


def iteration_seconds(lines):
    """The seconds each iteration took, from a log's lines: the time between iteration ``n - 1`` and ``n`` of one
    process (a step over midnight counts one day forward; a process's first iteration, which follows its
    start-up, counts nothing)."""
    seconds = []
    previous = None  # (iteration, time of day in seconds) of the last iteration line of this process
    for line in lines:
        stamped = STAMP.match(line)
        if not stamped:
            continue
        hours, minutes, secs, text = stamped.groups()
        now = int(hours) * 3600 + int(minutes) * 60 + float(secs)
        if text.startswith(PROCESS_START):
            previous = None
            continue
        iteration = ITERATION.match(text)
        if not iteration:
            continue
        number = int(iteration.group(1))
        if previous is not None and number == previous[0] + 1:
            seconds.append((now - previous[1]) % DAY_SECONDS)
        previous = (number, now)
    return seconds


def finished_iterations(lines):
    """The iteration a log says training finished at, or None while it has not."""
    for line in reversed(lines):
        stamped = STAMP.match(line)
        finished = stamped and FINISHED.match(stamped.group(4))
        if finished:
            return int(finished.group(1))
    return None


def run_cost(folder, run):
    """The :class:`RunCost` of the run in ``folder`` (named ``run``) from its ``log.txt``, else from its
    ``cost.json``; None while its log does not say it finished."""
    log = folder / LOG
    if log.is_file():
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        iterations = finished_iterations(lines)
        seconds = iteration_seconds(lines)
        if iterations is None or not seconds:
            return None
        return RunCost(run, iterations, statistics.median(seconds))
    try:
        recorded = json.loads((folder / COST).read_text(encoding="utf-8"))
        return RunCost(run, int(recorded["iterations"]), float(recorded["seconds_per_iteration"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{folder / COST} cannot be read ({exc})") from None


def write_cost(cost, folder):
    """Keep ``cost`` as ``folder/cost.json``, which :func:`run_cost` reads where no log is."""
    write_json(folder / COST, {"iterations": cost.iterations, "seconds_per_iteration": cost.seconds_per_iteration})


def run_costs(root):
    """``(costs, unfinished)``: a :class:`RunCost` for every run under ``root`` whose log says it finished or
    that holds a ``cost.json``, in path order, and the folders of the runs whose log does not (yet)."""
    costs, unfinished = [], []
    for folder in sorted({path.parent for name in (LOG, COST) for path in root.rglob(name)}):
        run = folder.relative_to(root).as_posix()
        cost = run_cost(folder, run)
        if cost is None:
            unfinished.append(run)
        else:
            costs.append(cost)
    return costs, unfinished


def group_of(run):
    """The first folder of a run's path (``LA_half_quick_seed1337``): the table's seed, for a subtotal."""
    return run.split("/", 1)[0]


def markdown(costs, unfinished, title, note):
    """The document: one row per run, a subtotal per first folder, the total."""
    lines = [f"# {title}", ""]
    if note:
        lines += [note, ""]
    lines += ["Generated by `python code/report/wall_times.py` from each run's `log.txt` (or the `cost.json` kept "
              "from it with the run files): the median seconds between two consecutive iterations of one process, "
              "times the run's iterations (evaluation not included).",
              "", "| run | iterations | s / iteration (median) | training (h) |", "| --- | --- | --- | --- |"]
    lines += [f"| {cost.run} | {cost.iterations} | {cost.seconds_per_iteration:.2f} | {cost.hours:.2f} |"
              for cost in costs]
    groups = sorted({group_of(cost.run) for cost in costs})
    if len(groups) > 1:
        lines += [f"| all of {group} | | | {sum(c.hours for c in costs if group_of(c.run) == group):.1f} |"
                  for group in groups]
    lines.append(f"| all {len(costs)} runs | | | {sum(cost.hours for cost in costs):.1f} |")
    if unfinished:
        lines += ["", f"Not finished (left out): {', '.join(f'`{run}`' for run in unfinished)}."]
    return "\n".join(lines) + "\n"


def get_parser():
    parser = ArgumentParser(description="What the finished runs under a folder cost to train: median seconds per "
                                        "iteration from each log.txt, times the iterations.")
    parser.add_argument("model_dir", help="folder with the runs, or the run files of a table (searched for log.txt "
                                          "and cost.json at any depth)")
    parser.add_argument("--title", default="Training cost", help="the document's title")
    parser.add_argument("--note", default="", help="a paragraph under the title: where and how the runs trained")
    parser.add_argument("--out", default=None, help="markdown file to write (default: print it)")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    root = resolve_path(args.model_dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder of runs")
    costs, unfinished = run_costs(root)
    if not costs:
        raise UserError(f"no finished run under {root} (no {LOG} that says 'training finished at iteration', "
                        f"no {COST})")
    document = markdown(costs, unfinished, args.title, args.note)
    if args.out is None:
        print(document, end="")
        return
    out = output_path(args.out)
    write_atomically(out, lambda handle: handle.write(document.encode("utf-8")))
    print(f"{len(costs)} runs -> {out}")


if __name__ == "__main__":
    run_cli(main)
