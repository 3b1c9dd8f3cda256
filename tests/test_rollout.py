"""Staged rollout (--export SITE --rollout P): P percent of the boards, chosen by a
hash of their id and the release, take the new release; the others stay on the one
the site serves to all, and a board in at 10 stays in at 50. Shown with 100 board
ids against nginx, each running the real client."""

import binascii
import json
import os
import re

import pytest

import ota
import ota_check
import ota_promoter
from helpers import KEY, TIMEOUT, CPythonBoard, assert_user_error, files, give_key, publish, run, write
from ota_promoter import Promoter, rollout_bucket, signed_fields

V1 = {"main.py": "print('v1')\n", "lib/x.py": "X = 1\n"}
V2 = {"main.py": "print('v2')\n", "lib/x.py": "X = 2\n"}
SUMMARY = re.compile(r"^\d\d:\d\d:\d\d exported version ([0-9a-f]{7}), signed release (\d+), to (.+), rolled out to "
                     r"(\d+)% \(the other boards stay on ([0-9a-f]{7})\): \d+ written, \d+ kept, \d+ pruned, "
                     r"in \d+\.\d\d s$")


def export(tree, site, key_file, *options):
    """ota_promoter.py DIR --export SITE --key FILE [options], as a user runs it; its log lines."""
    result = run(str(tree), "--export", str(site), "--key", key_file, "-q" if not options else "-v", *options)
    assert result.returncode == 0, result.stderr
    assert KEY[:16].decode() not in result.stderr + result.stdout
    return result.stderr.splitlines()


def unique_id(i):
    return bytes([0xA4, 0xCF, 0x12, 0, 0, i])


def running(board):
    """The version a board runs: its .ota's first 40 characters."""
    return files(board)[".ota"][:40].decode()


def test_the_board_and_the_server_compute_the_same_buckets(board_id, tmp_path, static_host):
    old, new = "1a2b3c4" + "0" * 33, "5d6e7f8" + "0" * 33
    write(tmp_path, "files/version", json.dumps({"version": old, "next": new, "rollout": 10}))
    url = static_host(tmp_path).url
    buckets = []
    for i in range(100):
        board_id(unique_id(i))
        buckets.append(rollout_bucket(binascii.hexlify(unique_id(i)).decode(), new))
        named = ota_check.version((url, None, TIMEOUT, "", None, bytearray(512)))
        assert named == (new if buckets[-1] < 10 else old), i
    assert 3 <= sum(b < 10 for b in buckets) <= 20  # a hash: about a tenth


@pytest.mark.slow
def test_rollout_on_a_site_that_serves_no_release_yet_or_of_the_release_it_serves(tree, tmp_path, key_file):
    write(tree, "main.py", "print(1)\n")
    site = str(tmp_path / "site")
    assert_user_error(run(str(tree), "--export", site, "--rollout", "10"), (
        "--rollout 10: %r serves no release to every board yet, for the others to stay on: export once "
        "without --rollout first" % site))
    assert not os.path.exists(os.path.join(site, "files", "version"))
    assert run(str(tree), "--export", site, "-q").returncode == 0
    result = run(str(tree), "--export", site, "--rollout", "10")
    assert_user_error(result, "--rollout 10: version %s is already the release %r serves to every board" % (
        json.load(open(os.path.join(site, "files", "version")))["version"][:7], site))


@pytest.mark.slow
def test_a_staged_rollout_to_100_boards_on_nginx_reaches_exactly_its_share(
        tree, tmp_path, key_file, nginx, board_id):
    site = tmp_path / "site"
    for path, data in V1.items():
        write(tree, path, data)
    export(tree, site, key_file)
    v1 = json.load(open(str(site / "files" / "version")))["version"]
    url = nginx(site).url
    boards = []
    for i in range(100):
        board = CPythonBoard(tmp_path / ("board%02d" % i))
        give_key(board.root)
        board_id(unique_id(i))
        assert board.update(url) is True
        boards.append(board.root)
    assert {running(b) for b in boards} == {v1}

    # V2 to 10%, the record keeping one version: V1's files stay while it is served.
    for path, data in V2.items():
        write(tree, path, data)
    summary = [m for m in map(SUMMARY.match, export(tree, site, key_file, "--rollout", "10", "--keep", "1")) if m]
    v2 = json.load(open(str(site / "files" / "version")))["next"]
    assert [m.groups() for m in summary] == [(v2[:7], summary[0].group(2), str(site), "10", v1[:7])]
    assert json.load(open(str(site / "files" / "version"))) == {"version": v1, "next": v2, "rollout": 10}
    assert open(str(site / "files" / "manifest.txt"), "rb").read()[:40].decode() == v1  # still V1 for all
    assert json.load(open(str(site / "files.json")))["version"] == v1
    release = signed_fields(open(str(site / "files" / v2), "rb").readline())
    assert release == (int(summary[0].group(2)), 10)
    bucket = [rollout_bucket(binascii.hexlify(unique_id(i)).decode(), v2) for i in range(100)]
    took = []
    for i, board in enumerate(boards):
        board_id(unique_id(i))
        took.append(ota.update(url, root=str(board), reset=False))
    assert took == [b < 10 for b in bucket]
    assert [running(b) for b in boards] == [v2 if b < 10 else v1 for b in bucket]
    fresh = CPythonBoard(tmp_path / "fresh")  # a new board outside the share gets V1 whole
    board_id(unique_id(bucket.index(max(bucket))))
    assert fresh.update(url) is True and running(fresh.root) == v1

    # Raised to 50%: re-signed, the same release number; every board in at 10 stays in.
    export(tree, site, key_file, "--rollout", "50")
    assert signed_fields(open(str(site / "files" / v2), "rb").readline()) == (release[0], 50)
    took = []
    for i, board in enumerate(boards):
        board_id(unique_id(i))
        took.append(ota.update(url, root=str(board), reset=False))
    assert took == [10 <= b < 50 for b in bucket]
    assert [running(b) for b in boards] == [v2 if b < 50 else v1 for b in bucket]

    # A site that names V2 to a board outside its signed share: refused with the key,
    # taken on the hint by a board without one.
    with open(str(site / "files" / "version"), "w") as f:
        json.dump({"version": v1, "next": v2, "rollout": 100}, f)
    out = bucket.index(max(bucket))
    board_id(unique_id(out))
    before = files(boards[out])
    with pytest.raises(ota.OTAError, match="^%s is rolled out to 50%% of boards, not to this one$" % v2[:7]):
        ota.update(url, root=str(boards[out]), reset=False)
    assert files(boards[out]) == before
    os.remove(os.path.join(str(boards[out]), ".ota-key"))
    assert ota.update(url, root=str(boards[out]), reset=False) is True and running(boards[out]) == v2

    # Exported for every board (no --rollout): V2 is the release all take.
    export(tree, site, key_file)
    assert json.load(open(str(site / "files" / "version"))) == {"version": v2}
    assert open(str(site / "files" / "manifest.txt"), "rb").read() == open(str(site / "files" / v2), "rb").read()
    assert signed_fields(open(str(site / "files" / v2), "rb").readline()) == (release[0], 100)
    for i, board in enumerate(boards):
        board_id(unique_id(i))
        ota.update(url, root=str(board), reset=False)
    assert {running(b) for b in boards} == {v2}

    # The key is in no file of the site.
    for path, data in files(site).items():
        assert KEY[:16] not in data, path


def test_the_board_takes_a_staged_release_by_its_bucket_under_cpython_and_micropython(
        tree, tmp_path, board, static_host):
    """Off a board (CPython, the unix port) the id is "unknown", as X-OTA-Device says."""
    site = str(tmp_path / "site")
    for path, data in V1.items():
        write(tree, path, data)
    promoter = Promoter(str(tree), interval=3600)
    ota_promoter.export(promoter, site, key=KEY)
    give_key(board.root)
    url = static_host(site).url
    assert board.update(url) is True
    v1 = running(board.root)
    publish(promoter, tree, V2)
    v2 = promoter.version
    share = rollout_bucket("unknown", v2)  # this board is out at that share, in one above it
    assert share >= 1
    ota_promoter.export(promoter, site, key=KEY, rollout=share)
    assert board.update(url) is False and running(board.root) == v1
    before = files(board.root)
    with open(os.path.join(site, "files", "version"), "w") as f:
        json.dump({"version": v1, "next": v2, "rollout": share + 1}, f)  # named to it, beyond the signed share
    with pytest.raises(ota.OTAError, match="^%s is rolled out to %d%% of boards, not to this one$" % (v2[:7], share)):
        board.update(url)
    assert files(board.root) == before
    ota_promoter.export(promoter, site, key=KEY, rollout=share + 1)
    manifest = os.path.join(site, "files", v2)
    with open(manifest, "rb") as f:
        signed = f.read()
    with open(manifest, "wb") as f:
        f.write(signed.replace(b" %d " % (share + 1), b" 100 ", 1))  # signed for a share, served for all
    with pytest.raises(ota.OTAError, match="^bad signature on the manifest of %s$" % v2[:7]):
        board.update(url)
    assert files(board.root) == before
    ota_promoter.export(promoter, site, key=KEY, rollout=share + 1)
    assert board.update(url) is True and running(board.root) == v2
