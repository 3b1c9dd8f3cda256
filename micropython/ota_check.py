# ota_check.py: what the server has: the version it names, and the manifest of
# that version, saved as .ota-new/state for ota_plan.py. Imported by
# ota_update.py for that step only, with ota_http.py.

import json
import os

import ota
from ota import OTAError, const
from ota_http import MANIFEST, Server
from ota_update import _hex

_EEXIST = const(17)
_LINE = const(256)  # the longest version answer read


def check(server, root):
    # (the version the server names, that of the manifest saved if one must be
    # installed, else None); server: Server's arguments, the installed version 4th.
    old = server[3]
    server = Server(*server)
    named = ota._named = _version(server)  # live mode learns what this boot tried
    return named, None if named == old else _manifest(server, named, old, root)


def poll(server, since, wait):
    # watch(): the version the server names once it differs from since, or wait seconds passed
    return _version(Server(*server), since, wait)


def _version(server, since=None, wait=0):
    # The server's version; with wait, a long-poll that returns since if nothing changed.
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
            version = json.loads(body)["version"]
            _hex(version)
        except Exception as e:
            raise OTAError("bad version answer from %s: %r" % (server.where, e))
        return version
    finally:
        server.close()


def _manifest(server, named, old, root):
    # Saves the manifest of the version named as .ota-new/state; returns its
    # version, or None, with nothing written, if it lists old (the installed one).
    # If the server has no manifest by version (a server or an export older than
    # that route: 404; the original server: 400; S3: 403), the newest, whatever
    # version it lists.
    try:
        length = server.get("/files/" + named)[1]
    except OTAError:
        named = None
        length = server.get(MANIFEST)[1]
    try:
        line = server.readline()
        if line[:1] == b"{":
            raise OTAError("%s has no text manifest: upgrade the server (the original ota-promoter has none)"
                           % server.where)
        version = line[:-1].decode()
        _hex(version)
        if named and version != named:
            raise OTAError("%s: /files/%s is not the manifest of that version" % (server.where, named))
        if version == old:
            return None
        stage = root + "/.ota-new"
        try:
            os.mkdir(stage)
        except OSError as e:
            if e.args[0] != _EEXIST:
                raise OTAError("cannot write to %s: %s" % (root or "/", e))
        got = len(line)
        with open(stage + "/state", "wb") as f:
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
    return version
