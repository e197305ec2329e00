//! The data directory of a real `muster serve`: payloads and token hashes
//! are readable by the server's user alone.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use muster_sdk::{Client, NewTask};

/// Every path beneath `dir` with its permission bits.
fn modes(dir: &Path) -> std::io::Result<Vec<(PathBuf, u32)>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let metadata = std::fs::symlink_metadata(&path)?;
        found.push((path.clone(), metadata.permissions().mode() & 0o7777));
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(found)
}

#[tokio::test]
async fn the_data_directory_and_every_file_in_it_are_for_the_servers_user_alone() -> TestResult {
    let root = tempfile::tempdir()?;
    // An existing directory left open, with a file in it, as an older
    // version or an operator's mkdir may have made it.
    let data = root.path().join("data");
    std::fs::create_dir(&data)?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(data.join("notes"), "kept by hand")?;
    std::fs::set_permissions(data.join("notes"), std::fs::Permissions::from_mode(0o644))?;

    // With authentication on, the bootstrap admin token is written too.
    let (mut server, endpoint) = spawn_serve_process(&data, &["--auth"]);
    let token = std::fs::read_to_string(data.join(muster_server::ADMIN_TOKEN_FILE))?;
    let client = Client::connect_with(endpoint, &muster_sdk::Credentials::new().token(token.trim())?).await?;
    // Payloads large and small, so the store writes values of both kinds.
    for size in [16, 256 << 10] {
        client.submit(NewTask::new("nobody").payload(vec![7u8; size]).build()).await?;
    }
    // A graceful stop flushes what the store holds.
    // SAFETY: kill only sends a signal to the child this test started.
    unsafe { libc::kill(server.pid(), libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while server.child.try_wait()?.is_none() {
        assert!(std::time::Instant::now() < deadline, "muster serve did not stop after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let modes = modes(&data)?;
    assert!(modes.len() > 3, "the store wrote files: {modes:?}");
    assert_eq!(modes[0], (data.clone(), 0o700), "the data directory");
    let open: Vec<_> = modes.iter().filter(|(_, mode)| mode & 0o077 != 0).collect();
    assert!(open.is_empty(), "readable beyond the server's user: {open:?}");
    Ok(())
}
