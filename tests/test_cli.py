"""The command line, run as a user runs it: python3 ota_promoter.py DIR ..."""

import errno
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import ota_promoter
from conftest import ROOT, TIMEOUT, request, write

SCRIPT = os.path.join(ROOT, "ota_promoter.py")
URL = re.compile(r"  (http://[0-9.]+:\d+)$")


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, SCRIPT] + list(args), capture_output=True, text=True, timeout=TIMEOUT,
        env=dict(os.environ, **(env or {})),
    )


def assert_user_error(result, message):
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "ota_promoter.py: error: %s\n" % message


class Running:
    """ota_promoter.py started in the background, its log read by a thread."""

    def __init__(self, *args, env=None):
        # Windows delivers Ctrl-Break to a child only in a process group of its own.
        self.process = subprocess.Popen(
            [sys.executable, SCRIPT] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=dict(os.environ, **(env or {})),
            creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0),
        )
        self.log = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self.log.put(line.rstrip("\n")[9:])  # without the HH:MM:SS stamp
        self.log.put(None)

    def banner(self):
        """The log lines up to the device hint, and the URLs among them."""
        lines = []
        while not lines or "on the board:" not in lines[-1]:
            lines.append(self.log.get(timeout=TIMEOUT))
        return lines, [m.group(1) for m in map(URL.match, lines) if m]

    def stop(self, sig=signal.SIGINT):
        """Send sig; returns the exit status and the log lines not read yet."""
        if os.name == "nt" and sig == signal.SIGINT:
            sig = signal.CTRL_BREAK_EVENT  # what Windows can send: the server takes it as Ctrl-C
        self.process.send_signal(sig)
        try:
            self.process.wait(TIMEOUT)
        finally:
            self.process.kill()
        rest = []
        for line in iter(lambda: self.log.get(timeout=TIMEOUT), None):
            rest.append(line)
        self.process.stdout.close()
        return self.process.returncode, rest


@pytest.fixture
def running():
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


def test_missing_folder(tmp_path):
    assert_user_error(run(str(tmp_path / "app")), "folder %r does not exist" % str(tmp_path / "app"))


def test_file_instead_of_folder(tmp_path):
    f = write(tmp_path, "main.py", "x")
    assert_user_error(run(f), "%r is a file, not a folder: give the folder to promote" % f)


def test_port_in_use(tree):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run(str(tree), "--host", "127.0.0.1", "--port", str(port))
    assert_user_error(
        result, "port %d is already in use on 127.0.0.1: stop the other server or pick another --port" % port
    )


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "argument --port: invalid port value: '70000'"),
    (["--port", "x"], "argument --port: invalid port value: 'x'"),
    (["--interval", "0"], "argument --interval: invalid positive number value: '0'"),
    (["--interval", "-1"], "argument --interval: invalid positive number value: '-1'"),
    (["--idle-timeout", "nan"], "argument --idle-timeout: invalid positive number value: 'nan'"),
    # Past this, timers overflow later, while serving.
    (["--idle-timeout", "9.3e9"], "argument --idle-timeout: '9.3e9' is too long: at most 86400 seconds"),
    (["--interval", "1e10"], "argument --interval: '1e10' is too long: at most 86400 seconds"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["-q", "-v"], "argument -v/--verbose: not allowed with argument -q/--quiet"),
    (["a", "b"], "unrecognized arguments: b"),
])
def test_bad_options(tree, args, message):
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr == "ota_promoter.py: error: %s (see --help)\n" % message


def test_empty_token(tree):
    assert_user_error(run(str(tree), "--token", ""), "the token is empty (see --help)")


@pytest.mark.parametrize("args, env", [(["--token", "sécret"], None), ([], {"OTA_TOKEN": "tok\x1b"})])
def test_a_token_no_client_could_send_is_refused(tree, args, env):
    assert_user_error(run(str(tree), *args, env=env), "the token must be printable ASCII characters (see --help)")


@pytest.mark.skipif(os.name == "nt", reason="Windows words its socket errors its own way")
def test_address_not_on_this_machine(tree):
    result = run(str(tree), "--host", "192.0.2.1", "--port", "0")  # TEST-NET-1: binding fails locally
    assert_user_error(result, "cannot listen on 192.0.2.1 port 0: %s" % os.strerror(errno.EADDRNOTAVAIL))


def test_help_and_version():
    assert run("--version").stdout == "ota_promoter.py %s\n" % ota_promoter.__version__
    result = run("--help")
    assert result.returncode == 0
    assert "--ignore GLOB" in result.stdout and "--token TOKEN" in result.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_banner_serves_and_ctrl_c_exits_0(tree, running):
    write(tree, "README.txt", "hello\n")
    write(tree, "lib/x.py", "x")
    app = running(str(tree), "--host", "127.0.0.1", "--port", "0")
    lines, [url] = app.banner()
    assert lines == [
        "ota-promoter %s: serving %s, 2 files, version %s"
        % (ota_promoter.__version__, tree, ota_promoter.Promoter(str(tree)).version[:7]),
        "  " + url,
        ".py files are published once they compile with %s" % ota_promoter.SourceCheck.find().name,
        'on the board: import ota; ota.update("%s")' % url,
    ]
    assert request(url, "/files/version").status == 200
    assert app.stop(signal.SIGINT) == (0, ["stopped"])


@pytest.mark.skipif(os.name == "nt", reason="Windows ends a process on SIGTERM without telling it")
def test_sigterm_exits_0(tree, running):
    app = running(str(tree), "--host", "127.0.0.1", "--port", "0")
    app.banner()
    assert app.stop(signal.SIGTERM) == (0, ["stopped"])


def test_quiet_shows_only_warnings(tree, running):
    port = free_port()
    app = running(str(tree), "--host", "127.0.0.1", "--port", str(port), "-q")
    url = "http://127.0.0.1:%d" % port
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            assert request(url, "/files/version").status == 200
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert app.stop() == (0, [])


def test_lan_binding_lists_board_urls_and_warns_without_token(tree, running):
    app = running(str(tree), "--host", "0.0.0.0", "--port", "0")
    lines, urls = app.banner()
    port = urls[0].rsplit(":", 1)[1]
    addresses = ota_promoter.lan_addresses() or ["127.0.0.1"]
    assert urls == ["http://%s:%s" % (a, port) for a in addresses]
    assert app.log.get(timeout=TIMEOUT) == (
        "warning: no --token: any device on this network can read the promoted files"
    )
    assert app.stop() == (0, ["stopped"])


def test_token_from_option_or_environment(tree, running):
    write(tree, "README.txt", "hello\n")
    for args, env in [(["--token", "abc"], None), ([], {"OTA_TOKEN": "abc"})]:
        app = running(str(tree), "--host", "0.0.0.0", "--port", "0", *args, env=env)
        lines, urls = app.banner()
        url = "http://127.0.0.1:" + urls[0].rsplit(":", 1)[1]
        assert request(url, "/files").status == 401
        assert request(url, "/files", headers={"Authorization": "Bearer abc"}).status == 200
        assert app.stop() == (0, ["stopped"])  # and no warning


def test_lan_addresses_are_ipv4_and_not_loopback():
    for address in ota_promoter.lan_addresses():
        assert socket.inet_ntoa(socket.inet_aton(address)) == address
        assert not address.startswith("127.")


def test_server_and_client_need_nothing_newer_than_python_3_9():
    pytest.importorskip("vermin", reason="needs vermin: .venv/bin/pip install -r requirements-dev.txt")
    result = subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
         "-t=3.9-", "--no-tips", "--violations",
         SCRIPT, os.path.join(ROOT, "micropython", "ota.py")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
