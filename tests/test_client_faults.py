"""The device client under attack and faults: hostile servers on loopback, a file
system that folds case (as FAT does), a full one, slow answers and IPv6.

Each test here failed against the client before these defects were fixed, but
the one of a file renamed in case, which guards the order of the new switch.
"""

import errno
import os
import re
import socket
import time

import pytest

import ota
import ota_http
import ota_update
import ota_promoter
from helpers import checksum, files, folders, promoted, publish, request, slow_except, through, write
from proxy import is_manifest, set_header, split

VERSION = "5" * 40


def inject(extra):
    """A fault for the proxy that adds {path: bytes} to the text manifest and serves
    those files as a hostile server would: right checksum, length and target path."""
    served = {checksum(data, path): (path, data) for path, data in extra.items()}

    def fault(path, response):
        if is_manifest(path, response):
            head, body = split(response)
            lines = body.decode().splitlines(True)
            added = ["%s %d %s\n" % (c, len(data), p) for c, (p, data) in served.items()]
            lines[1:] = sorted(lines[1:] + added, key=lambda line: line[:-1].split(" ", 2)[2])
            body = "".join(lines).encode()
            return set_header(head + b"\r\n\r\n" + body, b"Content-Length", str(len(body)).encode())
        if path[len("/files/"):] in served:
            p, data = served[path[len("/files/"):]]
            return b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nX-Target-Path: %s\r\n\r\n%s" % (len(data), p.encode(), data)
        return response

    return fault


def on(fs, monkeypatch):
    """Run the client's file operations through fs."""
    through(fs, monkeypatch)


class FoldingFS:
    """The client's os and open on a file system that folds case under root, as FAT
    does: a name finds the entry that differs from it only in case, and a new entry
    keeps its first spelling."""

    def __init__(self, root):
        self.root = str(root)

    def fold(self, path):
        if not path.startswith(self.root + "/"):
            return path
        folded = self.root
        for name in path[len(self.root) + 1:].split("/"):
            try:
                name = next(n for n in os.listdir(folded) if n.lower() == name.lower())
            except (OSError, StopIteration):
                pass
            folded += "/" + name
        return folded

    def __getattr__(self, name):
        real = getattr(os, name)
        if name == "rename":
            return lambda src, dst: real(self.fold(src), self.fold(dst))
        if name in ("stat", "mkdir", "remove", "rmdir", "listdir", "statvfs"):
            return lambda path, *args: real(self.fold(path), *args)
        return real

    def open(self, path, *args):
        return open(self.fold(path), *args)


class FullDisk:
    """A file system with `blocks` blocks of 4 KB free, where the update's files take
    every block: no folder they need fits (the stage, made first, still does)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __getattr__(self, name):
        return getattr(os, name)

    def statvfs(self, path):
        return (4096, 4096, 1000, self.blocks, self.blocks, 0, 0, 0, 0, 255)

    def mkdir(self, path):
        if os.path.exists(path) or path.endswith("/.ota-new"):
            return os.mkdir(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    def open(self, path, *args):
        return open(path, *args)


# -- 1. Nothing that can fail is left for after the commit point ----------------------


@pytest.mark.slow
def test_a_file_that_is_also_a_folder_in_the_manifest_is_refused_before_anything(installed, promoter, proxy, device):
    publish(promoter, promoter.root, {"tools/x.py": "X"})
    proxy.fault = inject({"tools": b"a file named like the folder"})
    with pytest.raises(ota.OTAError, match=r"^'tools' and 'tools/x.py' clash: rename one$"):
        device.update(proxy.url)
    assert files(device.root) == installed
    proxy.fault = None  # the server, fixed
    assert device.update(proxy.url) is True
    assert files(device.root, own=False) == dict(promoted(promoter.root), **{"secrets.py": b"mine"})


@pytest.mark.parametrize("first, second", slow_except([("LIB", "lib/x.py"), ("Config.py", "config.py"), ("A/b.py", "a")],
                                                     ("Config.py", "config.py")))
def test_paths_equal_but_for_case_are_refused_naming_both(tree, promoter, device, monkeypatch, first, second):
    publish(promoter, tree, {"main.py": "m"})
    device.update(promoter.url)
    before = files(device.root)
    publish(promoter, tree, {first: "one", second: "two"})
    on(FoldingFS(device.root), monkeypatch)
    with pytest.raises(ota.OTAError, match="^%r and %r clash: rename one$" % tuple(sorted([first, second]))):
        device.update(promoter.url)
    assert files(device.root) == before
    publish(promoter, tree, {first: None})
    assert device.update(promoter.url) is True
    assert files(device.root, own=False) == promoted(tree)


@pytest.mark.parametrize("first, second", slow_except([
    ("notes", "notes."), ("a/b ", "a/B"), ("Notes", "notes. ."), ("pkg", "pkg./x.py"), ("pkg.", "pkg/x.py"),
    ("pkg./x.py", "pkg/x.py"), ("pkg /x.py", "Pkg/X.py"),
], ("notes", "notes.")))
def test_paths_equal_on_fat_are_refused_naming_both_before_any_download(installed, proxy, device, first, second):
    # FatFs drops a name's trailing dots and spaces: "notes." is "notes" there
    proxy.fault = inject({first: b"one", second: b"two"})
    del proxy.heads[:]
    with pytest.raises(ota.OTAError, match="^%s and %s clash: rename one$" % tuple(
            re.escape(repr(path)) for path in sorted([first, second]))):
        device.update(proxy.url)
    assert files(device.root) == installed
    assert len(proxy.paths) == 2  # the version and the manifest: refused while merging it


@pytest.mark.parametrize("path", slow_except(["what?.py", "a:b.py", 'say"hi".py', "x<y>.py", "pipe|.py", "lib/star*.py",
                                              "lib/..."], "a:b.py"))
def test_a_name_fat_cannot_hold_is_refused_naming_it_before_any_download(installed, proxy, device, path):
    proxy.fault = inject({path: b"x"})
    del proxy.heads[:]
    with pytest.raises(ota.OTAError, match="^%s: FAT cannot hold this name: rename it$" % re.escape(repr(path))):
        device.update(proxy.url)
    assert files(device.root) == installed
    assert len(proxy.paths) == 2


@pytest.mark.slow
def test_a_file_renamed_in_case_on_the_server_follows_on_a_case_folding_board(tree, promoter, device, monkeypatch):
    publish(promoter, tree, {"Config.py": "C = 1\n", "main.py": "m"})
    on(FoldingFS(device.root), monkeypatch)
    device.update(promoter.url)
    publish(promoter, tree, {"Config.py": None, "config.py": "C = 2\n"})  # one file on FAT: moved aside first
    assert device.update(promoter.url) is True
    assert files(device.root, own=False) == {"config.py": b"C = 2\n", "main.py": b"m"}
    publish(promoter, tree, {"main.py": "m2"})
    assert device.update(promoter.url) is True
    assert files(device.root, own=False) == {"config.py": b"C = 2\n", "main.py": b"m2"}


@pytest.mark.slow
def test_a_nearly_full_board_refuses_an_update_that_adds_folders(installed, promoter, proxy, device, monkeypatch):
    publish(promoter, promoter.root, {"pkg/a/b/c.py": "c", "pkg/d.py": "d"})
    # Four files of a block each: room for them, the state and the journal, but not
    # for the folders pkg, pkg/a and pkg/a/b.
    on(FullDisk(4 + 2), monkeypatch)
    manifest = request(promoter.url, "/files?format=text").body
    need = (4 + 2 * 3 + 4) * 4096 + 2 * len(manifest)
    with pytest.raises(ota.OTAError, match="^not enough space: the update needs %d B, %d B are free$" % (need, 6 * 4096)):
        device.update(proxy.url)
    assert files(device.root) == installed
    monkeypatch.undo()  # room made
    assert device.update(proxy.url) is True
    assert files(device.root, own=False) == dict(promoted(promoter.root), **{"secrets.py": b"mine"})


@pytest.mark.slow
def test_a_full_file_system_during_the_switch_rolls_back_then_the_next_update_succeeds(
        installed, promoter, proxy, device, monkeypatch):
    publish(promoter, promoter.root, {"pkg/a/b/c.py": "c"})
    before = folders(device.root)
    on(FullDisk(1000), monkeypatch)  # it says there is room, but a folder does not fit
    with pytest.raises(ota.OTAError, match=r"^update failed, nothing changed: OSError\(28, "):
        device.update(proxy.url)
    assert files(device.root) == installed  # main.py, lib/x.py, .ota: the old ones, and no .ota-new
    assert folders(device.root) == before
    ota.recover(str(device.root))
    assert files(device.root) == installed
    monkeypatch.undo()
    assert device.update(proxy.url) is True
    assert files(device.root, own=False) == dict(promoted(promoter.root), **{"secrets.py": b"mine"})


# -- 2. Case-folding file systems, and what is read back -------------------------------


@pytest.mark.slow
def test_a_hostile_server_cannot_plant_a_state_through_capital_letters(installed, promoter, proxy, device,
                                                                        tmp_path, monkeypatch):
    """The attack: .OTA-NEW/state is .ota-new/state on FAT; the planted state would
    list secrets.py and ../outside.txt, and the next update would delete both."""
    outside = write(tmp_path, "outside.txt", "not the board's")
    forged = "%s\n%s 4 ../outside.txt\n%s 4 secrets.py\n" % (VERSION, "0" * 40, "0" * 40)
    proxy.fault = inject({".OTA-NEW/state": forged.encode()})
    on(FoldingFS(device.root), monkeypatch)
    with pytest.raises(ota.OTAError, match=r"^refusing unsafe or unsorted path '.OTA-NEW/state' in the manifest$"):
        device.update(proxy.url)
    assert files(device.root) == installed
    proxy.fault = None
    assert device.update(proxy.url) is True
    publish(promoter, promoter.root, {"main.py": "v3"})
    assert device.update(proxy.url) is True
    assert files(device.root)["secrets.py"] == b"mine"
    assert os.path.exists(outside)


@pytest.mark.slow
def test_an_unsafe_path_read_back_from_ota_deletes_nothing_and_a_new_ota_is_written(
        installed, promoter, proxy, device, tmp_path, capsys):
    """A planted line in .ota: .ota is taken as damaged (tests/test_client_memory.py
    has every other damage), so the update deletes nothing, outside or in."""
    outside = write(tmp_path, "outside.txt", "not the board's")
    state = os.path.join(str(device.root), ".ota")
    with open(state) as f:
        lines = f.read().splitlines(True)
    lines.insert(1, "%s 4 ../outside.txt\n" % ("0" * 40))  # where it sorts
    write(device.root, ".ota", "".join(lines))
    assert device.update(proxy.url) is True
    assert re.search(r"^ota: .*/\.ota is damaged \(OTAError\(\"refusing unsafe or unsorted path '\.\./outside\.txt' "
                     r"in the \.ota\"\)\): installing every file again, deleting none$", capsys.readouterr().out, re.M)
    assert os.path.exists(outside)
    assert files(device.root, own=False) == dict(promoted(promoter.root), **{
        "secrets.py": b"mine", "lib/x.py": b"X = 1\n"})  # lib/x.py, gone from the server, is not deleted
    assert files(device.root)[".ota"].decode().splitlines()[0] == promoter.version


def test_an_unsafe_path_in_the_journal_is_refused_before_anything_is_touched(device, tmp_path):
    outside = write(tmp_path, "outside.txt", "not the board's")
    write(device.root, "main.py", "m")
    write(device.root, ".ota-journal", "d %s 1 main.py\nd %s 4 ../outside.txt\nend\n" % ("0" * 40, "0" * 40))
    before = files(device.root)
    with pytest.raises(ota.OTAError, match=r"^.*/.ota-journal is damaged: b'd 0{40} 4 ../outside.txt\\n'; "
                                           r"the board is left as it is$"):
        ota.recover(str(device.root))
    assert files(device.root) == before
    assert os.path.exists(outside)


# -- 3. A deadline for each whole request ----------------------------------------------


HOLD = 8  # seconds a hostile answer goes on at most (the old client waited that long)


def endless_head(pause):
    def answer(s, line, stopped):
        s.sendall(b"HTTP/1.0 200 OK\r\n")
        end = time.monotonic() + HOLD
        while time.monotonic() < end and not stopped.wait(pause):
            s.sendall(b"X-Pad: x\r\n")
    return answer


def trickled_version(s, line, stopped):
    body = b'{"version": "%s"}' % VERSION.encode()
    body += b" " * (200 - len(body))
    s.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    end = time.monotonic() + HOLD
    for i in range(len(body)):
        if time.monotonic() > end or stopped.wait(0.1):
            return
        s.sendall(body[i:i + 1])


@pytest.mark.slow
@pytest.mark.parametrize("answer, message", [
    (endless_head(0), r"too many header lines from 127.0.0.1:\d+$"),
    (endless_head(0.1), r"127.0.0.1:\d+ is too slow: gave up after \d+ ms$"),
    (trickled_version, r"127.0.0.1:\d+ is too slow: gave up after \d+ ms$"),
], ids=["endless head lines", "a head line each 0.1 s", "a body at 1 byte each 0.1 s"])
def test_an_endless_or_trickling_answer_fails_within_the_deadline(hostile, board, answer, message):
    server = hostile(answer)
    started = time.monotonic()
    with pytest.raises(ota.OTAError, match=message):
        board.update(server.url, timeout=1)
    took = time.monotonic() - started
    # A bound on correctness, not speed: 1 s plus a millisecond per byte received, so
    # about 1.1 s; the old client waited for as long as the server went on.
    assert took < 3 * 1 + 2
    assert files(board.root) == {}


def test_a_304_to_a_version_request_without_a_version_is_an_ota_error(hostile, board):
    server = hostile(lambda s, line, stopped: s.sendall(b"HTTP/1.1 304 Not Modified\r\n\r\n"))
    with pytest.raises(ota.OTAError, match=r"bad version answer from 127.0.0.1:\d+: 304 to a request without "
                                           r"a version$"):
        board.update(server.url)
    assert files(board.root) == {}


# -- 4. watch() does not hammer a server ----------------------------------------------


def same_version_at_once(s, line, stopped):
    """Like the original Go server: ignores ?wait and answers at once."""
    manifest = "manifest.txt" in line or VERSION in line  # /files/<version> too
    body = ("%s\n" % VERSION if manifest else '{"version": "%s"}' % VERSION).encode()
    s.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.mark.parametrize("wait, sent", [(5, 5), (0.5, 1), (0, 1)])
def test_watch_pauses_after_an_early_answer_with_nothing_new(hostile, tmp_path, monkeypatch, wait, sent):
    def answer(s, line, stopped):
        if len(server.requests) > 100:  # the old client, hammering: stop it
            return
        same_version_at_once(s, line, stopped)

    server = hostile(answer)
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt  # the user stops watch()

    monkeypatch.setattr(ota_update, "time", type("Clock", (), {"sleep": staticmethod(sleep)}))
    with pytest.raises(KeyboardInterrupt):
        ota.watch(server.url, root=str(tmp_path), reset=False, wait=wait, timeout=2)
    assert sleeps == [1, 1, 1]
    poll = "GET /files/version?wait=%d HTTP/1.0" % sent
    assert server.requests == [
        "GET /files/version HTTP/1.0", "GET /files/%s HTTP/1.0" % VERSION,  # installs the state
        poll,  # nothing new since the version the server named: no update
        poll,
    ]


# -- 5. A server without the text manifest ----------------------------------------------


NO_MANIFEST = (r"^127.0.0.1:\d+ has no /files/manifest.txt: the url must name an ota-promoter server "
               r"or the folder of an export$")


@pytest.mark.parametrize("answer, message", [
    # The original Go server takes manifest.txt for a checksum it does not know.
    (b"HTTP/1.0 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}", NO_MANIFEST),
    # A static host serving a folder that is not an export.
    (b"HTTP/1.0 404 Not Found\r\nContent-Length: 9\r\n\r\n<html>404", NO_MANIFEST),
    # Something answering the manifest's path with the JSON listing.
    (None, r"^127.0.0.1:\d+ has no text manifest: upgrade the server \(the original ota-promoter has none\)$"),
])
def test_a_server_without_the_text_manifest_gets_a_clear_error(app, promoter, proxy, board, answer, message):
    if answer is None:
        listing = request(promoter.url, "/files").body
        answer = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(listing), listing)
    proxy.fault = lambda path, response: answer if is_manifest(path, response) else response
    with pytest.raises(ota.OTAError, match=message):
        board.update(proxy.url)
    assert files(board.root) == {}


# -- 6. IPv6 ----------------------------------------------------------------------------


@pytest.mark.parametrize("url, host, port, family, prefix", [
    ("http://[::1]:9090", "::1", 9090, "AF_INET6", ""),
    ("http://[::1]", "::1", 80, "AF_INET6", ""),
    ("http://[2001:db8::7]:9090/ota/", "2001:db8::7", 9090, "AF_INET6", "/ota"),
    ("http://192.168.0.10:9090", "192.168.0.10", 9090, "AF_INET", ""),
    ("http://board-server.local/", "board-server.local", 80, "AF_INET", ""),
])
def test_urls_with_ipv6_addresses(url, host, port, family, prefix):
    server = ota_http.Server(url, None, 1, "", None, bytearray(1))
    assert (server.host, server.prefix) == ((host, port, getattr(socket, family)), prefix)
    assert server.head.startswith("Host: %s\r\n" % url[len("http://"):].split("/")[0])


@pytest.mark.parametrize("url", ["http://::1:9090", "http://[::1:9090", "http://[::1]x", "http://x:y", "http://[::1]:"])
def test_bad_hosts_and_ports_are_refused(url):
    with pytest.raises(ota.OTAError, match="^bad host or port in %s$" % re.escape(repr(url))):
        ota.update(url)


def test_update_over_ipv6_loopback(tree, board):
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError as e:
        pytest.skip("no IPv6 loopback on this machine: %s" % e)
    publish_tree = {"main.py": "print('over IPv6')\n", "lib/x.py": "X = 6\n"}
    for path, data in publish_tree.items():
        write(tree, path, data)
    p = ota_promoter.Promoter(str(tree), interval=3600)
    server = p.serve("::1", 0).start()
    try:
        url = "http://[::1]:%d" % server.server_address[1]
        assert board.update(url) is True
        assert files(board.root, own=False) == promoted(tree)
    finally:
        server.close()
