"""A board for live mode's tests, run under CPython or a MicroPython unix port.

It runs boot.py, then main.py, from a device folder, then idles at a REPL prompt,
as MicroPython's ports do, and it simulates the pieces of the port live mode
relies on as their C code behaves (micropython/README.md's "Live mode" cites
it): network.WLAN (always connected), machine.Timer's soft callback and
micropython.schedule (py/scheduler.c: callbacks run one at a time, between two
bytecodes), os.dupterm (every print goes to the UART, here stdout, and to the
stream's write), os.dupterm_notify (reads the stream; Ctrl-C raises
KeyboardInterrupt in the running code once the callback returns, other keys go
to the REPL), the REPL (shared/runtime/pyexec.c): the friendly one runs a line
ending in Enter in __main__'s globals and prints its value, Ctrl-C starts a new
line, Ctrl-D at an empty line soft-resets (boot.py and main.py again); Ctrl-A
enters the raw REPL (code, then Ctrl-D, runs it: OK, its output, \x04, the
exception's text, \x04, >), Ctrl-B leaves it; and machine.reset (a hard reset),
machine.WDT (a hard reset when not fed in time; several Timers may be armed).
A soft reset with the timer still armed is reported as an error: a real ESP8266
would crash.

    live_board.py [--flash] CLIENT_DIR ROOT SECONDS URL [FREE]

The board's id (machine.unique_id()) is a4cf12f3e9b1, or the hex in the environment
variable OTA_BOARD_ID: a fleet's boards each have their own.

With --flash, ROOT is the board's whole flash: a path from / (the client's default
root, as a boot.py that calls ota.update(url) uses it) is that path in ROOT, and
secrets.py in ROOT is imported as from a port's current folder.

boot.py and main.py run in one dict of globals, as in a port's __main__: what the
app holds stays held at the REPL after it stops, until a reset. With FREE (bytes,
MicroPython only), the board holds ballast so that FREE bytes of heap are free when
boot.py starts, as on a real board of that heap size: the board's own code, which
a port has in flash, is not counted.

The timer fires from SIGALRM under CPython, so even an app stuck in a tight loop
is interrupted between bytecodes; the unix port has no signals, so there it
fires whenever the app prints and while the REPL idles. Besides what the board
prints, stdout gets these marks:
  @boot N HOW     boot.py starts; HOW is power, soft (Ctrl-D) or hard (machine.reset)
  @main N MS      main.py starts, MS after this program started
  @ticks N MS     N timer callbacks so far, the slowest MS long (every 10, at prompts and boots)
  @heap N         bytes of heap free when boot.py starts (MicroPython)
  @wdt            the watchdog was not fed in time: a hard reset follows
"""

import binascii
import builtins
import os
import sys
import time

CPYTHON = sys.implementation.name == "cpython"
FLASH = sys.argv[1] == "--flash"
if FLASH:
    sys.argv.pop(1)
client, root, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, client)
if FLASH:
    sys.path.insert(1, root)  # a port's '' (the current folder, the flash's root): secrets.py

try:
    from time import ticks_diff, ticks_ms
except ImportError:
    def ticks_ms():
        return int(time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

START = ticks_ms()
uart = builtins.print


class HardReset(BaseException):
    pass


class Board:
    timers = []  # the Timers armed, each with its callback, period and when it is due
    wdt = None  # [timeout, when it bites] of the watchdog once started (machine.WDT): only a hard reset stops it
    stream = None
    interrupt = False
    busy = False  # a callback runs: the scheduler is locked
    pending = []  # micropython.schedule's queue: (function, argument)
    stdin = []  # the keys dupterm_notify read, for the REPL (a port's stdin_ringbuf)
    in_main = False  # code runs (main.py, or what the REPL runs): Ctrl-C interrupts it
    raw = False  # the raw REPL (Ctrl-A), kept across a soft reset as pyexec_mode_kind is
    ticks = 0
    slowest = 0


def out(text):
    """mp_hal_stdout_tx_strn: the UART, and the dupterm stream."""
    uart(text, end="")
    if Board.stream:
        Board.stream.write(text.encode())


def board_print(*args, **kw):
    out(kw.get("sep", " ").join([str(a) for a in args]) + kw.get("end", "\n"))
    if not CPYTHON:
        fire()


def scheduled():
    """mp_sched_run_pending: the scheduled callbacks, each run protected (what one
    raises is printed: mp_call_function_1_protected)."""
    while Board.pending:
        function, arg = Board.pending.pop(0)
        try:
            function(arg)
        except HardReset:
            raise  # machine.reset() does not return on a board
        except BaseException as e:
            out(traceback_text(e))


def schedule(function, arg):
    if len(Board.pending) >= 8:  # MICROPY_SCHEDULER_DEPTH
        raise RuntimeError("schedule queue full")
    Board.pending.append((function, arg))


def fire():
    """The watchdog bites if it was not fed in time; the scheduler runs the callbacks
    scheduled, and each timer's that is due; then a pending Ctrl-C."""
    if Board.wdt and ticks_diff(ticks_ms(), Board.wdt[1]) >= 0:
        Board.wdt = None
        uart("@wdt")
        raise HardReset
    if Board.busy:
        return
    due = [t for t in Board.timers if ticks_diff(ticks_ms(), t.due) >= 0]
    if due and ticks_diff(ticks_ms(), START) > seconds * 1000:
        raise SystemExit(0)
    Board.busy = True  # the scheduler is locked while a callback runs
    try:
        scheduled()
        for timer in due:
            if timer not in Board.timers:
                continue  # disarmed by a callback before it
            began = ticks_ms()
            try:
                timer.callback(timer)
            finally:
                took = ticks_diff(ticks_ms(), began)
                Board.ticks += 1
                Board.slowest = max(Board.slowest, took)
                timer.due = ticks_ms() + timer.period
                if Board.ticks % 10 == 0:
                    uart("@ticks %d %d" % (Board.ticks, Board.slowest))
            scheduled()
    finally:
        Board.busy = False
    if Board.interrupt:
        Board.interrupt = False
        if Board.in_main:
            raise KeyboardInterrupt


class Timer:
    """A virtual timer (ESP8266's Timer(-1)): as many as armed."""

    PERIODIC = 1

    def __init__(self, id):
        if id != -1:
            raise ValueError("Timer doesn't exist")

    def init(self, period, mode, callback):
        self.period = period
        self.due = ticks_ms() + period
        self.callback = callback
        if self not in Board.timers:
            Board.timers.append(self)

    def deinit(self):
        if self in Board.timers:
            Board.timers.remove(self)


class WDT:
    """machine.WDT: once started, a hard reset unless fed within timeout ms (checked
    at each SIGALRM under CPython; under the unix port, when the board prints)."""

    def __init__(self, id=0, timeout=5000):
        Board.wdt = [timeout, ticks_ms() + timeout]

    def feed(self):
        if Board.wdt:
            Board.wdt[1] = ticks_ms() + Board.wdt[0]


BOARD_ID = binascii.unhexlify(os.getenv("OTA_BOARD_ID") or "a4cf12f3e9b1")


class Machine:
    Timer = Timer
    WDT = WDT

    def unique_id(self):
        return BOARD_ID

    def reset(self):
        raise HardReset


real_os = os


class PortOS:
    def __getattr__(self, name):
        return getattr(real_os, name)

    def dupterm(self, stream, index=0):
        if index != 0:
            raise ValueError("slot 1 carries the UART")
        prior, Board.stream = Board.stream, stream
        return prior

    def dupterm_notify(self, _):
        b = bytearray(1)
        while Board.stream and Board.stream.readinto(b):
            if b[0] == 3 and Board.in_main:
                Board.interrupt = True  # mp_sched_keyboard_interrupt
            else:
                Board.stdin.append(b[0])


class WLAN:
    """The station interface, joined to the WiFi from the start."""

    def __init__(self, interface):
        pass

    def active(self, on=None):
        return True

    def isconnected(self):
        return True

    def connect(self, ssid, password):
        pass


class Network:
    STA_IF = 0
    WLAN = WLAN


def on_flash(path):
    return root + path if FLASH and path.startswith("/") else path


class FlashOS(PortOS):
    """The port's os, its flash in the folder ROOT (with --flash)."""

    def mkdir(self, path):
        real_os.mkdir(on_flash(path))

    def remove(self, path):
        real_os.remove(on_flash(path))

    def rmdir(self, path):
        real_os.rmdir(on_flash(path))

    def rename(self, old, new):
        real_os.rename(on_flash(old), on_flash(new))

    def stat(self, path):
        return real_os.stat(on_flash(path))

    def statvfs(self, path):
        return real_os.statvfs(on_flash(path))

    def listdir(self, path="/"):
        return real_os.listdir(on_flash(path))

    def ilistdir(self, path="/"):
        return real_os.ilistdir(on_flash(path))

    def chdir(self, path):
        real_os.chdir(on_flash(path))


real_open = builtins.open


def flash_open(path, *args, **kw):
    return real_open(on_flash(path), *args, **kw)


class MicroPython:
    """The micropython module's part live mode uses: its scheduler is the board's."""

    const = staticmethod(lambda x: x)
    schedule = staticmethod(schedule)


sys.modules["machine"] = Machine()
sys.modules["micropython"] = MicroPython  # the class: an instance's methods do not import on every port
if CPYTHON:
    time.ticks_ms, time.ticks_diff = ticks_ms, ticks_diff  # a port's time has them: ota.py then takes the board's schedule
sys.modules["network"] = Network()
sys.modules["os"] = FlashOS() if FLASH else PortOS()
builtins.print = board_print
if FLASH:
    builtins.open = flash_open
if CPYTHON:
    import signal

    signal.signal(signal.SIGALRM, lambda *_: fire())
    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)


def run(name, where, main):
    path = root + "/" + name
    try:
        with real_open(path) as f:
            code = f.read()
    except OSError:
        return
    exec(compile(code, path, "exec") if CPYTHON else code, main)


def traceback_text(e):
    if CPYTHON:
        import traceback

        return "".join(traceback.format_exception(type(e), e, e.__traceback__))
    import io

    s = io.StringIO()
    sys.print_exception(e, s)
    return s.getvalue()


BANNER = "MicroPython on a test bench\r\nType \"help()\" for more information.\r\n"


def key():
    """The next key the REPL reads, waiting for one (mp_hal_stdin_rx_chr)."""
    while not Board.stdin:
        time.sleep(0.005)
        if not CPYTHON:
            fire()
    return Board.stdin.pop(0)


def execute(source, main, friendly):
    """Run what the REPL read in __main__'s globals, Ctrl-C interrupting it; the
    friendly REPL prints an expression's value (pyexec's MP_PARSE_SINGLE_INPUT) and an
    exception's traceback; the raw one, that text between its two \\x04."""
    Board.in_main = True
    try:
        try:
            code = compile(source, "<stdin>", "eval") if friendly else None
        except SyntaxError:
            code = None
        if code is None:
            exec(source, main)
        else:
            value = eval(code, main)
            if value is not None:
                out(repr(value) + "\r\n")
        error = ""
    except (HardReset, SystemExit):
        raise
    except BaseException as e:
        error = traceback_text(e)
    finally:
        Board.in_main = False
    if friendly:
        out(error)
    else:
        out("\x04" + error + "\x04")


def repl(main):
    """The REPL after main.py (shared/runtime/pyexec.c, shared/readline/readline.c),
    reading the keys dupterm_notify queued: returns at a soft reset (Ctrl-D at an
    empty line). Each prompt is written alone, as readline writes it."""
    if Board.raw:
        out("raw REPL; CTRL-B to exit\r\n")
    else:
        out(BANNER)
    line, block, partial = "", [], bytearray()
    out(">" if Board.raw else ">>> ")
    uart("")
    uart("@ticks %d %d" % (Board.ticks, Board.slowest))
    while True:
        c = key()
        if Board.raw:
            if c == 2:  # Ctrl-B: the friendly REPL
                Board.raw = False
                out("\r\n")
                out(BANNER)
                out(">>> ")
            elif c == 3:
                line = ""
            elif c == 4 and not line:
                out("\r\n")
                return
            elif c == 4:
                out("OK")
                execute(line, main, False)
                line = ""
                out(">")
            elif c != 1:
                line += chr(c)
            continue
        if c == 1:  # Ctrl-A: the raw REPL
            Board.raw = True
            line, block = "", []
            out("\r\n")
            out("raw REPL; CTRL-B to exit\r\n")
            out(">")
        elif c == 3:  # Ctrl-C: a new line
            line, block = "", []
            out("\r\n")
            out(">>> ")
        elif c == 4 and not line and not block:
            out("\r\n")
            return
        elif c == 13:
            out("\r\n")
            if line.rstrip().endswith(":") or (block and line):  # a compound statement: more lines
                block.append(line)
                line = ""
                out("... ")
                continue
            source = "\n".join(block + [line]) if block else line
            line, block = "", []
            if source.strip():
                execute(source, main, True)
            out(">>> ")
        elif c in (8, 127) and line:
            line = line[:-1]
            out("\b \b")
        elif c == 27:  # an escape sequence (an arrow): not kept
            if key() == ord("["):
                key()
        elif c >= 128:  # a byte of a UTF-8 character: echoed once the character is whole
            partial.append(c)
            try:
                character = bytes(partial).decode()
            except UnicodeError:
                continue
            partial = bytearray()
            line += character
            out(character)
        elif c >= 32 and c != 127:
            line += chr(c)
            out(chr(c))


url = sys.argv[4]
free = int(sys.argv[5]) if len(sys.argv) > 5 and not CPYTHON else 0
ballast = None
boots = 0
how = "power"
while True:
    boots += 1
    for name in ("ota", "ota_update", "ota_commit", "ota_plan", "ota_check", "ota_fetch", "ota_http", "ota_tls",
                 "ota_find", "ota_live", "ota_guard", "ota_trial"):
        sys.modules.pop(name, None)  # a reset starts a new heap
    Board.stream = None
    Board.timers = []
    Board.stdin = []
    Board.pending = []
    main = None
    uart("@boot %d %s" % (boots, how))
    uart("@ticks %d %d" % (Board.ticks, Board.slowest))
    if not CPYTHON:
        import gc

        def deep(n):  # a reset starts a new heap: stale words on the C stack hold nothing
            return deep(n - 1) if n else gc.collect()

        deep(40)
        gc.collect()
        if free and ballast is None:
            ballast = bytearray(max(gc.mem_free() - free, 0))
            gc.collect()
        uart("@heap %d" % gc.mem_free())
    # __main__'s globals: what boot.py and main.py define, and the REPL after them
    main = {"__name__": "__main__", "ROOT": root, "URL": url, "ticks_ms": ticks_ms, "ticks_diff": ticks_diff}
    try:
        try:
            run("boot.py", url, main)
            if not Board.raw:  # the raw REPL soft-resets without main.py (ports' main.c)
                uart("@main %d %d" % (boots, ticks_diff(ticks_ms(), START)))
                Board.in_main = True
                try:
                    run("main.py", url, main)
                finally:
                    Board.in_main = False
        except HardReset:
            raise
        except SystemExit:
            raise
        except BaseException as e:  # pyexec_file prints it, KeyboardInterrupt too
            out(traceback_text(e))
        repl(main)
        if Board.timers:
            uart("@error: soft reset with a timer armed")
            raise SystemExit(3)
        out("MPY: soft reboot\r\n")
        how = "soft"
    except HardReset:
        how = "hard"
        Board.wdt = None
