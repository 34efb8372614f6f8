//! What a caller may do at the gateway: its `cordon.dev/cap/ai` capabilities merged into one set of
//! rules, and the counters that enforce rates and token budgets with reservations.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The capability the gateway reads from the policy's grants.
pub const CAPABILITY: &str = "cordon.dev/cap/ai";

/// The merged rules of one caller.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rules {
    /// Model globs over `upstream/model` (`openai/gpt-*`); `None` = any model.
    pub models: Option<Vec<String>>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    /// Token budgets; every one applies (one per bucket and period, the largest where grants overlap).
    pub budgets: Vec<Budget>,
    pub max_tokens: Option<u64>,
    /// Tool-name globs whose calls block the response.
    pub tools_deny: Vec<String>,
    pub log_bodies: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub bucket: Bucket,
    pub tokens: u64,
    pub per: Period,
}

/// Whose tokens a budget counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    Node,
    /// The CI run (OIDC issuer + `run_id`, else subject) that admitted the node; the node otherwise.
    Run,
    Owner,
    /// The person who logged the node in, across all their devices; the node otherwise.
    User,
    Tailnet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    Minute,
    Hour,
    Day,
    Month,
    Total,
}

impl Period {
    fn seconds(self) -> u64 {
        match self {
            Period::Minute => 60,
            Period::Hour => 3600,
            Period::Day => 86_400,
            Period::Month => 30 * 86_400,
            Period::Total => u64::MAX,
        }
    }
}

fn positive(v: &Value, field: &str) -> Result<u64, String> {
    v.as_u64().filter(|n| *n > 0).ok_or_else(|| format!("{field}: must be a positive integer, not {v}"))
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, String> {
    let list = v.as_array().ok_or_else(|| format!("{field}: must be a list of strings"))?;
    list.iter()
        .enumerate()
        .map(|(i, s)| s.as_str().map(str::to_string).ok_or_else(|| format!("{field}[{i}]: must be a string")))
        .collect()
}

/// One capability value, checked. Unknown fields are refused so that a typo does not lift a limit.
fn parse_one(v: &Value) -> Result<Rules, String> {
    let obj = v.as_object().ok_or("must be an object such as {\"models\": [\"openai/*\"], \"rpm\": 60}")?;
    let mut r = Rules::default();
    for (k, v) in obj {
        match k.as_str() {
            "models" => r.models = Some(strings(v, "models")?),
            "rpm" => r.rpm = Some(positive(v, "rpm")?),
            "tpm" => r.tpm = Some(positive(v, "tpm")?),
            "max_tokens" => r.max_tokens = Some(positive(v, "max_tokens")?),
            "log_bodies" => r.log_bodies = v.as_bool().ok_or("log_bodies: must be true or false")?,
            "tools" => {
                let tools = v.as_object().ok_or("tools: must be an object such as {\"deny\": [\"shell.*\"]}")?;
                for (tk, tv) in tools {
                    match tk.as_str() {
                        "deny" => r.tools_deny = strings(tv, "tools.deny")?,
                        other => return Err(format!("tools.{other}: unknown field (known: deny)")),
                    }
                }
            }
            "budget" => {
                let b =
                    v.as_object().ok_or("budget: must be an object such as {\"tokens\": 100000, \"per\": \"day\"}")?;
                let tokens = positive(b.get("tokens").unwrap_or(&Value::Null), "budget.tokens")?;
                let bucket = match b.get("bucket").map(|v| v.as_str()) {
                    None | Some(Some("node")) => Bucket::Node,
                    Some(Some("run")) => Bucket::Run,
                    Some(Some("owner")) => Bucket::Owner,
                    Some(Some("user")) => Bucket::User,
                    Some(Some("tailnet")) => Bucket::Tailnet,
                    _ => return Err("budget.bucket: must be node, run, user, owner or tailnet".into()),
                };
                let per = match b.get("per").map(|v| v.as_str()) {
                    None | Some(Some("day")) => Period::Day,
                    Some(Some("minute")) => Period::Minute,
                    Some(Some("hour")) => Period::Hour,
                    Some(Some("month")) => Period::Month,
                    Some(Some("total")) => Period::Total,
                    _ => return Err("budget.per: must be minute, hour, day, month or total".into()),
                };
                if let Some(extra) = b.keys().find(|k| !["tokens", "bucket", "per"].contains(&k.as_str())) {
                    return Err(format!("budget.{extra}: unknown field (known: tokens, bucket, per)"));
                }
                r.budgets = vec![Budget { bucket, tokens, per }];
            }
            other => {
                return Err(format!(
                    "{other}: unknown field (known: models, rpm, tpm, budget, max_tokens, tools, log_bodies)"
                ));
            }
        }
    }
    Ok(r)
}

/// Checks one capability value as the policy is set; the error names the field.
pub fn check(v: &Value) -> Result<(), String> {
    parse_one(v).map(|_| ())
}

fn larger(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl Rules {
    /// Merges the values of every grant that gives the caller the capability. Grants add up, as
    /// grants do: the union of the models (a grant naming none allows any), the largest of each limit
    /// that some grant sets (budgets: per bucket and period; budgets over different buckets or periods
    /// all apply); a tool denied by any grant stays denied; bodies are logged if any grant asks. `None`
    /// when no grant gives the capability.
    pub fn merge(values: &[Value]) -> Option<Rules> {
        let mut merged: Option<Rules> = None;
        for v in values {
            // Values were checked when the policy was set; one that is not valid grants nothing.
            let Ok(r) = parse_one(v) else { continue };
            merged = Some(match merged {
                None => r,
                Some(m) => Rules {
                    models: match (m.models, r.models) {
                        (Some(mut a), Some(b)) => {
                            a.extend(b);
                            Some(a)
                        }
                        _ => None,
                    },
                    rpm: larger(m.rpm, r.rpm),
                    tpm: larger(m.tpm, r.tpm),
                    budgets: {
                        let mut all = m.budgets;
                        for b in r.budgets {
                            match all.iter_mut().find(|a| a.bucket == b.bucket && a.per == b.per) {
                                Some(a) => a.tokens = a.tokens.max(b.tokens),
                                None => all.push(b),
                            }
                        }
                        all
                    },
                    max_tokens: larger(m.max_tokens, r.max_tokens),
                    tools_deny: m.tools_deny.into_iter().chain(r.tools_deny).collect(),
                    log_bodies: m.log_bodies || r.log_bodies,
                },
            });
        }
        merged
    }

    pub fn allows_model(&self, full_name: &str) -> bool {
        self.models.as_ref().is_none_or(|globs| globs.iter().any(|g| crate::oidc::glob_match(g, full_name)))
    }

    /// The deny glob that `tool` matches, if any.
    pub fn denied_tool(&self, tool: &str) -> Option<&str> {
        self.tools_deny.iter().find(|g| crate::oidc::glob_match(g, tool)).map(String::as_str)
    }
}

/// Who a request counts against.
#[derive(Clone, Debug)]
pub struct Who {
    pub node: String,
    /// `issuer|run_id` for a node a CI run admitted.
    pub run: Option<String>,
    pub owner: String,
    /// The id of the person who logged the node in.
    pub user: Option<String>,
}

/// The budget bucket of a CI run: its issuer and `run_id` claim (the subject without one).
pub fn run_key(issuer: &str, subject: &str, claims: &std::collections::BTreeMap<String, String>) -> String {
    format!("{issuer}|{}", claims.get("run_id").map_or(subject, String::as_str))
}

/// Why a request was refused before it reached the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The capability field that decided.
    pub rule: &'static str,
    pub status: u16,
    pub message: String,
}

#[derive(Default)]
struct Counter {
    period: u64,
    window: u64,
    used: u64,
    reserved: u64,
}

/// Counters kept before idle ones (past window, nothing reserved) are dropped.
const COUNTERS_KEPT: usize = 10_000;

/// Rate and budget counters of one gateway.
#[derive(Default)]
pub struct Meters {
    counters: Mutex<HashMap<String, Counter>>,
}

/// What an admitted request holds until it is settled.
#[derive(Debug, Default)]
pub struct Claim {
    /// (counter, period seconds, amount reserved)
    holds: Vec<(String, u64, u64)>,
}

fn window(now: SystemTime, period: u64) -> u64 {
    if period == u64::MAX {
        return 0;
    }
    now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / period
}

impl Meters {
    /// Admits a request that may use up to `tokens` tokens, reserving them (and one request) in every
    /// counter the rules name, or refuses it naming the rule. Concurrent requests see each other's
    /// reservations, so together they overshoot a limit by at most one request's real excess over its
    /// reservation.
    pub fn admit(&self, rules: &Rules, who: &Who, tokens: u64, now: SystemTime) -> Result<Claim, Denial> {
        let mut wanted: Vec<(&'static str, String, u64, u64, u64)> = Vec::new();
        if let Some(rpm) = rules.rpm {
            wanted.push(("rpm", format!("rpm|{}", who.node), 60, rpm, 1));
        }
        if let Some(tpm) = rules.tpm {
            wanted.push(("tpm", format!("tpm|{}", who.node), 60, tpm, tokens));
        }
        for b in &rules.budgets {
            let id = match b.bucket {
                Bucket::Node => format!("node:{}", who.node),
                Bucket::Run => who.run.as_ref().map_or_else(|| format!("node:{}", who.node), |r| format!("run:{r}")),
                Bucket::Owner => format!("owner:{}", who.owner),
                Bucket::User => who.user.as_ref().map_or_else(|| format!("node:{}", who.node), |u| format!("user:{u}")),
                Bucket::Tailnet => "tailnet".to_string(),
            };
            wanted.push(("budget", format!("budget|{:?}|{id}", b.per), b.per.seconds(), b.tokens, tokens));
        }
        let mut counters = self.counters.lock().unwrap();
        if counters.len() > COUNTERS_KEPT {
            counters.retain(|_, c| c.reserved > 0 || c.window == window(now, c.period));
        }
        for (rule, key, period, limit, amount) in &wanted {
            let c = counters.entry(key.clone()).or_default();
            c.period = *period;
            let w = window(now, *period);
            if c.window != w {
                c.window = w;
                c.used = 0;
            }
            let committed = c.used.saturating_add(c.reserved);
            if committed.saturating_add(*amount) > *limit {
                let (what, unit) = if *rule == "rpm" { ("requests", "per minute") } else { ("tokens", "") };
                let message = if *amount > *limit {
                    format!("this request may use {amount} {what}, more than the whole {rule} limit of {limit}")
                } else {
                    format!(
                        "{rule} limit reached: {committed} of {limit} {what}{} used or reserved; this request needs {amount}",
                        if unit.is_empty() { String::new() } else { format!(" {unit}") }
                    )
                };
                return Err(Denial { rule, status: 429, message });
            }
        }
        let mut claim = Claim::default();
        for (_, key, period, _, amount) in wanted {
            let c = counters.get_mut(&key).expect("checked above");
            c.reserved = c.reserved.saturating_add(amount);
            claim.holds.push((key, period, amount));
        }
        Ok(claim)
    }

    /// Replaces a claim's reservations with what the request really used.
    pub fn settle(&self, claim: Claim, tokens: u64, now: SystemTime) {
        let mut counters = self.counters.lock().unwrap();
        for (key, period, amount) in claim.holds {
            let c = counters.entry(key.clone()).or_default();
            c.reserved = c.reserved.saturating_sub(amount);
            let w = window(now, period);
            if c.window != w {
                c.window = w;
                c.used = 0;
            }
            c.used = c.used.saturating_add(if key.starts_with("rpm|") { 1 } else { tokens });
        }
    }

    /// Counts a request recorded at `at` (from the audit log, after a restart) in every counter whose
    /// current window holds it, whatever rules apply: counters no rule names are never read.
    pub fn restore(&self, who: &Who, tokens: u64, at: SystemTime, now: SystemTime) {
        let periods = [Period::Minute, Period::Hour, Period::Day, Period::Month, Period::Total];
        let mut ids = vec![format!("node:{}", who.node), format!("owner:{}", who.owner), "tailnet".to_string()];
        ids.extend(who.run.as_ref().map(|r| format!("run:{r}")));
        ids.extend(who.user.as_ref().map(|u| format!("user:{u}")));
        let add = |key: String, period: u64, amount: u64| {
            if window(at, period) != window(now, period) {
                return;
            }
            let mut counters = self.counters.lock().unwrap();
            let c = counters.entry(key).or_default();
            if c.window != window(now, period) {
                *c = Counter { period, window: window(now, period), used: 0, reserved: 0 };
            }
            c.used = c.used.saturating_add(amount);
        };
        for per in periods {
            for id in &ids {
                add(format!("budget|{per:?}|{id}"), per.seconds(), tokens);
            }
        }
        add(format!("tpm|{}", who.node), 60, tokens);
        add(format!("rpm|{}", who.node), 60, 1);
    }

    /// Tokens used and reserved in a budget or rate counter (for tests and status).
    pub fn committed(&self, key: &str) -> u64 {
        self.counters.lock().unwrap().get(key).map_or(0, |c| c.used.saturating_add(c.reserved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn who() -> Who {
        Who { node: "n1".into(), run: Some("iss|42".into()), owner: "alice@acme.com".into(), user: None }
    }

    #[test]
    fn grants_add_up() {
        let a = json!({"models": ["openai/gpt-*"], "rpm": 60, "tools": {"deny": ["shell.*"]}});
        let b = json!({"models": ["anthropic/claude-*"], "rpm": 600, "tpm": 1000});
        let r = Rules::merge(&[a.clone(), b]).unwrap();
        assert!(r.allows_model("openai/gpt-4o") && r.allows_model("anthropic/claude-3"));
        assert!(!r.allows_model("openai/o1"));
        assert_eq!((r.rpm, r.tpm), (Some(600), Some(1000)));
        assert_eq!(r.denied_tool("shell.exec"), Some("shell.*"));
        assert_eq!(r.denied_tool("search"), None);
        let any = Rules::merge(&[a, json!({})]).unwrap();
        assert!(any.allows_model("openai/o1"), "a grant naming no models allows any");
        assert_eq!(Rules::merge(&[]), None);
    }

    #[test]
    fn budgets_over_different_periods_all_apply() {
        let day = json!({"budget": {"tokens": 100, "per": "day"}});
        let month = json!({"budget": {"tokens": 1000, "per": "month"}});
        let bigger_day = json!({"budget": {"tokens": 300, "per": "day"}});
        let r = Rules::merge(&[day, month, bigger_day]).unwrap();
        assert_eq!(r.budgets.len(), 2);
        assert!(r.budgets.iter().any(|b| b.per == Period::Day && b.tokens == 300));
        let meters = Meters::default();
        let now = SystemTime::now();
        assert!(meters.admit(&r, &who(), 300, now).is_ok());
        assert_eq!(meters.admit(&r, &who(), 1, now).unwrap_err().rule, "budget", "the day budget is spent");
    }

    #[test]
    fn bad_values_name_the_field() {
        assert!(check(&json!({"rpm": -1})).unwrap_err().starts_with("rpm:"));
        assert!(check(&json!({"budget": {"tokens": 5, "per": "week"}})).unwrap_err().starts_with("budget.per:"));
        assert!(check(&json!({"modles": []})).unwrap_err().starts_with("modles: unknown field"));
        assert!(check(&json!({"tools": {"deny": [1]}})).unwrap_err().starts_with("tools.deny[0]:"));
        check(&json!({"budget": {"bucket": "run", "tokens": 2000000, "per": "day"}, "log_bodies": true})).unwrap();
    }

    #[test]
    fn reservations_keep_concurrent_requests_under_the_budget() {
        let rules = Rules::merge(&[json!({"budget": {"bucket": "run", "tokens": 1000, "per": "day"}})]).unwrap();
        let meters = Meters::default();
        let now = SystemTime::now();
        let mut claims = Vec::new();
        while let Ok(c) = meters.admit(&rules, &who(), 300, now) {
            claims.push(c);
        }
        assert_eq!(claims.len(), 3, "three reservations of 300 fit in 1000, a fourth does not");
        let denial = meters.admit(&rules, &who(), 300, now).unwrap_err();
        assert_eq!((denial.rule, denial.status), ("budget", 429));
        for c in claims {
            meters.settle(c, 100, now);
        }
        assert_eq!(meters.committed("budget|Day|run:iss|42"), 300);
        assert!(meters.admit(&rules, &who(), 300, now).is_ok());
    }

    #[test]
    fn a_user_budget_spans_all_of_a_persons_devices() {
        let rules = Rules::merge(&[json!({"budget": {"bucket": "user", "tokens": 500, "per": "day"}})]).unwrap();
        let meters = Meters::default();
        let now = SystemTime::now();
        let device = |node: &str, user: Option<&str>| Who {
            node: node.into(),
            run: None,
            owner: "alice@acme.com".into(),
            user: user.map(str::to_string),
        };
        let laptop = meters.admit(&rules, &device("laptop", Some("u1")), 300, now).unwrap();
        meters.settle(laptop, 300, now);
        let denial = meters.admit(&rules, &device("desktop", Some("u1")), 300, now).unwrap_err();
        assert_eq!(denial.rule, "budget", "the laptop's 300 count on the desktop too");
        assert!(meters.admit(&rules, &device("desktop", Some("u2")), 300, now).is_ok(), "another person");
        assert!(meters.admit(&rules, &device("sensor", None), 300, now).is_ok(), "a workload falls back to its node");
        meters.restore(&device("phone", Some("u3")), 400, now, now);
        assert!(meters.admit(&rules, &device("tablet", Some("u3")), 200, now).is_err(), "restored per user");
    }

    #[test]
    fn restored_usage_counts_only_in_current_windows() {
        let rules = Rules::merge(&[json!({"budget": {"bucket": "run", "tokens": 100, "per": "day"}})]).unwrap();
        let meters = Meters::default();
        let now = SystemTime::now();
        meters.restore(&who(), 60, now - std::time::Duration::from_secs(2 * 86_400), now);
        assert!(meters.admit(&rules, &who(), 100, now).is_ok(), "two days ago is another day");
        let meters = Meters::default();
        meters.restore(&who(), 60, now, now);
        assert_eq!(meters.admit(&rules, &who(), 50, now).unwrap_err().rule, "budget", "60 used + 50 > 100");
        assert!(meters.admit(&rules, &who(), 40, now).is_ok());
    }

    #[test]
    fn rpm_counts_requests_per_window() {
        let rules = Rules::merge(&[json!({"rpm": 2})]).unwrap();
        let meters = Meters::default();
        let t0 = UNIX_EPOCH + std::time::Duration::from_secs(6_000);
        for _ in 0..2 {
            let c = meters.admit(&rules, &who(), 10, t0).unwrap();
            meters.settle(c, 10, t0);
        }
        assert_eq!(meters.admit(&rules, &who(), 10, t0).unwrap_err().rule, "rpm");
        assert!(meters.admit(&rules, &who(), 10, t0 + std::time::Duration::from_secs(60)).is_ok());
    }
}
