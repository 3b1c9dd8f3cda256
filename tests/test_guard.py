"""The boot guard (update(guard=..., resets=...)): a version on trial is kept once
confirmed, or rolled back to the files it replaced when main.py raises, the board
hangs (a watchdog) or resets in a loop; the restore survives a power cut at every
file-system operation; a refused version is not installed again. In this process
under CPython, and on the simulated board (tests/live_board.py --flash) against a
real server."""

import logging
import os
import re
import shutil
import subprocess
import sys

import pytest

import ota
from helpers import (KEY, MICROPYTHON, MICROPYTHON_BITS, ROOT, TIMEOUT, CPythonBoard, Flash, PowerCut, SimulatedBoard,
                     files, give_key, heap_for, needs_micropython, publish, request, slow_except, through, write)
from ota_promoter import Promoter, export

DEVICE = "a4cf12f3e9b1"  # the simulated board's machine.unique_id(), in hex


def own(folder):
    """Every file of a board but the boot guard's own (.ota-new/, .ota-refused): .ota included."""
    return {path: data for path, data in files(folder).items()
            if not path.startswith(".ota-new/") and path != ".ota-refused"}


def refusal(folder):
    with open(os.path.join(str(folder), ".ota-refused")) as f:
        return f.read().splitlines()


def start(board, url, guard=5, **options):
    """The first update() of a boot: a start of the version on trial is counted."""
    ota._named = False
    options.setdefault("reset", False)
    return ota.update(url, root=str(board), guard=guard, **options)


# -- In this process: the guard's steps, called as boot.py calls them ---------------------

Y = {"main.py": "print('Y runs')\n", "lib/old.py": "OLD = 1\n", "lib/kept.py": "K = 1\n", "data.bin": b"y" * 300}
X = {"main.py": "1 / 0\n", "lib/old.py": None, "lib/new/deep.py": "NEW = 1\n", "data.bin": b"x" * 200}


@pytest.fixture
def on_trial(tree, promoter, tmp_path):
    """(board, y, x, its files on Y): a board that ran Y, then installed X with a guard: X is on trial."""
    board = tmp_path / "board"
    board.mkdir()
    write_secret = os.path.join(str(board), "secrets.py")
    with open(write_secret, "w") as f:
        f.write("mine")  # not the client's: never touched
    publish(promoter, tree, Y)
    assert CPythonBoard(board).update(promoter.url) is True
    y, on_y = promoter.version, own(board)
    publish(promoter, tree, X)
    assert start(board, promoter.url) is True  # installed: its first start is the next
    assert os.path.exists(os.path.join(str(board), ".ota-new", "trial"))
    return board, y, promoter.version, on_y


@pytest.mark.slow
def test_a_guarded_switch_keeps_the_old_files_aside_until_the_version_is_confirmed(on_trial, promoter, capsys):
    board, y, x, on_y = on_trial
    stage = sorted(os.listdir(os.path.join(str(board), ".ota-new")))
    assert stage == ["d0", "g0", "g2", "old", "trial"]  # lib/old.py; data.bin and main.py; .ota
    ota.recover(str(board))  # a trial's files are not an update's leftovers
    assert sorted(os.listdir(os.path.join(str(board), ".ota-new"))) == stage
    assert start(board, promoter.url) is False  # the start is counted, and the watcher armed
    watcher = ota._trial
    assert watcher is not None and "ota_trial" in sys.modules
    ota.confirm()
    assert ota._trial is None and "ota_trial" not in sys.modules  # nothing left resident
    assert capsys.readouterr().out.splitlines()[-1] == "ota: version %s confirmed" % x[:7]
    assert sorted(os.listdir(os.path.join(str(board), ".ota-new"))) == ["d0", "done", "g0", "g2", "old", "starts"]
    ota.recover(str(board))
    assert not os.path.exists(os.path.join(str(board), ".ota-new"))  # the old files are gone
    assert files(board)[".ota"].decode().startswith(x)


def test_main_py_ending_in_an_exception_rolls_back_at_the_next_start(on_trial, promoter, capsys):
    board, y, x, on_y = on_trial
    start(board, promoter.url)
    watcher = ota._trial
    # What a port prints when main.py raises, in the pieces it prints it in, then the REPL
    for piece in (b"Traceback (most recent call last):\r\n", b'  File "main.py", line 1, in <module>\r\n',
                  b"ZeroDivisionError", b": ", b"divide by zero", b"\r\n",
                  b"MicroPython v1.20.0 on 2023-04-26; ESP module with ESP8266\r\n",
                  b'Type "help()" for more information.\r\n'):
        assert watcher.write(bytearray(piece)) == len(piece)
    watcher.tick()
    assert ota._trial is watcher  # no prompt yet: main.py may still run
    watcher.write(bytearray(b">>> "))  # CPython: the tick scheduled runs at once
    assert ota._trial is None
    with open(os.path.join(str(board), ".ota-new", "crash"), "rb") as f:
        assert f.read() == b"ZeroDivisionError: divide by zero"
    capsys.readouterr()
    assert start(board, promoter.url) is True  # the next start: back on Y, before any request
    report = "rolled back from %s to %s: ZeroDivisionError: divide by zero" % (x[:7], y[:7])
    assert capsys.readouterr().out.splitlines() == ["ota: " + report]
    assert own(board) == on_y
    assert refusal(board) == [x, report]
    assert not os.path.exists(os.path.join(str(board), ".ota-new"))
    assert start(board, promoter.url) is False  # not installed again while the server names it
    assert capsys.readouterr().out.splitlines() == [
        "ota: %s was rolled back on this board: waiting for a newer version" % x[:7]]
    assert own(board) == on_y


@pytest.mark.slow
def test_a_stopped_app_leaves_the_trial_pending_and_a_returned_one_confirms_it(on_trial, promoter, capsys):
    board, y, x, on_y = on_trial
    start(board, promoter.url)
    ota._trial.write(b"Traceback (most recent call last):\n  File \"main.py\", line 9\nKeyboardInterrupt: \n")
    ota._trial.write(b">>> ")
    assert ota._trial is None and os.path.exists(os.path.join(str(board), ".ota-new", "trial"))
    start(board, promoter.url)
    ota._trial.write(b"done\n")
    ota._trial.write(b">>> ")  # main.py returned
    assert ota._trial is None and os.path.exists(os.path.join(str(board), ".ota-new", "done"))
    assert "ota: version %s confirmed" % x[:7] in capsys.readouterr().out


@pytest.mark.slow
def test_a_version_reset_before_it_is_confirmed_is_rolled_back_at_the_start_after_the_last_reset(
        on_trial, promoter, capsys):
    board, y, x, on_y = on_trial
    for n in range(3):  # resets=3: three starts that ended in a reset (power, watchdog, machine.reset)
        start(board, promoter.url, resets=3)
        assert ota._trial is not None, n
        ota._trial.stop()  # the reset
        assert own(board) != on_y
    start(board, promoter.url, resets=3)
    assert own(board) == on_y
    report = "rolled back from %s to %s: reset 3 times before it was confirmed" % (x[:7], y[:7])
    assert refusal(board) == [x, report]
    assert "ota: " + report in capsys.readouterr().out.splitlines()


@pytest.mark.slow
def test_a_version_running_guard_seconds_is_confirmed(on_trial, promoter, monkeypatch, capsys):
    board, y, x, on_y = on_trial
    start(board, promoter.url, guard=30)
    watcher = ota._trial
    watcher.tick()
    assert ota._trial is watcher
    watcher.began -= 30 * 1000  # as if 30 s had passed
    watcher.tick()
    assert ota._trial is None
    assert capsys.readouterr().out.splitlines()[-1] == "ota: version %s confirmed" % x[:7]
    ota.update(promoter.url, root=str(board), reset=False)
    assert not os.path.exists(os.path.join(str(board), ".ota-new"))


@pytest.mark.slow
def test_update_without_a_guard_confirms_a_pending_trial(on_trial, promoter, capsys):
    board, y, x, on_y = on_trial
    assert ota.update(promoter.url, root=str(board), reset=False) is False
    assert capsys.readouterr().out.splitlines() == ["ota: version %s confirmed" % x[:7]]
    assert not os.path.exists(os.path.join(str(board), ".ota-new"))
    assert files(board)[".ota"].decode().startswith(x)


@pytest.mark.slow
def test_another_version_during_a_trial_is_installed_on_the_known_good_files(on_trial, tree, promoter, capsys):
    board, y, x, on_y = on_trial
    publish(promoter, tree, {"main.py": "print('Z runs')\n"})
    z = promoter.version
    capsys.readouterr()
    assert start(board, promoter.url) is True
    said = capsys.readouterr().out.splitlines()
    assert [said[0], said[-1]] == [
        "ota: %s was not confirmed: back to %s before installing %s" % (x[:7], y[:7], z[:7]),
        "ota: version %s installed, 4 changes" % z[:7]]  # against Y's files: X's differ by 1
    assert files(board)["main.py"] == b"print('Z runs')\n"
    assert not os.path.exists(os.path.join(str(board), ".ota-refused"))  # quietly
    assert sorted(os.listdir(os.path.join(str(board), ".ota-new"))) == ["d0", "g0", "g2", "old", "trial"]  # Z on trial


@pytest.mark.slow
def test_a_newer_version_is_installed_after_a_refusal_and_the_refusal_goes(on_trial, tree, promoter):
    board, y, x, on_y = on_trial
    with open(os.path.join(str(board), ".ota-new", "crash"), "w") as f:
        f.write("OSError: [Errno 5] EIO")
    start(board, promoter.url)
    assert refusal(board)[0] == x
    publish(promoter, tree, {"main.py": "print('Z runs')\n"})
    assert start(board, promoter.url, guard=None) is True
    assert not os.path.exists(os.path.join(str(board), ".ota-refused"))
    assert files(board)[".ota"].decode().startswith(promoter.version)


@pytest.mark.slow
def test_every_request_carries_the_report_while_the_refusal_stands(on_trial, promoter, caplog):
    caplog.set_level(logging.INFO, logger="ota_promoter")
    board, y, x, on_y = on_trial
    with open(os.path.join(str(board), ".ota-new", "crash"), "wb") as f:
        f.write("ValueError: caf\u00e9 \x1b[31m".encode())  # not ASCII, a control character
    start(board, promoter.url)
    start(board, promoter.url)
    report = "rolled back from %s to %s: ValueError: caf?? ?[31m" % (x[:7], y[:7])
    assert refusal(board)[1] == report
    boards = request(promoter.url, "/boards").json()["boards"]
    assert [b["rolled_back"] for b in boards] == [report]
    logged = [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]
    assert logged == ["[unknown] " + report]  # once, though every request said it


@pytest.mark.slow
def test_a_rollback_restores_the_old_files_though_the_app_deleted_some_of_the_new_ones(on_trial, promoter, capsys):
    # The app runs between the switch and the restore: it may delete a file the version
    # on trial installed (a one-time script, a cache it shipped). The restore still
    # puts back exactly the previous files, and does not fail at every start.
    board, y, x, on_y = on_trial
    os.remove(os.path.join(str(board), "data.bin"))  # changed by X: Y's waits aside
    os.remove(os.path.join(str(board), "lib", "new", "deep.py"))  # new in X
    with open(os.path.join(str(board), ".ota-new", "crash"), "w") as f:
        f.write("ZeroDivisionError: divide by zero")
    assert start(board, promoter.url) is True
    assert own(board) == on_y
    assert refusal(board)[0] == x
    assert not os.path.exists(os.path.join(str(board), ".ota-new"))


@pytest.mark.slow
def test_a_site_that_names_another_version_cannot_bring_back_the_refused_one_through_manifest_txt(
        on_trial, promoter, tmp_path, static_host, capsys):
    # A site without /files/<version> gets the fallback, /files/manifest.txt, whatever
    # version it lists: a hostile one names a version it has no manifest of, and lists
    # the refused one there. Refused all the same; the board's files as they were.
    board, y, x, on_y = on_trial
    with open(os.path.join(str(board), ".ota-new", "crash"), "w") as f:
        f.write("ZeroDivisionError: divide by zero")
    start(board, promoter.url)
    assert refusal(board)[0] == x and own(board) == on_y
    site = tmp_path / "site"
    export(promoter, str(site))  # X, the refused version
    with open(str(site / "files" / "version"), "w") as f:
        f.write('{"version": "%s"}' % ("e" * 40))  # a version the site has no manifest of
    capsys.readouterr()
    with pytest.raises(ota.OTAError, match="^%s was rolled back on this board: waiting for a newer version$" % x[:7]):
        start(board, static_host(site).url)
    assert own(board) == on_y
    assert not os.path.exists(os.path.join(str(board), ".ota-new"))


@pytest.mark.slow
def test_a_trial_is_rolled_back_for_another_version_only_once_its_manifest_checks_out(tree, serve, tmp_path,
                                                                                     static_host):
    # A board with the key runs X on trial. Anyone on the path can name another
    # version: one with no manifest, or Y, the previous release, whose signed manifest
    # they replay. Neither may send the board back to Y's files: X stays, on trial.
    signing = Promoter(str(tree), interval=3600, key=KEY)
    url = serve(signing).url
    board = tmp_path / "board"
    give_key(board)
    publish(signing, tree, Y)
    y, replayed = signing.version, signing.current.files_text
    assert CPythonBoard(board).update(url) is True
    publish(signing, tree, X)
    assert start(board, url) is True
    on_x = own(board)
    site = tmp_path / "site"
    write(site, "files/version", '{"version": "%s"}' % ("e" * 40))
    with pytest.raises(ota.OTAError, match="has no /files/manifest.txt"):
        start(board, static_host(site).url)
    assert own(board) == on_x and os.path.exists(os.path.join(str(board), ".ota-new", "trial"))
    write(site, "files/version", '{"version": "%s"}' % y)
    write(site, "files/" + y, replayed)
    with pytest.raises(ota.OTAError, match="^release [0-9]+ of %s is older than release [0-9]+, which this board "
                                           "runs: no downgrade$" % y[:7]):
        start(board, static_host(site).url)
    assert own(board) == on_x and os.path.exists(os.path.join(str(board), ".ota-new", "trial"))
    assert start(board, url) is False  # the third start of the version on trial, which goes on
    assert ota._trial is not None and own(board) == on_x
    ota._trial.stop()


# -- A power cut at every file-system operation of the restore -------------------------


@pytest.mark.parametrize("why", slow_except(["crash", "resets"], "crash"))
def test_a_power_cut_at_every_step_of_the_restore_ends_on_the_old_files_with_the_refusal(
        on_trial, promoter, tmp_path, monkeypatch, why, capsys):
    board, y, x, on_y = on_trial
    if why == "crash":
        with open(os.path.join(str(board), ".ota-new", "crash"), "w") as f:
            f.write("ZeroDivisionError: divide by zero")
    else:
        for _ in range(3):
            start(board, promoter.url, resets=3)
            ota._trial.stop()
    cut_at = 0
    while True:
        cut_at += 1
        copy = tmp_path / ("cut%d" % cut_at)
        shutil.copytree(str(board), str(copy))
        flash = Flash(cut_at)
        through(flash, monkeypatch)
        try:
            start(copy, promoter.url, resets=3)
            completed = True
        except PowerCut:
            completed = False
        finally:
            monkeypatch.undo()
        if ota._trial:
            ota._trial.stop()
        start(copy, promoter.url, resets=3)  # the next start
        assert own(copy) == on_y, "a power cut at operation %d" % cut_at
        assert refusal(copy)[0] == x, cut_at
        assert refusal(copy)[1].startswith("rolled back from %s to %s: " % (x[:7], y[:7])), cut_at
        assert not os.path.exists(os.path.join(str(copy), ".ota-new")), cut_at
        assert not os.path.exists(os.path.join(str(copy), ".ota-refused-new")), cut_at
        shutil.rmtree(str(copy))
        if completed:
            break
    with capsys.disabled():
        print("\n  %s: a power cut at each of the restore's %d file-system operations" % (why, cut_at - 1))
    assert cut_at > 12


# -- On the simulated board, against a real server ---------------------------------------

BOOT = """import ota
try:
    ota.update(URL, guard=2, resets=3)
except ota.OTAError as e:
    print("no update:", e)
"""
# Each good version runs until the test writes /go on the board's flash, then resets
WAIT_FOR_GO = """import os, time, machine
while True:
    try:
        os.remove("/go")
        break
    except OSError:
        time.sleep(0.02)
machine.reset()
"""
GOOD = {"main.py": "print('Y runs')\n" + WAIT_FOR_GO, "lib/y.py": "Y = 1\n", "data.bin": b"y" * 3000}
BAD = {  # each replaces main.py, deletes lib/y.py, adds lib/x.py, changes data.bin
    "raises": "print('X starts')\n1 / 0\n",
    "hangs": "import machine\nprint('X starts')\nwdt = machine.WDT(timeout=200)\nwhile True:\n    pass\n",
    "resets in a loop": "import machine\nprint('X starts')\nmachine.reset()\n",
}


@pytest.mark.slow
def test_on_the_board_a_release_that_raises_hangs_or_resets_is_rolled_back_and_a_good_one_kept(
        tree, promoter, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ota_promoter")
    flash = tmp_path / "flash"
    publish(promoter, tree, GOOD)
    y = promoter.version
    board = SimulatedBoard([sys.executable, "-u"], os.path.join(ROOT, "micropython"), flash, promoter.url, BOOT,
                           None, seconds=120, flash=True)
    go = os.path.join(str(flash), "go")
    try:
        board.expect("^@boot 2 hard")  # Y installed, on trial
        board.expect("^Y runs$")
        board.expect("^ota: version %s confirmed$" % y[:7])  # it ran 2 s
        on_y = own(flash)
        reports = []
        for how, main in sorted(BAD.items()):
            publish(promoter, tree, dict({"main.py": main, "lib/x.py": "X = 1\n", "data.bin": b"x"},
                                         **{"lib/y.py": None} if (tree / "lib" / "y.py").exists() else {}))
            x = promoter.version
            with open(go, "w"):
                pass
            board.expect("^ota: version %s installed, 4 changes$" % x[:7])
            rolled = board.expect("^ota: (rolled back from %s to %s: .*)$" % (x[:7], y[:7])).group(1)
            board.expect("^ota: %s was rolled back on this board: waiting for a newer version$" % x[:7])
            board.expect("^Y runs$")
            reports.append(rolled)
            started = board.seen[board.seen.index("ota: version %s installed, 4 changes" % x[:7]):]
            if how == "raises":
                assert re.fullmatch(r"rolled back from \w+ to \w+: ZeroDivisionError: division by zero", rolled)
                assert started.count("X starts") == 1
            else:
                assert rolled.endswith(": reset 3 times before it was confirmed")
                assert started.count("X starts") == 3  # resets=3
            if how == "hangs":
                assert started.count("@wdt") == 3
            assert own(flash) == on_y, how  # every file, and .ota
            assert refusal(flash) == [x, rolled]
            boards = request(promoter.url, "/boards").json()["boards"]
            assert [(b["device"], b["rolled_back"]) for b in boards] == [(DEVICE, rolled)]
        # A newer version, whose app confirms it at once: kept, and the refusal gone
        publish(promoter, tree, {"main.py": "import ota\nota.confirm()\nprint('Z runs')\n" + WAIT_FOR_GO})
        z = promoter.version
        with open(go, "w"):
            pass
        board.expect("^ota: version %s installed, 4 changes$" % z[:7])
        board.expect("^ota: version %s confirmed$" % z[:7])
        board.expect("^Z runs$")
        assert not os.path.exists(os.path.join(str(flash), ".ota-refused"))
        with open(go, "w"):
            pass
        board.expect("^@boot")
        board.expect("^Z runs$")  # the next update() deleted the old files
        assert not os.path.exists(os.path.join(str(flash), ".ota-new"))
        assert own(flash) == dict(files(tree), **{"boot.py": BOOT.encode(), ".ota": files(flash)[".ota"]})
        assert files(flash)[".ota"].decode().startswith(z)
        assert request(promoter.url, "/boards").json()["boards"][0]["rolled_back"] is None
    finally:
        board.stop()
    logged = [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]
    assert logged == ["[%s] %s" % (DEVICE, report) for report in reports]  # each once


LIVE_BOOT = BOOT + "ota.live(URL, wait=5, guard=2, resets=3)\n"
LOOP = "import time\nprint('%s runs')\nwhile True:\n    time.sleep(0.05)\n"


@pytest.mark.slow
def test_in_live_mode_a_saved_release_that_raises_is_rolled_back_and_live_mode_waits_for_the_next(
        tree, promoter, tmp_path):
    """Live mode owns the timer and the console: it feeds and ticks the watcher."""
    flash = tmp_path / "flash"
    publish(promoter, tree, {"main.py": LOOP % "Y"})
    y = promoter.version
    board = SimulatedBoard([sys.executable, "-u"], os.path.join(ROOT, "micropython"), flash, promoter.url, LIVE_BOOT,
                           None, seconds=120, flash=True)
    try:
        board.expect("^@boot 2 hard")
        board.expect("^ota: live mode, version %s$" % y[:7])
        board.expect("^ota: version %s confirmed$" % y[:7])
        on_y = own(flash)
        publish(promoter, tree, {"main.py": "print('X starts')\n1 / 0\n"})
        x = promoter.version
        board.expect("^ota: version %s: stopping the app to install it$" % x[:7])
        board.expect("^ota: version %s installed, 1 change$" % x[:7])
        board.expect("^@boot 3 soft")  # no timer left armed (live_board.py fails the test otherwise)
        board.expect("^X starts$")
        board.expect("^@boot 4 hard")  # the watcher, through live mode's tick
        board.expect("^ota: rolled back from %s to %s: ZeroDivisionError: division by zero$" % (x[:7], y[:7]))
        board.expect("^@boot 5 hard")
        board.expect("^ota: %s was rolled back on this board: waiting for a newer version$" % x[:7])
        board.expect("^ota: live mode, version %s$" % y[:7])
        board.expect("^Y runs$")
        assert own(flash) == on_y
        publish(promoter, tree, {"main.py": LOOP % "Z"})  # the next save: installed, on trial, confirmed
        z = promoter.version
        board.expect("^ota: version %s installed, 1 change$" % z[:7])
        board.expect("^Z runs$")
        board.expect("^ota: version %s confirmed$" % z[:7])
        assert not os.path.exists(os.path.join(str(flash), ".ota-refused"))
    finally:
        board.stop()


# -- The watcher under MicroPython: what it notes, and what it holds --------------------

WATCHER = """import sys, gc
sys.path.insert(0, %r)


def deep(n):
    return deep(n - 1) if n else gc.collect()


def free():
    deep(40)
    gc.collect()
    return gc.mem_free()


a = b = c = n = w = _ = None  # the script's own names, made before it measures
import ota
# As at the end of an update, which arms the watcher: the names of ota_update and of a
# part interned (else which table of names the measure allocates depends on where the
# count stands), the modules dropped (recover() of a folder with nothing to recover).
ota.recover(%r + "/elsewhere")
a = free()
w = __import__("ota_trial").arm(%r, "abcdef1", 5)  # as ota_guard arms it: no name left holding the module
b = free()
%s
print("noted", w.error, w.prompt, n)
w.write(bytearray(b">>> "))  # the tick is scheduled: it runs at a backward jump
for _ in range(3):
    pass
print("armed", ota._trial is not None, "ota_trial" in sys.modules)
w = None
c = free()
print("heap", a - b, a - c)
"""


# What a port prints when main.py raises, in the pieces it prints it in: os.dupterm hands
# write() a bytearray. One line each: a loop would leave a stale reference to the watcher
# on the script's stack, which the measure would count.
PRINTED = "".join("n = w.write(bytearray(%r))\n" % piece for piece in (
    b"Traceback (most recent call last):\r\n", b'  File "main.py", line 1, in <module>\r\n', b"ZeroDivisionError",
    b": ", b"divide by zero", b"\r\n", b"MicroPython v1.20.0\r\n"))


@pytest.mark.slow
@needs_micropython
def test_under_micropython_the_watcher_notes_a_crash_and_leaves_nothing_resident(mpy_dir, tmp_path, capsys):
    os.makedirs(str(tmp_path / ".ota-new"))
    out = subprocess.run([MICROPYTHON, "-X", "heapsize=" + heap_for("38k", "52k"), "-c",
                          WATCHER % (str(mpy_dir), str(tmp_path), str(tmp_path), PRINTED)], capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["noted b'ZeroDivisionError: divide by zero' False 21", "armed False False"], out.stdout
    with open(str(tmp_path / ".ota-new" / "crash"), "rb") as f:
        assert f.read() == b"ZeroDivisionError: divide by zero"
    armed, after = map(int, re.search(r"^heap (-?\d+) (-?\d+)$", out.stdout, re.M).groups())
    with capsys.disabled():
        print("\n  %d-bit: the watcher armed holds %d B; once it ends, %d B stay (interned names)" % (
            MICROPYTHON_BITS, armed, after))
    assert after < armed / 4  # the module dropped: only the names it interned stay


HUNDRED = {"pkg%d/module_%03d.py" % (i % 7, i): "N = %d\n" % i for i in range(100)}


@pytest.mark.slow
@needs_micropython
def test_a_guarded_update_of_100_files_and_a_1_mb_file_and_its_rollback_run_in_a_20_kb_heap(
        tree, promoter, tmp_path, mpy_dir):
    board = tmp_path / "device"  # empty, as in test_client_memory.py: a longer path needs more heap
    board.mkdir()
    publish(promoter, tree, dict(HUNDRED, **{"assets/big.bin": os.urandom(1024 * 1024)}))

    def fresh(script, heap=heap_for("20k", "30k")):  # a fresh interpreter, from the folder of the .mpy files
        out = subprocess.run([MICROPYTHON, "-X", "heapsize=" + heap, "-c", "import ota\n" + script],
                             cwd=str(mpy_dir), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.splitlines()

    said = fresh("print(ota.update(%r, root=%r, reset=False, guard=5))" % (promoter.url, str(board)))
    assert said[-2:] == ["ota: version %s installed, 101 changes" % promoter.version[:7], "True"], said
    assert os.path.exists(os.path.join(str(board), ".ota-new", "trial"))
    # The next start's update(): the guard counts the start, then arms the watcher at its end.
    said = fresh("print(ota.update(%r, root=%r, reset=False, guard=5))" % (promoter.url, str(board)))
    assert said == ["False"], said
    assert os.path.getsize(os.path.join(str(board), ".ota-new", "starts")) == 1
    with open(os.path.join(str(board), ".ota-new", "crash"), "w") as f:
        f.write("MemoryError: memory allocation failed")
    said = fresh("print(ota.update(%r, root=%r, reset=False, guard=5))" % (promoter.url, str(board)))
    assert said[0] == "ota: rolled back from %s to none: MemoryError: memory allocation failed" % (
        promoter.version[:7]), said
    assert said[-1] == "True"
    assert os.listdir(str(board)) == [".ota-refused"]  # as it was: nothing installed
    # With a refusal on the board, its report goes with every request.
    said = fresh("print(ota.update(%r, root=%r, reset=False, guard=5))" % (promoter.url, str(board)))
    assert said == ["ota: %s was rolled back on this board: waiting for a newer version" % promoter.version[:7],
                    "False"]
