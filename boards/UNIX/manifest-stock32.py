# stock32: the unix port's standard variant plus what a stock ESP32 image freezes from
# micropython-lib (ports/esp32/boards/manifest.py of MicroPython v1.28.0, without the ESP32's own
# modules/ folder, which only runs on the chip). Nothing of ours: on this image our code is .mpy
# files on the filesystem, as on a stock board. tools/iotjobs_host/images.py builds it.
include("$(PORT_DIR)/variants/standard/manifest.py")
require("bundle-networking")
require("aioespnow")
require("dht")
require("ds18x20")
require("neopixel")
require("onewire")
require("umqtt.robust")
require("umqtt.simple")
require("upysh")
