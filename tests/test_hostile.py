"""The server against a hostile folder and hostile clients: swaps racing the
scan, special files, odd names, deep and branching trees, bodies, floods."""

import hashlib
import http.client
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import ota_promoter
from ota_promoter import Promoter
from helpers import (
    ROOT, TIMEOUT, checksum, free_port, needs_any_name, needs_case_sensitive_fs, needs_posix, needs_symlinks,
    raw_request, request, settle, until, wait_for_server, write,
)

INSIDE = b"INSIDE = \"fine to publish\"\n"
OUTSIDE = b"OUTSIDE-SECRET, never to be published\n"
LONG_AGO = (1_000_000_000, 1_000_000_000)
RACE_SECONDS = 1.5  # each race runs this long, many polls


def poll_within(promoter, timeout=TIMEOUT):
    """poll_once() in a thread; fails the test if it does not return in time."""
    done = []
    t = threading.Thread(target=lambda: done.append(promoter.poll_once()), daemon=True)
    t.start()
    t.join(timeout)
    assert done, "poll_once() did not return within %s s" % timeout
    return done[0]


class Flipper:
    """Swaps a path between states in a thread, as fast as it can, until stopped."""

    def __init__(self, states, pause=0.0):
        self.states = states
        self.pause = pause
        self.flips = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for state in self.states:
                state()
                self.flips += 1
                if self.pause:
                    time.sleep(self.pause * (self.flips % 3))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(TIMEOUT)


def swap_in(tree, path, make):
    """Replace tree/path at once by what make(temporary path) creates."""
    tmp = os.path.join(str(tree), ".swap")
    if os.path.lexists(tmp):
        os.remove(tmp)
    make(tmp)
    os.replace(tmp, os.path.join(str(tree), path))


def published_bytes(promoter):
    """(checksum, bytes) of every file the published versions would serve."""
    found = []
    for version in (promoter.current, promoter.previous):
        for blob in version.blobs if version is not None else ():
            found.append((blob.checksum, promoter.read(blob)))
    return found


# -- 1. Nothing outside DIR is ever published or served ---------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("store_limit", [ota_promoter.ContentStore.limit, 0])
@needs_symlinks
def test_a_file_swapped_for_a_symlink_to_outside_is_never_published(tree, tmp_path, serve, store_limit):
    outside = write(tmp_path, "outside.txt", OUTSIDE)
    keep = write(tree, ".keep/x.py", INSIDE)  # the same inode, linked in and out
    os.utime(keep, LONG_AGO)
    os.link(keep, os.path.join(str(tree), "x.py"))
    p = Promoter(str(tree), interval=3600, store_limit=store_limit)
    server = serve(p)
    leaked = checksum(OUTSIDE, "x.py")
    states = [lambda: swap_in(tree, "x.py", lambda t: os.symlink(outside, t)),
              lambda: swap_in(tree, "x.py", lambda t: os.link(keep, t))]
    polls = 0
    with Flipper(states) as flipper:
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            poll_within(p)
            polls += 1
            for c, data in published_bytes(p):
                assert c != leaked and OUTSIDE not in (data or b"")
            for f in p.manifest():
                r = request(server.url, "/files/" + f["checksum"])
                assert OUTSIDE not in r.body
    assert polls > 50 and flipper.flips > 50
    assert leaked not in [f["checksum"] for f in p.manifest()]


@needs_symlinks
def test_a_folder_swapped_for_a_symlink_is_not_entered_even_with_its_parents_mtime_set_back(tree, tmp_path, serve, caplog):
    write(tmp_path, "outdir/id_rsa", OUTSIDE)
    os.utime(write(tree, "sub/id_rsa", INSIDE), LONG_AGO)
    os.utime(os.path.join(str(tree), "sub"), LONG_AGO)
    os.utime(str(tree), LONG_AGO)
    p = Promoter(str(tree), interval=3600)
    server = serve(p)
    assert p.manifest() == [{"path": "sub/id_rsa", "checksum": checksum(INSIDE, "sub/id_rsa")}]
    os.rename(os.path.join(str(tree), "sub"), os.path.join(str(tree), ".old-sub"))
    os.symlink(str(tmp_path / "outdir"), os.path.join(str(tree), "sub"))
    os.utime(str(tree), LONG_AGO)  # the cached listing of DIR still says: sub is a folder
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        for _ in range(3):
            p.poll_once()
    assert p.manifest() == []
    r = request(server.url, "/files/" + checksum(OUTSIDE, "sub/id_rsa"))
    assert r.status == 404
    assert [m.getMessage() for m in caplog.records] == [
        "skipping sub: symlink points outside the folder, to %r" % str(tmp_path / "outdir")]


@pytest.mark.slow
@needs_symlinks
def test_a_folder_swapped_for_a_symlink_to_outside_is_never_published(tree, tmp_path):
    outdir = str(tmp_path / "outdir")
    os.utime(write(outdir, "id_rsa", OUTSIDE), LONG_AGO)
    os.utime(write(tree, "sub/id_rsa", INSIDE), LONG_AGO)
    sub, away = os.path.join(str(tree), "sub"), os.path.join(str(tree), ".away")
    p = Promoter(str(tree), interval=3600)
    leaked = checksum(OUTSIDE, "sub/id_rsa")

    def to_symlink():
        os.rename(sub, away)
        os.symlink(outdir, sub)
        os.utime(str(tree), LONG_AGO)

    def to_folder():
        os.remove(sub)
        os.rename(away, sub)
        os.utime(str(tree), LONG_AGO)

    polls = 0
    with Flipper([to_symlink, to_folder], pause=0.005) as flipper:
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            poll_within(p)
            polls += 1
            for c, data in published_bytes(p):
                assert c != leaked and OUTSIDE not in (data or b"")
    assert polls > 50 and flipper.flips > 50


# -- 2. Special files never block or exhaust the server ---------------------------------


@pytest.mark.slow
@needs_posix
def test_a_fifo_swapped_in_never_blocks_the_watcher_and_sigterm_still_stops(tree, running):
    keep = write(tree, ".keep/x.py", INSIDE)
    os.utime(keep, LONG_AGO)
    os.link(keep, os.path.join(str(tree), "x.py"))
    port = free_port()  # -q hides the banner that would name a port the server chose
    app = running(str(tree), "--host", "127.0.0.1", "--port", str(port), "--interval", "0.001", "-q")
    url = "http://127.0.0.1:%d" % port
    states = [lambda: swap_in(tree, "x.py", os.mkfifo), lambda: swap_in(tree, "x.py", lambda t: os.link(keep, t))]
    with Flipper(states) as flipper:
        time.sleep(RACE_SECONDS)
    swap_in(tree, "x.py", lambda t: os.link(keep, t))
    assert flipper.flips > 50
    os.utime(write(tree, "after.py", "SAVED = \"after the swaps\"\n"), LONG_AGO)
    until(lambda: [f["path"] for f in request(url, "/files", timeout=1).json()["files"]] == ["after.py", "x.py"],
          "the save after the swaps to be published", ignore=OSError)
    assert app.stop(signal.SIGTERM) == (0, ["warning: 127.0.0.1 is this machine's own address: no board can reach "
                                           "it (--host 0.0.0.0, the default, lets boards on the LAN in)"])


@pytest.mark.slow
@needs_posix
def test_a_file_swapped_for_a_symlink_to_dev_zero_is_not_read(tree):
    keep = write(tree, ".keep/x.py", INSIDE)
    os.utime(keep, LONG_AGO)
    os.link(keep, os.path.join(str(tree), "x.py"))
    p = Promoter(str(tree), interval=3600)
    states = [lambda: swap_in(tree, "x.py", lambda t: os.symlink("/dev/zero", t)),
              lambda: swap_in(tree, "x.py", lambda t: os.link(keep, t))]
    polls = 0
    with Flipper(states):
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            poll_within(p)  # a read of /dev/zero would end in MemoryError
            polls += 1
            for c, data in published_bytes(p):
                assert data == INSIDE
    assert polls > 50


@needs_posix
def test_a_fifo_or_device_as_promoterignore_is_not_read(tree):
    write(tree, "main.py", "m")
    os.mkfifo(os.path.join(str(tree), ota_promoter.IGNORE_FILE))
    made = []
    t = threading.Thread(target=lambda: made.append(Promoter(str(tree))), daemon=True)
    t.start()
    t.join(TIMEOUT)
    assert made, "the scan blocked on the fifo"
    os.remove(os.path.join(str(tree), ota_promoter.IGNORE_FILE))
    os.symlink("/dev/zero", os.path.join(str(tree), ota_promoter.IGNORE_FILE))
    poll_within(made[0])
    assert [f["path"] for f in made[0].manifest()] == ["main.py"]


# -- 3. Downloads of big files use bounded memory ------------------------------------------

SERVER = """
import sys
sys.path.insert(0, %r)
import ota_promoter
server = ota_promoter.Promoter(sys.argv[1], store_limit=1024 * 1024).serve("127.0.0.1", 0)
print(server.server_address[1], flush=True)
server.serve_forever()
""" % ROOT


def vm(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from /proc")
def test_concurrent_downloads_of_a_big_file_use_bounded_memory(tree, capsys):
    size = 64 * 1024 * 1024
    big = os.urandom(size)
    write(tree, "big.bin", big)
    expected = checksum(big, "big.bin")
    del big
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tree)], stdout=subprocess.PIPE, text=True)
    try:
        ready = select.select([server.stdout], [], [], TIMEOUT)[0]
        assert ready, "the server did not start"
        port = int(server.stdout.readline())
        results = []

        def download():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            try:
                conn.request("GET", "/files/" + expected)
                r = conn.getresponse()
                h = hashlib.sha1()
                time.sleep(0.2)  # all four under way at once
                for chunk in iter(lambda: r.read(65536), b""):
                    h.update(chunk)
                h.update(b"big.bin")
                results.append((r.status, h.hexdigest()))
            finally:
                conn.close()

        threads = [threading.Thread(target=download) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 3)
        assert results == [(200, expected)] * 4
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("HEAD", "/files/" + expected)
        r = conn.getresponse()
        assert (r.status, r.headers["Content-Length"], r.read()) == (200, str(size), b"")
        conn.request("GET", "/files/" + expected, headers={"If-None-Match": '"%s"' % expected})
        r = conn.getresponse()
        assert (r.status, r.read()) == (304, b"")
        conn.close()
        peak = vm(server.pid, "VmHWM")
        with capsys.disabled():
            print("\n  4 concurrent downloads of a 64 MiB file: server peak RSS %.1f MiB" % (peak / 2**20))
        # The old server read the whole file for each download: 64 MiB and more.
        assert peak < 40 * 2**20
    finally:
        server.kill()
        server.wait(TIMEOUT)
        server.stdout.close()


def test_head_and_304_read_nothing_and_get_serves_the_hashed_bytes(tree, serve):
    write(tree, "big.bin", b"A" * 5000)
    p = Promoter(str(tree), interval=3600, store_limit=0)
    server = serve(p)
    c = checksum(b"A" * 5000, "big.bin")
    write(tree, "big.bin", b"B" * 5000)  # changed on disk, not yet published
    assert request(server.url, "/files/" + c).body == b"A" * 5000
    for name in os.listdir(p.store._folder):  # nothing left to read
        os.remove(os.path.join(p.store._folder, name))
    head = request(server.url, "/files/" + c, method="HEAD")
    assert (head.status, head.headers["Content-Length"], head.body) == (200, "5000", b"")
    r = request(server.url, "/files/" + c, headers={"If-None-Match": '"%s"' % c})
    assert (r.status, r.body) == (304, b"")
    assert request(server.url, "/files/" + c).status == 404


# -- 4. Idle connections past the open-file limit ------------------------------------------

LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
sys.path.insert(0, %r)
import ota_promoter
sys.exit(ota_promoter.main(sys.argv[3:]))
""" % ROOT


def start_limited(tree, soft, hard):
    port = free_port()  # -q hides the banner that would name a port the server chose
    server = subprocess.Popen(
        [sys.executable, "-c", LIMITED, str(soft), str(hard), str(tree), "--host", "127.0.0.1",
         "--port", str(port), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d" % port
    assert wait_for_server(url).status == 200
    return server, port


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads CPU time from /proc")
def test_1100_idle_connections_do_not_lock_out_a_normal_request(tree, capsys):
    write(tree, "README.txt", "hello\n")
    server, port = start_limited(tree, 256, 256)
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        time.sleep(0.5)
        before = cpu_seconds(server.pid)
        r = request("http://127.0.0.1:%d" % port, "/files/version", timeout=5)
        assert r.status == 200
        time.sleep(1)
        busy = cpu_seconds(server.pid) - before
        with capsys.disabled():
            print("\n  1,100 idle connections, 256 descriptors: answered; %.2f s of CPU in 1 s" % busy)
        assert busy < 0.5  # the old accept loop spun at 76-100%
        # Room was made by closing the oldest idle connections; the newest stay.
        idle[0].settimeout(TIMEOUT)
        assert idle[0].recv(1) == b""
        idle[-1].settimeout(0.2)
        with pytest.raises(socket.timeout):
            idle[-1].recv(1)
    finally:
        for s in idle:
            s.close()
        server.kill()
        server.wait(TIMEOUT)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resource.prlimit reads another process's limits on Linux")
def test_the_open_file_soft_limit_is_raised_to_the_hard_one(tree):
    import resource

    server, _ = start_limited(tree, 200, 400)
    try:
        assert resource.prlimit(server.pid, resource.RLIMIT_NOFILE) == (400, 400)
    finally:
        server.kill()
        server.wait(TIMEOUT)


# -- 5, 6. Deep and branching trees ---------------------------------------------------------


def remove_deep(folder):
    """Remove folder and all in it without recursion (shutil.rmtree and, before
    Python 3.12, os.walk recurse too deep for the 1,000-deep folder)."""
    stack = [folder]
    while stack:
        entries = list(os.scandir(stack[-1]))
        inner = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        if inner:
            stack += inner
            continue
        for e in entries:
            os.remove(e.path)
        os.rmdir(stack.pop())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="makes paths of 2,000 characters, past macOS's and Windows's limits")
def test_a_folder_1000_deep_is_skipped_with_one_warning_and_the_rest_published(tree, caplog):
    write(tree, "main.py", "x")
    deep = str(tree)
    for _ in range(1000):  # os.makedirs would recurse too deep
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    write(deep, "bottom.py", "b")
    try:
        with caplog.at_level(logging.WARNING, "ota_promoter"):
            p = Promoter(str(tree))
            write(tree, "new.py", "n")
            settle(p)
    finally:
        remove_deep(os.path.join(str(tree), "d"))
    depth = ota_promoter.MAX_DEPTH
    assert [f["path"] for f in p.manifest()] == ["main.py", "new.py"]
    assert [r.getMessage() for r in caplog.records] == [
        "skipping %s: folder nested deeper than %d levels" % ("/".join(["d"] * depth), depth)]


@needs_symlinks
def test_symlinks_branching_to_the_same_folders_enter_each_once(tree, caplog):
    levels = 12
    for i in range(levels + 1):
        write(tree, "l%02d/x.py" % i, "level %d" % i)
    for i in range(levels):
        for link in ("a", "b"):
            os.symlink("../l%02d" % (i + 1), os.path.join(str(tree), "l%02d" % i, link))
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
        p.poll_once()
    assert [f["path"] for f in p.manifest()] == ["l%02d/x.py" % i for i in range(levels + 1)]
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        "skipping l%02d/%s: symlink to a folder promoted already, as l%02d" % (i, link, i + 1)
        for i in range(levels) for link in ("a", "b"))


@needs_symlinks
def test_a_symlink_to_a_hidden_folder_is_promoted_once(tree, caplog):
    write(tree, ".shared/util.py", "u")
    os.symlink(".shared", os.path.join(str(tree), "lib"))
    os.symlink(".shared", os.path.join(str(tree), "more"))
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
    assert p.manifest() == [{"path": "lib/util.py", "checksum": checksum("u", "lib/util.py")}]
    assert [r.getMessage() for r in caplog.records] == [
        "skipping more: symlink to a folder promoted already, as lib"]


# -- 7, 12. Names a board cannot take ---------------------------------------------------------


@needs_any_name
def test_names_with_a_leading_or_trailing_space_are_skipped_with_one_warning(tree, caplog):
    for path in ["main.py", " lead.py", "trail.py ", " lib/x.py", "ok dir/in side.py"]:
        write(tree, path, "x")
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
        p.poll_once()
    assert [f["path"] for f in p.manifest()] == ["main.py", "ok dir/in side.py"]
    assert sorted(r.getMessage() for r in caplog.records) == [
        "skipping  lead.py: name starts or ends with a space",
        "skipping  lib: name starts or ends with a space",
        "skipping trail.py : name starts or ends with a space",
    ]


@needs_case_sensitive_fs
def test_paths_equal_but_for_case_are_warned_of_once(tree, caplog):
    write(tree, "Config.py", "A")
    write(tree, "config.py", "a")
    write(tree, "main.py", "m")
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
        write(tree, "main.py", "mm")
        settle(p)
    assert [f["path"] for f in p.manifest()] == ["Config.py", "config.py", "main.py"]
    assert [r.getMessage() for r in caplog.records] == [
        "Config.py and config.py clash on a board's FAT file system (which ignores case and a name's "
        "last dots): boards refuse the update until one is renamed"]


@needs_any_name
def test_names_equal_on_fat_but_for_their_last_dots_are_warned_of_once(tree, caplog):
    write(tree, "notes", "a")
    write(tree, "notes.", "b")
    write(tree, "lib./x.py", "c")
    write(tree, "lib/y.py", "d")
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
        write(tree, "notes", "aa")
        settle(p)
    # lib. and lib are one folder on FAT, holding x.py and y.py: no clash.
    assert [f["path"] for f in p.manifest()] == ["lib/y.py", "lib./x.py", "notes", "notes."]
    assert [r.getMessage() for r in caplog.records] == [
        "notes and notes. clash on a board's FAT file system (which ignores case and a name's last "
        "dots): boards refuse the update until one is renamed"]


@needs_case_sensitive_fs
def test_a_file_that_is_a_folder_of_another_on_fat_is_warned_of_once(tree, caplog):
    for path in ["main.py", "Lib", "lib/x.py", "CFG", "cfg./a.py"]:
        write(tree, path, "x")
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
        write(tree, "main.py", "y")
        settle(p)
    assert len(p.manifest()) == 5
    assert [r.getMessage() for r in caplog.records] == [
        "%s clash on a board's FAT file system (which ignores case and a name's last dots): boards refuse "
        "the update until one is renamed" % pair for pair in ["CFG and cfg./a.py", "Lib and lib/x.py"]]


@needs_any_name
def test_names_fat_cannot_hold_are_skipped_with_one_warning_each(tree, caplog):
    for path in ["main.py", "what?.py", "a:b.py", "star*.txt", "<tag>.html", 'say"hi".py', "pipe|d/x.py"]:
        write(tree, path, "x")
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
        p.poll_once()
    assert [f["path"] for f in p.manifest()] == ["main.py"]
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        "skipping %s: name has a character a board's FAT file system cannot hold (< > : \" | ? *)" % path
        for path in ["what?.py", "a:b.py", "star*.txt", "<tag>.html", 'say"hi".py', "pipe|d"])


def test_a_path_longer_than_a_board_takes_is_skipped_with_one_warning(tree, caplog):
    longest = "lib/" + "\u00e9" * 95 + "x.py"  # 4 + 190 + 4 = 198 bytes
    too_long = "lib/" + "\u6f22" * 66 + ".py"  # 4 + 198 + 3 = 205 bytes: 70 characters
    deep = "/".join(["d" * 49] * 4) + "/x.py"  # 4 * 49 + 3 + 5 = 204 bytes
    for path in [longest, too_long, deep, "main.py"]:
        write(tree, path, "x")
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
        p.poll_once()
    assert [f["path"] for f in p.manifest()] == [longest, "main.py"]
    assert sorted(r.getMessage() for r in caplog.records) == sorted([
        "skipping %s: path is 205 bytes long in UTF-8: boards take at most 200" % too_long,
        "skipping %s: path is 204 bytes long in UTF-8: boards take at most 200" % deep,
    ])
    # The longest manifest line a board may meet fits its 256-byte line.
    line = "%s %d %s\n" % ("0" * 40, 9999999999, longest)
    assert len(line.encode("utf-8")) <= 256


# -- 8. Request bodies ----------------------------------------------------------------------


def answers(data):
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", data)


SMUGGLED = b"GET /files HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("head, body", [
    (b"GET /files/version HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED), SMUGGLED),
    (b"GET /files/version HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
     b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)),
    (b"GET /files/version HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", SMUGGLED),
    (b"GET /files/version HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", SMUGGLED),
    (b"POST /files HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED), SMUGGLED),
])
def test_a_request_with_a_body_gets_exactly_one_answer(server, head, body):
    assert answers(raw_request(server.url, head + body)) in ([b"200"], [b"405"])


def test_an_unauthorized_request_with_a_body_gets_exactly_one_answer(guarded_server):
    head = b"POST /files HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
    assert answers(raw_request(guarded_server.url, head + SMUGGLED)) == [b"401"]


def test_a_small_body_is_read_and_the_next_request_answered(server):
    first = b"GET /files/version HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    second = b"GET /files HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = raw_request(server.url, first + second)
    assert answers(answer) == [b"200", b"200"]
    assert answer.endswith(b'"version":"1955d4c78d0dc6f6a4b7c1cde37c0e16a85b0a2f"}')


@pytest.fixture
def guarded_server(tree, serve):
    write(tree, "README.txt", "hello\n")
    return serve(Promoter(str(tree), interval=3600), token="s3cret")


# -- 9, 10. The log: never blocking, never raw --------------------------------------------


def read_available(fd, seconds):
    """What can be read from fd within seconds."""
    chunks, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.05)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shrinks a pipe with F_SETPIPE_SZ")
def test_a_blocked_log_output_stalls_neither_publishing_nor_requests(tree):
    import fcntl

    write(tree, "main.py", "1")
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
    port = free_port()  # the log, which names a port the server chose, is what this test blocks
    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "ota_promoter.py"), str(tree), "--host", "127.0.0.1",
         "--port", str(port), "--interval", "0.05", "-v"], stdout=subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    url = "http://127.0.0.1:%d" % port
    try:
        wait_for_server(url)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        for _ in range(1300):  # -v logs each: more than the queue (1,000) and the pipe hold
            conn.request("GET", "/files/version")
            assert conn.getresponse().read().startswith(b'{"version":')
        conn.close()
        old = request(url, "/files/version", timeout=2).json()["version"]
        write(tree, "main.py", "2")
        r = request(url, "/files/version?wait=%d&since=%s" % (TIMEOUT, old), timeout=TIMEOUT + 2)
        assert r.status == 200 and r.json()["version"] != old
        log = read_available(read_end, 1).decode()
        request(url, "/files/version", timeout=2)  # a line once the output flows again
        log += read_available(read_end, 1).decode()
        dropped = re.findall(r"warning: (\d+) log lines dropped: the output was blocked\n", log)
        assert len(dropped) == 1 and int(dropped[0]) > 0
    finally:
        server.kill()
        server.wait(TIMEOUT)
        os.close(read_end)


@pytest.mark.slow
@needs_any_name
def test_terminal_escapes_from_names_and_headers_are_shown_escaped(tree, running):
    write(tree, "README.txt", "hello\n")
    write(tree, "evil\x1b[2J.py", "x")  # skipped (a control character), with a warning
    write(tree, "bidi\u202eyp.txt", "y")  # published: printable in no terminal
    app = running(str(tree), "--host", "127.0.0.1", "--port", "0")
    lines, [url] = app.banner()
    raw_request(url, b"GET /files/%s HTTP/1.1\r\nHost: x\r\nX-OTA-Device: \x1b]0;owned\x07\x1b[1A\r\n"
                b"Connection: close\r\n\r\n" % checksum("hello\n", "README.txt").encode())
    assert request(url, "/files/" + checksum("y", "bidi\u202eyp.txt")).body == b"y"
    status, rest = app.stop()
    log = "\n".join(lines + rest)
    assert "\x1b" not in log and "\u202e" not in log and "\x07" not in log
    assert "skipping evil\\x1b[2J.py: name is not valid UTF-8" in log
    assert "[\\x1b]0;owned\\x07\\x1b[1A] got README.txt (6 B)" in log
    assert "127.0.0.1 got bidi\\u202eyp.txt (1 B)" in log


def test_a_target_urlsplit_cannot_read_is_400_not_a_logged_500(guarded_server, caplog):
    caplog.set_level(logging.ERROR, logger="ota_promoter")
    answer = raw_request(guarded_server.url, b"GET http://[::1/files HTTP/1.1\r\nContent-Length: 4\r\n\r\nGET ")
    assert answers(answer) == [b"400"]
    assert b"Connection: close" in answer
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_socket_closed_under_its_thread_as_the_server_stops_is_no_traceback(server, caplog):
    """Ctrl-C that lands while socketserver hands a request to its thread closes that
    request's socket under the thread (its bare except), whose setup() then fails with
    EBADF: not an error of the server's, so not a traceback after "stopped"."""
    caplog.set_level(logging.DEBUG, logger="ota_promoter")
    with socket.socket() as s:
        s.close()
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)  # what setup() does first
        except OSError:
            server.handle_error(s, ("127.0.0.1", 5))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", "127.0.0.1: connection dropped: [Errno 9] Bad file descriptor")]
