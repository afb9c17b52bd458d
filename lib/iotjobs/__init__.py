# iotjobs: a small AWS IoT Jobs runner for MicroPython. Layers, bottom to top:
# topics, codec (pure) -> transport (MQTT) -> client (Jobs API) -> runner (job state machine).
VERSION = "0.1.0"
