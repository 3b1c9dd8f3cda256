"""Fixtures: a promoted folder, a real server on 127.0.0.1, and an HTTP helper."""

import hashlib
import http.client
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "micropython"))

import ota_promoter  # noqa: E402

TIMEOUT = 10  # seconds; the bound on every wait in the tests


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
