"""The benchmark's command line and its table: python3 tests/bench.py ...

No figure is checked here: speed lives in the benchmark only.
"""

import os
import subprocess
import sys

import pytest

import bench
from helpers import TIMEOUT

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True, timeout=TIMEOUT)


def test_help_lists_the_figures_and_measures_nothing():
    result = run("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: tests/bench.py")
    for n in range(1, 12):
        assert "\n  %2d  " % n in result.stdout
    assert result.stderr == ""


def test_unknown_figure_is_refused_with_one_line():
    result = run("13")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == "tests/bench.py: error: no figure 13: the figures are 1 to 12"


def test_runs_must_be_at_least_one():
    result = run("--runs", "0", "1")
    assert result.returncode == 2
    assert "argument --runs: must be a whole number of at least 1, not '0'" in result.stderr


def test_figure_numbers_take_lists_and_ranges():
    assert bench.figure_numbers("1-3,9 11") == [1, 2, 3, 9, 11]


@pytest.mark.slow
def test_quick_run_of_figures_1_and_2_prints_a_labelled_table():
    result = run("--quick", "--runs", "1", "--figures", "1,2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "QUICK: reduced sizes, a smoke test: these figures are NOT for the README" in lines
    rows = [line for line in lines if line.startswith("| 1. ") or line.startswith("| 2. ")]
    assert [row[:4] for row in rows] == ["| 1.", "| 1.", "| 2.", "| 2."]
    assert all("bare `os.scandir` + `stat` walk" in row for row in rows[:2])
    assert "run 1 of 1, figure 1-2:" in result.stderr


def test_table_gives_medians_spread_and_runs_that_missed_the_target():
    target = ("ratio", ">=", 1.5, ">= 1.5x")
    rows = [bench.Row(4, "download", value, "ms", "`http.server`", base, bench.faster, "%.2fx faster", target)
            for value, base in ((0.010, 0.016), (0.012, 0.013), (0.011, 0.018))]
    table = bench.table(rows, 3).splitlines()
    assert table[2] == ("| 4. download | 11.0 ms (10.0-12.0) | `http.server`: 16.0 ms (13.0-18.0)"
                        " | 1.45x faster (1.08-1.64) | >= 1.5x | not met in 1 of 3 runs |")


def test_table_says_not_met_when_no_run_met_the_target():
    rows = [bench.Row(8, "idle", value, "core", target=("value", "<=", 0.01, "<= 1% of a core"))
            for value in (0.011, 0.012)]
    assert bench.table(rows, 2).splitlines()[2] == (
        "| 8. idle | 1.15% of a core (1.10-1.20) | none |  | <= 1% of a core | not met |")
