//! Figures the benchmarks print: latency percentiles and durations in milliseconds.

use std::time::Duration;

/// The `p` quantile (0 to 1) of sorted samples; zero for none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub p50: Duration,
    pub p99: Duration,
}

pub fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    Stats { p50: percentile(&samples, 0.5), p99: percentile(&samples, 0.99) }
}

/// Which way a figure improves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// How much worse than its baseline a figure may be before the benchmark calls it a regression.
pub const REGRESSION_MARGIN: f64 = 0.30;

/// Figures one benchmark run measured, compared at the end against a baseline file kept in the repo
/// (`name value` lines, `#` comments), so that a figure that falls is reported loudly by the run that
/// made it fall rather than noticed months later. Nothing here fails a run: timings vary by machine.
#[derive(Debug, Default)]
pub struct Figures {
    baseline: Vec<(String, f64)>,
    source: String,
    measured: Vec<(String, f64, Better)>,
}

impl Figures {
    /// Reads the baseline at `path`; a missing or unreadable file leaves it empty and says so.
    pub fn load(path: &std::path::Path) -> Figures {
        let source = path.display().to_string();
        let baseline = match std::fs::read_to_string(path) {
            Ok(text) => parse_baseline(&text),
            Err(e) => {
                println!("(no baseline at {source}: {e}; figures are printed without comparison)");
                Vec::new()
            }
        };
        Figures { baseline, source, measured: Vec::new() }
    }

    pub fn record(&mut self, name: &str, value: f64, better: Better) {
        self.measured.push((name.to_string(), value, better));
    }

    /// The comparison, one line per figure; the names of those more than the margin worse.
    pub fn compare(&self) -> (Vec<String>, Vec<String>) {
        let mut lines = Vec::new();
        let mut regressions = Vec::new();
        for (name, value, better) in &self.measured {
            let Some(&(_, base)) = self.baseline.iter().find(|(n, _)| n == name) else {
                lines.push(format!("  {name:<28} {value:>10.3}   (not in the baseline)"));
                continue;
            };
            // Ratio > 1 means better than the baseline, whichever way the figure improves.
            let ratio = match better {
                Better::Higher => value / base,
                Better::Lower => base / value,
            };
            let worse = ratio < 1.0 - REGRESSION_MARGIN;
            let flag = if worse { "   <-- REGRESSION" } else { "" };
            lines.push(format!("  {name:<28} {value:>10.3}   baseline {base:>10.3}   {ratio:>5.2}x{flag}"));
            if worse {
                regressions.push(name.clone());
            }
        }
        (lines, regressions)
    }

    /// Prints the comparison, and a banner naming every regression.
    pub fn report(&self) {
        let (lines, regressions) = self.compare();
        println!("\nAgainst the baseline in {} (ratio > 1 is better):", self.source);
        for line in lines {
            println!("{line}");
        }
        if !regressions.is_empty() {
            let margin = REGRESSION_MARGIN * 100.0;
            let bar = "!".repeat(78);
            println!(
                "\n{bar}\nREGRESSION: more than {margin:.0} % worse than the baseline: {}\n{bar}",
                regressions.join(", ")
            );
        }
    }
}

fn parse_baseline(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.parse().ok()?))
        })
        .collect()
}

/// One tailnet with `n` nodes, each holding a netmap stream over one of `channels` (round robin: several
/// connections, or several replicas); `rounds` more registrations through the first channel, each timed
/// until the last watcher has the new peer.
pub async fn fan_out(
    admin: &mut crate::Admin,
    channels: &[tonic::transport::Channel],
    n: usize,
    rounds: usize,
) -> Stats {
    use crate::v1 as pb;
    let tailnet = crate::create_tailnet(admin, &format!("fan{n}")).await;
    let (_, secret) = crate::create_key(admin, &tailnet.id, true, false).await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, std::time::Instant)>();
    let mut ready = Vec::new();
    for i in 0..n {
        let mut nodes = pb::node_client::NodeClient::new(channels[i % channels.len()].clone());
        let r = crate::register(&mut nodes, &secret, &format!("n{i}")).await;
        let mut stream = crate::watch(&mut nodes, &r.session_token).await;
        crate::next_netmap(&mut stream).await;
        let seen_tx = seen_tx.clone();
        ready.push(tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                let at = std::time::Instant::now();
                if let Some(pb::net_map::Update::Delta(d)) = m.update {
                    for p in d.peers_added {
                        let _ = seen_tx.send((p.hostname, at));
                    }
                }
            }
        }));
    }
    // Joins made while the watchers were being set up may still be queued; they are told apart by name.
    let mut samples = Vec::new();
    let mut nodes = pb::node_client::NodeClient::new(channels[0].clone());
    for round in 0..rounds {
        let hostname = format!("late{round}");
        let start = std::time::Instant::now();
        crate::register(&mut nodes, &secret, &hostname).await;
        let mut got = 0;
        while got < n {
            let (h, at) = tokio::time::timeout(Duration::from_secs(60), seen_rx.recv()).await.unwrap().unwrap();
            if h == hostname {
                samples.push(at - start);
                got += 1;
            }
        }
    }
    admin.delete_tailnet(pb::DeleteTailnetRequest { id: tailnet.id, reason: String::new() }).await.unwrap();
    for t in ready {
        let _ = t.await;
    }
    stats(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_more_than_the_margin_worse_is_a_regression() {
        let mut f = Figures {
            baseline: parse_baseline("# measured 2026-12-01\nthroughput 2.0 # Gbit/s\nlatency 100\nother 1\n"),
            ..Figures::default()
        };
        f.record("throughput", 1.3, Better::Higher);
        f.record("latency", 125.0, Better::Lower);
        f.record("other", 0.71, Better::Higher);
        f.record("new", 5.0, Better::Higher);
        let (lines, regressions) = f.compare();
        assert_eq!(regressions, vec!["throughput".to_string()]);
        assert_eq!(lines.len(), 4);
        assert!(lines[3].contains("not in the baseline"));
    }
}
