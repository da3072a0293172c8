//! Phase 8, mirror: copies of the request as it goes upstream, sent in the background
//! ([`crate::mirror`]) to the mirrors the rule selects for this request by their
//! percentage, never waited for.

use std::net::IpAddr;
use std::sync::Arc;

use mesh_model::resilience;

use super::attempts::RequestHead;
use super::body::RequestBody;
use super::route::RoutePlan;
use crate::mirror::{self, MirrorTarget};
use crate::proxy::Inputs;

/// The phase: one copy per selected mirror.
pub fn run(
    inputs: &Arc<Inputs>,
    local_ip: IpAddr,
    targets: Vec<(Result<MirrorTarget, String>, f64)>,
    head: &RequestHead,
    body: &RequestBody,
    plan: &RoutePlan,
) {
    for target in selected(targets, || rand::random::<f64>() * 100.0) {
        mirror::spawn(
            inputs,
            local_ip,
            target,
            head,
            body.replay(),
            &plan.authority,
            &plan.path,
        );
    }
}

/// The mirrors this request goes to: each by its own percentage, `roll` giving 0..100.
fn selected<T>(targets: Vec<(T, f64)>, mut roll: impl FnMut() -> f64) -> impl Iterator<Item = T> {
    targets
        .into_iter()
        .filter_map(move |(t, percent)| resilience::selected(percent, roll()).then_some(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mirror_is_chosen_by_its_own_percentage() {
        let targets = || vec![("never", 0.0), ("half", 50.0), ("always", 100.0)];
        let low: Vec<&str> = selected(targets(), || 10.0).collect();
        assert_eq!(low, ["half", "always"]);
        let high: Vec<&str> = selected(targets(), || 90.0).collect();
        assert_eq!(high, ["always"]);
        let mut rolls = [99.0, 1.0, 99.0].into_iter();
        let mixed: Vec<&str> = selected(targets(), || rolls.next().unwrap_or(0.0)).collect();
        assert_eq!(mixed, ["half", "always"], "one roll per mirror");
    }
}
