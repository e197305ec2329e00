//! `muster token …`: create, list and revoke the bearer tokens that callers
//! and agents authenticate with (admin only).

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use muster_sdk::{Client, Role, TokenInfo, proto};
use serde_json::{Value, json};

use crate::output::{Output, table, text, time};

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token and print its secret (shown only this once).
    Create {
        /// A unique name, recorded as the actor of what the token does.
        #[arg(long)]
        name: String,
        /// admin, operator, submitter, agent or viewer.
        #[arg(long)]
        role: String,
        /// Limit a non-agent token to this queue (repeatable).
        #[arg(long)]
        queue: Vec<String>,
        /// Limit an agent token to this capability (repeatable).
        #[arg(long)]
        capability: Vec<String>,
        /// Require an agent token's registrations to carry this label, as
        /// key=value (repeatable).
        #[arg(long)]
        label: Vec<String>,
        /// Expire the token after this long, e.g. 30d; never by default.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// List every token (never their secrets).
    List,
    /// Revoke a token: calls with it fail at once and its agent sessions
    /// are closed.
    Revoke { name: String },
}

fn role(name: &str) -> anyhow::Result<proto::Role> {
    Ok(match name.trim().to_ascii_lowercase().as_str() {
        "admin" => proto::Role::Admin,
        "operator" => proto::Role::Operator,
        "submitter" => proto::Role::Submitter,
        "agent" => proto::Role::Agent,
        "viewer" => proto::Role::Viewer,
        _ => anyhow::bail!("--role must be admin, operator, submitter, agent or viewer, not '{name}'"),
    })
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Unknown(_) => "unspecified",
        known => known.as_str(),
    }
}

fn token_json(token: &TokenInfo) -> Value {
    let scope = &token.scope;
    json!({
        "name": token.name,
        "role": role_name(token.role),
        "queues": scope.queues,
        "capabilities": scope.capabilities,
        "labels": scope.labels,
        "created_at": time(&token.created_at),
        "created_by": token.created_by,
        "expires_at": time(&token.expires_at),
        "revoked_at": time(&token.revoked_at),
    })
}

pub(crate) async fn token(client: &Client, command: TokenCommand, out: &Output) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { name, role: role_text, queue, capability, label, expires } => {
            let mut labels = std::collections::HashMap::new();
            for l in &label {
                let (k, v) = crate::key_value("label", l)?;
                labels.insert(k, v);
            }
            let request = proto::CreateTokenRequest {
                name,
                role: role(&role_text)? as i32,
                scope: Some(proto::Scope { queues: queue, capabilities: capability, labels }),
                expires_in_seconds: expires.map_or(0, |d| d.as_secs().max(1)),
            };
            let created = client.create_token(request).await.context("creating the token")?;
            let token = created.token;
            if out.is_json() {
                let mut v = token_json(&token);
                v["secret"] = Value::String(created.secret);
                println!("{v}");
            } else {
                println!("token '{}' ({}) created; its secret is shown only now:", token.name, role_name(token.role));
                println!("{}", created.secret);
            }
        }
        TokenCommand::List => {
            let tokens = client.list_tokens().await?;
            if out.is_json() {
                println!("{}", Value::Array(tokens.iter().map(token_json).collect()));
                return Ok(());
            }
            let rows = tokens
                .iter()
                .map(token_json)
                .map(|v| {
                    let scope = [&v["queues"], &v["capabilities"]]
                        .iter()
                        .filter_map(|l| l.as_array())
                        .flatten()
                        .map(text)
                        .collect::<Vec<_>>()
                        .join(",");
                    let status = if !v["revoked_at"].is_null() { "revoked" } else { "active" };
                    vec![text(&v["name"]), text(&v["role"]), scope, status.to_owned(), text(&v["expires_at"])]
                })
                .collect();
            table(&["NAME", "ROLE", "SCOPE", "STATUS", "EXPIRES"], rows);
        }
        TokenCommand::Revoke { name } => {
            let token = client.revoke_token(&name).await?;
            if out.is_json() {
                println!("{}", token_json(&token));
            } else {
                println!("token '{}' revoked", token.name);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_prints_every_field_by_its_name() {
        let wire = proto::Token {
            name: "ci".into(),
            role: proto::Role::Submitter.into(),
            scope: Some(proto::Scope {
                queues: vec!["builds".into()],
                capabilities: vec![],
                labels: [("os".to_owned(), "linux".to_owned())].into(),
            }),
            created_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
            expires_at: None,
            revoked_at: None,
            created_by: "bootstrap".into(),
        };
        let expected = json!({
            "name": "ci",
            "role": "submitter",
            "queues": ["builds"],
            "capabilities": [],
            "labels": {"os": "linux"},
            "created_at": "2023-11-14T22:13:20.000Z",
            "created_by": "bootstrap",
            "expires_at": null,
            "revoked_at": null,
        });
        assert_eq!(token_json(&TokenInfo::from(wire.clone())), expected);
        for (role, name) in [(0, "unspecified"), (1, "admin"), (5, "viewer"), (9, "unspecified")] {
            assert_eq!(token_json(&TokenInfo::from(proto::Token { role, ..wire.clone() }))["role"], name);
        }
        let bare = token_json(&TokenInfo::from(proto::Token::default()));
        assert_eq!((&bare["queues"], &bare["labels"]), (&json!([]), &json!({})));
    }
}
