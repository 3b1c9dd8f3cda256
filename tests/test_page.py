"""The status page (GET /) and GET /boards (issue 12).

/boards is checked over raw HTTP; the page in a real headless Chromium, driven
by selenium with Debian's chromedriver, against a real server and the real
client (micropython/ota.py under CPython, given a board id through a stand-in
`machine` module).
"""

import html
import http.client
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler
from urllib.parse import quote, quote_plus, unquote

import pytest

import ota
import ota_promoter
from helpers import (
    ROOT, TIMEOUT, another_site, checksum, entered, needs_posix, needs_proc, raw_request, request, settle, until, wait_for_server,
    write,
)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


def _browser_missing():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return ("needs Chromium and its driver (Debian: apt-get install chromium chromium-driver; "
                "or set $CHROMIUM and $CHROMEDRIVER)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium: .venv/bin/pip install -r requirements-dev.txt"
    return None


needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium, driven by the chromedriver at CHROMEDRIVER (selenium
    never looks for or downloads one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,900",
                 "--user-data-dir=%s" % (tmp_path / "chromium")):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    yield driver
    driver.quit()


def card(driver, device):
    """{id, badge, version, facts, console} of the board's card on the page, or None."""
    return driver.execute_script("""
        for (const c of document.querySelectorAll('.board')) {
            if (c.dataset.device !== arguments[0]) continue;
            const facts = {};
            const dts = c.querySelectorAll('dt'), dds = c.querySelectorAll('dd');
            dts.forEach((dt, i) => { facts[dt.textContent] = dds[i].textContent; });
            const pre = c.querySelector('pre');
            return {id: c.querySelector('.id').textContent, badge: c.querySelector('.badge').textContent,
                    facts: facts, console: pre ? pre.textContent : null, silent: c.classList.contains('silent')};
        }
        return null;""", device)


def shown_version(driver):
    return driver.execute_script("const e = document.getElementById('version-id'); return e && e.title;")


def board_request(server, path, device, version, headers=None):
    h = {"X-OTA-Device": device, "X-OTA-Version": version}
    h.update(headers or {})
    return request(server.url, path, headers=h)


def fake_machine(monkeypatch, unique_id):
    """The client names its board by machine.unique_id(), as on a board."""
    machine = types.ModuleType("machine")
    machine.unique_id = lambda: unique_id
    monkeypatch.setitem(sys.modules, "machine", machine)


# -- GET /boards -----------------------------------------------------------------------


QUIET = {"partial": "", "listening": False, "input": {"queued": 0, "dropped": 0},  # no REPL in use
         "rolled_back": None}  # no version rolled back


def test_boards_json_after_a_scripted_sequence_of_board_requests(tree, serve):
    write(tree, "README.txt", "hello\n")
    promoter = ota_promoter.Promoter(str(tree), interval=3600, check=ota_promoter.SourceCheck())
    server = serve(promoter)
    v1 = promoter.version
    readme = request(server.url, "/files").json()["files"][0]["checksum"]
    board_request(server, "/files/version", "b1", v1)  # up to date
    board_request(server, "/files/version", "b2", "none")  # behind: nothing installed
    board_request(server, "/files/" + "0" * 40, "b3", "none")  # a 404: its last error
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
    conn.request("POST", "/console", body=b"boot\nTraceback (most recent call last):\n"
                 b'  File "main.py", line 3, in <module>\nZeroDivisionError: divide by zero\n',
                 headers={"X-OTA-Device": "b1", "X-OTA-Version": v1})
    assert conn.getresponse().status == 204
    conn.close()
    write(tree, "main.py", "print('hi')\n")
    write(tree, "boot.py", "import ota(\n")  # does not compile: held back
    settle(promoter)
    v2 = promoter.version
    board_request(server, "/files/version", "b3", v2)
    board_request(server, "/files?format=text", "b2", "none")  # fetching v2: updating
    board_request(server, "/files/" + readme, "b2", "none")
    # b4 was last seen long ago: silent.
    board_request(server, "/files/version", "b4", v1)
    server.boards._boards["b4"].last_seen -= 1000
    body = request(server.url, "/boards").json()
    now = body.pop("now")
    assert abs(now - time.time()) < TIMEOUT
    assert body.pop("state").endswith(".%d" % server.boards._serial)
    published = body["version"].pop("published")
    assert now - TIMEOUT < published <= now
    times = []
    for b in body["boards"]:
        times.append(b.pop("last_seen"))
        if b["error"] is not None:
            assert now - TIMEOUT < b["error"].pop("time") <= now
    assert times[0] < now - 900 and all(now - TIMEOUT < t <= now for t in times[1:])
    assert body == {
        "version": {"id": v2, "first": False, "added": ["main.py"], "changed": [], "removed": []},
        "starting": None,
        "files": [
            {"path": "README.txt", "size": 6, "changed": False, "held": None},
            {"path": "boot.py", "size": None, "changed": False,
             "held": promoter.current.held["boot.py"]},
            {"path": "main.py", "size": 12, "changed": True, "held": None},
        ],
        "files_total": 3,
        "boards": [
            {"device": "b4", "address": "127.0.0.1", "version": v1, "state": "behind", "silent": True,
             "error": None, "dropped": 0, "lines": [], **QUIET},
            {"device": "b2", "address": "127.0.0.1", "version": "none", "state": "updating", "silent": False,
             "error": None, "dropped": 0, "lines": [], **QUIET},
            # Its 404 was cleared when it reported another installed version.
            {"device": "b3", "address": "127.0.0.1", "version": v2, "state": "current", "silent": False,
             "error": None, "dropped": 0, "lines": [], **QUIET},
            {"device": "b1", "address": "127.0.0.1", "version": v1, "state": "behind", "silent": False,
             "error": {"text": "ZeroDivisionError: divide by zero"}, "dropped": 0,
             "lines": ["boot", "Traceback (most recent call last):", '  File "main.py", line 3, in <module>',
                       "ZeroDivisionError: divide by zero"], **QUIET},
        ],
        "silent_after": ota_promoter.Boards.SILENT_AFTER,
        "input": "loopback",
    }
    assert promoter.current.held["boot.py"].startswith("1:") and "SyntaxError" in promoter.current.held["boot.py"]


def test_boards_long_polls_until_a_board_changes(server, monkeypatch):
    first = request(server.url, "/boards").json()
    started = time.monotonic()
    held = entered(monkeypatch, server.boards, "wait")
    answers = []
    t = threading.Thread(target=lambda: answers.append(
        request(server.url, "/boards?wait=20&since=" + first["state"]).json()))
    t.start()
    assert held.wait(TIMEOUT), "the server never held the request"
    t.join(0.3)
    assert answers == []  # still waiting
    board_request(server, "/files/version", "late", "none")
    t.join(TIMEOUT)
    assert [b["device"] for b in answers[0]["boards"]] == ["late"]
    assert answers[0]["state"] != first["state"]
    assert time.monotonic() - started < TIMEOUT
    # A board polling again changes nothing the page shows: the wait runs out.
    assert request(server.url, "/boards?wait=0.2&since=" + answers[0]["state"]).json()["state"] == answers[0]["state"]
    assert request(server.url, "/boards?wait=soon").status == 400


def test_the_number_of_boards_kept_is_bounded(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
    for n in range(70):
        conn.request("GET", "/files/version", headers={"X-OTA-Device": "d%02d" % n, "X-OTA-Version": "none"})
        conn.getresponse().read()
    conn.close()
    assert [b["device"] for b in request(server.url, "/boards").json()["boards"]] == [
        "d%02d" % n for n in range(69, 5, -1)]


# -- The token ----------------------------------------------------------------------------

TOKEN = "s3cret-T0ken"


def cookie_of(server):
    """The cookie the page exchange gives a browser, as "name=value"."""
    return request(server.url, "/?token=" + TOKEN).headers["Set-Cookie"].split(";")[0]


def test_with_a_token_the_page_takes_it_once_in_the_url_for_a_cookie(tree, serve, caplog):
    write(tree, "main.py", "x = 1\n")
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token=TOKEN)
    with caplog.at_level(logging.DEBUG, "ota_promoter"):
        refused = request(server.url, "/")
        wrong = request(server.url, "/?token=guess")
        boards = request(server.url, "/boards")
        exchanged = request(server.url, "/?token=" + TOKEN)
        cookie = exchanged.headers["Set-Cookie"]
        value = cookie.split(";")[0]
        page = request(server.url, "/", headers={"Cookie": "other=1; " + value})
        with_cookie = request(server.url, "/boards", headers={"Cookie": value})
        api_with_cookie = request(server.url, "/files", headers={"Cookie": value})
        bearer = request(server.url, "/boards", headers={"Authorization": "Bearer " + TOKEN})
        forged = request(server.url, "/boards", headers={"Cookie": value.split("=")[0] + "=" + TOKEN})
    assert (refused.status, wrong.status, boards.status) == (401, 401, 401)
    assert refused.headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<form method="post" action="/">' in refused.body and b"/?token=YOUR_TOKEN" in refused.body
    assert b'<p id="wrong" style="color:#b00020"></p>' in refused.body
    assert b'<p id="wrong" style="color:#b00020">That is not the server\'s token.</p>' in wrong.body
    assert exchanged.status == 303 and exchanged.headers["Location"] == "/"
    name = "ota_page_%d_%s" % (server.server_address[1], ota_promoter.hashlib.sha256(
        b"ota-promoter cookie name\n" + TOKEN.encode()).hexdigest()[:8])
    assert value.split("=")[0] == name
    assert [p.strip() for p in cookie.split(";")[1:]] == ["Path=/", "HttpOnly", "SameSite=Lax"]
    assert TOKEN not in cookie  # the cookie is derived from the token, not the token
    assert page.status == 200 and b"<title>OTA Promoter" in page.body
    assert with_cookie.status == 200 and with_cookie.json()["files_total"] == 1
    assert api_with_cookie.status == 401  # the API keeps its bearer header
    assert (bearer.status, forged.status) == (200, 401)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "GET /?token=(hidden) HTTP/1.1" in logged
    assert TOKEN not in logged and "guess" not in logged


def test_the_refusal_pages_form_posts_the_token_for_the_cookie(tree, serve):
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token=TOKEN)
    pair = cookie_of(server)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    right = request(server.url, "/", "POST", form, body="token=" + TOKEN.replace("-", "%2D"))
    wrong = request(server.url, "/", "POST", form, body="token=guess")
    empty = request(server.url, "/", "POST", form)
    too_long = request(server.url, "/", "POST", form, body="token=" + "x" * 5000)
    assert right.status == 303 and right.headers["Location"] == "/"
    assert right.headers["Set-Cookie"] == pair + "; Path=/; HttpOnly; SameSite=Lax"
    assert (wrong.status, empty.status) == (401, 401)
    assert b"That is not the server's token.</p>" in wrong.body and b"<form" in wrong.body
    assert too_long.status == 413 and too_long.headers["Connection"] == "close"


def test_the_page_cookie_authorises_only_reading_the_page_and_boards(tree, serve):
    """The cookie is SameSite=Lax: another site can make a browser send it with a
    GET it links to, so nothing it authorises may change anything."""
    write(tree, "README.txt", "hello\n")
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token=TOKEN)
    board_request(server, "/files/version", "b1", "none", {"Authorization": "Bearer " + TOKEN})
    cookie = {"Cookie": cookie_of(server)}
    as_the_board = dict(cookie, **{"X-OTA-Device": "b1", "X-OTA-Version": "forged"})
    assert request(server.url, "/", headers=as_the_board).status == 200
    assert request(server.url, "/", "HEAD", as_the_board).status == 200
    assert request(server.url, "/boards?wait=0", headers=as_the_board).status == 200
    assert request(server.url, "/boards?wait=soon", headers=as_the_board).status == 400
    assert request(server.url, "/", "POST", as_the_board).status == 401  # the form, without a token
    assert request(server.url, "/boards", "POST", as_the_board).status == 401
    assert request(server.url, "/console", "POST", as_the_board, body="forged\n").status == 401
    assert request(server.url, "/files", headers=as_the_board).status == 401
    [board] = request(server.url, "/boards", headers={"Authorization": "Bearer " + TOKEN}).json()["boards"]
    assert (board["device"], board["version"], board["error"], board["lines"]) == ("b1", "none", None, [])


# -- The token never reaches the log ----------------------------------------------------


def every_shape_of_the_token(token):
    """(raw request, the status it gets) for the token in every place and spelling
    a client could put it."""
    quoted = "".join("%%%02X" % ord(c) for c in token)  # every character percent-encoded
    bearer = "\r\nAuthorization: Bearer " + token
    download = "/files/" + checksum("hello\n", "README.txt")
    shapes = [
        ("GET /?token=%s HTTP/1.1" % token, 303),
        ("GET /?%%74oken=%s HTTP/1.1" % token, 303),
        ("GET /?to%%6Ben=%s HTTP/1.1" % quoted, 303),
        ("GET /?TOKEN=%s HTTP/1.1" % token, 401),
        ("GET /?x=1;token=%s HTTP/1.1" % token, 401),
        ("GET /?x=1&token=%s&y=2 HTTP/1.1" % token, 303),
        ("HEAD /?token=%s HTTP/1.1" % token, 303),
        ("GET /boards?token=%s HTTP/1.1" % token, 401),
        ("GET /boards?wait=%s HTTP/1.1%s" % (token, bearer), 400),
        ("GET /files/version?wait=%s HTTP/1.1%s" % (token, bearer), 400),
        ("GET /%s HTTP/1.1" % token, 401),
        ("GET /%s HTTP/1.1%s" % (token, bearer), 404),
        ("GET /%s HTTP/1.1%s" % (quoted, bearer), 404),
        ("GET /%s HTTP/1.1%s" % (quoted.replace("%", "%25"), bearer), 404),
        ("GET /files/%s HTTP/1.1%s" % (token, bearer), 400),
        ("DELETE /files?token=%s HTTP/1.1%s" % (token, bearer), 405),
        ("POST /console?token=%s HTTP/1.1\r\nContent-Length: 0" % token, 401),
        ("GET /?token=%s and more HTTP/1.1" % token, 400),  # "Bad request syntax (...)"
        ("GET /?token=%s HTTP/9" % token, 400),  # "Bad request version (...)"
        ("GET /?token=%s" % token, 303),  # HTTP/0.9
        ("GET /?token=%s HTTP/1.1\r\nX-Long: %s" % (token, "y" * 70000), 431),
        ("GET %s HTTP/1.1\r\nX-OTA-Device: %s%s" % (download, token, bearer), 200),
        ("POST /?token=%s HTTP/1.1\r\nContent-Length: %d\r\n\r\ntoken=%s" % (token, len(token) + 6, token), 303),
        ("POST /console HTTP/1.1\r\nX-OTA-Device: %s%s\r\nContent-Length: %d\r\n\r\nmy token is %s\n"
         % (token, bearer, len(token) + 13, token), 204),
    ]
    shaped = []
    for text, status in shapes:
        head, _, body = text.partition("\r\n\r\n")
        shaped.append(((head + "\r\nHost: x\r\nConnection: close\r\n\r\n" + body).encode(), status))
    return shaped


@pytest.mark.slow
@needs_posix
def test_the_token_reaches_no_log_line_whatever_the_route_or_spelling(tree):
    write(tree, "README.txt", "hello\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = "http://127.0.0.1:%d" % port
    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "ota_promoter.py"), str(tree), "--host", "127.0.0.1",
         "--port", str(port), "--token", TOKEN, "-v"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_server(url, headers={"Authorization": "Bearer " + TOKEN}).status == 200
        shapes = every_shape_of_the_token(TOKEN)
        answers = [int(raw_request(url, data).split(b" ", 2)[1]) for data, _ in shapes]
        server.send_signal(signal.SIGINT)
        log = server.communicate(timeout=TIMEOUT)[1]
    finally:
        server.kill()
        server.wait(TIMEOUT)
    lines = log.splitlines()
    # The start-up lines hand the token over, to the browser and to the board; no other line shows it.
    handing = [line for line in lines if TOKEN in line]
    assert [line[9:] for line in handing] == [
        "the status page: %s/?token=%s" % (url, TOKEN), 'on the board: import ota; ota.update("%s", token="%s")'
        % (url, TOKEN)]
    lines = [line for line in lines if line not in handing]
    assert len(lines) > len(shapes)  # every request was logged
    for line in lines:
        assert TOKEN.lower() not in unquote(unquote(line)).lower(), line
    for shown in ["'GET /?token=(hidden) HTTP/1.1' 303", "'GET /?%74oken=(hidden) HTTP/1.1' 303",
                  "'GET /?x=1;token=(hidden) HTTP/1.1': 401 (the page without the token)",
                  "'GET /?token=(hidden) and more HTTP/1.1': 400 Bad request syntax "
                  "('GET /?token=(hidden) and more HTTP/1.1')",
                  "'GET /(hidden) HTTP/1.1': 404 no such endpoint '/(hidden)': try",
                  "127.0.0.1 [(hidden)] | my token is (hidden)"]:
        assert any(shown in line for line in lines), shown
    assert answers == [status for _, status in shapes]


def test_the_token_in_a_failing_requests_traceback_is_hidden(tree, serve, monkeypatch, caplog):
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token=TOKEN)

    def broken(promoter, boards, lines=0, input_from=None):
        raise RuntimeError("no status for %s" % TOKEN)

    monkeypatch.setattr(ota_promoter, "status", broken)
    with caplog.at_level(logging.DEBUG, "ota_promoter"):
        r = request(server.url, "/boards?token=" + TOKEN, headers={"Authorization": "Bearer " + TOKEN})
    assert r.status == 500
    assert "RuntimeError: no status for (hidden)" in caplog.text
    assert "error answering GET '/boards?token=(hidden)'" in caplog.text
    assert TOKEN not in caplog.text


def test_a_token_is_hidden_however_a_log_line_quotes_encodes_or_cuts_it(tree, serve, caplog):
    odd = "a'b\"c\\d e&f%g+h"
    serve(ota_promoter.Promoter(str(tree), interval=3600), token=odd)
    long = "0123456789abcdef" * 3
    serve(ota_promoter.Promoter(str(tree), interval=3600), token=long)
    with caplog.at_level(logging.INFO, "ota_promoter"):
        for form in [odd, repr(odd), repr("x'" + odd), quote(odd), quote_plus(odd), quote(quote(odd)),
                     odd.upper(), quote(odd).lower(), long[:12], long[:32], long + "-and-more", long[:7]]:
            ota_promoter.log.info("seen %s here", form)
    assert [r.getMessage() for r in caplog.records] == [
        "seen (hidden) here", "seen '(hidden)' here", "seen 'x\\'(hidden)' here"] + ["seen (hidden) here"] * 5 + [
        "seen (hidden) here", "seen (hidden) here", "seen (hidden)-and-more here", "seen 0123456 here"]


def test_a_short_token_hides_the_same_letters_anywhere_in_the_log(tree, serve, caplog):
    serve(ota_promoter.Promoter(str(tree), interval=3600), token="abc")
    with caplog.at_level(logging.INFO, "ota_promoter"):
        ota_promoter.log.info("127.0.0.1 got lib/abcd.py (10 B)")
    assert [r.getMessage() for r in caplog.records] == ["127.0.0.1 got lib/(hidden)d.py (10 B)"]


@needs_proc
def test_a_token_given_as_an_option_is_in_the_process_list_and_from_the_environment_is_not(tree):
    started = []
    try:
        for args, env in [(["--token", "option-T0ken"], {}), ([], {"OTA_TOKEN": "environment-T0ken"})]:
            started.append(subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "ota_promoter.py"), str(tree), "--host", "127.0.0.1",
                 "--port", "0"] + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=dict(os.environ, **env)))
        listed = []
        for process in started:
            with open("/proc/%d/cmdline" % process.pid, "rb") as f:
                listed.append(f.read().split(b"\0"))
    finally:
        for process in started:
            process.kill()
            process.wait(TIMEOUT)
    assert b"option-T0ken" in listed[0]
    assert not any(b"environment-T0ken" in arg for arg in listed[1])


# -- In the browser -----------------------------------------------------------------------


@pytest.mark.slow
@needs_browser
def test_the_page_follows_a_board_driven_by_the_client_through_a_save(tree, tmp_path, serve, browser,
                                                                      monkeypatch):
    write(tree, "main.py", "print('v1')\n")
    promoter = ota_promoter.Promoter(str(tree))  # watched, as from the command line
    server = serve(promoter)
    fake_machine(monkeypatch, b"\xa4\xcf\x12\xf3")
    board = tmp_path / "board"
    board.mkdir()
    assert ota.update(server.url, root=str(board), reset=False) is True
    assert ota.update(server.url, root=str(board), reset=False) is False  # says it has v1 now
    v1 = promoter.version
    browser.get(server.url + "/")
    shown = until(lambda: card(browser, "a4cf12f3"), "the board on the page")
    assert shown["facts"]["version"] == v1[:7] and shown["badge"] == "up to date"
    assert shown["facts"]["address"] == "127.0.0.1"
    assert shown_version(browser) == v1
    loaded = browser.execute_script("return performance.timeOrigin")

    write(tree, "main.py", "print('v2')\n")
    v2 = until(lambda: promoter.version != v1 and promoter.version, "the save to be published")
    until(lambda: shown_version(browser) == v2, "the page to show the new version")
    until(lambda: card(browser, "a4cf12f3")["badge"] == "behind", "the board to go behind")
    assert browser.execute_script("return document.getElementById('changes').textContent") == \
        "changed: +0 ~1 -0: ~main.py"
    assert ota.update(server.url, root=str(board), reset=False) is True
    until(lambda: card(browser, "a4cf12f3")["badge"] == "updating now", "the board to show updating")
    assert ota.update(server.url, root=str(board), reset=False) is False
    now = until(lambda: (lambda c: c["badge"] == "up to date" and c)(card(browser, "a4cf12f3")), "up to date")
    assert now["facts"]["version"] == v2[:7]
    # One page all along: never reloaded.
    assert browser.execute_script("return performance.timeOrigin") == loaded


def post_console(server, device, version, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
    try:
        conn.request("POST", "/console", body=body, headers={"X-OTA-Device": device, "X-OTA-Version": version})
        assert conn.getresponse().status == 204
    finally:
        conn.close()


@pytest.mark.slow
@needs_browser
def test_a_boards_error_goes_once_it_reports_a_good_update(tree, tmp_path, serve, browser, monkeypatch):
    """The board's crash stays on the page while it runs those files; the fix,
    installed by the real client, clears it; a crash of the new files shows again."""
    write(tree, "main.py", "print(led2)\n")
    promoter = ota_promoter.Promoter(str(tree))
    server = serve(promoter)
    fake_machine(monkeypatch, b"\xa4\xcf\x12\xf3")
    board = tmp_path / "board"
    board.mkdir()
    assert ota.update(server.url, root=str(board), reset=False) is True
    v1 = promoter.version
    post_console(server, "a4cf12f3", v1, b'Traceback (most recent call last):\n  File "main.py", line 1, in <module>\n'
                                         b"NameError: name 'led2' isn't defined\n")
    browser.get(server.url + "/")
    shown = until(lambda: card(browser, "a4cf12f3"), "the board")
    assert shown["badge"] == "up to date"
    assert re.fullmatch(r"NameError: name 'led2' isn't defined \(\d+ s ago\)", shown["facts"]["last error"])

    write(tree, "main.py", "print('fixed')\n")
    until(lambda: promoter.version != v1, "the fix to be published")
    v2 = promoter.version
    until(lambda: card(browser, "a4cf12f3")["badge"] == "behind", "the board to go behind")
    assert "last error" in card(browser, "a4cf12f3")["facts"]  # it still runs the files that failed
    assert ota.update(server.url, root=str(board), reset=False) is True
    assert ota.update(server.url, root=str(board), reset=False) is False  # its first request on v2
    shown = until(lambda: (lambda c: c["badge"] == "up to date" and c)(card(browser, "a4cf12f3")), "up to date")
    assert sorted(shown["facts"]) == ["address", "last seen", "version"]
    assert shown["facts"]["version"] == v2[:7]
    [board_json] = request(server.url, "/boards").json()["boards"]
    assert board_json["error"] is None

    post_console(server, "a4cf12f3", v2, b"Traceback (most recent call last):\nOSError: [Errno 2] ENOENT\n")
    until(lambda: re.fullmatch(r"OSError: \[Errno 2\] ENOENT \(\d+ s ago\)",
                               card(browser, "a4cf12f3")["facts"].get("last error", "")), "the new version's error")


def console_scroll(driver, device):
    """{top, bottom, at_end, overflows} of the board's console box."""
    return driver.execute_script("""
        for (const c of document.querySelectorAll('.board')) {
            if (c.dataset.device !== arguments[0]) continue;
            const pre = c.querySelector('pre.console');
            return {top: pre.scrollTop, at_end: pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 1,
                    overflows: pre.scrollHeight > pre.clientHeight, last: pre.textContent.split('\\n').pop()};
        }
        return null;""", device)


@pytest.mark.slow
@needs_browser
def test_a_console_follows_its_newest_line_unless_its_reader_scrolled_up(server, browser):
    post_console(server, "b1", "none", b"".join(b"line %d\n" % n for n in range(1, 31)))
    post_console(server, "b2", "none", b"hello\n")
    browser.get(server.url + "/")
    until(lambda: card(browser, "b1") and card(browser, "b2"), "both boards")
    first = console_scroll(browser, "b1")
    assert (first["at_end"], first["overflows"], first["last"]) == (True, True, "line 30")
    post_console(server, "b1", "none", b"line 31\n")
    until(lambda: console_scroll(browser, "b1")["last"] == "line 31", "the new line")
    assert console_scroll(browser, "b1")["at_end"] is True

    # The reader scrolls up to read: new lines, of this board or another, leave the box where it is.
    browser.execute_script("document.querySelector('.board[data-device=b1] pre').scrollTop = 40")
    post_console(server, "b1", "none", b"line 32\n")
    until(lambda: console_scroll(browser, "b1")["last"] == "line 32", "the next line")
    post_console(server, "b2", "none", b"again\n")
    until(lambda: card(browser, "b2")["console"] == "hello\nagain", "the other board's line")
    assert console_scroll(browser, "b1")["top"] == 40

    # Back at the end, it follows again.
    browser.execute_script("const pre = document.querySelector('.board[data-device=b1] pre');"
                           "pre.scrollTop = pre.scrollHeight")
    post_console(server, "b1", "none", b"line 33\n")
    until(lambda: console_scroll(browser, "b1")["last"] == "line 33", "the line after")
    assert console_scroll(browser, "b1")["at_end"] is True


@pytest.mark.slow
@needs_browser
def test_screenshot_py_works_as_the_readme_writes_it(tmp_path):
    """Run from a copy of the clone's two files it needs, so that the picture in
    tests/ stays as committed."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert "(`.venv/bin/python tests/screenshot.py` takes this picture" in f.read()
    clone = tmp_path / "clone"
    for path in ["ota_promoter.py", "tests/screenshot.py"]:
        with open(os.path.join(ROOT, path), "rb") as f:
            write(clone, path, f.read())
    result = subprocess.run([sys.executable, "tests/screenshot.py"], cwd=str(clone), capture_output=True,
                            text=True, timeout=TIMEOUT * 6)
    picture = clone / "tests" / "status-page.png"
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "%s: %d bytes\n" % (picture, picture.stat().st_size)
    head = picture.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") == 1180  # its width


@pytest.mark.slow
@needs_browser
def test_what_a_board_sends_is_shown_as_text_never_run(server, browser):
    evil = "<img src=x onerror=alert(1)>"
    rolled = "rolled back from 1a2b3c4 to 5d6e7f8: ValueError: <i onmouseover=alert(5)>x</i>"  # its boot guard's report
    board_request(server, "/files/version", evil, '<img src=y onerror="window.__xss=2">', {"X-OTA-Rolled-Back": rolled})
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
    conn.request("POST", "/console", body=b"<script>window.__xss=3</script>\n<b onmouseover=alert(4)>bold</b>\n",
                 headers={"X-OTA-Device": evil})
    assert conn.getresponse().status == 204
    conn.close()
    browser.get(server.url + "/")
    shown = until(lambda: card(browser, evil), "the board with the odd id")
    assert shown["id"] == evil
    assert shown["facts"]["version"] == '<img src=y onerror="window.__xss=2">'
    assert shown["console"] == "<script>window.__xss=3</script>\n<b onmouseover=alert(4)>bold</b>"
    assert shown["facts"]["boot guard"] == rolled
    assert browser.execute_script(
        "return [window.__xss, document.querySelectorAll('img, b, i, main script').length]") == [None, 0]
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text


@pytest.mark.slow
@needs_browser
def test_the_page_says_when_the_server_is_gone_and_recovers(tree, serve, browser):
    server = serve(ota_promoter.Promoter(str(tree), interval=3600))
    port = server.server_address[1]
    board_request(server, "/files/version", "b1", "none")
    browser.get(server.url + "/")
    until(lambda: card(browser, "b1"), "the board")

    def banner():
        return browser.execute_script(
            "const g = document.getElementById('gone'); return g.className === 'on' && g.textContent")

    assert banner() is False
    server.close()
    assert until(banner, "the gone message").startswith("The server is gone: no answer since ")
    again = ota_promoter.Promoter(str(tree), interval=3600).serve("127.0.0.1", port).start()
    try:
        board_request(again, "/files/version", "b2", "none")
        until(lambda: card(browser, "b2"), "the page to come back with the new server's board")
        assert banner() is False
    finally:
        again.close()


@pytest.mark.slow
@needs_browser
def test_the_page_says_how_far_the_start_is_then_shows_the_first_version(tree, browser):
    published = ota_promoter.Published(gated=True)
    server = ota_promoter.PromoterServer(("127.0.0.1", 0), published, ota_promoter.Boards()).start()
    try:
        browser.get(server.url + "/")

        def shown():
            return browser.execute_script("return document.getElementById('version-body').textContent")

        until(lambda: shown() == "Starting: reading the folder. Boards are told to retry.", shown)
        published.progress = "checked 2 of 5 .py files with mpy-cross"
        until(lambda: shown() == "Starting: checked 2 of 5 .py files with mpy-cross. Boards are told to retry.",
              shown)  # within a second: the page asks again each second while the server starts
        write(tree, "main.py", "print(1)\n")
        promoter = ota_promoter.Promoter(str(tree), interval=3600, published=published)
        published.ungate()
        assert until(lambda: shown_version(browser), shown) == promoter.version
        assert shown().endswith("as found when the server started")
    finally:
        server.close()
        published.close()


@pytest.mark.slow
@needs_browser
def test_in_a_browser_the_token_in_the_url_becomes_a_cookie(tree, serve, browser):
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token="s3cret")
    board_request(server, "/files/version", "b1", "none", {"Authorization": "Bearer s3cret"})
    browser.get(server.url + "/")
    assert "This server needs its token" in browser.find_element("tag name", "h1").text
    browser.get(server.url + "/?token=s3cret")
    assert browser.current_url == server.url + "/"  # the token left the address bar
    until(lambda: card(browser, "b1"), "the board, with the cookie")
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: no script reads it


def heading(driver):
    return driver.find_element("tag name", "h1").text


def session_history(driver):
    """The tab's session history, from the current entry back to the first, each
    reached with the back button."""
    urls = [driver.current_url]
    for _ in range(driver.execute_script("return history.length") - 1):
        driver.back()
        urls.append(driver.current_url)
    return urls


def history_urls(profile):
    """The urls table of Chromium's History database in profile, once it has quit."""
    db = sqlite3.connect("file:%s?mode=ro" % os.path.join(profile, "Default", "History"), uri=True)
    try:
        return [row[0] for row in db.execute("SELECT url FROM urls ORDER BY id")]
    finally:
        db.close()


def files_holding(folder, text):
    """The files under folder whose bytes hold text (in UTF-8 or UTF-16), relative, sorted."""
    needles = [text.encode("utf-8"), text.encode("utf-16-le")]
    found = []
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue  # a socket or a lock
            if any(needle in data for needle in needles):
                found.append(os.path.relpath(path, folder).replace(os.sep, "/"))
    return sorted(found)


@pytest.fixture
def referers(monkeypatch):
    """{route: the Referer headers it came with} of the requests the servers get
    (None for a request without one)."""
    seen = {}
    dispatch = ota_promoter.Handler._dispatch

    def recording(handler):
        route = handler.path.split("?")[0] + ("?token=" if "?token=" in handler.path else "")
        seen.setdefault(route, set()).add(handler.headers.get("Referer"))
        return dispatch(handler)

    monkeypatch.setattr(ota_promoter.Handler, "_dispatch", recording)
    return seen


@pytest.fixture
def other_site():
    """Another site, http://localhost:<port>/ (the servers are on 127.0.0.1): one
    page with one link, <a id="login">, to other_site.link. The page is not to be
    stored (no-store): the browser's cache would hold the link, and the token in it."""
    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = ('<!doctype html><title>the wiki</title><a id="login" href="%s">the bench</a>'
                    % html.escape(site.link)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with another_site(Page) as site:
        site.link = "/"
        yield site


def click_the_link(browser, other_site, link):
    """Open the other site's page, and click its link to link; returns once the
    link's page has loaded."""
    other_site.link = link
    browser.get(other_site.url)
    browser.find_element("id", "login").click()
    until(lambda: browser.current_url != other_site.url and
          browser.execute_script("return document.readyState") == "complete", "the link's page")


@pytest.mark.slow
@needs_browser
def test_a_login_link_on_another_site_opens_the_page(tree, serve, browser, other_site, referers):
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token=TOKEN)
    board_request(server, "/files/version", "b1", "none", {"Authorization": "Bearer " + TOKEN})
    first = browser.current_url
    click_the_link(browser, other_site, server.url + "/?token=" + TOKEN)
    assert heading(browser) == "OTA Promoter"  # not "This server needs its token"
    until(lambda: card(browser, "b1"), "the board, with the cookie")
    assert browser.current_url == server.url + "/"
    assert session_history(browser) == [server.url + "/", other_site.url, first]
    # The other site's origin with the link, never the token; none after the 303.
    assert referers == {"/files/version": {None}, "/?token=": {other_site.url}, "/": {None}, "/boards": {None}}


@pytest.mark.slow
@needs_browser
def test_chromium_keeps_a_login_links_address_in_its_history_database(tree, tmp_path, serve, browser, other_site,
                                                                       referers):
    """What no page can change: Chromium stores the address of every page it
    opens, a redirect's included. The tab's address and back list, and every
    Referer, are free of the token."""
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token=TOKEN)
    board_request(server, "/files/version", "b1", "none", {"Authorization": "Bearer " + TOKEN})
    first = browser.current_url
    click_the_link(browser, other_site, server.url + "/?token=" + TOKEN)
    until(lambda: card(browser, "b1"), "the board, with the cookie")
    assert browser.current_url == server.url + "/"
    assert session_history(browser) == [server.url + "/", other_site.url, first]
    assert referers == {"/files/version": {None}, "/?token=": {other_site.url}, "/": {None}, "/boards": {None}}
    browser.quit()
    profile = str(tmp_path / "chromium")
    assert [url for url in history_urls(profile) if TOKEN in url] == [server.url + "/?token=" + TOKEN]
    # Also, depending on when Chromium writes them: the tabs to restore, the most
    # visited sites and the usage metrics it keeps per address.
    kept = [path.split("_1")[0].replace("-journal", "") for path in files_holding(profile, TOKEN)]
    assert kept[0] == "Default/History" and set(kept) <= {
        "Default/History", "Default/Sessions/Session", "Default/Sessions/Tabs", "Default/Top Sites",
        "segmentation_platform/ukm_db"}, kept


@pytest.mark.slow
@needs_browser
def test_a_token_typed_into_the_refusal_page_reaches_nothing_the_browser_keeps(tree, tmp_path, serve, browser,
                                                                               referers):
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token=TOKEN)
    board_request(server, "/files/version", "b1", "none", {"Authorization": "Bearer " + TOKEN})
    first = browser.current_url
    browser.get(server.url + "/")
    assert heading(browser) == "This server needs its token"
    browser.find_element("name", "token").send_keys(TOKEN)
    browser.find_element("css selector", "form button").click()
    until(lambda: card(browser, "b1"), "the board, with the cookie")
    assert browser.current_url == server.url + "/"
    assert session_history(browser) == [server.url + "/", server.url + "/", first]
    browser.quit()
    profile = str(tmp_path / "chromium")
    assert server.url + "/" in history_urls(profile)
    assert files_holding(profile, TOKEN) == []  # not a file of the browser's holds the token
    assert referers == {"/files/version": {None}, "/": {None}, "/boards": {None}}


@pytest.mark.slow
@needs_browser
def test_a_wrong_token_in_a_link_or_the_form_says_so(tree, serve, browser):
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token=TOKEN)

    def wrong():
        return browser.execute_script("const e = document.getElementById('wrong'); return e && e.textContent")

    browser.get(server.url + "/")
    assert wrong() == ""
    browser.find_element("name", "token").send_keys("guess")
    browser.find_element("css selector", "form button").click()
    until(lambda: wrong() == "That is not the server's token.", "the server to say so")
    browser.get(server.url + "/?token=guess")
    assert wrong() == "That is not the server's token."


@pytest.mark.slow
@needs_browser
def test_logging_into_a_second_server_keeps_the_first_logged_in(tree, serve, browser):
    first = serve(ota_promoter.Promoter(str(tree), interval=3600), token="first-token")
    second = serve(ota_promoter.Promoter(str(tree), interval=3600), token="second-token")
    board_request(first, "/files/version", "b1", "none", {"Authorization": "Bearer first-token"})
    board_request(second, "/files/version", "b2", "none", {"Authorization": "Bearer second-token"})
    browser.get(first.url + "/?token=first-token")
    until(lambda: card(browser, "b1"), "the first server's board")
    browser.get(second.url + "/?token=second-token")
    until(lambda: card(browser, "b2"), "the second server's board")
    for server, board in [(first, "b1"), (second, "b2")]:
        browser.get(server.url + "/")
        assert heading(browser) == "OTA Promoter"
        until(lambda: card(browser, board), "the board, with its server's cookie")


@pytest.mark.slow
@needs_browser
def test_page_latency_from_publish_to_the_dom(tree, serve, browser, capsys):
    """Not a timed assertion: prints how long the page takes to show a save."""
    write(tree, "main.py", "n = 0\n")
    promoter = ota_promoter.Promoter(str(tree))
    server = serve(promoter)
    browser.get(server.url + "/")
    until(lambda: shown_version(browser) == promoter.version, "the first version")
    from_publish, from_save = [], []
    for n in range(1, 8):
        old = promoter.version
        saved = time.time()
        write(tree, "main.py", "n = %d\n" % n)
        version = until(lambda: promoter.version != old and promoter.current, "the save to be published")
        until(lambda: shown_version(browser) == version.id, "the page to show it")
        shown = browser.execute_script("return window.__shown[arguments[0]]", version.id) / 1000
        from_publish.append(shown - version.published)
        from_save.append(shown - saved)
        time.sleep(0.3)
    with capsys.disabled():
        print("\npage latency over %d saves: publish to DOM median %.1f ms, worst %.1f ms; "
              "save to DOM median %.0f ms, worst %.0f ms" % (
                  len(from_publish), statistics.median(from_publish) * 1000, max(from_publish) * 1000,
                  statistics.median(from_save) * 1000, max(from_save) * 1000))
    assert all(t > 0 for t in from_publish)


# -- Typing into a board's REPL (issue 20) ---------------------------------------------------


def repl_line(driver, device):
    """{disabled, placeholder, value} of the board's input line on the page, or None."""
    return driver.execute_script("""
        const c = [...document.querySelectorAll('.board')].find(c => c.dataset.device === arguments[0]);
        const line = c && c.querySelector('.repl input');
        return line && {disabled: line.disabled, placeholder: line.placeholder, value: line.value,
                        note: c.querySelector('.repl .note').textContent};""", device)


def repl_element(driver, device, what):
    [found] = [c for c in driver.find_elements("css selector", ".board") if c.get_attribute("data-device") == device]
    return found.find_element("css selector", ".repl " + what)


@pytest.mark.slow
@needs_browser
def test_the_pages_input_line_types_into_the_boards_long_poll(server, browser):
    from selenium.webdriver.common.keys import Keys
    from test_repl_server import DEVICE, answer, held, long_poll

    post_console(server, DEVICE, "none", b"MicroPython v1.23.0\r\n>>> ")
    browser.get(server.url + "/")
    until(lambda: (card(browser, DEVICE) or {}).get("console") == "MicroPython v1.23.0\n>>> ", "the prompt")
    assert repl_line(browser, DEVICE)["disabled"] is True
    assert repl_line(browser, DEVICE)["placeholder"] == "Not listening (no ota.live())"

    sock = long_poll(server, wait=30)
    until(lambda: not repl_line(browser, DEVICE)["disabled"], "the input line to open")
    line = repl_element(browser, DEVICE, "input")
    line.send_keys("1+1" + Keys.ENTER)
    assert answer(sock)[2] == b'{"in": "1+1\\r"}'
    assert repl_line(browser, DEVICE)["value"] == ""

    for press, sent in [(lambda: repl_element(browser, DEVICE, "button[title^=interrupt]").click(), b"\\u0003"),
                        (lambda: line.send_keys(Keys.CONTROL, "d"), b"\\u0004"),
                        (lambda: line.send_keys(Keys.CONTROL, "c"), b"\\u0003")]:
        sock = long_poll(server, wait=30)
        held(server)
        press()
        assert answer(sock)[2] == b'{"in": "%s"}' % sent
    assert repl_line(browser, DEVICE)["note"] == ""


@pytest.fixture
def cross_site():
    """Another site, http://localhost:<port>/ (the server is on 127.0.0.1), whose
    page holds a form that posts to cross_site.target, and may run scripts."""
    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = ('<!doctype html><title>a forum</title><form id="form" method="post" action="%s" '
                    'enctype="text/plain"><input name="import machine;machine.reset()#" value="">'
                    '<button id="go">go</button></form>' % html.escape(site.target)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with another_site(Page) as site:
        site.target = "/"
        yield site


@pytest.mark.slow
@needs_browser
def test_a_form_or_a_script_on_another_site_cannot_type_into_a_board(server, browser, cross_site):
    """Without --token, where no secret protects the input: the browser is on this
    machine, as the server wants, but the request comes from another site."""
    from test_repl_server import DEVICE, known, queued

    known(server)
    target = server.url + "/boards/%s/input" % DEVICE
    cross_site.target = target
    browser.get(cross_site.url)
    # A script: with X-OTA-Input, its fetch needs a preflight the server never grants;
    # without it (no-cors drops the header), the post is refused.
    fetched = browser.execute_async_script("""
        const done = arguments[arguments.length - 1], target = arguments[0], results = [];
        fetch(target, {method: 'POST', headers: {'X-OTA-Input': '1'}, body: '1', credentials: 'include'})
          .then(r => 'answered ' + r.status, e => 'failed')
          .then(cors => fetch(target, {method: 'POST', mode: 'no-cors', headers: {'X-OTA-Input': '1'},
                                       body: '2', credentials: 'include'})
                        .then(r => [cors, r.type], e => [cors, 'failed']))
          .then(done);""", target)
    assert fetched == ["failed", "opaque"]
    browser.find_element("id", "go").click()
    until(lambda: browser.current_url == target and "error" in browser.find_element("tag name", "body").text,
          "the form's answer")
    assert json.loads(browser.find_element("tag name", "body").text) == {
        "error": "input is taken from this server's own page only, not from %r" % cross_site.url.rstrip("/")}
    assert queued(server) == (0, 0)


@pytest.mark.slow
@needs_browser
def test_a_page_opened_from_another_machine_says_it_cannot_type(tree, browser):
    """Without --token the server takes input from its own machine only: a page
    opened at its LAN address (as from another machine) disables every input line."""
    from test_repl_server import DEVICE, held, lan_address, long_poll

    if lan_address() is None:
        pytest.skip("this machine has no LAN address to open the page at")
    server = ota_promoter.Promoter(str(tree), interval=3600).serve(lan_address(), 0).start()
    try:
        sock = long_poll(server, wait=30, host=lan_address())
        held(server)
        browser.get(server.url + "/")
        until(lambda: repl_line(browser, DEVICE), "the board's input line")
        assert repl_line(browser, DEVICE)["disabled"] is True
        assert repl_line(browser, DEVICE)["placeholder"] == "Only the server's machine types"
        sock.close()
    finally:
        server.close()


@pytest.mark.slow
@needs_browser
def test_the_pages_repl_with_a_board_in_live_mode(tree, serve, browser, tmp_path):
    """The simulated board (tests/live_board.py, CPython) in live mode: 1+1 typed on
    its card shows 2 in its console box; Ctrl-C stops a looping main.py."""
    from selenium.webdriver.common.keys import Keys
    from test_live import BOOT, Board, save

    promoter = ota_promoter.Promoter(str(tree), interval=0.05)
    server = serve(promoter)
    promoter.url = server.url
    save(tree, promoter, "boot.py", BOOT)
    save(tree, promoter, "main.py", "print('ready')\n")
    board = Board([sys.executable, "-u"], os.path.join(ROOT, "micropython"), str(tmp_path / "device"), promoter.url)
    try:
        board.expect("^@boot 2 hard")  # the first update resets the board
        board.expect("^ready$")
        [device] = [b["device"] for b in server.boards.snapshot()]
        browser.get(promoter.url + "/")
        until(lambda: (repl_line(browser, device) or {"disabled": True})["disabled"] is False,
              "the board's input line to open")
        until(lambda: card(browser, device)["console"].endswith(">>> "), "the prompt")
        repl_element(browser, device, "input").send_keys("1+1" + Keys.ENTER)
        until(lambda: card(browser, device)["console"].endswith(">>> 1+1\n2\n>>> "), lambda: card(browser, device))

        save(tree, promoter, "main.py", "import time\nprint('looping')\nwhile True:\n    time.sleep(0.05)\n")
        board.expect("^looping$")
        until(lambda: card(browser, device)["console"].endswith("looping"), lambda: card(browser, device))
        repl_element(browser, device, "button[title^=interrupt]").click()
        board.expect(r"^Traceback \(most recent call last\):$")
        board.expect("^KeyboardInterrupt$")
        # The box shows its end, and the prompt (the simulated board's frames, CPython's,
        # are more than live mode's buffer holds: the first of them may be dropped).
        until(lambda: re.search(r"\nlooping\n(.*\n)*KeyboardInterrupt\n(.*\n)*>>> $", card(browser, device)["console"]),
              lambda: card(browser, device))
    finally:
        board.stop()
