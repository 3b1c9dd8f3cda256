# ota_update.py: what ota.update(), recover() and watch() run, imported only for one.
#
# ota.py imports this module when one of those is called and drops it afterwards,
# so that a board in live mode keeps only ota.py in memory. The update's own code
# is in two parts, each imported for its step and dropped before the next one, so
# that an update of any size runs in a 20 KB heap (an ESP8266 has 38 KB in all):
#   ota_files.py  the plan (the manifest merged with .ota) and the switch (the journal)
#   ota_http.py   the server's version, its manifest and the changed files
# The steps: finish what an earlier call left; the version; the manifest, saved as
# .ota-new/state; the plan, .ota-new/plan; the downloads, checked, to .ota-new/0,
# 1, ...; then the switch through the journal, .ota-journal, which can be rolled
# forward after a power cut, or back if a step fails. Any failure before the
# switch leaves the board's files as they were; a failure in it (even MemoryError)
# is followed by recover(): the board gets all the new files or all the old ones.
# Runs on CPython 3.9+ as well, for the tests.

import binascii
import gc
import os
import sys
import time

from ota import OTAError, _installed, _reset, ticks_diff, ticks_ms

_PARTS = ("ota_commit", "ota_plan", "ota_check", "ota_fetch", "ota_http", "ota_tls")
_mine = []  # the parts this call imported: dropped when done with (a test imports them first, to patch them)


def _call(part, name, *args):
    # name(*args) of a part, imported for it (with ota_http, for the two that use
    # it). The caller drops them (_drop) once this frame is gone: the stale slots
    # of a frame still running (a method's self, say) would keep a part's
    # functions, and so all of it, in memory. A part takes and returns plain values.
    for p in _PARTS:
        if p not in sys.modules and p not in _mine:
            _mine.append(p)
    return getattr(__import__(part), name)(*args)


def _drop():
    while _mine:
        sys.modules.pop(_mine.pop(), None)
    gc.collect()


def _hex(checksum):
    # 40 hex digits: also what keeps a checksum from changing a request line.
    if len(checksum) != 40:
        raise OTAError("bad checksum %r" % checksum)
    binascii.unhexlify(checksum)  # ValueError if not hex


def _kind(path):
    # 0: nothing there, 1: a file, 2: a folder
    try:
        return 2 if os.stat(path)[0] & 0x4000 else 1
    except OSError:
        return 0


def _safe(path):
    # A promoted path may only name a file under the device root, and not ours:
    # in any case, since FAT folds it (.OTA-NEW is .ota-new there).
    if "\\" in path or path[:4].lower() == ".ota":
        return False
    for part in path.split("/"):
        if part == "" or part == "." or part == "..":
            return False
    for c in path.encode():  # bytes: iterating a str interns each character as a qstr
        if c < 32:
            return False
    return True


def _finish(root, plan=False):
    # recover(); with plan, the commit point of the update staged first. Every step
    # can be taken again, so it is retried after a collection if memory runs short:
    # a commit once started is finished, or rolled back, before update() returns.
    # Returns True if it finished a commit, the error that rolled one back, or None.
    for _ in range(3):
        try:
            return _call("ota_commit", "commit", root, plan)
        except MemoryError:
            pass
        except OTAError:
            raise
        except Exception as e:
            raise OTAError("cannot finish the update, the next call retries: %r" % e)
        finally:
            _drop()
    raise OTAError("not enough memory to finish the update, the next call retries")


def recover(root="/"):
    """Finish, or undo, an update a power cut or a failure interrupted; remove staged files."""
    return _finish(root.rstrip("/"))


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
    try:
        # A commit an earlier call left (a power cut, no memory to finish) counts as
        # a change: the app still runs the old files, and must restart.
        changes = 1 if _finish(root) is True else 0
        installed = _call("ota_plan", "installed", root)
        _drop()
        # The one buffer of every step, allocated while the heap is whole: the
        # network's, and the plan's table of paths FAT names otherwise (128 of them).
        buf = bytearray(1024)
        server = (url, token, timeout, installed, ca, buf)
        version = None
        try:
            named, version = _call("ota_check", "check", server, root)
            _drop()
            if version:
                changes += _call("ota_plan", "plan", root, installed, delete, buf)
                _drop()
                _call("ota_fetch", "fetch", server, root)
        except BaseException as e:
            _drop()
            _finish(root)  # the staged files removed: the board as it was
            if isinstance(e, OTAError) or not isinstance(e, Exception):  # Ctrl-C
                raise e
            raise OTAError("update failed, nothing changed: %r" % e)
        _drop()
        if version:
            why = _finish(root, True)  # the switch: rolled forward, or back if a step failed
            if why is not True:
                raise OTAError("update failed, nothing changed: %r" % why)
        if changes:
            try:  # the switch is done: nothing may hide it now
                print("ota: version %s installed, %d change%s" % (
                    (version or installed)[:7], changes, "" if changes == 1 else "s"))
            except Exception:
                pass
            if reset:
                _reset()
        return named, changes
    finally:
        _drop()


def watch(url, root="/", token=None, reset=True, wait=30, timeout=10, ca=None):
    """Update on every new version the server publishes, forever (for development).

    Long-polls the server (wait: seconds, at least 1) for a version other than
    the one it named at the last update; retries with a growing delay while it
    is away or anything else fails (memory too).
    """
    wait = max(int(wait), 1)
    delay = 1
    named = None  # the version the server named at the last update
    while True:
        try:
            if named is None:
                named = _update(url, root, token, reset, True, timeout, ca)[0]
            start = ticks_ms()
            server = (url, token, timeout + wait, _installed(root.rstrip("/")), ca, bytearray(1024))
            if _call("ota_check", "poll", server, named, wait) != named:
                named = None  # a new version: installed at the top of the loop
            _drop()
            delay = 1
        except Exception as e:
            _drop()
            print("ota: %s; retrying in %d s" % (e if isinstance(e, OTAError) else repr(e), delay))
            time.sleep(delay)
            delay = min(delay * 2, 10)
            continue
        if ticks_diff(ticks_ms(), start) < 1000:
            time.sleep(1)  # answered at once (a static host, a server ignoring wait): never hammer it
