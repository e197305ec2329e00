//! `muster bench --store postgres://…`: each run gets a database of its
//! own, created beside the one the URL names and dropped when the run ends,
//! so runs never see each other's tasks and the given database is left
//! as it was.

use anyhow::{Context, bail};

/// A database created for one run.
pub(super) struct Scratch {
    /// The URL of the scratch database.
    pub(super) url: String,
    /// The URL it was created from, to drop it from.
    base: String,
    name: String,
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let Some(scheme_end) = url.find("://") else { bail!("--store: {url:?} is not a postgres:// URL") };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let after = &rest[authority_end..];
    let query = after.find('?').map_or("", |q| &after[q..]);
    Ok(format!("{}{}/{db}{query}", &url[..scheme_end + 3], &rest[..authority_end]))
}

async fn execute(url: &str, sql: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {}", muster_server::store::redact_store_url(url)))?;
    let driver = tokio::spawn(connection);
    let result = client.batch_execute(sql).await.with_context(|| format!("running {sql}"));
    drop(client);
    let _ = driver.await;
    result
}

impl Scratch {
    pub(super) async fn create(base: &str) -> anyhow::Result<Self> {
        let name = format!("muster_bench_{}", ulid::Ulid::new().to_string().to_lowercase());
        execute(base, &format!("CREATE DATABASE {name}")).await?;
        Ok(Self { url: with_database(base, &name)?, base: base.to_owned(), name })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let (base, sql) = (self.base.clone(), format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        // Dropped from async code: the drop runs on a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(execute(&base, &sql))
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("bench: could not drop the scratch database {}: {e:#}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced_and_the_rest_kept() -> anyhow::Result<()> {
        assert_eq!(with_database("postgres://u@h:5432/db", "x")?, "postgres://u@h:5432/x");
        assert_eq!(with_database("postgres://u:p@h/db?sslmode=disable", "x")?, "postgres://u:p@h/x?sslmode=disable");
        assert_eq!(with_database("postgresql://h:1", "x")?, "postgresql://h:1/x");
        assert!(with_database("h:1/db", "x").is_err());
        Ok(())
    }
}
