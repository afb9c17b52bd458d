# Handlers used by the system tests (config "test_handlers": true); not loaded otherwise.
from iotjobs.runner import Handler


class Effect(Handler):
    """Test handler with one side effect that must happen exactly once: it appends the job id
    to effects.log. Checkpoints around the effect, and a resume that looks before it leaps."""

    LOG = "effects.log"

    def _done(self, job_id):
        try:
            with open(self.LOG) as f:
                return (job_id + "\n") in f.read()
        except OSError:
            return False

    def _effect(self, ctx):
        ctx.point("handler-before-effect")
        with open(self.LOG, "a") as f:
            f.write(ctx.id + "\n")
        ctx.point("handler-after-effect")
        ctx.checkpoint({"phase": "done"})
        ctx.point("handler-checkpointed")
        return {"effects": "1"}

    def run(self, ctx, doc):
        ctx.checkpoint({"phase": "effect"})
        return self._effect(ctx)

    def resume(self, ctx, doc, checkpoint):
        if checkpoint is None:
            return self.run(ctx, doc)
        if checkpoint.get("phase") == "done" or self._done(ctx.id):
            ctx.checkpoint({"phase": "done"})
            return {"effects": "1", "resumed": "yes"}
        return self._effect(ctx)


class Rerun(Effect):
    """The same effect from a handler that declares itself idempotent: simply run again."""

    idempotent = True

    def run(self, ctx, doc):
        ctx.point("handler-before-effect")
        with open(self.LOG, "a") as f:
            f.write(ctx.id + "\n")
        ctx.point("handler-after-effect")
        return {"effects": "1"}


def command_effect(ctx, args):
    """Command handler with one side effect that must never happen twice: appends the
    execution id to command-effects.log, between two named points."""
    ctx.commands.point("command-before-effect")
    with open("command-effects.log", "a") as f:
        f.write(ctx.id + "\n")
    ctx.commands.point("command-after-effect")
    return {"effects": "1"}
