# ota_check.py: what the server has: the version it names, and the manifest of
# that version, saved as .ota-new/state for ota_plan.py. ota_update.py imports
# it for those steps only, with ota_http.py.

import json
import os

from ota import OTAError, const
from ota_http import Server
from ota_update import hex40

_LINE = const(256)  # the longest version answer read
_EEXIST = const(17)


def version(args, since=None, wait=0):
    """The version the server names; with wait, a long-poll that returns since if
    nothing changed in wait seconds. args: Server's."""
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
            named = json.loads(body)["version"]
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
    the newest, whatever version it lists."""
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
        listed = line[:-1].decode()
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
                chunk = server.chunk(length - got)
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
        if got != length:
            raise OTAError("manifest cut off after %d of %d bytes" % (got, length))
    finally:
        server.close()
    return listed
