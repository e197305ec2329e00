//! `muster store …`: work on a data directory's store directly, with the
//! server stopped.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use muster_server::store::{SledStore, Store, VerifyReport};
use serde_json::json;

use crate::output::{Output, table};

#[derive(Debug, Subcommand)]
pub(crate) enum StoreCommand {
    /// Check every record and index of a stopped server's store: exit 0
    /// when it is sound, 1 with the problems on standard error otherwise.
    ///
    /// The server must not be running on the directory (its lock is
    /// refused). Nothing is repaired.
    Verify {
        /// The server's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

pub(crate) async fn store(command: StoreCommand, out: &Output) -> anyhow::Result<ExitCode> {
    match command {
        StoreCommand::Verify { data_dir } => {
            let dir = data_dir.clone();
            let report = tokio::task::spawn_blocking(move || -> anyhow::Result<VerifyReport> {
                let store = SledStore::open_existing(&dir)?;
                store.verify().with_context(|| format!("reading the store in {}", dir.display()))
            })
            .await
            .context("the verification stopped")??;
            print_report(&data_dir, &report, out);
            if report.is_clean() {
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("error: the store in {} has {} problem(s):", data_dir.display(), report.problem_count);
            for problem in &report.problems {
                eprintln!("  {} {}: {}", problem.kind.as_str(), problem.key, problem.detail);
            }
            let unlisted = report.problem_count.saturating_sub(report.problems.len() as u64);
            if unlisted > 0 {
                eprintln!("  … and {unlisted} more");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn print_report(dir: &std::path::Path, report: &VerifyReport, out: &Output) {
    if out.is_json() {
        let by_kind: serde_json::Map<String, serde_json::Value> =
            report.problems_by_kind.iter().map(|(kind, n)| (kind.as_str().to_owned(), json!(n))).collect();
        let v = json!({
            "data_dir": dir.display().to_string(),
            "clean": report.is_clean(),
            "records": report.records,
            "problem_count": report.problem_count,
            "problems_by_kind": by_kind,
            "problems": report.problems,
        });
        println!("{v}");
        return;
    }
    let counts = report.records.by_kind();
    table(&["RECORDS", "COUNT"], counts.iter().map(|(kind, n)| vec![kind.to_string(), n.to_string()]).collect());
    println!();
    println!("problems  {}", report.problem_count);
    if !report.problems.is_empty() {
        println!();
        table(
            &["PROBLEM", "KEY", "DETAIL"],
            report.problems.iter().map(|p| vec![p.kind.as_str().to_owned(), p.key.clone(), p.detail.clone()]).collect(),
        );
    }
}
