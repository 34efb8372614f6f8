//! Tailnet policy: who may reach whom on which ports, and which capabilities (`app`) each identity
//! carries. A document is parsed from JSON with comments ([`jsonc`]), validated completely (every error
//! names its JSON path and line/column), and its `tests` must pass before it is accepted. Deny by default.
//!
//! Selectors: `*`, `tag:name`, `group:name`, an owner (`alice@acme.com`), `user:<email>` (a person's
//! nodes), `autogroup:member` (any node a person owns), `autogroup:tagged`, a node id, `gateway`. A group
//! holds owners, people (`user:<email>`) and identity-provider groups (`idp:<name>`, matched against the
//! groups of a person's last login). As in Tailscale, a tagged node is identified by its tags: owner,
//! user, group and member selectors match untagged nodes only.

pub mod jsonc;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

use jsonc::{Node as J, Pos, Value as V};

use crate::validate::quote;

/// What a policy document may contain at the top level.
const SECTIONS: [&str; 4] = ["groups", "tagOwners", "grants", "tests"];

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Selector {
    Any,
    Tag(String),
    Group(String),
    Owner(String),
    /// `user:<email>`: the nodes a person logged in.
    User(String),
    /// `autogroup:member`: any untagged node a person logged in.
    Member,
    /// `autogroup:tagged`: any tagged node.
    Tagged,
    Node(String),
    Gateway,
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Any => f.write_str("*"),
            Selector::Tag(t) | Selector::Group(t) | Selector::Owner(t) | Selector::Node(t) => f.write_str(t),
            Selector::Gateway => f.write_str("gateway"),
            Selector::User(email) => write!(f, "user:{email}"),
            Selector::Member => f.write_str("autogroup:member"),
            Selector::Tagged => f.write_str("autogroup:tagged"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// A protocol and a port range (ICMP has no ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ports {
    pub proto: Proto,
    pub first: u16,
    pub last: u16,
}

impl Ports {
    fn allows(&self, proto: Proto, port: u16) -> bool {
        (self.proto == Proto::Any || self.proto == proto)
            && (proto == Proto::Icmp || (self.first..=self.last).contains(&port))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub src: Vec<Selector>,
    pub dst: Vec<Selector>,
    pub ip: Vec<Ports>,
    pub app: BTreeMap<String, Vec<serde_json::Value>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub dst: Selector,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PolicyTest {
    pub src: Selector,
    pub accept: Vec<(Target, String, Pos)>,
    pub deny: Vec<(Target, String, Pos)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub groups: BTreeMap<String, Vec<String>>,
    /// `groups`, ready for matching.
    members: BTreeMap<String, Members>,
    pub tag_owners: BTreeMap<String, Vec<String>>,
    pub grants: Vec<Grant>,
    pub tests: Vec<PolicyTest>,
    /// False for the default policy of a tailnet nobody set one for: everyone reaches everyone, any tag.
    pub explicit: bool,
    /// Memberships computed so far, by node id: every watcher of a join asks about the same node.
    recent: MembershipCache,
    capability_cache: CapabilityCache,
}

#[derive(Default)]
struct CapabilityCache(std::sync::Mutex<HashMap<String, std::sync::Arc<Vec<serde_json::Value>>>>);

impl Clone for CapabilityCache {
    fn clone(&self) -> Self {
        CapabilityCache::default()
    }
}

impl PartialEq for CapabilityCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for CapabilityCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CapabilityCache")
    }
}

/// Which network grants (those with `ip`) a node is in, as `src` and as `dst`: one bit per grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub src: Vec<u64>,
    pub dst: Vec<u64>,
}

impl Membership {
    pub fn in_src(&self, grant: usize) -> bool {
        self.src[grant / 64] & (1 << (grant % 64)) != 0
    }

    /// Whether a node with membership `self` and one with `other` may talk (either direction).
    pub fn meets(&self, other: &Membership) -> bool {
        let cross = |a: &[u64], b: &[u64]| a.iter().zip(b).any(|(x, y)| x & y != 0);
        cross(&self.src, &other.dst) || cross(&self.dst, &other.src)
    }
}

type Cached = (Vec<String>, String, Option<Vec<String>>, std::sync::Arc<Membership>);

#[derive(Default)]
struct MembershipCache(std::sync::Mutex<HashMap<String, Cached>>);

impl Clone for MembershipCache {
    fn clone(&self) -> Self {
        MembershipCache::default()
    }
}

impl PartialEq for MembershipCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for MembershipCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MembershipCache")
    }
}

/// Why a document was refused: where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub path: String,
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{} ({})", self.message, self.pos)
        } else {
            write!(f, "{} ({}): {}", self.path, self.pos, self.message)
        }
    }
}

fn err(path: &str, pos: Pos, message: impl Into<String>) -> PolicyError {
    PolicyError { path: path.to_string(), pos, message: message.into() }
}

/// Who a node is, for matching selectors.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub id: &'a str,
    pub tags: &'a [String],
    pub owner: &'a str,
    pub gateway: bool,
    /// For a person's node: the identity-provider groups of their last login; `None` for workloads.
    pub groups: Option<&'a [String]>,
}

impl Subject<'_> {
    fn person(&self) -> bool {
        self.groups.is_some()
    }

    fn in_idp_group(&self, group: &str) -> bool {
        self.groups.is_some_and(|g| g.iter().any(|x| x == group))
    }
}

/// A stand-in node for a selector named in a policy test.
struct Example {
    id: String,
    tags: Vec<String>,
    owner: String,
    gateway: bool,
    groups: Option<Vec<String>>,
}

impl Example {
    fn subject(&self) -> Subject<'_> {
        Subject {
            id: &self.id,
            tags: &self.tags,
            owner: &self.owner,
            gateway: self.gateway,
            groups: self.groups.as_deref(),
        }
    }
}

/// A group's members as matching needs them: owners (and people, `user:` removed) and IdP groups.
#[derive(Clone, Debug, Default, PartialEq)]
struct Members {
    owners: Vec<String>,
    idp: Vec<String>,
}

impl Members {
    fn of(list: &[String]) -> Members {
        let mut m = Members::default();
        for item in list {
            match item.strip_prefix("idp:") {
                Some(group) => m.idp.push(group.to_string()),
                None => m.owners.push(item.strip_prefix("user:").unwrap_or(item).to_string()),
            }
        }
        m
    }

    fn contain(&self, s: &Subject<'_>) -> bool {
        self.owners.iter().any(|o| o == s.owner) || self.idp.iter().any(|g| s.in_idp_group(g))
    }
}

fn name_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

impl Policy {
    /// The policy of a tailnet nobody set one for: every node may reach every other on any port.
    pub fn allow_all() -> Policy {
        Policy {
            groups: BTreeMap::new(),
            members: BTreeMap::new(),
            tag_owners: BTreeMap::new(),
            grants: vec![Grant {
                src: vec![Selector::Any],
                dst: vec![Selector::Any],
                ip: vec![Ports { proto: Proto::Any, first: 0, last: u16::MAX }],
                app: BTreeMap::new(),
            }],
            tests: Vec::new(),
            explicit: false,
            recent: MembershipCache::default(),
            capability_cache: CapabilityCache::default(),
        }
    }

    /// Which network grants `s` is in.
    pub fn membership(&self, s: &Subject<'_>) -> Membership {
        let words = self.grants.len().div_ceil(64);
        let mut m = Membership { src: vec![0; words], dst: vec![0; words] };
        for (i, g) in self.grants.iter().enumerate().filter(|(_, g)| !g.ip.is_empty()) {
            if self.any_matches(&g.src, s) {
                m.src[i / 64] |= 1 << (i % 64);
            }
            if self.any_matches(&g.dst, s) {
                m.dst[i / 64] |= 1 << (i % 64);
            }
        }
        m
    }

    /// [`Policy::membership`], remembered per node (and recomputed when its tags or owner change).
    pub fn membership_cached(&self, s: &Subject<'_>) -> std::sync::Arc<Membership> {
        let mut cache = self.recent.0.lock().unwrap();
        if let Some((tags, owner, groups, m)) = cache.get(s.id)
            && tags.as_slice() == s.tags
            && owner == s.owner
            && groups.as_deref() == s.groups
        {
            return m.clone();
        }
        if cache.len() > 100_000 {
            cache.clear();
        }
        let m = std::sync::Arc::new(self.membership(s));
        cache.insert(
            s.id.to_string(),
            (s.tags.to_vec(), s.owner.to_string(), s.groups.map(<[String]>::to_vec), m.clone()),
        );
        m
    }

    /// Parses and validates a document and runs its tests.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let doc = jsonc::parse(text).map_err(|e| err("", e.pos, e.message))?;
        let V::Object(members) = &doc.value else {
            return Err(err("", doc.pos, format!("the policy must be an object, not {}", doc.kind())));
        };
        for (key, pos, _) in members {
            if !SECTIONS.contains(&key.as_str()) {
                return Err(err(
                    key,
                    *pos,
                    format!("unknown section {key}; expected one of {}", SECTIONS.join(", "), key = quote(key)),
                ));
            }
        }
        let section = |name: &str| members.iter().find(|(k, _, _)| k == name).map(|(_, _, v)| v);
        let mut policy = Policy {
            groups: BTreeMap::new(),
            members: BTreeMap::new(),
            tag_owners: BTreeMap::new(),
            grants: Vec::new(),
            tests: Vec::new(),
            explicit: true,
            recent: MembershipCache::default(),
            capability_cache: CapabilityCache::default(),
        };
        if let Some(groups) = section("groups") {
            for (name, pos, members) in object("groups", groups)? {
                let path = format!("groups[{name}]", name = quote(name));
                if !name.strip_prefix("group:").is_some_and(name_ok) {
                    return Err(err(&path, *pos, "a group is named group:<lowercase letters, digits, '-'>"));
                }
                let owners = strings(&path, members)?
                    .into_iter()
                    .map(|(i, s, pos)| {
                        if s.starts_with("group:")
                            || s.starts_with("tag:")
                            || s.is_empty()
                            || s.contains(char::is_whitespace)
                            || s.strip_prefix("idp:").is_some_and(str::is_empty)
                            || s.strip_prefix("user:").is_some_and(|e| e.is_empty() || e.contains(':'))
                        {
                            Err(err(
                                &format!("{path}[{i}]"),
                                pos,
                                format!(
                                    "{s} is not a member (groups hold owners, user:<email> and idp:<group>, not groups or tags)",
                                    s = quote(s)
                                ),
                            ))
                        } else {
                            Ok(s)
                        }
                    })
                    .collect::<Result<Vec<String>, _>>()?;
                policy.members.insert(name.clone(), Members::of(&owners));
                policy.groups.insert(name.clone(), owners);
            }
        }
        if let Some(tags) = section("tagOwners") {
            for (name, pos, owners) in object("tagOwners", tags)? {
                let path = format!("tagOwners[{name}]", name = quote(name));
                if !name.strip_prefix("tag:").is_some_and(name_ok) {
                    return Err(err(&path, *pos, "a tag is named tag:<lowercase letters, digits, '-'>"));
                }
                let mut list = Vec::new();
                for (i, owner, pos) in strings(&path, owners)? {
                    if owner.starts_with("group:") && !policy.groups.contains_key(&owner) {
                        return Err(err(&format!("{path}[{i}]"), pos, format!("{owner} is not defined in groups")));
                    }
                    if let Some(role) = owner.strip_prefix("role:")
                        && crate::model::Role::parse(role).is_none()
                    {
                        let message = format!("{} is not a role: admin, operator, auditor or approver", quote(&owner));
                        return Err(err(&format!("{path}[{i}]"), pos, message));
                    }
                    if owner.strip_prefix("user:").is_some_and(|e| e.is_empty() || e.contains(':')) {
                        let message = format!("{} is not user:<email>", quote(&owner));
                        return Err(err(&format!("{path}[{i}]"), pos, message));
                    }
                    if owner.strip_prefix("token:").is_some_and(|name| !name_ok(name)) {
                        let message = "a token is named token:<lowercase letters, digits, '-'>";
                        return Err(err(&format!("{path}[{i}]"), pos, message));
                    }
                    list.push(owner);
                }
                policy.tag_owners.insert(name.clone(), list);
            }
        }
        if let Some(grants) = section("grants") {
            for (i, grant) in array("grants", grants)?.iter().enumerate() {
                policy.grants.push(policy.grant(&format!("grants[{i}]"), grant)?);
            }
        }
        if let Some(tests) = section("tests") {
            for (i, test) in array("tests", tests)?.iter().enumerate() {
                policy.tests.push(policy.test(&format!("tests[{i}]"), test)?);
            }
        }
        policy.run_tests()?;
        Ok(policy)
    }

    fn selector(&self, path: &str, pos: Pos, s: &str) -> Result<Selector, PolicyError> {
        let sel = if s == "*" {
            Selector::Any
        } else if s == "gateway" {
            Selector::Gateway
        } else if let Some(name) = s.strip_prefix("tag:") {
            if !name_ok(name) {
                return Err(err(path, pos, format!("{s} is not a tag", s = quote(s))));
            }
            if !self.tag_owners.contains_key(s) {
                return Err(err(path, pos, format!("{s} is not defined in tagOwners")));
            }
            Selector::Tag(s.to_string())
        } else if s.starts_with("group:") {
            if !self.groups.contains_key(s) {
                return Err(err(path, pos, format!("{s} is not defined in groups")));
            }
            Selector::Group(s.to_string())
        } else if let Some(email) = s.strip_prefix("user:") {
            if email.is_empty() || email.contains(':') || email.contains(char::is_whitespace) {
                return Err(err(path, pos, format!("{s} is not user:<email>", s = quote(s))));
            }
            Selector::User(email.to_string())
        } else if let Some(auto) = s.strip_prefix("autogroup:") {
            match auto {
                "member" => Selector::Member,
                "tagged" => Selector::Tagged,
                _ => {
                    return Err(err(
                        path,
                        pos,
                        format!("{s} is not an autogroup (autogroup:member, autogroup:tagged)", s = quote(s)),
                    ));
                }
            }
        } else if uuid::Uuid::parse_str(s).is_ok() {
            Selector::Node(s.to_ascii_lowercase())
        } else if s.is_empty() || s.contains(char::is_whitespace) || s.contains(':') {
            return Err(err(
                path,
                pos,
                format!(
                    "{s} is not a selector (*, tag:x, group:x, user:<email>, autogroup:member, autogroup:tagged, an owner, a node id, gateway)",
                    s = quote(s)
                ),
            ));
        } else {
            Selector::Owner(s.to_string())
        };
        Ok(sel)
    }

    fn grant(&self, path: &str, node: &J) -> Result<Grant, PolicyError> {
        let members = object(path, node)?;
        let mut grant = Grant { src: vec![], dst: vec![], ip: vec![], app: BTreeMap::new() };
        let (mut has_src, mut has_dst) = (false, false);
        for (key, pos, value) in members {
            let field = format!("{path}.{key}");
            match key.as_str() {
                "src" | "dst" => {
                    let list = strings(&field, value)?
                        .into_iter()
                        .map(|(i, s, pos)| self.selector(&format!("{field}[{i}]"), pos, &s))
                        .collect::<Result<Vec<_>, _>>()?;
                    if list.is_empty() {
                        return Err(err(&field, value.pos, "must name at least one selector"));
                    }
                    if key == "src" {
                        has_src = true;
                        grant.src = list;
                    } else {
                        has_dst = true;
                        grant.dst = list;
                    }
                }
                "ip" => {
                    for (i, spec, pos) in strings(&field, value)? {
                        grant.ip.push(ports(&format!("{field}[{i}]"), pos, &spec)?);
                    }
                }
                "app" => {
                    for (name, pos, values) in object(&field, value)? {
                        let cap = format!("{field}[{name}]", name = quote(name));
                        if name.is_empty() || !name.contains('/') {
                            return Err(err(&cap, *pos, "a capability is named like example.com/cap/name"));
                        }
                        grant.app.insert(name.clone(), array(&cap, values)?.iter().map(J::to_json).collect());
                    }
                }
                _ => {
                    return Err(err(
                        &field,
                        *pos,
                        format!("unknown key {key}; a grant has src, dst, ip and app", key = quote(key)),
                    ));
                }
            }
        }
        if !has_src || !has_dst {
            return Err(err(path, node.pos, "a grant needs both src and dst"));
        }
        if grant.ip.is_empty() && grant.app.is_empty() {
            return Err(err(path, node.pos, "a grant needs ip, app or both"));
        }
        Ok(grant)
    }

    fn test(&self, path: &str, node: &J) -> Result<PolicyTest, PolicyError> {
        let members = object(path, node)?;
        let mut src = None;
        let (mut accept, mut deny) = (Vec::new(), Vec::new());
        for (key, pos, value) in members {
            let field = format!("{path}.{key}");
            match key.as_str() {
                "src" => {
                    let V::String(s) = &value.value else {
                        return Err(err(&field, value.pos, format!("must be a string, not {}", value.kind())));
                    };
                    let sel = self.selector(&field, value.pos, s)?;
                    if sel == Selector::Any {
                        return Err(err(&field, value.pos, "a test's src names one identity, not *"));
                    }
                    src = Some(sel);
                }
                "accept" | "deny" => {
                    for (i, target, pos) in strings(&field, value)? {
                        let tpath = format!("{field}[{i}]");
                        let (dst, port) = target
                            .rsplit_once(':')
                            .and_then(|(d, p)| Some((d, p.parse::<u16>().ok()?)))
                            .ok_or_else(|| {
                                err(
                                    &tpath,
                                    pos,
                                    format!(
                                        "{target} is not destination:port, e.g. gateway:80",
                                        target = quote(&target)
                                    ),
                                )
                            })?;
                        let dst = self.selector(&tpath, pos, dst)?;
                        let entry = (Target { dst, port }, tpath, pos);
                        if key == "accept" {
                            accept.push(entry);
                        } else {
                            deny.push(entry);
                        }
                    }
                }
                _ => {
                    return Err(err(
                        &field,
                        *pos,
                        format!("unknown key {key}; a test has src, accept and deny", key = quote(key)),
                    ));
                }
            }
        }
        let src = src.ok_or_else(|| err(path, node.pos, "a test needs src"))?;
        Ok(PolicyTest { src, accept, deny })
    }

    /// A stand-in node for a selector named in a test.
    fn example(&self, sel: &Selector) -> Example {
        let mut e = Example { id: String::new(), tags: vec![], owner: String::new(), gateway: false, groups: None };
        let person = |e: &mut Example, email: &str, groups: Vec<String>| {
            e.owner = email.to_string();
            e.groups = Some(groups);
        };
        match sel {
            Selector::Tag(t) => e.tags = vec![t.clone()],
            Selector::Group(g) => match self.groups[g].first().map(String::as_str).unwrap_or_default() {
                m if m.starts_with("idp:") => person(&mut e, "member@example.invalid", vec![m[4..].to_string()]),
                m if m.starts_with("user:") => person(&mut e, &m[5..], vec![]),
                m => e.owner = m.to_string(),
            },
            Selector::Owner(o) => e.owner = o.clone(),
            Selector::User(email) => person(&mut e, email, vec![]),
            Selector::Member => person(&mut e, "member@example.invalid", vec![]),
            Selector::Tagged => {
                e.tags = vec![self.tag_owners.keys().next().cloned().unwrap_or_else(|| "tag:example".into())]
            }
            Selector::Node(id) => e.id = id.clone(),
            Selector::Gateway => {
                e.tags = vec!["tag:gateway".into()];
                e.gateway = true;
            }
            Selector::Any => {}
        }
        e
    }

    fn run_tests(&self) -> Result<(), PolicyError> {
        for test in &self.tests {
            let src = self.example(&test.src);
            let src = src.subject();
            for (target, path, pos) in &test.accept {
                let dst = self.example(&target.dst);
                let dst = dst.subject();
                if !self.allows(&src, &dst, Proto::Tcp, target.port) {
                    return Err(err(
                        path,
                        *pos,
                        format!("test failed: {} cannot reach {}:{}", test.src, target.dst, target.port),
                    ));
                }
            }
            for (target, path, pos) in &test.deny {
                let dst = self.example(&target.dst);
                let dst = dst.subject();
                if self.allows(&src, &dst, Proto::Tcp, target.port) {
                    return Err(err(
                        path,
                        *pos,
                        format!("test failed: {} can reach {}:{}", test.src, target.dst, target.port),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn matches(&self, sel: &Selector, s: &Subject<'_>) -> bool {
        match sel {
            Selector::Any => true,
            Selector::Tag(t) => s.tags.iter().any(|x| x == t),
            Selector::Group(g) => s.tags.is_empty() && self.members.get(g).is_some_and(|m| m.contain(s)),
            Selector::Owner(o) => s.tags.is_empty() && o == s.owner,
            Selector::User(email) => s.tags.is_empty() && s.person() && email == s.owner,
            Selector::Member => s.tags.is_empty() && s.person(),
            Selector::Tagged => !s.tags.is_empty(),
            Selector::Node(id) => id.eq_ignore_ascii_case(s.id),
            Selector::Gateway => s.gateway,
        }
    }

    fn any_matches(&self, sels: &[Selector], s: &Subject<'_>) -> bool {
        sels.iter().any(|sel| self.matches(sel, s))
    }

    /// Whether `src` may open `proto`/`port` to `dst`.
    pub fn allows(&self, src: &Subject<'_>, dst: &Subject<'_>, proto: Proto, port: u16) -> bool {
        self.grants.iter().any(|g| {
            self.any_matches(&g.src, src) && self.any_matches(&g.dst, dst) && g.ip.iter().any(|p| p.allows(proto, port))
        })
    }

    /// The capability `name` that `src` has when it talks to `dst`: every value of every grant that
    /// applies, in document order.
    pub fn capabilities(&self, src: &Subject<'_>, dst: &Subject<'_>, name: &str) -> Vec<serde_json::Value> {
        self.grants
            .iter()
            .filter(|g| self.any_matches(&g.src, src) && self.any_matches(&g.dst, dst))
            .filter_map(|g| g.app.get(name))
            .flatten()
            .cloned()
            .collect()
    }

    /// [`Policy::capabilities`], remembered for this policy version per (source, destination, name).
    pub fn capabilities_cached(
        &self,
        src: &Subject<'_>,
        dst: &Subject<'_>,
        name: &str,
    ) -> std::sync::Arc<Vec<serde_json::Value>> {
        let groups = src.groups.map(|g| g.join(","));
        let key =
            format!("{}|{}|{}|{:?}|{}|{}|{}", src.id, src.tags.join(","), src.owner, groups, dst.id, dst.gateway, name);
        let mut cache = self.capability_cache.0.lock().unwrap();
        if let Some(v) = cache.get(&key) {
            return v.clone();
        }
        if cache.len() > 100_000 {
            cache.clear();
        }
        let v = std::sync::Arc::new(self.capabilities(src, dst, name));
        cache.insert(key, v.clone());
        v
    }

    /// Whether the person `email` (with identity-provider `groups`) owns `tag` by `tagOwners`: named as
    /// `user:<email>`, by their email, or through a group they are in.
    pub fn person_owns_tag(&self, tag: &str, email: &str, groups: &[String]) -> bool {
        let me = Subject { id: "", tags: &[], owner: email, gateway: false, groups: Some(groups) };
        self.tag_owners.get(tag).is_some_and(|owners| {
            owners.iter().any(|o| match o.strip_prefix("group:") {
                Some(_) => self.members.get(o).is_some_and(|m| m.contain(&me)),
                None => o.strip_prefix("user:").unwrap_or(o) == email,
            })
        })
    }

    /// Whether a tag may be handed out (by an auth key or a trust rule).
    pub fn tag_defined(&self, tag: &str) -> bool {
        !self.explicit || self.tag_owners.contains_key(tag)
    }

    /// What every node may see and accept, computed in one pass: per grant, the sets of nodes its `src`
    /// and `dst` match (bitsets), then per node the union over the grants it is in.
    pub fn compile(
        &self,
        nodes: &[CompileNode<'_>],
        network: (Ipv4Addr, u8),
        gateway: Ipv4Addr,
    ) -> HashMap<String, View> {
        let words = nodes.len().div_ceil(64);
        let set = |sels: &[Selector]| -> Vec<u64> {
            let mut bits = vec![0u64; words];
            for (i, n) in nodes.iter().enumerate() {
                if self.any_matches(sels, &n.subject) {
                    bits[i / 64] |= 1 << (i % 64);
                }
            }
            bits
        };
        let network_grants: Vec<(&Grant, Vec<u64>, Vec<u64>)> =
            self.grants.iter().filter(|g| !g.ip.is_empty()).map(|g| (g, set(&g.src), set(&g.dst))).collect();
        let has = |bits: &[u64], i: usize| bits[i / 64] & (1 << (i % 64)) != 0;
        let mut views = HashMap::with_capacity(nodes.len());
        for (i, me) in nodes.iter().enumerate() {
            let mut visible = vec![0u64; words];
            let mut filter = Vec::new();
            for (grant, src, dst) in &network_grants {
                if has(src, i) {
                    for (w, d) in visible.iter_mut().zip(dst) {
                        *w |= d;
                    }
                }
                if has(dst, i) {
                    for (w, s) in visible.iter_mut().zip(src) {
                        *w |= s;
                    }
                    if self.explicit {
                        let sources = if grant.src.contains(&Selector::Any) {
                            vec![network]
                        } else {
                            // Not the node itself: its own address never arrives through a tunnel.
                            let mut v: Vec<(Ipv4Addr, u8)> = (0..nodes.len())
                                .filter(|&j| j != i && has(src, j))
                                .map(|j| (nodes[j].address, 32))
                                .collect();
                            if grant.src.contains(&Selector::Gateway) {
                                v.push((gateway, 32));
                            }
                            v
                        };
                        if !sources.is_empty() {
                            for p in &grant.ip {
                                filter.push(FilterRule { sources: sources.clone(), ports: *p });
                            }
                        }
                    }
                }
            }
            let peers = (0..nodes.len())
                .filter(|&j| j != i && has(&visible, j))
                .map(|j| nodes[j].subject.id.to_string())
                .collect();
            views.insert(me.subject.id.to_string(), View { peers, filter: self.explicit.then_some(filter) });
        }
        views
    }

    /// One line for the audit log: what changed from `old` to `self`.
    pub fn diff_summary(&self, old: &Policy) -> String {
        let key = |g: &Grant| format!("{g:?}");
        let before: BTreeSet<String> = old.grants.iter().map(key).collect();
        let after: BTreeSet<String> = self.grants.iter().map(key).collect();
        let mut parts = vec![format!(
            "{} grants (+{} -{})",
            self.grants.len(),
            after.difference(&before).count(),
            before.difference(&after).count()
        )];
        let changed = |a: &BTreeMap<String, Vec<String>>, b: &BTreeMap<String, Vec<String>>| -> Vec<String> {
            a.keys()
                .chain(b.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|k| a.get(*k) != b.get(*k))
                .cloned()
                .collect()
        };
        let groups = changed(&old.groups, &self.groups);
        if !groups.is_empty() {
            parts.push(format!("groups changed: {}", groups.join(", ")));
        }
        let tags = changed(&old.tag_owners, &self.tag_owners);
        if !tags.is_empty() {
            parts.push(format!("tagOwners changed: {}", tags.join(", ")));
        }
        parts.push(format!("{} tests", self.tests.len()));
        parts.join("; ")
    }
}

/// A node as the compiler sees it.
#[derive(Clone, Copy, Debug)]
pub struct CompileNode<'a> {
    pub subject: Subject<'a>,
    pub address: Ipv4Addr,
}

/// One inbound rule of a node's packet filter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FilterRule {
    pub sources: Vec<(Ipv4Addr, u8)>,
    pub ports: Ports,
}

/// What one node is told: the peers it may see, and its filter (`None` = allow all).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct View {
    pub peers: BTreeSet<String>,
    pub filter: Option<Vec<FilterRule>>,
}

fn object<'a>(path: &str, node: &'a J) -> Result<&'a [(String, Pos, J)], PolicyError> {
    match &node.value {
        V::Object(m) => Ok(m),
        _ => Err(err(path, node.pos, format!("must be an object, not {}", node.kind()))),
    }
}

fn array<'a>(path: &str, node: &'a J) -> Result<&'a [J], PolicyError> {
    match &node.value {
        V::Array(items) => Ok(items),
        _ => Err(err(path, node.pos, format!("must be an array, not {}", node.kind()))),
    }
}

/// An array of strings, with each one's index and position.
fn strings(path: &str, node: &J) -> Result<Vec<(usize, String, Pos)>, PolicyError> {
    array(path, node)?
        .iter()
        .enumerate()
        .map(|(i, item)| match &item.value {
            V::String(s) => Ok((i, s.clone(), item.pos)),
            _ => Err(err(&format!("{path}[{i}]"), item.pos, format!("must be a string, not {}", item.kind()))),
        })
        .collect()
}

/// `*`, `tcp:80`, `udp:53`, `tcp:8000-8999`, `tcp:*`, `icmp`, `443` (any protocol).
fn ports(path: &str, pos: Pos, spec: &str) -> Result<Ports, PolicyError> {
    let bad = |why: &str| {
        err(path, pos, format!("{spec}: {why}; use *, tcp:80, udp:53, tcp:8000-8999, icmp or 443", spec = quote(spec)))
    };
    if spec == "*" {
        return Ok(Ports { proto: Proto::Any, first: 0, last: u16::MAX });
    }
    if spec == "icmp" {
        return Ok(Ports { proto: Proto::Icmp, first: 0, last: 0 });
    }
    let (proto, range) = match spec.split_once(':') {
        Some(("tcp", r)) => (Proto::Tcp, r),
        Some(("udp", r)) => (Proto::Udp, r),
        Some((p, _)) => return Err(bad(&format!("unknown protocol {p:?}"))),
        None => (Proto::Any, spec),
    };
    if range == "*" {
        return Ok(Ports { proto, first: 0, last: u16::MAX });
    }
    let (first, last) = match range.split_once('-') {
        Some((a, b)) => (a, b),
        None => (range, range),
    };
    let first: u16 = first.parse().map_err(|_| bad("not a port"))?;
    let last: u16 = last.parse().map_err(|_| bad("not a port"))?;
    if first == 0 || first > last {
        return Err(bad("ports run from 1 to 65535, low-high"));
    }
    Ok(Ports { proto, first, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
  // Who is who.
  "groups": { "group:eng": ["alice@acme.com", "bob@acme.com"], },
  "tagOwners": { "tag:ci": ["group:eng"], "tag:sensor": [], "tag:db": ["alice@acme.com"] },
  "grants": [
    { "src": ["tag:ci", "group:eng"], "dst": ["gateway"], "ip": ["tcp:80"],
      "app": { "cordon.dev/cap/ai": [{ "models": ["openai/gpt-*"], "rpm": 60 }] } },
    { "src": ["tag:sensor"], "dst": ["gateway"], "ip": ["tcp:80"] },
    { "src": ["group:eng"], "dst": ["tag:db"], "ip": ["tcp:5432", "icmp"] },
    { "src": ["tag:ci"], "dst": ["gateway"], "app": { "cordon.dev/cap/ai": [{ "tpm": 100000 }] } },
  ],
  "tests": [
    { "src": "tag:ci", "accept": ["gateway:80"], "deny": ["tag:db:5432"] },
    { "src": "alice@acme.com", "accept": ["tag:db:5432"] },
  ],
}"#;

    fn subject<'a>(tags: &'a [String], owner: &'a str) -> Subject<'a> {
        Subject { id: "", tags, owner, gateway: false, groups: None }
    }

    #[test]
    fn parses_validates_and_runs_tests() {
        let p = Policy::parse(EXAMPLE).unwrap();
        assert_eq!(p.grants.len(), 4);
        let ci = ["tag:ci".to_string()];
        let gateway = Subject { id: "", tags: &[], owner: "", gateway: true, groups: None };
        assert!(p.allows(&subject(&ci, ""), &gateway, Proto::Tcp, 80));
        assert!(!p.allows(&subject(&ci, ""), &gateway, Proto::Tcp, 81));
        let caps = p.capabilities(&subject(&ci, ""), &gateway, "cordon.dev/cap/ai");
        assert_eq!(
            caps,
            [serde_json::json!({"models": ["openai/gpt-*"], "rpm": 60}), serde_json::json!({"tpm": 100000})]
        );
        let alice = p.capabilities(&subject(&[], "alice@acme.com"), &gateway, "cordon.dev/cap/ai");
        assert_eq!(alice.len(), 1, "alice gets the first grant's capability only");
        assert!(p.tag_defined("tag:sensor") && !p.tag_defined("tag:nope"));
        assert!(Policy::allow_all().tag_defined("tag:anything"));
    }

    const PEOPLE: &str = r#"{
  "groups": { "group:eng": ["idp:engineering", "user:bob@acme.com"], "group:ops": ["carol@acme.com"] },
  "tagOwners": { "tag:build": ["group:eng"], "tag:ci": [], "tag:db": ["user:carol@acme.com"] },
  "grants": [
    { "src": ["group:eng"], "dst": ["gateway"], "ip": ["tcp:80"] },
    { "src": ["user:dave@acme.com"], "dst": ["tag:db"], "ip": ["tcp:5432"] },
    { "src": ["autogroup:member"], "dst": ["autogroup:member"], "ip": ["tcp:22"] },
    { "src": ["autogroup:tagged"], "dst": ["tag:db"], "ip": ["tcp:5433"] }
  ],
  "tests": [
    { "src": "group:eng", "accept": ["gateway:80"], "deny": ["tag:db:5432"] },
    { "src": "user:dave@acme.com", "accept": ["tag:db:5432", "autogroup:member:22"] },
    { "src": "autogroup:tagged", "accept": ["tag:db:5433"], "deny": ["autogroup:member:22"] }
  ]
}"#;

    #[test]
    fn people_selectors_match_persons_and_their_idp_groups() {
        let p = Policy::parse(PEOPLE).unwrap();
        let gateway = Subject { id: "", tags: &[], owner: "", gateway: true, groups: None };
        let eng = ["engineering".to_string()];
        let person = |owner: &'static str, groups: &'static [String]| Subject {
            id: "",
            tags: &[],
            owner,
            gateway: false,
            groups: Some(groups),
        };
        let alice = person("alice@acme.com", &[]);
        let alice_eng = Subject { groups: Some(&eng), ..alice };
        assert!(!p.allows(&alice, &gateway, Proto::Tcp, 80), "not in the IdP group");
        assert!(p.allows(&alice_eng, &gateway, Proto::Tcp, 80), "idp:engineering");
        assert!(p.allows(&person("bob@acme.com", &[]), &gateway, Proto::Tcp, 80), "user:bob@acme.com");
        // A workload owned by alice is not alice: user: and autogroup:member match people only.
        let workload = subject(&[], "dave@acme.com");
        let db = ["tag:db".to_string()];
        assert!(p.allows(&person("dave@acme.com", &[]), &subject(&db, ""), Proto::Tcp, 5432));
        assert!(!p.allows(&workload, &subject(&db, ""), Proto::Tcp, 5432));
        assert!(p.allows(&alice, &person("bob@acme.com", &[]), Proto::Tcp, 22), "member to member");
        assert!(!p.allows(&alice, &workload, Proto::Tcp, 22));
        // A tagged node is identified by its tags, whoever logged it in.
        let tagged_person = Subject { tags: &db, ..alice_eng };
        assert!(!p.allows(&tagged_person, &gateway, Proto::Tcp, 80));
        assert!(p.allows(&tagged_person, &subject(&db, ""), Proto::Tcp, 5433), "autogroup:tagged");
        // Tag ownership by people, directly or through groups (IdP ones included).
        assert!(p.person_owns_tag("tag:build", "alice@acme.com", &eng));
        assert!(p.person_owns_tag("tag:build", "bob@acme.com", &[]));
        assert!(!p.person_owns_tag("tag:build", "alice@acme.com", &[]));
        assert!(p.person_owns_tag("tag:db", "carol@acme.com", &[]));
        assert!(!p.person_owns_tag("tag:ci", "carol@acme.com", &eng));
    }

    #[test]
    fn people_selectors_are_validated() {
        let e = error_of(r#"{"grants": [{"src": ["autogroup:admins"], "dst": ["*"], "ip": ["*"]}]}"#);
        assert!(e.message.contains("not an autogroup"), "{e}");
        let e = error_of(r#"{"grants": [{"src": ["user:"], "dst": ["*"], "ip": ["*"]}]}"#);
        assert!(e.message.contains("not user:<email>"), "{e}");
        let e = error_of(r#"{"groups": {"group:x": ["idp:"]}}"#);
        assert_eq!(e.path, "groups[\"group:x\"][0]");
        let e = error_of(r#"{"tagOwners": {"tag:x": ["user:"]}}"#);
        assert!(e.message.contains("user:<email>"), "{e}");
        let e = error_of(
            r#"{"groups": {"group:eng": ["idp:eng"]}, "grants": [{"src": ["group:eng"], "dst": ["gateway"], "ip": ["tcp:80"]}],
                "tests": [{"src": "autogroup:member", "accept": ["gateway:80"]}]}"#,
        );
        assert!(e.message.contains("test failed: autogroup:member cannot reach gateway:80"), "{e}");
    }

    fn error_of(text: &str) -> PolicyError {
        Policy::parse(text).unwrap_err()
    }

    #[test]
    fn errors_point_at_the_place() {
        let e =
            error_of("{\n  \"grants\": [\n    {\"src\": [\"group:ops\"], \"dst\": [\"*\"], \"ip\": [\"*\"]}\n  ]\n}");
        assert_eq!(e.path, "grants[0].src[0]");
        assert_eq!((e.pos.line, e.pos.col), (3, 14));
        assert!(e.message.contains("group:ops is not defined"), "{e}");

        let e = error_of("{\"acls\": []}");
        assert_eq!(e.path, "acls");
        assert!(e.message.contains("unknown section"));

        let e = error_of("{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"], \"ip\": [\"tcp:0\"]}]}");
        assert_eq!(e.path, "grants[0].ip[0]");
        let e = error_of("{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"], \"ip\": [\"sctp:9\"]}]}");
        assert!(e.message.contains("unknown protocol"), "{e}");
        let e = error_of("{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"tag:x\"], \"ip\": [\"*\"]}]}");
        assert!(e.message.contains("tag:x is not defined in tagOwners"), "{e}");
        let e = error_of("{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"], \"ip\": [\"*\"], \"via\": []}]}");
        assert_eq!(e.path, "grants[0].via");
        let e = error_of("{\"grants\": [{\"src\": [\"*\"], \"dst\": [\"*\"]}]}");
        assert!(e.message.contains("needs ip, app or both"), "{e}");
        let e = error_of("{\"grants\": [}");
        assert!(e.path.is_empty() && e.pos.line == 1, "{e}");
    }

    #[test]
    fn failing_tests_refuse_the_policy() {
        let text = EXAMPLE.replace(r#""deny": ["tag:db:5432"]"#, r#""deny": ["gateway:80"]"#);
        let e = error_of(&text);
        assert_eq!(e.path, "tests[0].deny[0]");
        assert!(e.message.contains("tag:ci can reach gateway:80"), "{e}");
        let text = EXAMPLE.replace(r#""accept": ["tag:db:5432"]"#, r#""accept": ["tag:db:22"]"#);
        assert!(error_of(&text).message.contains("cannot reach tag:db:22"));
    }

    #[test]
    fn compile_gives_each_node_its_peers_and_filter() {
        let p = Policy::parse(EXAMPLE).unwrap();
        let sensor = ["tag:sensor".to_string()];
        let db = ["tag:db".to_string()];
        let nodes = [
            CompileNode {
                subject: Subject { id: "s1", tags: &sensor, owner: "", gateway: false, groups: None },
                address: Ipv4Addr::new(100, 64, 0, 2),
            },
            CompileNode {
                subject: Subject { id: "s2", tags: &sensor, owner: "", gateway: false, groups: None },
                address: Ipv4Addr::new(100, 64, 0, 3),
            },
            CompileNode {
                subject: Subject { id: "al", tags: &[], owner: "alice@acme.com", gateway: false, groups: None },
                address: Ipv4Addr::new(100, 64, 0, 4),
            },
            CompileNode {
                subject: Subject { id: "db", tags: &db, owner: "", gateway: false, groups: None },
                address: Ipv4Addr::new(100, 64, 0, 5),
            },
        ];
        let views = p.compile(&nodes, (Ipv4Addr::new(100, 64, 0, 0), 10), Ipv4Addr::new(100, 64, 0, 1));
        assert!(views["s1"].peers.is_empty(), "sensors see no other sensor: {:?}", views["s1"]);
        assert_eq!(views["al"].peers, BTreeSet::from(["db".to_string()]));
        assert_eq!(views["db"].peers, BTreeSet::from(["al".to_string()]));
        let db_filter = views["db"].filter.as_ref().unwrap();
        assert_eq!(db_filter.len(), 2);
        assert_eq!(db_filter[0].sources, [(Ipv4Addr::new(100, 64, 0, 4), 32)]);
        assert_eq!(views["s1"].filter.as_deref(), Some(&[][..]), "a sensor accepts nothing");

        let open =
            Policy::allow_all().compile(&nodes, (Ipv4Addr::new(100, 64, 0, 0), 10), Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(open["s1"].peers.len(), 3);
        assert!(open["s1"].filter.is_none());
    }
}
