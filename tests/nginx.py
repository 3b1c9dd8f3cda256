"""A real nginx for the tests and the benchmark: the README's server block, in tmp."""

import os
import re
import shutil
import socket
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
MISSING = "nginx is not installed: apt-get install nginx (CI's .ci/run does)"


def server_block():
    """The nginx server block of the README's Fleets section, as a user copies it."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"```nginx\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "the README must hold exactly one nginx block"
    return blocks[0]


def configure(block, site, port, token=None, certificate=None, headers=()):
    """The README's block with this test's root, port and, if given, token, TLS and
    (name, value) header lines added to every answer, as a CDN adds its own."""
    assert "    listen 80;\n" in block and "    root /srv/ota/site;\n" in block
    listen = "    listen 127.0.0.1:%d;\n" % port
    if certificate is not None:
        listen = "    listen 127.0.0.1:%d ssl;\n    ssl_certificate %s;\n    ssl_certificate_key %s;\n" % (
            port, certificate[0], certificate[1])
    block = block.replace("    listen 80;\n", listen)
    block = block.replace("    root /srv/ota/site;\n", "    root %s;\n" % site)
    for name, value in headers:
        # A location's own add_header hides the server block's: each gets the line.
        line = 'add_header %s "%s" always;\n' % (name, value)
        block = re.sub(r"\n( +)(add_header Cache-Control [^\n]*\n)", lambda m: "\n%s%s%s%s" % (
            m.group(1), m.group(2), m.group(1), line), block)
        block = block.replace("    server_tokens off;\n", "    server_tokens off;\n    " + line)
    if token is not None:
        line = '    # if ($http_authorization != "Bearer SECRET") { return 401; }\n'
        assert line in block
        block = block.replace(line, '    if ($http_authorization != "Bearer %s") { return 401; }\n' % token)
    return block


def free_port():
    # nginx is given its port in its configuration: it cannot take port 0 and say which.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx in the foreground, one process, with its config, pid, logs and temp in work."""

    def __init__(self, work, site, token=None, certificate=None, timeout=10, headers=()):
        self.work = work
        os.makedirs(os.path.join(work, "temp"), exist_ok=True)
        self.port = free_port()
        temp = os.path.join(work, "temp")
        config = (
            "daemon off;\nmaster_process off;\nworker_processes 1;\n"
            "pid {work}/nginx.pid;\nerror_log {work}/error.log;\n"
            "events {{ worker_connections 64; }}\n"
            "http {{\n"
            "access_log {work}/access.log;\n"
            "client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy;\n"
            "fastcgi_temp_path {temp}/fastcgi; uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;\n"
            # Debian's nginx.conf includes /etc/nginx/mime.types; these are the types an export uses.
            "types {{ text/plain txt; application/json json; }}\n"
            "default_type application/octet-stream;\n"
            "{server}}}\n"
        ).format(work=work, temp=temp, server=configure(server_block(), site, self.port, token, certificate, headers))
        self.config = os.path.join(work, "nginx.conf")
        with open(self.config, "w") as f:
            f.write(config)
        self.scheme = "https" if certificate else "http"
        self.url = "%s://127.0.0.1:%d" % (self.scheme, self.port)
        self.process = subprocess.Popen(
            [NGINX, "-p", work, "-e", os.path.join(work, "error.log"), "-c", self.config],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=timeout).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("nginx did not start: %s" % self.error_log())
                time.sleep(0.02)

    def error_log(self):
        try:
            with open(os.path.join(self.work, "error.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def stop(self, timeout=10):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process.stderr.close()
