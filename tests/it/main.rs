//! The single integration-test binary: every module here drives real processes
//! (mosquitto, the outpost binary) through the helpers in `support`.

mod support;
mod support_selftest;
