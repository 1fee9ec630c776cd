//! Statements through the connection's statement cache: each SQL text is parsed
//! once per connection, not on every call (parsing was a quarter of the agent's
//! CPU in a replay before this).

use rusqlite::{Connection, Params, Row};

/// How many prepared statements a connection keeps; the store has about 150
/// distinct ones, the hot paths a few dozen.
pub(super) const CACHE: usize = 256;

pub(super) trait Cached {
    /// `Connection::execute`, through the cache.
    fn run<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;

    /// `Connection::query_row`, through the cache.
    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn run<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}
