"""Live mode and the console: the client armed on a simulated board (tests/live_board.py)
under CPython, and under $MICROPYTHON when set, against a real server."""

import logging
import os
import re
import subprocess
import sys
import time

import pytest

import ota
import ota_promoter
import ota_http
from helpers import ROOT, TIMEOUT, SimulatedBoard, checksum, free_port, settle, until, write
from helpers import MICROPYTHON, MICROPYTHON_BITS, NO_MICROPYTHON, files, heap_for, promoted
from proxy import FaultProxy, Relay, Trickle, is_download, is_manifest

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


def Board(interpreter, client, root, url, seconds=60, free=0, boot=BOOT):
    """A simulated board running the client in a subprocess, its main.py the update's."""
    return SimulatedBoard(interpreter, client, root, url, boot, None, seconds, free)


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

    def published():
        settle(promoter)
        return checksum(data, path) in [f["checksum"] for f in promoter.manifest()]

    until(published, "%s to be published" % path)


@pytest.mark.slow
def test_the_app_keeps_running_while_live_mode_is_armed(board, capsys):
    board.expect("^v1 tick 50$")  # the app runs on, with the long-poll pending (wait=5)
    ticks, slowest = map(int, board.expect(r"^@ticks (\d+) (\d+)$").groups())
    with capsys.disabled():
        print("\n  %d timer callbacks, the slowest %d ms" % (ticks, slowest))
    assert ticks >= 10
    assert slowest < 1000  # none waits for the server's answer (5 s away)
    assert board.seen.count("app v1 starts") == 1  # never restarted


@pytest.mark.slow
def test_a_save_restarts_main_py_on_the_new_code_with_a_soft_reset(board, tree, promoter):
    save(tree, promoter, "main.py", APP % ("v2", "v2"))
    board.expect("^KeyboardInterrupt")  # Ctrl-C through the console stream stopped v1
    board.expect("^@boot 3 soft")  # then Ctrl-D at the prompt; the timer was disarmed
    board.expect("^app v2 starts$")
    board.expect("^v2 tick 3$")
    assert files(board.root, own=False) == promoted(tree)


@pytest.mark.slow
def test_a_crashed_app_still_gets_the_fix(board, tree, promoter):
    save(tree, promoter, "main.py", "print('v2 crashes')\nundefined_name\n")
    board.expect("^@boot 3 soft")
    board.expect("^v2 crashes$")
    board.expect("NameError")
    board.expect("^@ticks")  # the REPL idles with the timer armed
    save(tree, promoter, "main.py", APP % ("v3", "v3"))
    board.expect("^@boot 4 soft")  # no Ctrl-C needed: the prompt was showing
    board.expect("^v3 tick 3$")


@pytest.mark.slow
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


# -- The app is stopped for an update, never frozen by it ---------------------------------

# An app with a 100 ms loop that says how late each turn came: a tick of live mode that
# waited on the network would show as a late turn.
TIMED_APP = """print("app %s starts")
import time
hold = [bytearray(256) for _ in range(%d)]  # the app's own objects (256 B each), live while it runs
n = 0
t = ticks_ms()
while True:
    time.sleep(0.1)
    n += 1
    now = ticks_ms()
    print("%s tick", n, "late", ticks_diff(now, t) - 100)
    t = now
"""
FAST_BOOT = BOOT.replace("ota.update(URL, root=ROOT)", "ota.update(URL, root=ROOT, timeout=2)").replace(
    "wait=5)", "wait=5, timeout=2)")


def lateness(board, version):
    """How late each turn of the app's loop came while it ran, up to the Ctrl-C that stopped it."""
    return [int(line.split()[-1]) for line in board.seen if re.match("^%s tick [0-9]+ late -?[0-9]+$" % version, line)]


def fresh_heap_free(heap):
    """Bytes free in a fresh MicroPython of this heap size: what a board has when boot.py starts."""
    out = subprocess.run([MICROPYTHON, "-X", "heapsize=" + heap, "-c", "import gc\ngc.collect()\nprint(gc.mem_free())"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    return int(out.stdout)


INSTALLED = "^ota: version [0-9a-f]{7} installed, 1 change$"  # at the prompt, beside what the app left
# No room for the update, or for the code that installs it, beside what the app left
AT_BOOT = "^ota: not enough memory( beside the app)?; (restarting|resetting): boot.py installs it$"


def board_of_38_kb(tree, promoter, mpy_dir, tmp_path, app):
    """A board whose heap is an ESP8266's 38 KB (in a 64-bit build: 52 KB, as it needs
    about 1.36 times as much for the same objects), running app (v1) in live mode."""
    save(tree, promoter, "boot.py", BOOT)
    save(tree, promoter, "main.py", app % ("v1", "v1"))
    b = Board([MICROPYTHON, "-X", "heapsize=160k"], str(mpy_dir), str(tmp_path / "device"), promoter.url,
              free=fresh_heap_free(heap_for("38k", "52k")))
    b.expect("^@boot 2 hard")
    b.expect("^v1 tick 20 late")
    return b


@pytest.mark.slow
@pytest.mark.skipif(not MICROPYTHON, reason=NO_MICROPYTHON)
def test_a_save_reaches_a_board_whose_app_holds_16_kb_of_a_38_kb_heap(tree, promoter, mpy_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ota_promoter")
    b = board_of_38_kb(tree, promoter, mpy_dir, tmp_path, TIMED_APP.replace("%d", "64"))
    v1 = promoter.version
    try:
        save(tree, promoter, "main.py", TIMED_APP.replace("%d", "64") % ("v2", "v2"))
        b.expect("^ota: version [0-9a-f]{7}: stopping the app to install it$")
        b.expect("^KeyboardInterrupt")
        b.expect("|".join((INSTALLED, AT_BOOT)))  # which way it took, on the console
        b.expect("^ota: live mode, version [0-9a-f]{7}$")
        b.expect("^app v2 starts$")
        b.expect("^v2 tick 3 late")
        assert files(b.root, own=False) == promoted(tree)
        assert max(lateness(b, "v1")) <= 50  # ms: the app ran on at its pace until it was stopped
    finally:
        b.stop()
    logged = [r.getMessage() for r in caplog.records]
    # the server saw the app stopped, and then the version that runs after the restart
    said = [m.split(" | ")[-1].replace(">>> ", "") for m in logged if "stopping the app" in m or "live mode," in m]
    assert said == ["ota: live mode, version %s" % v1[:7],
                    "ota: version %s: stopping the app to install it" % promoter.version[:7],
                    "ota: live mode, version %s" % promoter.version[:7]]


# An app that keeps all but 4 KB of the heap for itself: no update fits beside it.
GREEDY_APP = TIMED_APP.replace("hold = [bytearray(256) for _ in range(%d)]", """hold = []
try:
    while True:
        hold.append(bytearray(256))
except MemoryError:
    del hold[-16:]""")


@pytest.mark.slow
@pytest.mark.skipif(not MICROPYTHON, reason=NO_MICROPYTHON)
def test_an_update_that_does_not_fit_beside_the_app_is_installed_at_boot_in_a_fresh_heap(
        tree, promoter, mpy_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ota_promoter")
    b = board_of_38_kb(tree, promoter, mpy_dir, tmp_path, GREEDY_APP)
    try:
        save(tree, promoter, "main.py", GREEDY_APP % ("v2", "v2"))
        b.expect("^ota: version [0-9a-f]{7}: stopping the app to install it$")
        b.expect("^KeyboardInterrupt")
        b.expect(AT_BOOT)
        b.expect("^@boot 3 (soft|hard)")
        b.expect("^ota: version [0-9a-f]{7} installed, 1 change$")  # boot.py's update(), in a fresh heap
        b.expect("^@boot 4 hard")  # which resets after installing
        b.expect("^app v2 starts$")
        b.expect("^v2 tick 3 late")
        assert files(b.root, own=False) == promoted(tree)
        assert max(lateness(b, "v1")) <= 50
    finally:
        b.stop()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["stalls on the manifest", "trickles the file at 2 KB/s"])
def test_the_app_runs_at_its_pace_until_it_is_stopped_whatever_the_server_does(
        tree, promoter, interpreter, tmp_path, fault):
    stalled = []

    def slow(path, response):
        if fault == "stalls on the manifest" and is_manifest(path, response) and not stalled:
            stalled.append(path)
            time.sleep(4)  # longer than the client's 2 s timeout: this update fails
        if fault == "trickles the file at 2 KB/s" and is_download(path, response) and b"v2 tick" in response:
            return Trickle(response)
        return response

    proxy = FaultProxy(promoter.url)
    try:
        save(tree, promoter, "boot.py", FAST_BOOT)
        save(tree, promoter, "main.py", TIMED_APP % ("v1", 4, "v1"))
        b = Board(interpreter[0], interpreter[1], str(tmp_path / "device"), proxy.url, boot=FAST_BOOT)
        try:
            b.expect("^@boot 2 hard")
            b.expect("^v1 tick 10 late")
            proxy.fault = slow
            save(tree, promoter, "main.py", TIMED_APP % ("v2", 4, "v2") + "# " + "x" * 8000 + "\n")
            b.expect("^KeyboardInterrupt")  # stopped before the download, not frozen by it
            b.expect("^app v2 starts$")
            b.expect("^v2 tick 3 late")
            assert files(b.root, own=False) == promoted(tree)
            late = lateness(b, "v1")
            assert len(late) >= 10 and max(late) <= 50, late
        finally:
            b.stop()
    finally:
        proxy.close()
    assert stalled or fault != "stalls on the manifest"


@pytest.mark.slow
def test_a_version_that_cannot_be_installed_is_tried_once_then_waits_for_the_next_save(
        tree, promoter, interpreter, tmp_path):
    def damage(path, response):  # every download of v2's main.py arrives damaged
        if is_download(path, response) and b"v2" in response:
            return response[:-1] + bytes([response[-1] ^ 1])
        return response

    proxy = FaultProxy(promoter.url)
    try:
        save(tree, promoter, "boot.py", FAST_BOOT)
        save(tree, promoter, "main.py", APP % ("v1", "v1"))
        b = Board(interpreter[0], interpreter[1], str(tmp_path / "device"), proxy.url, boot=FAST_BOOT)
        try:
            b.expect("^@boot 2 hard")
            b.expect("^v1 tick 1$")
            proxy.fault = damage
            save(tree, promoter, "main.py", APP % ("v2", "v2"))
            b.expect("checksum mismatch")  # at the prompt, once the app stopped
            b.expect("^@boot 3 soft")
            b.expect("^no update: .*checksum mismatch")  # boot.py's update(), in a fresh heap
            b.expect("^app v1 starts$")  # the board runs the files it has
            b.expect("^v1 tick 200$")  # over 4 s: no more restarts for this version
            assert not [line for line in b.seen if line.startswith("@boot 4")]
            proxy.fault = None
            save(tree, promoter, "main.py", APP % ("v3", "v3"))
            b.expect("^@boot 4 soft")
            b.expect("^v3 tick 1$")
            assert files(b.root, own=False) == promoted(tree)
        finally:
            b.stop()
    finally:
        proxy.close()


@pytest.mark.slow
@needs_console
def test_prints_and_tracebacks_reach_the_server_log(board, tree, promoter, caplog):
    caplog.set_level(logging.INFO, logger="ota_promoter")
    board.expect("^v1 tick 5$")
    # the line posted before the traceback, which alone may fill the console's 512 bytes
    save(tree, promoter, "main.py", "import time\nprint('v2 crashes')\ntime.sleep(0.5)\nundefined_name\n")
    board.expect("NameError")
    want = ["127.0.0.1 [a4cf12f3e9b1] | v1 tick 5", "127.0.0.1 [a4cf12f3e9b1] | v2 crashes"]

    def logged():
        return [r.getMessage() for r in caplog.records]

    until(lambda: all(w in logged() for w in want) and any("[a4cf12f3e9b1] | NameError" in m for m in logged()),
          lambda: "the lines in the server's log, not in: %r" % logged()[-20:])


# -- The console stream and the timer callback, called directly --------------------


def test_a_dead_server_never_blocks_a_print(tmp_path):
    url = "http://127.0.0.1:%d" % free_port()  # nothing listens there
    ota._named = None  # as after boot.py's update()
    live = ota.live(url, root=str(tmp_path), wait=1, timeout=1)
    began = time.monotonic()
    assert live.write(b"x" * 2000) == 2000  # print is told all was written
    for _ in range(20):
        live.tick()
    took = time.monotonic() - began
    assert (live.n, live.dropped) == (512, 1488)
    assert took < 2  # refused connections cost a back-off, not a wait
    live.stop()


def console(size=512):
    """Live mode's console stream alone, as ota_update arms it."""
    stream = ota._Live()
    stream.buf = bytearray(size)
    stream.n = stream.dropped = stream.key = stream.sending = 0
    stream.prompt = False
    return stream


def test_a_full_console_keeps_the_newest_output_and_never_the_bytes_being_sent():
    stream = console()
    stream.write(b"A" * 300)
    stream.sending = 100  # a POST of the first 100 bytes is on its way
    stream.write(b"B" * 250)
    tail = b"Traceback (most recent call last):\nNameError: name 'x' isn't defined\n"
    stream.write(tail)
    kept = bytes(stream.buf[: stream.n])
    assert (stream.n, stream.dropped) == (512, 300 + 250 + len(tail) - 512)
    assert kept[:100] == b"A" * 100  # what is being sent stays as it was
    assert kept.endswith(tail)  # the line that says what went wrong is kept
    assert kept == b"A" * 100 + (b"A" * 200 + b"B" * 250 + tail)[-(512 - 100):]


def test_the_console_never_raises_even_without_memory_and_counts_what_it_lost(monkeypatch):
    class NoMemory(bytearray):
        def __setitem__(self, *_):
            raise MemoryError

    stream = console()
    stream.write(b"kept\n")
    stream.buf = NoMemory(stream.buf)
    assert stream.write(b"lost\n") == 5  # os.dupterm would drop a stream whose write() raised
    assert (bytes(stream.buf[: stream.n]), stream.dropped) == (b"kept\n", 5)


@pytest.mark.slow
@pytest.mark.skipif(not MICROPYTHON, reason=NO_MICROPYTHON)
def test_the_console_never_raises_under_micropython_with_the_heap_full(mpy_dir):
    script = """import sys
sys.path.insert(0, %r)
import ota
stream = ota._Live()
stream.buf = bytearray(512)
stream.n = stream.dropped = stream.key = stream.sending = 0
stream.prompt = False
stream.write(b"x" * 500)
line = b"y" * 100
a = b = c = 0  # the script's own names, made before the heap is full
ballast = []
try:
    while True:
        ballast.append(bytearray(16))
except MemoryError:
    pass
a = stream.write(line)  # each must drop the oldest: a copy, with no memory for it
b = stream.write(line)
c = stream.write(line)
ballast = None
print("wrote", [a, b, c], stream.n, stream.dropped)
""" % str(mpy_dir)
    out = subprocess.run([MICROPYTHON, "-X", "heapsize=" + heap_for("38k", "52k"), "-c", script],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    wrote, n, dropped = re.search(r"^wrote \[(.*)\] (\d+) (\d+)$", out.stdout, re.M).groups()
    assert wrote == "100, 100, 100"
    assert int(n) + int(dropped) == 800  # every byte kept or counted


@pytest.mark.slow
@needs_console
def test_output_dropped_while_the_server_was_away_is_counted_when_it_is_back(tmp_path, tree, caplog):
    caplog.set_level(logging.INFO, logger="ota_promoter")
    port = free_port()  # the board is given the port before the server starts on it
    write(tree, "main.py", "m")
    promoter = ota_promoter.Promoter(str(tree), interval=3600)
    write(tmp_path, ".ota", promoter.version + "\n")  # the board runs what the server has
    ota._named = None  # as after boot.py's update()
    live = ota.live("http://127.0.0.1:%d" % port, root=str(tmp_path), wait=1, timeout=1)
    live.write(b"y" * 1500 + b"\nhello\n")  # the newest output is kept
    live.tick()  # refused: the post waits 1 s
    server = promoter.serve("127.0.0.1", port).start()  # on the port the board was given
    try:
        def posted():  # once the back-off is over
            if live.n or live.dropped:
                live.tick()
            return not (live.n or live.dropped)

        until(posted, lambda: "the output to be posted: %r" % ((live.n, live.dropped, live.posts, live.checks),))
        logged = [r.getMessage() for r in caplog.records]
        assert "127.0.0.1 [%s] | hello" % ota_http._device()[:12] in logged
        assert any("(%d bytes of output dropped)" % (1507 - 512) in m for m in logged), logged
    finally:
        live.stop()
        server.close()


@pytest.mark.slow
def test_a_half_open_server_is_noticed_within_15_s_of_it_coming_back(tree, promoter, tmp_path, capsys):
    """The long-poll (10 s by default) on a connection the server never answers is given
    up 3 s after its wait; the next one sees the version saved in the meantime."""
    relay = Relay(promoter.url)
    try:
        ota._named = None  # as after boot.py's update()
        write(tmp_path / "device", ".ota", promoter.version + "\n")
        relay.silent = True
        live = ota.live(relay.url, root=str(tmp_path / "device"), console=False)
        for _ in range(5):  # its long-poll is sent, and held
            live.tick()
            time.sleep(0.02)
        relay.silent = False  # the server is back
        back = time.monotonic()
        save(tree, promoter, "main.py", "print('v2')\n")
        while live.checks is not None:  # stopping the app, to install v2
            assert time.monotonic() - back < 20, "live mode did not notice the server was back"
            live.tick()
            time.sleep(0.02)
        took = time.monotonic() - back
    finally:
        relay.close()
    with capsys.disabled():
        print("\n  a half-open long-poll: the new version noticed %.1f s after the server was back" % took)
    assert took < 15


def test_a_console_post_that_fails_for_lack_of_memory_never_holds_the_checks(tree, promoter, tmp_path, monkeypatch):
    ask = ota._Live._ask
    posts = []

    def no_memory_to_post(self, s, line, *args):
        if line.startswith("POST"):
            posts.append(time.monotonic())
            raise MemoryError
        return (yield from ask(self, s, line, *args))

    monkeypatch.setattr(ota._Live, "_ask", no_memory_to_post)
    ota._named = None  # as after boot.py's update()
    write(tmp_path / "device", ".ota", promoter.version + "\n")
    live = ota.live(promoter.url, root=str(tmp_path / "device"), wait=1)
    began = time.monotonic()
    live.write(b"hello\n")
    while not posts:  # the output is sent, and fails, before the new version comes
        assert time.monotonic() - began < TIMEOUT
        live.tick()
        time.sleep(0.02)
    save(tree, promoter, "main.py", "print('v2')\n")
    while live.checks is not None:  # the new version seen, in spite of the console
        assert time.monotonic() - began < TIMEOUT
        live.tick()
        time.sleep(0.02)
    assert live.n == 6 and 1 <= len(posts) <= 3  # the output waits, retried 1, 2, 4 s apart
    assert all(b - a > 0.9 for a, b in zip(posts, posts[1:]))


# -- A check never holds the app, and never hammers the server ---------------------------

VERSION = "5" * 40  # what the board has installed
OLDER = "4" * 40
CHECKS = """import sys, time
sys.path.insert(0, %r)
import ota
ota._named = None  # as after boot.py's update(): live() checks, and installs nothing
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
POLL = "GET /files/version?wait=30&in=64 HTTP/1.0"  # live mode takes input (issue 20): up to 64 bytes
CONFIRM = "GET /files/version HTTP/1.0"  # what update() will read, asked before the app is stopped


def at_once(head, body=b""):
    def answer(s, line, stopped):
        s.sendall(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return answer


OWN_VERSION = at_once(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n", b'{"version":"%s"}' % VERSION.encode())
ANSWERS = {
    # like the original Go server, which ignores ?wait and If-None-Match
    "a 200 naming the board's own version": ({POLL: OWN_VERSION}, [POLL]),
    "a 304 at once": ({POLL: at_once(b'HTTP/1.1 304 Not Modified\r\nETag: "%s"\r\n' % VERSION.encode())}, [POLL]),
    # a cache, or a second server behind the address, keeps naming another version
    # at the long-poll than /files/version, which names the board's: asked once
    "a long-poll naming another version than /files/version": ({
        POLL: at_once(b"HTTP/1.1 200 OK\r\n", b'{"version": "%s"}\n' % OLDER.encode()),
        CONFIRM: at_once(b"HTTP/1.1 200 OK\r\n", b'{"version": "%s"}\n' % VERSION.encode()),
    }, [POLL, CONFIRM]),
}


@pytest.mark.slow
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


def deep(n):
    return deep(n - 1) if n else gc.collect()


def free():
    # Collected from deep in the stack first: the GC scans the C stack conservatively,
    # and stale words there would keep garbage alive, by chance.
    deep(40)
    gc.collect()
    return gc.mem_free()


a = free()
import ota
b = free()
ota.update(%r, root=%r, reset=False)
c = free()
live = ota.live(%r, root=%r, wait=5)
d = free()
print("heap", a - b, b - c, c - d)
"""


@pytest.mark.skipif(not MICROPYTHON, reason=NO_MICROPYTHON)
def test_importing_ota_and_arming_live_mode_take_at_most_7_kb(tree, promoter, mpy_dir, tmp_path, capsys):
    """As README's boot.py does it: import ota, update(), live(). The 7 KB are a 32-bit
    board's (a 64-bit build needs more for the same objects): the 6 KB live mode took
    before issue 20, and the 1 KB that issue gives input and discovery. OTA_HEAP
    measures at another heap size."""
    device = tmp_path / "device"
    device.mkdir()
    save(tree, promoter, "main.py", APP % ("v1", "v1"))
    script = MEASURE % (str(mpy_dir), promoter.url, str(device), promoter.url, str(device))
    out = subprocess.run([MICROPYTHON, "-X", "heapsize=" + os.environ.get("OTA_HEAP", heap_for("38k", "52k")),
                          "-c", script], capture_output=True, text=True, timeout=TIMEOUT * 3)
    assert out.returncode == 0, out.stdout + out.stderr
    imported, interned, armed = map(int, re.search(r"^heap (\d+) (\d+) (\d+)$", out.stdout, re.M).groups())
    with capsys.disabled():
        print("\n  %d-bit: import ota %d B, names the update leaves %d B, live mode armed %d B" % (
            MICROPYTHON_BITS, imported, interned, armed))
    assert files(device, own=False) == promoted(tree)
    assert imported + armed <= heap_for(7 * 1024, 10035)  # 64-bit: 1.4 times, as measured


# -- The example app ---------------------------------------------------------------------


def test_the_example_app_is_published_without_the_secrets(tmp_path):
    import shutil

    example = tmp_path / "example"
    shutil.copytree(os.path.join(ROOT, "micropython", "example"), str(example))
    write(example, "secrets.py", "WIFI_PASSWORD = 'hunter2'\n")  # the user's, next to the example
    p = ota_promoter.Promoter(str(example), interval=3600)
    settle(p)
    assert sorted(f["path"] for f in p.manifest()) == ["boot.py", "main.py"]
