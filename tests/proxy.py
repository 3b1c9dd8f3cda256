"""A fault-injecting HTTP proxy: sits between a board and the real server."""

import re
import socket
import socketserver
import struct
import threading
import time


def split(response):
    """(head, body) of a raw HTTP response."""
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


def is_manifest(path, response):
    """True for a text manifest: /files/manifest.txt, or /files/<version> answered
    with the manifest of that version (its first line)."""
    if path == "/files/manifest.txt":
        return True
    return response[9:12] == b"200" and split(response)[1][:41] == path[len("/files/"):].encode() + b"\n"


def is_download(path, response):
    """True for a file's bytes: /files/<40 hex> answered 200, not a manifest."""
    return re.fullmatch(r"/files/[0-9a-fA-F]{40}", path) is not None and response[9:12] == b"200" and \
        not is_manifest(path, response)


def set_header(response, name, value):
    head, body = split(response)
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(name.lower() + b":")]
    return b"\r\n".join(lines + [name + b": " + value]) + b"\r\n\r\n" + body


class Reset(bytes):
    """An answer after which the proxy resets the connection instead of closing it."""


class Trickle(bytes):
    """An answer the proxy sends slowly: `rate` bytes a second, in small pieces."""

    rate = 2048


class FaultProxy:
    """Forwards each request to the upstream server and passes its whole answer
    through `fault(path, response) -> response`, which may damage it. Records the
    request heads it saw."""

    def __init__(self, upstream_url):
        host, port = upstream_url[len("http://"):].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.fault = None
        self.heads = []
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._handle(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def paths(self):
        return [head.split(b" ")[1].decode() for head in self.heads]

    def _handle(self, client):
        client.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        self.heads.append(head.split(b"\r\n\r\n")[0])
        with socket.create_connection(self.upstream, timeout=10) as up:
            up.sendall(head.replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1))
            chunks = []
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        response = b"".join(chunks)
        if self.fault is not None:
            response = self.fault(self.paths[-1], response)
        if response is None:
            return  # close without answering
        try:
            if isinstance(response, Trickle):
                for i in range(0, len(response), 128):
                    client.sendall(response[i : i + 128])
                    time.sleep(128 / response.rate)
            else:
                client.sendall(response)
            if isinstance(response, Reset):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
        except OSError:
            pass

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class Relay:
    """A TCP relay to the upstream server that can fall silent: while silent is set, it
    accepts each connection and never answers, as a server that hangs (or a link that
    drops while the board waits) leaves the board's socket half-open."""

    def __init__(self, upstream_url):
        host, port = upstream_url[len("http://"):].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.silent = False
        self.stopped = threading.Event()
        relay = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                if relay.silent:
                    relay.stopped.wait(60)  # held open, never answered
                    return
                with socket.create_connection(relay.upstream, timeout=60) as up:
                    down = threading.Thread(target=relay._pipe, args=(up, self.request), daemon=True)
                    down.start()
                    relay._pipe(self.request, up)
                    down.join(60)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
