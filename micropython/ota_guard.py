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

from ota import const

_REPORT = const(200)  # bytes of a report, and of the exception line in it


def _kind(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _line(f):
    # The next line of a file, as printable ASCII (others ?), at most 200 bytes.
    line = bytearray(f.readline(_REPORT + 2).split(b"\n")[0].rstrip(b"\r")[:_REPORT])
    for i in range(len(line)):
        if not 31 < line[i] < 127:
            line[i] = 63  # ?
    return line.decode()


def _first(path):
    # The first line of a file (_line), "" if there is none.
    if not _kind(path):  # see ota_update._installed: no open() of a missing file
        return ""
    with open(path, "rb") as f:
        return _line(f)


def start(root, installed=None, guard=None, resets=3, boot=False):
    """The guard's step, at the start of update(): returns (the version .ota-refused
    names, or None; the header line that carries its report on every request, as
    head() takes it, or None; the line that says the version is refused; what to
    say once ota_update has finished the trial's end, or None). Without installed,
    only reads .ota-refused (live mode's header). A trial pending ends here: rolled
    back (renamed undo) if .ota-refused names it (a restore a power cut
    interrupted), if main.py crashed, or at the start after the resets-th reset;
    confirmed (renamed done) if guard is None. Else, at the first update() of a
    boot (boot), the start is counted and the watcher armed (ota_trial.py)."""
    stage = root + "/.ota-new/"
    trial = stage + "trial"
    path = root + "/.ota-refused"
    version = report = None
    if _kind(path):
        with open(path, "rb") as f:
            version = _line(f)[:40]
            report = _line(f)
    if installed is None or not _kind(trial):
        return _said(version, report, None)
    x = installed[:7] or "none"
    if version == installed:  # written, then the power failed: roll back again
        os.rename(trial, stage + "undo")
        return _said(version, report, "ota: " + report)
    if guard is None:  # the guard is off: nothing stays aside for ever
        os.rename(trial, stage + "done")
        print("ota: version %s confirmed" % x)
        return _said(version, report, None)
    if not boot:
        return _said(version, report, None)
    with open(stage + "starts", "ab") as f:
        f.write(b"s")
    n = os.stat(stage + "starts")[6]
    why = _first(stage + "crash")
    if not why and n > max(resets, 1):
        why = "reset %d times before it was confirmed" % (n - 1)
    if not why:
        import ota_trial

        ota_trial.arm(root, x, guard)
        return _said(version, report, None)
    # The restore: the refusal first (so that a power cut from here rolls back
    # again), then the undo of the switch, by ota_update, through ota_commit.
    report = ("rolled back from %s to %s: %s" % (x, _first(stage + "old")[:7] or "none", why))[:_REPORT]
    with open(path + "-new", "w") as f:
        f.write("%s\n%s\n" % (installed, report))
    os.rename(path + "-new", path)
    os.rename(trial, stage + "undo")
    return _said(installed, report, "ota: " + report)


def _said(version, report, said):
    return (version, report and "X-OTA-Rolled-Back: %s\r\n" % report,
            "ota: %s was rolled back on this board: waiting for a newer version" % (version or "")[:7], said)


def stop(root, installed, named):
    """Ends the trial of installed without a refusal, as another version (named) is
    to be installed on the known-good files: renamed undo, for ota_update to finish.
    Returns what to say then."""
    stage = root + "/.ota-new/"
    os.rename(stage + "trial", stage + "undo")
    return "ota: %s was not confirmed: back to %s before installing %s" % (
        installed[:7] or "none", _first(stage + "old")[:7] or "none", named[:7])
