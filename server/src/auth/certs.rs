//! Client certificates as identities: on an mTLS listener, a verified
//! certificate whose subject common name is configured acts with that
//! mapping's role and scope, without a token.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Identity, Scope};
use crate::config::CertIdentity;

/// The configured mappings, by common name.
#[derive(Debug, Default)]
pub(crate) struct CertIdentities {
    by_common_name: HashMap<String, Arc<Identity>>,
}

impl CertIdentities {
    pub(crate) fn new(mappings: &[CertIdentity]) -> Self {
        let by_common_name = mappings
            .iter()
            .map(|m| {
                let identity = Identity {
                    name: m.name.clone().unwrap_or_else(|| format!("cert:{}", m.common_name)),
                    role: m.role,
                    scope: Scope {
                        queues: m.queues.clone(),
                        capabilities: m.capabilities.clone(),
                        labels: m.labels.clone(),
                    },
                };
                (m.common_name.clone(), Arc::new(identity))
            })
            .collect();
        Self { by_common_name }
    }

    /// The identity of a verified client certificate (DER), if its subject
    /// common name is mapped.
    pub(crate) fn identify(&self, certificate: &[u8]) -> Option<Arc<Identity>> {
        if self.by_common_name.is_empty() {
            return None;
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate).ok()?;
        let common_name = parsed.subject().iter_common_name().next()?.as_str().ok()?;
        self.by_common_name.get(common_name).cloned()
    }
}
