//! Field rules shared by every API call. Each failure names the field and the rule it broke.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::error::{Error, Result};
use crate::model::Ipv4Cidr;

pub const MAX_LABELS: usize = 32;
pub const MAX_TAGS: usize = 32;
pub const MAX_REASON: usize = 512;
pub const TTL_MIN: u64 = 60;
pub const TTL_MAX: u64 = 30 * 24 * 3600;
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// Characters of a bad value an error message repeats, at most: a 100 KB value must not become a
/// 100 KB status message (gRPC's metadata limit turns that into RESOURCE_EXHAUSTED).
pub const QUOTE_CHARS: usize = 40;

/// A user-supplied value as an error message quotes it: in quotes and escaped, cut to a short prefix
/// with its length when long.
pub fn quote(s: impl AsRef<str>) -> String {
    let s = s.as_ref();
    match s.char_indices().nth(QUOTE_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

/// A DNS label: 1-63 of `a-z`, `0-9`, `-`, not starting or ending with `-`.
pub fn dns_label(field: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if s.len() > 63 {
        return Err(Error::invalid(field, format!("is {} characters; a DNS label has at most 63", s.len())));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return Err(Error::invalid(
            field,
            format!("{s} contains {c:?}; use only lowercase letters, digits and '-'", s = quote(s)),
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(Error::invalid(field, format!("{s} must not start or end with '-'", s = quote(s))));
    }
    Ok(())
}

/// An owner: 1-128 printable characters without spaces (an email, a team or customer id).
pub fn owner(field: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if s.len() > 128 {
        return Err(Error::invalid(field, "is longer than 128 characters"));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(field, "must not contain spaces or control characters"));
    }
    Ok(())
}

/// 0 (persistent) or between 60 seconds and 30 days.
pub fn ttl(field: &str, ttl: u64) -> Result<()> {
    if ttl != 0 && !(TTL_MIN..=TTL_MAX).contains(&ttl) {
        return Err(Error::invalid(
            field,
            format!("{ttl} is out of range; use 0 (persistent) or {TTL_MIN} to {TTL_MAX} seconds (30 days)"),
        ));
    }
    Ok(())
}

fn label_key_ok(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 63
        && k.starts_with(|c: char| c.is_ascii_alphanumeric())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn label_value_ok(v: &str) -> bool {
    v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

pub fn labels(field: &str, labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::invalid(field, format!("has {} labels; at most {MAX_LABELS} are allowed", labels.len())));
    }
    for (k, v) in labels {
        if !label_key_ok(k) {
            return Err(Error::invalid(
                format!("{field}[{k}]", k = quote(k)),
                "a label key is 1-63 of letters, digits, '-', '_', '.', '/' and starts with a letter or digit",
            ));
        }
        if !label_value_ok(v) {
            return Err(Error::invalid(
                format!("{field}[{k}]", k = quote(k)),
                "a label value is at most 63 of letters, digits, '-', '_', '.'",
            ));
        }
    }
    Ok(())
}

/// An IPv4 range, `/8` to `/28`, given with its network address; empty means the default range.
pub fn cidr(field: &str, s: &str) -> Result<Ipv4Cidr> {
    if s.is_empty() {
        return Ok(Ipv4Cidr::DEFAULT);
    }
    let bad = || Error::invalid(field, format!("{s} is not an IPv4 range like 100.64.0.0/10", s = quote(s)));
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let network: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if !(8..=28).contains(&prefix) {
        return Err(Error::invalid(field, format!("prefix /{prefix} is out of range; use /8 to /28")));
    }
    if network.octets()[0] >= 224 {
        return Err(Error::invalid(
            field,
            format!("{s} is multicast or reserved space; use a private or CGNAT range", s = quote(s)),
        ));
    }
    let mask = u32::MAX << (32 - prefix);
    if u32::from(network) & !mask != 0 {
        let net = Ipv4Addr::from(u32::from(network) & mask);
        return Err(Error::invalid(
            field,
            format!("{s} has host bits set; did you mean {net}/{prefix}?", s = quote(s)),
        ));
    }
    Ok(Ipv4Cidr { network, prefix })
}

/// Tags in `tag:name` form; returns them sorted and without duplicates.
pub fn tags(field: &str, tags: &[String]) -> Result<Vec<String>> {
    if tags.len() > MAX_TAGS {
        return Err(Error::invalid(field, format!("has {} tags; at most {MAX_TAGS} are allowed", tags.len())));
    }
    for (i, t) in tags.iter().enumerate() {
        let name = t.strip_prefix("tag:").ok_or_else(|| {
            Error::invalid(format!("{field}[{i}]"), format!("{t} must have the form tag:name", t = quote(t)))
        })?;
        dns_label(&format!("{field}[{i}]"), name).map_err(|_| {
            Error::invalid(
                format!("{field}[{i}]"),
                format!("{t}: the name after 'tag:' is 1-63 of lowercase letters, digits and '-'", t = quote(t)),
            )
        })?;
    }
    let mut out = tags.to_vec();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Refuses control characters (NUL, ESC, CR/LF, ...) in an identifier-like field: they have no place in
/// an issuer, an audience or a URL, and would let a value forge lines in logs and exports.
pub fn no_control(field: &str, s: &str) -> Result<()> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(field, format!("contains the control character {c:?}; remove it")));
    }
    Ok(())
}

pub fn reason(field: &str, s: &str) -> Result<()> {
    if s.len() > MAX_REASON {
        return Err(Error::invalid(field, format!("is longer than {MAX_REASON} characters")));
    }
    if s.chars().any(|c| c.is_control() && c != '\t') {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// A hostname: empty becomes `node`; otherwise lowercased and checked as a DNS label.
pub fn hostname(field: &str, s: &str) -> Result<String> {
    if s.is_empty() {
        return Ok("node".to_string());
    }
    let lower = s.to_ascii_lowercase();
    dns_label(field, &lower)?;
    Ok(lower)
}

pub fn wireguard_key(field: &str, key: &[u8]) -> Result<[u8; 32]> {
    let key: [u8; 32] = key
        .try_into()
        .map_err(|_| Error::invalid(field, format!("is {} bytes; a Curve25519 public key is 32", key.len())))?;
    if key == [0; 32] {
        return Err(Error::invalid(field, "is all zeros"));
    }
    Ok(key)
}

pub const MAX_ENDPOINTS: usize = 16;

/// `ip:port` UDP endpoints, at most 16.
pub fn endpoints(field: &str, endpoints: &[String]) -> Result<Vec<std::net::SocketAddr>> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(Error::invalid(field, format!("has {} endpoints; at most {MAX_ENDPOINTS}", endpoints.len())));
    }
    endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let addr: std::net::SocketAddr = e
                .parse()
                .map_err(|_| Error::invalid(format!("{field}[{i}]"), format!("{e} is not ip:port", e = quote(e))))?;
            if addr.port() == 0 || addr.ip().is_unspecified() {
                return Err(Error::invalid(
                    format!("{field}[{i}]"),
                    format!("{e} needs a specific address and port", e = quote(e)),
                ));
            }
            Ok(addr)
        })
        .collect()
}

pub fn page_size(field: &str, n: u32) -> Result<usize> {
    match n {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        n if n > MAX_PAGE_SIZE => Err(Error::invalid(field, format!("{n} is more than {MAX_PAGE_SIZE}"))),
        n => Ok(n as usize),
    }
}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl LabelRequirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            LabelRequirement::Equals(k, v) => labels.get(k) == Some(v),
            LabelRequirement::NotEquals(k, v) => labels.get(k) != Some(v),
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::Absent(k) => !labels.contains_key(k),
        }
    }
}

/// Parses `k=v,k!=v,k,!k` (spaces around terms allowed).
pub fn label_selector(field: &str, s: &str) -> Result<Vec<LabelRequirement>> {
    let mut out = Vec::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let bad_key = |k: &str| {
            Error::invalid(
                field,
                format!(
                    "{term}: {k} is not a label key (letters, digits, '-', '_', '.', '/')",
                    term = quote(term),
                    k = quote(k)
                ),
            )
        };
        let req = if let Some((k, v)) = term.split_once("!=") {
            LabelRequirement::NotEquals(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = term.split_once('=') {
            let v = v.strip_prefix('=').unwrap_or(v);
            LabelRequirement::Equals(k.trim().to_string(), v.trim().to_string())
        } else if let Some(k) = term.strip_prefix('!') {
            LabelRequirement::Absent(k.trim().to_string())
        } else {
            LabelRequirement::Exists(term.to_string())
        };
        let (LabelRequirement::Equals(k, _)
        | LabelRequirement::NotEquals(k, _)
        | LabelRequirement::Exists(k)
        | LabelRequirement::Absent(k)) = &req;
        if !label_key_ok(k) {
            return Err(bad_key(k));
        }
        if let LabelRequirement::Equals(_, v) | LabelRequirement::NotEquals(_, v) = &req
            && !label_value_ok(v)
        {
            return Err(Error::invalid(
                field,
                format!("{term}: {v} is not a label value", term = quote(term), v = quote(v)),
            ));
        }
        out.push(req);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(dns_label("name", "run-42").is_ok());
        assert!(dns_label("name", "").unwrap_err().to_string().contains("required"));
        assert!(dns_label("name", "-a").is_err());
        assert!(dns_label("name", "Run").unwrap_err().to_string().contains("lowercase"));
        assert!(dns_label("name", &"a".repeat(64)).is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(cidr("cidr", "").unwrap(), Ipv4Cidr::DEFAULT);
        let c = cidr("cidr", "10.1.0.0/24").unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 1, 0, 1));
        assert_eq!(Ipv4Addr::from(c.last_node_address()), Ipv4Addr::new(10, 1, 0, 254));
        assert!(cidr("cidr", "10.1.0.1/24").unwrap_err().to_string().contains("10.1.0.0/24"));
        assert!(cidr("cidr", "10.0.0.0/30").is_err());
        assert!(cidr("cidr", "banana").is_err());
    }

    #[test]
    fn selectors() {
        let reqs = label_selector("label_selector", "env=prod, team!=ml,gpu,!spot").unwrap();
        assert_eq!(reqs.len(), 4);
        let labels: BTreeMap<_, _> =
            [("env".to_string(), "prod".to_string()), ("gpu".to_string(), "1".to_string())].into();
        assert!(reqs.iter().all(|r| r.matches(&labels)));
        assert!(label_selector("label_selector", "=x").is_err());
        assert!(label_selector("label_selector", "a=b c").is_err());
    }

    #[test]
    fn tag_rules() {
        assert_eq!(tags("tags", &["tag:b".into(), "tag:a".into(), "tag:b".into()]).unwrap(), ["tag:a", "tag:b"]);
        assert!(tags("tags", &["ci".into()]).unwrap_err().to_string().starts_with("tags[0]"));
        assert!(tags("tags", &["tag:".into()]).is_err());
    }
}
