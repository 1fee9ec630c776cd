//! One logger for the process: outpost's own lines and those of the crates that log
//! through the `log` facade (rumqttc, rustls, ureq), to stderr, behind one level.
//!
//! The level is the one global here (it is `log`'s max level): every thread logs,
//! and threading a logger handle through rumqttc's thread and every task would buy
//! nothing. Nothing is written before [`set_level`] installs the logger.

use std::fmt;
use std::io::Write;

use ::log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::LogLevel;

/// The target of outpost's own lines; every other target is a dependency's.
const OWN: &str = "outpost";

struct Logger;

static LOGGER: Logger = Logger;

/// Installs the logger and sets the level. Calling it again only changes the level.
pub fn set_level(level: LogLevel) {
    // An error only says that an earlier call installed it.
    let _ = ::log::set_logger(&LOGGER);
    ::log::set_max_level(match level {
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warn => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
    });
}

/// Whether a line from `target` at `level` is written when the level is `max`.
/// Other crates' lines only at debug: at info rumqttc and rustls repeat, once per
/// packet or handshake, what the link already says in one line.
fn wanted(target: &str, level: Level, max: LevelFilter) -> bool {
    let own = target == OWN || target.starts_with("outpost::");
    level <= max && (own || max >= LevelFilter::Debug)
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        wanted(metadata.target(), metadata.level(), ::log::max_level())
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        // Never eprintln!: it panics when stderr cannot be written (a log file on
        // a full disk), and a node must outlive its log.
        let mut err = std::io::stderr().lock();
        let _ = match record.target() {
            OWN => writeln!(err, "outpost: {level}: {}", record.args()),
            // One line per record: rumqttc's ping message spans three.
            target => {
                let msg = record.args().to_string();
                let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
                writeln!(err, "outpost: {level}: {target}: {msg}")
            }
        };
    }

    fn flush(&self) {}
}

/// What the crate's `error!`, `warn!`, `info!` and `debug!` call.
pub fn log(level: LogLevel, msg: fmt::Arguments<'_>) {
    let level = match level {
        LogLevel::Error => Level::Error,
        LogLevel::Warn => Level::Warn,
        LogLevel::Info => Level::Info,
        LogLevel::Debug => Level::Debug,
    };
    if level <= ::log::max_level() {
        let record = Record::builder().level(level).target(OWN).args(msg).build();
        ::log::logger().log(&record);
    }
}

#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::log($crate::config::LogLevel::Error, format_args!($($t)*)) } }
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::log($crate::config::LogLevel::Warn, format_args!($($t)*)) } }
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::log($crate::config::LogLevel::Info, format_args!($($t)*)) } }
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::log($crate::config::LogLevel::Debug, format_args!($($t)*)) } }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_lines_follow_the_level_and_other_crates_show_only_at_debug() {
        use LevelFilter as F;
        let own = |level, max| wanted(OWN, level, max);
        let rumqttc = |level, max| wanted("rumqttc::state", level, max);
        assert!(own(Level::Error, F::Error));
        assert!(!own(Level::Warn, F::Error));
        assert!(own(Level::Info, F::Info) && !own(Level::Debug, F::Info));
        assert!(own(Level::Debug, F::Debug));
        assert!(wanted("outpost::link", Level::Info, F::Info));
        assert!(!rumqttc(Level::Error, F::Info) && !rumqttc(Level::Info, F::Warn));
        assert!(rumqttc(Level::Error, F::Debug) && rumqttc(Level::Debug, F::Debug));
        assert!(!rumqttc(Level::Trace, F::Debug));
        // A crate whose name merely starts like ours is not ours.
        assert!(!wanted("outposts", Level::Info, F::Info));
    }

    #[test]
    fn setting_the_level_twice_installs_once_and_keeps_the_last_level() {
        set_level(LogLevel::Debug);
        set_level(LogLevel::Error);
        assert_eq!(::log::max_level(), LevelFilter::Error);
        let meta = |target, level| Metadata::builder().target(target).level(level).build();
        let logger = ::log::logger();
        assert!(logger.enabled(&meta(OWN, Level::Error)));
        assert!(!logger.enabled(&meta(OWN, Level::Warn)));
        assert!(!logger.enabled(&meta("rustls::client", Level::Error)));
    }
}
