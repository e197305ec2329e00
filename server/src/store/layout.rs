//! The key layout both stores share: sled keeps it in two trees,
//! PostgreSQL in two tables of keys and values, so the two order, export
//! and verify their records alike.
//!
//! Keys: `t`+id → task, `u`+id → unfinished marker, `e`+seq → the events
//! of one batch from that sequence on (at most `EVENTS_PER_RECORD`),
//! `a`+id → agent, `k`+key → task id, `q`+name → queue settings, `c`+name → token,
//! `w`+workflow id+task id → workflow membership, `f`+finished-at (ms,
//! big-endian)+task id → finished index (for retention, oldest first),
//! `m`+name → store metadata (`event-floor`: the last sequence compacted
//! away; `finished-index`: the finished index is complete).
//!
//! Attempt logs are apart (task id + attempt → log), so their larger
//! records never share pages with the task records the scheduler rewrites
//! on every transition.

use super::verify::Checker;
use super::{Record, Removal, StoreError, Write, decode, encode};
use crate::model::{AgentId, Millis, TaskEvent, TaskId, WorkflowId};

/// The key spaces a reading walks, in order: the records, then the
/// attempt logs.
pub(super) const TREES: usize = 2;
pub(super) const RECORDS: usize = 0;
pub(super) const LOGS: usize = 1;

pub(super) const TASK: u8 = b't';
pub(super) const UNFINISHED: u8 = b'u';
pub(super) const EVENT: u8 = b'e';
/// Events stored under one key. A batch's events go out together, so
/// grouping them saves a tree operation per event; the bound keeps a leaf
/// of such records (sled splits leaves past 16 entries) well under sled's
/// blob threshold of a quarter segment.
pub(super) const EVENTS_PER_RECORD: usize = 16;
pub(super) const AGENT: u8 = b'a';
pub(super) const IDEMPOTENCY: u8 = b'k';
pub(super) const QUEUE: u8 = b'q';
pub(super) const WORKFLOW: u8 = b'w';
pub(super) const TOKEN: u8 = b'c';
pub(super) const FINISHED: u8 = b'f';
pub(super) const META: u8 = b'm';
pub(super) const EVENT_FLOOR: &[u8] = b"event-floor";
pub(super) const FINISHED_INDEX: &[u8] = b"finished-index";

pub(super) fn key(prefix: u8, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(prefix);
    k.extend_from_slice(id);
    k
}

pub(super) fn finished_key(finished_at: Millis, id: TaskId) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(FINISHED);
    k.extend_from_slice(&finished_at.to_be_bytes());
    k.extend_from_slice(&id.to_bytes());
    k
}

pub(super) fn parse_finished_key(rest: &[u8]) -> Option<(Millis, TaskId)> {
    let at = Millis::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let id: [u8; 16] = rest.get(8..)?.try_into().ok()?;
    Some((at, TaskId::from_bytes(id)))
}

pub(super) fn workflow_key(workflow: WorkflowId, task: TaskId) -> Vec<u8> {
    let mut k = key(WORKFLOW, &workflow.to_bytes());
    k.extend_from_slice(&task.to_bytes());
    k
}

pub(super) fn log_key(task: TaskId, attempt: u32) -> [u8; 20] {
    let mut k = [0; 20];
    k[..16].copy_from_slice(&task.to_bytes());
    k[16..].copy_from_slice(&attempt.to_be_bytes());
    k
}

/// An event record: a group of events, or one event as stores before
/// grouping wrote them.
pub(super) fn decode_events(bytes: &[u8]) -> Result<Vec<TaskEvent>, StoreError> {
    decode::<Vec<TaskEvent>>(bytes).or_else(|_| decode::<TaskEvent>(bytes).map(|event| vec![event]))
}

/// The events in an event record, from its MessagePack array header alone
/// (after the version byte); a record that is no array is one event as
/// stores before grouping wrote it.
pub(super) fn events_in_record(bytes: &[u8]) -> u64 {
    match bytes.get(1..) {
        Some([b @ 0x90..=0x9f, ..]) => u64::from(b & 0x0f),
        Some([0xdc, hi, lo, ..]) => u64::from(u16::from_be_bytes([*hi, *lo])),
        Some([0xdd, a, b, c, d, ..]) => u64::from(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => 1,
    }
}

pub(super) fn task_id_of(key: &[u8]) -> Result<TaskId, StoreError> {
    let bytes: [u8; 16] =
        key.get(1..17).and_then(|b| b.try_into().ok()).ok_or_else(|| StoreError::Codec("bad task key".into()))?;
    Ok(TaskId::from_bytes(bytes))
}

/// A key and its value.
pub(super) type Entry = (Vec<u8>, Vec<u8>);

/// Where a store puts the keys a write sets and removes.
pub(super) trait Changes {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>);
    fn remove(&mut self, key: Vec<u8>);
}

/// The task a workflow-index key names.
pub(super) fn workflow_member(k: &[u8]) -> Result<TaskId, StoreError> {
    let bytes: [u8; 16] =
        k.get(17..33).and_then(|b| b.try_into().ok()).ok_or_else(|| StoreError::Codec("bad workflow key".into()))?;
    Ok(TaskId::from_bytes(bytes))
}

/// The key and task of an idempotency-index entry.
pub(super) fn idempotency_entry(k: &[u8], v: &[u8]) -> Result<(String, TaskId), StoreError> {
    let name = String::from_utf8(k[1..].to_vec()).map_err(|e| StoreError::Codec(e.to_string()))?;
    let bytes: [u8; 16] = v.try_into().map_err(|_| StoreError::Codec("bad idempotency value".into()))?;
    Ok((name, TaskId::from_bytes(bytes)))
}

/// The changes of one write to the records, except what each store does
/// its own way: events (grouped per batch, see [`event_records`]), the
/// event log's cut (a range), and a removed task's attempt logs.
pub(super) fn changes(write: &Write, out: &mut impl Changes) -> Result<(), StoreError> {
    match write {
        Write::Task(task) => {
            let id = task.id.to_bytes();
            out.insert(key(TASK, &id), encode(task)?);
            if task.state.is_terminal() {
                out.remove(key(UNFINISHED, &id));
                out.insert(finished_key(task.updated_at, task.id), Vec::new());
            } else {
                out.insert(key(UNFINISHED, &id), Vec::new());
            }
            if let Some(k) = &task.spec.idempotency_key {
                out.insert(key(IDEMPOTENCY, k.as_bytes()), id.to_vec());
            }
            if let Some(workflow) = task.workflow {
                out.insert(workflow_key(workflow, task.id), Vec::new());
            }
        }
        Write::Reopen { id, finished_at } => out.remove(finished_key(*finished_at, *id)),
        Write::Remove(removal) => remove_task(out, removal),
        Write::Queue(queue) => out.insert(key(QUEUE, queue.name.as_bytes()), encode(queue)?),
        Write::Token(token) => out.insert(key(TOKEN, token.name.as_bytes()), encode(token)?),
        Write::Agent(agent) => out.insert(key(AGENT, &agent.id.to_bytes()), encode(agent)?),
        Write::RemoveAgent(id) => out.remove(key(AGENT, &id.to_bytes())),
        Write::Event(_) | Write::CompactEvents { .. } => {}
    }
    Ok(())
}

/// The removal of a finished task's records and index entries.
fn remove_task(out: &mut impl Changes, removal: &Removal) {
    let id = removal.id.to_bytes();
    out.remove(key(TASK, &id));
    out.remove(key(UNFINISHED, &id));
    out.remove(finished_key(removal.finished_at, removal.id));
    if let Some(k) = &removal.idempotency_key {
        out.remove(key(IDEMPOTENCY, k.as_bytes()));
    }
    if let Some(workflow) = removal.workflow {
        out.remove(workflow_key(workflow, removal.id));
    }
}

/// The event records of one batch's events: sequences only grow, so
/// records never overlap and each is found by the first sequence it holds.
pub(super) fn event_records(writes: &[Write]) -> Result<Vec<Entry>, StoreError> {
    let events: Vec<&TaskEvent> =
        writes.iter().filter_map(|w| if let Write::Event(e) = w { Some(e) } else { None }).collect();
    let mut out = Vec::with_capacity(events.len().div_ceil(EVENTS_PER_RECORD));
    for group in events.chunks(EVENTS_PER_RECORD) {
        if let Some(first) = group.first() {
            out.push((key(EVENT, &first.sequence.to_be_bytes()), encode(&group)?));
        }
    }
    Ok(out)
}

/// The key of the first event record of the log, and the one that holds
/// `through` and everything before it: the range a cut removes.
pub(super) fn event_range_through(through: u64) -> (Vec<u8>, Vec<u8>) {
    (vec![EVENT], key(EVENT, &through.to_be_bytes()))
}

/// Where the event log can be cut, from the values of its first records
/// in order: after the last of the records that hold nothing later than
/// `until` (see `Store::events_cut`).
pub(super) fn events_cut<V: AsRef<[u8]>>(
    records: impl IntoIterator<Item = Result<V, StoreError>>,
    until: Millis,
) -> Result<Option<u64>, StoreError> {
    let mut cut = None;
    for record in records {
        let events = decode_events(record?.as_ref())?;
        if events.iter().any(|e| e.at > until) {
            break;
        }
        cut = events.iter().map(|e| e.sequence).max().or(cut);
    }
    Ok(cut)
}

/// The first key of a task's attempt logs and the first after them.
pub(super) fn log_range(task: TaskId) -> (Vec<u8>, Vec<u8>) {
    let id = task.to_bytes();
    let mut end = log_key(task, u32::MAX).to_vec();
    end.push(0);
    (id.to_vec(), end)
}

/// What a backup holds of one key: its record, or nothing for an index
/// entry or a mark (which writing the records back rebuilds).
pub(super) fn exported(tree: usize, k: &[u8], v: &[u8]) -> Result<Option<Record>, StoreError> {
    let named = |what: &str, e: StoreError| StoreError::Codec(format!("{what} record {}: {e}", shown_key(k)));
    if tree == LOGS {
        return decode(v).map(|log| Some(Record::Log(log))).map_err(|e| named("log", e));
    }
    let record = match k.first().copied() {
        Some(TASK) => Record::Task(decode(v).map_err(|e| named("task", e))?),
        Some(EVENT) => Record::Events(decode_events(v).map_err(|e| named("event", e))?),
        Some(AGENT) => Record::Agent(decode(v).map_err(|e| named("agent", e))?),
        Some(QUEUE) => Record::Queue(decode(v).map_err(|e| named("queue", e))?),
        Some(TOKEN) => Record::Token(decode(v).map_err(|e| named("token", e))?),
        Some(UNFINISHED | IDEMPOTENCY | WORKFLOW | FINISHED | META) => return Ok(None),
        _ => return Err(StoreError::Codec(format!("a key outside every keyspace: {}", shown_key(k)))),
    };
    Ok(Some(record))
}

/// A key for a message: its keyspace letter, then its bytes in hex.
pub(super) fn shown_key(k: &[u8]) -> String {
    let hex: String = k.iter().skip(1).map(|b| format!("{b:02x}")).collect();
    match k.first() {
        Some(&p) if p.is_ascii_graphic() => format!("{}/{hex}", p as char),
        _ => k.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// Checks one key of the records tree.
pub(super) fn check_record(checker: &mut Checker, k: &[u8], v: &[u8]) {
    let Some((&prefix, rest)) = k.split_first() else {
        checker.unknown_key(k);
        return;
    };
    let id = <[u8; 16]>::try_from(rest).ok();
    match prefix {
        TASK => match id {
            Some(id) => checker.task(TaskId::from_bytes(id), decode(v)),
            None => checker.bad_key("task", rest, "not a task id"),
        },
        UNFINISHED => match id {
            Some(id) => checker.unfinished(TaskId::from_bytes(id)),
            None => checker.bad_key("unfinished", rest, "not a task id"),
        },
        EVENT => match <[u8; 8]>::try_from(rest) {
            Ok(sequence) => checker.events(u64::from_be_bytes(sequence), decode_events(v)),
            Err(_) => checker.bad_key("event", rest, "not a sequence"),
        },
        AGENT => match id {
            Some(id) => checker.agent(AgentId::from_bytes(id), decode(v)),
            None => checker.bad_key("agent", rest, "not an agent id"),
        },
        IDEMPOTENCY => match (std::str::from_utf8(rest), <[u8; 16]>::try_from(v)) {
            (Ok(name), Ok(task)) => checker.idempotency_key(name.to_owned(), TaskId::from_bytes(task)),
            (Err(_), _) => checker.bad_idempotency_entry(rest, "the key is not UTF-8"),
            (_, Err(_)) => checker.bad_idempotency_entry(rest, "the value is not a task id"),
        },
        QUEUE | TOKEN => match std::str::from_utf8(rest) {
            Ok(name) if prefix == QUEUE => checker.queue(name, decode(v)),
            Ok(name) => checker.token(name, decode(v)),
            Err(_) => {
                let keyspace = if prefix == QUEUE { "queue" } else { "token" };
                checker.bad_key(keyspace, rest, "the name is not UTF-8")
            }
        },
        FINISHED => match parse_finished_key(rest).filter(|_| rest.len() == 24) {
            Some((at, id)) => checker.finished_entry(at, id),
            None => checker.bad_key("finished", rest, "not a time and a task id"),
        },
        META => match rest {
            EVENT_FLOOR => match <[u8; 8]>::try_from(v) {
                Ok(floor) => checker.compacted_through(u64::from_be_bytes(floor)),
                Err(_) => checker.bad_key("meta", rest, "the event floor is not a sequence"),
            },
            FINISHED_INDEX => checker.finished_index_complete(),
            _ => checker.unknown_key(k),
        },
        WORKFLOW => match (rest.get(..16), rest.get(16..)) {
            (Some(workflow), Some(task)) if rest.len() == 32 => {
                let workflow = WorkflowId::from_bytes(workflow.try_into().unwrap_or_default());
                checker.workflow_entry(workflow, TaskId::from_bytes(task.try_into().unwrap_or_default()))
            }
            _ => checker.bad_key("workflow", rest, "not a workflow id and a task id"),
        },
        _ => checker.unknown_key(k),
    }
}

/// Checks one key of the logs tree.
pub(super) fn check_log(checker: &mut Checker, k: &[u8], v: &[u8]) {
    match (k.get(..16), k.get(16..)) {
        (Some(task), Some(attempt)) if k.len() == 20 => checker.log(
            TaskId::from_bytes(task.try_into().unwrap_or_default()),
            u32::from_be_bytes(attempt.try_into().unwrap_or_default()),
            decode(v),
        ),
        _ => checker.bad_key("log", k, "not a task id and an attempt"),
    }
}
