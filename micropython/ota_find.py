# ota_find.py: find the server again when it moved (a new address, another port).
#
# Live mode (ota.py) and watch() (ota_update.py) import this after 15 s without
# the server, and drop it after: nothing of it stays in memory beside the app, and
# update() never imports it. It broadcasts `ota-promoter? <nonce>` over UDP; a
# server answers `ota-promoter! <url> <proof>`, the proof being the HMAC-SHA256 of
# `<nonce> <url>` keyed with its token (`-` without one). A board with a token takes
# only an answer it can check that way: a server without the token, or an answer
# replayed from another board's question, is refused. Runs on CPython too, for the tests.

import binascii
import hashlib
import os
import socket
import time

from ota import const, ticks_diff, ticks_ms

_WAIT = const(1500)  # ms the answers are waited for, after each question


def _hmac(key, message):
    # HMAC-SHA256 (RFC 2104) as hex bytes: MicroPython has no hmac module.
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key += bytes(64 - len(key))
    inner = hashlib.sha256(bytes(k ^ 0x36 for k in key))
    inner.update(message)
    outer = hashlib.sha256(bytes(k ^ 0x5C for k in key))
    outer.update(inner.digest())
    return binascii.hexlify(outer.digest())


def ask(token, to):
    """The url (http://host:port) of the first server that answers a broadcast to
    `to`, (address, port), and proves it holds token (any, without a token); None if
    none does within 1.5 s. A generator: it yields whenever it would wait."""
    nonce = binascii.hexlify(os.urandom(8))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        except AttributeError:  # MicroPython 1.20's lwip has no SO_BROADCAST (and needs none)
            pass
        s.sendto(b"ota-promoter? " + nonce, socket.getaddrinfo(to[0], to[1])[0][-1])
        began = ticks_ms()
        while ticks_diff(ticks_ms(), began) < _WAIT:
            try:
                words = s.recv(256).split(b" ")
            except OSError:  # none yet (EAGAIN)
                yield
                continue
            if len(words) == 3 and words[0] == b"ota-promoter!" and words[1][:7] == b"http://" and (
                    not token or words[2] == _hmac(token.encode(), nonce + b" " + words[1])):
                url = words[1].decode()
                print("ota: the server moved to %s" % url)
                return url
    finally:
        s.close()


def wait(token, to):
    """watch()'s ask(): the same, waiting where it yields."""
    look = ask(token, to)
    try:
        while True:
            next(look)
            time.sleep(0.01)
    except StopIteration as e:
        return e.value


def look(live):
    """Live mode's look (ota._Live, its state as ota_live.live sets it): back to the
    url it was given if it asks elsewhere (tried at the next retry); else on to the
    url of a server that answers ask(), without the given url's path: True then, as
    that one is tried at once."""
    url, root, token, to, given = live.args
    found = live.host == given[0]
    if not found:
        live.host, live.lines, live.head, url = given
    else:
        url = yield from ask(token, to)
        if not url:
            return False
        where = url[7:]
        i = where.rfind(":")
        live.host = where[:i], int(where[i + 1 :]), socket.AF_INET
        prefix = given[1][2].split(" ")[1][:-8]  # of "POST <prefix>/console HTTP/1.1"
        live.lines = tuple(line.replace(" %s/" % prefix, " /", 1) for line in given[1])
        live.head = "Host: %s\r\n%s" % (where, given[2][given[2].find("\n") + 1 :])
    live.args = url, root, token, to, given  # what restart() installs from
    live.address = None  # looked up at the next check
    if live.posts:  # begun again, on the new address (what is being sent is sent again)
        live.posts.close()
        live.posts = live._posts()
    return found
