"""The agent runtime against a real server: results, failures, cancels,
progress, logs, workflows, metrics and trace context."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import muster
import muster._runtime as muster_runtime
from muster.v1 import task_pb2

from .conftest import Agents, MusterServer, wait_for_agents, wait_for_state


async def collect_events(client: muster.Client, task_id: str) -> list[muster.TaskEvent]:
    """Every event of a finished task, from the start."""
    events = []
    async for event in client.watch(task_id=task_id, from_start=True):
        events.append(event)
        if event.kind == task_pb2.EVENT_KIND_STATE and event.state in muster.TERMINAL_STATES:
            return events
    raise AssertionError("watch ended early")


async def collect_log_lines(client: muster.Client, task_id: str) -> list[str]:
    return [line.text async for chunk in client.logs(task_id) for line in chunk.lines]


async def test_happy_path_returns_the_output_with_progress_and_logs(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    async def work(ctx: muster.TaskContext) -> object:
        request = ctx.json()
        ctx.log("starting\nsecond line")
        await ctx.progress(50, "halfway")
        await asyncio.sleep(0.3)
        ctx.log("finishing")
        return {"doubled": request["n"] * 2, "attempt": ctx.attempt}

    agents.start(server.endpoint, {"py-work": work})
    submitted = await client.submit("py-work", json={"n": 21})
    done = await client.wait(submitted.id, timeout=20)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert json.loads(done.output) == {"doubled": 42, "attempt": 1}
    assert done.output_content_type == "application/json"
    assert done.attempts[0].agent_name == "py-test"

    events = await collect_events(client, submitted.id)
    progress = [e.progress for e in events if e.kind == task_pb2.EVENT_KIND_PROGRESS]
    assert [(p.percent, p.message) for p in progress] == [(50, "halfway")]
    assert [muster.TaskState.Name(e.state) for e in events if e.kind == task_pb2.EVENT_KIND_STATE][-1] == (
        "TASK_STATE_SUCCEEDED"
    )
    assert await collect_log_lines(client, submitted.id) == ["starting", "second line", "finishing"]


async def test_a_retryable_failure_is_retried_until_it_succeeds(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    async def flaky(ctx: muster.TaskContext) -> str:
        if ctx.attempt == 1:
            raise muster.Retryable("the backend timed out", reason="backend_timeout")
        if ctx.attempt == 2:
            raise ValueError("an unexpected error")
        return f"passed on attempt {ctx.attempt}"

    agents.start(server.endpoint, {"py-flaky": flaky})
    submitted = await client.submit("py-flaky", max_attempts=3, initial_backoff=0.05, max_backoff=0.1)
    done = await client.wait(submitted.id, timeout=20)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.output == b"passed on attempt 3"
    assert done.output_content_type == "text/plain; charset=utf-8"
    first, second, _ = done.attempts
    assert (first.failure.reason, first.failure.message, first.failure.retryable) == (
        "backend_timeout",
        "the backend timed out",
        True,
    )
    assert (second.failure.reason, second.failure.message) == (
        "handler_error",
        "ValueError: an unexpected error",
    )


async def test_a_non_retryable_failure_ends_the_task_at_once(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    async def strict(ctx: muster.TaskContext) -> str:
        raise muster.NonRetryable("the payload names no file", reason="bad_input")

    agents.start(server.endpoint, {"py-strict": strict})
    submitted = await client.submit("py-strict", max_attempts=5)
    done = await client.wait(submitted.id, timeout=20)
    assert done.state == task_pb2.TASK_STATE_FAILED
    assert done.attempt == 1
    assert (done.failure.reason, done.failure.message, done.failure.retryable) == (
        "bad_input",
        "the payload names no file",
        False,
    )

    # A payload that is not JSON is the submitter's mistake: not retried either.
    async def parse(ctx: muster.TaskContext) -> object:
        return ctx.json()

    agents.start(server.endpoint, {"py-parse": parse}, name="py-parser")
    bad = await client.submit("py-parse", b"{not json", max_attempts=5)
    done = await client.wait(bad.id, timeout=20)
    assert (done.state, done.attempt, done.failure.reason) == (
        task_pb2.TASK_STATE_FAILED,
        1,
        "invalid_payload",
    )


async def test_cancel_reaches_the_running_handler(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    started = asyncio.Event()
    saw_cancel = asyncio.Event()

    async def slow(ctx: muster.TaskContext) -> str:
        started.set()
        try:
            await ctx.run(asyncio.sleep(60))
        except muster.Cancelled:
            saw_cancel.set()
            raise
        return "not cancelled"

    agents.start(server.endpoint, {"py-slow": slow})
    submitted = await client.submit("py-slow")
    await asyncio.wait_for(started.wait(), 10)
    await wait_for_state(client, submitted.id, task_pb2.TASK_STATE_RUNNING)
    requested = await client.cancel(submitted.id, "operator asked")
    assert requested.cancel_requested
    done = await client.wait(submitted.id, timeout=10)
    assert done.state == task_pb2.TASK_STATE_CANCELLED
    assert saw_cancel.is_set(), "the handler saw the cancellation"
    assert done.failure.message == "operator asked"


async def test_a_result_wins_over_a_pending_cancel_and_a_failure_records_cancelled(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    # The handler stops when told to and reports what its payload says; the
    # server's cancel grace (30 s) is far longer than it takes.
    async def stubborn(ctx: muster.TaskContext) -> str:
        await ctx.wait_cancelled()
        if ctx.text() == "finish":
            return "finished anyway"
        raise muster.TaskError("stopped", retryable=True)

    agents.start(server.endpoint, {"py-stop": stubborn}, slots=2)
    finishes = await client.submit("py-stop", "finish")
    fails = await client.submit("py-stop", "fail")
    for task in (finishes, fails):
        await wait_for_state(client, task.id, task_pb2.TASK_STATE_RUNNING)
        await client.cancel(task.id, "changed my mind")
    finished = await client.wait(finishes.id, timeout=20)
    assert finished.state == task_pb2.TASK_STATE_SUCCEEDED, finished
    assert finished.output == b"finished anyway"
    failed = await client.wait(fails.id, timeout=20)
    assert failed.state == task_pb2.TASK_STATE_CANCELLED, failed
    assert failed.failure.message == "changed my mind"


async def test_an_agent_named_with_colons_and_slashes_registers_and_runs_tasks(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    # The server accepts `._:/-` in an agent name (Register.name), so the SDK does too.
    name = "py-host.example:7/worker_1"

    async def work(ctx: muster.TaskContext) -> str:
        return "ran"

    agents.start(server.endpoint, {"py-named": work}, name=name)
    await wait_for_agents(client, "py-named", 1)
    [info] = await client.list_agents("py-named")
    assert info.name == name
    done = await client.wait((await client.submit("py-named")).id, timeout=20)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.attempts[0].agent_name == name


async def test_a_three_task_workflow_hands_parent_outputs_to_children(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    async def fetch(ctx: muster.TaskContext) -> object:
        return {"words": ctx.text().split()}

    async def count(ctx: muster.TaskContext) -> object:
        return {"count": len(ctx.parent_json("fetch")["words"])}

    async def report(ctx: muster.TaskContext) -> str:
        words = ctx.parent_json("fetch")["words"]
        counted = ctx.parent_json("count")["count"]
        keys = sorted(p.key for p in ctx.parent_outputs)
        return f"{counted} words, first {words[0]}, parents {keys}"

    agents.start(server.endpoint, {"py-fetch": fetch, "py-count": count, "py-report": report}, slots=3)
    response = await client.submit_graph(
        [
            muster.task("py-report", key="report", depends_on=["fetch", "count"]),
            muster.task("py-count", key="count", depends_on=["fetch"]),
            muster.task("py-fetch", "alpha beta gamma", key="fetch"),
        ]
    )
    assert response.workflow_id
    report_id = response.tasks[0].id
    done = await client.wait(report_id, timeout=20)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.output == b"3 words, first alpha, parents ['count', 'fetch']"
    workflow = await client.get_workflow(response.workflow_id)
    assert workflow.done
    assert workflow.counts["SUCCEEDED"] == 3


async def test_metrics_are_served_and_announced_for_service_discovery(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    async def echo(ctx: muster.TaskContext) -> bytes:
        return ctx.payload

    _agent, _ = agents.start(server.endpoint, {"py-echo": echo}, metrics_listen="127.0.0.1:0")
    await wait_for_agents(client, "py-echo", 1)
    done = await client.wait((await client.submit("py-echo", b"hi")).id, timeout=20)
    assert done.output == b"hi"

    [info] = await client.list_agents("py-echo")
    assert info.metrics_address.startswith("127.0.0.1:")
    assert not info.metrics_address.endswith(":0")
    assert info.sdk_version.startswith("python-")

    def fetch(url: str) -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch, f"http://{info.metrics_address}/metrics")
    assert 'muster_agent_tasks_total{capability="py-echo",outcome="succeeded"} 1.0' in text
    assert "muster_agent_slots 4.0" in text
    assert "muster_agent_connected 1.0" in text
    assert 'muster_agent_handler_duration_seconds_count{capability="py-echo",outcome="succeeded"} 1.0' in text
    targets = json.loads(await asyncio.to_thread(fetch, f"http://{server.http_address}/sd/agents"))
    assert any(info.metrics_address in group["targets"] for group in targets)


async def test_the_handler_span_joins_the_submitters_trace(
    server: MusterServer, client: muster.Client, agents: Agents
) -> None:
    seen: dict[str, str] = {}

    async def traced(ctx: muster.TaskContext) -> None:
        seen["traceparent"] = ctx.trace_context.get("traceparent", "")
        seen["current"] = format(trace.get_current_span().get_span_context().trace_id, "032x")

    agents.start(server.endpoint, {"py-traced": traced})
    trace_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    parent = SpanContext(trace_id, 0x00F067AA0BA902B7, is_remote=False, trace_flags=TraceFlags(1))
    with trace.use_span(NonRecordingSpan(parent)):
        submitted = await client.submit("py-traced")
    assert (
        submitted.spec.trace_context["traceparent"]
        == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    )
    done = await client.wait(submitted.id, timeout=20)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert seen == {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "current": "4bf92f3577b34da6a3ce929d0e0e4736",
    }


async def test_log_lines_held_back_by_the_send_interval_go_out_within_it(
    make_server: Callable[..., MusterServer], agents: Agents, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing but the held lines themselves wakes the agent: heartbeats are a
    # minute apart and its lease check (at most a second apart) is put off,
    # so a held line that waited for another reason to go out would take ten
    # times the bound below, a bound a busy machine still meets.
    monkeypatch.setattr(muster_runtime, "lease_check_period", lambda lease: 3600.0)
    server = make_server("--lease-ttl", "180s", "--heartbeat-interval", "60s")
    release = asyncio.Event()

    async def chatty(ctx: muster.TaskContext) -> None:
        ctx.log("first")
        ctx.log("second")  # within the send interval of the first: held back
        await release.wait()

    agents.start(server.endpoint, {"py-chatty": chatty})
    async with muster.Client(server.endpoint) as client:
        submitted = await client.submit("py-chatty")
        lines: list[str] = []

        async def follow() -> None:
            async for chunk in client.logs(submitted.id, follow=True):
                lines.extend(line.text for line in chunk.lines)
                if len(lines) >= 2:
                    return

        await wait_for_state(client, submitted.id, task_pb2.TASK_STATE_RUNNING)
        await asyncio.wait_for(follow(), 5.0)
        assert lines == ["first", "second"]
        release.set()
        assert (await client.wait(submitted.id, timeout=10)).state == task_pb2.TASK_STATE_SUCCEEDED
