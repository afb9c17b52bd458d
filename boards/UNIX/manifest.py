# The unix port as a board: what tools/devsim runs (firmware/iotjobs_board.py is the unix twin,
# firmware/esp32sim.py the esp32.Partition twin). For a frozen unix build with mpbuild, the
# same conventions as the ESP32 boards (paths relative to this file).
include("$(PORT_DIR)/variants/manifest.py")
require("umqtt.simple")
package("iotjobs", base_path="../../lib")
module("app.py", base_path="../../firmware")
module("iotjobs_board.py", base_path="../../firmware")
module("esp32sim.py", base_path="../../firmware")
