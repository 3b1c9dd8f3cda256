# ota_guard.py: the boot guard's step at the start of update(), before any network
# request: a version on trial is counted, confirmed, or rolled back; and what
# .ota-refused says. ota_update.py imports it only while .ota-new/trial or
# .ota-refused exists, and drops it after; ota_trial.py, the watcher it arms, stays
# while the trial lasts.
#
# The files, all in the device root (micropython/README.md, "The boot guard"):
#   .ota-new/trial   the journal of the switch that installed the version on trial;
#                    the old files wait beside it (d<i>, g<i>, old), as the switch left them
#   .ota-new/starts  a byte for each start of the version on trial
#   .ota-new/crash   the line of the exception main.py ended in (ota_trial.py writes it)
#   .ota-refused     the version rolled back (line 1) and the report (line 2)
# Confirming renames trial to done, rolling back renames it to undo: ota_commit.py
# then deletes, or puts back, the old files, as for any update (ota_update._finish).

import os

import ota
from ota import const

_REPORT = const(200)  # bytes of a report, and of the exception line in it


def _kind(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _line(path, n=0):
    # Line n (0, 1) of a file, as printable ASCII (others ?), at most 200 bytes; ""
    # if there is no file. Not open() of a missing one: see ota_update._installed.
    if not _kind(path):
        return ""
    with open(path, "rb") as f:
        while True:
            line = bytearray(f.readline(_REPORT + 2).split(b"\n")[0].rstrip(b"\r")[:_REPORT])
            if not n:
                break
            n -= 1
    for i in range(len(line)):
        if not 31 < line[i] < 127:
            line[i] = 63  # ?
    return line.decode()


# The names of the arguments are those the update has interned already: MicroPython
# keeps each name for good (micropython/README.md).


def start(root, version=None, guard=None, resets=3, boot=False):
    """The guard's step, at the start of update(), version being the one installed:
    returns (the version .ota-refused names, or None; the header line that carries
    its report on every request, as head() takes it, or None; what to say once ota_update has rolled the trial back
    (ota_update._back), or None; True if ota_update is to arm
    the watcher, ota_trial.py, once the update is over, or None). Without version,
    only reads .ota-refused (live mode's header). A trial pending ends here: rolled
    back if .ota-refused names it (a restore a power cut interrupted), if main.py
    crashed, or at the start after the resets-th reset; confirmed if guard is None.
    Else, at the first update() of a boot (boot), the start is counted, and the
    watcher is to be armed."""
    stage = root + "/.ota-new/"
    trial = stage + "trial"
    path = root + "/.ota-refused"
    refused = _line(path)[:40] or None
    report = _line(path, 1) or None
    said = watch = None
    if version is not None and _kind(trial):
        x = version[:7] or "none"
        if refused == version:  # written, then the power failed: roll back again
            said = _back(root, "ota: " + report)
        elif guard is None:  # the guard is off: nothing stays aside for ever
            os.rename(trial, stage + "done")
            if ota._trial:
                ota._trial.stop()
            print("ota: version %s confirmed" % x)
        elif boot:
            with open(stage + "starts", "ab") as f:
                f.write(b"s")
            n = os.stat(stage + "starts")[6]
            why = _line(stage + "crash")
            if not why and n > max(resets, 1):
                why = "reset %d times before it was confirmed" % (n - 1)
            if not why:
                # Armed by ota_update at the end of the update: the update's steps
                # then never run beside the watcher (the 20 KB heap).
                watch = True  # not x: no string held across the update (the 20 KB heap)
            else:
                # The restore: the refusal first (so that a power cut from here rolls
                # back again), then the undo of the switch.
                refused = version
                said = "ota: rolled back from %s to %s: %s" % (x, _line(stage + "old")[:7] or "none", why)
                report = said[5 : 5 + _REPORT]
                with open(path + "-new", "wb") as f:
                    f.write(("%s\n%s\n" % (version, report)).encode())
                os.rename(path + "-new", path)
                _back(root, said)
    return refused, report and "X-OTA-Rolled-Back: %s\r\n" % report, said, watch


def stop(root, version, named):
    """Ends the trial of version, installed, without a refusal, as another version
    (named) is to be installed on the known-good files; returns what to say once
    the files are back."""
    return _back(root, "ota: %s was not confirmed: back to %s before installing %s" % (
        version[:7] or "none", _line(root + "/.ota-new/old")[:7] or "none", named[:7]))


def _back(root, said):
    # The rollback: the trial's journal renamed undo, which ota_commit undoes as it
    # undoes a switch that failed (ota_update._back); the watcher, if armed, disarmed.
    os.rename(root + "/.ota-new/trial", root + "/.ota-new/undo")
    if ota._trial:
        ota._trial.stop()
    return said
