# ota_plan.py: the plan of an update: the manifest (.ota-new/state, saved by
# ota_check.py) merged with .ota, every path checked, into .ota-new/plan; first, on
# a board that holds the fleet's key (.ota-key), the manifest's signature, release
# and share. ota_update.py imports it for that step only.

import binascii
import hashlib
import os

from ota import OTAError, const
from ota_update import hex40

_LINE = const(256)  # longest manifest line: paths up to about 200 bytes


# _kind and _safe are also in ota_commit.py, on purpose: each part is imported alone and
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


def _entry(file, last, where):
    # The next [checksum, size, path] of a manifest or of .ota (both sorted by path),
    # after the path last; None at the end. A line is read whole or refused. The
    # manifest, saved just now, is read line by line as it comes: readline(n)
    # takes n bytes at once, and many such blocks leave holes in a small heap;
    # .ota, which a flash fault may have filled with one endless line, with a bound.
    line = (file.readline(_LINE) if where == ".ota" else file.readline()) if file else b""
    if not line:
        return None
    if line[-1:] != b"\n" or len(line) > _LINE:
        raise OTAError("%s line cut off or too long: %r" % (where, line[:60]))
    entry = line[:-1].decode().split(" ", 2)  # ValueError if not UTF-8
    hex40(entry[0])
    if not _safe(entry[2]) or entry[2] <= last or int(entry[1]) < 0:  # IndexError if too short
        raise OTAError("refusing unsafe or unsorted path %r in the %s" % (entry[2], where))
    return entry


def _seen(data, count, key, manifest):
    # The earlier path of the manifest kept under key (its path as FAT names it, a
    # folder's with "/"), or None. data holds, for each of the count keys kept, 4
    # bytes of its SHA1 and the offset of its line: a match is read back to be sure.
    if not count:
        return None
    d = hashlib.sha1(key.encode()).digest()[:4]
    i = data.find(d, 0, 8 * count)
    while i >= 0:
        if not i % 8:
            with open(manifest, "rb") as f:
                f.seek(int.from_bytes(data[i + 4 : i + 8], "little"))
                path = f.readline()[:-1].decode().split(" ", 2)[2]
            low = _fat(path)
            if low == key or key[-1] == "/" and low[: len(key)] == key:
                return path
        i = data.find(d, i + 1, 8 * count)
    return None


def _keep(data, count, key, index):
    # Keeps key for the path whose line starts at index; returns the new count.
    # Bounded: the update's one buffer, whatever the manifest holds.
    if count == len(data) // 8:
        raise OTAError("more than %d paths or folders with capital letters (or a name ending in a dot "
                       "or a space): this client checks no more for clashes on FAT" % count)
    data[8 * count : 8 * count + 4] = hashlib.sha1(key.encode()).digest()[:4]
    data[8 * count + 4 : 8 * count + 8] = index.to_bytes(4, "little")
    return count + 1


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


def _state(path, old):
    # .ota, open after its first line, if it lists old and is whole; else None: if
    # it is damaged (a flash fault), it is said, and the update then installs every
    # file again and deletes none, which is safe, and writes a new .ota.
    if not _kind(path):  # not open() of a missing file: see ota._installed
        return None
    try:
        with open(path, "rb") as f:
            line = f.readline(160)  # "<version>\n", or signed "<version> <release> <rollout> <signature>\n"
            if not old or line[:40] != old.encode() or line[40:41] not in (b" ", b"\n") or line[-1:] != b"\n":
                raise ValueError("no version line")
            entry = [0, 0, ""]
            while entry:
                entry = _entry(f, entry[2], ".ota")
        f = open(path, "rb")
        f.readline()
        return f
    except (OSError, ValueError, IndexError, OTAError) as e:
        print("ota: %s is damaged (%r): installing every file again, deleting none" % (path, e))


def _signed(root, old, buf):
    # On a board with a key (.ota-key, its surrounding whitespace stripped), refuses
    # the manifest saved unless signed with it: the HMAC-SHA256 of its first line
    # "<version> <release> <rollout> <signature>" without the signature, then of every
    # following line; and unless its release is newer than the one the board runs
    # (.ota's, of old), and its share of a staged rollout takes this board. Before
    # any download. Here rather than as the manifest streams (ota_check.py): that step
    # is the update's largest, and the names a new module interns are never freed
    # (micropython/README.md). buf: the update's one buffer, before the plan's table.
    path = "%s/.ota-key" % root  # a name of more than 10 characters is not interned
    if not _kind(path):
        return
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError:
        key = None
    if not key:
        raise OTAError("%s: the key file is empty or cannot be read: copy the fleet's key there "
                       "(mpremote cp ota.key :.ota-key)" % path)
    with open(root + "/.ota-new/state", "rb") as f:
        line = f.readline(160)
        v7 = line[:7].decode()
        if line[40:41] != b" ":
            raise OTAError("unsigned release %s: this board has a key and takes only signed releases" % v7)
        # HMAC (RFC 2104; MicroPython has no hmac module): the key padded to a block,
        # ^ 0x36 for the inner hash, then ^ 0x5C for the outer one, in one buffer.
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        pad = bytearray(64)
        pad[: len(key)] = key
        key = None
        for i in range(64):
            pad[i] ^= 0x36
        inner = hashlib.sha256(pad)
        inner.update(line[:-66] + b"\n")  # 66: " <64 hex>\n", the signature
        view = memoryview(buf)
        n = f.readinto(buf)
        while n:
            inner.update(buf if n == len(buf) else view[:n])
            n = f.readinto(buf)
    for i in range(64):
        pad[i] ^= 0x6A  # 0x36 ^ 0x5C
    outer = hashlib.sha256(pad)
    outer.update(inner.digest())
    if line[-66:] != b" " + binascii.hexlify(outer.digest()) + b"\n":
        raise OTAError("bad signature on the manifest of %s" % v7)
    release, share = line[41:-66].decode().split(" ")
    # Release numbers as digit strings, without big ints: the longer is larger. An
    # equal one on another version is refused too: a release is one version.
    runs = b""
    if old:  # so .ota is there (never open() a missing file: see _state)
        with open(root + "/" + ".ota", "rb") as f:
            runs = f.readline(160)  # the first line of the manifest installed
    runs = runs[41:].split(b" ", 1)[0].decode() if runs[:40] == old.encode() and runs[40:41] == b" " else ""
    if runs and (len(release) < len(runs) or len(release) == len(runs) and release <= runs):
        raise OTAError("release %s of %s is older than release %s, which this board runs: no downgrade"
                       % (release, v7, runs))
    if int(share) < 100:
        from ota_http import _device  # the id X-OTA-Device sends

        d = hashlib.sha256(_device().encode() + line[40:41] + line[:40]).digest()  # the bucket, as ota_check.version()
        if (d[0] << 16 | d[1] << 8 | d[2]) % 100 >= int(share):
            raise OTAError("%s is rolled out to %s%% of boards, not to this one" % (v7, share))


def plan(root, old, delete, data):
    """Merge the manifest (sorted by path, its version checked already) with .ota
    (which lists old, the installed version) line by line, and check every path: memory
    stays flat however many files there are. Writes .ota-new/plan ("g" each file
    to get, "d" each to delete, then "end"), checks the free space, and returns
    the number of changes. data: the update's one buffer, for the paths FAT names
    otherwise (see _seen). With a key, the manifest is checked first (_signed)."""
    _signed(root, old, data)
    manifest = root + "/.ota-new/state"
    block = 1
    free = None
    if hasattr(os, "statvfs"):
        fs = os.statvfs(root or "/")
        block = fs[0] or 1
        free = fs[0] * fs[4]
    state = _state(root + "/" + ".ota", old)
    new = open(manifest, "rb")
    out = open(root + "/.ota-new/plan", "wb")
    try:
        got = len(new.readline())
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
                clash = _seen(data, kept, low, manifest) or _seen(data, kept, low + "/", manifest)
                if chain and not path[len(chain[-1]) :].encode().split(b"/", 1)[0].strip(b". "):
                    clash = chain[-1]
                i = path.find("/")
                j = low.find("/")
                while i > 0:
                    clash = clash or _seen(data, kept, low[:j], manifest)
                    # A folder's paths are all together in sorted order: kept once.
                    if low[:j] != path[:i] and last[: i + 1] != path[: i + 1]:
                        kept = _keep(data, kept, low[: j + 1], at)
                    i = path.find("/", i + 1)
                    j = low.find("/", j + 1)
                if clash:
                    raise OTAError("%r and %r clash: rename one" % (clash, path))
                chain.append(path)
                if low != path:
                    kept = _keep(data, kept, low, at)
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
