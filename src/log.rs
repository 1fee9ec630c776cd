//! Logging to stderr with a level, set once at start-up.
//!
//! A process-wide level is the one global here: every thread logs, and threading a
//! logger handle through rumqttc's thread and every task would buy nothing.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::config::LogLevel;

static LEVEL: AtomicU8 = AtomicU8::new(LogLevel::Info as u8);

pub fn set_level(level: LogLevel) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn enabled(level: LogLevel) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

pub fn log(level: LogLevel, msg: std::fmt::Arguments<'_>) {
    if enabled(level) {
        let tag = match level {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
        };
        // Never eprintln!: it panics when stderr cannot be written (a log file on
        // a full disk), and a node must outlive its log.
        let _ = writeln!(std::io::stderr().lock(), "outpost: {tag}: {msg}");
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
