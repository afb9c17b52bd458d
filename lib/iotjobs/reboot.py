# The reboot handler: native `{"operation": "reboot"}` and the AWS-Reboot template
# (`reboot.sh`). Journals the boot counter, reports IN_PROGRESS, resets; after the boot the
# runner resumes it and a higher boot counter proves the reset happened: SUCCEEDED. A reset
# that never comes (the runner is still running after the grace period) ends FAILED.
from .runner import Handler, JobFailed


class Reboot(Handler):
    def run(self, ctx, doc):
        ctx.checkpoint({"boot": ctx.boot})
        ctx.progress(True, step="rebooting")
        ctx.request_reboot()

    def resume(self, ctx, doc, checkpoint):
        before = checkpoint.get("boot") if isinstance(checkpoint, dict) else None
        if not isinstance(before, int):
            return self.run(ctx, doc)  # cut before the intent was journaled: do it now
        if ctx.boot > before:
            return {"rebooted": "yes", "boot": str(ctx.boot)}
        raise JobFailed("NOT_REBOOTED", "the boot counter did not change")
