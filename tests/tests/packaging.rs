//! The service units (`server/dist/*.service`, `agentd/dist/*.service`) and the container image's
//! entrypoint: systemd accepts the units as written, and every flag and variable they hand the binaries
//! is one the binaries know, so neither can drift from the other.

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const CONTAINERFILE: &str = "server/dist/Containerfile";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Binary {
    Cordon,
    Agentd,
}

impl Binary {
    /// Where the units install it.
    fn installed(self) -> &'static str {
        match self {
            Binary::Cordon => "/usr/local/bin/cordon",
            Binary::Agentd => "/usr/local/bin/agentd",
        }
    }

    fn built(self) -> PathBuf {
        match self {
            Binary::Cordon => cordon_tests::cordon_bin(),
            Binary::Agentd => cordon_tests::agentd_bin(),
        }
    }

    /// The help of the command the units run (`agentd up` shows the global flags too).
    fn help(self) -> String {
        let args: &[&str] = match self {
            Binary::Cordon => &["serve", "--help"],
            Binary::Agentd => &["up", "--help"],
        };
        let out = Command::new(self.built()).args(args).output().expect("run the binary for its help");
        assert!(out.status.success(), "{self:?} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("help is UTF-8")
    }
}

const UNITS: [(&str, Binary); 3] = [
    ("server/dist/cordon.service", Binary::Cordon),
    ("agentd/dist/agentd.service", Binary::Agentd),
    ("agentd/dist/agentd-tun.service", Binary::Agentd),
];

/// Variables the units set that stand for no flag: the log filter, plain text logs, and the unit's own
/// placeholder that ExecStart expands.
const NOT_FLAG_VARIABLES: [&str; 3] = ["CORDON_LOG", "NO_COLOR", "AGENTD_FLAGS"];

fn read(relative: &str) -> String {
    let path = Path::new(ROOT).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The lines systemd (or the container runtime) reads: not comments.
fn directives(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// `--flag` words of a line (`--flag=value` counts as `--flag`), in shell or JSON-array form.
fn flags(line: &str) -> Vec<&str> {
    line.split(|c: char| c.is_whitespace() || matches!(c, '"' | ',' | '[' | ']'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split('=').next().expect("split yields one part"))
        .collect()
}

fn help_has_flag(help: &str, flag: &str) -> bool {
    help.split(|c: char| c.is_whitespace() || c == ',').any(|w| w == flag)
}

fn help_has_variable(help: &str, name: &str) -> bool {
    help.contains(&format!("env: {name}=")) || help.contains(&format!("env: {name}]"))
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if let Err(e) = Command::new("systemd-analyze").arg("--version").output() {
        let reason = format!("systemd-analyze is not available ({e}); apt-get install systemd");
        return cordon_tests::skip("units_pass_systemd_analyze_verify", &reason);
    }
    // The units name /usr/local/bin; verify checks that ExecStart is executable, so point them at the
    // binaries this test run built.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut copies = Vec::new();
    for (unit, binary) in UNITS {
        let built = binary.built();
        let text = read(unit).replace(binary.installed(), built.to_str().expect("a UTF-8 binary path"));
        let copy = dir.path().join(Path::new(unit).file_name().expect("a file name"));
        std::fs::write(&copy, text).expect("write the unit");
        copies.push(copy);
    }
    let out = Command::new("systemd-analyze").arg("verify").args(&copies).output().expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stderr}");
    let names = UNITS.map(|(unit, _)| unit.rsplit('/').next().expect("a name"));
    let about_ours: Vec<&str> = stderr.lines().filter(|l| names.iter().any(|n| l.contains(*n))).collect();
    assert!(about_ours.is_empty(), "systemd-analyze verify warns about the units:\n{stderr}");
}

#[test]
fn units_and_image_use_only_flags_the_binaries_have() {
    let cordon_help = Binary::Cordon.help();
    let agentd_help = Binary::Agentd.help();
    let help_of = |binary: Binary| match binary {
        Binary::Cordon => cordon_help.as_str(),
        Binary::Agentd => agentd_help.as_str(),
    };

    let mut used = Vec::new();
    for (unit, binary) in UNITS {
        let text = read(unit);
        let exec: Vec<&str> = directives(&text).filter(|l| l.starts_with("ExecStart=")).collect();
        assert_eq!(exec.len(), 1, "{unit} has one ExecStart");
        assert!(exec[0].starts_with(&format!("ExecStart={} ", binary.installed())), "{unit}: {}", exec[0]);
        for line in directives(&text) {
            for flag in flags(line) {
                assert!(help_has_flag(help_of(binary), flag), "{unit} uses {flag}, which {binary:?} does not have");
                used.push(flag.to_string());
            }
            // Environment=NAME=value: a variable the binary reads in place of a flag.
            if let Some((name, _)) = line.strip_prefix("Environment=").and_then(|a| a.split_once('='))
                && !NOT_FLAG_VARIABLES.contains(&name)
            {
                assert!(help_has_variable(help_of(binary), name), "{unit} sets {name}, which {binary:?} does not read");
            }
        }
    }
    let containerfile = read(CONTAINERFILE);
    let entrypoint: Vec<&str> = directives(&containerfile).filter(|l| l.starts_with("ENTRYPOINT")).collect();
    assert_eq!(entrypoint.len(), 1, "the Containerfile has one ENTRYPOINT");
    for flag in flags(entrypoint[0]) {
        assert!(help_has_flag(&cordon_help, flag), "the image's entrypoint uses {flag}, which cordon does not have");
        used.push(flag.to_string());
    }
    // The check saw the flags it is about (a parsing slip would pass vacuously otherwise).
    for flag in ["--data-dir", "--listen", "--state-dir", "--tun"] {
        assert!(used.iter().any(|f| f == flag), "{flag} not found among the flags used: {used:?}");
    }
}
