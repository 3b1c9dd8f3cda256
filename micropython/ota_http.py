# ota_http.py: the HTTP client of an update: one request at a time, its answer
# read through one buffer within a deadline, every failure an OTAError.
# ota_check.py and ota_fetch.py use it; ota_update.py drops it with them, and
# arms live mode with parse() and head(), so that ota.py's requests say the same.

import binascii
import json
import select
import socket

from ota import OTAError, const, ticks_diff, ticks_ms

_LINE = const(256)  # longest header line read: a Location, an X-Target-Path
_HEADERS = const(32)  # most header lines an answer may have


def parse(url):
    """(host:port as written, host, port, address family, path prefix, https?) of a url."""
    i = url.find("://")
    tls = url[:i] == "https"
    if not tls and url[:i] != "http":
        raise OTAError("url must start with http:// or https://, not %r" % url)
    rest = url[i + 3 :].rstrip("/")
    i = rest.find("/")
    if i < 0:
        i = len(rest)
    where = rest[:i]
    try:
        port = 443 if tls else 80
        host = where.encode()  # bytes: a str of one character would be a name interned for good
        i = host.rfind(b":")
        if i > host.rfind(b"]"):  # a port, after a name or a [v6 address]
            port = int(host[i + 1 :])
            host = host[:i]
        family = socket.AF_INET
        if host[:1] == b"[" and host[-1:] == b"]":
            host = host[1:-1]
            family = socket.AF_INET6
        elif b":" in host or b"]" in host:
            raise ValueError
        host = host.decode()
    except Exception:
        raise OTAError("bad host or port in %r" % url)
    return where, host, port, family, rest[len(where) :], tls


def head(where, version, token, extra=None):
    """The header lines every request of this client sends (live mode's too); extra:
    more of them, whole (the boot guard's X-OTA-Rolled-Back: ota_guard.start)."""
    return "".join(("Host: %s\r\nX-OTA-Device: %s\r\nX-OTA-Version: %s\r\n" % (where, _device(), version or "none"),
                    "Authorization: Bearer %s\r\n" % token if token else "", extra or ""))


def _device():
    try:
        import machine

        return binascii.hexlify(machine.unique_id()).decode()
    except (ImportError, AttributeError):
        return "unknown"


class Server:
    def __init__(self, url, token, timeout, version, ca, buf, extra=None):
        # buf: the update's one buffer (ota_update.py allocates it first, whole); extra: head()'s
        # Every attribute get() sets is set here first: the table of them is then grown
        # to its size before head() is (a table grown in get() needs its room beside it).
        self.start = self.end = self.index = self.n = 0
        self.poll = self.s = None
        self.where, host, port, family, self.prefix, self.https = parse(url)
        self.host = host, port, family  # what getaddrinfo takes, as live mode's (ota._Live): one name
        self.ca = ca
        self.ms = int(timeout * 1000)
        self.buf = buf
        self.mv = memoryview(buf)
        self.extra = extra or ""  # sent after head, not copied into it (the boot guard's 200-byte report)
        self.head = head(self.where, version, token)

    def get(self, path, extra=""):
        # Sends a request and reads the answer's head: (status, length, target) of a
        # 200 or 304, its body left to read; the caller closes. Else raises OTAError.
        self.start = ticks_ms()
        self.end = self.ms
        self.index = self.n = 0
        self.poll = None
        s = self.s = socket.socket(self.host[2])
        try:
            s.settimeout(self.ms / 1000)
            s.connect(socket.getaddrinfo(*self.host)[0][-1])
            if self.https:
                # Only for https (TLS needs far more memory anyway); its name built, so
                # interned only once it is imported (ota_update.py: Names).
                s = self.s = __import__("ota_" + "tls").wrap_socket(s, self.host[0], self.ca, self.where)
            # The request in parts, the blank line that ends it being head's own end (a
            # literal "\r\n" would be a name interned): never a string of it all, the
            # largest allocation of a request (the 20 KB heap).
            request = ("GET %s%s HTTP/1.0\r\n" % (self.prefix, path), self.head, self.extra, extra, self.head[-2:])
            if hasattr(s, "readinto"):
                # MicroPython: write sends each part all while the socket blocks, and
                # takes a str (the 1.20 unix port has no sendall).
                for part in request:
                    s.write(part)
                # Then readinto waits to fill the whole buffer unless the socket does
                # not block; then it returns what has arrived.
                s.setblocking(False)
                self.poll = select.poll()
                self.poll.register(s, select.POLLIN)
            else:  # CPython
                s.sendall("".join(request).encode())
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
                    while self.index < self.n or self._fill():
                        j = self.buf.find(b"\n", self.index, self.n) + 1
                        self.index = j or self.n
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
        if status == 404 and not isinstance(message, str) or path == "/files/manifest.txt" and status == 400:
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
                wait = min(self.end - took, self.ms)
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
                if self.end == self.ms or ticks_diff(ticks_ms(), self.start) < self.end:
                    raise OTAError("no answer from %s: %s" % (self.where, e))
                continue  # the deadline passed while bytes came: said above
            if n is not None:
                self.index = 0
                self.n = n
                self.end += n
                return n

    def read(self, count):
        # Up to count bytes of the body, as a view into the buffer; empty at its end.
        # (read, a name every firmware has: micropython/README.md, names matter.)
        if self.index == self.n:
            self._fill()
        i = self.index
        j = self.index = min(self.n, i + count)
        return self.mv if j - i == len(self.buf) else self.mv[i:j]  # a full read: no slice (mip's way)

    def readline(self):
        # A line of at most _LINE bytes; shorter only at the end of the answer.
        line = b""
        while len(line) < _LINE and line[-1:] != b"\n" and (self.index < self.n or self._fill()):
            j = min(self.buf.find(b"\n", self.index, self.n) + 1 or self.n, self.index + _LINE - len(line))
            line += self.mv[self.index : j]
            self.index = j
        return line

    def close(self):
        self.s.close()
