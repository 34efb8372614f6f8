//! `cordon`: the server (`cordon serve`) and a command line over its admin API.

fn main() -> std::process::ExitCode {
    cordon_server::cli::main()
}
