"""Job templates: custom ones (CreateJobTemplate ...) and the AWS managed catalog, and
CreateJob from a template with `documentParameters` substitution (FLEET.md 5)."""
from __future__ import annotations

from typing import Any, Optional


class TemplatesApi:
    def _resolve_template(self, body: dict[str, Any]) -> tuple[dict[str, Any], Optional[str]]:
        """CreateJob's body with the template's document and configs filled in where the body
        has none, and the document before substitution (None without a managed template)."""
        return body, None


def add_routes(router: Any, service: Any) -> None:
    """The control-plane operations of this part (control.py calls it)."""
