"""The command line, run as a user runs it: python3 ota_promoter.py DIR ..."""

import ast
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

import ota
import ota_promoter
from helpers import (ROOT, SCRIPT, TIMEOUT, assert_user_error, files, free_port, request, run, slow_except,
                     wait_for_server, write)


@pytest.mark.parametrize("args", slow_except([[], ["--port", "0"], ["--host", "127.0.0.1", "--token", "abc"],
                                              ["--export", "site"]], []))
def test_without_a_folder_it_names_the_usage_and_publishes_nothing(tmp_path, args):
    """No default folder: "." would be whatever folder the terminal is in; in a
    clone, the server itself, its tests and the README."""
    write(tmp_path, "main.py", "print('hi')\n")
    result = run(*args, cwd=str(tmp_path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "ota_promoter.py: error: name the folder to promote: python3 ota_promoter.py DIR (see --help)\n")
    assert os.listdir(str(tmp_path)) == ["main.py"]  # no site exported


@pytest.mark.slow
def test_a_folder_holding_the_server_itself_is_refused_unless_ignored(tmp_path):
    """A folder that holds ota_promoter.py, in a clone or with a copy of it next to
    the app, would send the server (and in a clone its tests) to every board."""
    work = tmp_path / "work"
    clone = work / "clone"
    write(clone, "ota_promoter.py", open(SCRIPT, "rb").read())
    write(clone, "tests/test_x.py", "x = 1\n")
    write(clone, "micropython/example/main.py", "print('hi')\n")
    script = str(clone / "ota_promoter.py")
    for folder, cwd, shown, path in [(".", str(clone), ".", "ota_promoter.py"),
                                     (str(clone), None, str(clone), "ota_promoter.py"),
                                     (".", str(work), ".", "clone/ota_promoter.py")]:
        result = run(folder, "--export", str(tmp_path / "site"), cwd=cwd, script=script)
        assert_user_error(result, "%r holds this server, %s: give the folder of your app, or --ignore %s to "
                                  "promote the rest" % (shown, path, path))
    assert os.listdir(str(tmp_path)) == ["work"]  # nothing exported
    result = run("micropython/example", "--export", str(tmp_path / "site"), cwd=str(clone), script=script)
    assert result.returncode == 0, result.stderr
    assert [f["path"] for f in json.loads((tmp_path / "site" / "files.json").read_text())["files"]] == ["main.py"]
    result = run(".", "--ignore", "ota_promoter.py", "--export", str(tmp_path / "whole"), cwd=str(clone), script=script)
    assert result.returncode == 0, result.stderr
    assert [f["path"] for f in json.loads((tmp_path / "whole" / "files.json").read_text())["files"]] == [
        "micropython/example/main.py", "tests/test_x.py"]


def test_missing_folder(tmp_path):
    assert_user_error(run(str(tmp_path / "app")), "folder %r does not exist" % str(tmp_path / "app"))


@pytest.mark.slow
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


def test_a_missing_folder_is_said_before_a_port_in_use(tmp_path):
    # The server listens before the first version: the folder is looked at first.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run(str(tmp_path / "app"), "--host", "127.0.0.1", "--port", str(port))
    assert_user_error(result, "folder %r does not exist" % str(tmp_path / "app"))


@pytest.mark.slow
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
    (["b"], "unrecognized arguments: b"),
])
def test_bad_options(tree, args, message):
    result = run(str(tree), *args)
    assert result.returncode == 2
    assert result.stderr == "ota_promoter.py: error: %s (see --help)\n" % message


def test_empty_token(tree):
    assert_user_error(run(str(tree), "--token", ""), "the token is empty (see --help)")


@pytest.mark.slow
@pytest.mark.parametrize("args, env", [(["--token", "sécret"], None), ([], {"OTA_TOKEN": "tok\x1b"})])
def test_a_token_no_client_could_send_is_refused(tree, args, env):
    assert_user_error(run(str(tree), *args, env=env), "the token must be printable ASCII characters (see --help)")


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="Windows words its socket errors its own way")
def test_address_not_on_this_machine(tree):
    result = run(str(tree), "--host", "192.0.2.1", "--port", "0")  # TEST-NET-1: binding fails locally
    assert_user_error(result, "cannot listen on 192.0.2.1 port 0: %s" % os.strerror(errno.EADDRNOTAVAIL))


def test_help_and_version():
    assert run("--version").stdout == "ota_promoter.py %s\n" % ota_promoter.__version__
    result = run("--help")
    assert result.returncode == 0
    assert "--ignore GLOB" in result.stdout and "--token TOKEN" in result.stdout


def readme_options():
    """The README's section "Options": (its usage lines, {option names: the meaning in its table}),
    the meaning as a reader sees it: no backticks, a link as its text."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    usage = section.split("```\n", 2)[1]
    rows = {}
    for line in section.splitlines():
        row = re.match(r"^\| (`.+?) \| (.+) \|$", line)
        if row:
            names = frozenset(name.split()[0] for name in re.findall(r"`([^`]+)`", row.group(1)))
            meaning = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", row.group(2)).replace("`", "")
            rows[names] = meaning
    return usage, rows


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the command line in /proc")
@pytest.mark.slow
def test_the_script_runs_on_as_a_module_in_the_same_process(tree, tmp_path):
    """CPython keeps a script's syntax tree as long as the script runs (7 MB of
    this one): the script has the interpreter import it instead, in the same
    process, with the interpreter's options and the arguments as given."""
    process = subprocess.Popen([sys.executable, "-s", SCRIPT, str(tree), "--host", "127.0.0.1", "--port", "0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert line.endswith("ota-promoter %s: serving %s, 0 files, version %s\n" % (
            ota_promoter.__version__, tree, ota_promoter.Promoter(str(tree)).version[:7]))
        with open("/proc/%d/cmdline" % process.pid, encoding="utf-8") as f:
            assert f.read().split("\0")[:-1] == [
                sys.executable, "-s", "-c", ota_promoter._AS_MODULE, os.path.realpath(SCRIPT), SCRIPT, str(tree),
                "--host", "127.0.0.1", "--port", "0"]
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(TIMEOUT) == 0
        process.stderr.close()


@pytest.mark.slow
def test_modules_in_the_working_folder_do_not_shadow_the_standard_library(tmp_path):
    """As for a script, the script's folder comes first on sys.path, not the
    working folder: a json.py there is not imported, nor one that the script
    imports to run on as a module."""
    for name in ("json", "importlib", "os"):
        write(tmp_path, name + ".py", "raise SystemExit('the %s.py of the working folder was imported')\n" % name)
    write(tmp_path, "site", "")
    result = run(str(tmp_path / "site"), cwd=str(tmp_path))
    assert_user_error(result, "%r is a file, not a folder: give the folder to promote" % str(tmp_path / "site"))
    assert run("--version", cwd=str(tmp_path)).stdout == "ota_promoter.py %s\n" % ota_promoter.__version__


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the command line in /proc")
def test_the_module_sees_what_the_script_would_through_a_link(tmp_path):
    """Run through a link with a relative path, the module has the arguments as
    given and, as CPython gives a script, the folder of the file linked to
    first on sys.path: a json.py next to the link is not imported."""
    write(tmp_path, "bin/json.py", "raise SystemExit('the json.py next to the link was imported')\n")
    os.symlink(SCRIPT, str(tmp_path / "bin" / "ota_promoter.py"))
    write(tmp_path, "probe/sitecustomize.py", (
        "import atexit, sys\n"
        "atexit.register(lambda: open(%r, 'w').write(repr([sys.argv, sys.path[0], sys.modules['ota_promoter'].__file__,"
        " open('/proc/self/cmdline').read().split(chr(0))[1]])))\n") % str(tmp_path / "seen"))
    result = subprocess.run([sys.executable, "bin/ota_promoter.py", "--version"], capture_output=True, text=True,
                            timeout=TIMEOUT, cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=str(tmp_path / "probe")))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ota_promoter.py %s\n" % ota_promoter.__version__, "")
    assert ast.literal_eval((tmp_path / "seen").read_text()) == [
        ["bin/ota_promoter.py", "--version"], os.path.dirname(os.path.realpath(SCRIPT)), os.path.realpath(SCRIPT), "-c"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the interpreter's file in /proc")
def test_the_interpreter_run_is_the_one_that_goes_on(tmp_path):
    """Started with a bare argv[0], sys.executable is a guess along PATH: the
    script does not exec that other file (here a python3 that is not Python)."""
    write(tmp_path, "bin/python3", "#!/bin/sh\necho 'the python3 on PATH ran' >&2\nexit 3\n")
    os.chmod(str(tmp_path / "bin" / "python3"), 0o755)
    result = subprocess.run(["python3", SCRIPT, "--version"], executable=os.path.realpath(sys.executable),
                            capture_output=True, text=True, timeout=TIMEOUT,
                            env=dict(os.environ, PATH=str(tmp_path / "bin") + os.pathsep + os.environ["PATH"]))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ota_promoter.py %s\n" % ota_promoter.__version__, "")


def test_after_the_run_the_prompt_of_python_i_has_the_script_names():
    result = subprocess.run([sys.executable, "-i", SCRIPT, "--version"],
                            input="print(sorted(n for n in ('Promoter', 'main', 'module', 'spec') if n in globals()))\n",
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.stdout == "ota_promoter.py %s\n['Promoter', 'main']\n" % ota_promoter.__version__


def test_under_a_debugger_the_script_stays_the_script():
    result = subprocess.run([sys.executable, "-m", "pdb", SCRIPT, "--version"], input="continue\n",
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert "(Pdb) ota_promoter.py %s" % ota_promoter.__version__ in result.stdout.splitlines()


def test_the_script_runs_after_an_end_of_the_interpreter_options():
    result = subprocess.run([sys.executable, "-W", "default", "--", SCRIPT, "--version"], capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ota_promoter.py %s\n" % ota_promoter.__version__, "")


def test_help_and_the_readme_say_the_same():
    """Each option's --help is what the README's table says of it (which may go on
    to point to a section); the table and the usage lines name every option."""
    usage, rows = readme_options()
    helps = {}
    for action in ota_promoter.build_parser()._actions:
        if action.option_strings != ["-h", "--help"]:
            helps[frozenset(action.option_strings or [action.metavar])] = action.help
    assert sorted(map(sorted, rows)) == sorted(map(sorted, helps))
    for names, help in helps.items():
        assert rows[names].startswith(help), (sorted(names), rows[names], help)
    assert usage.startswith("python3 ota_promoter.py DIR [--host 0.0.0.0] [--port 9090] [--interval 0.5]\n")
    named = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage))
    assert named == {name for names in helps for name in names if name.startswith("-")} - {
        "--quiet", "--verbose", "--version"}


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
        "warning: 127.0.0.1 is this machine's own address: no board can reach it "
        "(--host 0.0.0.0, the default, lets boards on the LAN in)",
        "input to boards is taken from this machine only (--repl-from-lan lets the LAN type)",
        "the status page: %s/" % url,
        'on the board: import ota; ota.update("%s")' % url,
    ]
    assert request(url, "/files/version").status == 200
    assert app.stop(signal.SIGINT) == (0, ["stopped"])


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="Windows ends a process on SIGTERM without telling it")
def test_sigterm_exits_0(tree, running):
    app = running(str(tree), "--host", "127.0.0.1", "--port", "0")
    app.banner()
    assert app.stop(signal.SIGTERM) == (0, ["stopped"])


@pytest.mark.slow
def test_quiet_shows_only_warnings(tree, running):
    port = free_port()  # -q hides the banner that would name a port the server chose
    app = running(str(tree), "--host", "127.0.0.1", "--port", str(port), "-q")
    url = "http://127.0.0.1:%d" % port
    assert wait_for_server(url).status == 200
    # The port answers once the first version is served, a moment before the start-up lines.
    assert app.log.get(timeout=TIMEOUT) == ("warning: 127.0.0.1 is this machine's own address: no board can "
                                            "reach it (--host 0.0.0.0, the default, lets boards on the LAN in)")
    assert app.stop() == (0, [])


@pytest.mark.slow
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


@pytest.mark.slow
def test_token_from_option_or_environment(tree, running):
    write(tree, "README.txt", "hello\n")
    for args, env in [(["--token", "abc"], None), ([], {"OTA_TOKEN": "abc"})]:
        app = running(str(tree), "--host", "0.0.0.0", "--port", "0", *args, env=env)
        lines, urls = app.banner()
        url = "http://127.0.0.1:" + urls[0].rsplit(":", 1)[1]
        assert request(url, "/files").status == 401
        assert request(url, "/files", headers={"Authorization": "Bearer abc"}).status == 200
        assert app.stop() == (0, ["stopped"])  # and no warning


@pytest.mark.slow
def test_with_a_token_the_start_up_lines_give_the_boards_line_and_the_pages_address(tree, tmp_path, running):
    """Both carry the token, as the board and the browser need it; the rest of the
    log never shows it."""
    write(tree, "main.py", "print('hi')\n")
    token = 'a+b "c\\d&e'  # printable ASCII, with what a URL or a string literal must escape
    app = running(str(tree), "--host", "0.0.0.0", "--port", "0", "-v", env={"OTA_TOKEN": token})
    lines, urls = app.banner()
    assert lines[-2:] == [
        "the status page: %s/?token=a%%2Bb%%20%%22c%%5Cd%%26e" % urls[0],
        'on the board: import ota; ota.update("%s", token="a+b \\"c\\\\d&e")' % urls[0],
    ]
    # The board's line, run as the client runs it (into a folder, without the reset).
    [call] = [node for node in ast.walk(ast.parse(lines[-1].split(": ", 1)[1])) if isinstance(node, ast.Call)]
    board = tmp_path / "board"
    board.mkdir()
    assert ota.update(*[ast.literal_eval(a) for a in call.args], root=str(board), reset=False,
                      **{k.arg: ast.literal_eval(k.value) for k in call.keywords}) is True
    assert files(board, own=False) == {"main.py": b"print('hi')\n"}
    # The page's address, opened as a browser opens it: a cookie, and the page.
    page = lines[-2].split(": ", 1)[1][len(urls[0]):]
    url = "http://127.0.0.1:" + urls[0].rsplit(":", 1)[1]
    opened = request(url, page)
    assert (opened.status, opened.headers["Location"]) == (303, "/")
    shown = request(url, "/", headers={"Cookie": opened.headers["Set-Cookie"].split(";")[0]})
    assert shown.status == 200 and b"<title>OTA Promoter: the bench</title>" in shown.body
    status, rest = app.stop()
    assert status == 0 and rest[-1] == "stopped"
    assert "127.0.0.1 'GET /?token=(hidden) HTTP/1.1' 303" in rest
    assert not any(token in line or "a%2Bb" in line for line in rest)


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not ipv6_loopback(), reason="no IPv6 loopback on this machine"))])
def test_on_a_loopback_address_it_warns_that_no_board_can_reach_it(tree, running, host):
    app = running(str(tree), "--host", host, "--port", "0", "--no-check")
    lines, [url] = app.banner()
    assert lines[1:] == [
        "  " + url,
        "warning: %s is this machine's own address: no board can reach it "
        "(--host 0.0.0.0, the default, lets boards on the LAN in)" % host,
        "input to boards is taken from this machine only (--repl-from-lan lets the LAN type)",
        "the status page: %s/" % url,
        'on the board: import ota; ota.update("%s")' % url,
    ]
    assert url.startswith("http://%s:" % (host if host == "127.0.0.1" else "[::1]"))
    assert request(url.replace("[", "").replace("]", ""), "/files/version").status == 200
    assert app.stop() == (0, ["stopped"])


@pytest.mark.slow
def test_the_example_app_publishes_its_code_not_the_secrets_template(running):
    """As the README runs it: python3 ota_promoter.py micropython/example."""
    app = running(os.path.join(ROOT, "micropython", "example"), "--host", "127.0.0.1", "--port", "0")
    lines, [url] = app.banner()
    assert [line.split()[-1] for line in request(url, "/files?format=text").body.decode().splitlines()[1:]] == [
        "boot.py", "main.py"]
    assert app.stop() == (0, ["stopped"])


def test_lan_addresses_are_ipv4_and_not_loopback():
    for address in ota_promoter.lan_addresses():
        assert socket.inet_ntoa(socket.inet_aton(address)) == address
        assert not address.startswith("127.")


@pytest.mark.slow
def test_server_and_client_need_nothing_newer_than_python_3_9():
    pytest.importorskip("vermin", reason="needs vermin: .venv/bin/pip install -r requirements-dev.txt")
    result = subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
         "-t=3.9-", "--no-tips", "--violations",
         SCRIPT, os.path.join(ROOT, "micropython", "ota.py")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
