//! outpost: a store-and-forward agent for remote Linux nodes.
//!
//! # Layout
//!
//! - [`link`]: the MQTT connection to the broker; the only module that knows rumqttc
//!   and tokio.

pub mod link;
