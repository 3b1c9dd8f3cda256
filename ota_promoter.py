#!/usr/bin/env python3
"""OTA Promoter: publish a MicroPython project folder to boards over HTTP.

A polling thread watches DIR and rehashes what changed; a threading HTTP server
offers the files with the API of the original ota-promoter, so a small client on
each board can download just the files whose checksum differs:

    GET /files/version          {"version": "<sha1>"}; ?wait=S long-polls for a change
    GET /files                  {"files": [{"path": ..., "checksum": ...}], "version": ...}
    GET /files?format=text      the same as lines, sorted by path, for small devices
    GET /files/manifest.txt     the same lines, at the path a static export gives them
    GET /files/<checksum>       the bytes of one file

checksum = sha1(file bytes + promoted path); version = sha1(all checksums, walk order).

Usage: python3 ota_promoter.py [DIR] [--port 9090] [--token TOKEN]
       python3 ota_promoter.py [DIR] --export SITE [--keep 3]   (for a static web server)
Only the standard library is used: copy this file to any machine with Python 3.9+.
"""

__version__ = "1.0.0"

import codecs
import errno
import fnmatch
import hashlib
import hmac
import io
import json
import logging
import os
import re
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("ota_promoter")

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 9090
DEFAULT_INTERVAL = 0.5
DEFAULT_IDLE_TIMEOUT = 10.0  # seconds a connection may take to send a request
MAX_WAIT = 60.0  # longest long-poll, in seconds

# Bytes of file content kept in memory, so that a download serves exactly the bytes
# that were hashed. Past it, files are re-read from disk and re-checked per download.
STORE_LIMIT = 64 * 1024 * 1024

# A file modified this close to a scan may change again within the same mtime tick
# without its stat changing: git's "racily clean" problem. Such files are rehashed
# on every poll until they are older.
RACY_NS = 2 * 10**9

# While some file keeps changing, publishing waits so that a multi-file save lands
# as one version; after this many polls the settled files are published anyway.
SETTLE_POLLS = 20

IGNORE_FILE = ".promoterignore"
SKIP_NAMES = frozenset(["__pycache__", "4913"])  # 4913: vim's write-permission probe
SKIP_SUFFIXES = (".pyc", "~", ".swp", ".swx")
_BAD_NAME = re.compile("[\x00-\x1f\x7f\\\\\ud800-\udfff]")  # control, backslash, not UTF-8
_CHECKSUM = re.compile("[0-9a-fA-F]{40}")
_HASH_CHUNK = 1024 * 1024
_STAT_DIR_FD = os.stat in os.supports_dir_fd and os.stat in os.supports_follow_symlinks
_SNIFF = 1024


class PromoterError(Exception):
    """A problem the user can fix: a missing folder, a port in use, a bad option."""


# -- The pure core: hashing, walking, diffing -------------------------------------


def file_checksum(data, path):
    """Checksum of a promoted file, as the original ota-promoter computes it."""
    h = hashlib.sha1(data)
    h.update(path.encode("utf-8"))
    return h.hexdigest()


def version_of(checksums):
    """Version of a tree: sha1 of its checksums' hex text, concatenated in walk order."""
    h = hashlib.sha1()
    for checksum in checksums:
        h.update(checksum.encode("ascii"))
    return h.hexdigest()


def looks_like_text(head):
    """True if the first bytes of a file read as UTF-8 text (as Go's sniffing does)."""
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def compile_ignore(text, globs=()):
    """Build the ignore test from .promoterignore text and --ignore globs.

    Returns (ignored, errors): ignored(path, name) -> bool, or None if nothing is
    ignored; errors lists (line number, message) for lines that are not valid
    regular expressions. Each line is anchored at both ends, as in the original.
    """
    patterns, errors = [], []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            patterns.append(re.compile(line))
        except re.error as e:
            errors.append((number, "%r: %s" % (line, e)))
    globs = [re.compile(fnmatch.translate(g)) for g in globs]
    if not patterns and not globs:
        return None, errors

    def ignored(path, name):
        return any(p.fullmatch(path) for p in patterns) or any(
            g.match(path) or g.match(name) for g in globs
        )

    return ignored, errors


def scan(root, ignored=None, problems=None):
    """List the promoted files under root as (promoted path, stat) pairs.

    The pairs come in no particular order: walk_key() sorts paths when a version
    is built. Entries that cannot be promoted are reported in problems (promoted
    path -> reason) when a dict is given. A folder that vanishes mid-walk is
    treated as empty; if root itself cannot be read, OSError is raised.
    """
    return Scanner(root).scan(ignored, problems)


class Scanner:
    """scan() for a watcher: re-reads only the folders whose listing changed.

    A folder's names change only when its mtime does, so an unchanged folder
    costs one stat, plus one per file in it. Folders modified within RACY_NS of
    a scan are re-read anyway, as racy files are rehashed.
    """

    def __init__(self, root):
        self.root = root
        self._listings = {}  # folder -> (stat key, files, folders, symlinks, problems)

    def forget(self):
        """Re-read every folder on the next scan (the ignore rules changed)."""
        self._listings = {}

    def scan(self, ignored=None, problems=None):
        files, listings = [], {}
        real_root = os.path.realpath(self.root)
        racy = time.time_ns() - RACY_NS
        self._walk(self.root, "", real_root, real_root, ignored, problems, files, set(), listings, racy)
        self._listings = listings
        return files

    def _walk(self, folder, prefix, real_folder, real_root, ignored, problems, files, active, listings, racy):
        try:
            st = os.stat(folder)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            listing = self._listings.get(folder)
            if listing is None or listing[0] != key or st.st_mtime_ns >= racy:
                listing = _list_folder(folder, prefix, key, ignored)
        except OSError as e:
            if not prefix:
                raise  # the root itself: the caller keeps the last good version
            if problems is not None and not isinstance(e, (FileNotFoundError, NotADirectoryError)):
                problems[prefix[:-1]] = "cannot read folder: %s" % (e.strerror or e)
            return
        listings[folder] = listing
        _, names, folders, links, found = listing
        if problems is not None:
            problems.update(found)
        if names:
            _stat_files(folder, names, files, problems)
        active.add(real_folder)
        for path, full, name in folders:
            self._walk(full, path + "/", real_folder + os.sep + name, real_root,
                       ignored, problems, files, active, listings, racy)
        for path, full in links:
            real = os.path.realpath(full)
            if not (real + os.sep).startswith(real_root + os.sep):
                if problems is not None:
                    problems[path] = "symlink points outside the folder, to %r" % real
                continue
            try:
                st = os.stat(full)
            except OSError:
                continue  # a dangling symlink
            if stat.S_ISREG(st.st_mode):
                files.append((path, st))
            elif stat.S_ISDIR(st.st_mode):
                if real in active:
                    if problems is not None:
                        problems[path] = "symlink loops back to a folder above it"
                    continue
                self._walk(full, path + "/", real, real_root, ignored, problems, files, active, listings, racy)
        active.discard(real_folder)


def _stat_files(folder, names, files, problems):
    # Relative to the folder's descriptor, as os.scandir does: a stat by full
    # path would look up every folder above again, for every file.
    fd = os.open(folder, os.O_RDONLY) if _STAT_DIR_FD else None
    try:
        for path, name in names:
            try:
                if fd is None:
                    st = os.stat(os.path.join(folder, name), follow_symlinks=False)
                else:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the folder was read
            except OSError as e:
                if problems is not None:
                    problems[path] = "cannot stat: %s" % (e.strerror or e)
                continue
            if stat.S_ISREG(st.st_mode):
                files.append((path, st))
    finally:
        if fd is not None:
            os.close(fd)


def _list_folder(folder, prefix, key, ignored):
    """Read a folder's names once: what to stat, where to descend, what to warn of."""
    names, folders, links, problems = [], [], [], {}
    with os.scandir(folder) as it:
        for entry in it:
            name = entry.name
            if name[0] == "." or name in SKIP_NAMES or name.endswith(SKIP_SUFFIXES):
                continue
            path = prefix + name
            if "\\" in name or not name.isprintable() and _BAD_NAME.search(name):
                problems[path] = "name is not valid UTF-8 or has a control character or backslash"
                continue
            if ignored is not None and ignored(path, name):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    names.append((path, name))
                elif entry.is_dir(follow_symlinks=False):
                    folders.append((path, entry.path, name))
                elif entry.is_symlink():
                    links.append((path, entry.path))
                # Sockets, fifos and devices are not files a board can use.
            except OSError:
                continue  # removed while we looked
    return key, names, folders, links, problems


def walk_key(path):
    """Sort key of the original's walk order: each folder's entries sorted by name,
    folders entered in place, so "a/b.py" comes before "a.py"."""
    return path.split("/")


def diff(old, new):
    """Compare two {path: checksum} maps: (added, changed, removed) path lists."""
    added = [p for p in new if p not in old]
    changed = [p for p in new if p in old and old[p] != new[p]]
    removed = [p for p in old if p not in new]
    return added, changed, removed


# -- Published versions --------------------------------------------------------------


class Blob:
    """One hashed file: the bytes /files/<checksum> serves, or None past STORE_LIMIT."""

    __slots__ = ("path", "checksum", "size", "data", "text")

    def __init__(self, path, checksum, size, data, text):
        self.path = path
        self.checksum = checksum
        self.size = size
        self.data = data
        self.text = text


class Version:
    """A published state of the tree, with its API bodies rendered once."""

    def __init__(self, blobs):
        self.blobs = blobs
        self.id = version_of(b.checksum for b in blobs)
        self.etag = '"%s"' % self.id
        self.by_checksum = {b.checksum: b for b in blobs}
        self.by_path = {b.path: b for b in blobs}
        self.version_json = _json({"version": self.id})
        self.files_json = _json(
            {"files": [{"path": b.path, "checksum": b.checksum} for b in blobs], "version": self.id}
        )
        # For devices: one line per file, sorted by path so that a client can merge
        # it with its own sorted state without holding either in memory.
        lines = [self.id + "\n"]
        lines += ["%s %d %s\n" % (b.checksum, b.size, b.path) for b in sorted(blobs, key=_by_path)]
        self.files_text = "".join(lines).encode("utf-8")


def _by_path(blob):
    return blob.path


def _walk_key_of(blob):
    return walk_key(blob.path)


def _json(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- The watcher ---------------------------------------------------------------------


class Promoter:
    """Watches a folder and publishes versions of it; serve() puts them on HTTP."""

    def __init__(self, root, interval=DEFAULT_INTERVAL, ignore=(), store_limit=STORE_LIMIT):
        self.root = os.path.abspath(root)
        if not os.path.exists(self.root):
            raise PromoterError("folder %r does not exist" % root)
        if not os.path.isdir(self.root):
            raise PromoterError("%r is a file, not a folder: give the folder to promote" % root)
        try:
            os.scandir(self.root).close()
        except OSError as e:
            raise PromoterError("cannot read folder %r: %s" % (root, e.strerror or e))
        self.interval = interval
        self.store_limit = store_limit
        self._globs = list(ignore)
        self._ignore_text = None
        self._ignored = None
        self._scanner = Scanner(self.root)
        self._seen = {}  # promoted path -> (stat key, Blob) at the last poll
        self._held = 0  # bytes of file content in memory
        self._warned = {}  # path -> problem already logged, while it persists
        self._unsettled = 0  # consecutive polls that found a file still changing
        self._held_back = False  # the last poll left changes unpublished
        self._root_lost = False
        self._poll_lock = threading.Lock()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._closed = False
        self._thread = None
        self.previous = None
        self.current = Version([])
        self.poll_once(first=True)

    @property
    def version(self):
        """The published version id."""
        return self.current.id

    def manifest(self):
        """The published files as /files lists them: [{"path", "checksum"}] in walk order."""
        return [{"path": b.path, "checksum": b.checksum} for b in self.current.blobs]

    def blob(self, checksum):
        """The file with this checksum in the published version or the one before."""
        blob = self.current.by_checksum.get(checksum)
        if blob is None and self.previous is not None:
            blob = self.previous.by_checksum.get(checksum)
        return blob

    def read(self, blob):
        """The bytes of blob, or None if they are no longer available unchanged."""
        if blob.data is not None:
            return blob.data
        try:
            with open(os.path.join(self.root, blob.path), "rb") as f:
                data = f.read()
        except OSError:
            return None
        return data if file_checksum(data, blob.path) == blob.checksum else None

    def wait_for_change(self, since, timeout):
        """Block until the published version is not `since`, or timeout seconds pass."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.current.id == since and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
        return self.current

    def poll_once(self, first=False):
        """Scan the folder once; publish a new version if the tree settled on one.

        Returns True if a new version was published.
        """
        with self._poll_lock:
            return self._poll(first)

    def _poll(self, first):
        now = time.time_ns()
        problems = {}
        try:
            listing = self._scanner.scan(self._load_ignore(), problems)
        except OSError as e:
            if not self._root_lost:
                log.error(
                    "cannot read folder %s (%s); still serving version %s",
                    self.root, e.strerror or e, self.version[:7],
                )
                self._root_lost = True
            return False
        if self._root_lost:
            log.info("folder %s is readable again", self.root)
            self._root_lost = False
        racy = now - RACY_NS  # files modified after this are rehashed
        seen, unsettled, hashed = {}, set(), False
        old_seen = self._seen
        for path, st in listing:
            key = (st.st_size, st.st_mtime_ns, st.st_ino)
            prev = old_seen.get(path)
            if prev is not None and prev[0] == key and st.st_mtime_ns < racy:
                seen[path] = prev
                continue
            try:
                blob = self._hash(path, st.st_size)
            except OSError as e:
                problems[path] = "cannot read: %s" % (e.strerror or e)
                continue
            hashed = True
            if prev is None:
                # A file first seen (new, or no longer ignored) that was not written
                # in the last moments is not being written.
                stable = st.st_mtime_ns < racy
            elif prev[0] == key and prev[1].checksum == blob.checksum:
                stable = True
                blob = prev[1]  # keep the bytes already held
            else:
                stable = False
            seen[path] = (key, blob)
            if not (stable or first):
                unsettled.add(path)
        self._seen = seen
        self._report(problems)
        if hashed:
            self._count_held()
        held_back, self._held_back = self._held_back, bool(unsettled)
        if not (hashed or held_back or len(seen) != len(old_seen)):
            return False  # an unchanged tree costs stats only
        if unsettled:
            self._unsettled += 1
            if self._unsettled < SETTLE_POLLS:
                return False
            if self._unsettled == SETTLE_POLLS:
                log.warning("still changing: %s; publishing the rest", ", ".join(sorted(unsettled)[:5]))
        else:
            self._unsettled = 0
        # A file still changing keeps its published bytes, or stays out if new.
        published = self.current.by_path
        blobs = [published.get(path) if path in unsettled else blob for path, (_, blob) in seen.items()]
        blobs = sorted((b for b in blobs if b is not None), key=_walk_key_of)
        version = Version(blobs)
        if version.id == self.current.id:
            return False
        self._publish(version, first)
        return True

    def _hash(self, path, size):
        full = os.path.join(self.root, path)
        h = hashlib.sha1()
        with open(full, "rb") as f:
            if self._held + size <= self.store_limit:
                data = f.read()
                h.update(data)
                head = data[:_SNIFF]
                self._held += len(data)
            else:
                data = None
                head = chunk = f.read(_HASH_CHUNK)
                size = 0
                while chunk:
                    h.update(chunk)
                    size += len(chunk)
                    chunk = f.read(_HASH_CHUNK)
        h.update(path.encode("utf-8"))
        if data is not None:
            size = len(data)
        return Blob(path, h.hexdigest(), size, data, looks_like_text(head[:_SNIFF]))

    def _publish(self, version, first):
        old = self.current
        with self._changed:
            self.previous, self.current = old, version
            self._changed.notify_all()
        self._count_held()  # the version before the previous one is let go
        if first:
            return
        added, changed, removed = diff(
            {b.path: b.checksum for b in old.blobs}, {b.path: b.checksum for b in version.blobs}
        )
        names = added + changed + removed
        log.info(
            "version %s: +%d ~%d -%d, %d files: %s%s",
            version.id[:7], len(added), len(changed), len(removed), len(version.blobs),
            ", ".join(names[:5]), ", ..." if len(names) > 5 else "",
        )

    def _count_held(self):
        blobs = {id(b): b for _, b in self._seen.values()}
        for v in (self.current, self.previous):
            if v is not None:
                blobs.update((id(b), b) for b in v.blobs)
        self._held = sum(b.size for b in blobs.values() if b.data is not None)

    def _load_ignore(self):
        try:
            with open(os.path.join(self.root, IGNORE_FILE), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        if text != self._ignore_text:
            self._ignored, errors = compile_ignore(text, self._globs)
            self._ignore_text = text
            self._scanner.forget()
            for number, message in errors:
                log.warning("%s line %d ignored: not a regular expression: %s", IGNORE_FILE, number, message)
        return self._ignored

    def _report(self, problems):
        """Log each problem once, while it persists."""
        for path, reason in problems.items():
            if self._warned.get(path) != reason:
                log.warning("skipping %s: %s", path, reason)
        self._warned = problems

    # The watcher thread.

    def start(self):
        """Poll every interval in a background thread until stop()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="ota-watcher", daemon=True)
            self._thread.start()

    def _watch(self):
        while not self._stop.wait(self.interval):
            try:
                self.poll_once()
            except Exception:
                log.exception("poll failed; will try again")

    def stop(self):
        """Stop the watcher and release any waiting long-polls."""
        self._stop.set()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()

    def serve(self, host=DEFAULT_HOST, port=DEFAULT_PORT, token=None, idle_timeout=DEFAULT_IDLE_TIMEOUT):
        """Listen on host:port and start watching; returns the PromoterServer.

        Call start() on it to serve from a background thread, or serve_forever().
        """
        server = PromoterServer(self, (host, port), token=token, idle_timeout=idle_timeout)
        self.start()
        return server


# -- The static export ---------------------------------------------------------------
#
# For a fleet, a web server or a CDN serves the files instead of this process:
#
#   site/files/<checksum>      every file's bytes, written once, never rewritten
#   site/files/manifest.txt    the /files?format=text body
#   site/files.json            the /files body (a file "files" cannot sit next to files/)
#   site/files/version         the /files/version body, written last
#   site/.ota-export           the exported versions still kept, with their checksums
#
# A board may read the version, then the manifest, then the files, while the next
# export lands: files go first, the version last, each through a temporary name
# and a rename, and the files of the previous versions stay until --keep is passed.

DEFAULT_KEEP = 3  # versions whose files an export keeps, the current one included
EXPORT_RECORD = ".ota-export"
_TEMPORARY = ".ota-tmp-"  # prefix of the names files are written under first


def export(promoter, site, keep=DEFAULT_KEEP):
    """Write the published version to site for a static web server.

    Returns (written, kept, pruned): the files written, those already in site,
    and the files of versions older than the last `keep` that were removed.
    """
    if keep < 1:
        raise PromoterError("--keep must be at least 1, not %r" % keep)
    if os.path.exists(site) and not os.path.isdir(site):
        raise PromoterError("%r is a file, not a folder: give the folder to export to" % site)
    files = os.path.join(site, "files")
    try:
        os.makedirs(files, exist_ok=True)
        lock = _lock_site(site)
        try:
            return _export(promoter, site, files, keep)
        finally:
            os.close(lock)
    except OSError as e:
        where = " (%r)" % e.filename if e.filename and e.filename != site else ""
        raise PromoterError("cannot export to %r: %s%s" % (site, e.strerror or e, where))


def _export(promoter, site, files, keep):
    version = promoter.current
    for folder in (site, files):
        for name in os.listdir(folder):
            if name.startswith(_TEMPORARY):
                os.remove(os.path.join(folder, name))  # left by an export that was killed
    record = _read_record(site, files)
    written = kept = 0
    for blob in version.blobs:
        try:
            if os.stat(os.path.join(files, blob.checksum)).st_size == blob.size:
                kept += 1
                continue
        except FileNotFoundError:
            pass
        data = promoter.read(blob)
        if data is None:
            raise PromoterError("%r changed while it was exported: export again" % blob.path)
        _replace(files, blob.checksum, data)
        written += 1
    if written:
        _sync(files)  # the renames reach the disk before a manifest names the files
    # The record names the new version before any board can see it, so that an
    # export killed from here on never loses track of files a board may fetch.
    record = [entry for entry in record if entry[0] != version.id]
    record.append((version.id, [b.checksum for b in version.blobs]))
    if _replace_changed(site, EXPORT_RECORD, _record_text(record)):
        _sync(site)
    manifest = _replace_changed(files, "manifest.txt", version.files_text)
    if _replace_changed(site, "files.json", version.files_json):
        _sync(site)
    if manifest:
        _sync(files)
    if _replace_changed(files, "version", version.version_json):
        _sync(files)
    record = record[-keep:]
    if _replace_changed(site, EXPORT_RECORD, _record_text(record)):
        _sync(site)
    referenced = set(checksum for _, checksums in record for checksum in checksums)
    pruned = 0
    for name in os.listdir(files):
        if _CHECKSUM.fullmatch(name) and name not in referenced:
            os.remove(os.path.join(files, name))
            pruned += 1
    return written, kept, pruned


def _lock_site(site):
    """An open descriptor on site, locked so that two exports never interleave."""
    fd = os.open(site, os.O_RDONLY)
    try:
        import fcntl
    except ImportError:
        return fd  # Windows: no lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PromoterError("another export to %r is running" % site)
    return fd


def _read_record(site, files):
    """The kept versions, oldest first, as (version id, checksums) pairs.

    Only published versions count: a version named by the record but by neither
    the version nor the manifest of the site is from an export killed before it
    published anything. A published manifest missing from the record (the record
    was deleted) is added, so that its files are kept too.
    """
    record = []
    try:
        with open(os.path.join(site, EXPORT_RECORD), encoding="ascii") as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields or not all(_CHECKSUM.fullmatch(field) for field in fields):
                    raise PromoterError("%r line %d is damaged: delete the file and export again"
                                        % (os.path.join(site, EXPORT_RECORD), number))
                record.append((fields[0], fields[1:]))
    except FileNotFoundError:
        pass
    except UnicodeDecodeError:
        raise PromoterError("%r is damaged: delete the file and export again" % os.path.join(site, EXPORT_RECORD))
    published = set()
    manifest = _read_manifest(os.path.join(files, "manifest.txt"))
    if manifest is not None:
        published.add(manifest[0])
        if manifest[0] not in (entry[0] for entry in record):
            record.append(manifest)
    try:
        with open(os.path.join(files, "version"), "rb") as f:
            published.add(json.loads(f.read(256))["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if record and record[-1][0] not in published:
        record.pop()
    return record


def _read_manifest(path):
    """(version id, checksums) of an exported manifest.txt, or None if there is none."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    if not lines or not _CHECKSUM.fullmatch(lines[0].decode("ascii", "replace")):
        return None
    return lines[0].decode("ascii"), [line[:40].decode("ascii", "replace") for line in lines[1:]]


def _record_text(record):
    return "".join("%s %s\n" % (v, " ".join(checksums)) if checksums else v + "\n"
                   for v, checksums in record).encode("ascii")


def _replace_changed(folder, name, data):
    """_replace() unless the file holds data already; True if it wrote."""
    try:
        with open(os.path.join(folder, name), "rb") as f:
            if f.read(len(data) + 1) == data:
                return False  # an export of an unchanged tree writes nothing
    except FileNotFoundError:
        pass
    _replace(folder, name, data)
    return True


def _replace(folder, name, data):
    """Write folder/name through a temporary name and a rename, its bytes on disk first."""
    temporary = os.path.join(folder, "%s%s.%d" % (_TEMPORARY, name, os.getpid()))
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, os.path.join(folder, name))
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise


def _sync(folder):
    """Put the renames done in folder on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- The HTTP API --------------------------------------------------------------------


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail once a request's deadline has passed.

    The socket's timeout bounds each recv; the deadline bounds the whole request
    head, so that a client sending one byte a second cannot hold a thread forever.
    Such a client is cut off within twice the idle timeout; the socket timeout is
    not lowered for the last stretch, as each settimeout is a system call.
    """

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout
        self.deadline = None
        sock.settimeout(timeout)

    def readable(self):
        return True

    def start(self):
        """A new request: it must arrive within the idle timeout."""
        self.deadline = time.monotonic() + self.timeout

    def readinto(self, buffer):
        if time.monotonic() > self.deadline:
            raise socket.timeout("request not received in time")
        return self.sock.recv_into(buffer)


class Handler(BaseHTTPRequestHandler):
    """Answers the ota-promoter API from the Promoter's published versions."""

    server_version = "ota-promoter/" + __version__
    protocol_version = "HTTP/1.1"
    error_content_type = "application/json"

    def setup(self):
        self.connection = self.request
        # Headers and small bodies leave in one segment, from a buffered writer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self._reader = _DeadlineReader(self.connection, self.server.idle_timeout)
        self.rfile = io.BufferedReader(self._reader)
        self.wfile = self.connection.makefile("wb")

    def handle_one_request(self):
        self._reader.start()
        self._responded = False
        super().handle_one_request()

    def __getattr__(self, name):
        # http.server looks up do_<METHOD>: every method reaches _dispatch, which
        # answers 405 for all but GET and HEAD instead of http.server's 501.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self):
        promoter = self.server.promoter
        try:
            if not self._authorized():
                return self._error(401, "missing or wrong token: send 'Authorization: Bearer <token>'")
            if self.command not in ("GET", "HEAD"):
                return self._error(405, "method %s is not allowed here: use GET or HEAD" % self.command)
            route, query = _parse_path(self.path)
            if route == "/files/version":
                return self._version(promoter, query)
            if route == "/files":
                return self._files(promoter, query)
            if route == "/files/manifest.txt":
                return self._files(promoter, {"format": ["text"]})
            if route.startswith("/files/"):
                return self._download(promoter, route[len("/files/"):])
            return self._error(404, "no such endpoint %r: try /files/version, /files or /files/<checksum>" % route)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception:
            log.exception("error answering %s %r", self.command, self.path)
            self.close_connection = True
            if not self._responded:
                self._error(500, "internal error: see the server's log")

    def _authorized(self):
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        expected = "Bearer " + token
        return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))

    def _version(self, promoter, query):
        version = promoter.current
        since = _first(query, "since") or _etag_value(self.headers.get("If-None-Match"))
        text = _first(query, "wait")
        if text is not None:
            try:
                wait = float(text)
                if not 0 <= wait < float("inf"):
                    raise ValueError
            except ValueError:
                return self._error(400, "wait must be a number of seconds, not %r" % text)
            if since == version.id:
                version = promoter.wait_for_change(since, min(wait, MAX_WAIT))
        if since == version.id or self._not_modified(version.etag):
            return self._send(304, [("ETag", version.etag), ("Cache-Control", "no-cache")])
        self._send_body(
            200, version.version_json, "application/json",
            [("ETag", version.etag), ("Cache-Control", "no-cache")],
        )

    def _files(self, promoter, query):
        version = promoter.current
        form = _first(query, "format") or "json"
        if form == "json":
            body, content_type, etag = version.files_json, "application/json", version.etag
        elif form == "text":
            body, content_type = version.files_text, "text/plain; charset=utf-8"
            etag = '"%s-text"' % version.id
        else:
            return self._error(400, "unknown format %r: use json or text" % form)
        headers = [("ETag", etag), ("Cache-Control", "no-cache")]
        if self._not_modified(etag):
            return self._send(304, headers)
        self._send_body(200, body, content_type, headers)

    def _download(self, promoter, checksum):
        if not _CHECKSUM.fullmatch(checksum):
            return self._error(400, "malformed checksum %r: expected 40 hex digits" % checksum)
        checksum = checksum.lower()
        blob = promoter.blob(checksum)
        data = promoter.read(blob) if blob is not None else None
        if data is None:
            return self._error(
                404, "no file has checksum %s: it changed since your manifest, fetch /files again" % checksum
            )
        etag = '"%s"' % checksum
        name = blob.path.rsplit("/", 1)[-1]
        headers = [
            ("Content-Disposition", _disposition(name)),
            ("X-Target-Path", _raw_utf8(blob.path)),
            ("ETag", etag),
            ("Cache-Control", "public, max-age=31536000, immutable"),
        ]
        if self._not_modified(etag):
            return self._send(304, headers)
        content_type = "text/plain; charset=utf-8" if blob.text else "application/octet-stream"
        self._send_body(200, data, content_type, headers)
        if self.command == "GET":
            device = self.headers.get("X-OTA-Device")
            log.info(
                "%s%s got %s (%d B)", self.client_address[0],
                " [%s]" % device[:32] if device else "", blob.path, len(data),
            )

    def _not_modified(self, etag):
        tags = self.headers.get("If-None-Match")
        if not tags:
            return False
        tags = [t.strip() for t in tags.split(",")]
        return "*" in tags or etag in tags or "W/" + etag in tags

    # Responses.

    def _send(self, code, headers, content_length=None):
        # The status line and headers as one string: http.server's send_header
        # costs more per header than the rest of a /files/version answer.
        self._responded = True
        self.log_request(code)
        head = ["HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\n" % (
            code, HTTPStatus(code).phrase, self.version_string(), self.date_time_string())]
        head += ["%s: %s\r\n" % header for header in headers]
        if content_length is not None:
            head.append("Content-Length: %d\r\n" % content_length)
        if self.close_connection:
            head.append("Connection: close\r\n")
        head.append("\r\n")
        self.wfile.write("".join(head).encode("latin-1"))

    def _send_body(self, code, body, content_type, headers):
        self._send(code, [("Content-Type", content_type)] + headers, len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code, message):
        headers = []
        if code == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="ota-promoter"'))
        if code == 405:
            headers.append(("Allow", "GET, HEAD"))
            self.close_connection = True  # a body we do not read may follow
        log.debug("%s %r: %d %s", self.client_address[0], self.requestline[:200], code, message)
        self._send_body(code, _json({"error": message}), "application/json", headers)

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server itself (bad request line, 414, 431), as JSON."""
        self.close_connection = True
        message = message or HTTPStatus(code).phrase
        self._error(code, message)

    def date_time_string(self, timestamp=None):
        # Formatting the Date header is a visible part of a small answer's cost.
        now = int(time.time()) if timestamp is None else timestamp
        cached = Handler._date
        if cached[0] != now:
            cached = Handler._date = (now, super().date_time_string(now))
        return cached[1]

    _date = (None, "")

    def log_request(self, code="-", size="-"):
        log.debug("%s %r %s", self.client_address[0], self.requestline, code)

    def log_message(self, format, *args):
        log.debug("%s " + format, self.client_address[0], *args)


def _parse_path(path):
    """(route, query) of a request target; the common plain path costs no parsing."""
    if "?" not in path and "%" not in path and path.startswith("/f"):
        return path.rstrip("/"), {}
    url = urlsplit(path)
    return unquote(url.path, errors="replace").rstrip("/"), parse_qs(url.query, keep_blank_values=True)


def _first(query, name):
    values = query.get(name)
    return values[0] if values else None


def _etag_value(header):
    """The version named by an If-None-Match header, if it names exactly one."""
    if not header or "," in header:
        return None
    tag = header.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    return tag.strip('"')


def _raw_utf8(text):
    # http.server encodes header values as latin-1; this makes the bytes on the
    # wire UTF-8, as the original (Go) server sends them.
    return text.encode("utf-8").decode("latin-1")


def _disposition(name):
    if re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        return "attachment; filename=" + name
    return "attachment; filename=\"%s\"" % _raw_utf8(name.replace('"', "'"))


class PromoterServer(ThreadingHTTPServer):
    """The HTTP server of one Promoter; close() stops both."""

    daemon_threads = True
    request_queue_size = 256  # a bench of boards may all connect at once

    def __init__(self, promoter, address, token=None, idle_timeout=DEFAULT_IDLE_TIMEOUT):
        self.promoter = promoter
        self.token = token
        self.idle_timeout = idle_timeout
        self._thread = None
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        try:
            super().__init__(address, Handler)
        except OSError as e:
            host, port = address
            if e.errno == errno.EADDRINUSE:
                raise PromoterError("port %d is already in use on %s: stop the other server or pick another --port" % (port, host))
            if e.errno == errno.EACCES:
                raise PromoterError("no permission to listen on port %d: pick a port above 1023 with --port" % port)
            raise PromoterError("cannot listen on %s port %d: %s" % (host, port, e.strerror or e))

    def server_bind(self):
        # HTTPServer.server_bind looks the host up with getfqdn: a DNS query that
        # can leave the machine and stall for seconds. The name is not needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self):
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = "[%s]" % host
        return "http://%s:%d" % (host, port)

    def start(self):
        """Serve from a background thread; returns self."""
        # A short poll interval makes close() quick; idle, it costs 20 wake-ups a second.
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name="ota-server", daemon=True
        )
        self._thread.start()
        return self

    def close(self):
        """Stop serving and watching, and close the listening socket."""
        self.promoter.stop()
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, socket.timeout)):
            log.debug("%s: connection dropped: %s", client_address[0], error)
        else:
            log.exception("error on the connection from %s", client_address[0])


# -- Command line --------------------------------------------------------------------


def lan_addresses():
    """Non-loopback IPv4 addresses of this machine, found without sending a packet."""
    found = set()
    if sys.platform.startswith("linux"):
        request = 0x8915  # SIOCGIFADDR
    elif sys.platform == "darwin" or "bsd" in sys.platform:
        request = 0xC0206921
    else:
        request = None
    if request is not None and hasattr(socket, "if_nameindex"):
        import fcntl

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    ifreq = fcntl.ioctl(s.fileno(), request, struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue  # no IPv4 address on this interface
                found.add(socket.inet_ntoa(ifreq[20:24]))
    else:
        try:
            found.update(socket.gethostbyname_ex(socket.gethostname())[2])
        except OSError:
            pass
    return sorted((a for a in found if not a.startswith("127.")), key=socket.inet_aton)


def build_parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))

    def positive(text):
        value = float(text)
        if not value > 0 or value == float("inf"):
            raise ValueError(text)
        return value

    positive.__name__ = "positive number"

    def count(text):
        value = int(text)
        if value < 1:
            raise ValueError(text)
        return value

    count.__name__ = "count"

    def port(text):
        value = int(text)
        if not 0 <= value <= 65535:
            raise ValueError(text)
        return value

    parser = Parser(
        prog="ota_promoter.py",
        description="Publish a MicroPython project folder to boards over HTTP.",
    )
    parser.add_argument("dir", nargs="?", default=".", metavar="DIR", help="folder to promote (default: .)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=port, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--interval", type=positive, default=DEFAULT_INTERVAL, metavar="SECONDS",
        help="how often to look for changes (default: %(default)s)",
    )
    parser.add_argument(
        "--ignore", action="append", default=[], metavar="GLOB",
        help="do not promote files whose path or name matches GLOB (repeatable)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("OTA_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on every request (default: $OTA_TOKEN)",
    )
    parser.add_argument(
        "--idle-timeout", type=positive, default=DEFAULT_IDLE_TIMEOUT, metavar="SECONDS",
        help="close connections that send no complete request in this time (default: %(default)s)",
    )
    parser.add_argument(
        "--export", metavar="SITE",
        help="write the folder once into SITE for a static web server, and exit",
    )
    parser.add_argument(
        "--keep", type=count, metavar="N",
        help="with --export: keep the files of the last N versions (default: %d)" % DEFAULT_KEEP,
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    group.add_argument("-v", "--verbose", action="store_true", help="log every request")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


class _Formatter(logging.Formatter):
    def format(self, record):
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            message = "%s: %s" % (record.levelname.lower(), message)
        return "%s %s" % (time.strftime("%H:%M:%S", time.localtime(record.created)), message)


def main(argv=None):
    import signal

    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    if args.token == "":
        print("ota_promoter.py: error: the token is empty (see --help)", file=sys.stderr)
        return 2
    if args.export is not None:
        return _export_once(args)
    if args.keep is not None:
        print("ota_promoter.py: error: --keep goes with --export (see --help)", file=sys.stderr)
        return 2
    # Ctrl-C and a service manager's SIGTERM both end in a clean exit 0, even when
    # started in the background, where the shell ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = None
    try:
        promoter = Promoter(args.dir, interval=args.interval, ignore=args.ignore)
        server = promoter.serve(args.host, args.port, token=args.token, idle_timeout=args.idle_timeout)
        _announce(promoter, server, args)
        server.serve_forever()
    except PromoterError as e:
        print("ota_promoter.py: error: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        if server is not None:
            server.close()
    return 0


def _export_once(args):
    started = time.monotonic()
    try:
        promoter = Promoter(args.dir, ignore=args.ignore)
        keep = DEFAULT_KEEP if args.keep is None else args.keep
        written, kept, pruned = export(promoter, args.export, keep)
    except PromoterError as e:
        print("ota_promoter.py: error: %s" % e, file=sys.stderr)
        return 2
    log.info(
        "exported version %s to %s: %d written, %d kept, %d pruned, in %.2f s",
        promoter.version[:7], args.export, written, kept, pruned, time.monotonic() - started,
    )
    if args.token is not None:
        log.warning("--token does not protect an export: the web server must check it (README: Fleets)")
    return 0


def _announce(promoter, server, args):
    host, port = server.server_address[:2]
    if host in ("0.0.0.0", "::"):
        hosts = lan_addresses() or ["127.0.0.1"]
    else:
        hosts = [host if ":" not in host else "[%s]" % host]
    urls = ["http://%s:%d" % (h, port) for h in hosts]
    files = len(promoter.current.blobs)
    log.info(
        "ota-promoter %s: serving %s, %d file%s, version %s",
        __version__, promoter.root, files, "" if files == 1 else "s", promoter.version[:7],
    )
    for url in urls:
        log.info("  %s", url)
    log.info('on the board: import ota; ota.update("%s")', urls[0])
    if args.token is None and not host.startswith("127.") and host != "::1":
        log.warning("no --token: any device on this network can read the promoted files")


if __name__ == "__main__":
    sys.exit(main())
