"""--export: a site that nginx, python3 -m http.server or a CDN serves as-is."""

import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time

import pytest

import ota_promoter
from ota_promoter import Promoter, export
from helpers import ROOT, TIMEOUT, Response, assert_user_error, checksum, exported, request, run, slow_except, write

SUMMARY = re.compile(r"\d\d:\d\d:\d\d exported version ([0-9a-f]{7}) to (.+): "
                     r"(\d+) written, (\d+) kept, (\d+) pruned, in \d+\.\d\d s\n")


def get(url, path, context=None, headers=None):
    """One GET over http or https (verified against context); returns a Response."""
    scheme, address = url.split("://")
    host, port = address.rsplit(":", 1)
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, int(port), timeout=TIMEOUT, context=context)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, r.headers, r.read())
    finally:
        conn.close()


def board_update(url, context=None):
    """What a board does against a static host: version, manifest, then every file,
    each checked against its checksum and size. Returns (version, {path: bytes})."""
    r = get(url, "/files/version", context)
    assert r.status == 200
    version = r.json()["version"]
    return version, fetch_files(url, read_manifest(url, context), context)


def read_manifest(url, context=None):
    r = get(url, "/files/manifest.txt", context)
    assert r.status == 200
    lines = r.body.decode().splitlines()
    return lines[0], [line.split(" ", 2) for line in lines[1:]]


def fetch_files(url, manifest, context=None):
    files = {}
    for sum_, size, path in manifest[1]:
        r = get(url, "/files/" + sum_, context)
        assert (r.status, len(r.body), checksum(r.body, path)) == (200, int(size), sum_), path
        files[path] = r.body
    return files


def listing(site):
    """Every file under site: relative path -> (size, mtime_ns)."""
    found = {}
    for folder, _, names in os.walk(str(site)):
        for name in names:
            full = os.path.join(folder, name)
            st = os.stat(full)
            found[os.path.relpath(full, str(site))] = (st.st_size, st.st_mtime_ns)
    return found


def make_old(site):
    """Set every mtime under site far in the past, so that any write shows."""
    for folder, _, names in os.walk(str(site)):
        for name in names:
            os.utime(os.path.join(folder, name), ns=(10**18, 10**18))


def content_files(site):
    """The names of files/ that are 40 hex digits long, but for versions' manifests."""
    names = []
    for name in os.listdir(os.path.join(str(site), "files")):
        if len(name) == 40:
            with open(os.path.join(str(site), "files", name), "rb") as f:
                if f.read(41) != name.encode() + b"\n":
                    names.append(name)
    return sorted(names)


@pytest.fixture
def app(tree):
    write(tree, "README.txt", "hello\n")
    write(tree, "main.py", "import lib.x\n")
    write(tree, "lib/x.py", "X = 1\n")
    write(tree, "lib/data.bin", bytes(range(256)) * 4)
    return tree


@pytest.fixture
def site(tmp_path):
    return tmp_path / "site"


# -- The site's layout and bodies ----------------------------------------------------------


def test_export_holds_the_bodies_the_server_answers(app, site, serve):
    promoter, counts = exported(app, site)
    assert counts == (4, 0, 0)
    server = serve(promoter)
    blobs = promoter.current.blobs
    assert sorted(listing(site)) == sorted(
        [".ota-export", "files.json", "files/manifest.txt", "files/version", "files/" + promoter.version]
        + ["files/" + b.checksum for b in blobs]
    )

    def body(path):
        with open(os.path.join(str(site), *path.split("/")), "rb") as f:
            return f.read()

    assert body("files/version") == request(server.url, "/files/version").body
    assert body("files.json") == request(server.url, "/files").body
    assert body("files/manifest.txt") == request(server.url, "/files?format=text").body
    assert body("files/manifest.txt") == request(server.url, "/files/manifest.txt").body
    assert body("files/" + promoter.version) == request(server.url, "/files/" + promoter.version).body
    for b in blobs:
        assert body("files/" + b.checksum) == request(server.url, "/files/" + b.checksum).body
    assert body(".ota-export") == (
        "%s %s\n" % (promoter.version, " ".join(b.checksum for b in blobs))).encode()


def test_server_answers_manifest_txt_as_format_text(app, serve):
    promoter = Promoter(str(app), interval=3600)
    server = serve(promoter)
    text = request(server.url, "/files?format=text")
    r = request(server.url, "/files/manifest.txt")
    assert (r.status, r.body) == (200, text.body)
    for name in ("Content-Type", "ETag", "Cache-Control", "Content-Length"):
        assert r.headers[name] == text.headers[name]
    assert r.headers["ETag"] == '"%s-text"' % promoter.version
    head = request(server.url, "/files/manifest.txt", method="HEAD")
    assert (head.status, head.body, head.headers["Content-Length"]) == (200, b"", str(len(text.body)))
    r = request(server.url, "/files/manifest.txt", headers={"If-None-Match": text.headers["ETag"]})
    assert (r.status, r.body) == (304, b"")
    # The name is not a checksum: other names under /files/ are still refused as such.
    r = request(server.url, "/files/manifest.json")
    assert (r.status, r.json()) == (400, {"error": "malformed checksum 'manifest.json': expected 40 hex digits"})


def test_export_of_an_unchanged_tree_writes_nothing(app, site):
    exported(app, site)
    make_old(site)
    before = listing(site)
    assert exported(app, site)[1] == (0, 4, 0)
    assert listing(site) == before


def test_second_export_writes_only_new_files_and_keeps_the_old(app, site):
    first, _ = exported(app, site)
    make_old(site)
    before = listing(site)
    write(app, "main.py", "import lib.x\nprint(lib.x.X)\n")
    second, counts = exported(app, site)
    assert counts == (1, 3, 0)
    after = listing(site)
    new = second.current.by_path["main.py"].checksum
    assert sorted(set(after) - set(before)) == sorted(["files/" + new, "files/" + second.version])
    changed = sorted(p for p in before if after[p] != before[p])
    assert changed == [".ota-export", "files.json", "files/manifest.txt", "files/version"]
    assert content_files(site) == sorted(
        set(b.checksum for b in first.current.blobs) | set(b.checksum for b in second.current.blobs))


@pytest.mark.slow
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_pruning_keeps_exactly_the_last_keep_versions(app, site, keep):
    # Five versions; the fourth reverts to the first, so files come back.
    edits = ["1", "2", "3", "1", "5"]
    versions = []
    for edit in edits:
        write(app, "main.py", "V = %s\n" % edit)
        write(app, "lib/v.py", "# %s\n" % edit)
        promoter, _ = exported(app, site, keep)
        if promoter.version in versions:
            versions.remove(promoter.version)
        versions.append(promoter.version)
        kept = versions[-keep:]
        with open(os.path.join(str(site), ".ota-export")) as f:
            record = [line.split() for line in f]
        assert [line[0] for line in record] == kept
        assert content_files(site) == sorted(set(c for line in record for c in line[1:]))
        assert set(b.checksum for b in promoter.current.blobs) <= set(content_files(site))
    assert len(versions) == 4  # the revert made no new version


def test_a_file_already_there_with_the_wrong_size_is_rewritten(app, site):
    promoter, _ = exported(app, site)
    blob = promoter.current.by_path["main.py"]
    write(site, "files/" + blob.checksum, "truncat")
    assert exported(app, site)[1] == (1, 3, 0)
    with open(os.path.join(str(site), "files", blob.checksum), "rb") as f:
        assert f.read() == b"import lib.x\n"


def test_the_export_holds_the_bytes_that_were_hashed_even_if_a_file_changed_since(app, site):
    # Past the store limit too: the bytes come from the private copy made while hashing.
    promoter = Promoter(str(app), interval=3600, store_limit=0)
    blob = promoter.current.by_path["main.py"]
    write(app, "main.py", "changed since the scan\n")
    assert export(promoter, str(site)) == (len(promoter.current.blobs), 0, 0)
    with open(os.path.join(str(site), "files", blob.checksum), "rb") as f:
        assert checksum(f.read(), "main.py") == blob.checksum
    promoter.stop()


@pytest.mark.slow
def test_a_damaged_record_stops_the_export(app, site):
    exported(app, site)
    write(site, ".ota-export", "not a version\n")
    result = run(str(app), "--export", str(site))
    assert (result.returncode, result.stderr) == (2, "ota_promoter.py: error: %r line 1 is damaged: "
                                                  "delete the site and export again\n" % str(site / ".ota-export"))
    before = listing(site)
    os.remove(str(site / ".ota-export"))
    # Without it, nothing tells the export's files from anyone else's: it touches none.
    result = run(str(app), "--export", str(site))
    assert result.returncode == 2
    assert result.stderr.startswith("ota_promoter.py: error: %r holds files no export wrote (files.json, " % str(site))
    del before[".ota-export"]
    assert listing(site) == before


# -- An export killed half-way -----------------------------------------------------------------

_DYING = """
import os, signal, sys
sys.path.insert(0, %r)
import ota_promoter
operation, at = sys.argv[1], int(sys.argv[2])
real, calls = getattr(os, operation), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, operation, dying)
sys.exit(ota_promoter.main(sys.argv[3:]))
""" % ROOT


def assert_served_consistently(site, old, new):
    """The version and manifest the site serves are old's or new's, and old's files
    and every file the served manifest lists are all there, byte for byte."""
    def body(path):
        with open(os.path.join(str(site), *path.split("/")), "rb") as f:
            return f.read()

    versions = {v.id: v for v in (old, new)}
    version = json.loads(body("files/version"))["version"]
    manifest = body("files/manifest.txt")
    listed = versions[manifest.split(b"\n", 1)[0].decode()]
    assert manifest == listed.files_text
    assert body("files.json") in (old.files_json, new.files_json)
    assert version == old.id or listed.id == new.id  # the version never runs ahead of its files
    # The version named has its own manifest in place, whatever manifest.txt holds.
    assert body("files/" + version) == versions[version].files_text
    for blob in old.blobs + listed.blobs + versions[version].blobs:
        assert checksum(body("files/" + blob.checksum), blob.path) == blob.checksum


@pytest.mark.slow
def test_export_killed_at_any_write_leaves_the_previous_version_served(app, site, tmp_path):
    old = exported(app, site)[0].current
    pristine = tmp_path / "pristine"
    shutil.copytree(str(site), str(pristine))
    write(app, "main.py", "import lib.x\nprint(2)\n")
    write(app, "lib/y.py", "Y = 2\n")
    os.remove(os.path.join(str(app), "README.txt"))
    new = Promoter(str(app), interval=3600).current
    kills = 0
    for operation in ("fsync", "replace"):
        for at in range(1, 100):
            shutil.rmtree(str(site))
            shutil.copytree(str(pristine), str(site))
            result = subprocess.run(
                [sys.executable, "-c", _DYING, operation, str(at), str(app), "--export", str(site)],
                capture_output=True, text=True, timeout=TIMEOUT,
            )
            if result.returncode == 0:
                break  # the export did fewer such calls: it finished
            assert result.returncode == -signal.SIGKILL, result.stderr
            kills += 1
            assert_served_consistently(site, old, new)
            # The next export completes it and removes what the killed one left.
            _, (written, kept, pruned) = exported(app, site)
            assert [p for p in listing(site) if ".ota-tmp-" in p] == []
            assert json.loads((site / "files" / "version").read_bytes())["version"] == new.id
            assert_served_consistently(site, new, new)
            assert_served_consistently(site, old, new)  # and the old files are kept
    # Two new files and four site files: at least one kill per data fsync and rename.
    assert kills >= 2 * (2 + 4)


# -- The command line -------------------------------------------------------------------------


@pytest.mark.slow
def test_each_version_exported_has_its_manifest_under_its_own_name(app, site):
    first = exported(app, site)[0].current
    write(app, "main.py", "print(2)\n")
    second = exported(app, site, keep=2)[0].current
    files = site / "files"
    assert (files / first.id).read_bytes() == first.files_text  # immutable, as nginx caches it
    assert (files / second.id).read_bytes() == (files / "manifest.txt").read_bytes() == second.files_text
    write(app, "main.py", "print(3)\n")
    exported(app, site, keep=2)
    assert not (files / first.id).exists()  # pruned with its files


# -- What the export may touch -------------------------------------------------------------------


@pytest.mark.parametrize("inside", slow_except(["site", "", "lib/site", "link", "link/.."], "site", ""))
def test_an_export_into_the_promoted_folder_is_refused(app, inside):
    if inside.startswith("link"):
        try:
            os.symlink(str(app / "lib"), str(app.parent / "link"))
        except (OSError, NotImplementedError):
            pytest.skip("this user cannot make symlinks")
        # link/.. is DIR, as the system resolves it: the link first, then ..
        site = os.path.join(str(app.parent), inside, "site")
    else:
        site = os.path.join(str(app), inside) if inside else str(app)
    before = listing(app)
    assert_user_error(run(str(app), "--export", site),
                      "cannot export to %r: it is inside the promoted folder %r, which would then publish "
                      "the export itself: export to a folder outside it" % (site, str(app)))
    assert listing(app) == before


@pytest.mark.slow
def test_an_export_to_a_folder_that_holds_the_promoted_folder_is_refused(tmp_path):
    app = tmp_path / "site" / "files"  # where the export would write its files
    write(app, "main.py", "print(1)\n")
    before = listing(tmp_path)
    assert_user_error(run(str(app), "--export", str(tmp_path / "site")),
                      "cannot export to %r: it holds the promoted folder %r, where the export could write: "
                      "export to a folder apart from it" % (str(tmp_path / "site"), str(app)))
    assert listing(tmp_path) == before


@pytest.mark.slow
def test_a_first_export_into_a_folder_of_other_files_is_refused_and_touches_nothing(app, site):
    write(site, "files/" + "ab" * 20, "someone's file named like a checksum")
    write(site, "files/version", "someone's version")
    write(site, ".ota-tmp-notes", "someone's notes")
    write(site, "index.html", "<p>a web site</p>")
    make_old(site)
    before = listing(site)
    result = run(str(app), "--export", str(site))
    assert_user_error(result, "%r holds files no export wrote (.ota-tmp-notes, files/%s, files/version) and no "
                              ".ota-export record: export to a new or empty folder" % (str(site), "ab" * 20))
    assert listing(site) == before


@pytest.mark.slow
def test_an_export_removes_only_what_an_export_wrote(app, site):
    exported(app, site)
    foreign = {"files/" + "cd" * 20: b"named like a checksum", ".ota-tmp-notes": b"notes",
               "files/.ota-tmp-x": b"x", "files/notes.txt": b"n", "index.html": b"<p>"}
    for path, data in foreign.items():
        write(site, path, data)
    for n in range(4):
        write(app, "main.py", "print(%d)\n" % n)
        exported(app, site, keep=1)
    for path, data in foreign.items():
        assert (site / path).read_bytes() == data
    promoter = Promoter(str(app))
    assert content_files(site) == sorted([b.checksum for b in promoter.current.blobs] + ["cd" * 20])
    assert (site / "files" / promoter.version).read_bytes() == promoter.current.files_text


@pytest.mark.slow
def test_an_export_killed_before_it_published_has_its_files_removed_by_the_next(app, site, tmp_path):
    exported(app, site)
    write(app, "lib/big.bin", os.urandom(5000))
    killed = Promoter(str(app)).current
    # Killed at its 4th rename (the record, lib/big.bin, its manifest, manifest.txt):
    # its record and files are written, nothing of it is published.
    result = subprocess.run([sys.executable, "-c", _DYING, "replace", "4",
                             str(app), "--export", str(site)], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == -signal.SIGKILL, result.stderr
    big = [b.checksum for b in killed.blobs if b.path == "lib/big.bin"][0]
    assert (site / "files" / big).exists()
    os.remove(str(app / "lib" / "big.bin"))
    exported(app, site, keep=1)
    assert not (site / "files" / big).exists()
    assert not (site / "files" / killed.id).exists()


# -- Files being written while the export or the server starts -------------------------------


def half_written(tree, path, pause=0.1):
    """Write tree/path in two halves with a pause between them, in a thread; returns
    (the whole bytes, the thread) once the first half is on disk."""
    import threading

    data = b"# the first half\n" + b"x = 1\n" * 500 + b"# the second half\n"
    ready = threading.Event()

    def writer():
        with open(os.path.join(str(tree), path), "wb") as f:
            f.write(data[:len(data) // 2])
            f.flush()
            ready.set()
            time.sleep(pause)
            f.write(data[len(data) // 2:])

    thread = threading.Thread(target=writer)
    thread.start()
    assert ready.wait(TIMEOUT)
    return data, thread


def test_the_export_waits_for_a_file_being_written(app, site):
    data, writer = half_written(app, "lib/x.py")
    try:
        promoter, _ = exported(app, site)
    finally:
        writer.join(TIMEOUT)
    blob = promoter.current.by_path["lib/x.py"]
    assert (site / "files" / blob.checksum).read_bytes() == data


def test_the_first_version_of_a_server_waits_for_a_file_being_written(app):
    data, writer = half_written(app, "boot.py")
    try:
        promoter = Promoter(str(app), interval=3600)
    finally:
        writer.join(TIMEOUT)
    assert promoter.read(promoter.current.by_path["boot.py"]) == data


@pytest.mark.slow
def test_an_export_of_a_file_that_never_settles_is_refused(app, site, monkeypatch):
    monkeypatch.setattr(Promoter, "MAX_HOLD", 0.5)
    import threading

    stop = threading.Event()

    def writer():
        with open(str(app / "main.py"), "wb") as f:
            while not stop.wait(0.01):
                f.write(b"# still writing\n")
                f.flush()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        promoter = Promoter(str(app), interval=3600)
    finally:
        stop.set()
        thread.join(TIMEOUT)
    assert promoter.changing == ["main.py"]
    with pytest.raises(ota_promoter.PromoterError) as caught:
        ota_promoter._export_once(promoter, build_args(site), time.monotonic())
    assert str(caught.value) == "not exported: main.py kept changing for 0.5 s: export again once it is saved"
    assert not os.path.exists(str(site))


def build_args(site):
    return ota_promoter.build_parser().parse_args([".", "--export", str(site)])  # DIR: the promoter's, given apart


@pytest.mark.slow
def test_export_prints_one_summary_line(app, site):
    result = run(str(app), "--export", str(site))
    assert (result.returncode, result.stdout) == (0, "")
    match = SUMMARY.fullmatch(result.stderr)
    assert match is not None, result.stderr
    version = Promoter(str(app)).version
    assert match.groups() == (version[:7], str(site), "4", "0", "0")
    result = run(str(app), "--export", str(site))
    assert SUMMARY.fullmatch(result.stderr).groups()[2:] == ("0", "4", "0")
    assert run(str(app), "--export", str(site), "-q").stderr == ""


@pytest.mark.slow
def test_export_with_a_token_warns_that_the_host_must_check_it(app, site):
    result = run(str(app), "--export", str(site), "--token", "abc")
    assert result.returncode == 0
    assert result.stderr.splitlines()[1][9:] == (
        "warning: --token does not protect an export: the web server must check it (README: Fleets)")


@pytest.mark.slow
def test_export_errors_are_one_line(app, site, tmp_path):
    missing = str(tmp_path / "nothing")
    assert_user_error(run(missing, "--export", str(site)), "folder %r does not exist" % missing)
    a_file = write(tmp_path, "site.txt", "x")
    assert_user_error(run(str(app), "--export", a_file),
                      "%r is a file, not a folder: give the folder to export to" % a_file)
    write(site, "files", "not a folder")
    assert_user_error(run(str(app), "--export", str(site)),
                      "cannot export to %r: File exists (%r)" % (str(site), str(site / "files")))
    assert_user_error(run(str(app), "--keep", "2"), "--keep goes with --export (see --help)")
    result = run(str(app), "--export", str(site), "--keep", "0")
    assert result.stderr == "ota_promoter.py: error: argument --keep: invalid count value: '0' (see --help)\n"


@pytest.mark.slow
def test_a_py_that_does_not_compile_stops_the_export_unless_no_check(app, site):
    write(app, "boot.py", "import ota\nif True\n")
    result = run(str(app), "--export", str(site), "-q")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "ota_promoter.py: error: not exported: boot.py does not compile: fix it, or pass --no-check")
    assert not os.path.exists(str(site))  # nothing written
    result = run(str(app), "--export", str(site), "--no-check", "-q")
    assert (result.returncode, result.stderr) == (0, "")
    with open(os.path.join(str(site), "files", "manifest.txt"), "rb") as f:
        assert b" boot.py\n" in f.read()


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="Windows folders cannot be made read-only with chmod")
def test_export_to_a_site_that_cannot_be_written(app, tmp_path):
    if os.geteuid() != 0:
        site = str(tmp_path / "site")
        os.makedirs(site)
        os.chmod(site, 0o555)
        error = "Permission denied"
    else:  # root writes through permissions, but not into sysfs
        site = "/sys/kernel"
        error = "Operation not permitted"
    before = os.listdir(site)
    assert_user_error(run(str(app), "--export", site),
                      "cannot export to %r: %s (%r)" % (site, error, os.path.join(site, "files")))
    assert os.listdir(site) == before


@pytest.mark.slow
def test_a_second_export_at_once_is_refused(app, site):
    os.makedirs(str(site))
    fd = os.open(str(site), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert_user_error(run(str(app), "--export", str(site)), "another export to %r is running" % str(site))
    finally:
        os.close(fd)
    assert run(str(app), "--export", str(site)).returncode == 0


# -- Real static hosts ------------------------------------------------------------------------


def test_nginx_serves_a_first_install(app, site, nginx, serve):
    promoter, _ = exported(app, site)
    server = serve(promoter)
    host = nginx(site)
    version, files = board_update(host.url)
    assert version == promoter.version
    assert files == {p: open(os.path.join(str(app), p), "rb").read()
                     for p in ("README.txt", "main.py", "lib/x.py", "lib/data.bin")}
    for path in ("/files/version", "/files/manifest.txt", "/files"):
        assert get(host.url, path).body == request(server.url, path).body
    r = get(host.url, "/files")
    assert (r.headers["Content-Type"], r.headers["Cache-Control"]) == ("application/json", "no-cache")
    assert get(host.url, "/files/version").headers["Content-Type"] == "application/json"
    assert get(host.url, "/files/manifest.txt").headers["Content-Type"] == "text/plain; charset=utf-8"
    blob = promoter.current.by_path["main.py"]
    assert get(host.url, "/files/" + blob.checksum).headers["Cache-Control"] == (
        "public, max-age=31536000, immutable")
    # The record and files.json are not served under their own names.
    assert [get(host.url, p).status for p in ("/.ota-export", "/files.json")] == [404, 404]
    # A long-poll is answered at once: nginx ignores the query.
    assert get(host.url, "/files/version?wait=30").json() == {"version": promoter.version}


def test_nginx_serves_an_update_and_keeps_the_previous_files(app, site, nginx):
    first, _ = exported(app, site)
    host = nginx(site)
    assert board_update(host.url)[0] == first.version
    write(app, "main.py", "import lib.x\nprint(2)\n")
    write(app, "lib/y.py", "Y = 2\n")
    second, counts = exported(app, site)
    assert counts == (2, 3, 0)
    version, files = board_update(host.url)
    assert version == second.version
    assert files["lib/y.py"] == b"Y = 2\n"
    for blob in first.current.blobs:
        assert get(host.url, "/files/" + blob.checksum).body == first.read(blob)


@pytest.mark.slow
def test_a_board_mid_update_finishes_while_a_third_export_lands(app, site, nginx):
    exported(app, site)
    write(app, "main.py", "print(2)\n")
    second, _ = exported(app, site)
    host = nginx(site)
    manifest = read_manifest(host.url)  # the board read the manifest of the second version
    assert manifest[0] == second.version
    write(app, "main.py", "print(3)\n")
    os.remove(os.path.join(str(app), "lib", "data.bin"))
    third, _ = exported(app, site)
    files = fetch_files(host.url, manifest)  # ... and then downloads its files
    assert sorted(files) == sorted(b.path for b in second.current.blobs)
    assert files["main.py"] == b"print(2)\n"
    assert get(host.url, "/files/version").json() == {"version": third.version}


def test_nginx_checks_the_token_as_documented(app, site, nginx):
    exported(app, site)
    host = nginx(site, token="s3cret")
    assert get(host.url, "/files/version").status == 401
    assert get(host.url, "/files/version", headers={"Authorization": "Bearer wrong"}).status == 401
    r = get(host.url, "/files/version", headers={"Authorization": "Bearer s3cret"})
    assert r.status == 200


@pytest.mark.slow
def test_nginx_serves_the_export_over_verified_https(app, site, nginx, certificate):
    promoter, _ = exported(app, site)
    host = nginx(site, certificate=certificate)
    assert host.url.startswith("https://")
    context = ssl.create_default_context(cafile=certificate[0])
    version, files = board_update(host.url, context)
    assert version == promoter.version
    assert sorted(files) == sorted(b.path for b in promoter.current.blobs)
    assert get(host.url, "/files", context).body == promoter.current.files_json
    # Verification is on: without the certificate as a CA, the connection is refused.
    with pytest.raises(ssl.SSLCertVerificationError):
        get(host.url, "/files/version", ssl.create_default_context())


def test_python_http_server_serves_the_export(app, site, http_server):
    promoter, _ = exported(app, site)
    url = http_server(site)
    version, files = board_update(url)
    assert version == promoter.version
    assert sorted(files) == sorted(b.path for b in promoter.current.blobs)
    assert get(url, "/files").status == 301  # a folder: /files needs a rule such as nginx's
