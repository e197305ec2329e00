//! Spec validation and conversion from the wire with every field at its
//! extremes: a spec is either accepted within every bound or refused with
//! INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming a field, never a panic; so
//! are agent registrations and reports, and whole workflows submitted to the
//! scheduler.

use std::collections::HashMap;

use muster_proto::pb;
use proptest::prelude::*;
use tonic::Code;

use super::*;
use crate::config::{Limits, ServerConfig};
use crate::error::Error;
use crate::grpc::convert;
use crate::scheduler::Command;

/// Small limits, so sizes and counts reach them.
fn make_config() -> ServerConfig {
    ServerConfig {
        limits: Limits {
            max_payload_bytes: 64,
            max_labels: 4,
            max_metadata_entries: 4,
            max_key_len: 16,
            max_value_len: 32,
            max_name_len: 24,
            max_idempotency_key_len: 24,
            max_capabilities: 4,
            max_agent_slots: 8,
            max_dependencies_per_task: 4,
            max_locks_per_task: 3,
            max_message_len: 64,
            ..Limits::default()
        },
        ..ServerConfig::default()
    }
}

fn map() -> impl Strategy<Value = HashMap<String, String>> {
    proptest::collection::hash_map(text(20), text(40), 0..6)
}

fn retry() -> impl Strategy<Value = Option<pb::RetryPolicy>> {
    proptest::option::of((edgy_u32(), pb_duration(), pb_duration(), edgy_f64()).prop_map(
        |(max_attempts, initial_backoff, max_backoff, multiplier)| pb::RetryPolicy {
            max_attempts,
            initial_backoff,
            max_backoff,
            multiplier,
        },
    ))
}

/// A spec with every field anywhere; `keys` are the workflow keys it may
/// take and depend on.
fn spec(keys: &'static [&'static str]) -> impl Strategy<Value = pb::TaskSpec> {
    let key = prop_oneof![Just(String::new()), proptest::sample::select(keys).prop_map(str::to_owned), text(30)];
    let dependency = prop_oneof![
        proptest::sample::select(keys).prop_map(str::to_owned),
        any::<u128>().prop_map(|id| ulid::Ulid(id).to_string()),
        text(30),
    ];
    let lock = (text(30), prop_oneof![0..3i32, any::<i32>()]).prop_map(|(name, mode)| pb::Lock { name, mode });
    let head = (
        prop_oneof![Just("shell".to_owned()), text(30)],
        map(),
        prop_oneof![Just(String::new()), text(30)],
        prop_oneof![0..5i32, any::<i32>()],
        proptest::collection::vec(any::<u8>(), 0..80),
        text(40),
        map(),
        pb_duration(),
        pb_duration(),
    );
    let tail = (
        retry(),
        text(30),
        pb_timestamp(),
        proptest::collection::hash_map(text(12), text(60), 0..3),
        key,
        proptest::collection::vec(dependency, 0..6),
        proptest::collection::vec(lock, 0..5),
        proptest::option::of((text(30), edgy_u32()).prop_map(|(key, max)| pb::Concurrency { key, max })),
    );
    (head, tail).prop_map(
        |(
            (capability, selector, queue, priority, payload, content_type, metadata, timeout, queue_timeout),
            (retry, idempotency_key, not_before, trace_context, key, depends_on, locks, concurrency),
        )| pb::TaskSpec {
            capability,
            selector,
            queue,
            priority,
            payload,
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

/// A refusal is a client error that names what is wrong.
fn check_refusal(error: Error) -> Result<(), TestCaseError> {
    let status = tonic::Status::from(error);
    prop_assert!(
        matches!(status.code(), Code::InvalidArgument | Code::ResourceExhausted),
        "unexpected status {:?}",
        status
    );
    prop_assert!(status.message().contains(':'), "the message names no field: {}", status.message());
    Ok(())
}

fn attempt_ref() -> impl Strategy<Value = Option<pb::AttemptRef>> {
    let task_id = prop_oneof![any::<u128>().prop_map(|id| ulid::Ulid(id).to_string()), text(30)];
    proptest::option::of((task_id, edgy_u32()).prop_map(|(task_id, attempt)| pb::AttemptRef { task_id, attempt }))
}

fn register() -> impl Strategy<Value = pb::Register> {
    (
        text(30),
        proptest::collection::vec(text(30), 0..6),
        map(),
        edgy_u32(),
        text(40),
        text(140),
        proptest::collection::vec(attempt_ref().prop_map(Option::unwrap_or_default), 0..4),
        text(40),
    )
        .prop_map(
            |(name, capabilities, labels, slots, sdk_version, resume_token, held_attempts, metrics_address)| {
                pb::Register {
                    name,
                    capabilities,
                    labels,
                    slots,
                    sdk_version,
                    resume_token,
                    held_attempts,
                    metrics_address,
                }
            },
        )
}

/// Any message an agent can send, attempt references anywhere.
pub(super) fn agent_message() -> impl Strategy<Value = pb::AgentMessage> {
    use pb::agent_message::Msg;
    let msg = prop_oneof![
        register().prop_map(Msg::Register),
        Just(Msg::Heartbeat(pb::Heartbeat {})),
        Just(Msg::Drain(pb::DrainSelf {})),
        attempt_ref().prop_map(|attempt| Msg::Accept(pb::Accept { attempt })),
        (attempt_ref(), edgy_u32(), text(100))
            .prop_map(|(attempt, percent, message)| Msg::Progress(pb::ReportProgress { attempt, percent, message })),
        (attempt_ref(), proptest::collection::vec(any::<u8>(), 0..80), text(100))
            .prop_map(|(attempt, output, content_type)| Msg::Complete(pb::Complete { attempt, output, content_type })),
        (attempt_ref(), proptest::option::of((text(40), text(100), any::<bool>()))).prop_map(|(attempt, failure)| {
            Msg::Fail(pb::Fail {
                attempt,
                failure: failure.map(|(reason, message, retryable)| pb::Failure { reason, message, retryable }),
            })
        }),
        attempt_ref().prop_map(|attempt| Msg::Log(pb::LogLines { attempt, lines: Vec::new(), dropped: 0 })),
    ];
    proptest::option::of(msg).prop_map(|msg| pb::AgentMessage { msg })
}

const KEYS: &[&str] = &["a", "b", "c", "d", "e"];

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn a_spec_from_the_wire_is_accepted_within_every_bound_or_refused(spec in spec(KEYS)) {
        let config = make_config();
        let limits = &config.limits;
        let before = crate::model::now_ms();
        match convert::submission(spec, &config) {
            Err(error) => check_refusal(error)?,
            Ok(submission) => {
                let spec = submission.spec;
                prop_assert!(!spec.timeout.is_zero() && spec.timeout <= limits.max_timeout);
                prop_assert!(spec.queue_timeout.is_none_or(|d| d <= limits.max_queue_timeout));
                prop_assert!(spec.retry.initial_backoff <= limits.max_retry_backoff);
                prop_assert!(spec.retry.max_backoff <= limits.max_retry_backoff);
                prop_assert!(spec.retry.initial_backoff <= spec.retry.max_backoff);
                prop_assert!((1.0..=100.0).contains(&spec.retry.multiplier));
                prop_assert!((1..=limits.max_attempts).contains(&spec.retry.max_attempts));
                let latest = crate::model::now_ms() + limits.max_not_before_ahead.as_millis() as u64;
                prop_assert!(spec.not_before.is_none_or(|t| t <= latest), "{:?} > {} (from {})", spec.not_before, latest, before);
                prop_assert!(spec.payload.len() <= limits.max_payload_bytes);
                prop_assert!(spec.locks.len() <= limits.max_locks_per_task);
                prop_assert!(submission.depends_on.len() <= limits.max_dependencies_per_task);
                // Every backoff the policy can produce is a valid, capped duration.
                for failures in [0, 1, 2, 10, 64, u32::MAX] {
                    prop_assert!(spec.retry.backoff(failures, 1.0) <= spec.retry.max_backoff);
                }
            }
        }
    }

    #[test]
    fn registrations_and_reports_are_converted_or_refused_never_a_panic(
        register in register(),
        messages in proptest::collection::vec(agent_message(), 0..8),
    ) {
        let config = make_config();
        match convert::registration(register, &config) {
            Ok(registration) => {
                prop_assert!((1..=config.limits.max_agent_slots).contains(&registration.slots));
                prop_assert!(!registration.capabilities.is_empty());
            }
            Err(error) => check_refusal(error)?,
        }
        for message in messages {
            match convert::report(message, &config) {
                Ok(crate::model::AgentReport::Progress(_, _, percent, message)) => {
                    prop_assert!(percent <= 100);
                    prop_assert!(message.len() <= config.limits.max_message_len + '…'.len_utf8());
                }
                Ok(_) => {}
                Err(error) => check_refusal(error)?,
            }
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn workflows_from_the_wire_are_created_whole_or_refused(specs in proptest::collection::vec(spec(KEYS), 1..8)) {
        let mut harness = Harness::new(make_config());
        let submissions: Result<Vec<_>, Error> = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| convert::submission(spec, &harness.config).map_err(|e| e.in_field(&format!("tasks[{i}]"))))
            .collect();
        let submissions = match submissions {
            Ok(submissions) => submissions,
            Err(error) => return check_refusal(error),
        };
        let count = submissions.len();
        match harness.call(|reply| Command::Submit { submissions, reply }) {
            Ok(outcome) => {
                prop_assert_eq!(outcome.tasks.len(), count);
                let stored = crate::store::Store::tasks_after(harness.store.as_ref(), None, 100, false)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(stored.len(), count, "every task is stored");
            }
            Err(error) => {
                let status = tonic::Status::from(error);
                prop_assert!(
                    matches!(status.code(), Code::InvalidArgument | Code::ResourceExhausted | Code::NotFound | Code::FailedPrecondition),
                    "unexpected status {:?}",
                    status
                );
                let stored = crate::store::Store::tasks_after(harness.store.as_ref(), None, 100, false)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(stored.is_empty(), "a refused submit writes nothing");
            }
        }
        // Time passes over whatever was created: timers fire without panics.
        for _ in 0..4 {
            harness.advance(Duration::from_secs(400 * 24 * 3600));
        }
    }
}
