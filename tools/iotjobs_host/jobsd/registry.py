"""The thing registry: things and thing groups, and what group membership does to jobs.

A job's thing-group targets cover the group's things and those of its descendants. SNAPSHOT
resolves them at creation. A CONTINUOUS job also queues an execution for a thing added later
(if it has none of the job yet, or its latest was REMOVED), and a thing that leaves the groups
so that it is no longer a target gets its QUEUED execution REMOVED. A CONTINUOUS job stays
IN_PROGRESS when all its executions are terminal (as AWS).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Optional

from . import views
from .rules import MAX_DESCRIPTION, ApiError, valid_thing_name
from .store import Thing, ThingGroup
from .core import (MAX_GROUP_DEPTH, MAX_GROUPS_PER_THING, _Tracker, _attributes, _invalid,
                   _not_found, _page)

log = logging.getLogger("jobsd.service")


class RegistryApi:
    def create_thing(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if not valid_thing_name(name):
            raise _invalid("thingName must match [a-zA-Z0-9:_-]{1,128}")
        attributes = _attributes(body.get("attributePayload"))
        thing_type = body.get("thingTypeName")
        if thing_type is not None and not isinstance(thing_type, str):
            raise _invalid("thingTypeName must be a string")

        def op(_: _Tracker, now: int) -> dict[str, Any]:
            existing = self._store.get_thing(name)
            if existing is not None:
                if existing.attributes == attributes and existing.thing_type == thing_type:
                    thing = existing  # CreateThing is idempotent for an identical request
                else:
                    raise ApiError("ResourceAlreadyExistsException", 409,
                                   f"Thing {name} already exists with different attributes",
                                   resourceId=existing.thing_id, resourceArn=self.thing_arn(name))
            else:
                thing = Thing(name, str(uuid.uuid4()), dict(attributes), thing_type, 1, now)
                self._store.insert_thing(thing)
            return {"thingName": name, "thingArn": self.thing_arn(name), "thingId": thing.thing_id}
        return self._run(op)

    def describe_thing(self, name: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            thing = self._store.get_thing(name)
            if thing is None:
                raise _not_found(f"Thing {name} cannot be found.")
            return views.thing_view(thing, self.thing_arn(name))
        return self._run(op)

    def list_things(self, max_results: Optional[int], token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            rows = [{"thingName": t.name, "thingArn": self.thing_arn(t.name),
                     "attributes": t.attributes, "version": t.version}
                    for t in self._store.list_things()]
            return _page(rows, "things", max_results, token)
        return self._run(op)

    # -- control plane: thing groups -----------------------------------------------------------
    def _group_or_404(self, name: str) -> ThingGroup:
        group = self._store.get_group(name)
        if group is None:
            raise _not_found(f"Thing group {name} cannot be found.")
        return group

    def _ancestors(self, name: str) -> list[str]:
        """Parent, grandparent, ... of a group (nearest first)."""
        out: list[str] = []
        group = self._store.get_group(name)
        while group is not None and group.parent is not None and group.parent not in out:
            out.append(group.parent)
            group = self._store.get_group(group.parent)
        return out

    def _subtree(self, name: str) -> list[str]:
        """The group and all its descendants, breadth first."""
        out, i = [name], 0
        while i < len(out):
            out.extend(c for c in self._store.child_groups(out[i]) if c not in out)
            i += 1
        return out

    def _group_things(self, name: str, recursive: bool = True) -> list[str]:
        groups = self._subtree(name) if recursive else [name]
        return list(dict.fromkeys(t for g in groups for t in self._store.members(g)))

    def _is_target(self, job_id: str, thing: str) -> bool:
        """Whether the thing is (still) a target of the job, directly or through a group."""
        job = self._store.get_job(job_id)
        if job is None:
            return False
        if self.thing_arn(thing) in job.targets:
            return True
        targeted = set(self._store.job_groups(job_id))
        return any(g in targeted or targeted.intersection(self._ancestors(g))
                   for g in self._store.groups_of_thing(thing))

    def _group_from(self, body: dict[str, Any]) -> str:
        """The group named by `thingGroupName` or `thingGroupArn` (AddThingToThingGroup)."""
        name, arn = body.get("thingGroupName"), body.get("thingGroupArn")
        if arn is not None:
            prefix = self.group_arn("")
            if not isinstance(arn, str) or not arn.startswith(prefix):
                raise _invalid(f"thingGroupArn must look like {prefix}<name>")
            if name is not None and name != arn[len(prefix):]:
                raise _invalid("thingGroupName and thingGroupArn name different groups")
            name = arn[len(prefix):]
        if not isinstance(name, str) or not valid_thing_name(name):
            raise _invalid("thingGroupName or thingGroupArn is required")
        return name

    def _thing_from(self, body: dict[str, Any]) -> str:
        name, arn = body.get("thingName"), body.get("thingArn")
        if arn is not None:
            prefix = self.thing_arn("")
            if not isinstance(arn, str) or not arn.startswith(prefix):
                raise _invalid(f"thingArn must look like {prefix}<name>")
            if name is not None and name != arn[len(prefix):]:
                raise _invalid("thingName and thingArn name different things")
            name = arn[len(prefix):]
        if not isinstance(name, str) or not valid_thing_name(name):
            raise _invalid("thingName or thingArn is required")
        return name

    def create_thing_group(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if not valid_thing_name(name):
            raise _invalid("thingGroupName must match [a-zA-Z0-9:_-]{1,128}")
        parent = body.get("parentGroupName")
        if parent is not None and (not isinstance(parent, str) or not valid_thing_name(parent)):
            raise _invalid("parentGroupName must match [a-zA-Z0-9:_-]{1,128}")
        props = body.get("thingGroupProperties") or {}
        if not isinstance(props, dict):
            raise _invalid("thingGroupProperties must be an object")
        description = props.get("thingGroupDescription")
        if description is not None and (not isinstance(description, str)
                                        or len(description) > MAX_DESCRIPTION):
            raise _invalid(f"thingGroupDescription must be at most {MAX_DESCRIPTION} characters")
        attributes = _attributes(props.get("attributePayload"))

        def op(_: _Tracker, now: int) -> dict[str, Any]:
            existing = self._store.get_group(name)
            if existing is not None:
                if (existing.parent, existing.description, existing.attributes) != (
                        parent, description, attributes):
                    raise ApiError("ResourceAlreadyExistsException", 409,
                                   f"Thing group {name} already exists with different"
                                   " properties", resourceId=existing.group_id,
                                   resourceArn=self.group_arn(name))
                group = existing  # idempotent for an identical request
            else:
                if parent is not None:
                    if self._store.get_group(parent) is None:
                        raise _invalid(f"Parent thing group {parent} does not exist.")
                    if len(self._ancestors(parent)) + 2 > MAX_GROUP_DEPTH:
                        raise _invalid(f"A thing-group hierarchy is at most {MAX_GROUP_DEPTH}"
                                       " levels deep.")
                group = ThingGroup(name, str(uuid.uuid4()), parent, description,
                                   dict(attributes), 1, now)
                self._store.insert_group(group)
            return {"thingGroupName": name, "thingGroupArn": self.group_arn(name),
                    "thingGroupId": group.group_id}
        return self._run(op)

    def describe_thing_group(self, name: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            group = self._group_or_404(name)
            chain = list(reversed(self._ancestors(name)))  # root first
            return views.group_view(group, self.group_arn(name),
                                    [(g, self.group_arn(g)) for g in chain])
        return self._run(op)

    def delete_thing_group(self, name: str, expected_version: Optional[int]) -> None:
        def op(tracker: _Tracker, now: int) -> None:
            group = self._store.get_group(name)
            if group is None:
                return  # DeleteThingGroup is idempotent
            if expected_version is not None and expected_version != group.version:
                raise ApiError("VersionConflictException", 409,
                               f"expectedVersion {expected_version} does not match"
                               f" {group.version}.")
            if self._store.child_groups(name):
                raise _invalid(f"Thing group {name} has child groups; delete them first.")
            for thing in self._store.members(name):
                self._leave_group(name, thing, tracker, now)
            self._store.delete_group(name)
        self._run(op)

    def list_thing_groups(self, parent: Optional[str], prefix: Optional[str],
                          recursive: bool, max_results: Optional[int],
                          token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            groups = self._store.list_groups()
            if parent is not None:
                self._group_or_404(parent)
                allowed = set(self._subtree(parent)[1:]) if recursive else {
                    g.name for g in groups if g.parent == parent}
                groups = [g for g in groups if g.name in allowed]
            elif not recursive:
                groups = [g for g in groups if g.parent is None]
            if prefix is not None:
                groups = [g for g in groups if g.name.startswith(prefix)]
            rows = [{"groupName": g.name, "groupArn": self.group_arn(g.name)} for g in groups]
            return _page(rows, "thingGroups", max_results, token)
        return self._run(op)

    def list_thing_groups_for_thing(self, thing: str, max_results: Optional[int],
                                    token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            if self._store.get_thing(thing) is None:
                raise _not_found(f"Thing {thing} cannot be found.")
            rows = [{"groupName": g, "groupArn": self.group_arn(g)}
                    for g in self._store.groups_of_thing(thing)]
            return _page(rows, "thingGroups", max_results, token)
        return self._run(op)

    def add_thing_to_thing_group(self, body: dict[str, Any]) -> None:
        group_name, thing = self._group_from(body), self._thing_from(body)

        def op(tracker: _Tracker, now: int) -> None:
            self._group_or_404(group_name)
            if self._store.get_thing(thing) is None:
                raise _not_found(f"Thing {thing} cannot be found.")
            if self._store.is_member(group_name, thing):
                return
            if len(self._store.groups_of_thing(thing)) >= MAX_GROUPS_PER_THING:
                raise _invalid(f"Thing {thing} already belongs to {MAX_GROUPS_PER_THING}"
                               " thing groups.")
            self._store.add_member(group_name, thing)
            groups = [group_name, *self._ancestors(group_name)]
            for job_id in self._store.jobs_targeting_groups(groups):
                latest = self._store.get_execution(job_id, thing)
                if latest is not None and latest.status != "REMOVED":
                    continue  # one execution per thing; a REMOVED one is queued afresh
                self._late_joiner(job_id, thing, latest, now, tracker)  # campaign.py
        self._run(op)

    def remove_thing_from_thing_group(self, body: dict[str, Any]) -> None:
        group_name, thing = self._group_from(body), self._thing_from(body)

        def op(tracker: _Tracker, now: int) -> None:
            self._group_or_404(group_name)
            if self._store.get_thing(thing) is None:
                raise _not_found(f"Thing {thing} cannot be found.")
            self._leave_group(group_name, thing, tracker, now)
        self._run(op)

    def _leave_group(self, group_name: str, thing: str, tracker: _Tracker, now: int) -> None:
        """Remove a membership; QUEUED executions of CONTINUOUS jobs the thing is no longer a
        target of become REMOVED (PROTOCOL.md 3.1)."""
        if not self._store.remove_member(group_name, thing):
            return
        groups = [group_name, *self._ancestors(group_name)]
        for job_id in self._store.jobs_targeting_groups(groups):
            latest = self._store.get_execution(job_id, thing)
            if latest is None or latest.status != "QUEUED" or self._is_target(job_id, thing):
                continue
            tracker.touch(thing)
            latest.status = "REMOVED"
            latest.last_updated_at = now
            latest.version_number += 1
            self._end_timers(latest)
            self._store.save_execution(latest)
            self._execution_event(tracker, latest)

    def list_things_in_thing_group(self, name: str, recursive: bool, max_results: Optional[int],
                                   token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            self._group_or_404(name)
            return _page(self._group_things(name, recursive), "things", max_results, token)
        return self._run(op)

    # -- control plane: jobs -------------------------------------------------------------------
