//! The `warden` CLI, built inside the test package so tests can run the binary.
#[tokio::main]
async fn main() -> std::process::ExitCode {
    warden_examples::cli::main().await
}
