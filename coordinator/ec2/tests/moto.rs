//! The EC2 provider against a real EC2 API peer: moto's server, which `scripts/test.sh`
//! installs (pinned, in the project's `.venv`) and starts on loopback, passing its address in
//! `FLOTILLA_MOTO_ENDPOINT`. Launch templates, CreateFleet with mixed spot and on-demand
//! capacity, tags, describe by tag, adoption after a restart, orphans, termination and spot
//! prices go over HTTP exactly as against AWS. (moto ignores client tokens and never runs out
//! of capacity; those paths are covered by the autoscaler's tests and the simulated market.)

use std::collections::{BTreeMap, BTreeSet};

use flotilla_coordinator::provider::{
    CLUSTER_TAG, DynProvider, InstanceState, LAUNCH_TOKEN_TAG, LaunchSpec, Provider, reconcile,
};
use flotilla_ec2::{Connection, Ec2Config, Ec2Provider, worker_user_data};

fn endpoint() -> String {
    std::env::var("FLOTILLA_MOTO_ENDPOINT").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| {
        panic!(
            "the EC2 provider tests need moto: run scripts/test.sh (it installs and starts it), or start \
             `moto_server -p 5000` yourself and set FLOTILLA_MOTO_ENDPOINT=http://127.0.0.1:5000"
        )
    })
}

async fn provider(cluster: &str) -> Ec2Provider {
    let config = Ec2Config {
        cluster_id: cluster.to_string(),
        image_id: "ami-12c6146b".into(),
        subnets: BTreeMap::new(),
        security_group_ids: Vec::new(),
        key_name: None,
        user_data: worker_user_data("10.0.0.1:7100", "join-token", None),
    };
    let connection = Connection {
        endpoint_url: Some(endpoint()),
        region: Some("us-east-1".into()),
        static_credentials: Some(("testing".into(), "testing".into())),
    };
    Ec2Provider::connect(config, connection).await.expect("provider")
}

fn tags(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(CLUSTER_TAG.to_string(), cluster.to_string())])
}

fn spec(cluster: &str, token: &str, count: u32, on_demand_base: u32) -> LaunchSpec {
    let mut tags = tags(cluster);
    tags.insert("flotilla-job".into(), "job-1".into());
    LaunchSpec {
        instance_type: "g5.xlarge".into(),
        zone: Some("us-east-1a".into()),
        spot: true,
        count,
        on_demand_base,
        tags,
        // Tokens are unique per cluster (and so per test run: moto keeps its state).
        client_token: format!("{token}-{}", cluster.rsplit('-').next().unwrap_or_default()),
    }
}

fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    )
}

#[tokio::test]
async fn a_fleet_launches_mixed_spot_and_on_demand_with_tags_in_one_zone() {
    let cluster = unique("mixed");
    let ec2 = provider(&cluster).await;
    let launched = ec2.launch(&spec(&cluster, "tok-mixed", 3, 1)).await.expect("launch");
    assert_eq!(launched.len(), 3, "{launched:?}");
    assert_eq!(launched.iter().filter(|i| i.spot).count(), 2, "two spot, one on-demand: {launched:?}");
    for i in &launched {
        assert_eq!((i.instance_type.as_str(), i.zone.as_str()), ("g5.xlarge", "us-east-1a"));
        assert_eq!(i.state, InstanceState::Running);
        assert_eq!(i.tags.get(CLUSTER_TAG), Some(&cluster));
        assert!(i.tags.get(LAUNCH_TOKEN_TAG).is_some_and(|t| t.starts_with("tok-mixed-")), "{:?}", i.tags);
        assert_eq!(i.tags.get("flotilla-job").map(String::as_str), Some("job-1"));
    }
    let listed = ec2.describe(&tags(&cluster)).await.expect("describe");
    let ids: BTreeSet<&str> = listed.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, launched.iter().map(|i| i.id.as_str()).collect(), "describe by tag finds exactly them");

    let bad = LaunchSpec { zone: Some("mars-1a".into()), ..spec(&cluster, "tok-bad", 1, 0) };
    let err = ec2.launch(&bad).await.expect_err("no such zone");
    assert!(err.to_string().contains("mars-1a"), "{err}");
    let none = LaunchSpec { count: 0, ..spec(&cluster, "tok-zero", 0, 0) };
    assert!(ec2.launch(&none).await.is_err());
}

#[tokio::test]
async fn a_restarted_coordinator_adopts_what_runs_and_launches_nothing_twice() {
    let cluster = unique("adopt");
    let first = provider(&cluster).await;
    let launched = first.launch(&spec(&cluster, "tok-adopt", 2, 0)).await.expect("launch");
    drop(first);
    // A new process (restart, or a new leader repeating the recorded request): same token.
    let second = provider(&cluster).await;
    let again = second.launch(&spec(&cluster, "tok-adopt", 2, 0)).await.expect("repeat");
    let ids = |v: &[flotilla_coordinator::provider::Instance]| v.iter().map(|i| i.id.clone()).collect::<BTreeSet<_>>();
    assert_eq!(ids(&again), ids(&launched), "the repeated launch returns the same instances");
    let running = second.describe(&tags(&cluster)).await.expect("describe");
    assert_eq!(running.len(), 2, "no duplicates: {running:?}");
}

#[tokio::test]
async fn orphans_are_terminated_and_recorded_instances_adopted() {
    let cluster = unique("orphans");
    let ec2 = provider(&cluster).await;
    let recorded = ec2.launch(&spec(&cluster, "tok-recorded", 2, 0)).await.expect("launch");
    // Launched by a leader that died before recording it:
    let orphan = ec2.launch(&spec(&cluster, "tok-orphan", 1, 0)).await.expect("launch");
    let known: BTreeSet<String> = recorded.iter().map(|i| i.id.clone()).collect();
    let dyn_ec2: &dyn DynProvider = &ec2;
    let done = reconcile(dyn_ec2, &tags(&cluster), &|i| known.contains(&i.id)).await.expect("reconcile");
    assert_eq!(done.adopted.iter().map(|i| i.id.clone()).collect::<BTreeSet<_>>(), known);
    assert_eq!(done.orphans_terminated, [orphan[0].id.clone()]);
    let after = ec2.describe(&tags(&cluster)).await.expect("describe");
    let state = |id: &str| after.iter().find(|i| i.id == id).map(|i| i.state);
    assert_eq!(state(&orphan[0].id), Some(InstanceState::Terminated));
    assert!(recorded.iter().all(|i| state(&i.id) == Some(InstanceState::Running)));
    ec2.terminate(&known.into_iter().collect::<Vec<_>>()).await.expect("terminate");
    assert!(
        ec2.describe(&tags(&cluster)).await.expect("describe").iter().all(|i| i.state == InstanceState::Terminated)
    );
}

#[tokio::test]
async fn spot_prices_come_from_the_price_history() {
    let ec2 = provider(&unique("prices")).await;
    let prices = ec2.spot_prices(&["g5.xlarge".into()]).await.expect("prices");
    assert!(!prices.is_empty());
    assert!(prices.keys().all(|(t, _)| t == "g5.xlarge"), "{prices:?}");
    assert!(prices.values().all(|p| *p > 0.0 && p.is_finite()), "{prices:?}");
}
