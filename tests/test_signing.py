"""Signed releases (--key): the server and the export sign each text manifest, and
a board holding the key (.ota-key) installs only what the key signed, never an
older release, and keeps every byte of its files when it refuses one."""

import hashlib
import hmac
import json
import os
import shutil
import socket
import types

import pytest

import ota
import ota_http
import ota_plan
import ota_promoter
from helpers import (
    KEY, CPythonBoard, assert_user_error, checksum, files, give_key, promoted, publish, request, run, slow_except,
    write,
)
from ota_promoter import Promoter, export, sign_manifest, signed_fields

V1 = {"main.py": "print('v1')\n", "lib/x.py": "X = 1\n"}
V2 = {"main.py": "print('v2')\n", "lib/y.py": "Y = 2\n"}


def head(manifest):
    """The first line of a text manifest (bytes), without its end."""
    return manifest.split(b"\n", 1)[0]


# -- The format: what signs what -------------------------------------------------------------


@pytest.mark.parametrize("key", [KEY, b"k" * 16, b"long key " * 20], ids=["64 bytes", "16 bytes", "180 bytes"])
def test_the_signature_is_the_hmac_of_the_header_and_every_line_and_the_board_computes_the_same(key):
    text = b"%s\n%s 4 main.py\n" % (b"a" * 40, b"b" * 40)
    signed = sign_manifest(key, text, 1764000000, 10)
    first, rest = signed.split(b"\n", 1)
    assert rest == text.split(b"\n", 1)[1]
    version, release, rollout, signature = first.split(b" ")
    assert (version, release, rollout) == (b"a" * 40, b"1764000000", b"10")
    message = b"%s 1764000000 10\n%s 4 main.py\n" % (b"a" * 40, b"b" * 40)
    assert signature == hmac.new(key, message, hashlib.sha256).hexdigest().encode()
    assert signed_fields(first) == (1764000000, 10)
    assert signed_fields(b"a" * 40) is None


@pytest.mark.slow
@pytest.mark.parametrize("key", [KEY, b"k" * 16, b"long-key-" * 20], ids=["64 bytes", "16 bytes", "180 bytes"])
def test_the_board_computes_the_same_hmac_through_its_small_buffer(key, tmp_path):
    lines = b"".join(b"%s %d lib/module_%03d.py\n" % (b"b" * 40, i, i) for i in range(30))  # 2 KB: 4 reads
    write(tmp_path, ".ota-new/state", sign_manifest(key, b"a" * 40 + b"\n" + lines, 1764000000))
    write(tmp_path, ".ota-key", b"\t" + key + b" \r\n")
    assert ota_plan._signed(str(tmp_path), "", bytearray(512)) is None
    write(tmp_path, ".ota-key", key[:-1] + b"!")
    with pytest.raises(ota.OTAError, match="^bad signature on the manifest of aaaaaaa$"):
        ota_plan._signed(str(tmp_path), "", bytearray(512))
    # The board's HMAC, a few lines without the hmac module, as it streams.


def test_without_a_key_the_manifests_are_as_they_were(tree):
    write(tree, "main.py", "print(1)\n")
    version = Promoter(str(tree), interval=3600).current
    assert version.files_text == b"%s\n%s 9 main.py\n" % (
        version.id.encode(), checksum("print(1)\n", "main.py").encode())
    assert version.text_etag == '"%s-text"' % version.id and version.release is None


# -- From the server -------------------------------------------------------------------------


class Recorded:
    """The client's socket module, recording every byte a board sends."""

    def __init__(self):
        self.sent = []
        self.getaddrinfo = socket.getaddrinfo
        self.AF_INET, self.AF_INET6 = socket.AF_INET, socket.AF_INET6
        recorded = self

        class Socket(socket.socket):
            def sendall(self, data, *args):
                recorded.sent.append(bytes(data))
                return super().sendall(data, *args)

        self.socket = Socket


def test_a_board_with_the_key_installs_what_the_server_signs_and_the_key_never_travels(
        tree, serve, tmp_path, monkeypatch):
    publish_to = Promoter(str(tree), interval=3600, key=KEY)
    server = serve(publish_to)
    publish(publish_to, tree, V1)
    v1 = publish_to.current
    # Every text manifest the API serves is the signed one; /files (JSON) is as it was.
    signed = request(server.url, "/files/manifest.txt").body
    assert signed_fields(head(signed)) == (v1.release, 100)
    assert head(signed)[:40] == v1.id.encode()
    for path in ("/files?format=text", "/files/" + v1.id):
        answer = request(server.url, path)
        assert answer.body == signed and answer.headers["ETag"] == '"%s-%d-text"' % (v1.id, v1.release)
    assert request(server.url, "/files").json()["version"] == v1.id
    recorded = Recorded()
    monkeypatch.setattr(ota_http, "socket", recorded)
    keyed, keyless = CPythonBoard(tmp_path / "keyed"), CPythonBoard(tmp_path / "keyless")
    give_key(keyed.root)
    write(keyed.root, "secrets.py", "mine")
    assert keyed.update(server.url) is True and keyless.update(server.url) is True
    # .ota's first line is the signed header: what the board runs, and its release.
    assert head(files(keyed.root)[".ota"]) == head(signed) == head(files(keyless.root)[".ota"])
    publish(publish_to, tree, dict(V2, **{"lib/x.py": None}))
    v2 = publish_to.current
    assert v2.release > v1.release
    assert keyed.update(server.url) is True and keyless.update(server.url) is True
    for board in (keyed, keyless):
        mine = {"secrets.py": b"mine"} if board is keyed else {}
        assert files(board.root, own=False) == dict(promoted(tree), **mine)
        assert signed_fields(head(files(board.root)[".ota"])) == (v2.release, 100)
    assert keyed.update(server.url) is False
    # A board holding another key refuses; the key is in no request, page or answer.
    other = CPythonBoard(tmp_path / "other")
    give_key(other.root, b"another fleet's key")
    with pytest.raises(ota.OTAError, match="^bad signature on the manifest of %s$" % v2.id[:7]):
        other.update(server.url)
    assert files(other.root) == {".ota-key": b"another fleet's key\n"}
    assert len(recorded.sent) > 10
    for sent in recorded.sent:
        assert KEY[:16] not in sent
    for path in ("/", "/boards", "/files", "/files/version"):
        assert KEY[:16] not in request(server.url, path).body
    # A signing server's version exported with the key: signed once, by the export.
    export(publish_to, str(tmp_path / "site"), key=KEY)
    with open(str(tmp_path / "site" / "files" / "manifest.txt"), "rb") as f:
        exported = f.read()
    assert exported.split(b"\n", 1)[1] == v2.files_text.split(b"\n", 1)[1]
    assert signed_fields(head(exported))[1] == 100


@pytest.mark.slow
def test_a_board_with_a_key_refuses_an_unsigned_server_and_an_empty_key(tree, serve, tmp_path):
    write(tree, "main.py", "print(1)\n")
    promoter = Promoter(str(tree), interval=3600)
    server = serve(promoter)
    board = CPythonBoard(tmp_path / "device")
    give_key(board.root)
    with pytest.raises(ota.OTAError, match="^unsigned release %s: this board has a key and takes only signed "
                                           "releases$" % promoter.version[:7]):
        board.update(server.url)
    write(board.root, ".ota-key", " \n")
    with pytest.raises(ota.OTAError, match="^%s/.ota-key: the key file is empty or cannot be read: copy the fleet's "
                                           r"key there \(mpremote cp ota.key :.ota-key\)$" % board.root):
        board.update(server.url)
    assert files(board.root) == {".ota-key": b" \n"}
    os.remove(os.path.join(str(board.root), ".ota-key"))
    assert board.update(server.url) is True  # no key: unsigned releases, as before


@pytest.mark.slow
def test_the_server_process_never_logs_the_key(tree, key_file, running, tmp_path):
    write(tree, "main.py", "print(1)\n")
    server = running(str(tree), "--key", key_file, "--port", "0", "--host", "127.0.0.1", "--no-discovery", "-v")
    lines, urls = server.banner()
    board = CPythonBoard(tmp_path / "device")
    give_key(board.root)
    assert board.update(urls[0]) is True
    assert signed_fields(head(files(board.root)[".ota"]))[1] == 100
    status, rest = server.stop()
    assert status == 0
    assert any("main.py" in line for line in rest)  # the download, logged
    for line in lines + rest:
        assert KEY[:16].decode() not in line and "ota.key" not in line


# -- From hostile sites: each refusal leaves the board's every byte ------------------------------


def unsigned(promoter):
    return promoter.current.unsigned_text()


def flip(data, at):
    """data with the byte at `at` changed to another of the same kind (a digit, a hex digit, a letter)."""
    old = data[at:at + 1]
    new = b"1" if old == b"0" else b"0" if old.isdigit() else b"b" if old == b"a" else b"a" if old in b"bcdef" else \
        b"x" if old != b"x" else b"y"
    return data[:at] + new + data[at + 1:]


def edit(path, change):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(change(data))


@pytest.fixture
def signed_site(tree, tmp_path, static_host):
    """A site exported with the key, served, and a board with the key that installed
    V1 from it; the site then exports V2. A namespace: site, url, board, v1 and v2
    (their ids), releases (of each), a copy of the site as it was with V1, promoter."""
    site = tmp_path / "site"
    publish_to = Promoter(str(tree), interval=3600)
    publish(publish_to, tree, V1)
    export(publish_to, str(site), key=KEY)
    v1 = publish_to.version
    old_site = tmp_path / "site-v1"
    shutil.copytree(str(site), str(old_site))
    url = static_host(site).url
    board = CPythonBoard(tmp_path / "device")
    give_key(board.root)
    write(board.root, "secrets.py", "mine")
    assert board.update(url) is True
    publish(publish_to, tree, dict(V2, **{"lib/x.py": None}))
    export(publish_to, str(site), key=KEY)
    manifest = str(site / "files" / publish_to.version)
    releases = [signed_fields(head(open(str(p / "files" / v), "rb").read()))[0]
                for p, v in ((old_site, v1), (site, publish_to.version))]
    assert releases[1] > releases[0]
    return types.SimpleNamespace(site=site, url=url, board=board, v1=v1, v2=publish_to.version, manifest=manifest,
                                 releases=releases, old_site=old_site, promoter=publish_to)


def without_signature(s):
    with open(s.manifest, "wb") as f:
        f.write(unsigned(s.promoter))


def another_key(s):
    with open(s.manifest, "wb") as f:
        f.write(sign_manifest(b"another fleet's key", unsigned(s.promoter), s.releases[1]))


def flipped_in_the_header(s):
    edit(s.manifest, lambda data: flip(data, 41))  # the release number's first digit


def flipped_in_the_rollout(s):
    edit(s.manifest, lambda data: data.replace(b" 100 ", b" 10 ", 1))


def flipped_in_the_version(s):
    edit(s.manifest, lambda data: flip(data, 0))


def flipped_in_a_file_line(s):
    edit(s.manifest, lambda data: data.replace(b"main.py", b"maim.py"))


def flipped_in_a_size(s):
    edit(s.manifest, lambda data: data.replace(b" 12 main.py", b" 13 main.py"))


def flipped_in_the_signature(s):
    edit(s.manifest, lambda data: flip(data, data.index(b"\n") - 1))


def a_line_added(s):
    edit(s.manifest, lambda data: data + b"%s 1 zzz.py\n" % checksum("z", "zzz.py").encode())


def a_line_removed(s):
    edit(s.manifest, lambda data: data[:data.rindex(b"\n", 0, len(data) - 1) + 1])


def a_byte_flipped_in_a_file(s):
    edit(str(s.site / "files" / checksum("print('v2')\n", "main.py")), lambda data: flip(data, 7))


BAD = "^bad signature on the manifest of {v2}$"
TAMPERED = [
    (without_signature, "^unsigned release {v2}: this board has a key and takes only signed releases$"),
    (another_key, BAD), (flipped_in_the_header, BAD), (flipped_in_the_rollout, BAD),
    (flipped_in_the_version, "^127.0.0.1:[0-9]+: /files/{v2_40} is not the manifest of that version$"),
    (flipped_in_a_file_line, BAD), (flipped_in_a_size, BAD), (flipped_in_the_signature, BAD), (a_line_added, BAD),
    (a_line_removed, BAD), (a_byte_flipped_in_a_file, "^main.py: checksum mismatch, damaged in transfer$"),
]


@pytest.mark.parametrize("tamper, message", slow_except(TAMPERED, *[case for case in TAMPERED if case[0] in (
    without_signature, flipped_in_a_file_line, a_byte_flipped_in_a_file)]), ids=[t.__name__ for t, _ in TAMPERED])
def test_a_manifest_or_a_file_changed_in_any_byte_is_refused_and_the_board_keeps_every_byte(
        signed_site, tamper, message):
    s = signed_site
    before = files(s.board.root)
    tamper(s)
    with pytest.raises(ota.OTAError, match=message.format(v2=s.v2[:7], v2_40=s.v2)):
        s.board.update(s.url)
    assert files(s.board.root) == before  # .ota, .ota-key and secrets.py included
    assert sorted(os.listdir(str(s.board.root))) == [".ota", ".ota-key", "lib", "main.py", "secrets.py"]


def test_a_replayed_older_release_is_a_downgrade_and_refused(signed_site):
    s = signed_site
    assert s.board.update(s.url) is True  # V2, of the later release
    before = files(s.board.root)
    shutil.rmtree(str(s.site))
    shutil.copytree(str(s.old_site), str(s.site))  # the site as it was: V1's signed manifest, replayed
    with pytest.raises(ota.OTAError, match="^release %d of %s is older than release %d, which this board runs: "
                                           "no downgrade$" % (s.releases[0], s.v1[:7], s.releases[1])):
        s.board.update(s.url)
    assert files(s.board.root) == before
    keyless = CPythonBoard(s.board.root.parent / "keyless")  # a board without a key does no release check
    assert keyless.update(s.url) is True and head(files(keyless.root)[".ota"])[:40] == s.v1.encode()


@pytest.mark.slow
def test_the_same_release_number_on_another_version_is_refused(signed_site, tree):
    s = signed_site
    assert s.board.update(s.url) is True
    before = files(s.board.root)
    publish(s.promoter, tree, {"main.py": "print('v3')\n"})
    export(s.promoter, str(s.site), key=KEY)
    with open(str(s.site / "files" / s.promoter.version), "wb") as f:
        f.write(sign_manifest(KEY, unsigned(s.promoter), s.releases[1]))  # signed, with V2's number
    with pytest.raises(ota.OTAError, match="^release %d of %s is older than release %d, which this board runs: "
                                           "no downgrade$" % (s.releases[1], s.promoter.version[:7], s.releases[1])):
        s.board.update(s.url)
    assert files(s.board.root) == before
    export(s.promoter, str(s.site), key=KEY)  # exported again: its release number kept
    assert signed_fields(head(open(str(s.site / "files" / s.promoter.version), "rb").read()))[0] == s.releases[1]
    os.remove(str(s.site / "files" / s.promoter.version))
    export(s.promoter, str(s.site), key=KEY)  # a new number above every one the site has
    assert signed_fields(head(open(str(s.site / "files" / s.promoter.version), "rb").read()))[0] > s.releases[1]
    assert s.board.update(s.url) is True


@pytest.mark.slow
def test_an_older_version_exported_again_is_a_new_release_and_boards_that_moved_on_take_it(signed_site, tree):
    # Going back: the tree as it was at V1 (a bad V2 reverted, a staged V2 called off),
    # exported again. The boards on V2 must take it: a new release, above V2's.
    s = signed_site
    assert s.board.update(s.url) is True  # V2
    publish(s.promoter, tree, dict(V1, **{"lib/y.py": None}))
    assert s.promoter.version == s.v1
    export(s.promoter, str(s.site), key=KEY)
    assert signed_fields(head(open(str(s.site / "files" / s.v1), "rb").read()))[0] > s.releases[1]
    assert s.board.update(s.url) is True
    assert head(files(s.board.root)[".ota"])[:40] == s.v1.encode()
    assert files(s.board.root)["main.py"] == V1["main.py"].encode()


@pytest.mark.slow
@pytest.mark.parametrize("key", [None, KEY], ids=["unsigned", "signed"])
def test_the_files_of_a_signed_manifest_txt_an_export_was_killed_after_are_kept(tree, tmp_path, key):
    # An export killed before its last rename (files/version) has published through
    # manifest.txt already: its files are the site's, signed or not, and a staged
    # export, which leaves manifest.txt as it is, keeps them.
    site = tmp_path / "site"
    publish_to = Promoter(str(tree), interval=3600)
    publish(publish_to, tree, V1)
    export(publish_to, str(site), key=key)
    served = (site / "files" / "version").read_bytes()
    publish(publish_to, tree, V2)
    export(publish_to, str(site), key=key)
    v2 = publish_to.version
    write(site, "files/version", served)  # as if killed before it named V2
    publish(publish_to, tree, {"main.py": "print('v3')\n"})
    export(publish_to, str(site), key=key, rollout=10)
    listed = (site / "files" / "manifest.txt").read_bytes().splitlines()
    assert listed[0][:40] == v2.encode()  # a staged export leaves it
    assert [line[:40] for line in listed[1:] if not (site / "files" / line[:40].decode()).exists()] == []


@pytest.mark.slow
def test_an_export_takes_no_release_number_from_a_manifest_the_key_did_not_sign(signed_site, tree):
    # Whoever can write to the site can plant a manifest with a huge release number:
    # unchecked, the next export would sign a release above it (16 digits at the
    # top), after which every later export would be refused as a downgrade.
    s = signed_site
    forged = b"%s 999999999999999 100 %s\n" % (s.v1.encode(), b"0" * 64)
    edit(str(s.site / "files" / s.v1), lambda data: forged + data.split(b"\n", 1)[1])
    publish(s.promoter, tree, {"main.py": "print('v3')\n"})
    export(s.promoter, str(s.site), key=KEY)
    release = signed_fields(head(open(str(s.site / "files" / s.promoter.version), "rb").read()))[0]
    assert s.releases[1] < release < 10 ** 11
    assert s.board.update(s.url) is True


@pytest.mark.slow
def test_an_unsigned_export_is_as_it_was_and_installs_on_a_board_without_a_key(tree, tmp_path, static_host):
    publish_to = Promoter(str(tree), interval=3600)
    publish(publish_to, tree, V1)
    export(publish_to, str(tmp_path / "site"))
    assert open(str(tmp_path / "site" / "files" / "manifest.txt"), "rb").read() == publish_to.current.files_text
    assert json.loads(open(str(tmp_path / "site" / "files" / "version")).read()) == {"version": publish_to.version}
    board = CPythonBoard(tmp_path / "device")
    assert board.update(static_host(tmp_path / "site").url) is True
    assert files(board.root, own=False) == promoted(tree)


# -- --key: its mistakes --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("what", ["missing", "short", "folder"])
def test_a_bad_key_file_is_one_line_and_status_2(tree, tmp_path, what):
    path = str(tmp_path / "ota.key")
    if what == "short":
        write(tmp_path, "ota.key", b" 0123456789abcde\n")  # 15 bytes once stripped
    elif what == "folder":
        os.mkdir(path)
    result = run(str(tree), "--export", str(tmp_path / "site"), "--key", path)
    assert_user_error(result, {
        "missing": "cannot read the key file %r: No such file or directory" % path,
        "short": "the key file %r holds 15 bytes: a key has at least 16; make one with python3 -c "
                 "\"import secrets; print(secrets.token_hex(32))\" > %s" % (path, path),
        "folder": "the key file %r is a folder: give the file that holds the key" % path,
    }[what])
    assert not os.path.exists(str(tmp_path / "site"))


@pytest.mark.slow
def test_rollout_needs_export_and_a_percent(tree):
    assert_user_error(run(str(tree), "--rollout", "10"), "--rollout goes with --export (see --help)")
    result = run(str(tree), "--export", "site", "--rollout", "0")
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "ota_promoter.py: error: argument --rollout: invalid percent value: '0' (see --help)"]
    assert ota_promoter.MIN_KEY == 16
