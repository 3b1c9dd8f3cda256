# ota_trial.py: the watcher of a version on trial, resident only while it lasts
# (ota_guard.py arms it at the start; it drops itself once the trial ends here).
#
# A console stream (os.dupterm slot 0) whose write() notes a traceback's error line
# and the REPL's prompt (main.py ended), and a timer tick, every second, that acts:
# the prompt after a traceback is a crash (written to .ota-new/crash, then a reset:
# the next start rolls back); after KeyboardInterrupt (the app was stopped: live
# mode, mpremote), the watcher disarms and the trial stays pending; after no
# traceback, or guard seconds from the start, the version is confirmed. With live
# mode armed, live mode owns the timer and the slot, and forwards to this one
# (ota._Live.write and tick). An ESP8266 crashes on a soft reset with a virtual
# timer armed: so the watcher disarms at the prompt, whatever came before it.

import os
import sys

import ota
from ota import IOBase, schedule, ticks_diff, ticks_ms

_HEAD = b"Traceback (most recent call last):"


class Watcher(IOBase):
    timer = None  # its own machine.Timer; None once live mode ticks it (ota._Live.tick)
    prior = None  # what had os.dupterm slot 0 (WebREPL), given back at the end
    line = b""  # the start of the line being written in a traceback, at most 200 bytes
    error = None  # None: no traceback; b"": in one; then the line that names its exception
    prompt = False  # the friendly REPL's prompt was written: main.py has ended

    def __init__(self, root, version, guard):
        self.stage = root + "/.ota-new/"
        self.version = version  # its first 7 hex, for the console
        self.ms = int(guard * 1000)  # 0: only ota.confirm() confirms
        self.began = ticks_ms()

    def write(self, data):
        # Notes what the REPL prints; never acts, never raises (os.dupterm drops for
        # good a stream whose write() raises), and keeps no reference to data (a
        # view of the port's own buffer).
        n = len(data)
        try:
            if data == b">>> ":  # the friendly REPL writes its prompt alone (shared/readline)
                self.prompt = True
                schedule(self.tick, None)  # acted on at once: a Ctrl-D may follow
                return n
            i = data.find(_HEAD)
            if i >= 0:
                self.error = self.line = b""
                data = data[i + len(_HEAD) :]
            if self.error == b"":  # its frames (indented), then the line that names the exception
                line = self.line + data
                while True:
                    i = line.find(b"\n")
                    if i < 0:
                        break
                    text = line[:i].rstrip(b"\r")
                    if text and text[:1] != b" ":
                        self.error = text[:200]
                        break
                    line = line[i + 1 :]
                self.line = line[:200]
        except BaseException:  # no memory: this output is not noted
            pass
        return n

    def readinto(self, b):
        return None  # no input: os.dupterm takes it as EAGAIN

    def tick(self, timer=None):
        """Acts on what write() noted, or on the time; returns at once, never raises."""
        if ota._trial is not self:
            return
        if ota._live and timer:  # live mode armed: from now its timer and stream tick and feed this one
            self.stop(False)
            ota._trial = self
            return
        try:
            error = self.error
            if self.prompt:
                if error is None:  # main.py returned
                    self.confirm()
                elif error[:17] == b"KeyboardInterrupt":  # stopped: the next start counts
                    self.stop()
                else:
                    try:
                        with open(self.stage + "crash", "wb") as f:
                            f.write(error)
                    except OSError:  # a full flash: the reset still comes, and counts as one
                        pass
                    if ota._live:
                        ota._live.stop()
                    self.stop()
                    ota.reset()  # the next start rolls back
            elif self.ms and ticks_diff(ticks_ms(), self.began) >= self.ms:
                self.confirm()
        except (Exception, KeyboardInterrupt):  # no memory, a full flash: tried again at the next tick
            pass

    def confirm(self):
        """Keep the version on trial: its old files go at the next update() or recover()."""
        self.stop()
        try:
            os.rename(self.stage + "trial", self.stage + "done")
        except OSError:
            return  # ended already
        print("ota: version %s confirmed" % self.version)

    def stop(self, drop=True):
        """Disarm: the timer off, the console slot given back (unless live mode
        took it), this module dropped."""
        if self.timer:
            self.timer.deinit()
            self.timer = None
            if not ota._live:
                os.dupterm(self.prior, 0)
        ota._trial = None
        if not drop:
            return
        sys.modules.pop("ota_trial", None)
        # The scheduler's queue (8 slots, py/scheduler.c) keeps the callbacks it ran,
        # the timer's and the prompt's (self.tick): a slot this one holds would keep
        # the watcher, and this module, in memory for good. Refilled with a builtin.
        try:
            for _ in range(8):
                schedule(id, None)
        except Exception:  # full: those pending refill the slots
            pass


def arm(root, version, guard):
    """Watch the version on trial from now; returns the watcher (ota._trial)."""
    w = ota._trial = Watcher(root, version, guard)
    try:
        from machine import Timer
    except ImportError:
        return w  # CPython and the unix port: tests call write() and tick()
    if hasattr(os, "dupterm"):
        w.prior = os.dupterm(w, 0)  # ESP8266: slot 0, as slot 1 is the UART (and live mode's)
        # -1: a virtual timer on ESP8266 and RP2040, and ESP32 since 1.21 (ota_live.live)
        w.timer = Timer(-1)
        w.timer.init(period=1000, mode=Timer.PERIODIC, callback=w.tick)
    return w
