//! `ExplainTask`: every reason a task is not running, computed from the
//! scheduler's live state.

use tokio::time::Instant;

use super::Core;
use crate::error::Error;
use crate::model::*;

fn reason(code: &'static str, message: String) -> Reason {
    Reason { code, message, ..Reason::default() }
}

impl Core {
    pub(super) fn explain(&self, id: TaskId, now: Instant) -> Result<Explanation, Error> {
        let Some(live) = self.tasks.get(&id) else {
            let task = self.lookup(id)?.ok_or_else(|| Error::NotFound(format!("task {id} not found")))?;
            let message = format!("the task ended as {}", task.state.name());
            return Ok(Explanation { task_id: id, state: task.state, reasons: vec![reason("finished", message)] });
        };
        let task = &live.task;
        let mut reasons = Vec::new();
        match task.state {
            TaskState::Pending if live.waiting > 0 => {
                let waiting: Vec<TaskId> =
                    task.spec.depends_on.iter().copied().filter(|d| self.tasks.contains_key(d)).collect();
                let names: Vec<String> = waiting
                    .iter()
                    .map(|d| {
                        let parent = self.tasks.get(d).map(|l| &l.task);
                        let key = parent.and_then(|t| t.spec.key.clone()).unwrap_or_else(|| d.to_string());
                        format!("{key} ({})", parent.map_or("?", |t| t.state.name()))
                    })
                    .collect();
                reasons.push(Reason {
                    task_ids: waiting,
                    ..reason(
                        "waiting_on_dependencies",
                        format!("waiting for {} dependencies to succeed: {}", names.len(), names.join(", ")),
                    )
                });
            }
            TaskState::Pending => {
                let until = task.ready_at;
                let in_ms = until.map(|u| u.saturating_sub(self.journal.clock.ms(now))).unwrap_or(0);
                let retrying = task.attempt > task.attempt_base && task.failure.is_some();
                let (code, what) = if retrying {
                    ("retry_backoff", "backing off before attempt")
                } else {
                    ("not_before", "not before")
                };
                let message = if retrying {
                    format!("{what} {} for {in_ms}ms", task.attempt + 1)
                } else {
                    format!("{what} its start time, in {in_ms}ms")
                };
                reasons.push(Reason { until, ..reason(code, message) });
            }
            TaskState::Queued => self.explain_queued(live, now, &mut reasons),
            TaskState::Assigned | TaskState::Running => {
                let agent = task.attempts.last().map(|a| a.agent_name.clone()).unwrap_or_default();
                let message = format!("attempt {} is {} on agent {agent}", task.attempt, task.state.name());
                reasons.push(reason("running", message));
            }
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled => {
                reasons.push(reason("finished", format!("the task ended as {}", task.state.name())));
            }
        }
        Ok(Explanation { task_id: id, state: task.state, reasons })
    }

    fn explain_queued(&self, live: &super::Live, now: Instant, reasons: &mut Vec<Reason>) {
        let task = &live.task;
        let spec = &task.spec;
        if let Some(queue) = self.resources.queue(&spec.queue) {
            if queue.record.paused {
                reasons.push(reason("queue_paused", format!("queue {} is paused", spec.queue)));
            }
            let max = queue.record.max_running;
            if max > 0 && queue.running >= max {
                let message = format!("queue {} runs {} tasks, its maximum", spec.queue, queue.running);
                reasons.push(reason("queue_at_max_running", message));
            }
        }
        for lock in &spec.locks {
            if let Some(holders) = self.resources.conflicting(&lock.name, lock.mode) {
                let held = holders.holders();
                let list: Vec<String> = held.iter().map(ToString::to_string).collect();
                reasons.push(Reason {
                    task_ids: held,
                    ..reason("lock_held", format!("lock {} is held by {}", lock.name, list.join(", ")))
                });
            }
        }
        if let Some(c) = &spec.concurrency {
            let running = self.resources.running_with_key(&c.key);
            if running >= c.max {
                let holders: Vec<TaskId> = self
                    .tasks
                    .values()
                    .filter(|l| {
                        l.task.state.is_active() && l.task.spec.concurrency.as_ref().is_some_and(|o| o.key == c.key)
                    })
                    .map(|l| l.task.id)
                    .collect();
                reasons.push(Reason {
                    task_ids: holders,
                    ..reason(
                        "concurrency_limit",
                        format!("{running} tasks with concurrency key {} run, its maximum of {}", c.key, c.max),
                    )
                });
            }
        }
        let connected: Vec<_> = self.sessions.iter().filter(|s| s.is_connected()).collect();
        let capable: Vec<_> = connected.iter().filter(|s| s.record.capabilities.contains(&spec.capability)).collect();
        if capable.is_empty() {
            let agents: Vec<String> = connected
                .iter()
                .take(5)
                .map(|s| format!("{} has {}", s.record.name, s.record.capabilities.join(", ")))
                .collect();
            reasons.push(Reason {
                agents,
                ..reason("no_agent_with_capability", format!("no connected agent has capability {}", spec.capability))
            });
            return;
        }
        let matching: Vec<_> = capable.iter().filter(|s| s.matches(&spec.selector)).collect();
        if matching.is_empty() {
            let agents: Vec<String> = capable
                .iter()
                .take(5)
                .map(|s| {
                    let lacks: Vec<String> = spec
                        .selector
                        .iter()
                        .filter(|(k, v)| s.record.labels.get(*k) != Some(*v))
                        .map(|(k, v)| match s.record.labels.get(k) {
                            Some(has) => format!("{k}={v} (has {k}={has})"),
                            None => format!("{k}={v}"),
                        })
                        .collect();
                    format!("{} lacks {}", s.record.name, lacks.join(", "))
                })
                .collect();
            reasons.push(Reason {
                agents,
                ..reason(
                    "no_agent_matches_selector",
                    format!(
                        "{} agents have capability {} but none matches the selector",
                        capable.len(),
                        spec.capability
                    ),
                )
            });
            return;
        }
        let free = matching.iter().any(|s| !s.record.draining && s.busy() < s.record.slots);
        if !free {
            let agents: Vec<String> = matching
                .iter()
                .map(|s| {
                    let how = if s.record.draining {
                        "draining".to_owned()
                    } else {
                        format!("{}/{} slots busy", s.held.len(), s.record.slots)
                    };
                    format!("{}: {how}", s.record.name)
                })
                .collect();
            reasons.push(Reason {
                agents,
                ..reason(
                    "all_capable_agents_busy",
                    format!("all {} matching agents are busy or draining", matching.len()),
                )
            });
        }
        if reasons.is_empty() {
            let _ = now;
            reasons.push(reason("dispatching", "the task is about to be assigned".to_owned()));
        }
    }
}
