//! The node the process tests start: the same as `warden-node`.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    warden_examples::node_main::run(warden_examples::node_main::NodeArgs::parse()).await
}
