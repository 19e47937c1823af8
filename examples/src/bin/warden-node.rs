//! A production node running the billing example's handlers: every flag of
//! `warden::HostFlags` (each also an env var), admin HTTP, gRPC, SIGTERM → drain.
use clap::Parser;
use warden_examples::billing::{self, Faults};

#[derive(Parser)]
#[command(name = "warden-node", version, about = "A Warden node with the billing handlers")]
struct Args {
    #[command(flatten)]
    warden: warden::HostFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    warden::init_tracing();
    warden::Host::from_flags(&Args::parse().warden)?
        .setup(|pool| async move { billing::migrate(&pool).await })
        .register(billing::Charge(Faults::default()))?
        .register(billing::Invoice)?
        .register(billing::Notify(Faults::default()))?
        .run(warden::shutdown_signal())
        .await
}
