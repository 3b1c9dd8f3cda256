"""Live mode and the console: the client armed on a simulated board (tests/live_board.py)
under CPython, and under $MICROPYTHON when set, against a real server."""

import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time

import pytest

import ota
import ota_promoter
from conftest import ROOT, TIMEOUT, checksum, settle, write
from conftest import MICROPYTHON, NO_MICROPYTHON, files, heap_for, promoted

BOARD = os.path.join(ROOT, "tests", "live_board.py")
needs_console = pytest.mark.skipif(
    not hasattr(ota_promoter, "Boards"), reason="needs the server's POST /console")

BOOT = """import ota
try:
    ota.update(URL, root=ROOT)
except ota.OTAError as e:
    print("no update:", e)
ota.live(URL, root=ROOT, wait=5)
"""
APP = """print("app %s starts")
import time
n = 0
while True:
    n += 1
    print("%s tick", n)
    time.sleep(0.02)
"""


class Board:
    """A simulated board running the client in a subprocess; lines() are what it printed."""

    def __init__(self, interpreter, client, root, url, seconds=60):
        self.root = root
        write(root, "boot.py", BOOT)  # copied once by cable, with the client
        self.process = subprocess.Popen(
            interpreter + [BOARD, client, root, str(seconds), url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = queue.Queue()
        self.seen = []
        threading.Thread(target=lambda: [self.output.put(line.rstrip("\n")) for line in self.process.stdout],
                         daemon=True).start()

    def expect(self, pattern):
        """The next line matching pattern (a regular expression), within TIMEOUT."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self.output.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no line matching %r; the last lines:\n%s" % (pattern, "\n".join([l for l in self.seen if not re.search(" tick [0-9]+$", l)][-40:])))
            self.seen.append(line)
            assert not line.startswith("@error"), line
            match = re.search(pattern, line)
            if match:
                return match

    def stop(self):
        self.process.kill()
        self.process.wait(TIMEOUT)


@pytest.fixture(params=["cpython", "micropython"])
def interpreter(request):
    if request.param == "cpython":
        return [sys.executable, "-u"], os.path.join(ROOT, "micropython")
    if not MICROPYTHON:
        pytest.skip(NO_MICROPYTHON)
    # the simulated board's own code takes heap too: test_memory holds the client to 38 KB
    return [MICROPYTHON, "-X", "heapsize=96k"], str(request.getfixturevalue("mpy_dir"))


@pytest.fixture
def promoter(tree, serve):
    p = ota_promoter.Promoter(str(tree), interval=0.05)
    p.url = serve(p).url
    return p


@pytest.fixture
def board(tree, promoter, interpreter, tmp_path):
    """The app's v1 published, and a board that booted it and is running it in live mode."""
    save(tree, promoter, "boot.py", BOOT)
    save(tree, promoter, "main.py", APP % ("v1", "v1"))
    b = Board(interpreter[0], interpreter[1], str(tmp_path / "device"), promoter.url)
    b.expect("^@boot 1 power")
    b.expect("^@boot 2 hard")  # the first update resets the board
    b.expect("^v1 tick 1$")
    yield b
    b.stop()


def save(tree, promoter, path, data):
    """Write a file and wait until the server publishes it."""
    write(tree, path, data)
    deadline = time.monotonic() + TIMEOUT
    while checksum(data, path) not in [f["checksum"] for f in promoter.manifest()]:
        assert time.monotonic() < deadline, "%s was not published" % path
        settle(promoter)
        time.sleep(0.01)


def test_the_app_keeps_running_while_live_mode_is_armed(board, capsys):
    board.expect("^v1 tick 50$")  # the app runs on, with the long-poll pending (wait=5)
    ticks, slowest = map(int, board.expect(r"^@ticks (\d+) (\d+)$").groups())
    with capsys.disabled():
        print("\n  %d timer callbacks, the slowest %d ms" % (ticks, slowest))
    assert ticks >= 10
    assert slowest < 1000  # none waits for the server's answer (5 s away)
    assert board.seen.count("app v1 starts") == 1  # never restarted


def test_a_save_restarts_main_py_on_the_new_code_with_a_soft_reset(board, tree, promoter):
    save(tree, promoter, "main.py", APP % ("v2", "v2"))
    board.expect("^KeyboardInterrupt")  # Ctrl-C through the console stream stopped v1
    board.expect("^@boot 3 soft")  # then Ctrl-D at the prompt; the timer was disarmed
    board.expect("^app v2 starts$")
    board.expect("^v2 tick 3$")
    assert files(board.root, own=False) == promoted(tree)


def test_a_crashed_app_still_gets_the_fix(board, tree, promoter):
    save(tree, promoter, "main.py", "print('v2 crashes')\nundefined_name\n")
    board.expect("^@boot 3 soft")
    board.expect("^v2 crashes$")
    board.expect("NameError")
    board.expect("^@ticks")  # the REPL idles with the timer armed
    save(tree, promoter, "main.py", APP % ("v3", "v3"))
    board.expect("^@boot 4 soft")  # no Ctrl-C needed: the prompt was showing
    board.expect("^v3 tick 3$")


def test_a_stuck_app_still_gets_the_update(tree, promoter, tmp_path):
    # CPython only: the unix port has no signals to preempt a loop that never prints
    save(tree, promoter, "boot.py", BOOT)
    save(tree, promoter, "main.py", "print('stuck')\nwhile True:\n    pass\n")
    b = Board([sys.executable, "-u"], os.path.join(ROOT, "micropython"), str(tmp_path / "device"), promoter.url)
    try:
        b.expect("^@boot 2 hard")
        b.expect("^stuck$")
        save(tree, promoter, "main.py", APP % ("v2", "v2"))
        b.expect("^@boot 3 soft")
        b.expect("^v2 tick 1$")
    finally:
        b.stop()


@needs_console
def test_prints_and_tracebacks_reach_the_server_log(board, tree, promoter, caplog):
    caplog.set_level(logging.INFO, logger="ota_promoter")
    board.expect("^v1 tick 5$")
    save(tree, promoter, "main.py", "print('v2 crashes')\nundefined_name\n")
    board.expect("NameError")
    deadline = time.monotonic() + TIMEOUT
    want = ["127.0.0.1 [a4cf12f3e9b1] | v1 tick 5", "127.0.0.1 [a4cf12f3e9b1] | v2 crashes"]
    while True:
        logged = [r.getMessage() for r in caplog.records]
        if all(w in logged for w in want) and any("[a4cf12f3e9b1] | NameError" in m for m in logged):
            break
        assert time.monotonic() < deadline, "not in the server's log: %r" % logged[-20:]
        time.sleep(0.05)


# -- The console stream and the timer callback, called directly --------------------


def test_a_dead_server_never_blocks_a_print(tmp_path):
    from test_cli import free_port

    url = "http://127.0.0.1:%d" % free_port()  # nothing listens there
    live = ota.live(url, root=str(tmp_path), wait=1, timeout=1)
    stream = live.console
    began = time.monotonic()
    assert stream.write(b"x" * 2000) == 2000  # print is told all was written
    for _ in range(20):
        live.tick()
    took = time.monotonic() - began
    assert (stream.n, stream.dropped) == (1024, 976)
    assert took < 2  # refused connections cost a back-off, not a wait
    live.stop()


def test_a_full_console_keeps_the_newest_output_and_never_the_bytes_being_sent():
    stream = ota._Console(True)
    stream.write(b"A" * 600)
    stream.sending = 100  # a POST of the first 100 bytes is on its way
    stream.write(b"B" * 500)
    stream.write(b"Traceback (most recent call last):\nNameError: name 'x' isn't defined\n")
    kept = bytes(stream.buf[: stream.n])
    tail = b"Traceback (most recent call last):\nNameError: name 'x' isn't defined\n"
    assert (stream.n, stream.dropped) == (1024, 600 + 500 + len(tail) - 1024)
    assert kept[:100] == b"A" * 100  # what is being sent stays as it was
    assert kept.endswith(tail)  # the line that says what went wrong is kept
    stream.sent(100, 0)
    assert bytes(stream.buf[: stream.n]) == kept[100:]


@needs_console
def test_output_dropped_while_the_server_was_away_is_counted_when_it_is_back(tmp_path, tree, caplog):
    from test_cli import free_port

    caplog.set_level(logging.INFO, logger="ota_promoter")
    port = free_port()
    live = ota.live("http://127.0.0.1:%d" % port, root=str(tmp_path), wait=1, timeout=1)
    live.console.write(b"y" * 1500 + b"\nhello\n")  # the newest output is kept
    live.tick()
    assert live.post.backoff == 1000  # refused: back off a second
    write(tree, "main.py", "m")
    promoter = ota_promoter.Promoter(str(tree), interval=3600)
    server = promoter.serve("127.0.0.1", port).start()  # on the port the board was given
    try:
        live.post.backoff = 0
        deadline = time.monotonic() + TIMEOUT
        while live.console.n or live.console.dropped:
            assert time.monotonic() < deadline
            live.tick()
            time.sleep(0.01)
        logged = [r.getMessage() for r in caplog.records]
        assert "127.0.0.1 [%s] | hello" % ota._device()[:12] in logged
        assert any("(483 bytes of output dropped)" in m for m in logged), logged
    finally:
        live.stop()
        server.close()


# -- A check never holds the app, and never hammers the server ---------------------------

VERSION = "5" * 40  # what the board has installed
OLDER = "4" * 40
CHECKS = """import sys, time
sys.path.insert(0, %r)
import ota
live = ota.live(%r, root=%r, console=False, wait=30, timeout=10)
began = ota.ticks_ms()
slowest = 0
while ota.ticks_diff(ota.ticks_ms(), began) < 3500:
    t = ota.ticks_ms()
    live.tick()
    slowest = max(slowest, ota.ticks_diff(ota.ticks_ms(), t))
    time.sleep(0.02)
live.stop()
print("slowest", slowest)
"""
POLL = "GET /files/version?wait=30 HTTP/1.1"


def at_once(head, body=b""):
    def answer(s, line, stopped):
        s.sendall(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return answer


OWN_VERSION = at_once(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n", b'{"version":"%s"}' % VERSION.encode())
ANSWERS = {
    # like the original Go server, which ignores ?wait and If-None-Match
    "a 200 naming the board's own version": ({POLL: OWN_VERSION}, [POLL]),
    "a 304 at once": ({POLL: at_once(b'HTTP/1.1 304 Not Modified\r\nETag: "%s"\r\n' % VERSION.encode())}, [POLL]),
    # a site whose export was killed: it names an older version, its manifest lists the board's
    "an older version, whose update changes nothing": ({
        POLL: at_once(b"HTTP/1.1 200 OK\r\n", b'{"version": "%s"}\n' % OLDER.encode()),
        "GET /files/version HTTP/1.0": at_once(b"HTTP/1.0 200 OK\r\n", b'{"version": "%s"}\n' % OLDER.encode()),
        "GET /files/%s HTTP/1.0" % OLDER: at_once(b"HTTP/1.0 404 Not Found\r\n", b"<html>404"),
        "GET /files/manifest.txt HTTP/1.0": at_once(b"HTTP/1.0 200 OK\r\n", VERSION.encode() + b"\n"),
    }, [POLL, "GET /files/version HTTP/1.0", "GET /files/%s HTTP/1.0" % OLDER, "GET /files/manifest.txt HTTP/1.0"]),
    # a cache, or a second server behind the address, keeps naming another version
    # at the long-poll than /files/version, which names the board's: tried once
    "a long-poll naming another version than /files/version": ({
        POLL: at_once(b"HTTP/1.1 200 OK\r\n", b'{"version": "%s"}\n' % OLDER.encode()),
        "GET /files/version HTTP/1.0": at_once(b"HTTP/1.0 200 OK\r\n", b'{"version": "%s"}\n' % VERSION.encode()),
    }, [POLL, "GET /files/version HTTP/1.0"]),
}


@pytest.mark.parametrize("answers", sorted(ANSWERS))
def test_a_check_answered_at_once_rests_a_second_and_never_holds_a_tick(hostile, interpreter, tmp_path, answers,
                                                                         capsys):
    """Any other request (a blocking version check, the manifest) is held until the
    test ends: a tick that made one would wait for the client's 10 s timeout."""
    answer, first = ANSWERS[answers]
    server = hostile(lambda s, line, stopped: (answer.get(line) or (lambda *_: stopped.wait(TIMEOUT)))(s, line, stopped))
    device = tmp_path / "device"
    write(device, ".ota", VERSION + "\n")
    out = subprocess.run(interpreter[0] + ["-c", CHECKS % (interpreter[1], server.url, str(device))],
                         capture_output=True, text=True, timeout=TIMEOUT * 3)
    assert out.returncode == 0, out.stdout + out.stderr
    slowest = int(re.search(r"^slowest (\d+)$", out.stdout, re.M).group(1))
    with capsys.disabled():
        print("\n  %s: the slowest tick %d ms" % (answers, slowest))
    assert slowest < 2000  # ms: far below the 10 s a held request would take
    polls = [when for when, line in zip(server.times, server.requests) if line == POLL]
    assert server.requests == first + [POLL] * (len(server.requests) - len(first))
    assert 3 <= len(polls) <= 4  # in 3.5 s
    assert min(b - a for a, b in zip(polls, polls[1:])) > 0.95  # a second's rest after each
    assert files(device) == {".ota": VERSION.encode() + b"\n"}  # nothing written


# -- Memory, on the 32-bit unix port ---------------------------------------------------

MEASURE = """import sys, gc
sys.path.insert(0, %r)
gc.collect(); a = gc.mem_free()
import ota
gc.collect(); b = gc.mem_free()
live = ota.live(%r, root=%r, wait=5)
gc.collect(); c = gc.mem_free()
print("heap", a - b, b - c)
import time
t = time.ticks_ms()
while live.restart is None and time.ticks_diff(time.ticks_ms(), t) < %d:
    live.tick()
    time.sleep_ms(10)
print("updated", live.restart is not None)
"""


@pytest.mark.skipif(not MICROPYTHON, reason=NO_MICROPYTHON)
def test_live_mode_holds_little_heap_and_a_full_update_runs_in_38_kb(tree, promoter, mpy_dir, tmp_path, capsys):
    device = tmp_path / "device"
    device.mkdir()
    for i in range(20):
        write(tree, "lib/module_%02d.py" % i, "N = %d\n" % i * 40)
    save(tree, promoter, "main.py", APP % ("v1", "v1"))
    script = MEASURE % (str(mpy_dir), promoter.url, str(device), TIMEOUT * 1000)
    out = subprocess.run([MICROPYTHON, "-X", "heapsize=" + os.environ.get("OTA_HEAP", "38k"), "-c", script],
                         capture_output=True, text=True, timeout=TIMEOUT * 3)
    assert out.returncode == 0, out.stdout + out.stderr
    imported, armed = map(int, re.search(r"^heap (\d+) (\d+)$", out.stdout, re.M).groups())
    with capsys.disabled():
        print("\n  import ota: %d B of heap; live mode armed: %d B more" % (imported, armed))
    assert out.stdout.splitlines()[-1] == "updated True", out.stdout
    assert files(device, own=False) == promoted(tree)
    assert armed <= 3 * 1024


# -- The example app ---------------------------------------------------------------------


def test_the_example_app_is_published_without_the_secrets(tmp_path):
    import shutil

    example = tmp_path / "example"
    shutil.copytree(os.path.join(ROOT, "micropython", "example"), str(example))
    write(example, "secrets.py", "WIFI_PASSWORD = 'hunter2'\n")  # the user's, next to the example
    p = ota_promoter.Promoter(str(example), interval=3600)
    settle(p)
    assert sorted(f["path"] for f in p.manifest()) == ["boot.py", "main.py", "secrets.py.example"]
