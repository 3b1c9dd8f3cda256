"""Boards find the server again (issue 20, protocol D): a board in live mode or watch()
that lost its server asks by UDP broadcast, the server's Discovery answers with its
url and a proof that it holds the token, and the board follows it, refusing any
answer that cannot prove the token. On loopback: Linux delivers a datagram sent to
127.255.255.255 to every socket bound to its port with SO_REUSEADDR."""

import builtins
import hashlib
import hmac
import os
import re
import socket
import sys
import threading
import time

import pytest

import ota
import ota_find
import ota_promoter
import ota_update
from helpers import (
    ROOT, TIMEOUT, SimulatedBoard, checksum, files, free_port, promoted, settle, slow_except, until, write,
)

BROADCAST = "127.255.255.255"
TOKEN = "s3cret-token"
# Linux takes 127.0.0.0/8 as loopback, broadcast included; macOS has 127.0.0.1 alone,
# and Windows lets SO_REUSEADDR take a port another socket holds.
needs_loopback_broadcast = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="broadcasts on loopback (127.255.255.255) and 127.0.0.2: Linux")


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proof(token, nonce, url):
    return hmac.new(token.encode(), ("%s %s" % (nonce, url)).encode(), hashlib.sha256).hexdigest()


def run(generator):
    """Drive one of ota_find's generators to its end, as live mode's ticks do; its value."""
    try:
        while True:
            next(generator)
            time.sleep(0.005)
    except StopIteration as e:
        return e.value


class Responder:
    """A fake server's discovery on loopback: answer(question) gives the datagrams to
    send back to each question (the nonce as str); questions, those it got."""

    def __init__(self, port, answer):
        self.answer = answer
        self.questions = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("", port))
        self.sock.settimeout(0.05)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                data, sender = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            self.questions.append(data)
            for datagram in self.answer(data.decode().split(" ")[1]):
                self.sock.sendto(datagram.encode(), sender)

    def close(self):
        self.stopped.set()
        self.thread.join(TIMEOUT)
        self.sock.close()


@pytest.fixture
def responders():
    started = []

    def start(port, answer):
        started.append(Responder(port, answer))
        return started[-1]

    yield start
    for responder in started:
        responder.close()


@pytest.fixture
def discoveries():
    """Start a server's Discovery: discoveries(port, (host, http port), token)."""
    started = []

    def start(port, http, token=None):
        started.append(ota_promoter.Discovery(port, http, token=token).start())
        return started[-1]

    yield start
    for discovery in started:
        discovery.close()


# -- The datagrams, exactly --------------------------------------------------------------


@needs_loopback_broadcast
def test_the_question_is_ota_promoter_and_16_hex_digits_and_the_first_proven_answer_is_taken(responders):
    port = free_udp_port()
    url = "http://127.0.0.1:8123"

    def answers(nonce):  # refused first: a wrong proof, none, another nonce's (a replay), not a url
        return ["ota-promoter! http://127.0.0.1:1 %s" % ("0" * 64), "ota-promoter! http://127.0.0.1:2 -",
                "ota-promoter! http://127.0.0.1:3 %s" % proof(TOKEN, "0123456789abcdef", "http://127.0.0.1:3"),
                "ota-promoter! ftp://127.0.0.1:4 %s" % proof(TOKEN, nonce, "ftp://127.0.0.1:4"),
                "ota-promoter? %s" % nonce, "ota-promoter! %s %s" % (url, proof(TOKEN, nonce, url))]

    responder = responders(port, answers)
    assert run(ota_find.ask(TOKEN, (BROADCAST, port))) == url
    [question] = responder.questions
    assert re.fullmatch(rb"ota-promoter\? [0-9a-f]{16}", question), question


@needs_loopback_broadcast
def test_without_a_token_the_first_answer_is_taken(responders):
    port = free_udp_port()
    responders(port, lambda nonce: ["not an answer", "ota-promoter! http://127.0.0.1:8124 -"])
    assert run(ota_find.ask(None, (BROADCAST, port))) == "http://127.0.0.1:8124"


@needs_loopback_broadcast
@pytest.mark.parametrize("answer", slow_except(["a wrong proof", "none", "a replay of another nonce's"],
                                                "a replay of another nonce's"))
@pytest.mark.slow
def test_a_board_with_a_token_refuses_a_server_that_cannot_prove_it(responders, answer):
    port = free_udp_port()
    url = "http://127.0.0.1:8125"
    proofs = {"a wrong proof": lambda nonce: proof("another token", nonce, url), "none": lambda nonce: "-",
              "a replay of another nonce's": lambda nonce: proof(TOKEN, "%016x" % (int(nonce, 16) ^ 1), url)}
    responder = responders(port, lambda nonce: ["ota-promoter! %s %s" % (url, proofs[answer](nonce))])
    assert run(ota_find.ask(TOKEN, (BROADCAST, port))) is None
    assert len(responder.questions) == 1


def test_the_hmac_is_rfc_2104s():
    for key in (b"k", b"x" * 64, b"y" * 65, b""):
        want = hmac.new(key, b"0123456789abcdef http://10.0.0.2:9090", hashlib.sha256).hexdigest().encode()
        assert ota_find._hmac(key, b"0123456789abcdef http://10.0.0.2:9090") == want


def test_the_server_answers_with_its_url_and_the_proof_and_ignores_anything_else():
    nonce = b"0123456789abcdef"
    discovery = ota_promoter.Discovery(free_udp_port(), ("0.0.0.0", 9090), token=TOKEN)
    try:  # listening on every address: the one this machine reaches the sender from
        assert discovery.answer(b"ota-promoter? " + nonce, ("127.0.0.1", 40000)) == \
            b"ota-promoter! http://127.0.0.1:9090 " + proof(TOKEN, nonce.decode(), "http://127.0.0.1:9090").encode()
    finally:
        discovery.close()
    discovery = ota_promoter.Discovery(free_udp_port(), ("127.0.0.2", 8080))
    try:
        assert discovery.answer(b"ota-promoter? " + nonce, ("127.0.0.1", 40000)) == \
            b"ota-promoter! http://127.0.0.2:8080 -"  # the address it listens on, when it is one
        for datagram in (b"", b"ota-promoter?", b"ota-promoter? 0123", b"ota-promoter? 0123456789abcdefg",
                         b"ota-promoter? 0123456789abcdeg", b"ota-promoter! http://x -", b"\xff" * 600,
                         b"ota-promoter? " + nonce + b"\n"):
            assert discovery.answer(datagram, ("127.0.0.1", 40000)) is None, datagram
        # listening on loopback only: a board elsewhere is given no url it cannot reach
        assert discovery.answer(b"ota-promoter? " + nonce, ("192.168.0.7", 40000)) is None
    finally:
        discovery.close()


@needs_loopback_broadcast
@pytest.mark.slow
def test_the_responder_survives_malformed_datagrams_and_never_logs_the_token(discoveries, caplog):
    caplog.set_level("DEBUG", logger="ota_promoter")
    port = free_udp_port()
    discoveries(port, ("127.0.0.1", 8126), TOKEN)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.bind(("127.0.0.1", 0))
        for junk in (b"", b"\x00" * 511, b"ota-promoter? " + b"z" * 16, os.urandom(300)):
            s.sendto(junk, ("127.0.0.1", port))
        s.sendto(b"ota-promoter? 00000000000000ff", (BROADCAST, port))
        data = s.recv(512)
    url = "http://127.0.0.1:8126"
    assert data == ("ota-promoter! %s %s" % (url, proof(TOKEN, "00000000000000ff", url))).encode()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in logged and proof(TOKEN, "00000000000000ff", url) not in logged


@pytest.mark.slow
def test_a_flood_of_questions_gets_at_most_max_answers_a_second(caplog):
    """An answer is 3 times its question: a forged sender must not turn the
    responder into an amplifier aimed at it."""
    discovery = ota_promoter.Discovery(free_udp_port(), ("127.0.0.1", 8127))
    discovery.MAX_ANSWERS = 5
    discovery.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            for i in range(50):
                s.sendto(b"ota-promoter? %016x" % i, ("127.0.0.1", discovery.port))
            s.settimeout(0.5)
            answers = []
            try:
                while True:
                    answers.append(s.recv(512))
            except socket.timeout:
                pass
            assert answers == [b"ota-promoter! http://127.0.0.1:8127 -"] * 5
            time.sleep(1.0 - 0.5)  # the next second: a board's question is answered again
            s.settimeout(TIMEOUT)
            s.sendto(b"ota-promoter? %016x" % 50, ("127.0.0.1", discovery.port))
            assert s.recv(512) == b"ota-promoter! http://127.0.0.1:8127 -"
    finally:
        discovery.close()


@needs_loopback_broadcast
@pytest.mark.slow
def test_a_busy_discovery_port_is_one_warning_and_the_server_serves_on(tree, tmp_path):
    import subprocess

    port = free_udp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:  # no SO_REUSEADDR: the port cannot be shared
        taken.bind(("", port))
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "ota_promoter.py"), str(tree), "--host",
                                    "127.0.0.1", "--port", "0", "--discovery", str(port)],
                                   stderr=subprocess.PIPE, text=True)
        try:
            lines = []
            while not lines or "on the board:" not in lines[-1]:
                lines.append(process.stderr.readline()[9:].rstrip("\n"))
                assert lines[-1] or process.poll() is None, lines
        finally:
            process.terminate()
            process.wait(TIMEOUT)
            process.stderr.close()
    assert "warning: boards that lose the server cannot ask for it: UDP port %d: Address already in use" % port in lines
    assert [line for line in lines if line.startswith("warning: boards")] == [lines[0]]  # one line, and it serves:
    assert any(line.startswith("the status page: http://127.0.0.1:") for line in lines)


# -- Live mode and watch() follow a server that moved -----------------------------------------


BOOT = """import ota
ota._RETRY = 50  # CPython only (a const on a board): 15 s of failures in 0.75 s
try:
    ota.update(URL, root=ROOT, token=%(token)r)
except ota.OTAError as e:
    print("no update:", e)
ota.live(URL, root=ROOT, token=%(token)r, wait=1, find=(%(broadcast)r, %(port)d))
"""
APP = "print('app %s')\n"


def save(tree, promoter, path, data):
    write(tree, path, data)
    until(lambda: settle(promoter) or checksum(data, path) in [f["checksum"] for f in promoter.manifest()],
          "%s to be published" % path)


def serving(tree, host, port_udp, token):
    """A server on host, port 0, promoting tree, with its Discovery on port_udp: (server, discovery)."""
    promoter = ota_promoter.Promoter(str(tree), interval=0.05)
    server = promoter.serve(host, 0, token=token).start()
    server.promoter = promoter
    discovery = ota_promoter.Discovery(port_udp, server.server_address[:2], token=token).start()
    return server, discovery


@needs_loopback_broadcast
@pytest.mark.slow
@pytest.mark.parametrize("host, token", [("127.0.0.1", None), ("127.0.0.2", TOKEN)],
                         ids=["another port, no token", "another address, a token"])
def test_the_board_in_live_mode_follows_a_server_that_moved(tree, tmp_path, host, token):
    port = free_udp_port()
    write(tree, "main.py", APP % "v1")
    server, discovery = serving(tree, "127.0.0.1", port, token)
    board = SimulatedBoard([sys.executable, "-u"], os.path.join(ROOT, "micropython"), tmp_path / "device",
                           server.url, BOOT % {"token": token, "broadcast": BROADCAST, "port": port}, "")
    moved = []
    try:
        board.expect("^@boot 2 hard")  # v1 installed
        board.expect("^app v1$")
        discovery.close()
        server.close()  # the server goes; it comes back elsewhere
        moved = serving(tree, host, port, token)
        board.expect("^ota: the server moved to http://%s:%d$" % (host, moved[0].server_address[1]))
        save(tree, moved[0].promoter, "main.py", APP % "v2")  # and the board hears of the next save
        board.expect("^@boot 3 soft")
        board.expect("^app v2$")
        assert files(board.root, own=False) == dict(promoted(tree), **{"boot.py": files(board.root)["boot.py"]})
    finally:
        board.stop()
        for thing in moved[::-1]:
            thing.close()


def test_update_at_boot_and_arming_live_mode_never_import_the_discovery_code(tree, tmp_path, serve, monkeypatch):
    """ota_find.py is imported only to look for a server that moved: neither
    update() at boot nor live() loads it (nor keeps it: memory is the budget)."""
    write(tree, "main.py", "print(1)\n")
    url = serve(ota_promoter.Promoter(str(tree), interval=3600)).url
    monkeypatch.delitem(sys.modules, "ota_find", raising=False)  # back at teardown, for the other tests
    imported = []
    real = builtins.__import__

    def spy(name, *args, **kw):
        imported.append(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", spy)
    device = tmp_path / "device"
    device.mkdir()
    assert ota.update(url, root=str(device), reset=False) is True
    live = ota.live(url, root=str(device))
    for _ in range(20):
        live.tick()
    live.stop()
    assert "ota_update" in imported and "ota_find" not in imported
    assert "ota_find" not in sys.modules


@needs_loopback_broadcast
@pytest.mark.slow
def test_live_mode_asks_the_server_found_then_the_url_it_was_given_and_never_looks_where_find_is_none(
        tmp_path, responders, hostile, monkeypatch):
    port = free_udp_port()
    monkeypatch.setattr(ota, "_RETRY", 20)
    gone = "http://127.0.0.1:%d/prefix" % free_port()  # nothing listens there
    elsewhere = hostile(lambda s, line, stopped: None)  # takes the request, and closes: a failure
    responder = responders(port, lambda nonce: ["ota-promoter! %s -" % elsewhere.url])
    ota._named = None  # as after boot.py's update()
    live = ota.live(gone, root=str(tmp_path), wait=1, timeout=1, find=(BROADCAST, port))
    given = live.host, live.lines, live.head

    def ticks_until(check, what):
        until(lambda: live.tick() or check(), what, timeout=TIMEOUT)

    # 15 s (here 0.3 s) of failures: it looks, and asks the server found at once,
    # without the given url's path
    ticks_until(lambda: elsewhere.requests, "a request to the server found")
    assert elsewhere.requests == ["GET /files/version?wait=1&in=64 HTTP/1.0"]
    assert len(responder.questions) == 1
    # that one fails: the url it was given, at the next retry; it asks no more meanwhile
    ticks_until(lambda: live.host == given[0], "live mode to go back to the url it was given")
    assert (live.lines, live.head, live.args[0]) == (given[1], given[2], gone)
    assert len(responder.questions) == 1
    ticks_until(lambda: len(responder.questions) == 2, "a second question")  # then it asks again
    live.stop()
    live = ota.live(gone, root=str(tmp_path), wait=1, timeout=1, find=None)
    began = time.monotonic()
    while time.monotonic() - began < 1:  # over 3 times its 15 s (here 0.3 s)
        live.tick()
        time.sleep(0.005)
    assert len(responder.questions) == 2 and live.host == given[0]


@needs_loopback_broadcast
@pytest.mark.slow
def test_a_board_with_a_token_keeps_trying_past_a_server_that_cannot_prove_it(tree, tmp_path, responders,
                                                                              monkeypatch):
    port = free_udp_port()
    monkeypatch.setattr(ota, "_RETRY", 20)
    responder = responders(port, lambda nonce: ["ota-promoter! http://127.0.0.1:9 -"])
    ota._named = None
    live = ota.live("http://127.0.0.1:%d" % free_port(), root=str(tmp_path), token=TOKEN, wait=1, timeout=1,
                    find=(BROADCAST, port))
    given = live.host
    until(lambda: live.tick() or len(responder.questions) >= 2, "a second question", timeout=TIMEOUT)
    assert live.host == given  # never followed


@needs_loopback_broadcast
@pytest.mark.slow
def test_watch_follows_a_server_that_moved(tree, tmp_path, discoveries, serve, monkeypatch, capsys):
    port = free_udp_port()
    write(tree, "main.py", APP % "v1")
    promoter = ota_promoter.Promoter(str(tree), interval=3600)
    server = serve(promoter, token=TOKEN)
    discoveries(port, server.server_address[:2], TOKEN)
    device = tmp_path / "device"
    device.mkdir()
    sleeps = []

    def sleep(seconds):  # watch()'s back-off, without the wait
        sleeps.append(seconds)
        if len(sleeps) > 10:
            raise KeyboardInterrupt

    def update(*args):  # stopped once the board has v1
        if os.path.exists(str(device / ".ota")):
            raise KeyboardInterrupt
        return _update(*args)

    _update = ota_update._update
    monkeypatch.setattr(ota_update, "_update", update)
    monkeypatch.setattr(ota_update, "time", type("Clock", (), {"sleep": staticmethod(sleep)}))
    with pytest.raises(KeyboardInterrupt):
        ota.watch("http://127.0.0.1:%d" % free_port(), root=str(device), token=TOKEN, reset=False, wait=1,
                  timeout=1, find=(BROADCAST, port))
    assert sleeps[:4] == [1, 2, 4, 8]  # 15 s of failures, then it looked, and went on at once
    assert files(device, own=False) == promoted(tree)
    said = capsys.readouterr().out
    assert "ota: the server moved to %s\n" % server.url in said


def test_the_options_set_the_discovery_port_or_turn_it_off():
    parse = ota_promoter.build_parser().parse_args
    assert parse(["app"]).discovery == 9090
    assert parse(["app", "--discovery", "9191"]).discovery == 9191
    assert parse(["app", "--no-discovery"]).discovery is None


@needs_loopback_broadcast
@pytest.mark.slow
def test_watch_of_an_https_url_never_looks_for_a_server_elsewhere(tree, tmp_path, responders, serve, monkeypatch):
    """An answer names an http:// url, which no certificate proves: a board given an
    https:// url and no token would take code from any machine that answers first."""
    port = free_udp_port()
    write(tree, "main.py", "print('not from the server given')\n")
    elsewhere = serve(ota_promoter.Promoter(str(tree), interval=3600))
    responder = responders(port, lambda nonce: ["ota-promoter! %s -" % elsewhere.url])
    device = tmp_path / "device"
    device.mkdir()
    sleeps = []

    def sleep(seconds):  # watch()'s back-off, without the wait
        sleeps.append(seconds)
        if len(sleeps) > 6:  # past 15 s of failures, and two retries more
            raise KeyboardInterrupt

    def update(url, *args):  # stopped at once if it goes anywhere else
        asked.append(url)
        if url != given:
            raise KeyboardInterrupt
        return _update(url, *args)

    given, asked, _update = "https://127.0.0.1:%d" % free_port(), [], ota_update._update
    monkeypatch.setattr(ota_update, "_update", update)
    monkeypatch.setattr(ota_update, "time", type("Clock", (), {"sleep": staticmethod(sleep)}))
    with pytest.raises(KeyboardInterrupt):
        ota.watch(given, root=str(device), reset=False, wait=1, timeout=1, find=(BROADCAST, port))
    assert (sleeps, asked) == ([1, 2, 4, 8, 10, 10, 10], [given] * 7)
    assert responder.questions == []
    assert files(device, own=False) == {}
