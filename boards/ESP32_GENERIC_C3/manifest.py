# Freezes the job runner into a custom MicroPython image (micropython's manifest conventions:
# paths are relative to this file). Build with mpbuild from a micropython checkout, see
# boards/README.md:  FROZEN_MANIFEST=<this file>
include("$(PORT_DIR)/boards/manifest.py")  # what the stock image freezes (asyncio, ...)
# umqtt.simple (and ssl) come with the stock manifest: freezing them again is refused by
# make build (tools/iotjobs_host/images.freeze_board).
package("iotjobs", base_path="../../lib")  # the library, frozen: its code costs no heap
module("app.py", base_path="../../firmware")  # the device wiring
module("iotjobs_board.py", base_path="../esp32")  # the ESP32 board module (not the unix twin)
# main.py stays on the filesystem (tools/deploy copies it with config.json and board.json).
