"""Typing into a board's REPL, the server's side (issue 20): POST /boards/<id>/input
queues it, live mode's long-poll (GET /files/version?wait=S&in=B) hands it over,
GET /boards/<id>/console reads the console's bytes.

Raw sockets play the board, as the protocol fixes its requests; the page's side
in Chromium is in test_page.py.
"""

import json
import logging
import socket
import threading
import time

import pytest

import ota_promoter
from helpers import TIMEOUT, entered, raw_request, request, until

DEVICE = "a4cf12f3e9b1c0ffee"  # the log shows its first 12 characters
TOKEN = "s3cret-token"


# -- A board in live mode, played by a raw socket ------------------------------------------


def long_poll(server, size=64, wait=10, device=DEVICE, host="127.0.0.1"):
    """Send live mode's long-poll, as the board does (HTTP/1.0); returns the socket."""
    sock = socket.create_connection((host, server.server_address[1]), timeout=TIMEOUT)
    sock.sendall(("GET /files/version?wait=%g&in=%d HTTP/1.0\r\nHost: 127.0.0.1\r\nX-OTA-Device: %s\r\n"
                  "X-OTA-Version: none\r\nIf-None-Match: \"%s\"\r\n%s\r\n" % (
                      wait, size, device, server.published.version,
                      "Authorization: Bearer %s\r\n" % server.token if server.token else "")).encode())
    return sock


def held(server, count=1, device=DEVICE):
    """Wait until the board holds count live long-polls."""
    until(lambda: device in server.boards._boards and len(server.boards._boards[device].holds) == count,
          "%d held long-poll(s) of %s" % (count, device))


def answer(sock):
    """(status line, headers, body) of the answer on sock, read until it closes."""
    data = b""
    with sock:
        for chunk in iter(lambda: sock.recv(4096), b""):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


def typed(server, text, headers=None, device=DEVICE):
    """POST text to the board's input route as a script does; the Response."""
    h = {"X-OTA-Input": "1"}
    if server.token:
        h["Authorization"] = "Bearer " + server.token
    h.update(headers or {})
    return request(server.url, "/boards/%s/input" % device, "POST", headers=h,
                   body=text.encode("utf-8") if isinstance(text, str) else text)


def known(server, device=DEVICE):
    """The board asks once, so the server knows it."""
    h = {"X-OTA-Device": device}
    if server.token:
        h["Authorization"] = "Bearer " + server.token
    assert request(server.url, "/files/version", headers=h).status == 200


def inputs(body):
    return json.loads(body)["in"]


def queued(server, device=DEVICE):
    [board] = [b for b in server.boards.snapshot() if b["device"] == device]
    return board["queued"], board["input_dropped"]


# -- Handed over on the long-poll ----------------------------------------------------------


def test_input_answers_the_held_live_long_poll_at_once(server, caplog):
    sock = long_poll(server)
    held(server)
    with caplog.at_level(logging.INFO, "ota_promoter"):
        assert typed(server, "1+1\r").status == 204
    status, headers, body = answer(sock)
    assert status == "HTTP/1.1 200 OK"
    assert (headers["Content-Type"], headers["Cache-Control"], headers["Content-Length"]) == (
        "application/json", "no-store", str(len(body)))
    assert body == b'{"in": "1+1\\r"}'
    assert "127.0.0.1 > [a4cf12f3e9b1] '1+1\\r'" in [r.getMessage() for r in caplog.records]
    assert queued(server) == (0, 0)


def test_input_queued_before_the_long_poll_comes_in_order_and_in_pieces_of_at_most_b_bytes(server):
    known(server)
    for text in ("import os\r", "os.listdir()\r", "\x03", "\x04"):
        assert typed(server, text).status == 204
    got = []
    while queued(server)[0]:
        status, _, body = answer(long_poll(server, size=24))
        assert status == "HTTP/1.1 200 OK" and len(body) <= 24
        got.append(inputs(body))
    # 14 bytes of room: \r takes 2 ("\\r"), \x03 6 ("\\u0003").
    assert got == ["import os\ros.", "listdir()\r", "\x03\x04"]


def test_after_an_enter_the_rest_waits_for_the_boards_prompt_but_a_ctrl_c(server, monkeypatch):
    """A port reads the stream into a small buffer (256 bytes on ESP8266) that drops
    what the REPL does not read in time: once a line is handed over, the rest goes
    when the board prints a prompt again; a Ctrl-C goes at once."""
    monkeypatch.setattr(server.boards, "INPUT_PACE", 60.0)
    known(server)
    assert typed(server, "1+1\r").status == 204
    assert inputs(answer(long_poll(server))[2]) == "1+1\r"
    assert typed(server, "2+2\r").status == 204
    sock = long_poll(server)
    held(server)
    console_post(server, b"1+1\r\n2\r\n")  # the line ran; no prompt yet
    time.sleep(0.2)
    assert queued(server) == (4, 0)
    console_post(server, b">>> ")
    assert inputs(answer(sock)[2]) == "2+2\r"
    assert typed(server, "import time\r").status == 204  # still no prompt for 2+2: it waits
    assert typed(server, "\x03").status == 204  # a Ctrl-C, and what is before it, goes at once
    assert inputs(answer(long_poll(server))[2]) == "import time\r\x03"


@pytest.mark.slow
def test_input_held_back_for_a_line_goes_after_input_pace_without_a_prompt(server, monkeypatch):
    """An app reading input() prints no prompt: the rest goes INPUT_PACE s after the Enter."""
    monkeypatch.setattr(server.boards, "INPUT_PACE", 0.3)
    known(server)
    assert typed(server, "name = input()\r").status == 204
    assert inputs(answer(long_poll(server))[2]) == "name = input()\r"
    assert typed(server, "ada\r").status == 204
    assert inputs(answer(long_poll(server))[2]) == "ada\r"


def test_pieces_hold_whole_utf8_characters_and_every_brace_is_escaped():
    text = "d = {'é': '€😀'}\r"
    got, rest = [], text
    while rest:
        body, count = ota_promoter.input_answer(rest, 20)
        assert len(body) <= 20 and count > 0
        assert body.index(b"}") == len(body) - 1  # the board reads up to the first }
        got.append(json.loads(body.decode("utf-8"))["in"])
        rest = rest[count:]
    assert "".join(got) == text
    assert got == ["d = {'é':", " '€😀'", "}\r"]  # 10 bytes of room: é takes 2, € 3, 😀 4, } 6
    assert ota_promoter.input_answer("}", 16) == (b'{"in": "\\u007d"}', 1)
    assert ota_promoter.input_answer("\x03}", 16) == (b'{"in": "\\u0003"}', 1)


def test_the_board_gets_its_input_through_the_server_as_it_was_typed(server):
    text = "print({'é': '€😀'})\r"
    known(server)
    assert typed(server, text).status == 204
    got = ""
    while queued(server)[0]:
        _, _, body = answer(long_poll(server, size=16))
        assert len(body) <= 16 and body.index(b"}") == len(body) - 1
        got += inputs(body)
    assert got == text


@pytest.mark.slow
def test_input_is_handed_over_once_to_the_newest_long_poll(server):
    older = long_poll(server, wait=0.5)
    held(server)
    newer = long_poll(server, wait=0.5)
    held(server, 2)
    assert typed(server, "x = 1\r").status == 204
    assert answer(newer)[2] == b'{"in": "x = 1\\r"}'
    status, headers, body = answer(older)  # its wait ends: no new version, and no input
    assert (status, body) == ("HTTP/1.1 304 Not Modified", b"")
    assert answer(long_poll(server, wait=0.2))[0] == "HTTP/1.1 304 Not Modified"  # never again


def test_a_long_poll_the_board_closed_is_not_answered_and_the_input_waits(server):
    gone = long_poll(server, wait=30)
    held(server)
    gone.close()  # the board reset: its connection ended, the server's thread still holds it
    assert typed(server, "\x04").status == 204
    held(server, 0)  # the closed one saw its end, and let go
    assert queued(server) == (1, 0)
    assert answer(long_poll(server))[2] == b'{"in": "\\u0004"}'


@pytest.mark.slow
def test_update_and_watch_never_get_input(server):
    known(server)
    assert typed(server, "1\r").status == 204
    for query in ("", "?wait=0.2"):
        r = request(server.url, "/files/version" + query, headers={
            "X-OTA-Device": DEVICE, "If-None-Match": '"%s"' % server.published.version})
        assert r.status == 304
    assert queued(server) == (2, 0)


def test_in_must_leave_room_for_a_character(server):
    status, _, body = answer(long_poll(server, size=15))
    assert status == "HTTP/1.1 400 Bad Request"
    assert json.loads(body) == {"error": "in must be the largest answer the board reads, at least 16 bytes, "
                                         "not '15'"}


# -- The queue ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_input_for_a_board_that_does_not_listen_is_dropped_with_a_line(server, caplog):
    server.boards.LISTEN_FOR = 0.3
    known(server)
    with caplog.at_level(logging.INFO, "ota_promoter"):
        assert typed(server, "help()\r").status == 204
        until(lambda: queued(server) == (0, 7), "the input dropped")
    assert "input for [a4cf12f3e9b1]: 7 bytes dropped: it has not listened for 0.3 s" in [
        r.getMessage() for r in caplog.records]
    body = request(server.url, "/boards").json()
    assert (body["boards"][0]["input"], body["boards"][0]["listening"]) == ({"queued": 0, "dropped": 7}, False)


@pytest.mark.slow
def test_a_board_listens_while_it_holds_a_long_poll_and_its_input_goes_once_it_stops(server):
    server.boards.LISTEN_FOR = 0.3
    sock = long_poll(server, wait=0.5)
    held(server)
    assert request(server.url, "/boards").json()["boards"][0]["listening"] is True
    assert answer(sock)[0] == "HTTP/1.1 304 Not Modified"  # and the board is gone
    assert typed(server, "x").status == 204
    until(lambda: queued(server) == (0, 1), "the input dropped")
    assert request(server.url, "/boards").json()["boards"][0]["listening"] is False


def test_a_full_queue_refuses_the_whole_post(server):
    known(server)
    assert typed(server, "a" * 4000).status == 204
    r = typed(server, "b" * 97)
    assert (r.status, r.json()) == (503, {"error": "4000 bytes wait for [a4cf12f3e9b1] and 97 more do not fit: "
                                                    "its input queue is full"})
    assert typed(server, "c" * 96).status == 204
    assert queued(server) == (4096, 0)
    r = typed(server, "d" * 4097)
    assert (r.status, r.json()) == (413, {"error": "input of 4097 bytes: send at most 4096 at a time"})


# -- Who may type -------------------------------------------------------------------------------


def test_input_refusals(server):
    known(server)
    cases = [
        ({"X-OTA-Input": None}, b"x", 400, "send input with the header X-OTA-Input: 1"),
        ({}, b"\xff", 400, "input must be UTF-8: byte 0 is not"),
        ({"Origin": "http://evil.example"}, b"x", 403,
         "input is taken from this server's own page only, not from 'http://evil.example'"),
        ({"Origin": "null"}, b"x", 403, "input is taken from this server's own page only, not from 'null'"),
        ({"Sec-Fetch-Site": "cross-site"}, b"x", 403,
         "input is taken from this server's own page only, not from another site"),
        ({"Sec-Fetch-Site": "same-site"}, b"x", 403,
         "input is taken from this server's own page only, not from another site"),
        # A name pointed at 127.0.0.1 by another site (DNS rebinding) is not this server's.
        ({"Host": "evil.example:9090"}, b"x", 403, "input without --token is taken for this machine's address or "
                                                   "name only, not 'evil.example:9090': run the server with --token"),
    ]
    for headers, body, code, message in cases:
        h = {"X-OTA-Input": "1"}
        h.update(headers)
        h = {k: v for k, v in h.items() if v is not None}
        r = request(server.url, "/boards/%s/input" % DEVICE, "POST", headers=h, body=body)
        assert (r.status, r.json()) == (code, {"error": message}), headers
    r = typed(server, "x", device="nobody")
    assert (r.status, r.json()) == (404, {"error": "no board 'nobody': GET /boards lists the boards the server knows"})
    # The server's own page, as a browser posts from it.
    origin = {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}
    assert typed(server, "ok", origin).status == 204
    assert queued(server) == (2, 0)
    r = request(server.url, "/boards/%s/input" % DEVICE)
    assert (r.status, r.headers["Allow"]) == (405, "POST")
    for framing in ("Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n", "\r\n"):
        answered = raw_request(server.url, ("POST /boards/%s/input HTTP/1.1\r\nHost: 127.0.0.1\r\nX-OTA-Input: 1\r\n"
                                            % DEVICE + framing).encode())
        assert answered.startswith(b"HTTP/1.1 411 Length Required\r\n")
        assert answered.endswith(b'{"error":"send the input with one Content-Length, not chunked"}')
    assert queued(server) == (2, 0)


def test_with_a_token_input_needs_it_or_the_pages_cookie(tree, serve):
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token=TOKEN)
    known(server)
    r = request(server.url, "/boards/%s/input" % DEVICE, "POST", headers={"X-OTA-Input": "1"}, body=b"x")
    assert (r.status, r.headers["WWW-Authenticate"]) == (401, 'Bearer realm="ota-promoter"')
    cookie = request(server.url, "/?token=" + TOKEN).headers["Set-Cookie"].split(";")[0]
    r = request(server.url, "/boards/%s/input" % DEVICE, "POST", body=b"1",
                headers={"X-OTA-Input": "1", "Cookie": cookie, "Origin": server.url})
    assert r.status == 204
    assert typed(server, "2").status == 204  # the bearer header
    # A cookie sent by a form on another site: refused.
    r = request(server.url, "/boards/%s/input" % DEVICE, "POST", body=b"3",
                headers={"X-OTA-Input": "1", "Cookie": cookie, "Origin": "http://evil.example"})
    assert r.status == 403
    # With the token, any name of the server will do: the cookie is the proof.
    assert typed(server, "4", {"Host": "bench.example:9090"}).status == 204
    assert queued(server) == (3, 0)
    assert request(server.url, "/boards", headers={"Cookie": cookie}).json()["input"] == "token"


@pytest.mark.parametrize("client, token, from_lan, refused", [
    ("127.0.0.1", None, False, False),
    ("127.8.9.10", None, False, False),
    ("::1", None, False, False),
    ("::ffff:127.0.0.1", None, False, False),
    ("192.168.0.23", None, False, True),
    ("::ffff:192.168.0.23", None, False, True),
    ("fe80::1%eth0", None, False, True),
    ("192.168.0.23", None, True, False),
    ("192.168.0.23", "t", False, False),
])
def test_without_a_token_input_comes_from_this_machine_unless_the_lan_may_type(client, token, from_lan, refused):
    refusal = ota_promoter.input_refusal(client, None, None, "192.168.0.10:9090", token, from_lan)
    assert refusal == ("input is taken from this machine only: run the server with --token, or with "
                       "--repl-from-lan" if refused else None)


def test_without_a_token_input_relayed_by_a_proxy_on_this_machine_is_refused(tree, serve):
    """A reverse proxy on the PC (nginx, Caddy) relays every client from 127.0.0.1: the
    header it adds says the input may come from anywhere."""
    server = serve(ota_promoter.Promoter(str(tree), interval=3600))
    known(server)
    for header in ("X-Forwarded-For: 192.168.0.23", "Forwarded: for=192.168.0.23", "X-Real-IP: 192.168.0.23",
                   "X-Forwarded-Host: bench.example"):
        name, value = header.split(": ")
        r = typed(server, "x", {name: value})
        assert (r.status, r.json()) == (403, {"error": "input relayed by a proxy may come from any machine: run "
                                                       "the server with --token, or with --repl-from-lan"}), header
    assert queued(server) == (0, 0)
    lan = serve(ota_promoter.Promoter(str(tree), interval=3600), repl_from_lan=True)
    known(lan)
    assert typed(lan, "1", {"X-Forwarded-For": "192.168.0.23"}).status == 204
    sealed = serve(ota_promoter.Promoter(str(tree), interval=3600), token=TOKEN)
    known(sealed)
    assert typed(sealed, "2", {"X-Forwarded-For": "192.168.0.23"}).status == 204


def lan_address():
    addresses = ota_promoter.lan_addresses()
    return addresses[0] if addresses else None


@pytest.mark.skipif(lan_address() is None, reason="this machine has no LAN address to come from")
@pytest.mark.parametrize("options, code", [({}, 403), ({"repl_from_lan": True}, 204), ({"token": TOKEN}, 204)])
def test_from_the_machines_lan_address_input_needs_the_option_or_a_token(tree, serve, options, code):
    """A client on the machine's LAN address is not on loopback, as a board's or
    another PC's would not be; no packet leaves the machine."""
    promoter = ota_promoter.Promoter(str(tree), interval=3600)
    server = promoter.serve(lan_address(), 0, **options).start()
    try:
        address = lan_address()
        url = "http://%s:%d" % (address, server.server_address[1])
        h = {"X-OTA-Device": DEVICE}
        if server.token:
            h["Authorization"] = "Bearer " + TOKEN
        assert request(url, "/files/version", headers=h).status == 200
        h["X-OTA-Input"] = "1"
        r = request(url, "/boards/%s/input" % DEVICE, "POST", headers=h, body=b"1")
        assert r.status == code
        if code == 403:
            assert r.json() == {"error": "input is taken from this machine only: run the server with --token, "
                                         "or with --repl-from-lan"}
        body = request(url, "/boards", headers=h).json()
        assert body["input"] == {403: "loopback", 204: "lan" if not server.token else "token"}[code]
    finally:
        server.close()


# -- The console's bytes --------------------------------------------------------------------------


def console_post(server, body, device=DEVICE):
    r = request(server.url, "/console", "POST", headers={"X-OTA-Device": device}, body=body)
    assert r.status == 204


def console(server, query=""):
    r = request(server.url, "/boards/%s/console%s" % (DEVICE, query))
    assert r.status == 200
    return int(r.headers["X-OTA-Offset"]), int(r.headers["X-OTA-End"]), r.body


def test_the_console_is_read_by_offset_and_keeps_its_newest_bytes(server):
    server.boards.CONSOLE_BYTES = 10
    console_post(server, b">>> 1+1\r\n2\r\n")  # 12 bytes: the first 2 are gone
    assert console(server, "?from=0") == (2, 12, b"> 1+1\r\n2\r\n")
    assert console(server, "?from=10") == (10, 12, b"\r\n")
    assert console(server) == (12, 12, b"")  # without from: only what comes
    assert console(server, "?from=99") == (12, 12, b"")
    console_post(server, b">>> ")
    assert console(server, "?from=12") == (12, 16, b">>> ")
    assert console(server, "?from=0") == (6, 16, b"1\r\n2\r\n>>> ")
    body = request(server.url, "/boards").json()
    assert (body["boards"][0]["lines"], body["boards"][0]["partial"]) == ([">>> 1+1", "2"], ">>> ")


def test_a_console_wait_answers_when_the_board_prints(server, monkeypatch):
    console_post(server, b"boot\n")
    waiting = entered(monkeypatch, server.boards, "console_bytes")
    got = []
    reader = threading.Thread(target=lambda: got.append(console(server, "?from=5&wait=30")))
    reader.start()
    assert waiting.wait(TIMEOUT)
    console_post(server, b">>> ")
    reader.join(TIMEOUT)
    assert got == [(5, 9, b">>> ")]
    assert console(server, "?from=9&wait=0.1") == (9, 9, b"")


def test_a_console_wait_from_past_the_end_answers_at_once_with_the_end(server):
    """An offset kept from before the board was forgotten (its count began again):
    the reader learns the end at once, instead of waiting for that many bytes."""
    console_post(server, b">>> ")
    began = time.monotonic()
    assert console(server, "?from=5000&wait=60") == (4, 4, b"")
    assert time.monotonic() - began < TIMEOUT / 2
    stream = ota_promoter._Stream(ota_promoter.Remote(server.url), DEVICE)
    stream.offset = 5000  # as a repl started before the board was forgotten holds it
    assert stream.more(time.monotonic() + TIMEOUT) and (stream.offset, stream.data) == (4, b"")
    console_post(server, b"1+1\r\n")
    assert stream.more(time.monotonic() + TIMEOUT) and (stream.offset, stream.data) == (9, b"1+1\r\n")


def test_the_console_of_an_unknown_board_is_404_and_needs_the_token(tree, serve):
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token=TOKEN)
    r = request(server.url, "/boards/nobody/console", headers={"Authorization": "Bearer " + TOKEN})
    assert r.status == 404
    r = request(server.url, "/boards/nobody/console")
    assert (r.status, r.headers["Content-Type"]) == (401, "application/json")
