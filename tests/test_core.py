"""The pure core and the watcher: hashing, walk order, skip rules, change detection."""

import hashlib
import json
import logging
import os
import socket
import shutil
import signal
import tempfile
import time

import pytest

import ota_promoter
from ota_promoter import Promoter, PromoterError
from helpers import (
    TIMEOUT, checksum, needs_any_name, needs_case_sensitive_fs, needs_posix, needs_symlinks, settle, write,
)

README_CHECKSUM = "b5463907b61ada69504740be605374912c85d866"
README_VERSION = "1955d4c78d0dc6f6a4b7c1cde37c0e16a85b0a2f"
EMPTY_VERSION = hashlib.sha1(b"").hexdigest()


def paths(promoter):
    return [f["path"] for f in promoter.manifest()]


# -- Checksums and versions, compatible with the original ------------------------------


def test_golden_checksum_and_version_of_the_original(tree):
    write(tree, "README.txt", "hello\n")
    p = Promoter(str(tree))
    assert p.manifest() == [{"path": "README.txt", "checksum": README_CHECKSUM}]
    assert p.version == README_VERSION


def test_golden_vectors_of_a_nested_tree(tree):
    write(tree, "main.py", "print('hi')\n")
    write(tree, "lib/util.py", "")
    write(tree, "lib/__init__.py", "")
    p = Promoter(str(tree))
    expected = [
        ("lib/__init__.py", checksum(b"", "lib/__init__.py")),
        ("lib/util.py", checksum(b"", "lib/util.py")),
        ("main.py", checksum("print('hi')\n", "main.py")),
    ]
    assert [(f["path"], f["checksum"]) for f in p.manifest()] == expected
    assert p.version == hashlib.sha1("".join(c for _, c in expected).encode()).hexdigest()


def test_identical_files_have_distinct_checksums(tree):
    write(tree, "a/__init__.py", "")
    write(tree, "b/__init__.py", "")
    p = Promoter(str(tree))
    a, b = p.manifest()
    assert a["checksum"] == checksum(b"", "a/__init__.py")
    assert b["checksum"] == checksum(b"", "b/__init__.py")
    assert a["checksum"] != b["checksum"]
    assert p.blob(a["checksum"]).path == "a/__init__.py"


def test_empty_folder_has_no_files_and_the_empty_version(tree):
    p = Promoter(str(tree))
    assert p.manifest() == []
    assert p.version == EMPTY_VERSION


@needs_case_sensitive_fs
def test_walk_order_sorts_by_path_components(tree):
    for path in ["a.py", "a/b.py", "a/c/d.py", "a-b.py", "B.py", "b.py", "a/a.py", "z/y.py"]:
        write(tree, path, path)
    p = Promoter(str(tree))
    # Go's filepath.Walk: each folder's entries sorted by name, folders entered in
    # place, so "a/..." (name "a") comes before "a-b.py" and "a.py".
    assert paths(p) == ["B.py", "a/a.py", "a/b.py", "a/c/d.py", "a-b.py", "a.py", "b.py", "z/y.py"]


def test_unicode_paths_are_hashed_as_utf8(tree):
    write(tree, "données/été.py", "x")
    p = Promoter(str(tree))
    assert p.manifest() == [{"path": "données/été.py", "checksum": checksum("x", "données/été.py")}]


def test_version_bodies_are_the_json_and_lines_of_its_files():
    # Rendered on first use, entry by entry: the bytes json.dumps gives the whole.
    names = ["b.py", 'q"uote\\back\x01ctl', "été/ünï.py", "a/b.py", "\u2028line.py"]
    blobs = [ota_promoter.Blob(name, hashlib.sha1(name.encode()).hexdigest(), n * 300, b"", True)
             for n, name in enumerate(names)]
    held = {"new.py": 'line 1: "x"\n', "a.py": "2: SyntaxError"}
    for version in (ota_promoter.Version(blobs), ota_promoter.Version(blobs, held), ota_promoter.Version([])):
        files = {"files": [{"path": b.path, "checksum": b.checksum} for b in version.blobs], "version": version.id}
        if version.held:
            files["held"] = [{"path": p, "error": e} for p, e in sorted(version.held.items())]
        expected = json.dumps(files, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        assert version.files_json == expected
        assert version.files_json is version.files_json  # made once
        lines = [version.id + "\n"] + ["%s %d %s\n" % (b.checksum, b.size, b.path)
                                       for b in sorted(version.blobs, key=lambda b: b.path)]
        assert version.files_text == "".join(lines).encode("utf-8")
        assert version.by_path == {b.path: b for b in version.blobs}
        assert version.by_checksum == {b.checksum: b for b in version.blobs}


def test_a_module_named_or_erring_in_other_than_ascii_is_held_back(tree):
    write(tree, "été.py", "x = 'é'\nx = (\n")
    p = Promoter(str(tree), check=ota_promoter.SourceCheck())
    assert p.manifest() == []
    assert list(p.current.held) == ["été.py"]
    etag = hashlib.sha1(("été.py" + p.current.held["été.py"]).encode("utf-8")).hexdigest()[:8]
    assert p.current.files_etag == '"%s-%s"' % (p.version, etag)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["lib/x.py first", "x.py first"])
def test_sources_whose_checksums_collide_get_each_its_own_verdict(tree, tmp_path, monkeypatch, order):
    # A checksum, sha1 of the bytes then the path, does not tell these two apart:
    # the one that does not compile is held back, the other published, whichever
    # was compiled last, and again when the verdicts come from the cache.
    files = [("lib/x.py", "A = 1\n"), ("x.py", "A = 1\nlib/")]
    assert checksum(*files[0][::-1]) == checksum(*files[1][::-1])
    for path, data in files if order == "lib/x.py first" else files[::-1]:
        write(tree, path, data)
    monkeypatch.setattr(Promoter, "RECALL_FROM", 1)  # the cache is asked by every check
    cache = ota_promoter.VerdictCache(str(tmp_path / "cache"))
    for run in ("compiled", "recalled"):
        p = Promoter(str(tree), check=ota_promoter.SourceCheck(cache=cache))
        assert (run, list(p.current.held), paths(p)) == (run, ["x.py"], ["lib/x.py"])
        write(tree, "x.py", "A = 2\n")  # fixed: both published, each by its own verdict
        settle(p)
        assert (run, p.current.held, paths(p)) == (run, {}, ["lib/x.py", "x.py"])
        write(tree, "x.py", "A = 1\nlib/")  # broken again: its last copy stays published
        settle(p)
        assert (run, list(p.current.held), paths(p)) == (run, ["x.py"], ["lib/x.py", "x.py"])
        assert p.current.by_path["x.py"].checksum == checksum("A = 2\n", "x.py")


def test_diff_names_added_changed_and_removed():
    old = {"a": "1", "b": "2", "c": "3"}
    new = {"a": "1", "b": "9", "d": "4"}
    assert ota_promoter.diff(old, new) == (["d"], ["b"], ["c"])


# -- What is promoted --------------------------------------------------------------------


def test_skip_rules(tree):
    write(tree, "main.py", "x")
    for skipped in [
        ".git/config", ".env", ".promoterignore", "__pycache__/m.cpython-311.pyc", "lib/__pycache__/x.pyc",
        "old.pyc", "main.py~", ".main.py.swp", "main.py.swp", "main.py.swx", ".#main.py", "4913",
        ".hidden/inside.py",
    ]:
        write(tree, skipped, "secret")
    assert paths(Promoter(str(tree))) == ["main.py"]


@needs_posix
def test_fifos_and_sockets_are_skipped(tree, monkeypatch):
    write(tree, "main.py", "x")
    os.mkfifo(os.path.join(str(tree), "fifo"))
    monkeypatch.chdir(str(tree))  # a socket's path is limited to about 100 bytes
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock")
    try:
        assert paths(Promoter(str(tree))) == ["main.py"]
    finally:
        sock.close()


@needs_any_name
def test_bad_names_are_skipped_with_one_warning_each(tree, caplog):
    write(tree, "ok.py", "x")
    write(tree, "back\\slash.py", "x")
    write(tree, "tab\there.py", "x")
    with open(os.path.join(os.fsencode(str(tree)), b"latin1-\xe9.py"), "wb") as f:
        f.write(b"x")
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
        p.poll_once()
        p.poll_once()
    assert paths(p) == ["ok.py"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3
    assert all("not valid UTF-8 or has a control character or backslash" in w for w in warnings)


def test_promoterignore_regexes_are_anchored_and_live(tree, caplog):
    for path in ["main.py", "test_main.py", "tests/t.py", "lib/test_x.py", "data.bin", "lib/x.py"]:
        os.utime(write(tree, path, path), (1_000_000_000, 1_000_000_000))  # saved long ago
    write(tree, ".promoterignore", "# comment\n\ntest.*\n.*\\.bin\n")
    p = Promoter(str(tree))
    assert paths(p) == ["lib/test_x.py", "lib/x.py", "main.py"]
    write(tree, ".promoterignore", "lib/.*\n")
    settle(p)  # the files let in are new to the watcher: they settle like any change
    assert paths(p) == ["data.bin", "main.py", "test_main.py", "tests/t.py"]
    write(tree, ".promoterignore", "main\n")  # anchored: does not match main.py
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        settle(p)
    assert paths(p) == ["data.bin", "lib/test_x.py", "lib/x.py", "main.py", "test_main.py", "tests/t.py"]
    assert caplog.records == []


def test_promoterignore_alternation_matches_whole_paths_unlike_the_original(tree):
    # The original searches ^secret|private$: it would also skip secret_key.py and
    # my_private. Here the whole line must match the whole path.
    for path in ["secret", "private", "secret_key.py", "my_private", "main.py"]:
        os.utime(write(tree, path, path), (1_000_000_000, 1_000_000_000))
    write(tree, ".promoterignore", "secret|private\n")
    assert paths(Promoter(str(tree))) == ["main.py", "my_private", "secret_key.py"]


def test_invalid_promoterignore_line_is_reported_and_the_rest_applies(tree, caplog):
    write(tree, "main.py", "x")
    write(tree, "secret.py", "x")
    write(tree, ".promoterignore", "secret\\.py\n(unclosed\n")
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
        p.poll_once()
    assert paths(p) == ["main.py"]
    [record] = caplog.records
    assert record.getMessage().startswith(".promoterignore line 2 ignored: not a regular expression: '(unclosed'")


def test_ignore_globs_match_path_and_basename(tree):
    for path in ["main.py", "notes.md", "docs/a.md", "build/out.py", "lib/x.py"]:
        write(tree, path, path)
    p = Promoter(str(tree), ignore=["*.md", "build/*"])
    assert paths(p) == ["lib/x.py", "main.py"]


@needs_symlinks
def test_symlink_inside_is_followed_and_outside_is_skipped_once(tree, tmp_path, caplog):
    write(tree, "lib/real.py", "inside")
    outside = write(tmp_path, "outside/secret.py", "outside")
    os.symlink(os.path.join(str(tree), "lib/real.py"), os.path.join(str(tree), "alias.py"))
    os.symlink(outside, os.path.join(str(tree), "escape.py"))
    os.symlink(os.path.dirname(outside), os.path.join(str(tree), "escape_dir"))
    os.symlink("../../..", os.path.join(str(tree), "lib/up"))
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
        for _ in range(3):
            p.poll_once()
    assert p.manifest() == [
        {"path": "alias.py", "checksum": checksum("inside", "alias.py")},
        {"path": "lib/real.py", "checksum": checksum("inside", "lib/real.py")},
    ]
    warnings = sorted(r.getMessage() for r in caplog.records)
    assert len(warnings) == 3
    assert warnings[0].startswith("skipping escape.py: symlink points outside the folder")
    assert warnings[1].startswith("skipping escape_dir: symlink points outside the folder")
    assert warnings[2].startswith("skipping lib/up: symlink points outside the folder")


@needs_symlinks
def test_symlink_loop_inside_the_folder_is_skipped(tree, caplog):
    write(tree, "lib/x.py", "x")
    os.symlink("..", os.path.join(str(tree), "lib/loop"))
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        p = Promoter(str(tree))
    assert paths(p) == ["lib/x.py"]
    assert [r.getMessage() for r in caplog.records] == ["skipping lib/loop: symlink loops back to a folder above it"]


@needs_posix
def test_unreadable_file_is_skipped_with_one_warning():
    # Root reads any file, so the scan runs in a forked child that gives up root,
    # on a folder that user can reach.
    tree = tempfile.mkdtemp(prefix="ota-unreadable-")
    os.chmod(tree, 0o755)
    write(tree, "ok.py", "x")
    os.chmod(write(tree, "locked.py", "x"), 0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_end)
            out = os.fdopen(write_end, "w")
            if os.geteuid() == 0:
                os.setuid(65534)
            handler = logging.StreamHandler(out)
            logging.getLogger("ota_promoter").addHandler(handler)
            p = Promoter(str(tree))
            p.poll_once()
            p.poll_once()
            out.write("manifest: %s\n" % paths(p))
            out.close()
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + TIMEOUT
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the scan in the child did not finish")
        time.sleep(0.01)
    with os.fdopen(read_end) as f:
        output = f.read()
    shutil.rmtree(tree)
    assert output == "skipping locked.py: cannot read: Permission denied\nmanifest: ['ok.py']\n"


# -- The watcher -------------------------------------------------------------------------


def test_added_file_is_published_after_one_stable_interval(tree):
    write(tree, "main.py", "a")
    p = Promoter(str(tree), settle=0)  # polled by hand: a change settles at the next poll
    write(tree, "new.py", "n")
    assert p.poll_once() is False  # seen once: may still be being written
    assert paths(p) == ["main.py"]
    assert p.poll_once() is True
    assert paths(p) == ["main.py", "new.py"]


def test_modified_file_is_rehashed(tree):
    write(tree, "main.py", "a")
    p = Promoter(str(tree))
    write(tree, "main.py", "bb")
    assert settle(p)
    assert p.manifest() == [{"path": "main.py", "checksum": checksum("bb", "main.py")}]


def test_deleted_file_and_folder_are_unpublished(tree):
    write(tree, "main.py", "a")
    write(tree, "lib/x.py", "x")
    write(tree, "lib/sub/y.py", "y")
    p = Promoter(str(tree))
    os.remove(os.path.join(str(tree), "main.py"))
    assert p.poll_once() is True
    assert paths(p) == ["lib/sub/y.py", "lib/x.py"]
    shutil.rmtree(os.path.join(str(tree), "lib/sub"))
    assert p.poll_once() is True
    assert paths(p) == ["lib/x.py"]


def test_renamed_file_and_new_folder_are_picked_up(tree):
    write(tree, "main.py", "a")
    p = Promoter(str(tree))
    os.rename(os.path.join(str(tree), "main.py"), os.path.join(str(tree), "app.py"))
    write(tree, "drivers/new/sensor.py", "s")
    assert settle(p)
    assert p.manifest() == [
        {"path": "app.py", "checksum": checksum("a", "app.py")},
        {"path": "drivers/new/sensor.py", "checksum": checksum("s", "drivers/new/sensor.py")},
    ]


def test_rename_is_published_as_one_version(tree):
    write(tree, "main.py", "a")
    p = Promoter(str(tree), settle=0)  # polled by hand: a change settles at the next poll
    before = p.version
    os.rename(os.path.join(str(tree), "main.py"), os.path.join(str(tree), "app.py"))
    p.poll_once()
    assert p.version == before  # the deletion waits for the new name to settle
    p.poll_once()
    assert paths(p) == ["app.py"]


def test_same_size_edit_within_one_mtime_tick_is_seen(tree):
    full = write(tree, "main.py", "aaaa")
    p = Promoter(str(tree))
    st = os.stat(full)
    with open(full, "r+b") as f:  # same inode, same size
        f.write(b"bbbb")
    os.utime(full, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    new = os.stat(full)
    assert (new.st_size, new.st_mtime_ns, new.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert settle(p)
    assert p.manifest() == [{"path": "main.py", "checksum": checksum("bbbb", "main.py")}]


def test_unchanged_old_file_is_not_reread(tree, monkeypatch):
    full = write(tree, "main.py", "a")
    os.utime(full, (1_000_000_000, 1_000_000_000))  # long ago: not racy
    p = Promoter(str(tree))
    reads = []
    monkeypatch.setattr(p, "_hash", lambda *args: reads.append(args))
    assert p.poll_once() is False
    assert reads == []


def test_half_written_file_is_not_published(tree):
    full = write(tree, "main.py", "old")
    p = Promoter(str(tree), settle=0)  # polled by hand: a change settles at the next poll
    old = p.manifest()
    with open(full, "wb") as f:
        f.write(b"first half,")
        f.flush()
        p.poll_once()
        assert p.manifest() == old
        f.write(b" second half")
        f.flush()
        p.poll_once()
        assert p.manifest() == old
    p.poll_once()
    assert p.manifest() == [{"path": "main.py", "checksum": checksum("first half, second half", "main.py")}]


def test_save_of_several_files_is_published_as_one_version(tree):
    write(tree, "a.py", "1")
    write(tree, "b.py", "1")
    p = Promoter(str(tree), settle=0)  # polled by hand: a change settles at the next poll
    write(tree, "a.py", "2")
    assert p.poll_once() is False
    write(tree, "b.py", "2")
    assert p.poll_once() is False  # a.py settled, but b.py is still changing
    assert p.poll_once() is True
    assert p.manifest() == [
        {"path": "a.py", "checksum": checksum("2", "a.py")},
        {"path": "b.py", "checksum": checksum("2", "b.py")},
    ]


@pytest.mark.slow
def test_a_file_that_never_settles_does_not_block_the_others(tree, caplog, monkeypatch):
    monkeypatch.setattr(Promoter, "MAX_HOLD", 0.3)  # seconds; 5 by default
    write(tree, "main.py", "1")
    write(tree, "log.txt", "")
    p = Promoter(str(tree), settle=0)  # polled by hand: a change settles at the next poll
    write(tree, "main.py", "2")
    start = time.monotonic()
    polls = []
    with caplog.at_level(logging.WARNING, "ota_promoter"):
        while not polls or not polls[-1]:
            assert time.monotonic() < start + TIMEOUT
            write(tree, "log.txt", "x" * (len(polls) + 1))
            polls.append(p.poll_once())
            time.sleep(0.01)
    assert time.monotonic() - start >= 0.3  # held back that long, and no longer than the loop
    assert p.manifest() == [
        {"path": "log.txt", "checksum": checksum("", "log.txt")},
        {"path": "main.py", "checksum": checksum("2", "main.py")},
    ]
    assert [r.getMessage() for r in caplog.records] == ["still changing: log.txt; publishing the rest"]


def test_vanished_folder_keeps_the_last_version_and_recovers(tree, caplog):
    write(tree, "main.py", "a")
    p = Promoter(str(tree))
    version = p.version
    moved = str(tree) + ".away"
    os.rename(str(tree), moved)
    with caplog.at_level(logging.INFO, "ota_promoter"):
        assert p.poll_once() is False
        assert p.poll_once() is False
        assert p.version == version
        assert p.read(p.blob(checksum("a", "main.py"))) == b"a"
        os.rename(moved, str(tree))
        write(tree, "main.py", "b")
        assert settle(p)
    assert p.manifest() == [{"path": "main.py", "checksum": checksum("b", "main.py")}]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert messages[0].startswith("cannot read folder %s (No such file or directory); still serving version %s" % (tree, version[:7]))
    assert messages[1] == "folder %s is readable again" % tree
    assert messages[2].startswith("version ")


def test_each_version_is_logged_once_with_what_changed(tree, caplog):
    write(tree, "keep.py", "k")
    write(tree, "gone.py", "g")
    write(tree, "main.py", "1")
    p = Promoter(str(tree))
    write(tree, "main.py", "2")
    write(tree, "new.py", "n")
    os.remove(os.path.join(str(tree), "gone.py"))
    with caplog.at_level(logging.INFO, "ota_promoter"):
        settle(p)
        p.poll_once()
    assert [r.getMessage() for r in caplog.records] == [
        "version %s: +1 ~1 -1, 3 files: new.py, main.py, gone.py" % p.version[:7]
    ]


# -- Integrity: the bytes served always hash to the checksum ------------------------------


@pytest.mark.slow
def test_previous_version_stays_downloadable_and_older_ones_go(tree):
    write(tree, "main.py", "v1")
    p = Promoter(str(tree))
    c1 = checksum("v1", "main.py")
    write(tree, "main.py", "v2")
    settle(p)
    assert p.read(p.blob(c1)) == b"v1"  # a board that fetched the manifest before the save
    write(tree, "main.py", "v3")
    settle(p)
    assert p.blob(c1) is None


def test_past_the_store_limit_files_are_served_from_a_private_copy(tree):
    write(tree, "big.bin", b"A" * 1000)
    p = Promoter(str(tree), store_limit=100)
    blob = p.blob(checksum(b"A" * 1000, "big.bin"))
    assert blob.data is None  # over the limit: kept in a private copy, not in memory
    assert p.read(blob) == b"A" * 1000
    write(tree, "big.bin", b"B" * 1000)  # changed, not yet polled
    assert p.read(blob) == b"A" * 1000  # the bytes that were hashed, still
    settle(p)
    assert p.read(blob) == b"A" * 1000  # the version before stays downloadable
    write(tree, "big.bin", b"C" * 1000)
    settle(p)
    assert p.blob(blob.checksum) is None
    assert p.read(blob) is None  # two versions on: the copy is removed
    folder = p.store._folder
    assert sorted(os.listdir(folder)) == [checksum(b"B" * 1000, "big.bin"), checksum(b"C" * 1000, "big.bin")]
    p.stop()
    assert not os.path.exists(folder)


def test_store_limit_counts_each_held_file_once(tree):
    write(tree, "a.py", b"a" * 60)
    write(tree, "b.py", b"b" * 60)
    p = Promoter(str(tree), store_limit=100)
    held = [f["path"] for f in p.manifest() if p.blob(f["checksum"]).data is not None]
    assert held == ["a.py"]
    for _ in range(4):  # racy rehashing must not leak into the count
        p.poll_once()
    assert p.store.held == 60


# -- Construction errors ---------------------------------------------------------------


def test_missing_folder_is_a_promoter_error(tmp_path):
    with pytest.raises(PromoterError, match="folder '.*nope' does not exist"):
        Promoter(str(tmp_path / "nope"))


def test_file_instead_of_folder_is_a_promoter_error(tmp_path):
    f = write(tmp_path, "x.py", "x")
    with pytest.raises(PromoterError, match="is a file, not a folder"):
        Promoter(f)
