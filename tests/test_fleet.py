"""The README's walk-through "Fleets you can trust: signed, guarded, staged", run as
written: its command lines in a folder of their own (python3 is this Python, and
ota_promoter.py the clone's), the site served by the README's nginx block, and a
small fleet of simulated boards (tests/live_board.py --flash, each with its own id)
booting the README's boot.py, its URL the nginx's. The cable is mpremote's own
command line, writing to the folders that stand for the boards' flash.

What the section leaves to the reader, done here as a user would: boot.py is put on
each flash as the quick start puts it there; before step 3 the site serves a first
release to every board, signed (step 4's last line); step 5's crashing release and
its fix are exported for every board (the same line). That a board with a refusal
sends X-OTA-Rolled-Back is shown against the server (tests/test_guard.py): nginx's
log format here does not name it."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, TIMEOUT, Cable, Lines, files, mpremote, write
from ota_promoter import file_checksum, rollout_bucket, signed_fields, version_of

pytest.importorskip("mpremote.main", reason="mpremote is a test tool: "
                    "pip install -r requirements-dev.txt")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the walk-through's commands are for a POSIX shell")
BOARD = os.path.join(ROOT, "tests", "live_board.py")
CLIENT = os.path.join(ROOT, "micropython")  # the client, as a port holds it in flash
HEADING = "\n### Fleets you can trust: signed, guarded, staged\n"


def section():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read().split(HEADING, 1)[1].split("\n### ", 1)[0]


def walk_through():
    """{step number: [(language, text) of each code block]}, steps 1 to 5."""
    walk = section().split("\n#### ", 1)[0]
    parts = re.split(r"\n\*\*(\d)\. ", walk)[1:]
    return {int(n): [(lang, text) for lang, text in re.findall(r"```(\w*)\n(.*?)```", step, re.S)]
            for n, step in zip(parts[::2], parts[1::2])}


def in_readme(text):
    """Versions (7 or 40 hex), release numbers, times and durations named instead."""
    text = re.sub(r"^\d\d:\d\d:\d\d ", "TIME ", text)
    text = re.sub(r"\b[0-9a-f]{40}\b", "VERSION", text)
    text = re.sub(r"\b[0-9a-f]{7}\b", "V", text)
    text = re.sub(r"release \d+", "release N", text)
    return re.sub(r"in \d+\.\d\d s$", "in S s", text)


class Board:
    """A board of the fleet: its flash (a folder) and its id (the hex of its
    machine.unique_id()). power_on() starts it (boot.py, main.py, then the REPL);
    off() cuts its power."""

    def __init__(self, flash, device):
        self.flash, self.device = str(flash), device
        os.makedirs(self.flash)

    def power_on(self):
        self.process = subprocess.Popen(
            [sys.executable, "-u", BOARD, "--flash", CLIENT, self.flash, "60", "unused"],
            env=dict(os.environ, OTA_BOARD_ID=self.device), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.out = Lines(self.process.stdout, quiet="^@ticks ")

    def said(self, *ends):
        """What it said (the boots, what ota and the app printed, the exception's last
        line) until it said each of ends (regular expressions matching a whole line)
        in turn. A line may follow the REPL's prompt: the boot guard's tick runs at the
        prompt, and may print, or reset the board, before its line ends."""
        for end in ends:
            self.out.expect("^(?:>>> )?(?:%s)$" % end)
        lines = [line[4:] if line.startswith(">>> ") else line for line in self.out.seen]
        return [line for line in lines if re.match(r"@boot |ota: |no update|app |\w+Error: ", line)]

    def off(self):
        self.process.kill()
        self.process.wait(TIMEOUT)
        self.process.stdout.close()

    def files(self):
        """Its files but what the boot guard keeps aside (.ota-new/) until the next start."""
        return {path: data for path, data in files(self.flash).items() if not path.startswith(".ota-new/")}


def boot(fleet, ends):
    """Power on every board at once; what each said until ends(board) (its patterns)."""
    for board in fleet:
        board.power_on()
    try:
        return [board.said(*ends(board)) for board in fleet]
    finally:
        for board in fleet:
            board.off()


def app(main):
    """{path: bytes} of a release of the app: its main.py."""
    return {"main.py": main.encode()}


def version(release):
    return version_of([file_checksum(data, path) for path, data in sorted(release.items())])


@pytest.mark.slow
def test_the_fleet_walk_through_runs_as_the_readme_writes_it(tmp_path, nginx, monkeypatch):
    steps = walk_through()
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert [text.strip().splitlines() for lang, text in steps[1]] == [[
        'python3 -c "import secrets; print(secrets.token_hex(32))" > ota.key',
        "mpremote cp ota.key :.ota-key"]]
    [(lang, boot_py)] = steps[2]
    assert lang == "python" and 'ota.update("http://ota.example.com", guard=60, resets=3)' in boot_py
    [(_, export_10), (_, shown)] = steps[3]
    assert export_10.strip() == "python3 ota_promoter.py ./app --export ./site --key ota.key --rollout 10"
    [(_, exports)] = steps[4]
    export_50, export_all = exports.strip().splitlines()
    assert [export_50, export_all] == ["python3 ota_promoter.py ./app --export ./site --key ota.key --rollout 50",
                                       "python3 ota_promoter.py ./app --export ./site --key ota.key"]
    [(_, rolled_back)] = steps[5]
    crash = re.search(r"\(say `(raise [^`]+)`\)", section().split("\n**5. ", 1)[1]).group(1)
    assert crash == 'raise RuntimeError("no sensor")'

    # The user's folder: a clone's ota_promoter.py, their app, and python3 this Python.
    work, tools = tmp_path / "work", tmp_path / "bin"
    work.mkdir(), tools.mkdir()
    shutil.copy(os.path.join(ROOT, "ota_promoter.py"), str(work))
    os.symlink(sys.executable, str(tools / "python3"))
    env = dict(os.environ, PATH=str(tools) + os.pathsep + os.environ["PATH"])

    def shell(line):
        result = subprocess.run(["bash", "-c", "set -e\n" + line], cwd=str(work), env=env, text=True,
                                capture_output=True, timeout=TIMEOUT * 3)
        assert result.returncode == 0, (line, result.stderr)
        if (work / "ota.key").exists():  # the key is in no output
            assert (work / "ota.key").read_text().strip()[:16] not in result.stdout + result.stderr
        return result.stderr.splitlines()

    releases = [app('print("app %d")\n' % n) for n in (1, 2)]
    releases.append(app('print("app 3")\n%s\n' % crash))
    releases.append(app('print("app 4")\n'))
    v1, v2, v3, v4 = [version(r) for r in releases]

    def release(n):
        """The app as release n: its files in ./app."""
        shutil.rmtree(str(work / "app"), ignore_errors=True)
        for path, data in releases[n - 1].items():
            write(work / "app", path, data)

    # A fleet whose ids fall in and out of the share of release 2 at 10 and 50 percent.
    ids = ["a4cf12%06x" % i for i in range(200)]
    buckets = {device: rollout_bucket(device, v2) for device in ids}
    chosen = ([d for d in ids if buckets[d] < 10][:2] + [d for d in ids if 10 <= buckets[d] < 50][:1]
              + [d for d in ids if buckets[d] >= 50][:2])
    fleet = [Board(tmp_path / ("flash%d" % i), device) for i, device in enumerate(chosen)]
    in_10 = [b for b in fleet if buckets[b.device] < 10]
    in_50 = [b for b in fleet if buckets[b.device] < 50]
    assert (len(in_10), len(in_50), len(fleet)) == (2, 3, 5)

    # 1. A key, once per board, by cable.
    shell(steps[1][0][1].strip().splitlines()[0])
    key = (work / "ota.key").read_bytes()
    assert re.fullmatch(rb"[0-9a-f]{64}\n", key)
    monkeypatch.chdir(work)
    for board in fleet:
        mpremote(steps[1][0][1].strip().splitlines()[1], Cable(str(board.flash)), monkeypatch)
        assert files(board.flash) == {".ota-key": key}

    # 2. boot.py with the boot guard, against the site nginx serves (copied with the
    # client once by cable, as in the quick start: the section gives no command for it).
    site = work / "site"
    url = nginx(site).url
    boot_py = boot_py.replace("http://ota.example.com", url)
    for board in fleet:
        write(board.flash, "boot.py", boot_py)

    def on(board, v, n, refused=None):
        """The board runs release n, version v, exactly: its files, .ota naming v, and
        .ota-refused holds refused (its lines) if given."""
        held = board.files()
        assert held.pop(".ota")[:41] == (v + " ").encode(), board.device
        assert held.pop(".ota-refused", b"").decode().splitlines() == (refused or []), board.device
        assert held == dict(releases[n - 1], **{"boot.py": boot_py.encode(), ".ota-key": key}), board.device

    def takes(v, n):
        return lambda board: ["ota: version %s confirmed" % v[:7]]

    def fetched(n):
        return "ota: main.py %d B ok" % len(releases[n - 1]["main.py"])

    def installs(v, n):
        return ["@boot 1 power", fetched(n), "ota: version %s installed, 1 change" % v[:7], "@boot 2 hard",
                "app %d" % n, "ota: version %s confirmed" % v[:7]]

    # The release every board runs before step 3: the site above's, exported with the key
    # (step 4's last line). Exported without it, as "the nginx site above" was, a board
    # with the key refuses it ("unsigned release ...") unless it runs it already.
    release(1)
    shell(export_all)
    assert json.loads((site / "files" / "version").read_text()) == {"version": v1}
    said = boot(fleet, takes(v1, 1))
    for board, lines in zip(fleet, said):
        assert lines == installs(v1, 1), board.device
        on(board, v1, 1)

    # 3. Export, signed, to 10 percent of the fleet.
    release(2)
    [printed] = shell(export_10)
    assert in_readme(printed) == in_readme(shown.strip())
    assert re.search(r" version %s, .* stay on %s\)" % (v2[:7], v1[:7]), printed)
    staged = (site / "files" / "version").read_text()
    assert json.loads(staged) == {"version": v1, "next": v2, "rollout": 10}
    [readme_json] = re.findall(r"\n```\n(\{.*?\})\n```", section())  # "Staged rollout" shows it
    assert in_readme(staged) == in_readme(readme_json)
    # The README's examples are one story: the staged release and the one the others stay on.
    said_versions = re.search(r" version (\w+), .* stay on (\w+)\)", shown).groups()
    assert (json.loads(readme_json)["next"][:7], json.loads(readme_json)["version"][:7]) == said_versions
    assert re.search(r" to (\w+):", rolled_back).group(1) == said_versions[0]
    first = (site / "files" / v2).read_bytes().split(b"\n")[0]
    assert re.fullmatch(rb"%s (\d+) 10 [0-9a-f]{64}" % v2.encode(), first)  # <version> <release> <rollout> <signature>
    number = signed_fields(first)[0]

    def stage(share):
        """Power on the fleet with release 2 rolled out to share: exactly the boards
        of that share take it, once; the others stay on release 1."""
        def ends(board):
            return ["ota: version %s confirmed" % v2[:7]] if board in newly else ["app 1|app 2", ">>> "]
        newly = [b for b in fleet if buckets[b.device] < share and b not in taken]
        said = boot(fleet, ends)
        for board, lines in zip(fleet, said):
            if board in newly:
                assert lines == installs(v2, 2), board.device
                taken.append(board)
            else:
                assert lines == ["@boot 1 power", "app %d" % (2 if board in taken else 1)], board.device
            on(board, *((v2, 2) if buckets[board.device] < share else (v1, 1)))
    taken = []
    stage(10)
    assert taken == in_10

    # 4. Raise the share, then release it to every board.
    [printed] = shell(export_50)
    assert "rolled out to 50%% (the other boards stay on %s)" % v1[:7] in printed
    assert json.loads((site / "files" / "version").read_text()) == {"version": v1, "next": v2, "rollout": 50}
    assert signed_fields((site / "files" / v2).read_bytes().split(b"\n")[0]) == (number, 50)
    stage(50)
    assert taken == in_50
    shell(export_all)
    assert json.loads((site / "files" / "version").read_text()) == {"version": v2}
    stage(100)
    assert taken == fleet

    # 5. When a release crashes: every board takes it, starts it, resets, puts release 2 back.
    release(3)
    shell(export_all)
    assert json.loads((site / "files" / "version").read_text()) == {"version": v3}
    said = boot(fleet, lambda board: ["ota: %s was rolled back on this board.*" % v3[:7], "app 2", ">>> "])
    report = "ota: rolled back from %s to %s: RuntimeError: no sensor" % (v3[:7], v2[:7])
    for board, lines in zip(fleet, said):
        assert lines == ["@boot 1 power", fetched(3), "ota: version %s installed, 1 change" % v3[:7], "@boot 2 hard",
                         "app 3", "RuntimeError: no sensor", "@boot 3 hard", report, "@boot 4 hard",
                         "ota: %s was rolled back on this board: waiting for a newer version" % v3[:7],
                         "app 2"], board.device
        on(board, v2, 2, refused=[v3, report[5:]])
    assert in_readme(report) == in_readme(rolled_back.strip())
    # ...and the next start still refuses it while the site names it.
    said = boot(fleet, lambda board: ["app 2", ">>> "])
    assert said == [["@boot 1 power", "ota: %s was rolled back on this board: waiting for a newer version" % v3[:7],
                     "app 2"]] * len(fleet)

    # Export the fix: a higher release number, and every board takes it.
    release(4)
    shell(export_all)
    assert signed_fields((site / "files" / v4).read_bytes().split(b"\n")[0])[0] > signed_fields(
        (site / "files" / v3).read_bytes().split(b"\n")[0])[0] > number
    said = boot(fleet, takes(v4, 4))
    for board, lines in zip(fleet, said):
        assert lines == installs(v4, 4), board.device
        on(board, v4, 4)
        assert not os.path.exists(os.path.join(board.flash, ".ota-refused"))
    for path, data in files(site).items():  # the key is in no file of the site
        assert key.strip() not in data, path
