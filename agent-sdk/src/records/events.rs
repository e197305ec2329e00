//! The [`TaskEvent`]s a watch streams.

use std::time::SystemTime;

use super::tasks::{Progress, TaskState, optional_state};
use super::time::system_time;
use crate::proto;

/// What a [`TaskEvent`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// The task changed state.
    State,
    /// The live attempt reported progress.
    Progress,
    /// A value this SDK does not know, kept as its wire number.
    Unknown(i32),
}

impl From<i32> for EventKind {
    fn from(value: i32) -> Self {
        match proto::EventKind::try_from(value) {
            Ok(proto::EventKind::State) => Self::State,
            Ok(proto::EventKind::Progress) => Self::Progress,
            Ok(proto::EventKind::Unspecified) | Err(_) => Self::Unknown(value),
        }
    }
}

/// One change to a task, as a watch streams it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskEvent {
    /// Strictly increasing across all tasks; resume a watch after it.
    pub sequence: u64,
    /// The task's id.
    pub task_id: String,
    /// A state change or progress.
    pub kind: EventKind,
    /// The state entered (the current one for progress).
    pub state: TaskState,
    /// The state left; `None` for the task's first event.
    pub previous_state: Option<TaskState>,
    /// The attempt number.
    pub attempt: u32,
    /// The agent involved, if any.
    pub agent_id: String,
    /// The task's queue.
    pub queue: String,
    /// The task's capability.
    pub capability: String,
    /// Why it happened (`submitted`, `assigned`, `completed`, `agent_lost`,
    /// `timeout`, a retried failure's reason...).
    pub reason: String,
    /// Details, for people.
    pub message: String,
    /// The progress reported, for progress events.
    pub progress: Option<Progress>,
    /// When it happened.
    pub at: Option<SystemTime>,
    /// The task's workflow; empty when none.
    pub workflow_id: String,
    /// The token name of whoever caused it by a call (submit, cancel,
    /// retry); empty for the scheduler's own transitions.
    pub actor: String,
}

impl TaskEvent {
    /// True for a state change into a terminal state.
    pub fn is_terminal(&self) -> bool {
        self.kind == EventKind::State && self.state.is_terminal()
    }
}

impl From<proto::TaskEvent> for TaskEvent {
    fn from(event: proto::TaskEvent) -> Self {
        Self {
            sequence: event.sequence,
            task_id: event.task_id,
            kind: event.kind.into(),
            state: event.state.into(),
            previous_state: optional_state(event.previous_state),
            attempt: event.attempt,
            agent_id: event.agent_id,
            queue: event.queue,
            capability: event.capability,
            reason: event.reason,
            message: event.message,
            progress: event.progress.map(Progress::from),
            at: system_time(event.at),
            workflow_id: event.workflow_id,
            actor: event.actor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_their_kind_and_a_first_event_has_no_previous_state() {
        let wire = proto::TaskEvent {
            sequence: 3,
            kind: proto::EventKind::State.into(),
            state: proto::TaskState::Succeeded.into(),
            previous_state: 0,
            ..Default::default()
        };
        let event = TaskEvent::from(wire);
        assert_eq!((event.kind, event.state, event.previous_state), (EventKind::State, TaskState::Succeeded, None));
        assert!(event.is_terminal());
        assert_eq!(EventKind::from(99), EventKind::Unknown(99));
        let progress = proto::TaskEvent {
            kind: proto::EventKind::Progress.into(),
            state: proto::TaskState::Running.into(),
            previous_state: proto::TaskState::Running.into(),
            progress: Some(proto::Progress { percent: 50, message: "half".to_owned(), at: None }),
            ..Default::default()
        };
        let event = TaskEvent::from(progress);
        assert_eq!(event.previous_state, Some(TaskState::Running));
        assert_eq!(event.progress.map(|p| p.percent), Some(50));
    }
}
