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
# Live mode never downloads beside the app: it stops the app first (it is
# restarted on the new files anyway), so the app is never frozen mid-step and
# an update never needs the app's memory. Runs on CPython 3.9+ too, for the tests.

import gc
import json
import select
import socket
import sys

try:
    from micropython import const, schedule
    from time import ticks_diff, ticks_ms
except ImportError:  # CPython
    import time

    const = int
    ticks_diff = int.__sub__

    def schedule(function, value):
        function(value)

    def ticks_ms():
        # perf_counter, as a string of more than 10 characters: a name would be interned
        # on a board too, which never runs this (micropython/README.md: names matter)
        return int(getattr(time, "perf_counter")() * 1000)


from io import IOBase  # MicroPython: what makes a class a stream for os.dupterm; CPython has it too

_EINPROGRESS = const(115)  # a non-blocking connect under way, on lwip, Linux and ESP-IDF alike
_PROMPT = const(3000)  # ms the app has to stop after Ctrl-C before the board is reset
_RETRY = const(1000)  # ms: live mode's first retry; then 2, 4, 8, and 10 times it (looking, from there)


# What ota_update.py and the parts of an update take from here (besides the functions
# below): OTAError, const, ticks_ms, ticks_diff, reset; and live mode's state, _named
# and _live, which ota_update keeps.


class OTAError(Exception):
    pass


def reset():
    """Reset the board (machine.reset); nothing where there is none (CPython, the unix port)."""
    try:
        import machine

        machine.reset()
    except (ImportError, AttributeError):
        pass  # not a board: CPython or the unix port


# -- Update, recover and watch: in ota_update.py -------------------------------------

# What this boot's update() learnt: False until it runs, then the version the
# server named (set by ota_update), or None if it named none. live() runs update()
# if it has not run, and waits for a version other than the one it named; the
# first update() since the start (still False) counts a start of a version on trial.
_named = False
_live = None  # live mode's state, once armed
_trial = None  # the watcher of a version on trial (ota_trial.py), while it is armed


def _run(name, *args, **kw):
    # ota_update's function of that name, called with the arguments as given: the
    # one place they are forwarded. The module is dropped afterwards if this call
    # imported it, so that live mode keeps only this file in memory. Whatever goes
    # wrong (no memory to import it, a bug) is an OTAError: nothing escapes boot.py.
    mine = "ota_update" not in sys.modules
    try:
        import ota_update

        return getattr(ota_update, name)(*args, **kw)
    except OTAError:
        raise
    except Exception as e:
        raise OTAError("not enough memory" if isinstance(e, MemoryError) else "%s failed: %r" % (name, e))
    finally:
        if mine:
            sys.modules.pop("ota_update", None)
            _scrub(40)


def _scrub(n):
    # Covers the C stack where the update ran with frames of its own, then collects:
    # the GC scans the stack conservatively, and a stale word left in a frame's
    # unused slots would keep the whole dropped module alive, by chance, beside the app.
    return _scrub(n - 1) if n else gc.collect()


# The functions: each is ota_update's function of the same name, which has their
# arguments and defaults (micropython/README.md); these only import it.


def update(*args, **kw):
    """Install the files that changed on the server; True if any did."""
    return _run("update", *args, **kw)


def recover(*args, **kw):
    """Finish, or undo, an update a power cut or a failure interrupted; remove staged files."""
    return _run("recover", *args, **kw)


def watch(*args, **kw):
    """Update on every new version the server publishes, forever (for development)."""
    return _run("watch", *args, **kw)


# The boot guard's one call here: the rest is in ota_guard.py (at the start) and in
# ota_trial.py (the watcher, resident only while a version is on trial).


def confirm():
    """Keep the version on trial for good, now: a rename (nothing if none is)."""
    if _trial:
        _trial.confirm()


def live(*args, **kw):
    """Arm live mode and return: a new version stops the app, is installed, and
    main.py restarts on it. Runs update() first if it has not run since boot.
    Returns the live-mode object (tests call its tick() where there is no Timer)."""
    return _run("live", *args, **kw)


# -- Live mode: a Timer callback that never waits --------------------------------------


class _Live(IOBase):
    """Live mode, advanced one step at a time by tick(), from a Timer's soft callback,
    and the console: the stream given to os.dupterm, which holds what the REPL prints
    for the server (one object: what stays in memory beside the app is the budget).

    Two tasks, each a generator that yields whenever it would wait: the checks (a
    long-poll of the server's version, which also brings what is typed for the REPL,
    and, after 15 s without the server, a look for it: ota_find.py) and the
    console's posts. A version other
    than the one installed (which the app runs) and the one the server named when
    nothing could be installed is confirmed with a plain GET /files/version (what
    update() reads), then the app is stopped (Ctrl-C through the console stream),
    and ota_update installs it while the REPL idles and restarts main.py (ota_live.restart).
    Its state is set by ota_live.live, once (see there).
    """

    # Set only once the app is being stopped, or input comes: until then the instance
    # holds 16 names (a board's Timer included), which fit a table of 17 slots where 18 take 23.
    key = 0  # the key readinto() hands the REPL, once: Ctrl-C, then Ctrl-D
    # At a prompt: 1 (-1: the raw REPL's), one more (less) per character typed on its
    # line; 0 otherwise. 1 is "the app has stopped"; +-1 makes Ctrl-D a soft reset.
    prompt = 0
    typed = b""  # what the server's input answers brought, for readinto() to hand the REPL
    fed = False  # typed was handed to the REPL: its next prompt is posted at once

    def write(self, data):
        # Called inside every print: keeps the newest output (the last line of a
        # traceback says what went wrong) and counts what it drops: the oldest bytes
        # not being sent. It never waits and never raises: os.dupterm drops for good a
        # stream whose write() raises (extmod/os_dupterm.c), MemoryError included, and
        # a KeyboardInterrupt that lands here (checks press Ctrl-C until it stops the app).
        if _trial:  # a version on trial: its watcher notes it too, and never raises
            _trial.write(data)
        n = len(data)
        buf = self.buf
        held = self.n
        sending = self.sending
        try:
            if data == b">>> ":  # the friendly REPL writes its prompts alone (shared/readline)
                self.prompt = 1  # seen: the REPL idles, the app has stopped
            elif data == b">":  # and the raw REPL (shared/runtime/pyexec.c), as mpremote uses it
                self.prompt = -1
            cut = min(n - len(buf) + held, held - sending)
            if cut > 0:
                buf[sending : held - cut] = buf[sending + cut : held]
                held -= cut
                self.n = held
                self.dropped += cut
            k = min(n, len(buf) - held)
            buf[held : held + k] = data if k == n else data[n - k :]  # no copy when all fits
            self.n = held + k
            self.dropped += n - k
            if self.fed and (data == b">>> " or data == b"... "):
                # The echo of what was typed, and its result, posted now, not at the next tick
                self.fed = False
                try:
                    schedule(self.tick, None)
                except Exception:  # its queue is full, or no memory for the bound method: the next tick posts it
                    pass
        except BaseException:  # no memory for a slice: this output is lost, and counted
            self.dropped += n
        return n

    def readinto(self, buf):
        # The key live mode presses (Ctrl-C, then Ctrl-D), once; then what the server
        # typed, a byte a call (os.dupterm reads one). Never raises: os.dupterm drops
        # for good a stream whose read raises, and takes 0 for its end.
        if self.key:
            buf[0] = self.key
            self.key = 0
            return 1
        t = self.typed
        if t:
            try:
                self.typed = t[1:]
            except MemoryError:
                return None  # read again at the next notify
            c = buf[0] = t[0]
            p = self.prompt
            if c == 4 and p * p == 1:  # Ctrl-D at an empty line, either REPL's: a soft reset, which
                self.stop()  # an armed Timer must not outlive (ESP8266: its soft reset keeps it)
            if p > 0 and (c == 8 or c == 127):  # erased (the raw REPL edits nothing)
                p = p - 1 or 1
            elif p and 31 < c != 127 and c & 0xC0 != 0x80:  # a character (its first byte) on the line
                p += 1 if p > 0 else -1
            elif p < 0 and c == 3:  # the raw REPL's Ctrl-C empties its line
                p = -1
            elif not c & 0x80:  # Enter, a control key: the REPL may run something now
                p = 0
            self.prompt = p
            self.fed = True
            return 1
        # else None: no input, which os.dupterm takes as EAGAIN

    def tick(self, timer=None):
        """One step of each task: returns at once, never raises."""
        if _trial:  # it never raises either
            _trial.tick()
        try:
            if self.checks is False:
                self.checks = self._checks(1000)
            if self.checks:
                next(self.checks)
        except StopIteration:  # the app is being restarted
            self.checks = None
        except (Exception, KeyboardInterrupt):  # no memory (they catch the rest): begun again, next tick
            self.checks = False
        try:
            if self.posts:  # apart: a failure to post never holds the checks
                next(self.posts)
        except (Exception, KeyboardInterrupt):  # the server has no console
            self.posts = None

    def _ask(self, s, line, extra, data, ms, buf, version):
        # One HTTP exchange on a non-blocking socket: s, kept alive, or a new one;
        # data: the body to send, or None. (Arguments named as ROM or other names are:
        # each name a module uses is interned for good, micropython/README.md.)
        # A generator: it yields whenever it would wait, and after 8 reads, so each
        # step returns at once. Sends the request, reads the answer's head through
        # buf and, with version, the body of a 200 ({"version": "..."}) into buf.
        # Returns (socket, status, bytes of body in buf). Raises OSError if the
        # connection fails or the exchange takes over ms, ValueError if the answer
        # is not HTTP or its body does not fit; the socket is closed then.
        p = select.poll()
        if s:
            p.register(s, select.POLLIN)
            if p.poll(0):  # a kept-alive connection the server has closed reads as ready
                s.close()
                s = None
        try:
            if not s:
                s = socket.socket(self.host[2])
                s.setblocking(False)
                try:
                    s.connect(self.address)
                except OSError as e:
                    if e.args[0] != _EINPROGRESS:
                        raise
            p.register(s, select.POLLOUT)
            began = ticks_ms()
            out = [("%s\r\n%s%s\r\n" % (line, self.head, extra)).encode()]  # what is left to send
            if data:
                out.append(data)
            # Made once per connection, so that a read makes no object (a slice only
            # after a short one, as mip): the reader, and views of buf, whole and after
            # the 3 bytes a read of the head keeps.
            read = s.readinto if hasattr(s, "readinto") else s.recv_into  # MicroPython; CPython
            mv = memoryview(buf)
            tail = mv[3:]
            n = status = reads = 0
            head = True
            while True:
                if ticks_diff(ticks_ms(), began) > ms:
                    raise OSError  # timed out: the reason is never shown, and costs memory
                ready = p.poll(0)
                if not ready or reads == 8:
                    reads = 0
                    yield
                    continue
                if out:
                    out[0] = out[0][s.send(out[0]) :]
                    if not out[0]:
                        out.pop(0)
                        if not out:
                            p.modify(s, select.POLLIN)
                    continue
                # After the bytes kept in buf[:n]: the status line's start, the last 3
                # bytes of the head (its end may be cut between two reads), the body.
                reads += 1
                if n == len(buf):
                    raise ValueError  # a version answer too long
                k = read(tail if n == 3 else mv[n:])
                if k is None:
                    continue
                if not k:
                    if head:
                        raise OSError  # closed
                    return s, status, n  # the body ends with the connection
                n += k
                if head:
                    if not status:
                        if n < 12:
                            continue
                        status = int(bytes(buf[9:12]))  # ValueError if not HTTP; 1.20 has no int(bytearray)
                    end = buf.find(b"\r\n\r\n", 0, n)
                    if end < 0:
                        mv[:3] = mv[n - 3 : n]
                        n = 3
                        continue
                    if not version or status != 200:
                        return s, status, 0
                    head = False
                    end += 4
                    n -= end
                    buf[:n] = buf[end : end + n]
                end = buf.find(b"}", 0, n) + 1  # the end of {"version": "..."}
                if end:
                    return s, status, end
        except BaseException:
            s.close()
            raise

    def _version(self, line, extra, ms, buf):
        # The version a GET of /files/version names; a 304's is the one asked about.
        # None for input, the long-poll's other answer ({"in": "..."}, at most 64
        # bytes): queued for the REPL, which the port is told to read (os.dupterm_notify).
        s, status, n = yield from self._ask(None, line, extra, None, ms, buf, True)
        s.close()  # not kept: a long-poll holds its connection
        if status == 304:
            return self.named
        if status != 200:
            print("ota: HTTP %d from %s" % (status, self.host[0]))
            raise ValueError
        answer = json.loads(buf[:n])
        if "in" not in answer:
            return answer["version"]
        self.typed += answer["in"].encode()
        import os

        notify = getattr(os, "dupterm_notify", None)  # as the Ctrl-C below: the REPL reads it
        if notify:
            schedule(notify, None)

    def _checks(self, wait):
        # The long-poll, for ever; a server that is away costs a retry 1, 2, 4, 8, then
        # every 10 s, each of those after looking for it (ota_find.py), and one that
        # answers at once (ignoring the long-poll's wait, a static host) a second's rest;
        # input, none. A half-open connection is given up the long-poll's wait + 3 s after
        # it began. wait: ms before the first check (named as live()'s argument: a name
        # interned already, micropython/README.md).
        pause = wait
        buf = bytearray(64)  # what a version answer, or an input answer (in=64), fits in
        fails = 0
        while True:
            if fails > 4 and (yield from self._look()):  # found elsewhere: tried at once
                pause = 0
            began = ticks_ms()
            while ticks_diff(ticks_ms(), began) < pause:
                yield
            began = ticks_ms()
            try:
                if self.address is None:  # resolved once: a name costs a DNS lookup
                    self.address = socket.getaddrinfo(*self.host)[0][-1]
                polled = yield from self._version(
                    self.lines[0], 'If-None-Match: "%s"\r\n' % self.named if self.named else "", self.held, buf)
                fails = 0
                if polled is None:  # input: the next long-poll at once
                    pause = 0
                    continue
                pause = 1000 if ticks_diff(ticks_ms(), began) < 1000 else 0
                if polled == self.version:  # a version named at boot, then withdrawn
                    self.named = polled
                elif polled != self.named:
                    new = polled  # a long-poll the server held: it names what changed
                    if pause:  # answered at once (a cache?): /files/version decides, as update() reads it
                        new = yield from self._version(self.lines[1], "", self.ms, buf)
                    if new != self.named and new != self.version:
                        print("ota: version %s: stopping the app to install it" % new[:7])
                        break
                    # A cache, or a second server behind the address: the long-poll
                    # names a version /files/version does not; it now waits for another.
                    self.named = polled
                    pause = 1000
            except Exception as e:
                if not isinstance(e, (OSError, ValueError, MemoryError)):
                    print("ota: live mode: %r" % e)
                pause = min(_RETRY << fails, _RETRY * 10)
                fails = min(fails + 1, 5)  # 5: 15 s of failures
        # Stop the app as a remote REPL does: Ctrl-C through the console stream. Once
        # the REPL shows its prompt, or after 3 s, ota_update installs the version and
        # restarts main.py (ota_live.restart).
        import os

        began = ticks_ms()
        notify = getattr(os, "dupterm_notify", None)  # the ports that read the stream (micropython/README.md)
        # Until the REPL shows its prompt, and the console has posted what was said.
        # Ctrl-C again at each tick (one that lands while the app prints is lost),
        # through micropython.schedule: run as a callback of its own, the port's code
        # that reads it returns to the app, where the KeyboardInterrupt is raised (on
        # a threaded port, ESP32, RP2040, a Ctrl-C read inside this tick would be
        # raised in this tick: py/vm.c checks at every branch).
        while notify and (self.prompt != 1 or self.n) and ticks_diff(ticks_ms(), began) < _PROMPT:
            if self.prompt != 1:
                self.key = 3
                schedule(notify, None)
            yield
        try:
            _run("restart", self)
        except OTAError as e:  # not even the installer loads: a reset, and boot.py's update()
            try:
                print("ota: %s; resetting: boot.py installs it" % e)
            finally:
                reset()

    def _look(self):
        # ota_find's look, after 15 s without the server: imported for it, and dropped
        # after (as _run does ota_update). True if it found the server elsewhere.
        if not self.args[3]:  # live(find=None)
            return False
        try:  # its name built, so interned only once it is imported (ota_update.py: Names)
            return (yield from __import__("ota_" + "find").look(self))
        except Exception:  # no memory for it, no network: looked again at the next retry
            return False
        finally:
            sys.modules.pop("ota_" + "find", None)

    def _posts(self):
        # What the console holds, posted as it comes (POST /console, at most 1,024
        # bytes each) on a kept-alive connection; after a failure the output waits,
        # and what no longer fits is counted, 1, 2, 4, 8, then 10 s.
        buf = bytearray(64)
        s = None
        fails = 0
        while True:
            if not self.n and not self.dropped:
                yield
                continue
            try:  # sent at once, in the step that took the last answer: one post a tick
                k = self.sending = min(self.n, 1024)
                d = self.dropped
                s, status, _ = yield from self._ask(s, self.lines[2], "Content-Length: %d\r\n%s" % (
                    k, "X-OTA-Dropped: %d\r\n" % d if d else ""), memoryview(self.buf)[:k], self.ms, buf, False)
                self.sending = 0
                if status == 404 or status == 405:
                    print("ota: %s has no console: upgrade the server" % self.host[0])
                    s.close()
                    return
                if status != 204:
                    print("ota: HTTP %d from %s" % (status, self.host[0]))
                    raise ValueError
                # Taken: the first k bytes, and the count of those dropped before them
                self.buf[: self.n - k] = self.buf[k : self.n]
                self.n -= k
                self.dropped -= d
                fails = 0
            except Exception:  # a closed socket, no memory: the output waits
                self.sending = 0
                if s:
                    s.close()
                s = None
                began = ticks_ms()
                while ticks_diff(ticks_ms(), began) < min(1000 << fails, 10000):
                    yield
                fails = min(fails + 1, 4)

    def stop(self):
        """Disarm the timer and close the connections."""
        if self.timer:
            self.timer.deinit()
        for task in (self.checks, self.posts):
            try:
                task.close()  # its socket is closed at the yield it waits at
            except Exception:
                pass  # none, or the task that is stopping live mode
        self.checks = self.posts = None
