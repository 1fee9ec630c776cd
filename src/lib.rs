//! outpost: a store-and-forward agent for remote Linux nodes.

pub mod exec;
