# The built-in command handlers (iotjobs.commands): ping, reboot, get-config, set-log-level.
# Imported on the first command that needs one, so a device pays no heap for them until then.
import time
from .commands import CommandRejected


def ping(ctx, args):
    """Uptime, free heap, boot counter: is the device alive and how is it doing."""
    import gc

    gc.collect()
    return {"pong": True, "uptime_ms": str(time.ticks_ms()), "heap_free": str(gc.mem_free()),
            "heap_alloc": str(gc.mem_alloc()), "boot": str(ctx.boot)}


def reboot(ctx, args):
    """Reset the device; SUCCEEDED {"rebooted": true} after the boot."""
    ctx.request_reboot()


_SECRET = ("key", "cert", "secret", "password", "passwd", "token", "psk", "tls", "pubkey")


def _secret(name):
    n = name.lower()
    for s in _SECRET:
        if s in n:
            return True
    return False


def _scrub(v):
    if isinstance(v, dict):
        return {k: _scrub(x) for k, x in v.items() if not _secret(k)}
    return v


def get_config(ctx, args, config):
    """The device configuration without its secrets (TLS material, keys, passwords, tokens:
    any key whose name says so, at any depth); `keys` selects entries."""
    keys = args.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise CommandRejected("BAD_ARGUMENT", "keys must be a list of names")
    out = {}
    for k, v in config.items():
        if _secret(k) or (keys is not None and k not in keys):
            continue
        out[k] = _scrub(v)
    return out


LEVELS = ("error", "warning", "info", "debug")


def set_log_level(ctx, args, logger):
    """Set `logger.level` to one of LEVELS (kept until the next boot)."""
    level = args.get("level")
    if level not in LEVELS:
        raise CommandRejected("BAD_ARGUMENT", "level must be one of %s" % ", ".join(LEVELS))
    before = logger.level
    logger.level = level
    return {"level": level, "previous": before}
