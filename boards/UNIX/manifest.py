# The unix port as a board: what tools/devsim runs (firmware/platform.py is the unix twin,
# firmware/esp32sim.py the esp32.Partition twin). For a frozen unix build with mpbuild, the
# same conventions as the ESP32 boards (paths relative to this file).
include("$(PORT_DIR)/variants/manifest.py")
require("umqtt.simple")
package("iotjobs", base_path="../../lib")
module("app.py", base_path="../../firmware")
module("platform.py", base_path="../../firmware")
module("esp32sim.py", base_path="../../firmware")
