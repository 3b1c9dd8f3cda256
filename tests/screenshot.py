"""The README's screenshot of the status page: .venv/bin/python tests/screenshot.py [OUT]

Writes OUT, by default tests/status-page.png (the picture the README shows). A
real server on a small project, three boards played by HTTP requests from three
loopback addresses, and headless Chromium (as in tests/test_page.py): selenium
from requirements-dev.txt, and Debian's chromium and chromium-driver.
"""

import http.client
import logging
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import ota_promoter  # noqa: E402

# The server's log is not shown: it would report lib/wifi.py, held back on purpose.
ota_promoter.log.addHandler(logging.NullHandler())
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


def board(server, address, device, version, method="GET", path="/files/version", body=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10,
                                      source_address=(address, 0))
    conn.request(method, path, body=body, headers={"X-OTA-Device": device, "X-OTA-Version": version})
    conn.getresponse().read()
    conn.close()


def missing():
    """What this needs and the system lacks, as one line; None if nothing."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return ("needs Chromium and its driver (Debian: apt-get install chromium chromium-driver; "
                "or set $CHROMIUM and $CHROMEDRIVER)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium: run it with .venv/bin/python, after .venv/bin/pip install -r requirements-dev.txt"
    return None


def main(out):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory() as work:
        app = os.path.join(work, "app")
        os.makedirs(os.path.join(app, "lib"))
        files = {"boot.py": "import ota\nota.update('http://192.168.0.10:9090')\n",
                 "main.py": "import sensor\nprint('reading', sensor.read())\n",
                 "lib/sensor.py": "def read():\n    return 21.5\n" * 20,
                 "config.json": '{"interval": 5}\n'}
        for path, text in files.items():
            with open(os.path.join(app, path), "w") as f:
                f.write(text)
        promoter = ota_promoter.Promoter(app, interval=3600, check=ota_promoter.SourceCheck())
        server = promoter.serve("127.0.0.1", 0).start()
        try:
            old = promoter.version
            board(server, "127.0.0.23", "a4cf12f3e9b1", old)
            board(server, "127.0.0.23", "a4cf12f3e9b1", old, "POST", "/console",
                  b"reading 21.5\nTraceback (most recent call last):\n"
                  b'  File "main.py", line 2, in <module>\nZeroDivisionError: divide by zero\n')
            with open(os.path.join(app, "main.py"), "a") as f:
                f.write("print('ready')\n")
            with open(os.path.join(app, "lib", "display.py"), "w") as f:
                f.write("def show(text):\n    print(text)\n")
            with open(os.path.join(app, "lib", "wifi.py"), "w") as f:
                f.write("def connect(:\n")  # does not compile: held back
            time.sleep(0.3)
            promoter.poll_once()
            time.sleep(0.2)
            promoter.poll_once()
            new = promoter.version
            board(server, "127.0.0.31", "30aea4071c58", new)
            board(server, "127.0.0.31", "30aea4071c58", new, "POST", "/console",
                  b"ota: version %s installed, 2 changes\nreading 21.5\nready\n" % new[:7].encode())
            board(server, "127.0.0.42", "84f3eb5a0d17", old)
            board(server, "127.0.0.42", "84f3eb5a0d17", old, path="/files?format=text")
            board(server, "127.0.0.42", "84f3eb5a0d17", old, "POST", "/console", b"ota: main.py 82 B ok\n")

            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--hide-scrollbars", "--window-size=1180,900", "--user-data-dir=" + os.path.join(work, "c")):
                options.add_argument(flag)
            driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
            try:
                driver.get(server.url + "/")
                deadline = time.monotonic() + 10
                while driver.execute_script("return document.querySelectorAll('.board').length") != 3:
                    assert time.monotonic() < deadline, "the page never showed the three boards"
                    time.sleep(0.05)
                time.sleep(1.2)  # the "s ago" texts tick once
                height = driver.execute_script("return document.body.scrollHeight")
                driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                    "width": 1180, "height": height, "deviceScaleFactor": 1, "mobile": False})
                driver.save_screenshot(out)
            finally:
                driver.quit()
        finally:
            server.close()
    print("%s: %d bytes" % (out, os.path.getsize(out)))


if __name__ == "__main__":
    problem = missing()
    if problem:
        sys.exit("screenshot.py: " + problem)
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "status-page.png"))
