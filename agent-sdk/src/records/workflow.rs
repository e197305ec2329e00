//! Workflows and explanations as the task service reports them.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::tasks::TaskState;
use super::time::system_time;
use crate::proto;

/// One task of a [`Workflow`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkflowTask {
    /// The task's id.
    pub id: String,
    /// Its key in the workflow.
    pub key: String,
    /// Its state.
    pub state: TaskState,
    /// Its capability.
    pub capability: String,
    /// Ids of the tasks it waits for.
    pub depends_on_ids: Vec<String>,
    /// Its current or last attempt number.
    pub attempt: u32,
}

impl From<proto::WorkflowTask> for WorkflowTask {
    fn from(task: proto::WorkflowTask) -> Self {
        Self {
            id: task.id,
            key: task.key,
            state: task.state.into(),
            capability: task.capability,
            depends_on_ids: task.depends_on_ids,
            attempt: task.attempt,
        }
    }
}

/// A workflow's tasks and progress.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Workflow {
    /// Its id.
    pub id: String,
    /// Its tasks.
    pub tasks: Vec<WorkflowTask>,
    /// Task count per state name (`"SUCCEEDED"`: 3).
    pub counts: BTreeMap<String, u32>,
    /// Finished tasks over all tasks, 0 to 100.
    pub percent_complete: f64,
    /// True when every task is finished.
    pub done: bool,
}

impl From<proto::Workflow> for Workflow {
    fn from(workflow: proto::Workflow) -> Self {
        Self {
            id: workflow.id,
            tasks: workflow.tasks.into_iter().map(WorkflowTask::from).collect(),
            counts: workflow.counts.into_iter().collect(),
            percent_complete: workflow.percent_complete,
            done: workflow.done,
        }
    }
}

/// One reason a task is not running.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExplanationReason {
    /// A machine-readable code: `waiting_on_dependencies`, `not_before`,
    /// `retry_backoff`, `queue_paused`, `queue_at_max_running`,
    /// `no_agent_with_capability`, `no_agent_matches_selector`,
    /// `all_capable_agents_busy`, `lock_held`, `concurrency_limit`,
    /// `running`, `finished`.
    pub code: String,
    /// The reason, for people.
    pub message: String,
    /// Tasks involved: unfinished dependencies, lock holders, running tasks
    /// of the concurrency key.
    pub task_ids: Vec<String>,
    /// Until when, for time-based reasons.
    pub until: Option<SystemTime>,
    /// Agents involved, such as the closest ones and the labels they lack.
    pub agents: Vec<String>,
}

impl From<proto::Reason> for ExplanationReason {
    fn from(reason: proto::Reason) -> Self {
        Self {
            code: reason.code,
            message: reason.message,
            task_ids: reason.task_ids,
            until: system_time(reason.until),
            agents: reason.agents,
        }
    }
}

/// Why a task is not running, from the scheduler's live state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Explanation {
    /// The task's id.
    pub task_id: String,
    /// Its state.
    pub state: TaskState,
    /// Every reason that applies.
    pub reasons: Vec<ExplanationReason>,
}

impl From<proto::Explanation> for Explanation {
    fn from(explanation: proto::Explanation) -> Self {
        Self {
            task_id: explanation.task_id,
            state: explanation.state.into(),
            reasons: explanation.reasons.into_iter().map(ExplanationReason::from).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflows_and_explanations_convert() {
        let wire = proto::Workflow {
            id: "w1".to_owned(),
            tasks: vec![proto::WorkflowTask {
                key: "build".to_owned(),
                state: proto::TaskState::Running.into(),
                ..Default::default()
            }],
            counts: [("RUNNING".to_owned(), 1)].into(),
            percent_complete: 0.0,
            done: false,
        };
        let workflow = Workflow::from(wire);
        assert_eq!((workflow.tasks[0].key.as_str(), workflow.tasks[0].state), ("build", TaskState::Running));
        assert_eq!(workflow.counts.get("RUNNING"), Some(&1));
        let wire = proto::Explanation {
            task_id: "t1".to_owned(),
            state: proto::TaskState::Queued.into(),
            reasons: vec![proto::Reason { code: "queue_paused".to_owned(), ..Default::default() }],
        };
        let explanation = Explanation::from(wire);
        assert_eq!(explanation.state, TaskState::Queued);
        assert_eq!(explanation.reasons[0].code, "queue_paused");
        assert_eq!(explanation.reasons[0].until, None);
    }
}
