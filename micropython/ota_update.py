# ota_update.py: the part of ota.py that installs an update, imported only for one.
#
# ota.update(), ota.recover() and ota.watch() import this module when called and
# drop it afterwards, so that a board in live mode keeps only ota.py in memory.
#
# Changed files are downloaded to .ota-new/ and checked (sha1 of bytes + path,
# length, target path) before anything is replaced. The switch goes through a
# journal, .ota-journal: old files are moved aside, not deleted, until every new
# one is in, so the switch can be rolled forward after a power cut, or back if a
# step fails. .ota lists what this client installed; nothing else is ever deleted.
# Runs on CPython 3.9+ as well, for the tests.

import binascii
import hashlib
import json
import os
import select
import socket
import sys
import time

# const and ticks come from ota, which has their fallbacks for CPython.
from ota import OTAError, _reset, const, ticks_diff, ticks_ms

_BUF = const(1024)  # the one network buffer
_CONSOLE = const(512)  # bytes of console output live mode holds for the server
_SLACK = const(3000)  # ms a long-poll may take beyond its wait before the server counts as gone
_LINE = const(256)  # longest header or manifest line: paths up to about 200 bytes
_HEADERS = const(32)  # most header lines an answer may have
_EEXIST = const(17)
_STATE = ".ota"
_JOURNAL = ".ota-journal"
_STAGE = ".ota-new"
_MANIFEST = "/files/manifest.txt"  # the newest manifest, where older servers and exports have it


def _installed(root):
    # The version in .ota's first line, or "" if there is none or it is damaged.
    # Not open() of a missing file: on the unix port of 1.20 its object is left with
    # fd 0 and closes that when collected (extmod/vfs_posix_file.c, fixed since).
    try:
        os.stat(root + "/" + _STATE)
        with open(root + "/" + _STATE, "rb") as f:
            line = f.readline(42)
        binascii.unhexlify(line[:40])  # ValueError unless hex: safe in a header line
        if len(line) == 41 and line[40] == 10:
            return line[:40].decode()
    except Exception:
        pass
    return ""


def _where(url):
    # (host:port as written, host, port, address family, path prefix, https?) of a url.
    i = url.find("://")
    tls = url[:i] == "https"
    if not tls and url[:i] != "http":
        raise OTAError("url must start with http:// or https://, not %r" % url)
    rest = url[i + 3 :].rstrip("/")
    i = rest.find("/")
    if i < 0:
        i = len(rest)
    where = host = rest[:i]
    try:
        port = 443 if tls else 80
        i = host.rfind(":")
        if i > host.rfind("]"):  # a port, after a name or a [v6 address]
            port = int(host[i + 1 :])
            host = host[:i]
        family = socket.AF_INET
        if host[:1] == "[" and host[-1:] == "]":
            host = host[1:-1]
            family = socket.AF_INET6
        elif ":" in host or "]" in host:
            raise ValueError
    except Exception:
        raise OTAError("bad host or port in %r" % url)
    return where, host, port, family, rest[len(where) :], tls


def _device():
    try:
        import machine

        return binascii.hexlify(machine.unique_id()).decode()
    except (ImportError, AttributeError):
        return "unknown"


# -- HTTP ---------------------------------------------------------------------


class _Server:
    def __init__(self, url, token, timeout, version, ca=None):
        self.where, self.host, self.port, self.family, self.prefix, self.tls = _where(url)
        self.ca = ca
        self.ms = int(timeout * 1000)
        self.buf = bytearray(_BUF)
        self.mv = memoryview(self.buf)
        self.head = "Host: %s\r\nX-OTA-Device: %s\r\nX-OTA-Version: %s\r\n%s" % (
            self.where,
            _device(),
            version or "none",
            "Authorization: Bearer %s\r\n" % token if token else "",
        )

    def get(self, path, extra=""):
        # Sends a request and reads the answer's head: (status, length, target) of a
        # 200 or 304, its body left to read; the caller closes. Else raises OTAError.
        self.start = ticks_ms()
        self.allow = self.ms
        self.i = self.n = 0
        self.poll = None
        s = self.s = socket.socket(self.family)
        try:
            s.settimeout(self.ms / 1000)
            s.connect(socket.getaddrinfo(self.host, self.port, self.family)[0][-1])
            if self.tls:
                s = self.s = _tls(s, self.host, self.ca, self.where)
            request = ("GET %s%s HTTP/1.0\r\n%s%s\r\n" % (self.prefix, path, self.head, extra)).encode()
            (s.sendall if hasattr(s, "sendall") else s.write)(request)  # the 1.20 unix port has no sendall
            if hasattr(s, "readinto"):
                # MicroPython: readinto waits to fill the whole buffer unless the
                # socket does not block; then it returns what has arrived.
                s.setblocking(False)
                self.poll = select.poll()
                self.poll.register(s, select.POLLIN)
            line = self.readline()
            if not line:
                raise OSError("connection closed")
            if line[-1:] != b"\n":
                raise ValueError  # a status line longer than _LINE
            status = int(line[9:12])  # ValueError if this is not HTTP
            length = -1
            target = where = None
            for _ in range(_HEADERS):
                line = self.readline()
                if line == b"\r\n" or line == b"\n":
                    break
                i = line.find(b":")
                key = line[:i].lower()  # no copy of the value unless it is read
                if key == b"content-length":
                    length = int(line[i + 1 :])
                elif key == b"x-target-path":
                    target = line[i + 1 :].strip()
                elif key == b"location":
                    where = line[i + 1 :].strip().decode()
                elif len(line) == _LINE and line[-1:] != b"\n":
                    # Cut at _LINE bytes: a line not read here (CDNs send Report-To, NEL
                    # or Content-Security-Policy lines of 2 KB) is dropped, whatever
                    # its length, through the one buffer.
                    while self.i < self.n or self._fill():
                        j = self.buf.find(b"\n", self.i, self.n) + 1
                        self.i = j or self.n
                        if j:
                            break
                    continue
                if line[-1:] != b"\n":  # a line read here, cut, or the answer's end
                    raise OTAError("bad header from %s" % self.where)
            else:
                raise OTAError("too many header lines from %s" % self.where)
            if status == 200 or status == 304:
                return status, length, target
            message = self.readline()
            try:
                message = json.loads(message)["error"]
            except Exception:
                pass
        except BaseException as e:
            self.close()
            if isinstance(e, OSError):
                raise OTAError("no answer from %s: %s" % (self.where, e))
            if isinstance(e, ValueError):
                raise OTAError("bad answer from %s" % self.where)
            raise
        self.close()
        if 300 <= status < 400:
            raise OTAError("%s redirects to %s: use that url" % (self.where, where))
        if status == 401:
            raise OTAError("%s: wrong or missing token" % self.where)
        if status == 404 and not isinstance(message, str) or path == _MANIFEST and status == 400:
            # A static host's page, or the original server, which has no text manifest.
            raise OTAError("%s has no %s%s: the url must name an ota-promoter server or the folder "
                           "of an export" % (self.where, self.prefix, path))
        raise OTAError("HTTP %d for %s: %s" % (status, path, message))

    def _fill(self):
        # One read of what has arrived, within the deadline of the whole answer:
        # timeout seconds, plus a millisecond per byte received (at least 1 KB/s).
        while True:
            try:
                took = ticks_diff(ticks_ms(), self.start)
                wait = min(self.allow - took, self.ms)
                if wait <= 0:
                    raise OTAError("%s is too slow: gave up after %d ms" % (self.where, took))
                if self.poll is None:  # CPython: recv_into returns what has arrived
                    self.s.settimeout(wait / 1000)
                    n = self.s.recv_into(self.buf)
                elif self.poll.poll(wait):
                    n = self.s.readinto(self.buf)
                else:
                    raise OSError("timed out")
            except OSError as e:
                if self.allow == self.ms or ticks_diff(ticks_ms(), self.start) < self.allow:
                    raise OTAError("no answer from %s: %s" % (self.where, e))
                continue  # the deadline passed while bytes came: said above
            if n is not None:
                self.i = 0
                self.n = n
                self.allow += n
                return n

    def chunk(self, most):
        # Up to most bytes of the body, as a view into the buffer; empty at its end.
        if self.i == self.n:
            self._fill()
        j = min(self.n, self.i + most)
        c = self.mv[self.i : j]
        self.i = j
        return c

    def readline(self):
        # A line of at most _LINE bytes; shorter only at the end of the answer.
        line = b""
        while len(line) < _LINE and line[-1:] != b"\n" and (self.i < self.n or self._fill()):
            j = min(self.buf.find(b"\n", self.i, self.n) + 1 or self.n, self.i + _LINE - len(line))
            line += self.mv[self.i : j]
            self.i = j
        return line

    def close(self):
        self.s.close()

    def version(self, since=None, wait=0):
        # The server's version; with wait, a long-poll that returns since if nothing changed.
        status, length, _ = self.get(
            "/files/version?wait=%d" % wait if wait else "/files/version",
            'If-None-Match: "%s"\r\n' % since if since else "",
        )
        try:
            if status == 304:
                if since:
                    return since
                raise OTAError("bad version answer from %s: 304 to a request without a version" % self.where)
            body = self.readline() if 0 < length <= _LINE else b""
            try:
                version = json.loads(body)["version"]
                _hex(version)
            except Exception as e:
                raise OTAError("bad version answer from %s: %r" % (self.where, e))
            return version
        finally:
            self.close()


def _tls(s, host, ca, where):
    # Boards freeze micropython-lib's ssl.py over the tls module; a bare unix build
    # has only tls; 1.20 has ssl.wrap_socket alone. A board has no authorities of
    # its own: without ca it encrypts but cannot tell the server is the right one.
    try:
        try:
            import ssl
        except ImportError:
            import tls as ssl
        if not hasattr(ssl, "SSLContext"):
            return ssl.wrap_socket(s, server_hostname=host, cert_reqs=2 if ca else 0, cadata=ca)
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if ca:
            c.verify_mode = ssl.CERT_REQUIRED
            try:
                c.load_verify_locations(cadata=ca)
            except TypeError:  # the bare tls module takes it by position
                c.load_verify_locations(ca)
        elif hasattr(c, "load_default_certs"):
            c.load_default_certs()  # CPython: the system's authorities
        else:
            c.verify_mode = ssl.CERT_NONE
        return c.wrap_socket(s, server_hostname=host)
    except (MemoryError, OSError, ValueError) as e:
        s.close()
        if isinstance(e, MemoryError) or e.args[0] == 12:  # ENOMEM: mbedtls could not allocate
            raise OTAError("%s: not enough memory for TLS on this board: use http://" % where)
        raise OTAError("%s: TLS failed: %s" % (where, e))


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
    try:
        os.remove(path)
    except OSError:
        pass  # already gone


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
    # Remove the folders of path left empty, deepest first (some may not exist).
    i = path.rfind("/")
    while i > 0:
        try:
            os.rmdir(root + "/" + path[:i])
        except OSError:
            pass
        i = path.rfind("/", 0, i)


def _sync():
    if hasattr(os, "sync"):
        os.sync()


def _clean(stage):
    # Staged files are numbered from 0 in download order, so no listing is held;
    # the last goes first, so that a power cut leaves them numbered from 0 still.
    i = 0
    while _kind("%s/%d" % (stage, i)):
        i += 1
    while i:
        i -= 1
        _remove("%s/%d" % (stage, i))
    _remove(stage + "/plan")
    _remove(stage + "/state")
    try:
        os.rmdir(stage)
    except OSError:
        pass


def _safe(path):
    # A promoted path may only name a file under the device root, and not ours:
    # in any case, since FAT folds it (.OTA-NEW is .ota-new there).
    if "\\" in path or path[:4].lower() == _STATE:
        return False
    for part in path.split("/"):
        if part == "" or part == "." or part == "..":
            return False
    for c in path.encode():  # bytes: iterating a str interns each character as a qstr
        if c < 32:
            return False
    return True


def _refuse(path, where):
    raise OTAError("refusing unsafe or unsorted path %r in %s" % (path, where))


def _fat(path):
    # The path as FAT sees it: each name in lower case, its trailing dots and spaces
    # dropped (FatFs strips them: notes. is notes). Refused if FAT cannot hold it:
    # a name of dots and spaces only, or one of these characters. (Worked on bytes:
    # iterating a str makes a string of each character.)
    low = path.lower()
    raw = low.encode()
    bad = False
    for c in b'<>:"|?*':
        bad = bad or c in raw
    if b"./" in raw or b" /" in raw or raw[-1] in b". ":
        names = raw.split(b"/")
        for i in range(len(names)):
            names[i] = names[i].rstrip(b". ")
            bad = bad or not names[i]
        low = b"/".join(names).decode()
    if bad:
        raise OTAError("%r: FAT cannot hold this name: rename it" % path)
    return low


def _ops(journal):
    # The lines of a plan or journal, each [kind, checksum, size, path]: "g" to get
    # a file, "d" to delete one; ["end"] last in a complete journal. Paths read
    # back are checked again: whatever wrote the file, nothing outside root is touched.
    with open(journal, "rb") as f:
        while True:
            line = f.readline()
            if not line:
                return
            op = line[:-1].decode().split(" ", 3)
            if op[0] != "end" and (len(op) < 4 or not _safe(op[3])):
                _refuse(op[-1], journal)
            yield op


def _entry(state):
    # The next [checksum, size, path] of a state file, or None at its end.
    line = state.readline() if state else b""
    if not line:
        return None
    entry = line[:-1].decode().split(" ", 2)
    if not _safe(entry[2]):
        _refuse(entry[2], _STATE)
    return entry


# -- Update -------------------------------------------------------------------


def _plan(server, line, length, root, stage, delete, block):
    # Merge the server's manifest (sorted by path; line, its first, read already)
    # with the installed state (same order) line by line: memory stays flat however
    # many files there are. Writes the new state and the plan; returns (changes,
    # bytes needed).
    got = len(line)
    old = None
    if _kind(root + "/" + _STATE):  # see _installed: no open() of a missing file
        old = open(root + "/" + _STATE, "rb")
        old.readline()
    state = open(stage + "/state", "wb")
    plan = open(stage + "/plan", "wb")
    try:
        state.write(line)
        o = _entry(old)
        last = ""
        chain = []  # earlier paths that are the start of this one: "lib" before "lib.py"
        fold = {}  # path in lower case -> path, for paths with capitals; "folder/" for folders
        changes = need = folders = 0
        while True:
            line = server.readline()
            path = None  # at the manifest's end: every installed file left is gone
            if line:
                got += len(line)
                if line[-1:] != b"\n":
                    raise OTAError("manifest line cut off or too long: %r" % line[:60])
                checksum, size, path = line[:-1].decode().split(" ", 2)
                size = int(size)
                if not _safe(path) or path <= last or size < 0:
                    _refuse(path, "the manifest")
                _hex(checksum)
                # A name FAT cannot hold, a path that is also a folder of another,
                # or equal to another on FAT (but for case, trailing dots and spaces:
                # one file there): refused now, or the switch would fail. Sorted, a
                # path comes after one it folds to only if that one is its start and
                # the rest folds away ("notes", "notes."; "lib", "lib./x.py"): chain.
                low = _fat(path)
                while chain and path[: len(chain[-1])] != chain[-1]:
                    chain.pop()
                clash = fold.get(low) or fold.get(low + "/")
                if chain and not path[len(chain[-1]) :].encode().split(b"/", 1)[0].strip(b". "):
                    clash = chain[-1]
                i = path.find("/")
                j = low.find("/")
                while i > 0:
                    clash = clash or fold.get(low[:j])
                    if low[:j] != path[:i]:
                        fold[low[:j] + "/"] = path
                    i = path.find("/", i + 1)
                    j = low.find("/", j + 1)
                if clash:
                    raise OTAError("%r and %r clash: rename one" % (clash, path))
                chain.append(path)
                if low != path:
                    fold[low] = path
            elif got != length:
                raise OTAError("manifest cut off after %d of %d bytes" % (got, length))
            while o and (path is None or o[2] < path):
                if delete:
                    plan.write(("d %s %s %s\n" % tuple(o)).encode())
                    changes += 1
                o = _entry(old)
            if path is None:
                break
            if not (o and o[2] == path and o[0] == checksum):
                folders += _check_target(root, path, last)
                plan.write(("g %s %d %s\n" % (checksum, size, path)).encode())
                changes += 1
                need += (size + block - 1) // block * block
            if o and o[2] == path:
                o = _entry(old)
            state.write(line)
            last = path
    finally:
        state.close()
        plan.close()
        if old:
            old.close()
    # Each new folder takes two blocks (a littlefs metadata pair); the new state and
    # the plan are as big as the manifest at most; four blocks spare for metadata.
    return changes, need + 2 * got + (2 * folders + 4) * block


def _check_target(root, path, last):
    # Refuse now what the journal could not do later; count the folders to create.
    if _kind(root + "/" + path) == 2:
        raise OTAError("%s: remove the folder in the way" % path)
    folders = 0
    i = path.find("/")
    while i > 0:
        kind = _kind(root + "/" + path[:i])
        if kind == 1:
            raise OTAError("%s: remove the file in the way of %s" % (path[:i], path))
        if not kind and last[: i + 1] != path[: i + 1]:  # not counted for the path before
            folders += 1
        i = path.find("/", i + 1)
    return folders


def _fetch(server, checksum, size, path, dest):
    status, length, target = server.get("/files/" + checksum)
    try:
        # A static host sends no X-Target-Path: the checksum covers the path anyway.
        if length != size or target is not None and target != path.encode():
            raise OTAError("%s: expected %d B, the server sent %d B for %s" % (path, size, length, target))
        h = hashlib.sha1()
        with open(dest, "wb") as out:
            left = size
            while left:
                chunk = server.chunk(left)
                if not chunk:
                    raise OTAError("%s: connection closed after %d of %d B" % (path, size - left, size))
                h.update(chunk)
                out.write(chunk)
                left -= len(chunk)
        h.update(path.encode())
        if binascii.hexlify(h.digest()).decode() != checksum:
            raise OTAError("%s: checksum mismatch, damaged in transfer" % path)
    finally:
        server.close()


def _stage(server, named, old, root, stage, delete):
    # Download and check every changed file; nothing outside stage is touched.
    # Returns (version, changes); None, with nothing written, if the manifest
    # lists old, the installed version.
    block = 1
    free = None
    if hasattr(os, "statvfs"):
        fs = os.statvfs(root or "/")
        block = fs[0] or 1
        free = fs[0] * fs[4]
    # The text manifest of the version the server named; if it has none (a server
    # or an export older than that route: 404; the original server: 400; S3: 403),
    # the newest, whatever version it lists.
    try:
        length = server.get("/files/" + named)[1]
    except OTAError:
        named = None
        length = server.get(_MANIFEST)[1]
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
        try:
            os.mkdir(stage)
        except OSError as e:
            if e.args[0] != _EEXIST:
                raise OTAError("cannot write to %s: %s" % (root or "/", e))
        changes, need = _plan(server, line, length, root, stage, delete, block)
    finally:
        server.close()
    if free is not None and need > free:
        raise OTAError("not enough space: the update needs %d B, %d B are free" % (need, free))
    i = 0
    for op in _ops(stage + "/plan"):
        if op[0] == "g":
            _fetch(server, op[1], int(op[2]), op[3], "%s/%d" % (stage, i))
            print("ota: %s %s B ok" % (op[3], op[2]))
            i += 1
    return version, changes


def _steps(root, journal, phases):
    # Each step of a journal as (staged file or None, path, its place on the board,
    # where its old file waits): "d" deletions, "g" new files, "s" the state.
    stage = root + "/" + _STAGE + "/"
    for phase in phases:
        if phase == "s":
            yield stage + "state", _STATE, root + "/" + _STATE, stage + "old"
        i = 0
        for op in _ops(journal):
            if op[0] == phase:
                yield (None if phase == "d" else stage + str(i)), op[3], root + "/" + op[3], stage + phase + str(i)
                i += 1


def _commit(root):
    # Roll the journal forward; if a step fails (a folder in the way, a full
    # file system), roll it back: the board gets all the new files or all the
    # old ones. Every step can be taken again after a power cut. Returns the
    # error that made it roll back, if any.
    stage = root + "/" + _STAGE
    journal = root + "/" + _JOURNAL
    undo = stage + "/undo"
    done = stage + "/done"
    why = None
    complete = False
    try:
        if _kind(journal):  # see _installed: no open() of a missing file
            with open(journal, "rb") as f:
                f.seek(-4, 2)
                complete = f.read() == b"end\n"
    except OSError:
        pass
    if complete:
        for op in _ops(journal):  # every path is checked before one is touched
            pass
        try:
            for new, path, dst, aside in _steps(root, journal, "dgs"):
                if not new or _kind(new):  # else moved in before a power cut
                    if _kind(dst) == 1 and not _kind(aside):
                        os.rename(dst, aside)
                    if new:
                        _mkdirs(root, path)
                        os.rename(new, dst)
            _sync()
            os.rename(journal, done)
        except OSError as e:
            why = e
            os.rename(journal, undo)
    elif _kind(journal):
        os.remove(journal)  # not written by this client: never started
    if _kind(undo):
        for new, path, dst, aside in _steps(root, undo, "sgd"):
            if new:
                if not _kind(new):
                    os.rename(dst, new)
                _prune(root, path)  # the folders it made
            if _kind(aside):
                _mkdirs(root, path)
                os.rename(aside, dst)
        _sync()
        os.remove(undo)
    if _kind(done):
        for new, path, dst, aside in _steps(root, done, "dgs"):
            if _kind(aside):
                os.remove(aside)  # a failure is retried: a new update needs the names
            if not new:
                _prune(root, path)
        _sync()
        os.remove(done)
    _clean(stage)
    return why


def recover(root="/"):
    """Finish, or undo, an update a power cut or a failure interrupted; remove staged files."""
    try:
        return _commit(root.rstrip("/"))
    except (OSError, ValueError, IndexError) as e:
        raise OTAError("cannot finish the update, the next call retries: %r" % e)


def update(url, root="/", token=None, reset=True, delete=True, timeout=10, ca=None):
    """Install the files that changed on the server; True if any did.

    Resets the board after a change when reset is true. Deletes files the server
    no longer has only if this client installed them (and delete is true).
    Raises OTAError, with the board's files as they were, if anything fails.
    """
    return _update(url, root, token, reset, delete, timeout, ca)[1] > 0


def _update(url, root, token, reset, delete, timeout, ca):
    # update(), returning (the version the server named, the changes installed).
    # Nothing is written when the server names, or its manifest lists, the
    # installed version (a site whose export was killed may name an older one).
    root = root.rstrip("/")
    recover(root)
    installed = _installed(root)
    server = _Server(url, token, timeout, installed, ca)
    named = server.version()
    sys.modules["ota"]._named = named  # live mode waits for another version than this one
    if named == installed:
        return named, 0
    stage = root + "/" + _STAGE
    why = None
    try:
        staged = _stage(server, named, installed, root, stage, delete)
        if not staged:
            return named, 0
        version, changes = staged
        with open(stage + "/plan", "ab") as f:
            f.write(b"end\n")
        _sync()
        os.rename(stage + "/plan", root + "/" + _JOURNAL)  # the commit point
    except (OSError, ValueError, IndexError) as e:  # the file system, or a bad manifest
        why = e
    except BaseException:
        _clean(stage)
        raise
    why = why or recover(root)  # the switch: rolled forward, or back if a step failed
    if why:
        _clean(stage)
        raise OTAError("update failed, nothing changed: %r" % why)
    print("ota: version %s installed, %d change%s" % (version[:7], changes, "" if changes == 1 else "s"))
    if changes and reset:
        _reset()
    return named, changes


def watch(url, root="/", token=None, reset=True, wait=30, timeout=10, ca=None):
    """Update on every new version the server publishes, forever (for development).

    Long-polls the server (wait: seconds, at least 1) for a version other than
    the one it named at the last update; retries with a growing delay while it
    is away.
    """
    wait = max(int(wait), 1)
    delay = 1
    named = None  # the version the server named at the last update
    while True:
        try:
            if named is None:
                named = _update(url, root, token, reset, True, timeout, ca)[0]
            start = ticks_ms()
            if _Server(url, token, timeout + wait, _installed(root.rstrip("/")), ca).version(named, wait) != named:
                named = None  # a new version: installed at the top of the loop
            delay = 1
        except OTAError as e:
            print("ota: %s; retrying in %d s" % (e, delay))
            time.sleep(delay)
            delay = min(delay * 2, 10)
            continue
        if ticks_diff(ticks_ms(), start) < 1000:
            time.sleep(1)  # answered at once (a static host, a server ignoring wait): never hammer it


# -- Live mode: arming it, and installing once the app has stopped -------------------
#
# Run once each, so kept out of ota.py, which stays in memory beside the app.


def _live(url, root="/", token=None, console=True, wait=10, timeout=10, period=100):
    # ota.live(): update() first if it has not run since boot, then the state of
    # ota._Live, the console stream and the Timer.
    import ota

    if ota._live:
        ota._live.stop()
    root = root.rstrip("/")
    if ota._named is False:  # update() has not run since boot
        try:
            ota.update(url, root, token, timeout=timeout)
        except OTAError as e:
            print("ota: no update: %s" % e)
    where, host, port, family, prefix, tls = _where(url)
    if tls:
        raise OTAError("live mode speaks http:// only, for the bench: give the server's http:// url")
    live = ota._Live()
    live.args = url, root, token  # for the update, once the app has stopped
    # The requests: the long-poll, the plain version check, the console's post; a
    # long-poll is given up (a half-open connection) 3 s after its wait
    wait = max(int(wait), 1)
    live.lines = ("GET %s/files/version?wait=%d" % (prefix, wait), "GET %s/files/version" % prefix,
                  "POST %s/console" % prefix)
    live.held = wait * 1000 + _SLACK
    live.ms = int(timeout * 1000)
    live.family = family
    live.host = host, port
    live.address = None  # resolved at the first tick: a name costs a DNS lookup
    # version: what the board has installed, and the app runs; named: what the
    # server named at this boot's update (also one that failed): the long-poll
    # waits for another, so a version that cannot be installed is tried once.
    live.version = _installed(root)
    live.head = "Host: %s\r\nX-OTA-Device: %s\r\nX-OTA-Version: %s\r\n%s" % (
        where, _device(), live.version or "none", "Authorization: Bearer %s\r\n" % token if token else "")
    live.named = ota._named or live.version
    # The console: what the REPL prints, held for the server (the oldest is dropped
    # and counted). Attached even without console: the restart presses its keys
    # through it.
    live.buf = bytearray(_CONSOLE if console else 0)
    live.n = live.dropped = live.key = live.sending = 0
    live.prompt = False
    if hasattr(os, "dupterm"):  # not on CPython and the unix port: tests call write()
        os.dupterm(live, 0)  # ESP8266: slot 0, as slot 1 is the UART
    live.checks = live._checks()
    live.posts = live._posts() if console else None
    live.timer = None
    ota._live = live
    print("ota: live mode, version %s" % (live.version[:7] or "none"))  # on the console: what runs now
    try:
        from machine import Timer
    except ImportError:
        return live  # CPython and the unix port: tests call tick()
    # -1: a virtual timer on ESP8266 and RP2040 and, in MicroPython 1.21+, ESP32;
    # ESP32's 1.20 takes it as hardware timer 3. Soft everywhere (mp_sched_schedule).
    live.timer = Timer(-1)
    live.timer.init(period=period, mode=Timer.PERIODIC, callback=live.tick)
    return live


def _restart(live):
    # The app has stopped (live mode pressed Ctrl-C, and the REPL shows its prompt):
    # install the version, waiting on the network as an update does, as nothing
    # runs; let the console send what that printed; then Ctrl-D, a soft reset that
    # runs boot.py and the new main.py. If the update fails here (no room beside
    # what the app left in memory, the server), the restart still comes, and
    # boot.py's update() installs it in a fresh heap before main.py. An app that
    # did not stop, or a port that cannot be handed keys: machine.reset().
    c = live  # the console stream
    if not c.prompt:
        print("ota: the app did not stop: resetting the board, boot.py installs the update")
        live.stop()
        return _reset()
    try:
        _update(live.args[0], live.args[1], live.args[2], False, True, live.ms / 1000, None)
    except Exception as e:
        try:
            print("ota: %s; restarting: boot.py installs it" % (
                "not enough memory beside the app" if isinstance(e, MemoryError) else e))
        except MemoryError:
            pass
    if live.posts:  # a post begun afresh, whatever the last one met
        live.posts.close()
        live.posts = live._posts()
    began = ticks_ms()
    while live.posts and c.n and ticks_diff(ticks_ms(), began) < 1000:
        try:
            next(live.posts)
        except Exception:
            break
        time.sleep(0.01)
    live.stop()
    notify = getattr(os, "dupterm_notify", None)
    if not notify:
        return _reset()
    c.key = 4
    notify(None)
