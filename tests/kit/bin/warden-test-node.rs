//! The node the process tests, the soak and the cluster benchmark start: the
//! production host (`warden::Host`, every flag of `warden::HostFlags`) with the
//! billing example's handlers, its long import (a heartbeating job), the audit
//! workload, the checked long job (`tests/kit/long_job.rs`) and the periodic
//! `tick` (`tests/kit/periodic.rs`). Prints `READY <owner>`
//! on stdout once the node has started (the kit's `NodeProc` waits for it).
use clap::Parser;
use warden_examples::billing::{self, Faults};
use warden_examples::long_import::{self, LongImport};
use warden_tests::long_job::{self, LongJob};
use warden_tests::workload::{self, Audit};

#[derive(Parser)]
#[command(name = "warden-test-node", about = "A Warden node with the billing, audit and long-job handlers")]
struct Args {
    #[command(flatten)]
    warden: warden::HostFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    warden::init_tracing();
    let flags = Args::parse().warden;
    // The audit handler's "external" effect log has its own small pool, as an external
    // system would: it must not compete with the executor's connections.
    let effects = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_lazy(&flags.database_url)?;
    let host = warden::Host::from_flags(&flags)?
        .setup(|pool| async move {
            billing::migrate(&pool).await?;
            long_import::migrate(&pool).await?;
            workload::migrate(&pool).await?;
            long_job::migrate(&pool).await?;
            warden_tests::periodic::migrate(&pool).await
        })
        .register(billing::Charge(Faults::default()))?
        .register(billing::Invoice)?
        .register(billing::Notify(Faults::default()))?
        .register(LongImport { pool: effects.clone() })?
        .register(Audit { node: flags.node_id.clone(), pool: effects.clone() })?
        .register(LongJob { node: flags.node_id.clone(), pool: effects })?
        .register(warden_tests::periodic::Tick { node: flags.node_id.clone() })?
        .start()
        .await?;
    println!("READY {}", host.node().owner());
    host.run_until(warden::shutdown_signal()).await
}
