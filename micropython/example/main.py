# main.py: blink the LED and say so; save a change and watch the board restart on it.
import time

try:
    from machine import Pin

    led = Pin(2, Pin.OUT)  # the blue LED of ESP8266 and most ESP32 boards
except Exception:  # a board without one: just print
    led = None

n = 0
while True:
    n += 1
    if led:
        led.value(n % 2)
    print("blink", n)
    time.sleep(1)
