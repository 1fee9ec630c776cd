//! outpost: a store-and-forward agent for remote Linux nodes.
