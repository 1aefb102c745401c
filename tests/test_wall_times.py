"""Training cost from run logs (code/report/wall_times.py) on logs with known answers."""
import pytest

from conftest import assert_one_line_error, call_main
from report.wall_times import COST, finished_iterations, iteration_seconds, main, run_costs, write_cost

ARGS = "[10:00:00.000] Namespace(dataset='LA')"


def log_lines(start_seconds, iterations, step, first=1):
    """Iteration lines ``first..first+iterations-1``, ``step`` seconds apart from ``start_seconds`` (time of day)."""
    lines = []
    for offset in range(iterations):
        now = (start_seconds + offset * step) % 86400
        stamp = f"{int(now // 3600):02d}:{int(now % 3600 // 60):02d}:{now % 60:06.3f}"
        lines.append(f"[{stamp}] iteration {first + offset} : loss : 0.5")
    return lines


def test_iteration_seconds_within_one_process_across_midnight():
    lines = [ARGS, *log_lines(86400 - 5, 5, 2.0)]  # 23:59:55 ... 00:00:03
    assert iteration_seconds(lines) == pytest.approx([2.0] * 4)


def test_a_resumed_process_counts_no_gap_and_its_repeated_iterations_only_as_steps():
    # iterations 1-4, a stop, a restart hours later that repeats 3-6 from its checkpoint
    lines = [ARGS, *log_lines(36000, 4, 3.0), "[14:00:00.000] Namespace(dataset='LA')",
             "[14:00:02.000] resumed from latest.pth at iteration 2", *log_lines(50410, 4, 5.0, first=3)]
    assert iteration_seconds(lines) == pytest.approx([3.0] * 3 + [5.0] * 3)


def test_finished_iterations_reads_the_last_finish_line():
    assert finished_iterations([ARGS, *log_lines(36000, 3, 1.0)]) is None
    assert finished_iterations([ARGS, "[10:05:00.000] training finished at iteration 3375; weights in x",
                                "[10:05:20.000] test (eval_iter_3375): Dice 77.0"]) == 3375


def write_log(folder, lines):
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_runs_are_costed_by_median_and_unfinished_ones_named(tmp_path):
    # seven steps of 2 s and two of 60 s (another job shared the CPU): the median is 2 s
    steps = log_lines(36000, 8, 2.0) + log_lines(36000 + 7 * 2.0 + 60, 2, 60.0, first=9)
    write_log(tmp_path / "seed1/MT_4/vnet", [ARGS, *steps, "[11:00:00.000] training finished at iteration 1800"])
    write_log(tmp_path / "seed1/UGPL_4/vnet", [ARGS, *log_lines(36000, 3, 4.0)])
    costs, unfinished = run_costs(tmp_path)
    assert [(c.run, c.iterations) for c in costs] == [("seed1/MT_4/vnet", 1800)]
    assert costs[0].seconds_per_iteration == pytest.approx(2.0) and costs[0].hours == pytest.approx(1.0)
    assert unfinished == ["seed1/UGPL_4/vnet"]

    out = tmp_path / "cost.md"
    proc = call_main(main, tmp_path, "--out", out, "--note", "two runs at a time", check=True)
    assert "1 runs" in proc.stdout
    document = out.read_text(encoding="utf-8")
    assert "| seed1/MT_4/vnet | 1800 | 2.00 | 1.00 |" in document and "two runs at a time" in document
    assert "Not finished (left out): `seed1/UGPL_4/vnet`" in document


def test_the_log_of_a_real_run_is_read(finished):
    """The patterns follow the log a training run writes (utils.run.LOG_FORMAT and its lines), not only the
    fabricated logs above: a 2-iteration run is costed from its one step."""
    costs, unfinished = run_costs(finished.parent)
    assert [(cost.run, cost.iterations) for cost in costs] == [("vnet", 2)] and unfinished == []
    assert costs[0].seconds_per_iteration > 0


def test_a_folder_without_a_finished_run_is_one_line(tmp_path):
    assert_one_line_error(call_main(main, tmp_path / "missing"), "not a folder of runs")
    write_log(tmp_path / "run", [ARGS, *log_lines(36000, 3, 1.0)])
    assert_one_line_error(call_main(main, tmp_path), "no finished run")


def test_a_run_without_its_log_is_costed_from_its_cost_json_and_a_broken_one_is_one_line(tmp_path):
    write_log(tmp_path / "seed1/MT_4/vnet", [ARGS, *log_lines(36000, 3, 2.0),
                                             "[11:00:00.000] training finished at iteration 1800"])
    (cost,), _ = run_costs(tmp_path)
    write_cost(cost, tmp_path / "seed1/MT_4/vnet")
    (tmp_path / "seed1/MT_4/vnet/log.txt").unlink()
    assert run_costs(tmp_path) == ([cost], [])
    (tmp_path / "seed1/MT_4/vnet" / COST).write_text("{\"iterations\": 1800}", encoding="utf-8")
    assert_one_line_error(call_main(main, tmp_path), "cost.json cannot be read")
