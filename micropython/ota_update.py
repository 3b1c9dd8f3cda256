# ota_update.py: what ota.update(), recover() and watch() run, imported only for one.
#
# ota.py imports this module when one of those is called and drops it afterwards,
# so that a board in live mode keeps only ota.py in memory. This module runs the
# steps of an update; each step's code is imported for it and dropped before the
# next, so that an update of any size runs in a 20 KB heap:
#   ota_commit.py the switch through the journal; recover()
#   ota_plan.py   the plan: the manifest (its signature first, with a key) merged with .ota
#   ota_check.py  the version the server names; its manifest, saved
#   ota_fetch.py  the downloads, checked as they stream
#   ota_http.py   the HTTP client of the two above (ota_tls.py for https)
#   ota_guard.py  the boot guard's step, only while a version is on trial or refused
# and, for ota.live() and live mode's restart, ota_live.py. The steps: finish
# what an earlier call left; the boot guard's step; the version; the manifest, saved as
# .ota-new/state; the plan, .ota-new/plan; the changed files, to .ota-new/0, 1,
# ...; then the switch through the journal, .ota-journal, which can be rolled
# forward after a power cut, or back if a step fails. A failure before the switch
# leaves the board's files as they were; in it (MemoryError too), recover() is run
# again: the board gets all the new files or all the old ones.
# Runs on CPython 3.9+ as well, for the tests.

import binascii
import gc
import os
import sys
import time

import ota
from ota import OTAError, ticks_diff, ticks_ms

# What the parts take from here (the rest comes from ota): hex40() (ota_check.py and
# ota_plan.py). The file .ota, under the device root, names the version installed and
# lists every file this client put there.
#
# Names: MicroPython interns every name a module uses (its globals, attributes,
# arguments, imported modules, strings of up to 10 characters) when it is loaded, and
# keeps them for good; past about 140 in all it allocates a table of 1.2 KB more
# (micropython/README.md). So the parts take few: constants are inlined, arguments
# are named as others are, and the name of a part loaded only now and then (the boot
# guard's, TLS, finding the server) is built at run time, "ota_" + ..., so that it is
# interned only once that part is imported.
_mine = []  # the parts this call imported, to drop (a test imports them first, to patch them)


def _call(module, name, *args):
    # name(*args) of a part, the module, imported for it (with ota_http, for the two
    # that use it). The caller drops them (_drop) once this frame is gone: a stale
    # slot of a frame still running (a method's self, say) would keep a part's
    # functions, and so all of it, in memory. So a part takes and returns plain values.
    for p in ("ota_commit", "ota_plan", "ota_check", "ota_fetch", "ota_http", "tls", "find", "guard"):
        p = p if len(p) > 5 else "ota_" + p  # built: see Names, above
        if p not in sys.modules and p not in _mine:
            _mine.append(p)
    return getattr(__import__(module), name)(*args)


def _drop():
    while _mine:
        part = sys.modules.pop(_mine.pop(), None)
        if part:
            # Emptied: a stale pointer the collector finds (on the C stack) to one
            # of its functions then keeps that function only, not the whole part.
            part.__dict__.clear()
    if hasattr(gc, "mem_free"):  # MicroPython; CPython frees what nothing holds at once
        gc.collect()


def _installed(root):
    # The version .ota's first line names (its first 40 characters, then a space
    # before a signed release's fields, or the line's end): "" if there is no .ota,
    # or if that line is not one (damaged). A failure to read it (no memory) is
    # raised: .ota is not damaged then, and taking it for so would forget what this
    # client installed.
    # Not open() of a missing file: on the unix port of 1.20 its object is left with
    # fd 0 and closes that when collected (extmod/vfs_posix_file.c, fixed since).
    path = root + "/" + ".ota"
    try:
        os.stat(path)
    except OSError:
        return ""
    with open(path, "rb") as f:
        line = f.readline(160)  # bounded: erased flash reads as one endless line
    try:
        binascii.unhexlify(line[:40])  # safe in a header line
    except ValueError:
        return ""
    return line[:40].decode() if len(line) > 40 and (line[40] == 10 or line[40] == 32) and line[-1] == 10 else ""


def _kind(path):
    # True if there is something at path (named as ota_commit's: a name interned once)
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _back(root, line, reset=False):
    # The end of a trial ota_guard.py began (renamed done, or undo): ota_commit, as
    # for any update, deletes the old files, or puts them back (a power cut at any
    # step: the next call goes on); line, said once they are back; then the reset, as
    # after an update, before any request (the files put back may be ota*.py, or
    # modules boot.py imported).
    _drop()
    _finish(root)
    _drop()
    if line:
        print(line)
        if reset:
            ota.reset()  # as ota.reset: reset is also update()'s argument


def hex40(value):
    # 40 hex digits, as a checksum or a version: also what keeps one from changing a request line.
    if len(value) != 40:
        raise OTAError("bad checksum %r" % value)
    binascii.unhexlify(value)  # ValueError if not hex


def _version(root):
    # The version .ota names: what is on flash; "" if its first line is damaged. Read
    # again after a collection if memory runs short: it decides what update() says.
    for _ in range(2):
        try:
            return _installed(root)
        except MemoryError:
            gc.collect()
    return _installed(root)


def _finish(root, plan=False):
    # recover(); with plan, the commit point of the update staged first. Every
    # step can be taken again, so it is retried after a collection if memory runs
    # short: a commit once started is finished, or rolled back, before update()
    # returns. Returns True if it rolled a journal forward, the error that rolled
    # one back, or None. The caller drops ota_commit.
    for _ in range(3):
        try:
            return _call("ota_commit", "commit", root, plan)
        except MemoryError:
            _drop()
        except OTAError:
            raise
        except Exception as e:
            raise OTAError("cannot finish the update, the next call retries: %r" % e)
    # Nothing was started, or a commit waits: either way the next call goes on from here.
    raise OTAError("not enough memory for the update, the next call retries")


def recover(root="/"):
    """Finish, or undo, an update a power cut or a failure interrupted; remove staged files."""
    try:
        return _finish(root.rstrip("/"))
    finally:
        _drop()


def update(url, root="/", token=None, reset=True, delete=True, timeout=10, ca=None, guard=None, resets=3):
    """Install the files that changed on the server; True if any did.

    Resets the board after a change when reset is true. Deletes files the server
    no longer has only if this client installed them (and delete is true).
    Raises OTAError, with the board's files as they were, if anything fails.
    guard: None (off), or the seconds a version this call installs is on trial
    (micropython/README.md, "The boot guard"); resets: the resets it is given
    before it is rolled back.
    """
    return _update(url, root, token, reset, delete, timeout, ca, None, 0, guard, resets)[1] > 0


def _update(url, root, token, reset, delete, timeout, ca, old=None, wait=0, guard=None, resets=3):
    # update(), returning (the version the server named, the changes installed).
    # Nothing is written when the server names, or its manifest lists, the
    # installed version (a site whose export was killed may name an older one).
    # With old, the version the server named at the last call (watch()), the version
    # request is a long-poll of up to wait seconds, and nothing is installed unless
    # the server names another version. (old, not since: a name ota_commit interns.)
    root = root.rstrip("/")
    trial = root + "/.ota-new/trial"
    boot = ota._named is False  # the first call since the board started: it counts a trial's start
    ota._named = None
    watch = None  # True: this call arms the watcher of the version on trial once it is over (ota_trial.py)
    try:
        # A commit an earlier call left (a power cut, no memory to finish) counts as
        # a change: the app that runs still has the old files, and must restart.
        changes = 1 if _finish(root) is True else 0
        _drop()
        installed = _version(root)  # "" if damaged: as if there were no .ota (ota_plan.py says it)
        # The one buffer of every step, allocated while the heap is whole (before the
        # boot guard's step, whose strings would split it): the network's, and the
        # plan's table of paths FAT names otherwise.
        buf = bytearray(512)
        # The boot guard, before any request (so that a start counts with the server
        # down too): a version on trial counted, confirmed or rolled back; and the
        # version this board refused. ota_guard.py is loaded only while there is one.
        refused = extra = said = None
        # The line that says a version is refused: formatted only when said (a string
        # held across the update's steps would split its heap).
        waiting = "ota: %s was rolled back on this board: waiting for a newer version"
        if _kind(trial) or _kind(root + "/.ota-refused"):
            refused, extra, said, watch = _call("ota_" + "guard", "start", root, installed, guard, resets, boot)
            _back(root, said, reset)  # the trial's end: its old files deleted, or put back
            if said:  # rolled back (and reset): the change of this call; the next one asks the server
                return None, changes + 1
            installed = trying = _version(root)
        server = version = None
        try:
            named = _call("ota_check", "version", (url, token, timeout + wait, installed, ca, buf, extra), old, wait)
            ota._named = named  # live mode: what this boot tried
            if named == refused:
                if named != old:
                    print(waiting % named[:7])
            elif named != installed and named != old:
                if _kind(trial):  # another version during a trial: first back to the known-good files,
                    # once its manifest is there and checks out against the version on trial (a
                    # newer release, with a key): naming a version is not enough to roll one back
                    if _call("ota_check", "manifest", (url, token, timeout, installed, ca, buf, extra), named, root):
                        _call("ota_plan", "_signed", root, installed, buf)
                    _drop()
                    said = _call("ota_" + "guard", "stop", root, installed, named)
                    _back(root, said)
                    installed = _version(root)
                server = (url, token, timeout, installed, ca, buf, extra)
                if named != installed:
                    # Loaded again, after what the version step left is collected: the
                    # manifest step is the update's largest, and needs its heap whole.
                    _drop()
                    version = _call("ota_check", "manifest", server, named, root)
                    if refused and version == refused:  # listed by the fallback, manifest.txt, for another named
                        raise OTAError((waiting % version[:7])[5:])
            _drop()
            if version:
                changes += _call("ota_plan", "plan", root, installed, delete, buf)
                _drop()
                _call("ota_fetch", "fetch", server, root)
                if guard is not None:  # the switch then ends in a trial (ota_commit.commit)
                    with open(trial[:-5] + "guard", "wb"):  # .ota-new/guard (a name interned already)
                        pass
        except BaseException as e:
            buf = server = None  # room for the cleanup
            _drop()
            _finish(root)  # the staged files removed: the board as it was
            if isinstance(e, OTAError) or not isinstance(e, Exception):  # Ctrl-C
                raise e
            raise OTAError("update failed, nothing changed: %r" % e)
        _drop()
        if version:
            try:
                why = _finish(root, True)  # the switch: rolled forward, or back if a step failed
            except OTAError as e:  # a damaged journal; no memory to finish: the next call does
                why = e
            # What .ota names is what the board has: the new version once the switch
            # is done, even if what follows it (removing the old files) was not.
            if _version(root) != version:
                raise why if isinstance(why, OTAError) else OTAError("update failed, nothing changed: %r" % why)
        if changes:
            try:  # the switch is done: nothing may hide it now
                print("ota: version %s installed, %d change%s" % (
                    (version or installed)[:7], changes, "" if changes == 1 else "s"))
            except Exception:
                pass
        if reset and changes + (said is not None):
            ota.reset()  # as ota.reset: reset is also update()'s argument
        return named, changes + (said is not None)
    finally:
        _drop()
        # The watcher of the version on trial, armed last, with the update's parts gone
        # (its steps never run beside it: the 20 KB heap), whatever the update met (the
        # server down too); not if this call ended that trial (another version installed).
        if watch and _kind(trial) and _version(root) == trying:
            __import__("ota_" + trial[-5:]).arm(root, trying[:7] or "none", guard)  # ota_trial: "trial" is no new name


def watch(url, root="/", token=None, reset=True, wait=30, timeout=10, ca=None, find=("255.255.255.255", 9090)):
    """Update on every new version the server publishes, forever (for development).

    Long-polls the server (wait: seconds, at least 1) for a version other than
    the one it named at the last update; retries with a growing delay while it
    is away or anything else fails (memory too). After 15 s of that, each retry
    looks for the server (find: where to broadcast, None not to; ota_find.py):
    the url given first, then the server that answers the broadcast. Never for
    an https:// url: an answer names an http:// one, which no certificate proves.
    """
    if url[:5] == "https":  # no downgrade: without a token any answer would be taken
        find = None
    wait = max(int(wait), 1)
    delay = 1
    named = None  # the version the server named at the last update
    where = url  # the server's url: url, or where it moved
    while True:
        start = ticks_ms()
        try:
            named = _update(where, root, token, reset, True, timeout, ca, named, wait if named else 0)[0]
            delay = 1
        except Exception as e:
            print("ota: %s; retrying in %d s" % (e if isinstance(e, OTAError) else repr(e), delay))
            if find and delay == 10 and where != url:  # 15 s of failures (1, 2, 4, 8 s apart)
                where = url  # the url given first, at the next retry
            elif find and delay == 10:
                moved = _call("ota_" + "find", "wait", token, find)
                _drop()
                if moved:
                    where = moved
                    continue  # tried at once
            time.sleep(delay)
            delay = min(delay * 2, 10)
            continue
        if ticks_diff(ticks_ms(), start) < 1000:
            time.sleep(1)  # answered at once (a static host, a server ignoring wait): never hammer it


# -- Live mode: in ota_live.py ----------------------------------------------------------


def live(*args, **kw):
    # ota.live(): ota_live.py's, loaded for it. Its arguments, and what arms live mode
    # (os.dupterm, machine.Timer), are named there: names an update alone never interns.
    return _live("live", *args, **kw)


def restart(live):
    # Installs once live mode has stopped the app (ota._Live): ota_live.py's, loaded for it.
    return _live("restart", live)


def _live(name, *args, **kw):
    # ota_live's function of that name, the module dropped after: an update's steps
    # never hold its code (micropython/README.md: the 20 KB heap).
    try:
        return getattr(__import__("ota_" + "live"), name)(*args, **kw)  # named as in _call
    finally:
        part = sys.modules.pop("ota_" + "live", None)
        if part:
            part.__dict__.clear()  # as _drop() does: a stale pointer to it then keeps no more
