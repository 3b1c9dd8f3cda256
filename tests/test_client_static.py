"""The device client against a static export: a real nginx, over HTTP and HTTPS,
and python3 -m http.server. The client runs under CPython, and under $MICROPYTHON
when it is set."""

import os
import ssl

import pytest

import ota
from helpers import exported, files, request, until, write
from proxy import FaultProxy, is_download


def app_files(tree):
    return {path: data for path, data in files(tree).items() if not path.startswith(".")}


@pytest.fixture
def app(tree):
    write(tree, "main.py", "import lib.x\nprint('v1')\n")
    write(tree, "lib/x.py", "X = 1\n")
    write(tree, "data/font.bin", bytes(range(256)) * 4)
    return tree


@pytest.fixture
def site(tmp_path):
    return tmp_path / "site"


def der(certificate):
    """The certificate as the client takes it: DER bytes, which every MicroPython parses."""
    with open(certificate[0]) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def test_first_install_then_an_update_from_nginx(app, site, nginx, board):
    exported(app, site)
    host = nginx(site)
    assert board.update(host.url) is True
    assert files(board.root, own=False) == app_files(app)
    write(app, "main.py", "print('v2')\n")
    os.remove(os.path.join(str(app), "lib/x.py"))
    promoter, _ = exported(app, site)
    assert board.update(host.url) is True
    assert files(board.root, own=False) == app_files(app)
    assert files(board.root)[".ota"].decode().splitlines()[0] == promoter.version
    assert board.update(host.url) is False  # up to date: one request, nothing written


@pytest.mark.slow
def test_a_board_mid_update_finishes_the_version_it_started_while_the_next_export_lands(app, site, nginx, device):
    exported(app, site)
    host = nginx(site)
    device.update(host.url)
    write(app, "main.py", "print('v2')\n")
    write(app, "lib/y.py", "Y = 2\n")
    v2 = app_files(app)
    promoter2, _ = exported(app, site)
    proxy = FaultProxy(host.url)
    landed = []

    def export_a_third_version(path, response):
        if is_download(path, response) and not landed:  # the first download
            write(app, "main.py", "print('v3')\n")
            landed.append(exported(app, site)[0].version)
        return response

    proxy.fault = export_a_third_version
    try:
        assert device.update(proxy.url) is True
    finally:
        proxy.close()
    assert landed and landed[0] != promoter2.version
    assert files(device.root, own=False) == v2  # the version it started, whole
    assert files(device.root)[".ota"].decode().splitlines()[0] == promoter2.version
    assert device.update(host.url) is True  # and the next check takes the third
    assert files(device.root, own=False)["main.py"] == b"print('v3')\n"


def test_https_with_the_servers_certificate(app, site, nginx, certificate, board):
    exported(app, site)
    host = nginx(site, certificate=certificate)
    board.heap = "128k"  # an ESP32's: MicroPython 1.20's TLS alone holds 39 KB
    assert board.update(host.url.replace("127.0.0.1", "localhost"), ca=der(certificate)) is True
    assert files(board.root, own=False) == app_files(app)


def test_https_refuses_a_server_it_cannot_verify(app, site, nginx, certificate, device, tmp_path):
    exported(app, site)
    host = nginx(site, certificate=certificate)
    with pytest.raises(ota.OTAError, match=r"^localhost:\d+: TLS failed: .*CERTIFICATE_VERIFY_FAILED"):
        device.update(host.url.replace("127.0.0.1", "localhost"))  # not one of the system's authorities
    assert files(device.root) == {}


def test_a_board_short_of_memory_for_tls_gets_a_clear_error(app, site, nginx, certificate, device, monkeypatch):
    exported(app, site)
    host = nginx(site, certificate=certificate)

    def no_memory(self, *args, **kwargs):
        raise MemoryError  # as MicroPython raises when the handshake cannot allocate

    monkeypatch.setattr(ssl.SSLContext, "wrap_socket", no_memory)
    with pytest.raises(ota.OTAError, match=r"^localhost:\d+: not enough memory for TLS on this board: use http://$"):
        device.update(host.url.replace("127.0.0.1", "localhost"), ca=der(certificate))
    assert files(device.root) == {}


def test_a_url_that_is_not_an_export_is_a_clear_error(app, site, nginx, device):
    exported(app, site)
    host = nginx(site)
    for folder in ("/nothing", "/files"):
        with pytest.raises(ota.OTAError, match=r"^127.0.0.1:\d+ has no %s/files/version: the url must name an "
                                               r"ota-promoter server or the folder of an export$" % folder):
            device.update(host.url + folder)
    assert files(device.root) == {}


def test_python_http_server_is_a_static_host_too(app, site, device, http_server):
    exported(app, site)
    assert device.update(http_server(site)) is True
    assert files(device.root, own=False) == app_files(app)


# A CDN's Content-Security-Policy line: 2 KB
CSP = "default-src 'self' " + " ".join("https://cdn%02d.example.com" % i for i in range(80))


def test_a_2_kb_header_line_from_nginx_does_not_break_updates(app, site, nginx, board):
    exported(app, site)
    host = nginx(site, headers=[("Content-Security-Policy", CSP)])
    for path in ("/files/version", "/files/manifest.txt"):
        assert request(host.url, path).headers["Content-Security-Policy"] == CSP  # nginx sends it
    assert len("Content-Security-Policy: %s\r\n" % CSP) > 2048
    assert board.update(host.url) is True
    assert files(board.root, own=False) == app_files(app)


@pytest.mark.slow
def test_live_mode_reads_the_version_through_a_2_kb_header_line_from_nginx(app, site, nginx, device):
    exported(app, site)
    host = nginx(site, headers=[("Content-Security-Policy", CSP)])
    device.update(host.url)
    write(app, "main.py", "print('v2')\n")
    exported(app, site)
    live = ota.live(host.url, root=str(device.root), console=False)
    live.prompt = True  # the app has ended: the REPL shows its prompt, the update runs there
    try:
        def restarting():
            live.tick()
            return live.checks is None  # installed, and the restart begun

        until(restarting, "live mode to see the new version")
    finally:
        live.stop()
    assert files(device.root, own=False) == app_files(app)
