//! `warden`: command-line client for a Warden cluster's gRPC API (see `warden --help`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    warden_examples::cli::main().await
}
