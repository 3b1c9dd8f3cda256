"""The terminal's REPL: python3 ota_promoter.py repl|exec|run, as a user runs them,
against a real server and simulated boards in live mode (tests/live_board.py)."""

import os
import subprocess
import sys

import pytest

import ota_promoter
from helpers import ROOT, SCRIPT, TIMEOUT, Lines, free_port, request, slow_except, until, write

BOARD = os.path.join(ROOT, "tests", "live_board.py")
CLIENT = os.path.join(ROOT, "micropython")
# Each board's own boot.py, copied by cable: its id, then live mode. The promoted
# tree has no boot.py, so an update keeps it.
BOOT = """import machine
machine.unique_id = lambda: %r
import ota
ota.update(URL, root=ROOT)
ota.live(URL, root=ROOT)
"""
FIRST, SECOND = "aaaaaaaaaa01", "bbbbbbbbbb02"
# main.py: FIRST's app ends and it waits at its prompt; SECOND's loops.
APP = """import machine, time
n = 0
while machine.unique_id() == %r:
    n += 1
    print("tick", n)
    time.sleep(0.2)
print("app ready")
""" % bytes.fromhex(SECOND)


def command(*args, stdin=b"", env=None, timeout=TIMEOUT * 3):
    """ota_promoter.py with these arguments, stdin a pipe holding stdin; the result,
    its output as bytes."""
    return subprocess.run([sys.executable, SCRIPT] + list(args), input=stdin, capture_output=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def one_line(result, prog, message):
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode() == "ota_promoter.py %s: error: %s\n" % (prog, message)


# -- Mistakes, and a server that cannot be used ---------------------------------------


@pytest.fixture
def known(server):
    """The server knows two boards (they asked for the version), neither listening."""
    for device in ("a4cf12f3e9b1", "a4cf99000000"):
        request(server.url, "/files/version", headers={"X-OTA-Device": device})
    return server


def code(prog, folder):
    """What the command takes besides BOARD: nothing, CODE or FILE."""
    write(folder, "app.py", "print(1)\n")
    return {"repl": [], "exec": ["print(1)"], "run": [str(folder / "app.py")]}[prog]


@pytest.mark.parametrize("prog", slow_except(["repl", "exec", "run"], "exec"))
def test_an_unknown_board_is_one_line_naming_the_boards_known(known, prog, tmp_path):
    result = command(prog, "ffff", *code(prog, tmp_path), "--server", known.url, stdin=b"1+1\r")
    one_line(result, prog, "no board 'ffff': the server knows a4cf99000000 (127.0.0.1), a4cf12f3e9b1 (127.0.0.1)")


@pytest.mark.slow
def test_a_prefix_of_two_ids_names_both(known):
    one_line(command("exec", "a4cf", "print(1)", "--server", known.url), "exec",
             "'a4cf' names 2 boards, a4cf99000000 (127.0.0.1), a4cf12f3e9b1 (127.0.0.1): give more of the id")


@pytest.mark.slow
def test_an_address_of_two_boards_names_both(known):
    one_line(command("repl", "127.0.0.1", "--server", known.url), "repl",
             "'127.0.0.1' names 2 boards, a4cf99000000 (127.0.0.1), a4cf12f3e9b1 (127.0.0.1): give more of the id")


@pytest.mark.slow
def test_a_server_that_knows_no_board_says_so(server):
    one_line(command("exec", "a4cf", "print(1)", "--server", server.url), "exec",
             "no board 'a4cf': the server knows of none yet")


@pytest.mark.slow
def test_all_with_no_board_listening_names_those_known(known):
    one_line(command("exec", "all", "print(1)", "--server", known.url), "exec",
             "no board is listening: a4cf99000000 (127.0.0.1), a4cf12f3e9b1 (127.0.0.1) are not in live mode "
             "(ota.live())")


@pytest.mark.parametrize("prog", slow_except(["repl", "exec", "run"], "repl"))
def test_an_unreachable_server_is_one_line(prog, tmp_path):
    url = "http://127.0.0.1:%d" % free_port()
    result = command(prog, "a4cf", *code(prog, tmp_path), "--server", url)
    assert result.returncode == 2
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ota_promoter.py %s: error: cannot reach the server at %s: " % (prog, url))


@pytest.mark.slow
def test_a_url_that_is_no_url_is_one_line():
    one_line(command("exec", "a4cf", "print(1)", "--server", "ftp://example.com/"), "exec",
             "'ftp://example.com/' is not a server's URL: give one like http://127.0.0.1:9090")


@pytest.fixture
def guarded(tree, serve):
    """A server with a token, which knows one board."""
    server = serve(ota_promoter.Promoter(str(tree), interval=3600), token="s3cret")
    request(server.url, "/files/version", headers={"X-OTA-Device": "a4cf12f3e9b1",
                                                   "Authorization": "Bearer s3cret"})
    return server


def test_a_wrong_token_is_one_line(guarded):
    one_line(command("repl", "a4cf", "--server", guarded.url, "--token", "wrong"), "repl",
             "the server at %s refused the token: give the one it was started with" % guarded.url)


@pytest.mark.slow
def test_no_token_says_the_server_wants_one(guarded):
    one_line(command("exec", "a4cf", "1", "--server", guarded.url, env={"OTA_TOKEN": ""}), "exec",
             "the server at %s refused the token: give the one it was started with" % guarded.url)
    env = {k: v for k, v in os.environ.items() if k != "OTA_TOKEN"}
    result = subprocess.run([sys.executable, SCRIPT, "exec", "a4cf", "1", "--server", guarded.url],
                            capture_output=True, timeout=TIMEOUT, env=env)
    one_line(result, "exec", "the server at %s wants its token: give --token TOKEN, or set $OTA_TOKEN" % guarded.url)


@pytest.mark.slow
def test_run_of_a_missing_file_is_one_line(known, tmp_path):
    missing = str(tmp_path / "nope.py")
    one_line(command("run", "a4cf12", missing, "--server", known.url), "run",
             "cannot read %r: No such file or directory" % missing)


def test_each_command_has_its_help_and_the_server_help_names_them(capsys):
    with pytest.raises(SystemExit):
        ota_promoter.main(["--help"])
    assert "repl BOARD, exec BOARD|all CODE, run BOARD|all FILE" in " ".join(capsys.readouterr().out.split())
    for prog in ("repl", "exec", "run"):
        with pytest.raises(SystemExit) as exit:
            ota_promoter.main([prog, "--help"])
        assert exit.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: ota_promoter.py %s " % prog)
        assert ("stays stopped" in text) == (prog != "repl")


@pytest.mark.slow
def test_a_board_that_does_not_listen_is_named_and_exits_1(known):
    """Its input waits on the server, and the command on the board, within --timeout."""
    result = command("exec", "a4cf12", "print(1)", "--server", known.url, "--timeout", "0.5")
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == (
        "ota_promoter.py exec: [a4cf12f3e9b1] did not answer within 0.5 s: it is not listening (not in live mode?)\n")
    boards = {b["device"]: b for b in request(known.url, "/boards").json()["boards"]}
    assert boards["a4cf12f3e9b1"]["input"]["queued"] == 4  # Ctrl-C twice, Ctrl-A; Ctrl-B after


LAN = ota_promoter.lan_addresses()


@pytest.mark.slow
@pytest.mark.skipif(not LAN, reason="this machine has no address but loopback")
def test_a_server_that_takes_no_input_from_the_lan_says_why(tree):
    """Without --token, a server takes input from loopback only: 403, its reason shown."""
    server = ota_promoter.Promoter(str(tree), interval=3600).serve("0.0.0.0", 0).start()
    try:
        url = "http://%s:%d" % (LAN[0], server.server_address[1])
        request(url, "/files/version", headers={"X-OTA-Device": "a4cf12f3e9b1"})
        one_line(command("exec", "a4cf", "print(1)", "--server", url), "exec",
                 "the server at %s refused: input is taken from this machine only: run the server with --token, "
                 "or with --repl-from-lan" % url)
    finally:
        server.close()


# -- Against boards in live mode ---------------------------------------------------------


class LiveBoard:
    """A simulated board (tests/live_board.py under CPython) in live mode with the id given."""

    def __init__(self, root, url, device):
        write(root, "boot.py", BOOT % bytes.fromhex(device))
        self.process = subprocess.Popen([sys.executable, "-u", BOARD, CLIENT, str(root), "120", url],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = Lines(self.process.stdout, quiet="^tick [0-9]+$|^@ticks")

    def stop(self):
        self.process.kill()
        self.process.wait(TIMEOUT)
        self.process.stdout.close()


@pytest.fixture(scope="module")
def live_boards(tmp_path_factory):
    """A server and two boards in live mode: FIRST at its prompt, SECOND running an
    app that loops; the server's url."""
    tree = tmp_path_factory.mktemp("app")
    write(tree, "main.py", APP)
    promoter = ota_promoter.Promoter(str(tree), interval=0.05)
    server = promoter.serve("127.0.0.1", 0).start()
    boards = []
    try:
        for device in (FIRST, SECOND):
            boards.append(LiveBoard(tmp_path_factory.mktemp("device"), server.url, device))
        for board, started in zip(boards, ("^app ready$", "^tick 1$")):
            board.lines.expect("^@boot 2 hard")  # the first update
            board.lines.expect(started)

        def listening():
            found = request(server.url, "/boards").json()["boards"]
            return len([b for b in found if b.get("listening")]) == 2

        until(listening, "both boards to listen")
        yield server.url
    finally:
        for board in boards:
            board.stop()
        server.close()
        promoter.stop()


@pytest.mark.slow
def test_exec_prints_what_the_board_prints(live_boards):
    result = command("exec", FIRST[:4], "print(1+1)", "--server", live_boards)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"2\n", b"")


@pytest.mark.slow
def test_exec_of_code_that_raises_exits_1_with_the_exception_on_stderr(live_boards):
    result = command("exec", FIRST, "print('before')\nraise ValueError('boom')", "--server", live_boards)
    assert result.returncode == 1
    assert result.stdout == b"before\n"
    assert result.stderr.decode().splitlines()[-1] == "ValueError: boom"


@pytest.mark.slow
def test_run_sends_a_file(live_boards, tmp_path):
    write(tmp_path, "app.py", "for i in range(3):\n    print('line', i)\n")
    result = command("run", FIRST, str(tmp_path / "app.py"), "--server", live_boards)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"line 0\nline 1\nline 2\n", b"")


@pytest.mark.slow
def test_exec_all_prefixes_each_boards_lines_and_stops_a_running_app(live_boards):
    result = command("exec", "all", "print(6*7)", "--server", live_boards)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.decode().splitlines()) == ["[%s] 42" % FIRST, "[%s] 42" % SECOND]
    assert result.stderr == b""


@pytest.mark.slow
def test_repl_from_a_pipe_types_it_and_shows_the_answer(live_boards):
    result = command("repl", FIRST, "--server", live_boards, stdin=b"1+1\r")
    assert result.returncode == 0, result.stderr
    assert b"1+1\r\n2\r\n>>> " in result.stdout
    assert result.stderr.decode() == "Connected to %s (127.0.0.1); Ctrl-] leaves\n" % FIRST


@pytest.mark.slow
def test_code_that_runs_past_the_timeout_is_interrupted_and_named(live_boards):
    result = command("exec", FIRST, "import time\nprint('sleeps')\ntime.sleep(30)", "--server", live_boards,
                     "--timeout", "1")
    assert (result.returncode, result.stdout) == (1, b"sleeps\n")
    assert result.stderr.decode() == "ota_promoter.py exec: [%s] did not finish within 1 s: interrupted\n" % FIRST
    result = command("exec", FIRST, "print('next')", "--server", live_boards)  # the board is back at its REPL
    assert (result.returncode, result.stdout, result.stderr) == (0, b"next\n", b"")


def test_a_board_the_server_forgets_during_exec_all_fails_alone(server, monkeypatch, capsys):
    """Its error is its own (status 1), printed with the others' results; not the
    server's (status 2), which would hide them."""
    remote = ota_promoter.Remote(server.url)
    for call in (lambda: remote.send("cccccccccc03", "1\r", 0), lambda: remote.console("cccccccccc03")):
        with pytest.raises(ota_promoter.BoardError) as raised:
            call()
        assert str(raised.value) == "the server knows no board 'cccccccccc03' any more"
    boards = [{"device": d, "address": "127.0.0.1", "listening": True} for d in (FIRST, "cccccccccc03", SECOND)]
    monkeypatch.setattr(remote, "find", lambda name: boards)

    def run_code(remote, board, code, timeout, prefixed=False):
        if board["device"] == FIRST:
            return True
        if board["device"] == SECOND:
            raise ota_promoter.BoardError("[%s] did not answer within 1 s" % SECOND)
        return remote.send(board["device"], code, 0)

    monkeypatch.setattr(ota_promoter, "run_code", run_code)
    assert ota_promoter.exec_on(remote, "all", "print(1)", 1.0) == 1
    assert capsys.readouterr().err == (
        "ota_promoter.py exec: the server knows no board 'cccccccccc03' any more\n"
        "ota_promoter.py exec: [bbbbbbbbbb02] did not answer within 1 s\n")
