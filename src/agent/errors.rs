//! The `errors` control request: the error log nodes reported to this one.

use super::Agent;
use crate::control::reply::{ErrorView, ErrorsReply};

/// Entries an `errors` request returns unless it asks for fewer or more.
const DEFAULT_LIMIT: u32 = 1000;

impl Agent {
    pub(super) fn errors(
        &self,
        node: Option<&str>,
        after: u64,
        limit: Option<u32>,
    ) -> Result<ErrorsReply, String> {
        let rows = self
            .node
            .store()
            .node_errors(node, after, limit.unwrap_or(DEFAULT_LIMIT))
            .map_err(|e| e.to_string())?;
        Ok(ErrorsReply {
            errors: rows
                .into_iter()
                .map(|e| ErrorView {
                    seq: e.seq,
                    node: e.node,
                    kind: e.kind,
                    text: e.text,
                    count: e.count,
                    first_ms: e.first_ms,
                    last_ms: e.last_ms,
                })
                .collect(),
        })
    }
}
