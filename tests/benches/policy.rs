//! Policy benchmark: `cargo bench -p cordon-tests --bench policy`.
//!
//! A policy of 200 grants over 50 tags and 10 groups, and 1,000 nodes. Measured in one run:
//! parsing and validating the document; the full compile (every node's visible peers and packet filter);
//! and the policy work of one more node joining, summed over the 1,000 watchers' views that must absorb
//! it. The baseline is the bare selector matching of every grant against every node, the least any
//! compile must do.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cordon_server::hub::NetChange;
use cordon_server::model::{Ipv4Cidr, Node, NodeId, Tailnet, TailnetId};
use cordon_server::netview::NetView;
use cordon_server::policy::{CompileNode, Policy, Subject};

const NODES: usize = 1000;
const GRANTS: usize = 200;
const TAGS: usize = 50;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn policy_text() -> String {
    let tags: Vec<String> = (0..TAGS).map(|t| format!("\"tag:t{t}\": []")).collect();
    let groups: Vec<String> = (0..10)
        .map(|g| {
            format!(
                "\"group:g{g}\": [{}]",
                (0..5).map(|u| format!("\"u{}@acme.com\"", g * 5 + u)).collect::<Vec<_>>().join(",")
            )
        })
        .collect();
    let grants: Vec<String> = (0..GRANTS)
        .map(|i| {
            let src = if i % 4 == 0 { format!("\"group:g{}\"", i % 10) } else { format!("\"tag:t{}\"", i % TAGS) };
            let dst = format!("\"tag:t{}\"", (i * 7 + 3) % TAGS);
            format!("{{\"src\": [{src}], \"dst\": [{dst}, \"gateway\"], \"ip\": [\"tcp:{}\"], \"app\": {{\"cordon.dev/cap/ai\": [{{\"rpm\": {i}}}]}}}}", 1000 + i)
        })
        .collect();
    format!(
        "{{\n\"groups\": {{{}}},\n\"tagOwners\": {{{}}},\n\"grants\": [\n{}\n]}}",
        groups.join(","),
        tags.join(","),
        grants.join(",\n")
    )
}

fn node(i: usize, tailnet: TailnetId) -> Node {
    let tagged = !i.is_multiple_of(5);
    Node {
        id: NodeId::generate(),
        tailnet_id: tailnet,
        hostname: format!("n{i}"),
        wireguard_public_key: [1; 32],
        address: Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 2)) + i as u32),
        tags: if tagged { vec![format!("tag:t{}", i % TAGS)] } else { vec![] },
        owner: format!("u{}@acme.com", i % 60),
        auth_key_id: None,
        ephemeral: false,
        created_at: SystemTime::now(),
        expires_at: SystemTime::now(),
        session_hash: [0; 32],
        endpoints: vec![],
        trust_rule_id: None,
        identity: None,
        gateway: false,
        user: None,
    }
}

fn main() {
    let text = policy_text();
    let start = Instant::now();
    let policy = Arc::new(Policy::parse(&text).expect("the generated policy is valid"));
    let parse = start.elapsed();

    let tailnet = Tailnet {
        id: TailnetId::generate(),
        name: "bench".into(),
        owner: "acme".into(),
        labels: Default::default(),
        cidr: Ipv4Cidr::DEFAULT,
        created_at: SystemTime::now(),
        expires_at: None,
        ttl_seconds: 0,
        created_by: "bench".into(),
        node_count: NODES as u32,
        policy_version: 1,
        upstreams: vec![],
        approval_required: false,
    };
    let nodes: Vec<Node> = (0..NODES).map(|i| node(i, tailnet.id)).collect();
    let ids: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
    let compile_nodes: Vec<CompileNode<'_>> = nodes
        .iter()
        .zip(&ids)
        .map(|(n, id)| CompileNode {
            subject: Subject { id, tags: &n.tags, owner: &n.owner, gateway: false, groups: None },
            address: n.address,
        })
        .collect();

    // Baseline: match every grant's src and dst against every node, nothing more.
    let baseline = median(
        (0..10)
            .map(|_| {
                let start = Instant::now();
                let mut hits = 0usize;
                for g in &policy.grants {
                    for n in &compile_nodes {
                        hits += usize::from(g.src.iter().any(|s| policy.matches(s, &n.subject)));
                        hits += usize::from(g.dst.iter().any(|s| policy.matches(s, &n.subject)));
                    }
                }
                std::hint::black_box(hits);
                start.elapsed()
            })
            .collect(),
    );
    let compile = median(
        (0..10)
            .map(|_| {
                let start = Instant::now();
                let views =
                    policy.compile(&compile_nodes, (Ipv4Addr::new(100, 64, 0, 0), 10), Ipv4Addr::new(100, 64, 0, 1));
                std::hint::black_box(views.len());
                start.elapsed()
            })
            .collect(),
    );
    let views = policy.compile(&compile_nodes, (Ipv4Addr::new(100, 64, 0, 0), 10), Ipv4Addr::new(100, 64, 0, 1));
    let peers: usize = views.values().map(|v| v.peers.len()).sum();

    // One join: every watcher's view absorbs the new node.
    let mut watchers: Vec<NetView> = (0..NODES)
        .map(|i| {
            let others: Vec<Node> = nodes.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, n)| n.clone()).collect();
            NetView::new(policy.clone(), nodes[i].clone(), others, &tailnet)
        })
        .collect();
    let mut joins = Vec::new();
    for round in 0..20 {
        let newcomer = Arc::new(node(NODES + round, tailnet.id));
        let change = NetChange::PeerAdded(newcomer);
        let start = Instant::now();
        let mut told = 0;
        for w in &mut watchers {
            told += usize::from(!w.apply(&change).is_empty());
        }
        joins.push(start.elapsed());
        std::hint::black_box(told);
    }
    let join = median(joins);

    // A new policy: every watcher recomputes its view.
    let changed = Arc::new(Policy::parse(&text.replace("tcp:1000", "tcp:999")).unwrap());
    let start = Instant::now();
    let mut told = 0;
    for w in &mut watchers {
        told += usize::from(
            !w.apply(&NetChange::PolicyChanged { policy: changed.clone(), version: 0, updated: vec![] }).is_empty(),
        );
    }
    let policy_change = start.elapsed();

    println!("Cordon policy benchmark: {NODES} nodes, {GRANTS} grants, {TAGS} tags\n");
    println!("parse + validate the document             {}", ms(parse));
    println!("baseline: match all selectors x nodes     {}", ms(baseline));
    println!(
        "full compile (peers + filters, all nodes)  {}  = {:.1}x the baseline (goal < 50 ms); {peers} visible pairs",
        ms(compile),
        compile.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "one join, summed over {NODES} watchers' views {}  = {:.2}x the baseline (goal < 1 ms)",
        ms(join),
        join.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "a policy change, over {NODES} watchers' views {}  ({told} of them had something to send)",
        ms(policy_change)
    );
}
