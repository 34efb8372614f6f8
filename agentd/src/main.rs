//! `agentd`: join a Cordon tailnet. See `agentd --help`; exit codes are documented in `agentd::cli`.

fn main() -> std::process::ExitCode {
    agentd::cli::main()
}
