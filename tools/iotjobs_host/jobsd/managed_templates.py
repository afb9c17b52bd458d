"""The AWS managed job templates jobsd offers (FLEET.md 5.2): ListManagedJobTemplates,
DescribeManagedJobTemplate and CreateJob with `jobTemplateArn` + `documentParameters`.

Every template is version 1.0 for environment LINUX. Its document is AWS IoT Device Client schema
1.0: one step whose action runs a handler script (`runHandler`; AWS-Run-Command: `runCommand`),
with `${aws:iot:parameter:KEY}` placeholders that CreateJob fills from `documentParameters`
(template_service.py). The documents, descriptions and parameter metadata are written here from
the documented facts: names, handlers, argument order, required and optional keys, the regexes
of downloadUrl, filePath, runAsUser and pathToHandler. Where AWS documents nothing (the regexes
of packages, services and command; the descriptions of AWS-Download-File, -Install-, -Start-
Application and -Run-Command) the text is ours [P].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

VERSION = "1.0"
ENVIRONMENTS = ("LINUX",)
PLACEHOLDER = "${aws:iot:parameter:%s}"


@dataclass(frozen=True)
class Parameter:
    key: str
    description: str
    regex: str
    example: str
    optional: bool

    def view(self) -> dict[str, Any]:
        """DocumentParameter (DescribeManagedJobTemplate)."""
        return {"key": self.key, "description": self.description, "regex": self.regex,
                "example": self.example, "optional": self.optional}


@dataclass(frozen=True)
class ManagedTemplate:
    name: str
    version: str
    description: str
    document: str                    # with ${aws:iot:parameter:KEY} placeholders
    parameters: tuple[Parameter, ...]
    environments: tuple[str, ...] = ENVIRONMENTS

    def arn(self, region: str) -> str:
        """Managed templates belong to no account: `arn:aws:iot:<region>::jobtemplate/N:V`."""
        return f"arn:aws:iot:{region}::jobtemplate/{self.name}:{self.version}"

    def summary(self, region: str) -> dict[str, Any]:
        """ManagedJobTemplateSummary (ListManagedJobTemplates)."""
        return {"templateArn": self.arn(region), "templateName": self.name,
                "description": self.description, "environments": list(self.environments),
                "templateVersion": self.version}

    def view(self, region: str) -> dict[str, Any]:
        """DescribeManagedJobTemplate."""
        return {"templateName": self.name, "templateArn": self.arn(region),
                "description": self.description, "templateVersion": self.version,
                "environments": list(self.environments),
                "documentParameters": [p.view() for p in self.parameters],
                "document": self.document}


_RUN_AS_USER = Parameter(
    "runAsUser", "Optional. The user the handler runs as on the device; empty: the user of the"
    " jobs agent.", "(.){0,256}", "root", True)
_PATH_TO_HANDLER = Parameter(
    "pathToHandler", "Optional. The folder of the handler script on the device; empty: the"
    " agent's default handler folder.", "(.){0,4096}", "/home/user/jobs/handlers", True)


def _handler_document(action: str, handler: str, args: list[str]) -> str:
    input_: dict[str, Any] = {"handler": handler}
    if args:
        input_["args"] = [PLACEHOLDER % a for a in args]
    input_["path"] = PLACEHOLDER % "pathToHandler"
    return json.dumps({"version": "1.0", "steps": [{"action": {
        "name": action, "type": "runHandler", "input": input_,
        "runAsUser": PLACEHOLDER % "runAsUser"}}]}, separators=(",", ":"))


def _handler_template(name: str, description: str, handler: str,
                      required: tuple[Parameter, ...] = ()) -> ManagedTemplate:
    action = name[len("AWS-"):]
    return ManagedTemplate(name, VERSION, description,
                           _handler_document(action, handler, [p.key for p in required]),
                           required + (_RUN_AS_USER, _PATH_TO_HANDLER))


def _packages(verb: str) -> Parameter:
    return Parameter("packages", f"Required. A space-separated list of the packages to {verb}.",
                     "(.*?)", "nano vim", False)


def _services(verb: str) -> Parameter:
    return Parameter("services", f"Required. A space-separated list of the system services to"
                     f" {verb}.", "(.*?)", "ssh cron", False)


CATALOG: tuple[ManagedTemplate, ...] = (
    _handler_template("AWS-Reboot", "A managed job template for rebooting the device.",
                      "reboot.sh"),
    _handler_template(
        "AWS-Download-File", "A managed job template for downloading a file.", "download-file.sh",
        (Parameter("downloadUrl", "Required. The URL of the file to download.", "(.*?)",
                   "https://example.com/file.txt", False),
         Parameter("filePath", "Required. Where on the device the file is written.", "(.*?)",
                   "path/to/file.txt", False))),
    _handler_template("AWS-Install-Application",
                      "A managed job template for installing one or more applications.",
                      "install-packages.sh", (_packages("install"),)),
    _handler_template("AWS-Remove-Application",
                      "A managed job template for uninstalling one or more applications.",
                      "remove-packages.sh", (_packages("uninstall"),)),
    _handler_template("AWS-Start-Application",
                      "A managed job template for starting one or more system services.",
                      "start-services.sh", (_services("start"),)),
    _handler_template("AWS-Stop-Application",
                      "A managed job template for stopping one or more system services.",
                      "stop-services.sh", (_services("stop"),)),
    _handler_template("AWS-Restart-Application",
                      "A managed job template for restarting one or more system services.",
                      "restart-services.sh", (_services("restart"),)),
    ManagedTemplate(
        "AWS-Run-Command", VERSION, "A managed job template for running a command.",
        json.dumps({"version": "1.0", "steps": [{"action": {
            "name": "Run-Command", "type": "runCommand",
            "input": {"command": PLACEHOLDER % "command"},
            "runAsUser": PLACEHOLDER % "runAsUser"}}]}, separators=(",", ":")),
        (Parameter("command", "Required. The command line to run: its arguments separated by"
                   " commas, a literal comma escaped as \\,.", "(.*?)", "ls,-l,/tmp", False),
         _RUN_AS_USER)),
)


def find(name: str, version: Optional[str] = None) -> Optional[ManagedTemplate]:
    """The template of that name and version (None: its default version); None when absent."""
    versions = [t for t in CATALOG if t.name == name]
    if version is None:
        return versions[-1] if versions else None  # the last listed is the default
    return next((t for t in versions if t.version == version), None)


def versions_of(name: Optional[str]) -> list[ManagedTemplate]:
    """Every template (None), or every version of one name, in catalog order."""
    return [t for t in CATALOG if name is None or t.name == name]
