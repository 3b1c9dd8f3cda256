# ota_live.py: arming live mode, and installing once the app has stopped. Run once
# each, so kept out of ota.py, which stays in memory beside the app; and out of
# ota_update.py, which loads it for live() and restart() only and drops it after,
# so that no step of an update holds its code (micropython/README.md: the 20 KB heap).

import os
import socket
import time

import ota
from ota import OTAError, const, ticks_diff, ticks_ms
from ota_update import _call, _drop, _installed, _kind, update

_CONSOLE = const(512)  # bytes of console output live mode holds for the server
_SLACK = const(3000)  # ms a long-poll may take beyond its wait before the server counts as gone
_INPUT = const(64)  # bytes of an input answer live mode takes (in=): its checks' buffer (ota._Live._checks)


def live(url, root="/", token=None, console=True, wait=10, timeout=10, period=100,
         find=("255.255.255.255", 9090), guard=None, resets=3):
    # ota.live(): update() first if it has not run since boot, then the state of
    # ota._Live, armed: the console stream and the Timer. (Here, and not in
    # ota_update.py, so that an update alone never interns the names of these
    # arguments and of what arms it: micropython/README.md, names matter.)
    if ota._live:
        ota._live.stop()
    root = root.rstrip("/")
    if ota._named is False:  # update() has not run since boot
        try:
            ota.update(url, root, token, timeout=timeout, guard=guard, resets=resets)
        except OTAError as e:
            print("ota: no update: %s" % e)
    where, host, port, family, prefix, tls = _call("ota_http", "parse", url)
    if tls:
        raise OTAError("live mode speaks http:// only, for the bench: give the server's http:// url")
    live = ota._Live()
    # The requests: the long-poll, the plain version check, the console's post; a
    # long-poll is given up (a half-open connection) 3 s after its wait
    wait = max(int(wait), 1)
    # The version requests in HTTP/1.0 (their connection is not kept; an answer to
    # 1.1 could come chunked), the posts in 1.1, kept alive.
    live.lines = ("GET %s/files/version?wait=%d&in=%d HTTP/1.0" % (prefix, wait, _INPUT),
                  "GET %s/files/version HTTP/1.0" % prefix, "POST %s/console HTTP/1.1" % prefix)
    live.held = wait * 1000 + _SLACK
    live.ms = int(timeout * 1000)
    live.host = host, port, family  # what getaddrinfo takes
    try:  # a name is looked up here, where waiting is free; else at a tick (micropython/README.md)
        live.address = socket.getaddrinfo(host, port, family)[0][-1]
    except Exception:
        live.address = None
    # version: what the board has installed, and the app runs; named: what the
    # server named at this boot's update (also one that failed): the long-poll
    # waits for another, so a version that cannot be installed is tried once.
    live.version = _installed(root)
    extra = _call("ota_" + "guard", "start", root)[1] if _kind(root + "/.ota-refused") else ""  # named as in ota_update
    live.head = _call("ota_http", "head", where, live.version, token, extra)
    live.guard = guard  # what restart() installs with
    # update()'s first three, once the app has stopped (restart: the url where the
    # server is now); where to look for it after 15 s without it, and what to ask the
    # one given (ota_find.look): one tuple, as each name live mode holds costs a
    # slot of its table (ota._Live)
    live.args = url, root, token, find, (live.host, live.lines, live.head, url)
    live.named = ota._named or live.version
    # The console: what the REPL prints, held for the server (the oldest is dropped
    # and counted). Attached even without console: the restart presses its keys
    # through it.
    live.buf = bytearray(_CONSOLE if console else 0)
    live.n = live.dropped = live.sending = 0  # key and prompt: ota._Live's, until the app is stopped
    live.checks = live._checks(0)
    live.posts = live._posts() if console else None
    live.timer = None
    ota._live = live
    _drop()
    if hasattr(os, "dupterm"):  # not on CPython and the unix port: tests call write()
        os.dupterm(live, 0)  # ESP8266: slot 0, as slot 1 is the UART
    print("ota: live mode, version %s" % (live.version[:7] or "none"))  # on the console: what runs now
    try:
        from machine import Timer
    except ImportError:
        return live  # CPython and the unix port: tests call tick()
    # -1: a virtual timer on ESP8266 and RP2040 and, in MicroPython 1.21+, ESP32;
    # ESP32's 1.20 takes it as hardware timer 3. Soft everywhere (mp_sched_schedule).
    trial = ota._trial
    if trial:  # a version on trial: from now live mode's timer ticks its watcher (ota_trial.py),
        trial.stop(False)  # whose own goes first: on ESP32's 1.20 both are hardware timer 3
        ota._trial = trial
    live.timer = Timer(-1)
    live.timer.init(period=period, mode=Timer.PERIODIC, callback=live.tick)
    return live


def restart(live):
    # The app has stopped (live mode pressed Ctrl-C, and the REPL shows its prompt):
    # install the version, waiting on the network as an update does, as nothing
    # runs; let the console send what that printed; then Ctrl-D, a soft reset that
    # runs boot.py and the new main.py. If the update fails here (no room beside
    # what the app left in memory, the server), the restart still comes, and
    # boot.py's update() installs it in a fresh heap before main.py. An app that
    # did not stop, or a port that cannot be handed keys: machine.reset().
    c = live  # the console stream
    if c.prompt != 1:  # not at the >>> prompt, its line empty
        print("ota: the app did not stop: resetting the board, boot.py installs the update")
        live.stop()
        return ota.reset()
    try:
        update(*live.args[:3], reset=False, timeout=live.ms / 1000, guard=live.guard)
    except Exception as e:
        try:
            print("ota: %s; restarting: boot.py installs it" % (
                "not enough memory beside the app" if isinstance(e, MemoryError) or "MemoryError" in str(e)
                or "enough memory" in str(e) else e))  # strings a firmware has, or not interned: no new name
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
        return ota.reset()
    c.key = 4
    notify(None)
