"""The HTTP API against a real server on 127.0.0.1: every endpoint and header."""

import hashlib
import http.client
import logging
import os
import threading
import time

import pytest

import ota_promoter
from ota_promoter import Promoter
from helpers import TIMEOUT, checksum, entered, raw_request, request, settle, slow_except, until, write

README_CHECKSUM = "b5463907b61ada69504740be605374912c85d866"
README_VERSION = "1955d4c78d0dc6f6a4b7c1cde37c0e16a85b0a2f"
README_FILES = (
    b'{"files":[{"path":"README.txt","checksum":"b5463907b61ada69504740be605374912c85d866"}],'
    b'"version":"1955d4c78d0dc6f6a4b7c1cde37c0e16a85b0a2f"}'
)


# -- /files/version and /files -----------------------------------------------------------


def test_version(server):
    r = request(server.url, "/files/version")
    assert r.status == 200
    assert r.body == b'{"version":"%s"}' % README_VERSION.encode()
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Content-Length"] == str(len(r.body))
    assert r.headers["ETag"] == '"%s"' % README_VERSION
    assert r.headers["Cache-Control"] == "no-cache"


def test_files(server):
    r = request(server.url, "/files")
    assert r.status == 200
    assert r.body == README_FILES
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["ETag"] == '"%s"' % README_VERSION


def test_files_trailing_slash_is_the_same_resource(server):
    assert request(server.url, "/files/").body == README_FILES


def test_files_of_an_empty_folder_is_an_empty_list(tree, serve):
    server = serve(Promoter(str(tree), interval=3600))
    version = hashlib.sha1(b"").hexdigest()
    assert request(server.url, "/files").json() == {"files": [], "version": version}


def test_files_as_text_lines_sorted_by_path(tree, serve):
    write(tree, "main.py", "m")
    write(tree, "lib/a b.py", "x")
    write(tree, "lib.py", "yy")
    p = Promoter(str(tree), interval=3600)
    server = serve(p)
    r = request(server.url, "/files?format=text")
    assert r.status == 200
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.headers["ETag"] == '"%s-text"' % p.version
    # Walk order puts lib/ before lib.py; the text form sorts plain strings.
    assert r.body.decode() == (
        "%s\n%s 2 lib.py\n%s 1 lib/a b.py\n%s 1 main.py\n"
        % (p.version, checksum("yy", "lib.py"), checksum("x", "lib/a b.py"), checksum("m", "main.py"))
    )


def test_unknown_format_is_400(server):
    r = request(server.url, "/files?format=xml")
    assert (r.status, r.json()) == (400, {"error": "unknown format 'xml': use json or text"})


def test_head_answers_the_headers_of_get(server):
    for path in ["/files/version", "/files", "/files/" + README_CHECKSUM]:
        get = request(server.url, path)
        head = request(server.url, path, method="HEAD")
        assert head.status == 200
        assert head.body == b""
        assert head.headers["Content-Length"] == str(len(get.body))
        assert head.headers["ETag"] == get.headers["ETag"]
        assert head.headers["Content-Type"] == get.headers["Content-Type"]


def test_conditional_requests_answer_304(server):
    etag = '"%s"' % README_VERSION
    for path in ["/files/version", "/files"]:
        r = request(server.url, path, headers={"If-None-Match": etag})
        assert (r.status, r.body, r.headers["ETag"]) == (304, b"", etag)
        r = request(server.url, path, headers={"If-None-Match": '"0000", W/%s' % etag})
        assert r.status == 304
        r = request(server.url, path, headers={"If-None-Match": '"other"'})
        assert r.status == 200
    r = request(server.url, "/files/" + README_CHECKSUM, headers={"If-None-Match": '"%s"' % README_CHECKSUM})
    assert (r.status, r.body) == (304, b"")


def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
    try:
        for _ in range(3):
            conn.request("GET", "/files/version")
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, b'{"version":"%s"}' % README_VERSION.encode())
    finally:
        conn.close()


# -- /files/<checksum> --------------------------------------------------------------------


def test_download_headers_and_body(server):
    r = request(server.url, "/files/" + README_CHECKSUM)
    assert r.status == 200
    assert r.body == b"hello\n"
    assert r.headers["Content-Disposition"] == "attachment; filename=README.txt"
    assert r.headers["Content-Length"] == "6"
    assert r.headers["X-Target-Path"] == "README.txt"
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.headers["ETag"] == '"%s"' % README_CHECKSUM
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"


def test_download_of_a_nested_binary_file(tree, serve):
    data = bytes(range(256)) * 10
    write(tree, "lib/font.bin", data)
    server = serve(Promoter(str(tree), interval=3600))
    r = request(server.url, "/files/" + checksum(data, "lib/font.bin").upper())
    assert r.status == 200
    assert r.body == data
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["X-Target-Path"] == "lib/font.bin"
    assert r.headers["Content-Disposition"] == "attachment; filename=font.bin"


def test_download_of_a_non_ascii_path_sends_utf8_headers(tree, serve):
    write(tree, "données/été v2.py", "x")
    server = serve(Promoter(str(tree), interval=3600))
    answer = raw_request(
        server.url,
        b"GET /files/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        % checksum("x", "données/été v2.py").encode(),
    )
    head = answer.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert "X-Target-Path: données/été v2.py".encode() in head
    assert 'Content-Disposition: attachment; filename="été v2.py"'.encode() in head


def test_malformed_checksum_is_400(server):
    for bad in ["abc", "g" * 40, README_CHECKSUM + "0", "%20" + README_CHECKSUM[1:]]:
        r = request(server.url, "/files/" + bad)
        assert r.status == 400
        assert r.json()["error"].startswith("malformed checksum ")
        assert r.json()["error"].endswith(": expected 40 hex digits")


def test_unknown_checksum_is_404(server):
    r = request(server.url, "/files/" + "0" * 40)
    assert r.status == 404
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {
        "error": "no file has checksum %s: it changed since your manifest, fetch /files again" % ("0" * 40)
    }


def test_unknown_endpoint_is_404(server):
    r = request(server.url, "/nope")
    assert (r.status, r.json()) == (
        404, {"error": "no such endpoint '/nope': try /files/version, /files, /files/<checksum>, "
                       "/boards, /boards/<id>/console, /boards/<id>/input or / (the status page)"}
    )


@pytest.mark.parametrize("method", slow_except(["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"], "BREW"))
def test_other_methods_are_405_with_allow(server, method):
    r = request(server.url, "/files", method=method)
    assert r.status == 405
    assert r.headers["Allow"] == "GET, HEAD"
    assert r.json() == {"error": "method %s is not allowed here: use GET or HEAD" % method}


# -- No request reaches a file outside the folder --------------------------------------


@pytest.fixture
def secrets_around(tree, tmp_path):
    """Files a request must never reach: outside the folder, and skipped inside it."""
    write(tmp_path, "secret.txt", "OUTSIDE-SECRET")
    write(tree, ".env", "ENV-SECRET")
    write(tree, ".git/config", "GIT-SECRET")
    return [b"OUTSIDE-SECRET", b"ENV-SECRET", b"GIT-SECRET"]


@pytest.mark.parametrize("target, status", slow_except([
    ("/files/../secret.txt", 400),
    ("/files/../../secret.txt", 400),
    ("/files/%2e%2e/secret.txt", 400),
    ("/files/%2e%2e%2fsecret.txt", 400),
    ("/files/..%2f..%2fsecret.txt", 400),
    ("/files/.env", 400),
    ("/files/.git/config", 400),
    ("/files/%00", 400),
    ("/files/" + README_CHECKSUM + "%00", 400),
    ("/../secret.txt", 404),
    ("/secret.txt", 404),
    ("/.env", 404),
    ("//etc/passwd", 404),
    ("/etc/passwd", 404),
    ("http://localhost/../secret.txt", 404),
    ("/files/version/../../secret.txt", 400),
], ("/files/%2e%2e%2fsecret.txt", 400), ("//etc/passwd", 404)))
def test_traversal_attempts_never_reach_a_file(server, secrets_around, target, status):
    answer = raw_request(server.url, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target.encode())
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert b'{"error":"' in answer
    for secret in secrets_around:
        assert secret not in answer


# -- Long-poll ---------------------------------------------------------------------------


def test_long_poll_wakes_on_a_new_version(tree, server):
    p = server.promoter
    result = {}

    def poll():
        result["response"] = request(server.url, "/files/version?wait=30&since=" + README_VERSION)

    waiter = threading.Thread(target=poll)
    waiter.start()
    deadline = time.monotonic() + TIMEOUT
    while not p.published.waiting and time.monotonic() < deadline:  # the request is waiting
        time.sleep(0.01)
    assert p.published.waiting
    write(tree, "main.py", "new")
    settle(p)
    waiter.join(TIMEOUT)
    r = result["response"]
    assert r.status == 200
    assert r.json() == {"version": p.version}
    assert p.version != README_VERSION


def test_long_poll_with_if_none_match(tree, server, monkeypatch):
    p = server.promoter
    write(tree, "main.py", "new")
    held = entered(monkeypatch, p.published, "wait_for_change")
    # Published once the request is held, not after a delay the request may arrive after.
    threading.Thread(target=lambda: held.wait(TIMEOUT) and settle(p), daemon=True).start()
    r = request(server.url, "/files/version?wait=30", headers={"If-None-Match": '"%s"' % README_VERSION})
    assert (r.status, r.json()) == (200, {"version": p.version})


def test_long_poll_times_out_with_304(server):
    start = time.monotonic()
    r = request(server.url, "/files/version?wait=0.3&since=" + README_VERSION)
    assert (r.status, r.body, r.headers["ETag"]) == (304, b"", '"%s"' % README_VERSION)
    assert time.monotonic() - start >= 0.3


def test_long_poll_for_an_old_version_answers_at_once(server):
    r = request(server.url, "/files/version?wait=30&since=" + "0" * 40, timeout=5)
    assert (r.status, r.json()) == (200, {"version": README_VERSION})


def test_long_poll_is_capped(server, monkeypatch):
    monkeypatch.setattr(server, "MAX_WAIT", 0.2)
    r = request(server.url, "/files/version?wait=3600&since=" + README_VERSION, timeout=5)
    assert r.status == 304


@pytest.mark.parametrize("wait", slow_except(["abc", "-1", "nan", "inf", ""], "nan"))
def test_bad_wait_is_400(server, wait):
    r = request(server.url, "/files/version?wait=%s&since=x" % wait)
    assert (r.status, r.json()) == (400, {"error": "wait must be a number of seconds, not %r" % wait})


def test_closing_the_server_releases_long_polls(tree, serve):
    write(tree, "a.py", "a")
    p = Promoter(str(tree), interval=3600)
    server = serve(p)
    result = {}
    waiter = threading.Thread(
        target=lambda: result.update(r=request(server.url, "/files/version?wait=60&since=" + p.version))
    )
    waiter.start()
    until(lambda: p.published.waiting, "the long-poll held by the server")
    server.close()
    waiter.join(TIMEOUT)
    assert not waiter.is_alive()
    assert result["r"].status == 304


# -- Integrity while a file changes ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("store_limit", [ota_promoter.ContentStore.limit, 0])
def test_downloads_always_match_their_checksum_while_a_file_changes(tree, serve, store_limit):
    full = write(tree, "main.py", b"0" * 5000)
    p = Promoter(str(tree), interval=0.01, store_limit=store_limit)
    server = serve(p)
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            with open(full, "wb") as f:  # in place: readers may see a torn file
                f.write(b"%d" % n * 2500)
            stop.wait(0.03 * (n % 3))  # bursts and pauses, so that some versions settle

    t = threading.Thread(target=writer)
    t.start()
    served = refused = 0
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            for f in request(server.url, "/files").json()["files"]:
                r = request(server.url, "/files/" + f["checksum"])
                if r.status == 200:
                    assert checksum(r.body, f["path"]) == f["checksum"]
                    served += 1
                else:
                    assert r.status == 404
                    assert "changed since your manifest" in r.json()["error"]
                    refused += 1
    finally:
        stop.set()
        t.join(TIMEOUT)
    assert served > 0


def test_previous_version_is_downloadable_after_a_save(tree, server):
    write(tree, "main.py", "one")
    settle(server.promoter)
    manifest = request(server.url, "/files").json()
    write(tree, "main.py", "two")
    settle(server.promoter)
    old = [f for f in manifest["files"] if f["path"] == "main.py"][0]
    r = request(server.url, "/files/" + old["checksum"])
    assert (r.status, r.body) == (200, b"one")


def test_the_manifest_of_the_published_version_and_of_the_one_before_by_version(tree, server):
    versions = [server.promoter.version]
    for data in ("one", "two"):
        write(tree, "main.py", data)
        settle(server.promoter)
        versions.append(server.promoter.version)
    text = request(server.url, "/files?format=text").body
    r = request(server.url, "/files/" + versions[2].upper())
    assert (r.status, r.body) == (200, text)
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.headers["ETag"] == '"%s-text"' % versions[2]  # the same bytes as ?format=text
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"  # never other bytes
    assert "X-Target-Path" not in r.headers
    head = request(server.url, "/files/" + versions[2], method="HEAD")
    assert (head.status, head.body, head.headers["Content-Length"]) == (200, b"", str(len(text)))
    r = request(server.url, "/files/" + versions[2], headers={"If-None-Match": '"%s-text"' % versions[2]})
    assert (r.status, r.body, r.headers["ETag"]) == (304, b"", '"%s-text"' % versions[2])
    r = request(server.url, "/files/" + versions[1])
    assert (r.status, r.body) == (200, (
        "%s\n%s 6 README.txt\n%s 3 main.py\n" % (versions[1], README_CHECKSUM, checksum("one", "main.py"))).encode())
    assert request(server.url, "/files/" + versions[0]).status == 404  # kept no longer


# -- Token -----------------------------------------------------------------------------


@pytest.fixture
def guarded(tree, serve):
    write(tree, "README.txt", "hello\n")
    return serve(Promoter(str(tree), interval=3600), token="s3cret")


@pytest.mark.parametrize("path", slow_except(["/files/version", "/files", "/files/" + README_CHECKSUM,
                                              "/files/version?wait=5&since=" + README_VERSION, "/nope"],
                                             "/nope"))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_token_is_required_everywhere(guarded, path, method):
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                    {"Authorization": "Bearer s3cret2"}]:
        r = request(guarded.url, path, method=method, headers=headers)
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="ota-promoter"'
        if method == "GET":
            assert r.json() == {"error": "missing or wrong token: send 'Authorization: Bearer <token>'"}


def test_right_token_is_served(guarded):
    r = request(guarded.url, "/files", headers={"Authorization": "Bearer s3cret"})
    assert (r.status, r.body) == (200, README_FILES)


def test_without_token_no_authorization_is_needed(server):
    assert request(server.url, "/files").status == 200


# -- Failures inside the server ---------------------------------------------------------


def test_unexpected_error_is_500_logged_once_and_the_server_goes_on(server, monkeypatch, caplog):
    def broken(checksum):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(server.published, "blob", broken)
    with caplog.at_level(logging.ERROR, "ota_promoter"):
        r = request(server.url, "/files/" + README_CHECKSUM)
    assert (r.status, r.json()) == (500, {"error": "internal error: see the server's log"})
    assert len(caplog.records) == 1
    assert "disk on fire" in caplog.text and "Traceback" in caplog.text
    monkeypatch.undo()
    assert request(server.url, "/files/" + README_CHECKSUM).body == b"hello\n"


def test_download_is_logged_with_client_and_device(server, caplog):
    with caplog.at_level(logging.INFO, "ota_promoter"):
        request(server.url, "/files/" + README_CHECKSUM, headers={"X-OTA-Device": "a1b2c3"})
        request(server.url, "/files/version")
        request(server.url, "/files")
    assert [r.getMessage() for r in caplog.records] == ["127.0.0.1 [a1b2c3] got README.txt (6 B)"]


def test_watcher_thread_publishes_changes(tree, serve):
    write(tree, "main.py", "1")
    p = Promoter(str(tree), interval=0.02)
    server = serve(p)
    old = p.version
    write(tree, "main.py", "2")
    r = request(server.url, "/files/version?wait=%d&since=%s" % (TIMEOUT, old))
    assert r.json() == {"version": p.version}
    assert p.manifest() == [{"path": "main.py", "checksum": checksum("2", "main.py")}]
    assert os.path.exists(str(tree))


def test_close_stops_serve_forever_run_in_the_callers_thread(tree):
    # The README: serve() returns a server to start() or serve_forever(), and close().
    write(tree, "README.txt", "hello\n")
    server = Promoter(str(tree), interval=3600).serve("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    assert request(server.url, "/files/version").status == 200
    server.close()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
