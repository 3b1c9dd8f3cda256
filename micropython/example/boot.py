# boot.py: join the WiFi, install what changed, then arm live mode.
# Copy it to the board once, with the client (the README's quick start), and
# write secrets.py next to it (secrets.py.example shows what goes in it).
import network
import time

import ota
import secrets

wlan = network.WLAN(network.STA_IF)
wlan.active(True)
if not wlan.isconnected():
    wlan.connect(secrets.WIFI_SSID, secrets.WIFI_PASSWORD)
    for _ in range(100):  # 10 s at most: without WiFi the board runs what it has
        if wlan.isconnected():
            break
        time.sleep_ms(100)

token = getattr(secrets, "TOKEN", None)  # if the server runs with --token
try:
    ota.update(secrets.SERVER, token=token)  # installs what changed; resets if anything did
except ota.OTAError as e:
    print("no update:", e)
ota.live(secrets.SERVER, token=token)  # returns at once: main.py runs, and each save restarts it
