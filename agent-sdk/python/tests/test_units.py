"""The SDK's pure parts: endpoints, credentials, backoff, outputs, log
batching and task specs."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import muster
from muster._backoff import backoff_ceiling, jittered
from muster._connection import Credentials, normalize_endpoint
from muster._logs import MAX_BATCH_LINES, MAX_LINE_BYTES, LogBuffer, batches, split_lines
from muster._metrics import AgentMetrics
from muster._runtime import Cause, Running, Runtime, Settings, Unacked, lease_check_period
from muster.v1 import agent_pb2, task_pb2


def test_endpoints_get_a_scheme_and_bad_ones_are_refused() -> None:
    assert normalize_endpoint("127.0.0.1:7070", tls=False) == "http://127.0.0.1:7070"
    assert normalize_endpoint(" localhost:7070 ", tls=False) == "http://localhost:7070"
    assert normalize_endpoint("127.0.0.1:7070", tls=True) == "https://127.0.0.1:7070"
    assert normalize_endpoint("https://muster.example:443", tls=False) == "https://muster.example:443"
    for bad in ["", "   ", "ftp://host:21", "http://", "http://:7070"]:
        with pytest.raises(muster.ConfigError):
            normalize_endpoint(bad, tls=False)
    with pytest.raises(muster.ConfigError, match="https"):
        normalize_endpoint("http://127.0.0.1:7070", tls=True)


def test_credentials_come_from_arguments_or_the_environment_and_hide_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUSTER_TOKEN", "from-env")
    monkeypatch.delenv("MUSTER_TLS_CA", raising=False)
    monkeypatch.delenv("MUSTER_TLS_CERT", raising=False)
    monkeypatch.delenv("MUSTER_TLS_KEY", raising=False)
    assert Credentials.create().metadata() == (("authorization", "Bearer from-env"),)
    assert Credentials.create("explicit").metadata() == (("authorization", "Bearer explicit"),)
    assert Credentials.create(env=False).metadata() == ()
    assert "explicit" not in repr(Credentials.create("explicit"))
    with pytest.raises(muster.ConfigError, match="printable ASCII"):
        Credentials.create("bad token")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("MUSTER_TLS_CA", str(ca))
    assert Credentials.create().uses_tls
    with pytest.raises(muster.ConfigError, match="tls_key"):
        Credentials.create(tls_cert=ca)
    with pytest.raises(muster.ConfigError, match=r"missing\.pem"):
        Credentials.create(tls_ca=tmp_path / "missing.pem")


def test_backoff_doubles_to_its_cap_with_full_jitter() -> None:
    assert backoff_ceiling(0, 0.1, 5.0) == pytest.approx(0.1)
    assert backoff_ceiling(5, 0.1, 5.0) == pytest.approx(3.2)
    assert backoff_ceiling(6, 0.1, 5.0) == 5.0
    assert backoff_ceiling(10_000, 0.1, 5.0) == 5.0
    rng = random.Random(7)
    delays = [jittered(3, 0.1, 5.0, rng) for _ in range(500)]
    assert all(0 <= d <= 0.8 for d in delays)
    assert max(delays) > 0.4, "full jitter uses the whole range"


def test_lease_is_checked_ten_times_per_ttl_within_bounds() -> None:
    assert lease_check_period(None) == 1.0
    assert lease_check_period(5.0) == 0.5
    assert lease_check_period(60.0) == 1.0
    assert lease_check_period(0.02) == 0.01


def test_handler_return_values_become_outputs() -> None:
    assert muster.Output.of(None) == muster.Output(b"", "")
    assert muster.Output.of(b"raw") == muster.Output(b"raw", "application/octet-stream")
    assert muster.Output.of("text") == muster.Output(b"text", "text/plain; charset=utf-8")
    assert muster.Output.of({"a": [1]}) == muster.Output(b'{"a": [1]}', "application/json")
    with pytest.raises(muster.NonRetryable) as err:
        muster.Output.of({1, 2})
    assert err.value.reason == "invalid_output"


def test_log_text_splits_into_cut_lines() -> None:
    assert split_lines("one\r\ntwo\n") == ["one", "two"]
    assert split_lines("") == [""]
    long = split_lines("é" * MAX_LINE_BYTES)[0]
    assert len(long.encode()) <= MAX_LINE_BYTES


def test_a_full_log_buffer_drops_its_oldest_lines_and_counts_them() -> None:
    notified: list[int] = []
    dropped: list[int] = []
    buffer = LogBuffer(notify=lambda: notified.append(1), on_drop=dropped.append, capacity=200)
    buffer.push(task_pb2.LOG_STREAM_LOG, ["x" * 40 for _ in range(5)])
    assert notified == [1], "notified once while lines wait"
    taken = buffer.take()
    assert taken is not None
    lines, count = taken
    assert len(lines) == 2
    assert count == 3
    assert sum(dropped) == 3
    buffer.discard()
    buffer.push(task_pb2.LOG_STREAM_LOG, ["after"])
    assert buffer.take() is None, "a discarded attempt logs nothing more"


def test_batches_split_by_line_count_and_carry_the_dropped_count_first() -> None:
    lines = [task_pb2.LogLine(text=str(i)) for i in range(MAX_BATCH_LINES * 2 + 1)]
    messages = batches(("t1", 3), lines, 7)
    assert [len(m.lines) for m in messages] == [MAX_BATCH_LINES, MAX_BATCH_LINES, 1]
    assert [m.dropped for m in messages] == [7, 0, 0]
    assert all(m.attempt.task_id == "t1" and m.attempt.attempt == 3 for m in messages)
    assert [m.dropped for m in batches(("t1", 1), [], 5)] == [5]
    assert batches(("t1", 1), [], 0) == []


def test_task_specs_carry_every_setting() -> None:
    spec = muster.task(
        "py-work",
        json={"n": 1},
        queue="batch",
        priority="critical",
        timeout=1.5,
        max_attempts=2,
        initial_backoff=0.25,
        locks=["db", ("cache", "shared")],
        concurrency=("tenant-a", 2),
        key="a",
        depends_on=["b"],
    )
    assert json.loads(spec.payload) == {"n": 1}
    assert spec.content_type == "application/json"
    assert spec.priority == task_pb2.PRIORITY_CRITICAL
    assert (spec.timeout.seconds, spec.timeout.nanos) == (1, 500_000_000)
    assert spec.retry.max_attempts == 2
    assert spec.retry.initial_backoff.nanos == 250_000_000
    assert [(lock.name, lock.mode) for lock in spec.locks] == [
        ("db", task_pb2.LOCK_MODE_EXCLUSIVE),
        ("cache", task_pb2.LOCK_MODE_SHARED),
    ]
    assert (spec.concurrency.key, spec.concurrency.max) == ("tenant-a", 2)
    with pytest.raises(ValueError, match="priority"):
        muster.task("py-work", priority="urgent")


def test_agents_refuse_names_and_handlers_the_server_would_refuse() -> None:
    # Exactly what the server takes for Register.name.
    for accepted in ("has:colon/and-slash", "a.b_c-d", "7", "a" * 128):
        assert muster.Agent(accepted, "127.0.0.1:7070").name == accepted
    for refused in ("has space", "", "-first", ":first", "a" * 129, "trailing\n", "caf\u00e9"):
        with pytest.raises(muster.ConfigError, match="agent name"):
            muster.Agent(refused, "127.0.0.1:7070")
    with pytest.raises(muster.ConfigError, match="slots"):
        muster.Agent("a", "127.0.0.1:7070", slots=0)
    with pytest.raises(muster.ConfigError, match="no server"):
        muster.Agent("a", [])
    agent = muster.Agent("a", ["127.0.0.1:7070", "http://10.0.0.2:7070"])
    assert agent.endpoints == ["http://127.0.0.1:7070", "http://10.0.0.2:7070"]
    with pytest.raises(muster.ConfigError, match="capability"):
        agent.add_handler(".hidden", lambda ctx: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(muster.ConfigError, match="capability"):
        agent.add_handler("trailing\n", lambda ctx: None)  # type: ignore[arg-type,return-value]

    def sync_handler(ctx: muster.TaskContext) -> None:
        return None

    with pytest.raises(muster.ConfigError, match="async"):
        agent.add_handler("sync", sync_handler)  # type: ignore[arg-type]


def make_runtime() -> Runtime:
    settings = Settings(
        name="unit",
        endpoints=["http://127.0.0.1:1"],
        capabilities=["unit"],
        labels={},
        slots=1,
        metrics_address="",
        drain_grace=1.0,
        backoff_initial=0.1,
        backoff_max=1.0,
        credentials=Credentials(),
    )
    return Runtime(settings, {}, AgentMetrics(CollectorRegistry()))


async def idle() -> muster.Output:
    await asyncio.sleep(60)
    return muster.Output()


async def test_the_lease_rule_fences_held_work_exactly_at_the_ttl_of_silence() -> None:
    runtime = make_runtime()
    runtime._lease_ttl, runtime._heartbeat_interval, runtime._last_contact = 2.0, 0.4, 100.0
    sleeper = asyncio.create_task(idle())
    logs = LogBuffer(notify=lambda: None, on_drop=lambda _: None)
    running = Running(sleeper, asyncio.Event(), "unit", logs, started=100.0)
    runtime.running[("t1", 1)] = running
    runtime.unacked[("t0", 1)] = Unacked(agent_pb2.AgentMessage())

    runtime._check_lease(101.99)
    assert not running.cancel_event.is_set()
    assert ("t0", 1) in runtime.unacked

    runtime._check_lease(102.0)
    assert running.cancel_event.is_set()
    assert running.discarded
    assert runtime.unacked == {}, "results of reassigned work are dropped"
    sleeper.cancel()


async def test_stronger_cancel_causes_win_and_a_discard_drops_log_lines() -> None:
    sleeper = asyncio.create_task(idle())
    logs = LogBuffer(notify=lambda: None, on_drop=lambda _: None)
    running = Running(sleeper, asyncio.Event(), "unit", logs, started=0.0)
    logs.push(task_pb2.LOG_STREAM_LOG, ["before"])
    running.cancel(Cause.SERVER)
    running.cancel(Cause.SHUTDOWN)
    assert running.cause == Cause.SERVER
    assert logs.has_pending(), "a cancelled attempt still sends its lines"
    running.cancel(Cause.DISCARD)
    assert running.discarded
    assert not logs.has_pending()
    sleeper.cancel()
