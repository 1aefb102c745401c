"""Which evaluation of a run is the run's own result, decided by what each evaluation recorded, not by folder names.

    python code/utils/own_result.py <run>                           # the folder of its final weights' result
    python code/utils/own_result.py <run> --checkpoint best_val.pth

prints the folder (exit 0), or why the run has none (exit 1). ``summarize.py`` (and through it ``plots.py``),
``reproduce.sh`` and ``test_3D.py`` all decide with :func:`own_evaluation`.

The run's own result for a checkpoint (its final ``iter_<max_iterations>.pth``, or ``best_val.pth``) is an
evaluation in the run folder that measured

- the run's own weights: that file of the run, not one of another run or from elsewhere, with the content the
  file has now (its hash, checked when the weights are there; run files kept without weights keep the record);
- with the method's own inference (not another network, ``test_3D.py --network``);
- the test split, each case of its list exactly once.

Among several, those made with the code the run was trained with come first (then those whose code is unknown,
then those with other code, recorded), then those with the run's own protocol (largest component as ``--nms``
says, its patch and strides, voxel units), then the first made.
Evaluations from before summaries carried a ``provenance`` record (``utils.provenance``) are judged by what they
did record (checkpoint name, network, split; the case ids of their ``metrics.csv``, against the test list when
the data is there) and come after recorded ones. Every other evaluation is kept, and :func:`own_evaluation`
says why each is not the result, so that a table can show it apart. Torch-free.
"""
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

CODE_DIR = str(Path(__file__).resolve().parents[1])
if CODE_DIR not in sys.path:
    sys.path.insert(0, CODE_DIR)

from utils.cli import ArgumentParser, resolve_path, run_cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.provenance import file_sha256  # noqa: E402
from utils.run_files import snapshot_name  # noqa: E402

SUMMARY_KEYS = ("dice", "jaccard", "hd95", "asd", "num_cases", "protocol")
PROTOCOL_KEYS = ("checkpoint", "patch_size", "stride_xy", "stride_z", "nms")
TEST_LIST = "test.list"


@dataclass
class Evaluation:
    """An evaluation folder of a run, its summary, and why it is not the run's own result (empty when it is)."""

    folder: Path
    summary: dict
    problems: list = field(default_factory=list)

    @property
    def record(self):
        """The ``provenance`` record, or None for an evaluation made before summaries carried one."""
        return self.summary.get("provenance")


@dataclass
class OwnResult:
    """The decision for one checkpoint of a run: the chosen evaluation (or None and ``reason``), and the other
    evaluations of that checkpoint's name, each with its problems."""

    chosen: Evaluation = None
    others: list = field(default_factory=list)
    reason: str = None


def read_summary(folder):
    """``summary.json`` of an evaluation folder, or None when it is missing, unreadable or incomplete."""
    try:
        summary = json.loads((Path(folder) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    complete = isinstance(summary, dict) and all(key in summary for key in SUMMARY_KEYS) \
        and isinstance(summary["protocol"], dict) and all(key in summary["protocol"] for key in PROTOCOL_KEYS)
    return summary if complete else None


def eval_index(folder_name, checkpoint):
    """The ``N`` of an evaluation folder ``eval_<checkpoint stem>[_<network>][_nms][_N]`` named after
    ``checkpoint`` (1 without suffix), or None for a folder of another checkpoint (``eval_iter_200`` is not one
    of ``iter_20.pth``)."""
    stem = re.escape(Path(checkpoint).stem)
    match = re.fullmatch(rf"eval_{stem}(?:_[A-Za-z]\w*?)?(?:_nms)?(?:_(\d+))?", folder_name)
    return int(match[1] or 1) if match else None


def claims(summary, folder, checkpoint):
    """Whether an evaluation says it is one of ``checkpoint``: by its record, or by its folder's name."""
    named = summary.get("provenance", {}).get("checkpoint", summary["protocol"]["checkpoint"])
    return Path(str(named)).name == checkpoint or eval_index(folder.name, checkpoint) is not None


def case_ids(folder):
    """The case ids of an evaluation's ``metrics.csv`` (without its mean and std rows), or None."""
    try:
        with open(Path(folder) / "metrics.csv", newline="", encoding="utf-8") as handle:
            return [row["case"] for row in csv.DictReader(handle) if row["case"] not in ("mean", "std")]
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return None


def test_list(args):
    """The ids of the run's test list (``<root_path>/test.list``), or None when the data is not there."""
    path = Path(str(args.get("root_path", ""))) / TEST_LIST
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return None


def recorded_problems(record, run_dir, checkpoint, digest):
    """Why an evaluation with a ``provenance`` record is not the run's result for ``checkpoint``."""
    problems = []
    if not record.get("checkpoint_in_run") or record.get("checkpoint") != checkpoint:
        problems.append(f"weights {record.get('checkpoint')}, not the run's {checkpoint}")
    elif digest(run_dir / checkpoint) not in (None, record.get("checkpoint_sha256")):
        problems.append(f"the run's {checkpoint} has changed since it was evaluated")
    if record.get("network"):
        problems.append(f"network {record['network']}, not the method's own inference")
    cases = record.get("cases") or []
    if record.get("split") != "test":
        problems.append(f"the {record.get('split')} split, not the test split")
    elif len(set(cases)) != len(cases):
        problems.append("cases repeated")
    elif not record.get("complete_split"):
        problems.append(f"{len(cases)} cases, not the whole test list")
    return problems


def legacy_problems(summary, folder, args, checkpoint):
    """Why an evaluation without a record is not the run's result: what its summary and ``metrics.csv`` say."""
    protocol, problems = summary["protocol"], []
    if protocol["checkpoint"] != checkpoint:
        problems.append(f"weights {protocol['checkpoint']}, not the run's {checkpoint}")
    if protocol.get("network"):
        problems.append(f"network {protocol['network']}, not the method's own inference")
    cases, listed = case_ids(folder), test_list(args)
    if protocol.get("split", "test") != "test":
        problems.append(f"the {protocol['split']} split, not the test split")
    elif cases is None or len(cases) != summary["num_cases"]:
        problems.append("its metrics.csv does not list its cases")
    elif len(set(cases)) != len(cases):
        problems.append("cases repeated")
    elif listed is not None and sorted(cases) != sorted(listed):
        problems.append(f"{len(cases)} cases, not the whole test list")
    return problems


def preference(evaluation, args, checkpoint):
    """Sort key among a run's own results: the training code first, recorded before legacy, the run's protocol
    (LCC as ``--nms`` says, its patch and strides, voxel units), then the first made."""
    protocol, record = evaluation.summary["protocol"], evaluation.record
    code_rank = {True: 0, None: 1, False: 2}[(record or {}).get("code_as_trained")]  # unknown before other code
    return (record is None, code_rank, protocol["nms"] != bool(args.get("nms")),
            [protocol["patch_size"], protocol["stride_xy"], protocol["stride_z"]]
            != [args.get("patch_size"), args.get("stride_xy"), args.get("stride_z")],
            protocol.get("units") != "voxels", eval_index(evaluation.folder.name, checkpoint) or 0,
            evaluation.folder.name)


def run_args(run_dir):
    """The arguments of the run's ``config.json``; one line when it cannot be read."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        args = config["args"]
        if not isinstance(args, dict):
            raise TypeError("args is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a run configuration ({type(exc).__name__}: {exc})") from None
    return args


def own_evaluation(run_dir, args=None, checkpoint=None):
    """The :class:`OwnResult` of ``checkpoint`` (default: the run's final weights) in ``run_dir``, whose
    ``config.json`` arguments are ``args`` (read when not given)."""
    run_dir = Path(run_dir)
    args = run_args(run_dir) if args is None else args
    final = snapshot_name(args["max_iterations"])
    checkpoint = checkpoint or final
    hashes = {}

    def digest(path):
        if path not in hashes:
            hashes[path] = file_sha256(path) if path.is_file() else None
        return hashes[path]

    found = []
    for folder in sorted(run_dir.glob("eval_*")):
        summary = read_summary(folder) if folder.is_dir() else None
        if summary is None or not claims(summary, folder, checkpoint):
            continue
        record = summary.get("provenance")
        problems = recorded_problems(record, run_dir, checkpoint, digest) if record \
            else legacy_problems(summary, folder, args, checkpoint)
        found.append(Evaluation(folder, summary, problems))
    own = sorted((e for e in found if not e.problems), key=lambda e: preference(e, args, checkpoint))
    others = [e for e in found if e.problems]
    if own:
        return OwnResult(own[0], [e for e in found if e is not own[0]])
    if not (run_dir / checkpoint).is_file() and not found:
        reason = f"no {'final checkpoint ' if checkpoint == final else ''}{checkpoint} (training failed or unfinished)"
    elif others:
        reason = f"no evaluation of the run's own {checkpoint}, its network and the whole test list (" + \
                 "; ".join(f"{e.folder.name}: {', '.join(e.problems)}" for e in others) + ")"
    else:
        reason = f"{checkpoint} has no test evaluation"
    return OwnResult(None, others, reason)


def get_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder")
    parser.add_argument("--checkpoint", default=None, help="default: the run's final iter_<max_iterations>.pth")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    result = own_evaluation(resolve_path(args.run), checkpoint=args.checkpoint)
    if result.chosen is None:
        print(result.reason)
        sys.exit(1)
    print(result.chosen.folder)


if __name__ == "__main__":
    run_cli(main)
