# ota.py: over-the-air updates from an ota-promoter server, for MicroPython.
#
#   import ota
#   ota.update("http://192.168.0.10:9090")  # boot.py: install what changed, reset if any
#   ota.watch("http://192.168.0.10:9090")   # development: update and reset on every save
#
# Changed files are downloaded to .ota-new/ and checked (sha1 of bytes + path,
# length, target path) before anything is replaced. The switch goes through a
# journal, .ota-journal, that the next call rolls forward after a power cut.
# .ota lists what this client installed; nothing else is ever deleted.
# Runs on CPython 3.9+ as well, for the tests.

import binascii
import hashlib
import json
import os
import socket
import time

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


_BUF = const(1024)  # the one download buffer
_LINE = const(256)  # longest header or manifest line: paths up to about 200 bytes
_EEXIST = const(17)
_STATE = ".ota"
_JOURNAL = ".ota-journal"
_STAGE = ".ota-new"


class OTAError(Exception):
    pass


# -- HTTP ---------------------------------------------------------------------


class _Server:
    def __init__(self, url, token, timeout, version):
        if url[:7] != "http://":
            raise OTAError("url must start with http://, not %r" % url)
        rest = url[7:].rstrip("/")
        i = rest.find("/")
        if i < 0:
            i = len(rest)
        self.where = rest[:i]
        self.prefix = rest[i:]
        host = self.where.split(":")
        try:
            self.host = host[0]
            self.port = int(host[1]) if len(host) > 1 else 80
        except ValueError:
            raise OTAError("bad port in %r" % url)
        self.timeout = timeout
        try:
            import machine

            device = binascii.hexlify(machine.unique_id()).decode()
        except (ImportError, AttributeError):
            device = "unknown"
        self.head = "Host: %s\r\nX-OTA-Device: %s\r\nX-OTA-Version: %s\r\n%s" % (
            self.where,
            device,
            version or "none",
            "Authorization: Bearer %s\r\n" % token if token else "",
        )

    def get(self, path, extra=""):
        # Returns (socket, stream, status, length, target) with the headers read;
        # the caller closes it with _close. Only 200 and 304 come back.
        s = f = socket.socket()
        try:
            s.settimeout(self.timeout)
            s.connect(socket.getaddrinfo(self.host, self.port, socket.AF_INET)[0][-1])
            s.sendall(("GET %s%s HTTP/1.0\r\n%s%s\r\n" % (self.prefix, path, self.head, extra)).encode())
            if not hasattr(s, "readinto"):
                f = s.makefile("rb")  # CPython; MicroPython sockets are streams
            line = f.readline(_LINE)
            if not line:
                raise OSError("connection closed")
            status = int(line[9:12])  # ValueError if this is not HTTP
            length = -1
            target = where = None
            while True:
                line = f.readline(_LINE)
                if line == b"\r\n" or line == b"\n":
                    break
                if line[-1:] != b"\n":
                    raise OTAError("bad header from %s" % self.where)
                kv = line.split(b":", 1)
                key = kv[0].lower()
                if key == b"content-length":
                    length = int(kv[1])
                elif key == b"x-target-path":
                    target = kv[1].strip()
                elif key == b"location":
                    where = kv[1].strip().decode()
            if status == 200 or status == 304:
                return s, f, status, length, target
            message = f.read(_LINE)
            try:
                message = json.loads(message)["error"]
            except Exception:
                pass
        except BaseException as e:
            _close(s, f)
            if isinstance(e, OSError):
                raise OTAError("no answer from %s: %s" % (self.where, e))
            if isinstance(e, ValueError):
                raise OTAError("bad answer from %s" % self.where)
            raise
        _close(s, f)
        if 300 <= status < 400:
            raise OTAError("%s redirects to %s: use that url" % (self.where, where))
        if status == 401:
            raise OTAError("%s: wrong or missing token" % self.where)
        raise OTAError("HTTP %d for %s: %s" % (status, path, message))

    def version(self, since=None, wait=0):
        # The server's version; with wait, a long-poll that returns since if nothing changed.
        s, f, status, length, _ = self.get(
            "/files/version?wait=%d" % wait if wait else "/files/version",
            'If-None-Match: "%s"\r\n' % since if since else "",
        )
        try:
            if status == 304:
                return since
            try:
                version = json.loads(f.read(length) if 0 < length <= _LINE else b"")["version"]
                _hex(version)
            except Exception as e:
                raise OTAError("bad version answer from %s: %r" % (self.where, e))
            return version
        finally:
            _close(s, f)


def _close(s, f):
    if f is not s:
        f.close()
    s.close()


def _hex(checksum):
    # 40 hex digits: also what keeps a checksum from changing a request line.
    if len(checksum) != 40:
        raise OTAError("bad checksum %r" % checksum)
    binascii.unhexlify(checksum)  # ValueError if not hex


# -- Files --------------------------------------------------------------------


def _kind(path):
    # 0: nothing there, 1: a file, 2: a folder
    try:
        return 2 if os.stat(path)[0] & 0x4000 else 1
    except OSError:
        return 0


def _remove(path):
    # True if removed; a file already gone or not removable is left as it is,
    # so that rolling a journal forward never stops half-way.
    try:
        os.remove(path)
        return True
    except OSError:
        return False


def _rename(src, dst):
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.args[0] != _EEXIST:  # older FAT builds do not replace
            raise
        os.remove(dst)
        os.rename(src, dst)


def _mkdirs(root, path):
    i = path.find("/")
    while i > 0:
        try:
            os.mkdir(root + "/" + path[:i])
        except OSError as e:
            if e.args[0] != _EEXIST:
                raise
        i = path.find("/", i + 1)


def _prune(root, path):
    # Remove the folders a deletion left empty, deepest first.
    i = path.rfind("/")
    while i > 0:
        try:
            os.rmdir(root + "/" + path[:i])
        except OSError:
            return
        i = path.rfind("/", 0, i)


def _sync():
    if hasattr(os, "sync"):
        os.sync()


def _clean(stage):
    # Staged files are numbered from 0 in download order, so no listing is held.
    i = 0
    while _remove("%s/%d" % (stage, i)):
        i += 1
    _remove(stage + "/plan")
    _remove(stage + "/state")
    try:
        os.rmdir(stage)
    except OSError:
        pass


def _safe(path):
    # A promoted path may only name a file under the device root, and not ours.
    if "\\" in path or path[:4] == _STATE:
        return False
    for part in path.split("/"):
        if part == "" or part == "." or part == "..":
            return False
    for c in path:
        if c < " ":
            return False
    return True


def _ops(journal):
    # The lines of a plan or journal: ("g", "checksum size path") or ("d", "path").
    with open(journal, "rb") as f:
        while True:
            line = f.readline()
            if not line or line == b"end\n":
                return
            yield line[:1], line[2:-1].decode()


def _entry(state):
    # The next (checksum, size, path) of a state file, or None at its end.
    line = state.readline() if state else b""
    return line[:-1].decode().split(" ", 2) if line else None


def _installed(root):
    try:
        with open(root + "/" + _STATE, "rb") as f:
            return f.readline()[:-1].decode()
    except OSError:
        return ""


# -- Update -------------------------------------------------------------------


def _plan(f, length, root, stage, delete, block):
    # Merge the server's manifest (sorted by path) with the installed state (same
    # order) line by line: memory stays flat however many files there are.
    # Writes the new state and the plan; returns (version, changes, bytes needed).
    line = f.readline(_LINE)
    got = len(line)
    version = line[:-1].decode()
    _hex(version)
    try:
        old = open(root + "/" + _STATE, "rb")
        old.readline()
    except OSError:
        old = None
    state = open(stage + "/state", "wb")
    plan = open(stage + "/plan", "wb")
    try:
        state.write(line)
        o = _entry(old)
        last = ""
        changes = need = 0
        while True:
            line = f.readline(_LINE)
            path = None  # at the manifest's end: every installed file left is gone
            if line:
                got += len(line)
                if line[-1:] != b"\n":
                    raise OTAError("manifest line cut off or too long: %r" % line[:60])
                checksum, size, path = line[:-1].decode().split(" ", 2)
                size = int(size)
                if not _safe(path) or path <= last or size < 0:
                    raise OTAError("refusing unsafe or unsorted path %r" % path)
                _hex(checksum)
                last = path
            elif got != length:
                raise OTAError("manifest cut off after %d of %d bytes" % (got, length))
            while o and (path is None or o[2] < path):
                if delete:
                    plan.write(b"d " + o[2].encode() + b"\n")
                    changes += 1
                o = _entry(old)
            if path is None:
                break
            if not (o and o[2] == path and o[0] == checksum):
                _check_target(root, path)
                plan.write(("g %s %d %s\n" % (checksum, size, path)).encode())
                changes += 1
                need += (size + block - 1) // block * block
            if o and o[2] == path:
                o = _entry(old)
            state.write(line)
    finally:
        state.close()
        plan.close()
        if old:
            old.close()
    return version, changes, need


def _check_target(root, path):
    # Refuse now what the journal could not do later.
    if _kind(root + "/" + path) == 2:
        raise OTAError("%s: remove the folder in the way" % path)
    i = path.find("/")
    while i > 0:
        if _kind(root + "/" + path[:i]) == 1:
            raise OTAError("%s: remove the file in the way of %s" % (path[:i], path))
        i = path.find("/", i + 1)


def _fetch(server, checksum, size, path, dest, buf):
    s, f, status, length, target = server.get("/files/" + checksum)
    try:
        if length != size or target != path.encode():
            raise OTAError("%s: expected %d B, the server sent %d B for %s" % (path, size, length, target))
        h = hashlib.sha1()
        with open(dest, "wb") as out:
            left = size
            while left:
                chunk = buf if left >= len(buf) else buf[:left]
                try:
                    n = f.readinto(chunk)
                except OSError as e:
                    raise OTAError("%s: connection lost: %s" % (path, e))
                if not n:
                    raise OTAError("%s: connection closed after %d of %d B" % (path, size - left, size))
                if n < len(chunk):
                    chunk = chunk[:n]  # a short read: slice only then
                h.update(chunk)
                out.write(chunk)
                left -= n
        h.update(path.encode())
        if binascii.hexlify(h.digest()).decode() != checksum:
            raise OTAError("%s: checksum mismatch, damaged in transfer" % path)
    finally:
        _close(s, f)


def _stage(server, root, stage, delete):
    # Download and check every changed file; nothing outside stage is touched.
    block = 1
    free = None
    if hasattr(os, "statvfs"):
        fs = os.statvfs(root or "/")
        block = fs[0] or 1
        free = fs[0] * fs[4]
    s, f, status, length, target = server.get("/files?format=text")
    try:
        version, changes, need = _plan(f, length, root, stage, delete, block)
    finally:
        _close(s, f)
    need += 2 * block  # the new state and the journal
    if free is not None and need > free:
        raise OTAError("not enough space: the update needs %d B, %d B are free" % (need, free))
    buf = memoryview(bytearray(_BUF))
    i = 0
    for kind, rest in _ops(stage + "/plan"):
        if kind == b"g":
            checksum, size, path = rest.split(" ", 2)
            _fetch(server, checksum, int(size), path, "%s/%d" % (stage, i), buf)
            print("ota: %s %s B ok" % (path, size))
            i += 1
    return version, changes


def _commit(root):
    # Roll the journal forward. Every step can be done again after a power cut.
    journal = root + "/" + _JOURNAL
    stage = root + "/" + _STAGE
    try:
        with open(journal, "rb") as f:
            f.seek(-4, 2)
            complete = f.read() == b"end\n"
    except OSError:
        complete = False
    if complete:
        for kind, path in _ops(journal):
            if kind == b"d":
                _remove(root + "/" + path)
        i = 0
        for kind, rest in _ops(journal):
            if kind == b"g":
                src = "%s/%d" % (stage, i)
                path = rest.split(" ", 2)[2]
                if _kind(src):  # else it was moved before the power cut
                    _mkdirs(root, path)
                    _rename(src, root + "/" + path)
                i += 1
        if _kind(stage + "/state"):
            _rename(stage + "/state", root + "/" + _STATE)
        for kind, path in _ops(journal):
            if kind == b"d":
                _prune(root, path)
        _sync()
    os.remove(journal)
    _clean(stage)


def recover(root="/"):
    """Finish an update a power cut interrupted, and remove staged files."""
    root = root.rstrip("/")
    if _kind(root + "/" + _JOURNAL):
        _commit(root)
    else:
        _clean(root + "/" + _STAGE)


def _finish(root):
    try:
        recover(root)
    except OSError as e:
        raise OTAError("cannot finish the update, the next call retries: %s" % e)


def update(url, root="/", token=None, reset=True, delete=True, timeout=10):
    """Install the files that changed on the server; True if any did.

    Resets the board after a change when reset is true. Deletes files the server
    no longer has only if this client installed them (and delete is true).
    Raises OTAError, with the board's files as they were, if anything fails.
    """
    root = root.rstrip("/")
    _finish(root)
    installed = _installed(root)
    server = _Server(url, token, timeout, installed)
    version = server.version()
    if version == installed:
        return False
    stage = root + "/" + _STAGE
    try:
        os.mkdir(stage)
    except OSError as e:
        if e.args[0] != _EEXIST:
            raise OTAError("cannot write to %s: %s" % (root or "/", e))
    try:
        version, changes = _stage(server, root, stage, delete)
        with open(stage + "/plan", "ab") as f:
            f.write(b"end\n")
        _sync()
        os.rename(stage + "/plan", root + "/" + _JOURNAL)  # the commit point
    except BaseException as e:
        _clean(stage)
        if isinstance(e, (OSError, ValueError, IndexError)):  # the file system, or a bad manifest
            raise OTAError("update failed, nothing changed: %r" % e)
        raise
    _finish(root)
    print("ota: version %s installed, %d change%s" % (version[:7], changes, "" if changes == 1 else "s"))
    if changes and reset:
        _reset()
    return changes > 0


def _reset():
    try:
        import machine

        machine.reset()
    except (ImportError, AttributeError):
        pass  # not a board: CPython or the unix port


def watch(url, root="/", token=None, reset=True, wait=30, timeout=10):
    """Update on every new version the server publishes, forever (for development).

    Long-polls the server; retries with a growing delay while it is away.
    """
    delay = 1
    while True:
        try:
            update(url, root, token, reset, True, timeout)
            installed = _installed(root.rstrip("/"))
            _Server(url, token, timeout + wait, installed).version(installed, wait)
            delay = 1
        except OTAError as e:
            print("ota: %s; retrying in %d s" % (e, delay))
            time.sleep(delay)
            delay = min(delay * 2, 10)
