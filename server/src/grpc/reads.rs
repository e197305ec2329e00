//! Store reads from the gRPC handlers, run off the async threads: the
//! store answers with what has been acknowledged.

use std::sync::Arc;

use tonic::Status;

use crate::error::Error;
use crate::model::{Task, TaskId};
use crate::store::Store;

/// Runs store work off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("store read failed: {e}")))?
        .map_err(Status::from)
}

/// One task from the store, or NOT_FOUND.
pub(super) async fn read_task(store: &Arc<dyn Store>, id: TaskId) -> Result<Task, Status> {
    let store = store.clone();
    let task = blocking(move || store.task(id).map_err(Error::from)).await?;
    Ok(task.ok_or_else(|| Error::NotFound(format!("task {id} not found")))?)
}
