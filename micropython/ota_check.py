# ota_check.py: what the server has: the version it names (of a staged release,
# the one this board takes), and the manifest of that version, saved as
# .ota-new/state for ota_plan.py (which checks a signed one). ota_update.py imports it for
# those steps only, with ota_http.py.

import json
import os

from ota import OTAError, const
from ota_http import Server
from ota_update import hex40

_LINE = const(256)  # the longest version answer read
_EEXIST = const(17)


def version(args, old=None, wait=0):
    """The version the server names; with wait, a long-poll that returns old (the
    version it named before) if nothing changed in wait seconds. args: Server's. A site that stages a release,
    {"version", "next", "rollout": P}, names next to the boards whose bucket is below P."""
    server = Server(*args)
    status, length, _ = server.get(
        "/files/version?wait=%d" % wait if wait else "/files/version",
        'If-None-Match: "%s"\r\n' % old if old else "",
    )
    try:
        if status == 304:
            if old:
                return old
            raise OTAError("bad version answer from %s: 304 to a request without a version" % server.where)
        body = server.readline() if 0 < length <= _LINE else b""
        try:
            named = json.loads(body)
            staged = named.get("next")
            if staged:
                # This board's bucket for it, 0 to 99: the first 3 bytes, big-endian, of
                # the SHA-256 of "<device> <version>" (ota_promoter.rollout_bucket; also
                # in ota_plan._signed). A function of its own would intern its name.
                from hashlib import sha256  # here: no more names in this module's globals
                from ota_http import _device

                d = sha256((_device() + " " + staged).encode()).digest()
                if (d[0] << 16 | d[1] << 8 | d[2]) % 100 < int(named["rollout"]):
                    named["version"] = staged
            named = named["version"]
            hex40(named)
        except Exception as e:
            raise OTAError("bad version answer from %s: %r" % (server.where, e))
        return named
    finally:
        server.close()


def manifest(args, named, root):
    """Saves the manifest of the version named as .ota-new/state; returns its
    version, or None, with nothing written, if it lists the installed one (the
    4th of args, Server's). If the server has no manifest by version (a server or
    an export older than that route: 404; the original server: 400; S3: 403),
    the newest, whatever version it lists. A signed one is checked next (ota_plan._signed)."""
    old = args[3]
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
        listed = line[:40].decode()  # then "\n", or signed: " <release> <rollout> <signature>\n"
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
        got = len(line)
        with open(stage + "state", "wb") as f:
            f.write(line)
            while got < length:
                chunk = server.read(length - got)
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
        if got != length:
            raise OTAError("manifest cut off after %d of %d bytes" % (got, length))
    finally:
        server.close()
    return listed
