"""Input in live mode, the board's side (issue 20, protocol A): what a server hands the
long-poll reaches the board's REPL as keystrokes, and what the REPL prints comes back
on the console. The simulated board (tests/live_board.py) against a server in the
test that speaks the protocol (helpers.TypingServer); the console stream called
directly for what needs no board."""

import os
import sys

import pytest

import ota
from helpers import ROOT, SimulatedBoard, TypingServer

# boot.py: live mode without the update at boot (there is nothing to install here)
BOOT = """import ota
ota._named = None
ota.live(URL, root=ROOT, wait=2)
"""
ENDS = "print('app ends')\n"
BANNER = "MicroPython on a test bench\r\nType \"help()\" for more information.\r\n"  # live_board's
LOOPS = """n = 0
print('app loops')
while True:
    n += 1
"""


@pytest.fixture
def typing():
    server = TypingServer()
    yield server
    server.close()


@pytest.fixture
def boards(tmp_path, typing):
    """Start a simulated board on typing's url: boards(interpreter, main.py's source)."""
    started = []

    def start(interpreter, main):
        started.append(SimulatedBoard(interpreter[0], interpreter[1], tmp_path / "device", typing.url, BOOT, main))
        return started[-1]

    yield start
    for board in started:
        board.stop()


def test_a_line_typed_at_the_prompt_runs_and_its_echo_and_value_come_back(interpreter, typing, boards):
    board = boards(interpreter, ENDS)
    typing.wait_console(">>> ")  # the app ended: the REPL waits
    typing.type("1+1\r")
    said = typing.wait_console("1+1\r\n2\r\n>>> ")
    assert said.endswith(">>> 1+1\r\n2\r\n>>> ")
    assert "GET /files/version?wait=2&in=64 HTTP/1.0" in typing.lines  # only live mode asks for input
    board.expect("^2\r?$")  # and the UART shows it too, as the REPL printed it


def test_ctrl_c_typed_stops_a_looping_app_whose_globals_the_repl_then_reads(typing, boards):
    # CPython: the simulated board preempts a loop that never prints (the unix port has no signals)
    board = boards([[sys.executable, "-u"], os.path.join(ROOT, "micropython")], LOOPS)
    typing.wait_console("app loops")
    typing.type("\x03")
    board.expect("^KeyboardInterrupt")
    typing.wait_console("KeyboardInterrupt")
    typing.type("n > 1000\r")
    typing.wait_console("KeyboardInterrupt\n%s>>> n > 1000\r\nTrue\r\n>>> " % BANNER)


@pytest.mark.slow
def test_ctrl_d_typed_at_the_prompt_soft_resets_and_live_mode_is_armed_again(interpreter, typing, boards):
    board = boards(interpreter, ENDS)
    board.expect("^@boot 1 power")
    typing.wait_console(">>> ")
    typing.type("\x04")
    # live mode disarmed its timer before the soft reset (the board reports an error otherwise)
    board.expect("^@boot 2 soft")
    board.expect("^ota: live mode, version none$")
    board.expect("^app ends$")
    typing.type("6*7\r")
    typing.wait_console("6*7\r\n42\r\n>>> ")


@pytest.mark.slow
def test_an_exception_at_the_prompt_prints_its_traceback_and_the_prompt_comes_back(typing, boards):
    boards([[sys.executable, "-u"], os.path.join(ROOT, "micropython")], ENDS)
    typing.wait_console(">>> ")
    typing.type("undefined_name\r")
    said = typing.wait_console("NameError")
    typing.wait_console(said[said.index("NameError"):].split("\n")[0] + "\n>>> ")


@pytest.mark.slow
def test_a_compound_statement_takes_more_lines_at_the_continuation_prompt(typing, boards):
    boards([[sys.executable, "-u"], os.path.join(ROOT, "micropython")], ENDS)
    typing.wait_console(">>> ")
    typing.type("for i in range(3):\r")
    typing.wait_console("for i in range(3):\r\n... ")  # the echo, posted at the continuation prompt
    typing.type("  print(i * 10)\r\r")
    typing.wait_console("... \r\n0\n10\n20\n>>> ")


@pytest.mark.slow
def test_the_raw_repl_runs_code_as_mpremote_exec_expects(interpreter, typing, boards):
    boards(interpreter, ENDS)
    typing.wait_console(">>> ")
    typing.type("\x01")
    typing.wait_console("\r\nraw REPL; CTRL-B to exit\r\n>")
    typing.type("print(6 * 7)\x04")
    typing.wait_console(">OK42\n\x04\x04>")
    typing.type("1/0\x04")
    said = typing.wait_console("ZeroDivisionError")
    tail = said[said.rindex(">OK"):]
    assert tail.startswith(">OK\x04Traceback (most recent call last):")
    typing.wait_console("\x04>")
    typing.type("\x02")
    typing.wait_console("\r\n%s>>> " % BANNER)
    typing.type("2**10\r")
    typing.wait_console("2**10\r\n1024\r\n>>> ")


@pytest.mark.slow
def test_input_longer_than_an_answer_arrives_whole_and_in_order(typing, boards):
    boards([[sys.executable, "-u"], os.path.join(ROOT, "micropython")], ENDS)
    typing.wait_console(">>> ")
    line = "'%s' + '}' + '\u00e9'\r" % ("x" * 80)  # over 64 bytes: two answers, a } and a 2-byte character
    typing.type(line)
    typing.wait_console("%s\r\n'%s}\u00e9'\r\n>>> " % (line[:-1], "x" * 80))


# -- The console stream, called directly -------------------------------------------------


def console():
    """Live mode's console stream alone, as ota_update arms it."""
    stream = ota._Live()
    stream.buf = bytearray(512)
    stream.n = stream.dropped = stream.sending = 0
    stream.timer = stream.checks = stream.posts = None
    return stream


def test_readinto_hands_live_modes_key_first_then_what_was_typed_a_byte_at_a_time():
    stream = console()
    stream.key = 3
    stream.typed = b"ab"
    b = bytearray(1)
    got = []
    while stream.readinto(b):
        got.append(b[0])
    assert got == [3, ord("a"), ord("b")]
    assert stream.readinto(b) is None  # no input: EAGAIN, never 0 (os.dupterm takes 0 as the end)


def test_the_prompt_after_input_schedules_one_tick_and_output_alone_none(monkeypatch):
    stream = console()
    ticks = []
    monkeypatch.setattr(stream, "tick", lambda timer=None: ticks.append(1), raising=False)
    stream.write(b">>> ")  # no input fed: the timer's next tick posts it
    assert ticks == []
    stream.typed = b"1\r"
    b = bytearray(1)
    while stream.readinto(b):
        stream.write(bytes(b))  # the echo
    stream.write(b"\r\n")
    assert ticks == []
    stream.write(b">>> ")
    assert ticks == [1]
    stream.write(b">>> ")
    assert ticks == [1]  # once per input


@pytest.mark.parametrize("keys, prompt", [
    ("\x01", "raw REPL; CTRL-B to exit\r\n>"), ("x\x7f", "x\b \b"), ("\x01x\x03", "raw REPL; CTRL-B to exit\r\n>"),
], ids=["the raw REPL's (mpremote soft-reset)", "a line typed and erased", "the raw REPL's, emptied by Ctrl-C"])
@pytest.mark.slow
def test_ctrl_d_at_any_empty_line_disarms_live_mode_before_the_soft_reset(interpreter, typing, boards, keys, prompt):
    board = boards(interpreter, ENDS)
    board.expect("^@boot 1 power")
    typing.wait_console(">>> ")
    typing.type(keys)
    typing.wait_console(prompt)
    typing.type("\x04")
    board.expect("^@boot 2 soft")  # not "@error: soft reset with the timer armed"
    board.expect("^ota: live mode, version none$")


def test_ctrl_d_on_a_line_that_holds_a_character_leaves_live_mode_armed(monkeypatch):
    stream = console()
    stopped = []
    monkeypatch.setattr(stream, "stop", lambda: stopped.append(1), raising=False)
    b = bytearray(1)
    for prompt, keys in ((b">>> ", b"x\x04"), (b">>> ", b"xy\x7f\x04"), (b">>> ", b"\xc3\xa9\x04"), (b">", b"1\x04"),
                         (b">>> ", b"1\r\x04")):
        stream.write(prompt)
        stream.typed = keys
        while stream.readinto(b):
            pass
    assert stopped == []  # no soft reset: live mode goes on
    stream.write(b">>> ")
    stream.typed = b"\xc3\xa9\x7f\x04"
    while stream.readinto(b):
        pass
    assert stopped == [1]


@pytest.mark.parametrize("error", [RuntimeError, MemoryError])
def test_a_prompt_whose_extra_tick_cannot_be_scheduled_is_kept_and_not_counted_lost(monkeypatch, error):
    stream = console()
    stream.fed = True

    def schedule(function, arg):
        raise error("schedule queue full" if error is RuntimeError else "memory allocation failed, heap is locked")

    monkeypatch.setattr(ota, "schedule", schedule)
    assert stream.write(b">>> ") == 4
    assert (bytes(stream.buf[:stream.n]), stream.dropped, stream.fed) == (b">>> ", 0, False)
