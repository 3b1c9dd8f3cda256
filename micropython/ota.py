# ota.py: over-the-air updates from an ota-promoter server, for MicroPython.
#
#   import ota
#   ota.update("http://192.168.0.10:9090")  # boot.py: install what changed, reset if any
#   ota.live("http://192.168.0.10:9090")    # then: main.py runs, and each save restarts it
#   ota.watch("http://192.168.0.10:9090")   # or: update and reset on every save, forever
#
# This is the part that stays in memory while the app runs: live mode and the
# console, which a machine.Timer drives without ever blocking the app, and the
# fronts of update(), recover() and watch(), which import ota_update.py (the
# download, the checks, the journal) only when called and drop it afterwards.
# Runs on CPython 3.9+ as well, for the tests.

import binascii
import json
import os
import select
import socket
import sys

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


try:
    from time import ticks_diff, ticks_ms
except ImportError:  # CPython
    from time import perf_counter

    def ticks_ms():
        return int(perf_counter() * 1000)

    def ticks_diff(a, b):
        return a - b


try:
    from io import IOBase  # MicroPython: what makes a class a stream for os.dupterm
except ImportError:
    IOBase = object

_EINPROGRESS = const(115)  # a non-blocking connect under way, on lwip, Linux and ESP-IDF alike
_CONSOLE = const(1024)  # console bytes held for the server; the oldest are dropped and counted
_PROMPT = const(3000)  # ms the app has to stop after Ctrl-C before the board is reset
_STATE = ".ota"


class OTAError(Exception):
    pass


def _installed(root):
    # Not open() of a missing file: on the unix port of 1.20 its object is left with
    # fd 0 and closes that when collected (extmod/vfs_posix_file.c, fixed since).
    try:
        os.stat(root + "/" + _STATE)
        with open(root + "/" + _STATE, "rb") as f:
            return f.readline()[:-1].decode()
    except OSError:
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


def _reset():
    try:
        import machine

        machine.reset()
    except (ImportError, AttributeError):
        pass  # not a board: CPython or the unix port


# -- Update, recover and watch: in ota_update.py -------------------------------------


_named = None  # the version the server named at this boot's last update, set by ota_update


def _run(name, *args):
    # Call ota_update's function; the module is dropped afterwards if this call
    # imported it, so that live mode keeps only this file in memory. Whatever goes
    # wrong (no memory to import it, a bug) is an OTAError: nothing escapes boot.py.
    mine = "ota_update" not in sys.modules
    try:
        import ota_update

        return getattr(ota_update, name)(*args)
    except Exception as e:
        if isinstance(e, OTAError):
            raise
        if mine:
            sys.modules.pop("ota_update", None)  # first: what it held is free for the message
        try:
            e = OTAError("%s failed: %r" % (name, e))
        except MemoryError:
            e = OTAError("not enough memory")
        raise e
    finally:
        if mine:
            sys.modules.pop("ota_update", None)


def update(url, root="/", token=None, reset=True, delete=True, timeout=10, ca=None):
    """Install the files that changed on the server; True if any did.

    Resets the board after a change when reset is true. Deletes files the server
    no longer has only if this client installed them (and delete is true).
    Raises OTAError, with the board's files as they were, if anything fails.
    """
    return _run("update", url, root, token, reset, delete, timeout, ca)


def recover(root="/"):
    """Finish, or undo, an update a power cut or a failure interrupted; remove staged files."""
    return _run("recover", root)


def watch(url, root="/", token=None, reset=True, wait=30, timeout=10, ca=None):
    """Update on every new version the server publishes, forever (for development)."""
    return _run("watch", url, root, token, reset, wait, timeout, ca)


# -- Live mode: a Timer callback that never waits --------------------------------------


class _Console(IOBase):
    """The stream given to os.dupterm: holds what the REPL prints for the server."""

    def __init__(self, keep):
        self.buf = bytearray(_CONSOLE if keep else 0)
        self.n = self.dropped = self.key = self.sending = 0
        self.prompt = False

    def write(self, data):
        # Called inside every print: keeps the newest output (the last line of a
        # traceback says what went wrong) and counts what it drops: the oldest bytes
        # not being sent. It never waits and never raises (an exception would make
        # os.dupterm drop the stream).
        n = len(data)
        size = len(self.buf)
        cut = min(n - size + self.n, self.n - self.sending)
        if cut > 0:
            self.buf[self.sending : self.n - cut] = self.buf[self.sending + cut : self.n]
            self.n -= cut
            self.dropped += cut
        k = min(n, size - self.n)
        self.buf[self.n : self.n + k] = data[n - k :]
        self.n += k
        self.dropped += n - k
        if n:
            # The friendly REPL writes its prompt alone (shared/readline: readline_init)
            self.prompt = data == b">>> "
        return n

    def readinto(self, b):
        # The key live mode presses to restart the app (Ctrl-C, then Ctrl-D), once.
        if self.key:
            b[0] = self.key
            self.key = 0
            return 1
        return None  # no input: os.dupterm takes it as EAGAIN

    def sent(self, k, dropped):
        # The server took the first k bytes and the count of dropped ones.
        self.buf[: self.n - k] = self.buf[k : self.n]
        self.n -= k
        self.dropped -= dropped
        self.sending = 0


class _Link:
    """One HTTP exchange at a time on a non-blocking socket; step() never waits."""

    def __init__(self):
        self.s = self.parts = None
        # Answers are read up to the end of their head, through this buffer; the
        # body of a version answer (a 200 of /files/version, under 64 bytes) into it.
        self.buf = bytearray(64)
        self.mv = memoryview(self.buf)
        self.backoff = self.since = 0
        self.next = 1000

    def resting(self):
        # True for backoff ms: after a failure (1, 2, 4, 8, then 10 s) or an early answer.
        return self.backoff and ticks_diff(ticks_ms(), self.since) < self.backoff

    def rest(self, ms):
        # After an exchange that succeeded: the next failure backs off 1 s again.
        self.next = 1000
        self.backoff = ms
        self.since = ticks_ms()

    def fail(self):
        self.close()
        self.backoff = self.next
        self.next = min(self.next * 2, 10000)
        self.since = ticks_ms()

    def close(self):
        if self.s:
            self.s.close()
        self.s = None
        self.parts = None

    def start(self, address, family, head, body, ms, version=False):
        # A kept-alive connection the server has closed in the meantime reads as ready.
        if self.s and self.poll.poll(0):
            self.close()
        if not self.s:
            s = self.s = socket.socket(family)
            s.setblocking(False)
            try:
                s.connect(address)
            except OSError as e:
                if e.args[0] != _EINPROGRESS:
                    raise
            self.poll = select.poll()
        self.poll.register(self.s, select.POLLOUT)
        self.parts = [head, body]
        self.status = self.n = 0
        # None: the answer is read up to the end of its head; with version, False
        # until then, and True while the body of a 200, a version answer, is read.
        self.body = False if version else None
        self.ms = ms
        self.started = ticks_ms()

    def step(self):
        # None while the exchange is under way, then the answer's status; for a
        # version answer, once its body is in buf[:n]. Raises OSError if the
        # connection fails or the exchange takes over its time, ValueError if the
        # answer is not HTTP or the version answer is too long.
        if ticks_diff(ticks_ms(), self.started) > self.ms:
            raise OSError("timed out")
        for _ in range(8):  # a bound on the work of one tick
            ready = self.poll.poll(0)
            if not ready:
                return None
            if ready[0][1] & (select.POLLERR | select.POLLHUP) and not ready[0][1] & select.POLLIN:
                raise OSError("connection refused or lost")
            if self.parts:
                part = self.parts[0]
                n = self.s.send(part)
                if n < len(part):
                    self.parts[0] = part[n:]
                else:
                    self.parts.pop(0)
                    if not self.parts:
                        self.poll.modify(self.s, select.POLLIN)
                continue
            # After the bytes kept in buf[:n]: the status line's start, the last 3
            # bytes of the head (its end may be cut between two reads), the body.
            if self.n == len(self.buf):
                raise ValueError  # a version answer too long
            n = (self.s.readinto if hasattr(self.s, "readinto") else self.s.recv_into)(self.mv[self.n :])
            if n is None:
                return None
            if not n:
                if not self.body:
                    raise OSError("connection closed")
                return self.status  # the body ends with the connection
            n += self.n
            if not self.body:
                if not self.status:
                    if n < 12:
                        self.n = n
                        continue
                    self.status = int(bytes(self.buf[9:12]))  # ValueError if not HTTP; 1.20 has no int(bytearray)
                end = self.buf.find(b"\r\n\r\n", 0, n)
                if end < 0:
                    self.buf[:3] = self.buf[n - 3 : n]
                    self.n = 3
                    continue
                if self.body is None or self.status != 200:
                    return self.status
                self.body = True
                end += 4
                n -= end
                self.buf[:n] = self.buf[end : end + n]
            self.n = n
            end = self.buf.find(b"}", 0, n) + 1  # the end of {"version": "..."}
            if end:
                self.n = end
                return self.status
        return None


class _Live:
    """Live mode's state, advanced by tick() from a Timer's soft callback."""

    def __init__(self, url, root, token, console, wait, timeout):
        # version: what the board has installed; named: what the server named at
        # the last update, which the long-poll waits to change.
        self.url = url
        self.root = root
        self.token = token
        self.wait = max(int(wait), 1)
        self.timeout = timeout
        self.where, host, port, self.family, self.prefix, tls = _where(url)
        if tls:
            raise OTAError("live mode speaks http:// only, for the bench: give the server's http:// url")
        self.address = None
        self.head = "Host: %s\r\nX-OTA-Device: %s\r\n%s" % (
            self.where, _device(), "Authorization: Bearer %s\r\n" % token if token else "")
        self.host = host, port
        self.version = self.named = _installed(root)
        self.check = _Link()
        self.post = _Link() if console else None
        self.console = None
        self.timer = None
        self.restart = None

    def request(self, line, extra):
        return ("%s HTTP/1.1\r\n%sX-OTA-Version: %s\r\n%s\r\n" % (
            line, self.head, self.version or "none", extra)).encode()

    def tick(self, timer=None):
        """One step of live mode: returns at once, never raises."""
        c = self.console
        prompt = c and c.prompt  # what this prints is live mode's: the REPL still waits
        try:
            if self.restart is not None:
                return self._restarting()
            if self.address is None:  # resolved once: a name costs a DNS lookup here
                self.address = socket.getaddrinfo(self.host[0], self.host[1], self.family)[0][-1]
            self._check()
            if self.post:
                self._post()
        except Exception as e:  # a bug must not stop live mode: said once per failure
            print("ota: live mode: %r" % e)
            self.check.fail()
        finally:
            if c:
                c.prompt = c.prompt or prompt

    def _check(self):
        link = self.check
        if link.resting():
            return
        try:
            if link.parts is None:
                link.start(self.address, self.family, self.request(
                    "GET %s/files/version?wait=%d" % (self.prefix, self.wait),
                    'If-None-Match: "%s"\r\n' % self.named if self.named else ""), b"",
                    (self.wait + self.timeout) * 1000, True)
                return
            status = link.step()
            if status is None:
                return
            link.close()  # a long-poll's connection is not kept
            version = self.named
            if status == 200:
                version = json.loads(link.buf[: link.n])["version"]  # ValueError if not JSON
        except (OSError, ValueError):
            return link.fail()
        if status != 200 and status != 304:
            print("ota: live mode: HTTP %d from %s" % (status, self.where))
            return link.fail()
        # Nothing new, or an update that changed nothing: answered at once (a server
        # that ignores wait, a static host), the next long-poll waits a second.
        early = ticks_diff(ticks_ms(), link.started) < 1000
        if version != self.named and version != self.version:
            try:  # the app pauses for the download
                changed = _run("_update", self.url, self.root, self.token, False, True, self.timeout, None)[1]
            except OTAError as e:
                print("ota: %s; live mode retries" % e)
                return link.fail()
            self.version = _installed(self.root)
            if changed:
                self.restart = ticks_ms()
                return self._restarting()
            # Tried, and nothing to install: the long-poll now waits for another
            # version than this one, even where it and /files/version disagree
            # (a cache, two servers behind one address).
            self.named = version
            early = True
        link.rest(1000 if early else 0)

    def _post(self):
        link = self.post
        c = self.console
        if link.resting():
            return
        try:
            if link.parts is None:
                if not c.n and not c.dropped:
                    return
                self.k = c.sending = min(c.n, 1024)  # the protocol's largest body
                self.d = c.dropped
                link.start(self.address, self.family, self.request(
                    "POST %s/console" % self.prefix, "Content-Length: %d\r\n%s" % (
                        self.k, "X-OTA-Dropped: %d\r\n" % self.d if self.d else "")),
                    memoryview(c.buf)[: self.k], self.timeout * 1000)
            status = link.step()
        except (OSError, ValueError):
            c.sending = 0
            return link.fail()
        if status is None:
            return
        link.parts = None
        c.sending = 0
        if status == 404 or status == 405:
            print("ota: %s has no console: upgrade the server" % self.where)
            link.close()
            self.post = None
            return
        if status != 204:
            print("ota: console: HTTP %d from %s" % (status, self.where))
            return link.fail()  # the output waits; what no longer fits is counted
        link.rest(0)
        c.sent(self.k, self.d)

    def _restarting(self):
        # Restart main.py on the new files as a remote REPL does: Ctrl-C through the
        # console stream, then, once the REPL shows its prompt, Ctrl-D: a soft reset.
        c = self.console
        notify = getattr(os, "dupterm_notify", None)
        if c and notify and ticks_diff(ticks_ms(), self.restart) < _PROMPT:
            if not c.prompt:
                if c.key != 3 and not self.interrupted:
                    self.interrupted = True
                    c.key = 3
                    notify(None)
                if self.post:
                    self._post()
                return
            self.stop()
            c.key = 4
            notify(None)
            return
        self.stop()
        _reset()  # no console stream, or the app caught KeyboardInterrupt

    def stop(self):
        if self.timer:
            self.timer.deinit()
        self.check.close()
        if self.post:
            self.post.close()


_live = None


def live(url, root="/", token=None, console=True, wait=30, timeout=10, period=100):
    """Arm live mode and return at once: every period ms a Timer checks the server
    without waiting; a new version is installed and main.py restarted on it.

    With console, what the REPL prints is sent to the server (POST /console).
    Returns the live-mode object (tests call its tick() where there is no Timer).
    """
    global _live
    if _live:
        _live.stop()
    _live = live = _Live(url, root.rstrip("/"), token, console, wait, timeout)
    live.interrupted = False
    # Attached even without console: the restart presses its keys through it.
    live.console = _Console(console)
    if hasattr(os, "dupterm"):  # not on CPython and the unix port: tests call write()
        os.dupterm(live.console, 0)  # ESP8266: slot 0, as slot 1 is the UART
    try:
        from machine import Timer
    except ImportError:
        return live  # CPython and the unix port: tests call tick()
    # -1: a virtual timer on ESP8266 and RP2040 and, in MicroPython 1.21+, ESP32;
    # ESP32's 1.20 takes it as hardware timer 3. Soft everywhere (mp_sched_schedule).
    live.timer = Timer(-1)
    live.timer.init(period=period, mode=Timer.PERIODIC, callback=live.tick)
    return live
