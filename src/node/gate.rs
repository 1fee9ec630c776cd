//! The node's side of budgets and link windows: the plan, the operator's
//! release, and the bytes spent (the gate itself is `budget::Gate`; `poll_out`
//! asks it frame by frame).

use super::Node;
use crate::budget::{Gate, Plan};
use crate::delivery::Event;

impl Node {
    /// Sets the budgets and windows; everything held is asked again.
    pub fn set_plan(&mut self, plan: Plan, now_ms: u64) {
        self.gate.set_plan(plan);
        self.delivery.handle(Event::Ungated, now_ms);
    }

    /// Lifts budgets and windows until `until_ms`.
    pub fn release_gate(&mut self, until_ms: u64, now_ms: u64) {
        self.gate.release(until_ms);
        self.delivery.handle(Event::Ungated, now_ms);
    }

    /// The gate, to count what the link spent.
    pub fn gate(&mut self) -> &mut Gate {
        &mut self.gate
    }

    /// The gate, to show it.
    pub fn gate_ref(&self) -> &Gate {
        &self.gate
    }
}

impl Node {
    /// Stores what the link spent (and every budget's spending), one commit.
    pub fn record_usage(
        &mut self,
        delta: &crate::store::UsageDelta,
        now_ms: u64,
    ) -> Result<(), crate::store::StoreError> {
        self.store.add_usage(delta, now_ms)
    }
}
