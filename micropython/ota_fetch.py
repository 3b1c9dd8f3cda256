# ota_fetch.py: the downloads of an update: each file the plan gets, to
# .ota-new/0, 1, ..., checked as it streams (SHA1 of bytes and path, length,
# target path). Imported by ota_update.py for that step only, with ota_http.py.

import binascii
import gc
import hashlib

from ota import OTAError
from ota_http import Server


def fetch(args, root):
    # Downloads each file the plan gets to .ota-new/0, 1, ... (in its order),
    # checking it as it streams (SHA1 of bytes and path, length, target path).
    server = Server(*args)
    stage = root + "/.ota-new/"
    i = 0
    with open(stage + "plan", "rb") as plan:
        while True:
            op = plan.readline()[:-1].decode().split(" ", 3)  # written by this client just now
            if op[0] == "d":
                continue
            if op[0] != "g":
                return
            if hasattr(gc, "mem_free"):  # MicroPython (CPython's collector is slow, and not needed here)
                gc.collect()  # each file's objects from the bottom of the heap: no holes among them
            path = op[3]
            size = int(op[2])
            status, length, target = server.get("/files/" + op[1])
            try:
                # A static host sends no X-Target-Path: the checksum covers the path anyway.
                if length != size or target is not None and target != path.encode():
                    raise OTAError("%s: expected %d B, the server sent %d B for %s" % (path, size, length, target))
                h = hashlib.sha1()
                with open(stage + str(i), "wb") as out:
                    left = size
                    while left:
                        chunk = server.read(left)
                        if not chunk:
                            raise OTAError("%s: connection closed after %d of %d B" % (path, size - left, size))
                        h.update(chunk)
                        out.write(chunk)
                        left -= len(chunk)
                h.update(path.encode())
                if binascii.hexlify(h.digest()).decode() != op[1]:
                    raise OTAError("%s: checksum mismatch, damaged in transfer" % path)
            finally:
                server.close()
            print("ota: %s %d B ok" % (path, size))
            i += 1
