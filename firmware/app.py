# Device wiring: read config.json, build journal, transport -> client -> runner with handlers,
# run.
#
# config.json (written by tools/devsim or tools/provision):
#   {"thing": "dev1", "host": "127.0.0.1", "port": 8883,
#    "tls": {"ca": "ca.der", "cert": "cert.der", "key": "key.der", "hostname": "localhost"},
#    "keepalive": 60, "client_id": "dev1",
#    "progress_min_ms": 5000, "step_timeout_min": null, "handler_timeout_s": 600,
#    "download": {"root": "data", "allow": ["https://my-bucket.s3.amazonaws.com/"], "ca": "..."},
#    "ota": {"pubkey": "certs/ota-pub.der", "allow": [...]},
#    "app": {"root": "app.d", "max_tries": 3, "allow": [...], "pubkey": ..., "settings": {...}},
#    "commands": true, "transfer": "mqtt", "stream": {"block": 0, "idle_ms": 10000, "tries": 8}}
# "app": false turns application updates off; pubkey and allow default to those of "ota".
# "transfer" is how OTA images, app bundles and downloads come when a job document offers both
# ways: "mqtt" (a stream over the jobs connection: one TLS session) or "http"; the default is
# the board's (board.json), else "mqtt". "stream" tunes iotjobs.stream (block 0: from the heap).
# "tls" absent means plain TCP (only for a local broker).
import json
import os
import time
import iotjobs_board as hw  # the board module: boards/esp32/ on an ESP32, firmware/ on unix

CONFIG = "config.json"


_RANK = {"error": 0, "warning": 1, "info": 2, "debug": 3}


class Logger:
    """log(msg[, level]): a line on the console when `level` is within `log.level` (the
    set-log-level command changes it until the next boot)."""

    level = "info"

    def __call__(self, msg, level="info"):
        if _RANK.get(level, 2) <= _RANK.get(self.level, 2):
            print("[%d] %s" % (time.ticks_ms(), msg))


log = Logger()


def load_config(path=CONFIG):
    with open(path) as f:
        cfg = json.load(f)
    for key in ("thing", "host", "port"):
        if key not in cfg:
            raise ValueError("config.json lacks %r" % key)
    return cfg


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def ssl_context(tls):
    """Mutual TLS that verifies the broker: DER files only (mbedTLS in MicroPython)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED  # the unix port defaults to CERT_NONE
    ctx.load_cert_chain(_read(tls["cert"]), _read(tls["key"]))
    ctx.load_verify_locations(cadata=_read(tls["ca"]))
    return ctx


def demo(ctx, doc):
    """The demonstration handler: `{"operation": "demo", "steps": 3, "step_ms": 0, "fail": "why"}`.

    Reports each step as IN_PROGRESS (after step_ms of "work"), then succeeds, or raises when
    `fail` is given. It has no side effects, so it is registered as idempotent: after a reset or
    a memory fault it simply runs again."""
    steps = doc.get("steps", 3)
    step_ms = doc.get("step_ms", 0)
    from iotjobs.runner import JobFailed

    if not isinstance(steps, int) or not 0 <= steps <= 100:
        raise JobFailed("BAD_ARGUMENT", "steps must be an integer 0..100")
    if not isinstance(step_ms, int) or not 0 <= step_ms <= 10000:
        raise JobFailed("BAD_ARGUMENT", "step_ms must be an integer 0..10000")
    for i in range(steps):
        if step_ms:
            hw.sleep_ms(step_ms)
        ctx.progress(True, step="%d/%d" % (i + 1, steps))
    if doc.get("fail"):
        raise RuntimeError(doc["fail"])
    return {"steps": str(steps)}


_Lazy = None


def _lazy(module, cls, **kw):
    """A handler whose module is imported on its first job: rarely used code costs no heap
    until it is needed. One class for all of them (a class per handler costs heap too)."""
    global _Lazy
    if _Lazy is None:
        from iotjobs.runner import Handler

        class Lazy(Handler):
            real = None

            def __init__(self, module, cls, kw):
                self.module = module
                self.cls = cls
                self.kw = kw

            def _get(self):
                if self.real is None:
                    m = __import__(self.module, None, None, [self.cls])
                    self.real = getattr(m, self.cls)(**self.kw)
                    self.idempotent = self.real.idempotent
                    del self.kw  # needed once: its memory goes back
                return self.real

            def run(self, ctx, doc):
                return self._get().run(ctx, doc)

            def resume(self, ctx, doc, cp):
                return self._get().resume(ctx, doc, cp)

            def abort(self, ctx):
                return self._get().abort(ctx)

        _Lazy = Lazy
    return _Lazy(module, cls, kw)


def transfer(cfg):
    """"mqtt" or "http": config.json's "transfer", else the board's default, else "mqtt" (an
    ESP32 without PSRAM holds one TLS session, not two)."""
    t = cfg.get("transfer")
    if t not in ("mqtt", "http"):
        board = getattr(hw, "board", None)
        t = board().get("transfer") if board is not None else None
    return t if t in ("mqtt", "http") else "mqtt"


def download_context(cfg):
    """An SSLContext that verifies download servers with the configured CA (or None)."""
    ca = (cfg.get("download") or {}).get("ca") or (cfg.get("tls") or {}).get("ca")
    if not ca:
        return None
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=_read(ca))
    return ctx


def halt_hook(point):
    """Test aid: stop dead at a named point once (devsim's test kills the process there);
    `name#k` stops at the k-th time the point is passed in a boot."""
    if not point:
        return None
    name, _, nth = point.partition("#")
    nth = int(nth) if nth else 1
    seen = [0]

    def on_point(at):
        if at != name:
            return
        seen[0] += 1
        if seen[0] != nth:
            return
        marker = "halted." + point.replace("#", "-")
        try:
            os.stat(marker)
            return  # halted here before: this boot goes on
        except OSError:
            pass
        with open(marker, "w") as f:
            f.write("1")
        print("@@HALT " + point)
        while True:
            time.sleep(1)

    return on_point


# LED pattern to show from a named point of the runner on.
_LED_AT = {"journaled": "job", "outbox-cleared": "online"}


def ticking(hook):
    """on_point for the runner: every named point (an OTA download passes one per block) also
    feeds the watchdog and drives the LED; `hook` is the test aid halt_hook, or None."""

    def on_point(at):
        hw.tick()
        pattern = _LED_AT.get(at)
        if pattern:
            hw.led(pattern)
        if hook is not None:
            hook(at)

    return on_point


def build(cfg):
    # The TLS context first, while the heap is still in one piece (it wants a 3 KB block);
    # the library's code comes after it.
    tls = cfg.get("tls")
    ctx = ssl_context(tls) if tls else None
    import gc

    gc.collect()
    from iotjobs.transport import Transport

    synced = [not tls]  # TLS checks certificate dates: the clock must be set first

    class Fed(Transport):
        """The runner's loop waits here: feed the watchdog and drive the LED at least every
        250 ms; set the clock (NTP) before the first TLS handshake."""

        def wait(self, timeout_ms):
            while True:
                hw.tick()
                n = timeout_ms if timeout_ms < 250 else 250
                op = Transport.wait(self, n)
                timeout_ms -= n
                if op is not None or timeout_ms <= 0:
                    return op

        def try_reconnect(self):
            hw.led("connecting")
            if not synced[0]:
                synced[0] = hw.sync_time(log)
            Transport.try_reconnect(self)
            hw.led("online")

    gc.collect()
    from iotjobs.client import JobsClient
    from iotjobs.journal import Journal

    gc.collect()
    from iotjobs.runner import Runner, FunctionHandler

    gc.collect()

    transport = Fed(
        cfg.get("client_id", cfg["thing"]),
        cfg["host"],
        cfg["port"],
        ssl=ctx,
        server_hostname=(tls or {}).get("hostname"),
        keepalive=cfg.get("keepalive", 60),
        log=log,
    )
    client = JobsClient(transport, cfg["thing"], log=log)
    dl = cfg.get("download") or {}
    ota = cfg.get("ota") or {}
    app = app_config(cfg)
    way = transfer(cfg)
    sopts = cfg.get("stream") if isinstance(cfg.get("stream"), dict) else None
    ota_kw = {"board": hw, "pubkey": _read(ota["pubkey"]) if ota.get("pubkey") else None,
              "allow": ota.get("allow", dl.get("allow", ())),
              "ssl_context": lambda: download_context(cfg), "transfer": way, "stream": sopts}
    ota_handler = _lazy("iotjobs.ota", "Ota", **ota_kw)
    handlers = {
        "ota": ota_handler,
        "afr_ota": ota_handler,  # one handler (one buffer) for both document forms
        "demo": FunctionHandler(demo, True),  # no side effects: safe to run again
        "reboot": _lazy("iotjobs.reboot", "Reboot"),
        "download-file": _lazy("iotjobs.download", "Download", root=dl.get("root", "data"),
                               allow=dl.get("allow", ()),
                               ssl_context=lambda: download_context(cfg), transfer=way,
                               stream=sopts),
    }
    state = None
    if app is not None:
        root = app.get("root", "app.d")

        def app_state():
            from iotjobs.appstate import AppState

            return AppState(root, log, app.get("max_tries", 3))

        try:
            os.stat(root + "/state.json")
            state = app_state()  # an application is installed
        except OSError:
            pass  # none yet: the code that starts one costs no heap until an update comes
        pub = app.get("pubkey") or ota.get("pubkey")
        handlers["app-update"] = _lazy("iotjobs.app", "AppUpdate",
                                       state=lambda: state or app_state(),
                                       pubkey=_read(pub) if pub else None,
                                       allow=app.get("allow", ota.get("allow", dl.get("allow", ()))),
                                       ssl_context=lambda: download_context(cfg),
                                       transfer=way, stream=sopts)
    if cfg.get("test_handlers"):
        import testhandlers

        handlers["effect"] = testhandlers.Effect()
        handlers["rerun"] = testhandlers.Rerun()
    runner = Runner(
        client,
        Journal("journal.json", log),
        handlers,
        log=log,
        reset=hw.reset,
        progress_min_ms=cfg.get("progress_min_ms", 5000),
        step_timeout_min=cfg.get("step_timeout_min"),
        handler_timeout_s=cfg.get("handler_timeout_s", 600),
        sleep_ms=hw.sleep_ms,  # feeds the watchdog through long reconnect backoffs
        on_point=ticking(halt_hook(cfg.get("halt_at"))),
    )
    runner.app = state
    if cfg.get("commands", True) is not False:
        runner.commands = commands(runner, client, cfg)
    return runner


def _builtin(name, *extra):
    """A built-in command handler of iotjobs.cmdbuiltin, imported on its first use."""

    def handler(ctx, args):
        from iotjobs import cmdbuiltin

        return getattr(cmdbuiltin, name)(ctx, args, *extra)

    return handler


def commands(runner, client, cfg):
    """AWS IoT commands (iotjobs.commands) with the built-in handlers: ping, reboot,
    get-config (no secrets), set-log-level."""
    from iotjobs import commands as C
    from iotjobs.journal import Journal

    c = C.Commands(client, Journal("commands.json", log), runner.journal, log=log,
                   reset=hw.reset, on_point=runner.on_point)
    c.register("ping", _builtin("ping"))
    c.register("reboot", _builtin("reboot"))
    c.register("get-config", _builtin("get_config", cfg))
    c.register("set-log-level", _builtin("set_log_level", log))
    if cfg.get("test_handlers"):
        import testhandlers

        c.register("effect", testhandlers.command_effect)
    return c


def app_config(cfg):
    app = cfg.get("app", {})
    return None if app is False else (app if isinstance(app, dict) else {})


def start_app(runner, cfg):
    """Start the installed application, if there is one (iotjobs.appstate)."""
    if runner.app is not None:
        runner.app.launch(runner, (app_config(cfg) or {}).get("settings") or {}, hw.reset)


def main():
    cfg = load_config()
    log("iotjobs on %s, thing %s" % (hw.NAME, cfg["thing"]))
    hw.led("boot")
    hw.init_watchdog()  # cannot be stopped: from here on every wait and sleep feeds it
    if not hw.connect_network(cfg, log):
        log("no network yet: the station keeps trying, the runner waits for the broker",
            "warning")
    runner = build(cfg)
    selftest(runner, cfg)
    start_app(runner, cfg)
    runner.run()


def selftest(runner, cfg):
    """A new firmware image confirms itself once it has reached the broker and the jobs service
    (the first answer to a request); one that fails its self-test resets at once, and the
    bootloader returns to the previous image. Before the confirmation no reset may happen."""
    if not hw.ota_pending():
        return
    st = hw.ota_state()
    if not st or not st.get("pending"):
        return
    log("firmware %s is on trial (slot %s)" % (st.get("version"), st.get("slot")))
    if (st.get("flags") or {}).get("selftest") == "fail":
        log("self-test failed: back to the previous image")
        hw.reset()

    def confirm():
        hw.partition_class().mark_app_valid_cancel_rollback()
        log("self-test passed: firmware %s confirmed" % st.get("version"))

    runner.on_online = confirm
