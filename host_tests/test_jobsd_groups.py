"""jobsd thing groups (CreateThingGroup, DescribeThingGroup, Add/RemoveThingToFrom group,
ListThingsInThingGroup), jobs that target groups (SNAPSHOT vs CONTINUOUS), and the operator's
per-execution calls CancelJobExecution and DeleteJobExecution, with their error responses.
A real mosquitto and jobsd; boto3 is the operator, paho the device.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional
from collections.abc import Callable, Iterator

import pytest
from botocore.exceptions import ClientError

from iotjobs_host import stack
from iotjobs_host.stack import Jobsd
from test_jobsd import ACCOUNT, REGION, Device, arn, error_code


@pytest.fixture(scope="module")
def broker(module_broker: stack.Mosquitto) -> stack.Mosquitto:
    return module_broker


@pytest.fixture(scope="module")
def jobsd(module_jobsd: Jobsd) -> Jobsd:
    """One jobsd for the module (conftest); each test works on fresh names."""
    return module_jobsd


@pytest.fixture
def devices(jobsd: Jobsd, broker: stack.Mosquitto) -> Iterator[Callable[[], Device]]:
    opened: list[Device] = []

    def make() -> Device:
        name = f"member-{uuid.uuid4().hex[:10]}"
        jobsd.iot.create_thing(thingName=name)
        dev = Device(broker.port, name)
        opened.append(dev)
        return dev

    yield make
    for dev in opened:
        dev.close()


def group_arn(name: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/{name}"


def new_group(jobsd: Jobsd, parent: Optional[str] = None) -> str:
    name = f"group-{uuid.uuid4().hex[:10]}"
    extra = {"parentGroupName": parent} if parent else {}
    jobsd.iot.create_thing_group(thingGroupName=name, **extra)
    return name


def new_job(jobsd: Jobsd, targets: list[str], **options: Any) -> str:
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    jobsd.iot.create_job(jobId=job_id, targets=targets,
                         document=json.dumps({"operation": "group-test"}), **options)
    return job_id


def executions(jobsd: Jobsd, job: str) -> dict[str, str]:
    return {e["thingArn"].rsplit("/", 1)[1]: e["jobExecutionSummary"]["status"]
            for e in jobsd.iot.list_job_executions_for_job(jobId=job)["executionSummaries"]}


def expect(call: Callable[[], Any], code: str, status: int) -> str:
    with pytest.raises(ClientError) as err:
        call()
    assert error_code(err) == (code, status)
    message = err.value.response["Error"]["Message"]
    assert message
    return message


# -- groups ------------------------------------------------------------------------------------

def test_create_and_describe_thing_groups(jobsd: Jobsd) -> None:
    root = f"root-{uuid.uuid4().hex[:8]}"
    created = jobsd.iot.create_thing_group(
        thingGroupName=root, thingGroupProperties={
            "thingGroupDescription": "all the things",
            "attributePayload": {"attributes": {"site": "lab"}}})
    assert created["thingGroupName"] == root and created["thingGroupArn"] == group_arn(root)
    assert created["thingGroupId"]
    child = new_group(jobsd, parent=root)
    grandchild = new_group(jobsd, parent=child)
    view = jobsd.iot.describe_thing_group(thingGroupName=root)
    assert view["thingGroupId"] == created["thingGroupId"] and view["version"] == 1
    assert view["thingGroupArn"] == group_arn(root)
    assert view["thingGroupProperties"] == {"thingGroupDescription": "all the things",
                                            "attributePayload": {"attributes": {"site": "lab"}}}
    assert "parentGroupName" not in view["thingGroupMetadata"]
    assert view["thingGroupMetadata"]["creationDate"].year >= 2024
    meta = jobsd.iot.describe_thing_group(thingGroupName=grandchild)["thingGroupMetadata"]
    assert meta["parentGroupName"] == child
    assert meta["rootToParentThingGroups"] == [
        {"groupName": root, "groupArn": group_arn(root)},
        {"groupName": child, "groupArn": group_arn(child)}]
    # an identical CreateThingGroup is idempotent; a different one is a conflict
    again = jobsd.iot.create_thing_group(
        thingGroupName=root, thingGroupProperties={
            "thingGroupDescription": "all the things",
            "attributePayload": {"attributes": {"site": "lab"}}})
    assert again["thingGroupId"] == created["thingGroupId"]
    expect(lambda: jobsd.iot.create_thing_group(thingGroupName=root),
           "ResourceAlreadyExistsException", 409)
    expect(lambda: jobsd.iot.create_thing_group(thingGroupName="orphan-x",
                                                parentGroupName="no-such-parent"),
           "InvalidRequestException", 400)
    expect(lambda: jobsd.iot.describe_thing_group(thingGroupName="no-such-group"),
           "ResourceNotFoundException", 404)
    expect(lambda: jobsd.iot.create_thing_group(thingGroupName="bad!name"),
           "InvalidRequestException", 400)
    listed = [g["groupName"] for g in jobsd.iot.list_thing_groups(parentGroup=root)["thingGroups"]]
    assert sorted(listed) == sorted([child, grandchild])  # recursive by default
    direct = jobsd.iot.list_thing_groups(parentGroup=root, recursive=False)["thingGroups"]
    assert [g["groupName"] for g in direct] == [child]


def test_membership_by_name_and_arn(jobsd: Jobsd, devices: Callable[[], Device]) -> None:
    parent = new_group(jobsd)
    child = new_group(jobsd, parent=parent)
    a, b = devices(), devices()
    jobsd.iot.add_thing_to_thing_group(thingGroupName=parent, thingName=a.thing)
    jobsd.iot.add_thing_to_thing_group(thingGroupArn=group_arn(child), thingArn=arn(b.thing))
    jobsd.iot.add_thing_to_thing_group(thingGroupName=parent, thingName=a.thing)  # idempotent
    assert jobsd.iot.list_things_in_thing_group(thingGroupName=parent)["things"] == [a.thing]
    assert jobsd.iot.list_things_in_thing_group(thingGroupName=parent, recursive=True)[
        "things"] == [a.thing, b.thing]
    assert jobsd.iot.list_things_in_thing_group(thingGroupName=child)["things"] == [b.thing]
    page = jobsd.iot.list_things_in_thing_group(thingGroupName=parent, recursive=True,
                                                maxResults=1)
    assert page["things"] == [a.thing] and page["nextToken"]
    groups = jobsd.iot.list_thing_groups_for_thing(thingName=b.thing)["thingGroups"]
    assert groups == [{"groupName": child, "groupArn": group_arn(child)}]
    jobsd.iot.remove_thing_from_thing_group(thingGroupArn=group_arn(child), thingArn=arn(b.thing))
    jobsd.iot.remove_thing_from_thing_group(thingGroupName=child, thingName=b.thing)  # no-op
    assert jobsd.iot.list_things_in_thing_group(thingGroupName=child)["things"] == []
    # errors
    iot = jobsd.iot
    expect(lambda: iot.add_thing_to_thing_group(thingGroupName="no-such-group",
                                                thingName=a.thing),
           "ResourceNotFoundException", 404)
    expect(lambda: iot.add_thing_to_thing_group(thingGroupName=parent, thingName="no-such-thing"),
           "ResourceNotFoundException", 404)
    expect(lambda: iot.add_thing_to_thing_group(thingName=a.thing),
           "InvalidRequestException", 400)
    expect(lambda: iot.add_thing_to_thing_group(thingGroupName=parent),
           "InvalidRequestException", 400)
    expect(lambda: iot.add_thing_to_thing_group(thingGroupName=parent,
                                                thingArn="arn:aws:iot:eu-west-1:1:thing/x"),
           "InvalidRequestException", 400)
    expect(lambda: iot.remove_thing_from_thing_group(thingGroupName="no-such-group",
                                                     thingName=a.thing),
           "ResourceNotFoundException", 404)
    expect(lambda: iot.list_things_in_thing_group(thingGroupName="no-such-group"),
           "ResourceNotFoundException", 404)


def test_snapshot_job_on_a_group(jobsd: Jobsd, devices: Callable[[], Device]) -> None:
    parent = new_group(jobsd)
    child = new_group(jobsd, parent=parent)
    a, b, late = devices(), devices(), devices()
    jobsd.iot.add_thing_to_thing_group(thingGroupName=parent, thingName=a.thing)
    jobsd.iot.add_thing_to_thing_group(thingGroupName=child, thingName=b.thing)
    job = new_job(jobsd, [group_arn(parent)])  # SNAPSHOT is the default
    view = jobsd.iot.describe_job(jobId=job)["job"]
    assert view["targets"] == [group_arn(parent)] and view["targetSelection"] == "SNAPSHOT"
    assert executions(jobsd, job) == {a.thing: "QUEUED", b.thing: "QUEUED"}  # child included
    for dev in (a, b):
        events = dev.sync()
        assert [t for t, _ in events] == ["notify", "notify-next"]
        assert events[1][1]["execution"]["jobId"] == job
    # a thing added after creation does not join a snapshot
    jobsd.iot.add_thing_to_thing_group(thingGroupName=parent, thingName=late.thing)
    assert late.sync() == []
    assert late.thing not in executions(jobsd, job)
    assert job in [j["jobId"] for j in jobsd.iot.list_jobs(thingGroupName=parent)["jobs"]]
    for dev in (a, b):
        outcome, _, _ = dev.request(f"{job}/update", {"status": "SUCCEEDED"})
        assert outcome == "accepted"
    assert jobsd.iot.describe_job(jobId=job)["job"]["status"] == "COMPLETED"


def test_continuous_job_follows_membership(jobsd: Jobsd, devices: Callable[[], Device]) -> None:
    group = new_group(jobsd)
    child = new_group(jobsd, parent=group)
    first, joiner, leaver, runner = devices(), devices(), devices(), devices()
    for dev in (first, leaver, runner):
        jobsd.iot.add_thing_to_thing_group(thingGroupName=group, thingName=dev.thing)
    job = new_job(jobsd, [group_arn(group)], targetSelection="CONTINUOUS")
    assert set(executions(jobsd, job)) == {first.thing, leaver.thing, runner.thing}
    for dev in (first, leaver, runner, joiner):
        dev.sync()

    # a thing joining (here through a child group) gets an execution, with both events
    jobsd.iot.add_thing_to_thing_group(thingGroupName=child, thingName=joiner.thing)
    events = joiner.sync()
    assert [t for t, _ in events] == ["notify", "notify-next"]
    assert [j["jobId"] for j in events[0][1]["jobs"]["QUEUED"]] == [job]
    assert events[1][1]["execution"]["jobId"] == job
    assert events[1][1]["execution"]["status"] == "QUEUED"
    assert events[1][1]["execution"]["jobDocument"] == {"operation": "group-test"}

    # leaving the group: a QUEUED execution is REMOVED (both events) ...
    jobsd.iot.remove_thing_from_thing_group(thingGroupName=group, thingName=leaver.thing)
    events = leaver.sync()
    assert [t for t, _ in events] == ["notify", "notify-next"]
    assert events[0][1]["jobs"] == {} and set(events[1][1]) == {"timestamp"}
    removed = jobsd.iot.describe_job_execution(jobId=job, thingName=leaver.thing)["execution"]
    assert removed["status"] == "REMOVED" and removed["versionNumber"] == 2
    outcome, body, _ = leaver.request(f"{job}/update", {"status": "IN_PROGRESS"})
    assert outcome == "rejected" and body["code"] == "InvalidStateTransition"
    # ... an IN_PROGRESS one keeps running
    runner.request("start-next", {})
    jobsd.iot.remove_thing_from_thing_group(thingGroupName=group, thingName=runner.thing)
    assert runner.sync() == []
    assert executions(jobsd, job)[runner.thing] == "IN_PROGRESS"
    # rejoining after REMOVED queues a new execution (executionNumber 2)
    jobsd.iot.add_thing_to_thing_group(thingGroupName=group, thingName=leaver.thing)
    events = leaver.sync()
    assert [t for t, _ in events] == ["notify", "notify-next"]
    assert events[1][1]["execution"]["executionNumber"] == 2
    # a thing that already has an execution of the job does not get another
    jobsd.iot.add_thing_to_thing_group(thingGroupName=group, thingName=runner.thing)
    assert runner.sync() == []

    # everything terminal: a CONTINUOUS job stays IN_PROGRESS (as AWS)
    for dev in (first, joiner, leaver, runner):
        outcome, _, _ = dev.request(f"{job}/update", {"status": "SUCCEEDED"})
        assert outcome == "accepted"
    view = jobsd.iot.describe_job(jobId=job)["job"]
    assert view["status"] == "IN_PROGRESS" and view["targetSelection"] == "CONTINUOUS"
    assert view["jobProcessDetails"]["numberOfSucceededThings"] == 4
    # once canceled, new members get nothing
    jobsd.iot.cancel_job(jobId=job)
    latecomer = devices()
    jobsd.iot.add_thing_to_thing_group(thingGroupName=group, thingName=latecomer.thing)
    assert latecomer.sync() == []


def test_thing_still_targeted_through_another_group_keeps_its_execution(
        jobsd: Jobsd, devices: Callable[[], Device]) -> None:
    g1, g2 = new_group(jobsd), new_group(jobsd)
    dev = devices()
    for g in (g1, g2):
        jobsd.iot.add_thing_to_thing_group(thingGroupName=g, thingName=dev.thing)
    job = new_job(jobsd, [group_arn(g1), group_arn(g2)], targetSelection="CONTINUOUS")
    assert executions(jobsd, job) == {dev.thing: "QUEUED"}  # one execution, not two
    dev.sync()
    jobsd.iot.remove_thing_from_thing_group(thingGroupName=g1, thingName=dev.thing)
    assert dev.sync() == [] and executions(jobsd, job) == {dev.thing: "QUEUED"}
    jobsd.iot.remove_thing_from_thing_group(thingGroupName=g2, thingName=dev.thing)
    assert [t for t, _ in dev.sync()] == ["notify", "notify-next"]
    assert executions(jobsd, job) == {dev.thing: "REMOVED"}


def test_group_target_errors(jobsd: Jobsd, devices: Callable[[], Device]) -> None:
    dev = devices()
    expect(lambda: new_job(jobsd, [group_arn("no-such-group")]), "ResourceNotFoundException", 404)
    expect(lambda: new_job(jobsd, [f"arn:aws:iot:eu-west-1:{ACCOUNT}:thinggroup/g"]),
           "ResourceNotFoundException", 404)
    expect(lambda: new_job(jobsd, [f"arn:aws:iot:{REGION}:{ACCOUNT}:policy/p"]),
           "InvalidRequestException", 400)
    expect(lambda: new_job(jobsd, [arn(dev.thing)], targetSelection="SOMETIMES"),
           "InvalidRequestException", 400)
    # a SNAPSHOT of an empty group has nothing to do: COMPLETED at once
    empty = new_group(jobsd)
    job = new_job(jobsd, [group_arn(empty)])
    assert executions(jobsd, job) == {}
    assert jobsd.iot.describe_job(jobId=job)["job"]["status"] == "COMPLETED"


# -- CancelJobExecution ------------------------------------------------------------------------

def test_cancel_job_execution(jobsd: Jobsd, devices: Callable[[], Device]) -> None:
    dev, other = devices(), devices()
    first = new_job(jobsd, [arn(dev.thing), arn(other.thing)])
    second = new_job(jobsd, [arn(dev.thing)])
    dev.sync()
    iot = jobsd.iot
    expect(lambda: iot.cancel_job_execution(jobId=first, thingName=dev.thing, expectedVersion=5),
           "VersionConflictException", 409)
    expect(lambda: iot.cancel_job_execution(jobId=first, thingName=dev.thing,
                                            statusDetails={"bad key": "v"}),
           "InvalidRequestException", 400)
    expect(lambda: iot.cancel_job_execution(jobId="no-such-job", thingName=dev.thing),
           "ResourceNotFoundException", 404)
    expect(lambda: iot.cancel_job_execution(jobId=first, thingName="no-such-thing"),
           "ResourceNotFoundException", 404)
    assert dev.sync() == []  # nothing changed
    # QUEUED: canceled without force; statusDetails replace; notify + notify-next (was first)
    iot.cancel_job_execution(jobId=first, thingName=dev.thing, expectedVersion=1,
                             statusDetails={"reason": "operator"})
    events = dev.sync()
    assert [t for t, _ in events] == ["notify", "notify-next"]
    assert events[1][1]["execution"]["jobId"] == second
    ex = iot.describe_job_execution(jobId=first, thingName=dev.thing)["execution"]
    assert ex["status"] == "CANCELED" and ex["versionNumber"] == 2
    assert ex["forceCanceled"] is False
    assert ex["statusDetails"]["detailsMap"] == {"reason": "operator"}
    expect(lambda: iot.cancel_job_execution(jobId=first, thingName=dev.thing, force=True),
           "InvalidStateTransitionException", 409)  # already terminal
    # the other thing's execution is untouched; the job is not finished
    assert executions(jobsd, first)[other.thing] == "QUEUED"
    assert iot.describe_job(jobId=first)["job"]["status"] == "IN_PROGRESS"
    # IN_PROGRESS needs force
    dev.request("start-next", {})
    message = expect(lambda: iot.cancel_job_execution(jobId=second, thingName=dev.thing),
                     "InvalidStateTransitionException", 409)
    assert "force" in message
    iot.cancel_job_execution(jobId=second, thingName=dev.thing, force=True)
    assert [t for t, _ in dev.sync()] == ["notify", "notify-next"]
    ex = iot.describe_job_execution(jobId=second, thingName=dev.thing)["execution"]
    assert ex["status"] == "CANCELED" and ex["forceCanceled"] is True
    assert iot.describe_job(jobId=second)["job"]["status"] == "COMPLETED"
    outcome, body, _ = dev.request(f"{second}/update", {"status": "SUCCEEDED"})
    assert outcome == "rejected" and body["code"] == "InvalidStateTransition"
    assert body["executionState"]["status"] == "CANCELED"
    # canceling the last open execution completes the job
    iot.cancel_job_execution(jobId=first, thingName=other.thing)
    view = iot.describe_job(jobId=first)["job"]
    assert view["status"] == "COMPLETED"
    assert view["jobProcessDetails"]["numberOfCanceledThings"] == 2


# -- DeleteJobExecution ------------------------------------------------------------------------

def test_delete_job_execution(jobsd: Jobsd, devices: Callable[[], Device]) -> None:
    dev, other = devices(), devices()
    job = new_job(jobsd, [arn(dev.thing), arn(other.thing)])
    dev.sync()
    iot = jobsd.iot
    # QUEUED and IN_PROGRESS need force
    expect(lambda: iot.delete_job_execution(jobId=job, thingName=dev.thing, executionNumber=1),
           "InvalidStateTransitionException", 409)
    dev.request("start-next", {})
    expect(lambda: iot.delete_job_execution(jobId=job, thingName=dev.thing, executionNumber=1),
           "InvalidStateTransitionException", 409)
    expect(lambda: iot.delete_job_execution(jobId=job, thingName=dev.thing, executionNumber=2,
                                            force=True),
           "ResourceNotFoundException", 404)
    expect(lambda: iot.delete_job_execution(jobId="no-such-job", thingName=dev.thing,
                                            executionNumber=1),
           "ResourceNotFoundException", 404)
    assert dev.sync() == []
    iot.delete_job_execution(jobId=job, thingName=dev.thing, executionNumber=1, force=True)
    events = dev.sync()
    assert [t for t, _ in events] == ["notify", "notify-next"]
    assert events[0][1]["jobs"] == {} and set(events[1][1]) == {"timestamp"}
    expect(lambda: iot.describe_job_execution(jobId=job, thingName=dev.thing),
           "ResourceNotFoundException", 404)
    outcome, body, _ = dev.request(f"{job}/update", {"status": "SUCCEEDED"})
    assert outcome == "rejected" and body["code"] == "ResourceNotFound"
    assert executions(jobsd, job) == {other.thing: "QUEUED"}
    # a terminal execution is deleted without force; the job then has nothing open
    outcome, _, _ = other.request(f"{job}/update", {"status": "FAILED"})
    assert outcome == "accepted"
    assert iot.describe_job(jobId=job)["job"]["status"] == "COMPLETED"
    other.sync()
    iot.delete_job_execution(jobId=job, thingName=other.thing, executionNumber=1)
    assert other.sync() == []  # it had already left the pending list
    assert executions(jobsd, job) == {}


def test_delete_job_execution_bad_execution_number(jobsd: Jobsd) -> None:
    host, port = jobsd.control_url[len("http://"):].split(":")
    import http.client

    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("DELETE", "/things/t/jobs/j/executionNumber/one")
        reply = conn.getresponse()
        body = json.loads(reply.read())
        assert (reply.status, reply.getheader("x-amzn-ErrorType")) == (
            400, "InvalidRequestException")
        assert "executionNumber" in body["message"]
    finally:
        conn.close()


# -- StartCommandExecution (commands: test_jobsd_commands.py) -----------------------------------

def test_start_command_execution_of_an_unknown_command(jobsd: Jobsd) -> None:
    with pytest.raises(ClientError) as err:
        jobsd.data.start_command_execution(
            targetArn=arn("some-thing"),
            commandArn=f"arn:aws:iot:{REGION}:{ACCOUNT}:command/reboot",
            parameters={"delay": {"I": 5}}, executionTimeoutSeconds=60)
    assert error_code(err) == ("ResourceNotFoundException", 404)
    assert "reboot" in err.value.response["Error"]["Message"]
