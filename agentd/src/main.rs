//! The `agentd` daemon. Until the data-plane issue lands it only says so.

fn main() {
    eprintln!("agentd: the data plane is not built yet; see the README");
    std::process::exit(2);
}
