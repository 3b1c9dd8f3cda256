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


def run(*args, timeout=TIMEOUT, env=None):
    return subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_help_lists_the_figures_and_measures_nothing():
    result = run("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: tests/bench.py")
    for n in range(1, 15):
        assert "\n  %2d  " % n in result.stdout
    assert result.stderr == ""


def test_unknown_figure_is_refused_with_one_line():
    result = run("15")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == "tests/bench.py: error: no figure 15: the figures are 1 to 14"


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


@pytest.mark.slow
def test_quick_run_of_figure_13_gives_each_start_against_no_check():
    env = {k: v for k, v in os.environ.items() if k != bench.ORIGINAL}
    result = run("--quick", "--runs", "1", "13", timeout=120, env=env)  # 0.2 s for each RSS in --quick: about 10 s
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 13. ")]
    starts = [row for row in rows if row.startswith("| 13. start to the first 200 of `/files/version`, 300 files")]
    assert "`--no-check` | " in starts[0] and "none: the baseline of the rows below" in starts[0]
    assert "the default check with `compile()`" in starts[1] and "`--no-check`, in turns: " in starts[1]
    assert not any("the Go original" in row for row in rows)
    assert rows[-1].startswith("| 13. RSS of a bare interpreter")
    assert "13. e skipped: set OTA_PROMOTER_ORIGINAL to an executable of the Go original" in result.stdout
    assert "run 1 of 1, figure 13:" in result.stderr


FIRST_VERSION_LATE = """import http.server, sys, time
ready = time.monotonic() + float(sys.argv[2])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        late = time.monotonic() < ready
        self.send_response(503 if late else 200)
        self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_start_is_timed_to_the_first_200_and_503_means_not_yet():
    port = bench.free_port()
    process, seconds = bench.start_to_ready([sys.executable, "-c", FIRST_VERSION_LATE, str(port), "0.5"], port,
                                            None, TIMEOUT)
    try:
        assert 0.5 <= seconds < TIMEOUT
        assert bench.version_status(port) == 200
    finally:
        bench.stop(process)


def test_path_without_leaves_out_the_folders_holding_the_program(tmp_path, monkeypatch):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    program = tmp_path / "b" / "mpy-cross"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join(str(tmp_path / name) for name in ("a", "b", "c")))
    assert bench.path_without("mpy-cross") == os.pathsep.join(str(tmp_path / name) for name in ("a", "c"))


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


@pytest.mark.slow
def test_quick_run_of_figure_14_times_enter_to_the_answer_against_a_print():
    env = {k: v for k, v in os.environ.items() if k != "MICROPYTHON"}
    result = run("--quick", "--runs", "1", "14", timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 14. ")]
    assert len(rows) == 2
    assert rows[0].startswith("| 14. Enter (`1+1\\r` posted to `/boards/<id>/input`) to the answer in `/boards`")
    assert "client under CPython" in rows[0] and ": median of 5 |" in rows[0]
    assert "| a `print()` of the app to its line in `/boards`, median of 5: " in rows[0]
    assert "| <= 150 ms | " in rows[0]
    assert "run 1 of 1, figure 14:" in result.stderr
