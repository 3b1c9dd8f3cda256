# ota_commit.py: the switch of an update through the journal, and recover().
# ota_update.py imports it for that step only.
#
# .ota lists what this client installed; nothing else is ever deleted. The switch
# moves old files aside into .ota-new/, not deleting them, until every new one is
# in, so the journal (.ota-journal) can be rolled forward after a power cut, or
# back if a step fails; every step can be taken again.

import os

from ota import OTAError, const

_LINE = const(256)  # longest manifest line, so journal lines up to 258 bytes
_EEXIST = const(17)


# _kind and _safe are also in ota_plan.py, on purpose: each part is imported alone and
# dropped before the next, and importing the other for them would hold both at once.


def _kind(path):
    # 0: nothing there, 1: a file, 2: a folder
    try:
        return 2 if os.stat(path)[0] & 0x4000 else 1
    except OSError:
        return 0


def _safe(path):
    # A promoted path may only name a file under the device root, and not ours:
    # in any case, since FAT folds it (.OTA-NEW is .ota-new there).
    raw = path.encode()  # bytes: iterating a str interns each character as a qstr
    if b"\\" in raw or raw[:4].lower() == b".ota":
        return False
    for part in raw.split(b"/"):
        if part == b"" or part == b"." or part == b"..":
            return False
    for c in raw:
        if c < 32:
            return False
    return True


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


sync = getattr(os, "sync", lambda: None)  # on boards; not on the unix port


def _clean(path):
    # Empties and removes the stage, path. Staged files are numbered from 0 in
    # download order, so no listing is held; the last goes first, so that a power
    # cut leaves them numbered from 0 still; one at a time, with no list of their
    # names: a rollback puts a whole version's files back here, in a heap as small
    # as the update's. A trial's files (trial, the old files aside, starts, crash)
    # are not among these: the stage is not removed then.
    i = 0
    while _kind(path + str(i)):
        i += 1
    while i:
        i -= 1
        try:
            os.remove(path + str(i))
        except OSError:
            pass  # a folder in the way: left, as the stage is
    for name in ("plan", "state", "guard"):
        try:
            os.remove(path + name)
        except OSError:
            pass  # already gone
    try:
        os.rmdir(path[:-1])
    except OSError:
        pass


def _ops(path):
    # The lines of a journal, each [kind, checksum, size, path]: "g" to get a file,
    # "d" to delete one; ["end"] last. Paths read back are checked again: whatever
    # wrote the file, nothing outside root is touched.
    with open(path, "rb") as f:
        while True:
            line = f.readline(_LINE + 2)
            if not line:
                return
            try:
                op = line[:-1].decode().split(" ", 3)
                ok = line[-1:] == b"\n" and (op == ["end"] or len(op) == 4 and op[0] in ("d", "g") and _safe(op[3]))
            except ValueError:  # not UTF-8
                ok = False
            if not ok:
                raise OTAError("%s is damaged: %r; the board is left as it is" % (path, line[:60]))
            yield op


def _steps(root, path, mode):
    # Each step of a journal as (staged file or None, path, its place on the board,
    # where its old file waits): "d" deletions, "g" new files, "s" the state.
    # mode: the order of the phases.
    stage = root + "/.ota-new/"
    for phase in mode:
        if phase == "s":
            yield stage + "state", ".ota", root + "/" + ".ota", stage + "old"
        i = 0
        for op in _ops(path):
            if op[0] == phase:
                yield (None if phase == "d" else stage + str(i)), op[3], root + "/" + op[3], stage + phase + str(i)
                i += 1


def commit(root, plan=False):
    """Roll the journal forward; if a step fails (a folder in the way, a full file
    system), roll it back: the board gets all the new files or all the old ones.
    With plan, the update staged (.ota-new/plan and its files) is committed first.
    A switch staged with .ota-new/guard (update(guard=...)) ends as .ota-new/trial,
    its old files kept aside until the version is confirmed (ota_guard.py), instead
    of done, which deletes them. Returns True if it rolled a journal forward, the
    error that made one roll back, or None."""
    stage = root + "/.ota-new/"
    journal = root + "/.ota-journal"
    trial = root + "/.ota-new/trial"  # not stage + "trial": a name interned for good (micropython/README.md)
    undo = stage + "undo"
    done = stage + "done"
    if plan and _kind(stage + "plan"):
        sync()
        os.rename(stage + "plan", journal)  # the commit point
    why = None
    complete = False
    try:
        if _kind(journal):  # see ota._installed: no open() of a missing file
            with open(journal, "rb") as f:
                f.seek(-4, 2)
                complete = f.read() == b"end\n"
    except OSError:
        pass  # shorter than that
    for name in (journal, undo, done):
        if _kind(name) == 1 and (complete or name != journal):
            for op in _ops(name):  # every line is checked before anything is touched
                pass
    if complete:
        try:
            for new, path, dst, aside in _steps(root, journal, "dgs"):
                if not new or _kind(new):  # else moved in before a power cut
                    if _kind(dst) == 1 and not _kind(aside):
                        os.rename(dst, aside)
                    if new:
                        _mkdirs(root, path)
                        os.rename(new, dst)
            if _kind(root + "/.ota-refused"):
                os.remove(root + "/.ota-refused")  # another version is installed: refused no more
            sync()
            os.rename(journal, trial if _kind(stage + "guard") else done)
            why = True
        except OSError as e:
            why = e
            os.rename(journal, undo)
    elif _kind(journal):
        os.remove(journal)  # cut short (a flash fault): never committed, nothing was moved
    if _kind(undo):
        for new, path, dst, aside in _steps(root, undo, "sgd"):
            if new:
                if not _kind(new):
                    if _kind(dst):
                        os.rename(dst, new)
                    else:  # deleted since (by the app, during a trial): a stand-in, so that the
                        open(new, "wb").close()  # stage stays numbered from 0 (_clean)
                _prune(root, path)  # the folders it made
            if _kind(aside):
                _mkdirs(root, path)
                os.rename(aside, dst)
        sync()
        os.remove(undo)
    if _kind(done):
        for new, path, dst, aside in _steps(root, done, "dgs"):
            if _kind(aside):
                os.remove(aside)  # a failure is retried: a new update needs the names
            if not new:
                _prune(root, path)
        sync()
        os.remove(done)
    if not _kind(trial):  # what the boot guard noted of a trial (ota_guard.py), once it is over
        for name in "starts crash".split():  # one name to intern, not two (micropython/README.md: names matter)
            if _kind(stage + name):
                os.remove(stage + name)
    _clean(stage)
    return why
