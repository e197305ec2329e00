//! The store record decoder: arbitrary bytes never panic, and every record
//! the store writes reads back as itself.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use ulid::Ulid;

use super::*;
use crate::auth::{Role, Scope};
use crate::model::*;
use crate::store::{decode, encode};

fn string_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(text(16), text(32), 0..4)
}

fn state() -> impl Strategy<Value = TaskState> {
    prop_oneof![
        Just(TaskState::Pending),
        Just(TaskState::Queued),
        Just(TaskState::Assigned),
        Just(TaskState::Running),
        Just(TaskState::Succeeded),
        Just(TaskState::Failed),
        Just(TaskState::Cancelled),
    ]
}

fn failure() -> impl Strategy<Value = Option<Failure>> {
    proptest::option::of((text(16), text(64), any::<bool>()).prop_map(|(reason, message, retryable)| Failure {
        reason,
        message,
        retryable,
    }))
}

fn progress() -> impl Strategy<Value = Option<Progress>> {
    proptest::option::of((edgy_u32(), text(32), edgy_u64()).prop_map(|(percent, message, at)| Progress {
        percent,
        message,
        at,
    }))
}

fn ulid() -> impl Strategy<Value = Ulid> {
    any::<u128>().prop_map(Ulid)
}

fn spec() -> impl Strategy<Value = TaskSpec> {
    let retry = (edgy_u32(), duration(), duration(), edgy_f64()).prop_map(
        |(max_attempts, initial_backoff, max_backoff, multiplier)| RetryPolicy {
            max_attempts,
            initial_backoff,
            max_backoff,
            multiplier,
        },
    );
    let lock = (text(16), any::<bool>()).prop_map(|(name, shared)| LockSpec {
        name,
        mode: if shared { LockMode::Shared } else { LockMode::Exclusive },
    });
    let head = (
        text(16),
        string_map(),
        text(16),
        prop_oneof![Just(Priority::Low), Just(Priority::Normal), Just(Priority::High), Just(Priority::Critical)],
        proptest::collection::vec(any::<u8>(), 0..64),
        text(16),
        string_map(),
    );
    let tail = (
        duration(),
        proptest::option::of(duration()),
        retry,
        proptest::option::of(text(16)),
        proptest::option::of(edgy_u64()),
        string_map(),
        proptest::option::of(text(16)),
        proptest::collection::vec(ulid().prop_map(TaskId), 0..3),
        proptest::collection::vec(lock, 0..3),
        proptest::option::of((text(16), edgy_u32()).prop_map(|(key, max)| ConcurrencySpec { key, max })),
    );
    (head, tail).prop_map(
        |(
            (capability, selector, queue, priority, payload, content_type, metadata),
            (
                timeout,
                queue_timeout,
                retry,
                idempotency_key,
                not_before,
                trace_context,
                key,
                depends_on,
                locks,
                concurrency,
            ),
        )| TaskSpec {
            capability,
            selector,
            queue,
            priority,
            payload: Bytes::from(payload),
            content_type,
            metadata,
            timeout,
            queue_timeout,
            retry,
            idempotency_key,
            not_before,
            trace_context,
            key,
            depends_on,
            locks,
            concurrency,
        },
    )
}

fn attempt() -> impl Strategy<Value = AttemptRecord> {
    (edgy_u32(), ulid(), text(16), edgy_u64(), proptest::option::of(edgy_u64()), state(), failure()).prop_map(
        |(number, agent, agent_name, assigned_at, finished_at, state, failure)| AttemptRecord {
            number,
            agent_id: AgentId(agent),
            agent_name,
            assigned_at,
            started_at: Some(assigned_at),
            finished_at,
            state,
            failure,
        },
    )
}

fn task() -> impl Strategy<Value = Task> {
    let head = (ulid(), spec(), state(), edgy_u32(), edgy_u32(), proptest::collection::vec(attempt(), 0..3));
    let tail = (
        proptest::collection::vec(any::<u8>(), 0..64),
        failure(),
        progress(),
        (edgy_u64(), edgy_u64(), proptest::option::of(edgy_u64()), proptest::option::of(edgy_u64())),
        (any::<bool>(), edgy_u64(), proptest::option::of(ulid()), proptest::option::of(text(16))),
    );
    (head, tail).prop_map(
        |(
            (id, spec, state, attempt, attempt_base, attempts),
            (output, failure, progress, (created_at, updated_at, ready_at, deadline), (cancel, sequence, workflow, by)),
        )| Task {
            id: TaskId(id),
            spec,
            state,
            attempt,
            attempt_base,
            attempts,
            output: Bytes::from(output),
            output_content_type: String::new(),
            failure,
            progress,
            created_at,
            updated_at,
            ready_at,
            deadline,
            cancel_requested: cancel,
            sequence,
            workflow: workflow.map(WorkflowId),
            submitted_by: by,
        },
    )
}

fn event() -> impl Strategy<Value = TaskEvent> {
    let head = (edgy_u64(), ulid(), any::<bool>(), state(), proptest::option::of(state()), edgy_u32());
    let tail = (
        proptest::option::of(ulid()),
        text(16),
        text(16),
        text(16),
        text(64),
        progress(),
        edgy_u64(),
        proptest::option::of(text(16)),
    );
    (head, tail).prop_map(
        |(
            (sequence, task, is_progress, state, previous_state, attempt),
            (agent, queue, capability, reason, message, progress, at, actor),
        )| TaskEvent {
            sequence,
            task_id: TaskId(task),
            kind: if is_progress { EventKind::Progress } else { EventKind::State },
            state,
            previous_state,
            attempt,
            agent_id: agent.map(AgentId),
            queue,
            capability,
            workflow: None,
            reason,
            message,
            progress,
            at,
            actor,
        },
    )
}

fn log() -> impl Strategy<Value = AttemptLog> {
    let line = (edgy_u64(), edgy_u64(), 0u8..3, text(64)).prop_map(|(position, at, stream, text)| LogLine {
        position,
        at,
        stream: match stream {
            0 => LogStream::Log,
            1 => LogStream::Stdout,
            _ => LogStream::Stderr,
        },
        text,
    });
    (ulid(), edgy_u32(), proptest::collection::vec(line, 0..4), edgy_u64(), edgy_u64()).prop_map(
        |(task, attempt, lines, dropped, next_position)| AttemptLog {
            task_id: TaskId(task),
            attempt,
            lines,
            dropped,
            next_position,
        },
    )
}

fn token() -> impl Strategy<Value = TokenRecord> {
    let role = prop_oneof![
        Just(Role::Admin),
        Just(Role::Operator),
        Just(Role::Submitter),
        Just(Role::Agent),
        Just(Role::Viewer)
    ];
    let scope = (proptest::collection::vec(text(16), 0..3), proptest::collection::vec(text(16), 0..3), string_map())
        .prop_map(|(queues, capabilities, labels)| Scope { queues, capabilities, labels });
    (
        text(16),
        role,
        scope,
        proptest::collection::vec(any::<u8>(), 0..32),
        edgy_u64(),
        proptest::option::of(edgy_u64()),
        text(16),
    )
        .prop_map(|(name, role, scope, secret_hash, created_at, expires_at, created_by)| TokenRecord {
            name,
            role,
            scope,
            secret_hash,
            created_at,
            expires_at,
            revoked_at: None,
            created_by,
        })
}

/// Encodes, decodes and encodes again: the bytes must agree (NaN-proof),
/// and so must the values when `comparable`.
fn round_trip<T>(value: &T, comparable: bool) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: T = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(encode(&back).map_err(|e| TestCaseError::fail(e.to_string()))?, bytes);
    if comparable {
        prop_assert_eq!(&back, value);
    }
    Ok(())
}

/// Bytes a record might hold: anything, or the current version byte and
/// then anything (the interesting half for the MessagePack decoder).
fn record_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        proptest::collection::vec(any::<u8>(), 0..256).prop_map(|mut b| {
            b.insert(0, 1);
            b
        }),
    ]
}

/// Bytes that were a valid record once, then damaged: cut short or with
/// bytes flipped.
fn damaged_task() -> impl Strategy<Value = Vec<u8>> {
    (task(), any::<prop::sample::Index>(), any::<u8>(), any::<bool>()).prop_map(|(task, at, xor, cut)| {
        let mut bytes = encode(&task).unwrap_or_default();
        if bytes.is_empty() {
            return bytes;
        }
        let i = at.index(bytes.len());
        if cut {
            bytes.truncate(i);
        } else {
            bytes[i] ^= xor.max(1);
        }
        bytes
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in record_bytes()) {
        let _ = decode::<Task>(&bytes);
        let _ = decode::<Vec<TaskEvent>>(&bytes);
        let _ = decode::<TaskEvent>(&bytes);
        let _ = decode::<AgentRecord>(&bytes);
        let _ = decode::<QueueRecord>(&bytes);
        let _ = decode::<TokenRecord>(&bytes);
        let _ = decode::<AttemptLog>(&bytes);
    }

    #[test]
    fn damaged_records_decode_to_an_error_or_a_task_never_a_panic(bytes in damaged_task()) {
        if let Ok(task) = decode::<Task>(&bytes) {
            // Whatever it decoded to is a record the store can write again.
            prop_assert!(encode(&task).is_ok());
        }
    }

    #[test]
    fn tasks_round_trip_through_the_codec(task in task()) {
        round_trip(&task, !task.spec.retry.multiplier.is_nan())?;
    }

    #[test]
    fn events_logs_and_tokens_round_trip_through_the_codec(
        events in proptest::collection::vec(event(), 1..17),
        log in log(),
        token in token(),
    ) {
        round_trip(&events, true)?;
        round_trip(&log, true)?;
        round_trip(&token, true)?;
    }
}
