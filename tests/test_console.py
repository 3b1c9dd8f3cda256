"""POST /console: a board's output in the server's terminal, bounded (issue 9).

The board's side is not used here: raw HTTP requests play the board, as the
protocol in the README's API fixes them.
"""

import http.client
import logging
import os
import threading
import time

import pytest

import ota_promoter
from helpers import TIMEOUT, raw_request, request, settle, slow_except, write

DEVICE = "a4cf12f3e9b1c0ffee"  # the log shows its first 12 characters


def post(conn, body, device=DEVICE, version="v1", **headers):
    """One POST /console on the http.client connection conn; returns the response."""
    headers = dict({"X-OTA-Device": device, "X-OTA-Version": version}, **headers)
    conn.request("POST", "/console", body=body, headers=headers)
    r = conn.getresponse()
    r.read()
    return r


def connect(server):
    return http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)


def console_lines(caplog):
    return [r.getMessage() for r in caplog.records if " | " in r.getMessage()]


def test_a_boards_prints_and_traceback_appear_in_the_log_with_its_id_and_address(server, caplog):
    conn = connect(server)
    with caplog.at_level(logging.INFO, "ota_promoter"):
        first = post(conn, b"hello from main.py\r\ncount = 1\ncount")
        second = post(conn, b" = 2\nTraceback (most recent call last):\n"
                            b'  File "main.py", line 3, in <module>\n'
                            b"ZeroDivisionError: divide by zero\n")
    conn.close()
    assert (first.status, second.status) == (204, 204)
    assert first.getheader("Content-Length") is None and first.getheader("Connection") is None
    expected = [
        "hello from main.py",
        "count = 1",
        "count = 2",
        "Traceback (most recent call last):",
        '  File "main.py", line 3, in <module>',
        "ZeroDivisionError: divide by zero",
    ]
    assert console_lines(caplog) == ["127.0.0.1 [a4cf12f3e9b1] | " + line for line in expected]
    [board] = server.boards.snapshot()
    assert (board["device"], board["address"], board["version"], board["dropped"]) == (DEVICE, "127.0.0.1", "v1", 0)
    assert board["lines"] == expected


def test_dropped_output_is_reported_and_ends_the_line_it_cut(server, caplog):
    conn = connect(server)
    with caplog.at_level(logging.INFO, "ota_promoter"):
        post(conn, b"tick 1\ntick")
        post(conn, b"tick 9\n", **{"X-OTA-Dropped": "120"})
        bad = post(conn, b"x\n", **{"X-OTA-Dropped": "lots"})
    conn.close()
    assert console_lines(caplog) == [
        "127.0.0.1 [a4cf12f3e9b1] | tick 1",
        "127.0.0.1 [a4cf12f3e9b1] | tick",
        "127.0.0.1 [a4cf12f3e9b1] | (120 bytes of output dropped)",
        "127.0.0.1 [a4cf12f3e9b1] | tick 9",
    ]
    assert bad.status == 400
    assert server.boards.snapshot()[0]["dropped"] == 120


def test_every_request_records_its_board_and_version(server):
    r = request(server.url, "/files/version", headers={"X-OTA-Device": "b0a4d", "X-OTA-Version": "none"})
    assert r.status == 200
    request(server.url, "/files", headers={"X-OTA-Device": "c1", "X-OTA-Version": "1955d4c"})
    request(server.url, "/files/version")  # not a board: not recorded
    boards = server.boards.snapshot()
    assert [(b["device"], b["address"], b["version"], b["lines"]) for b in boards] == [
        ("c1", "127.0.0.1", "1955d4c", []),
        ("b0a4d", "127.0.0.1", "none", []),
    ]


# -- Bad input --------------------------------------------------------------------------


def test_an_oversized_line_is_cut_and_marked_and_a_binary_blob_escaped(server, caplog):
    conn = connect(server)
    with caplog.at_level(logging.INFO, "ota_promoter"):
        for _ in range(3):  # one line of 3,000 bytes, over three requests
            post(conn, b"x" * 1000)
        post(conn, b"\n\x1b[2J\x00\xff\xfe\tend\n")
    conn.close()
    assert console_lines(caplog) == [
        "127.0.0.1 [a4cf12f3e9b1] | " + "x" * 256 + " ... (2744 bytes cut)",
        "127.0.0.1 [a4cf12f3e9b1] | \\x1b[2J\\x00\\xff\\xfe\\tend",
    ]
    board = server.boards.snapshot()[0]
    assert board["lines"] == ["x" * 256 + " ... (2744 bytes cut)", "\\x1b[2J\\x00\\xff\\xfe\\tend"]


@pytest.mark.parametrize("ending", slow_except([b"\n", b"\r\n"], b"\r\n"), ids=["LF", "CRLF"])
@pytest.mark.parametrize("cuts", [(), (300,), (200,), (301,), (200, 300, 301)],
                         ids=["one post", "cut at the end", "cut inside", "cut after 301", "cut thrice"])
def test_the_bytes_cut_from_a_long_line_are_counted_exactly_whatever_its_ending_and_posts(server, ending, cuts):
    """A line of 300 bytes keeps its first 256: 44 are cut, wherever the posts
    split it, and its ending (as boards end lines: \\r\\n) is not one of them."""
    line = bytes(range(65, 65 + 25)) * 12  # 300 printable bytes
    data = line + ending + b"next" + ending
    conn = connect(server)
    for start, end in zip((0,) + cuts, cuts + (len(data),)):
        assert post(conn, data[start:end]).status == 204
    conn.close()
    assert server.boards.snapshot()[0]["lines"] == [line[:256].decode() + " ... (44 bytes cut)", "next"]


def test_a_body_over_4096_bytes_is_413_and_closes(server, caplog):
    with caplog.at_level(logging.INFO, "ota_promoter"):
        answer = raw_request(server.url, b"POST /console HTTP/1.1\r\nHost: x\r\nX-OTA-Device: d\r\n"
                                         b"Content-Length: 5000\r\n\r\n" + b"y\n" * 2500)
    head = answer.split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in head
    assert answer.count(b"HTTP/1.1") == 1  # the body was never read as a request
    assert console_lines(caplog) == []


def test_4096_bytes_are_accepted(server, caplog):
    conn = connect(server)
    with caplog.at_level(logging.INFO, "ota_promoter"):
        r = post(conn, b"z" * 4095 + b"\n")
    conn.close()
    assert r.status == 204
    assert console_lines(caplog) == ["127.0.0.1 [a4cf12f3e9b1] | " + "z" * 256 + " ... (3839 bytes cut)"]


@pytest.mark.parametrize("head, status", [
    (b"POST /console HTTP/1.1\r\nHost: x\r\nX-OTA-Device: d\r\n\r\nhello\n", b"411"),
    (b"POST /console HTTP/1.1\r\nHost: x\r\nX-OTA-Device: d\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"6\r\nhello\n\r\n0\r\n\r\n", b"411"),
    (b"POST /console HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nab\n", b"400"),
    (b"POST /files HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nhello\n", b"405"),
    (b"GET /console HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
])
def test_a_console_post_without_a_length_or_elsewhere_is_refused(server, caplog, head, status):
    with caplog.at_level(logging.INFO, "ota_promoter"):
        answer = raw_request(server.url, head)
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert answer.count(b"HTTP/1.1 ") == 1
    assert console_lines(caplog) == []
    assert server.boards.snapshot() == []


def test_the_token_is_required(tree, serve, caplog):
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token="s3cret")
    conn = connect(server)
    with caplog.at_level(logging.INFO, "ota_promoter"):
        refused = post(conn, b"forged\n")
        conn.close()
        conn = connect(server)
        accepted = post(conn, b"real\n", Authorization="Bearer s3cret")
    conn.close()
    assert (refused.status, accepted.status) == (401, 204)
    assert console_lines(caplog) == ["127.0.0.1 [a4cf12f3e9b1] | real"]


@pytest.mark.slow
def test_a_thousand_fake_boards_leave_the_64_last_seen(server):
    conn = connect(server)
    for n in range(1000):
        assert post(conn, b"line %d\n" % n, device="fake%04d" % n).status == 204
    conn.close()
    boards = server.boards.snapshot()
    assert [b["device"] for b in boards] == ["fake%04d" % n for n in range(999, 935, -1)]
    assert boards[0]["lines"] == ["line 999"]


def test_200_lines_are_kept_per_board(server):
    conn = connect(server)
    for n in range(5):
        post(conn, b"".join(b"line %d\n" % i for i in range(n * 100, n * 100 + 100)))
    conn.close()
    assert server.boards.snapshot()[0]["lines"] == ["line %d" % i for i in range(300, 500)]


def test_nothing_a_board_sends_reaches_the_disk(tree, server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.walk(str(tmp_path)))
    contents = {name: open(os.path.join(str(tree), name), "rb").read() for name in os.listdir(str(tree))}
    conn = connect(server)
    for device in ("../../etc/x", "/tmp/evil", "README.txt", "con\x00sole"):
        post(conn, b"write me to ../main.py\n" * 40, device=device, version="../v")
    conn.close()
    assert sorted(os.walk(str(tmp_path))) == before
    assert {name: open(os.path.join(str(tree), name), "rb").read() for name in os.listdir(str(tree))} == contents
    assert request(server.url, "/files").json()["files"] == [
        {"path": "README.txt", "checksum": "b5463907b61ada69504740be605374912c85d866"}]


@pytest.mark.slow
def test_other_endpoints_keep_working_while_consoles_flood(tree, server):
    write(tree, "big.bin", os.urandom(200000))
    settle(server.promoter)
    files = {f["path"]: f["checksum"] for f in request(server.url, "/files").json()["files"]}
    stop = threading.Event()
    posted = []

    def flood(n):
        conn = connect(server)
        count = 0
        try:
            while not stop.is_set():
                assert post(conn, os.urandom(1000), device="flood%d" % n).status == 204
                count += 1
        finally:
            conn.close()
            posted.append(count)

    floods = [threading.Thread(target=flood, args=(n,), daemon=True) for n in range(4)]
    for t in floods:
        t.start()
    try:
        deadline = time.monotonic() + 1.0
        answered = 0
        while time.monotonic() < deadline:
            assert request(server.url, "/files/version").json() == {"version": server.promoter.version}
            r = request(server.url, "/files/" + files["big.bin"])
            assert r.status == 200 and len(r.body) == 200000
            answered += 1
    finally:
        stop.set()
        for t in floods:
            t.join(TIMEOUT)
    assert len(posted) == 4 and min(posted) > 0  # every flood got its posts through
    assert answered > 0
    assert sorted(b["device"] for b in server.boards.snapshot()) == ["flood0", "flood1", "flood2", "flood3"]
