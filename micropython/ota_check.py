# ota_check.py: what the server has: the version it names (with a staged rollout,
# the one this board takes), and the manifest of that version, saved as
# .ota-new/state for ota_plan.py; with a key (.ota-key), its signature checked as
# it comes, its release number and its share of boards. ota_update.py imports it
# for those steps only, with ota_http.py.

import binascii
import hashlib
import json
import os

from ota import OTAError, const
from ota_http import Server, _device
from ota_update import STATE, hex40

_LINE = const(256)  # the longest version answer read
_EEXIST = const(17)
_HEAD = const(160)  # the longest first line of .ota read: a signed one has up to 126 bytes
_SIGNATURE = const(66)  # " <64 hex>\n": how a signed first line ends


def _bucket(version):
    # This board's bucket, 0 to 99, for a release: it takes the release if its
    # bucket is below the release's share (ota_promoter.rollout_bucket).
    digest = hashlib.sha256(("%s %s" % (_device(), version)).encode()).digest()
    return int.from_bytes(digest[:3], "big") % 100


def version(args, since=None, wait=0):
    """The version the server names; with wait, a long-poll that returns since if
    nothing changed in wait seconds. args: Server's. A site that stages a release
    ({"version", "next", "rollout": P}) names next to the boards whose bucket is below P."""
    server = Server(*args)
    status, length, _ = server.get(
        "/files/version?wait=%d" % wait if wait else "/files/version",
        'If-None-Match: "%s"\r\n' % since if since else "",
    )
    try:
        if status == 304:
            if since:
                return since
            raise OTAError("bad version answer from %s: 304 to a request without a version" % server.where)
        body = server.readline() if 0 < length <= _LINE else b""
        try:
            answer = json.loads(body)
            named = answer["version"]
            hex40(named)
            staged = answer.get("next")
            if staged:
                hex40(staged)
                if _bucket(staged) < int(answer["rollout"]):
                    named = staged
        except Exception as e:
            raise OTAError("bad version answer from %s: %r" % (server.where, e))
        return named
    finally:
        server.close()


def _key(root):
    # The key in .ota-key (its surrounding whitespace stripped), or None if there is
    # none: then unsigned releases are taken. One that cannot be read is refused,
    # never taken as none.
    path = root + "/.ota-key"
    try:
        os.stat(path)
    except OSError:
        return None
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError:
        key = b""
    if not key:
        raise OTAError("%s: the key file is empty or cannot be read: copy the fleet's key there "
                       "(mpremote cp ota.key :.ota-key)" % path)
    return key


def _inner(key, head):
    # HMAC-SHA256 (RFC 2104; MicroPython has no hmac module), begun: the inner hash,
    # fed the key padded to a block ^ 0x36 and head, and that block, the one buffer
    # _outer() reuses.
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    pad = bytearray(64)
    pad[: len(key)] = key
    for i in range(64):
        pad[i] ^= 0x36
    inner = hashlib.sha256(pad)
    inner.update(head)
    return inner, pad


def _outer(inner, pad):
    # The HMAC, as 64 hex bytes, of what the inner hash was fed.
    for i in range(64):
        pad[i] ^= 0x6A  # the key ^ 0x36 becomes the key ^ 0x5C
    outer = hashlib.sha256(pad)
    outer.update(inner.digest())
    return binascii.hexlify(outer.digest())


def _runs(root, old):
    # The release number (digits) the board runs: .ota's first line, if signed and
    # of old; None if unsigned (then every signed release is newer).
    path = root + "/" + STATE
    if not old:
        return None
    try:
        with open(path, "rb") as f:
            line = f.readline(_HEAD)
    except OSError:
        return None
    if line[:40] != old.encode() or line[40:41] != b" ":
        return None
    return line[41:].split(b" ", 1)[0].decode()


def manifest(args, named, root):
    """Saves the manifest of the version named as .ota-new/state; returns its
    version, or None, with nothing written, if it lists the installed one (the
    4th of args, Server's). If the server has no manifest by version (a server or
    an export older than that route: 404; the original server: 400; S3: 403),
    the newest, whatever version it lists. A board with a key takes it only signed
    with that key, of a release not older than the one it runs, and for its share."""
    old = args[3]
    key = _key(root)
    server = Server(*args)
    try:
        length = server.get("/files/" + named)[1]
    except OTAError:
        named = None
        length = server.get("/files/manifest.txt")[1]
    try:
        line = server.readline()
        if line[:1] == b"{":
            raise OTAError("%s has no text manifest: upgrade the server (the original ota-promoter has none)"
                           % server.where)
        signed = line[40:41] == b" "  # "<version> <release> <rollout> <signature>\n"
        if key and len(line) == 41:
            raise OTAError("unsigned release %s: this board has a key and takes only signed releases"
                           % line[:7].decode())
        if key and named and (not signed or line[:40] != named.encode()):
            raise OTAError("bad signature on the manifest of %s" % named[:7])  # its first line changed
        listed = (line[:40] if signed else line[:-1]).decode()
        hex40(listed)
        if named and listed != named:
            raise OTAError("%s: /files/%s is not the manifest of that version" % (server.where, named))
        if listed == old:
            return None
        listed = named or listed  # one string for the version, however often it is kept
        stage = root + "/.ota-new/"
        try:
            os.mkdir(stage[:-1])
        except OSError as e:
            if e.args[0] != _EEXIST:
                raise OTAError("cannot write to %s: %s" % (root or "/", e))
        mac = None
        if key:
            mac = _inner(key, line[:-_SIGNATURE] + b"\n")  # the first line without its signature
            key = None
        got = len(line)
        with open(stage + "state", "wb") as f:
            f.write(line)
            while got < length:
                chunk = server.chunk(length - got)
                if not chunk:
                    break
                f.write(chunk)
                if mac:
                    mac[0].update(chunk)
                got += len(chunk)
        if got != length:
            raise OTAError("manifest cut off after %d of %d bytes" % (got, length))
    finally:
        server.close()
    if mac:
        _check(line, listed, _outer(*mac), _runs(root, old))
    return listed


def _check(line, listed, signature, runs):
    # A signed manifest, whole: its signature, then its release against the one
    # the board runs (runs: digits, or None), then its share of the boards.
    v7 = listed[:7]
    if line[-_SIGNATURE:] != b" " + signature + b"\n":
        raise OTAError("bad signature on the manifest of %s" % v7)
    release, share = line[41:-_SIGNATURE].decode().split(" ")
    # Digit strings, compared without big ints: the longer is larger. An equal
    # release of another version is refused too: only one version has it.
    if runs and (len(release) < len(runs) or len(release) == len(runs) and release <= runs):
        raise OTAError("release %s of %s is older than release %s, which this board runs: no downgrade"
                       % (release, v7, runs))
    if share != "100" and _bucket(listed) >= int(share):
        raise OTAError("%s is rolled out to %s%% of boards, not to this one" % (v7, share))
