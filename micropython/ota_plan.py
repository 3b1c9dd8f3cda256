# ota_plan.py: the plan of an update: what .ota says is installed, and the
# manifest (.ota-new/state) merged with it, every path checked, into
# .ota-new/plan. Imported by ota_update.py for that step only.

import hashlib
import os

from ota import OTAError, const
from ota_update import _hex, _kind, _safe

_LINE = const(256)  # longest manifest line: paths up to about 200 bytes
_STATE = ".ota"
_STAGE = ".ota-new"


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


def _entry(f, last, where):
    # The next [checksum, size, path] of a manifest or of .ota (both sorted by path),
    # after the path last; None at the end. A line is read whole or refused.
    line = f.readline(_LINE) if f else b""
    if not line:
        return None
    if line[-1:] != b"\n":
        raise OTAError("%s line cut off or too long: %r" % (where, line[:60]))
    entry = line[:-1].decode().split(" ", 2)  # ValueError if not UTF-8
    _hex(entry[0])
    if not _safe(entry[2]) or entry[2] <= last or int(entry[1]) < 0:  # IndexError if too short
        _refuse(entry[2], "the " + where)
    return entry


def installed(root):
    """The version .ota says is installed; "" if there is no .ota, or if it is
    damaged (a flash fault): the next update then installs every file again and
    deletes none, which is safe, and writes a new .ota."""
    path = root + "/" + _STATE
    if not _kind(path):  # not open() of a missing file: see ota._installed
        return ""
    try:
        with open(path, "rb") as f:
            version = f.readline(_LINE)
            if version[-1:] != b"\n":
                raise ValueError("no version line")
            version = version[:-1].decode()
            _hex(version)
            entry = [0, 0, ""]
            while entry:
                entry = _entry(f, entry[2], ".ota")
        return version
    except (OSError, ValueError, IndexError, OTAError) as e:
        print("ota: %s is damaged (%r): installing every file again, deleting none" % (path, e))
        return ""


def _digest(key):
    return hashlib.sha1(key.encode()).digest()[:4]


def _seen(folds, kept, key, manifest):
    # The earlier path of the manifest kept under key (its path as FAT names it, a
    # folder's with "/"), or None. folds holds, for each of kept keys, 4 bytes of
    # its SHA1 and the offset of its path's line: a match is read back to be sure.
    if not kept:
        return None
    d = _digest(key)
    i = folds.find(d, 0, 8 * kept)
    while i >= 0:
        if not i % 8:
            with open(manifest, "rb") as f:
                f.seek(int.from_bytes(folds[i + 4 : i + 8], "big"))
                path = f.readline()[:-1].decode().split(" ", 2)[2]
            low = _fat(path)
            if low == key or key[-1] == "/" and low[: len(key)] == key:
                return path
        i = folds.find(d, i + 1, 8 * kept)
    return None


def _keep(folds, kept, key, at):
    # Bounded: the update's one buffer, whatever the manifest holds.
    if kept == len(folds) // 8:
        raise OTAError("more than %d paths or folders with capital letters (or a name ending in a dot "
                       "or a space): this client checks no more for clashes on FAT" % kept)
    folds[8 * kept : 8 * kept + 4] = _digest(key)
    folds[8 * kept + 4 : 8 * kept + 8] = at.to_bytes(4, "big")
    return kept + 1


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


def plan(root, old, delete, folds):
    """Merge the manifest (sorted by path, its version checked already) with .ota,
    if old, line by line, and check every path: memory stays flat however many
    files there are. Writes .ota-new/plan ("g" each file to get, "d" each to
    delete, then "end") and checks the free space; returns the number of changes.
    folds: the update's one buffer, for the paths FAT names otherwise (see _seen)."""
    stage = root + "/" + _STAGE
    manifest = stage + "/state"
    block = 1
    free = None
    if hasattr(os, "statvfs"):
        fs = os.statvfs(root or "/")
        block = fs[0] or 1
        free = fs[0] * fs[4]
    new = open(manifest, "rb")
    state = open(root + "/" + _STATE, "rb") if old else None
    out = open(stage + "/plan", "wb")
    try:
        got = len(new.readline())
        if state:
            state.readline()
        o = _entry(state, "", ".ota")
        last = ""
        chain = []  # earlier paths that are the start of this one: "lib" before "lib.py"
        kept = changes = need = folders = 0
        while True:
            at = got
            e = _entry(new, last, "manifest")
            path = None  # at the manifest's end: every installed file left is gone
            if e:
                checksum, size, path = e
                got = new.tell()
                # A name FAT cannot hold, a path that is also a folder of another,
                # or equal to another on FAT (but for case, trailing dots and spaces:
                # one file there): refused now, or the switch would fail. Sorted, a
                # path comes after one it folds to only if that one is its start and
                # the rest folds away ("notes", "notes."; "lib", "lib./x.py"): chain.
                low = _fat(path)
                while chain and path[: len(chain[-1])] != chain[-1]:
                    chain.pop()
                clash = _seen(folds, kept, low, manifest) or _seen(folds, kept, low + "/", manifest)
                if chain and not path[len(chain[-1]) :].encode().split(b"/", 1)[0].strip(b". "):
                    clash = chain[-1]
                i = path.find("/")
                j = low.find("/")
                while i > 0:
                    clash = clash or _seen(folds, kept, low[:j], manifest)
                    # A folder's paths are all together in sorted order: kept once.
                    if low[:j] != path[:i] and last[: i + 1] != path[: i + 1]:
                        kept = _keep(folds, kept, low[: j + 1], at)
                    i = path.find("/", i + 1)
                    j = low.find("/", j + 1)
                if clash:
                    raise OTAError("%r and %r clash: rename one" % (clash, path))
                chain.append(path)
                if low != path:
                    kept = _keep(folds, kept, low, at)
            while o and (path is None or o[2] < path):
                if delete:
                    out.write(("d %s %s %s\n" % tuple(o)).encode())
                    changes += 1
                o = _entry(state, o[2], ".ota")
            if path is None:
                break
            if not (o and o[2] == path and o[0] == checksum):
                folders += _check_target(root, path, last)
                out.write(("g %s %s %s\n" % (checksum, size, path)).encode())
                changes += 1
                need += (int(size) + block - 1) // block * block
            if o and o[2] == path:
                o = _entry(state, o[2], ".ota")
            last = path
        out.write(b"end\n")
    finally:
        new.close()
        out.close()
        if state:
            state.close()
    # Each new folder takes two blocks (a littlefs metadata pair); the new state and
    # the plan are as big as the manifest at most; four blocks spare for metadata.
    need += 2 * got + (2 * folders + 4) * block
    if free is not None and need > free:
        raise OTAError("not enough space: the update needs %d B, %d B are free" % (need, free))
    return changes
