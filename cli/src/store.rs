//! `muster store …`: back up a running server's store, restore a data
//! directory from a backup, and verify a store, stopped or running.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use futures::StreamExt;
use muster_sdk::{Client, proto};
use muster_server::store::backup::{self, Header, Totals};
use muster_server::store::{RecordCounts, SledStore, Store, VerifyReport};
use serde_json::json;

use crate::output::{Output, table};

#[derive(Debug, Subcommand)]
pub(crate) enum StoreCommand {
    /// Write a backup of the running server's store at --server to FILE
    /// (admin): the whole store as it was when the backup began, while the
    /// server keeps serving.
    ///
    /// The bytes go to FILE.partial first; FILE appears only once the whole
    /// backup has arrived and its checksum matches. The file holds every
    /// payload, output and log line and the token hashes: it is created
    /// readable by its owner alone.
    Backup {
        /// Where to write the backup.
        file: PathBuf,
    },
    /// Build a new data directory from a backup; a server started on it
    /// has every task the backup holds, with its events and logs.
    ///
    /// Refuses a DIR that is not empty unless --force, which replaces a
    /// stopped server's store (never a directory holding anything else, nor
    /// a store a server has open). The new store is built beside DIR and
    /// put in its place only once the whole backup has been read, its
    /// checksum matched and the new store verified: on any failure DIR is
    /// left as it was.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The data directory to create.
        #[arg(long)]
        data_dir: PathBuf,
        /// Replace the store in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Check every record and index of a store: exit 0 when it is sound, 1
    /// with the problems on standard error otherwise. Nothing is repaired.
    ///
    /// With --data-dir, the store of a stopped server (a running server
    /// holds its lock); without, the store of the running server at
    /// --server (admin), read at one point in time while it serves.
    Verify {
        /// The data directory of a stopped server.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// A verification, from the store itself or from a server.
struct Verified {
    clean: bool,
    records: RecordCounts,
    problem_count: u64,
    problems_by_kind: Vec<(String, u64)>,
    problems: Vec<(String, String, String)>,
}

impl From<&VerifyReport> for Verified {
    fn from(report: &VerifyReport) -> Self {
        Self {
            clean: report.is_clean(),
            records: report.records.clone(),
            problem_count: report.problem_count,
            problems_by_kind: report.problems_by_kind.iter().map(|(k, n)| (k.as_str().to_owned(), *n)).collect(),
            problems: report
                .problems
                .iter()
                .map(|p| (p.kind.as_str().to_owned(), p.key.clone(), p.detail.clone()))
                .collect(),
        }
    }
}

impl From<proto::VerifyStoreResponse> for Verified {
    fn from(response: proto::VerifyStoreResponse) -> Self {
        Self {
            clean: response.clean,
            records: RecordCounts::from_kinds(response.records.iter().map(|r| (r.kind.as_str(), r.count))),
            problem_count: response.problem_count,
            problems_by_kind: response.problems_by_kind.into_iter().map(|p| (p.kind, p.count)).collect(),
            problems: response.problems.into_iter().map(|p| (p.kind, p.key, p.detail)).collect(),
        }
    }
}

/// Runs a store command; `client` connects to --server for those that
/// call it.
pub(crate) async fn store<F>(command: StoreCommand, server: &str, client: F, out: &Output) -> anyhow::Result<ExitCode>
where
    F: AsyncFnOnce() -> anyhow::Result<Client>,
{
    match command {
        StoreCommand::Backup { file } => {
            let (header, totals, bytes) = back_up(&client().await?, &file).await?;
            print_backup(&file, &header, &totals, bytes, out);
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Restore { file, data_dir, force } => {
            let (from, to) = (file.clone(), data_dir.clone());
            let restored = tokio::task::spawn_blocking(move || backup::restore(&from, &to, force))
                .await
                .context("the restore stopped")?
                .with_context(|| format!("cannot restore {} into {}", file.display(), data_dir.display()))?;
            print_restore(&file, &data_dir, &restored, out);
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Verify { data_dir: Some(data_dir) } => {
            let dir = data_dir.clone();
            let report = tokio::task::spawn_blocking(move || -> anyhow::Result<VerifyReport> {
                let store = SledStore::open_existing(&dir)?;
                store.verify().with_context(|| format!("reading the store in {}", dir.display()))
            })
            .await
            .context("the verification stopped")??;
            let shown = data_dir.display().to_string();
            Ok(report_verified(("data_dir", &shown), &Verified::from(&report), out))
        }
        StoreCommand::Verify { data_dir: None } => {
            let client = client().await?;
            let response = client.verify_store().await.context("cannot verify the server's store")?;
            Ok(report_verified(("server", server), &Verified::from(response), out))
        }
    }
}

/// Receives a backup into `file`: into `file.partial`, checked whole, then
/// renamed. Returns what it covers and holds, and its size.
async fn back_up(client: &Client, file: &Path) -> anyhow::Result<(Header, Totals, u64)> {
    let mut name = file.file_name().context("the backup file needs a name")?.to_os_string();
    name.push(".partial");
    let partial = file.with_file_name(name);
    let received = receive(client, &partial).await;
    let checked = match received {
        Ok(bytes) => {
            let path = partial.clone();
            tokio::task::spawn_blocking(move || backup::check(&path))
                .await
                .context("checking the backup stopped")?
                .context("the backup received does not check")
                .map(|(header, totals)| (header, totals, bytes))
        }
        Err(e) => Err(e),
    };
    match checked {
        Ok(done) => {
            std::fs::rename(&partial, file)
                .with_context(|| format!("renaming {} to {}", partial.display(), file.display()))?;
            let dir = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing {}", dir.display()))?;
            Ok(done)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// Writes the server's backup stream to `path` (owner-only) and syncs it.
async fn receive(client: &Client, path: &Path) -> anyhow::Result<u64> {
    use tokio::io::AsyncWriteExt;
    let mut chunks = client.backup_store().await.context("the server refused the backup")?;
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut out = options.open(path).await.with_context(|| format!("creating {}", path.display()))?;
    let mut bytes = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.context("the backup stopped part-way")?;
        out.write_all(&chunk).await.with_context(|| format!("writing {}", path.display()))?;
        bytes += chunk.len() as u64;
    }
    out.sync_all().await.with_context(|| format!("syncing {}", path.display()))?;
    Ok(bytes)
}

fn totals_json(totals: &Totals) -> serde_json::Value {
    totals.by_kind().iter().map(|(kind, n)| ((*kind).to_owned(), json!(n))).collect::<serde_json::Map<_, _>>().into()
}

fn totals_rows(totals: &Totals) -> Vec<Vec<String>> {
    totals.by_kind().iter().map(|(kind, n)| vec![(*kind).to_owned(), n.to_string()]).collect()
}

fn print_backup(file: &Path, header: &Header, totals: &Totals, bytes: u64, out: &Output) {
    if out.is_json() {
        let v = json!({
            "file": file.display().to_string(),
            "bytes": bytes,
            "format": header.format,
            "sequence": header.sequence,
            "compacted_through": header.compacted_through,
            "created_at_ms": header.created_at,
            "records": totals_json(totals),
        });
        println!("{v}");
        return;
    }
    println!("backup of the store at sequence {} written to {} ({bytes} bytes)", header.sequence, file.display());
    println!();
    table(&["RECORDS", "COUNT"], totals_rows(totals));
}

fn print_restore(file: &Path, dir: &Path, restored: &backup::Restored, out: &Output) {
    if out.is_json() {
        let v = json!({
            "file": file.display().to_string(),
            "data_dir": dir.display().to_string(),
            "sequence": restored.header.sequence,
            "compacted_through": restored.header.compacted_through,
            "created_at_ms": restored.header.created_at,
            "records": totals_json(&restored.totals),
            "clean": restored.report.is_clean(),
        });
        println!("{v}");
        return;
    }
    println!(
        "restored {} into {}: the store at sequence {}, verified clean",
        file.display(),
        dir.display(),
        restored.header.sequence
    );
    println!();
    table(&["RECORDS", "COUNT"], totals_rows(&restored.totals));
}

/// Prints a verification of the store `of` names (the data directory or
/// the server); the exit code says whether it was clean.
fn report_verified(of: (&str, &str), verified: &Verified, out: &Output) -> ExitCode {
    if out.is_json() {
        let by_kind: serde_json::Map<String, serde_json::Value> =
            verified.problems_by_kind.iter().map(|(kind, n)| (kind.clone(), json!(n))).collect();
        let problems: Vec<serde_json::Value> = verified
            .problems
            .iter()
            .map(|(kind, key, detail)| json!({"kind": kind, "key": key, "detail": detail}))
            .collect();
        let v = json!({
            of.0: of.1,
            "clean": verified.clean,
            "records": verified.records,
            "problem_count": verified.problem_count,
            "problems_by_kind": by_kind,
            "problems": problems,
        });
        println!("{v}");
    } else {
        let counts = verified.records.by_kind();
        table(&["RECORDS", "COUNT"], counts.iter().map(|(kind, n)| vec![kind.to_string(), n.to_string()]).collect());
        println!();
        println!("problems  {}", verified.problem_count);
        if !verified.problems.is_empty() {
            println!();
            table(
                &["PROBLEM", "KEY", "DETAIL"],
                verified
                    .problems
                    .iter()
                    .map(|(kind, key, detail)| vec![kind.clone(), key.clone(), detail.clone()])
                    .collect(),
            );
        }
    }
    if verified.clean {
        return ExitCode::SUCCESS;
    }
    let what = if of.0 == "server" {
        format!("the store of the server at {}", of.1)
    } else {
        format!("the store in {}", of.1)
    };
    eprintln!("error: {what} has {} problem(s):", verified.problem_count);
    for (kind, key, detail) in &verified.problems {
        eprintln!("  {kind} {key}: {detail}");
    }
    let unlisted = verified.problem_count.saturating_sub(verified.problems.len() as u64);
    if unlisted > 0 {
        eprintln!("  … and {unlisted} more");
    }
    ExitCode::FAILURE
}
