//! A real PostgreSQL for tests: a fresh database per call, on the server `CORDON_TEST_POSTGRES` names or
//! on a private cluster this test process starts once and that stops when the process ends.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::skip;

/// A URL of a PostgreSQL server whose user may `CREATE DATABASE`, e.g.
/// `postgres://postgres@127.0.0.1:5432/postgres` or `postgres://postgres@/postgres?host=/socket/dir`.
/// `./scripts/test.sh` starts one cluster for the whole run and sets it. The databases made on it are not
/// dropped, so point it at a throwaway server.
pub const SERVER_VAR: &str = "CORDON_TEST_POSTGRES";

const INSTALL: &str = "install PostgreSQL (apt-get install postgresql), or set CORDON_TEST_POSTGRES to the URL of a \
                       server where the user may CREATE DATABASE";

/// The private cluster, started by the first test of this process that asks for a database.
static PRIVATE: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// Whether [`database`] can be expected to find PostgreSQL: `CORDON_TEST_POSTGRES` and `psql`, or the
/// server's binaries. Starts nothing.
pub fn available() -> bool {
    if std::env::var_os(SERVER_VAR).is_some() { psql().is_some() } else { server_bin_dir().is_some() }
}

/// The URL (`postgres://…`) of a new, empty database made for this call, or `None` after [`skip`] when
/// PostgreSQL is not available. Panics when `CORDON_TEST_POSTGRES` is set but unusable: whoever set it
/// meant the tests to run there.
pub async fn database(test: &str) -> Option<String> {
    let name = database_name(test);
    if let Ok(server) = std::env::var(SERVER_VAR) {
        let Some(psql) = psql() else {
            skip(test, &format!("{SERVER_VAR} is set but psql is not installed: apt-get install postgresql-client"));
            return None;
        };
        let url = with_database(&server, &name).unwrap_or_else(|e| panic!("{SERVER_VAR}={server} is not usable: {e}"));
        if let Err(e) = create_database(&psql, &server, &name).await {
            panic!("{SERVER_VAR}={server}: {e}; start that server, or unset {SERVER_VAR} to use a private cluster");
        }
        return Some(url);
    }
    // The first caller starts the cluster on a blocking thread; the others wait there for its outcome.
    let cluster = tokio::task::spawn_blocking(|| PRIVATE.get_or_init(Cluster::start).as_ref())
        .await
        .expect("the PostgreSQL start did not panic");
    let cluster = match cluster {
        Ok(cluster) => cluster,
        Err(reason) => {
            skip(test, reason);
            return None;
        }
    };
    create_database(&cluster.psql, &cluster.url("postgres"), &name)
        .await
        .unwrap_or_else(|e| panic!("the private PostgreSQL cluster on port {}: {e}", cluster.port));
    Some(cluster.url(&name))
}

/// The `psql` to reach a test database with: the server's own, else the one on `PATH`.
pub fn psql() -> Option<PathBuf> {
    server_bin_dir().map(|dir| dir.join("psql")).filter(|p| p.is_file()).or_else(|| on_path("psql"))
}

/// `t_<test>_<random>`, within PostgreSQL's 63-byte limit on names.
fn database_name(test: &str) -> String {
    let test: String =
        test.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).take(40).collect();
    format!("t_{test}_{:016x}", rand::random::<u64>())
}

/// `url` with its database (the path) replaced by `name`, keeping user, host and query.
fn with_database(url: &str, name: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or("it must be a URL that starts with postgres:// or postgresql://")?;
    let scheme = &url[..url.len() - rest.len()];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find(['?', '#']).map_or("", |i| &tail[i..]);
    Ok(format!("{scheme}{authority}/{name}{query}"))
}

async fn create_database(psql: &Path, server: &str, name: &str) -> Result<(), String> {
    let out = tokio::process::Command::new(psql)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", server, "-c"])
        .arg(format!("CREATE DATABASE \"{name}\""))
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", psql.display()))?;
    if !out.status.success() {
        return Err(format!("CREATE DATABASE {name} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Where the server's binaries are: the newest `/usr/lib/postgresql/<version>/bin` (Debian keeps them off
/// `PATH`), else the directory of the `initdb` on `PATH`.
fn server_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name.to_str()?.split('.').map(|n| n.parse::<u32>().ok()).collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).or_else(|| {
        let dir = on_path("initdb")?.parent()?.to_path_buf();
        has_server(&dir).then_some(dir)
    })
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// Runs the cluster: `$1` is `postgres`, `$2` the cluster's directory, `$3` the port. Its stdin is a pipe
/// whose only writer is the test process, so end of file means that process has ended, however it
/// ended; the shell then stops the cluster (fast shutdown) and removes the directory. If postgres exits
/// by itself, the directory stays so that its log can be read.
const WATCHDOG: &str = r#"
bin=$1 dir=$2 port=$3
shift 3
exec 3<&0 </dev/null
"$bin" -D "$dir/data" -k "$dir" -p "$port" -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200 "$@" 3<&- &
pg=$!
{ read -r _ <&3; : >"$dir/stop"; kill -INT "$pg"; } &
watch=$!
exec 3<&-
wait "$pg"
status=$?
if [ -e "$dir/stop" ]; then rm -rf "$dir"; else kill "$watch" 2>/dev/null; fi
exit "$status"
"#;

/// A cluster of this process on 127.0.0.1, with trust authentication for the user `postgres`.
pub struct Cluster {
    port: u16,
    psql: PathBuf,
    /// The [`WATCHDOG`] shell; its stdin pipe closes when this process exits, which stops the cluster.
    _watchdog: Child,
}

impl Cluster {
    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a database; returns its URL.
    pub async fn database(&self, test: &str) -> Result<String, String> {
        let name = database_name(test);
        create_database(&self.psql, &self.url("postgres"), &name).await?;
        Ok(self.url(&name))
    }

    fn start() -> Result<Cluster, String> {
        Self::start_with(&[], None)
    }

    /// A cluster of its own with extra `-c` settings (`options`) and, if given, this `pg_hba.conf`;
    /// it stops when dropped (or when the test process ends). Files it must read (certificates)
    /// should be readable by the `postgres` user when the tests run as root.
    pub fn start_with(options: &[String], hba: Option<&str>) -> Result<Cluster, String> {
        let bin = server_bin_dir().ok_or_else(|| format!("PostgreSQL is not installed: {INSTALL}"))?;
        let psql = psql().ok_or_else(|| format!("psql is missing from {}: {INSTALL}", bin.display()))?;
        // PostgreSQL refuses to run as root, so root runs it as the `postgres` user the packages create.
        let owner = crate::is_root().then_some("postgres");
        if let Some(user) = owner {
            let exists = Command::new("id").arg("-u").arg(user).output().is_ok_and(|o| o.status.success());
            if !exists {
                return Err(format!(
                    "PostgreSQL refuses to run as root and there is no `{user}` user to run it as: create one \
                     (useradd --system {user}), or set {SERVER_VAR}"
                ));
            }
        }
        let dir = std::env::temp_dir().join(format!("cordon-pg-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}; set TMPDIR to a writable directory", dir.display()))?;
        let started = Self::start_in(&bin, psql, &dir, owner, options, hba);
        if started.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        started
    }

    fn start_in(
        bin: &Path,
        psql: PathBuf,
        dir: &Path,
        owner: Option<&str>,
        options: &[String],
        hba: Option<&str>,
    ) -> Result<Cluster, String> {
        if let Some(user) = owner {
            let out = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(dir)
                .output()
                .map_err(|e| format!("cannot run chown: {e}; install coreutils"))?;
            if !out.status.success() {
                let why = String::from_utf8_lossy(&out.stderr);
                return Err(format!("cannot give {} to the `{user}` user: {}", dir.display(), why.trim()));
            }
        }
        let run_as = |program: &Path| {
            let mut cmd = match owner {
                Some(user) => {
                    let mut cmd = Command::new("runuser");
                    cmd.args(["-u", user, "--"]).arg(program);
                    cmd
                }
                None => Command::new(program),
            };
            // The owner may not be able to enter the test's working directory (root's home).
            cmd.current_dir(dir).stdin(Stdio::null());
            cmd
        };

        // The C locale keeps initdb independent of whatever LANG the host has (or lacks).
        let out = run_as(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["--auth=trust", "--no-sync", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .output()
            .map_err(|e| format!("cannot run initdb from {}: {e}", bin.display()))?;
        if !out.status.success() {
            return Err(format!("initdb failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
        }
        if let Some(hba) = hba {
            let path = dir.join("data/pg_hba.conf");
            std::fs::write(&path, hba).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }

        // Another process may take the free port before postgres binds it; then try another.
        let log_path = dir.join("postgres.log");
        for _ in 0..5 {
            let port = free_port()?;
            // Not the test's stdout or stderr: a runner waits for those to close, and this outlives the test.
            let log = File::create(&log_path).map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
            let clone = |f: &File| f.try_clone().map_err(|e| format!("cannot share {}: {e}", log_path.display()));
            let mut watchdog = run_as(Path::new("sh"))
                .args(["-c", WATCHDOG, "sh"])
                .arg(bin.join("postgres"))
                .arg(dir)
                .arg(port.to_string())
                .args(options)
                .stdin(Stdio::piped())
                .stdout(clone(&log)?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start postgres from {}: {e}", bin.display()))?;
            match wait_until_ready(&mut watchdog, &psql, port) {
                Ready::Yes => return Ok(Cluster { port, psql, _watchdog: watchdog }),
                Ready::Exited => {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if log.contains("could not bind") {
                        continue;
                    }
                    return Err(format!("postgres exited while starting; its log ends:\n{}", tail(&log)));
                }
                Ready::TimedOut(waited) => {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    // Closing its stdin stops the cluster; waiting lets it finish before the caller cleans up.
                    drop(watchdog.stdin.take());
                    let _ = watchdog.wait();
                    return Err(format!(
                        "postgres did not accept connections within {waited:?}; its log ends:\n{}",
                        tail(&log)
                    ));
                }
            }
        }
        Err("postgres found every port it was given taken; free some loopback ports, or set CORDON_TEST_POSTGRES"
            .into())
    }
}

enum Ready {
    Yes,
    Exited,
    TimedOut(Duration),
}

/// Polls with `psql` until the server answers a query, the watchdog (so postgres) exits, or a minute passes.
fn wait_until_ready(watchdog: &mut Child, psql: &Path, port: u16) -> Ready {
    let limit = Duration::from_secs(60);
    let deadline = Instant::now() + limit;
    loop {
        if watchdog.try_wait().is_ok_and(|status| status.is_some()) {
            return Ready::Exited;
        }
        let answered = Command::new(psql)
            .args(["-X", "-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-c", "SELECT 1"])
            .env("PGCONNECT_TIMEOUT", "2")
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        if answered {
            return Ready::Yes;
        }
        if Instant::now() > deadline {
            return Ready::TimedOut(limit);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_name_is_a_safe_identifier() {
        let name = database_name("pg::Harness-test with a very long name that goes on and on and on");
        assert!(name.len() <= 63, "{name}");
        assert!(name.starts_with("t_pg__harness_test_with_a_very_long_name_"), "{name}");
        assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'), "{name}");
    }

    #[test]
    fn the_database_of_a_url_is_replaced() {
        let cases = [
            ("postgres://postgres@127.0.0.1:5432/postgres", "postgres://postgres@127.0.0.1:5432/t"),
            ("postgres://u:p@h:1", "postgres://u:p@h:1/t"),
            ("postgresql:///postgres?host=/run/postgresql", "postgresql:///t?host=/run/postgresql"),
            (
                "postgres://postgres@/postgres?host=/tmp/x&sslmode=disable",
                "postgres://postgres@/t?host=/tmp/x&sslmode=disable",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(with_database(url, "t").unwrap(), want, "{url}");
        }
        assert!(with_database("host=/tmp dbname=postgres", "t").is_err());
    }
}
