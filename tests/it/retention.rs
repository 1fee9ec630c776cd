//! Retention through the real binary: finished jobs go beyond the count and the
//! age, a job still queued for an offline node stays, `status` says what went.

use std::time::Duration;

use outpost::control::{CommandSpec, Request};

use crate::support::broker::Broker;
use crate::support::outpost::{introduce, Agent};
use crate::support::{wait_for, wait_until, TempDir};

const LONG: Duration = Duration::from_secs(120);

fn ping(central: &Agent) -> i64 {
    let r = central.call(&Request::Send {
        to: "ship1".into(),
        key: None,
        where_: vec![],
        online: false,
        lane: None,
        ttl_s: None,
        output: None,
        command: CommandSpec::Ping,
    });
    r["job"].as_i64().unwrap_or_else(|| panic!("{r}"))
}

fn job_ids(central: &Agent) -> Vec<i64> {
    let r = central.call(&Request::Jobs { limit: Some(100) });
    let mut ids: Vec<i64> = r["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
fn retention_prunes_finished_jobs_by_count_and_age_and_keeps_queued_ones() {
    let tmp = TempDir::new();
    introduce(tmp.path(), "central", "ship1", "ping");
    let broker = Broker::start();
    // Passes every second (a quarter of 4 s, at least 1 s).
    let central = Agent::start_with(
        "central",
        &broker.url(),
        tmp.path(),
        &["--retention", "4s", "--retention-jobs", "3"],
    );
    let mut ship = Agent::start_with("ship1", &broker.url(), tmp.path(), &[]);
    wait_until("central sees ship1", LONG, || central.sees_online("ship1"));
    let done: Vec<i64> = (0..6).map(|_| ping(&central)).collect();
    for id in &done {
        wait_until("the ping's result", LONG, || {
            central.job(*id)["targets"][0]["result"].is_object()
        });
    }
    ship.kill9();
    let queued = ping(&central);
    // The six answered pings go (three beyond the count at once, the rest once
    // 4 s old); the one queued for the offline node never does.
    let status = wait_for("the answered jobs pruned", LONG, || {
        let s = central.status();
        (s["store"]["retention"]["since_start"]["jobs"] == 6).then_some(s)
    });
    assert_eq!(job_ids(&central), [queued]);
    assert_eq!(central.job(queued)["targets"][0]["state"], "queued");
    let r = &status["store"]["retention"];
    assert_eq!(r["since_start"]["results"], 6, "{r}");
    assert_eq!(
        (r["keep_s"].as_u64(), r["keep_rows"].as_u64()),
        (Some(4), Some(3))
    );
    assert!(r["last_pass_ms"].as_u64().is_some(), "{r}");
    let text = central.cli(&["status"]);
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(
        out.contains("history  kept 4s and at most 3 of each kind"),
        "{out}"
    );
    assert!(out.contains("6 job(s) pruned since start"), "{out}");
    // The queued job still reaches ship1 when it is back.
    ship.restart();
    wait_until("the queued ping answered", LONG, || {
        central.job(queued)["targets"][0]["result"].is_object()
    });
}
