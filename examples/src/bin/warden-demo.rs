//! The Warden demo: a node running a billing flow (charge → invoice → notify) for
//! hundreds of accounts, with injected failures, ending with a summary computed
//! from the attempts table. Run it with the README's command.

use anyhow::Context;
use clap::Parser;
use std::time::{Duration, Instant};
use warden::{history, NewJob, Node, NodeConfig};
use warden_examples::billing::{self, Purchase};

#[derive(Debug, Parser)]
#[command(name = "warden-demo", about = "Run a Warden node through a billing workload and check the guarantee")]
struct Args {
    /// PostgreSQL URL (the README command starts a throwaway server if unset).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Number of tenant accounts.
    #[arg(long, default_value_t = 300)]
    accounts: usize,
    /// Purchases per account (each becomes charge → invoice → notify).
    #[arg(long, default_value_t = 10)]
    purchases: usize,
    /// Give up if the work is not done after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::env::set_var("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
    warden::init_tracing();
    if args.accounts == 0 || args.purchases == 0 {
        anyhow::bail!("--accounts and --purchases must be at least 1");
    }

    let pool =
        warden::store::connect(&args.database_url, &Default::default()).await.context("connecting to the database")?;
    billing::migrate(&pool).await?;
    let faults = billing::Faults::default();
    let node = Node::builder(NodeConfig { node_id: "demo-node".into(), ..Default::default() })
        .register(billing::Charge(faults))?
        .register(billing::Invoice)?
        .register(billing::Notify(faults))?
        .start(pool.clone())
        .await?;
    // Only this run's jobs count (the database may hold earlier runs).
    let first_id: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM warden.jobs").fetch_one(&pool).await?;
    let run_accounts: Vec<String> =
        (0..args.accounts).map(|a| format!("tenant-{a:04}-{}", std::process::id())).collect();

    println!(
        "warden demo: node {} holds {} partitions; enqueueing {} purchases for {} accounts",
        node.owner(),
        node.stats().partitions_held,
        args.accounts * args.purchases,
        args.accounts
    );
    let started = Instant::now();
    // Purchases arrive interleaved across accounts, in batches, as a busy product would send them.
    let mut batch = Vec::new();
    for p in 0..args.purchases {
        for account in &run_accounts {
            let purchase = Purchase { purchase: p as i64, amount_cents: 100 + fastrand::i64(0..10_000) };
            batch.push(NewJob::new(account.clone(), <billing::Charge as warden::Handler>::KIND, &purchase)?);
            if batch.len() == 1000 {
                node.client().enqueue_many(&batch).await?;
                batch.clear();
            }
        }
    }
    node.client().enqueue_many(&batch).await?;

    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut last = (Instant::now(), 0i64);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (done, unfinished, retried, discarded): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'completed'),
                    count(*) FILTER (WHERE state IN ('scheduled', 'available', 'retryable', 'running')),
                    (SELECT count(*) FROM warden.attempts WHERE job_id > $1 AND outcome IN ('failed', 'retry', 'timeout')),
                    count(*) FILTER (WHERE state = 'discarded')
             FROM warden.jobs WHERE id > $1",
        )
        .bind(first_id)
        .fetch_one(&pool)
        .await?;
        let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), done);
        println!(
            "[{:>5.1}s] completed {done:>6}  in flight/queued {unfinished:>6}  retried attempts {retried:>4}  discarded {discarded:>3}  {rate:>7.0} jobs/s  actors {}",
            started.elapsed().as_secs_f64(),
            node.stats().active_actors
        );
        if unfinished == 0 {
            break;
        }
        if Instant::now() > deadline {
            node.shutdown().await?;
            anyhow::bail!("work not finished after {}s", args.timeout_secs);
        }
    }
    let elapsed = started.elapsed();
    node.shutdown().await?;

    // Summary from the attempts table (the audit trail) and the billing tables.
    let h = history::check(&pool).await?;
    let per_kind: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT kind, count(*) FILTER (WHERE state = 'completed'), count(*) FILTER (WHERE state = 'discarded'),
                COALESCE(sum(attempt - 1) FILTER (WHERE state = 'completed'), 0)::bigint
         FROM warden.jobs WHERE id > $1 GROUP BY kind ORDER BY kind",
    )
    .bind(first_id)
    .fetch_all(&pool)
    .await?;
    let (ledger, invoices, notes, gaps): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM billing_ledger WHERE account = ANY($1)),
                (SELECT count(*) FROM billing_invoices WHERE account = ANY($1)),
                (SELECT count(*) FROM billing_notifications WHERE account = ANY($1)),
                (SELECT count(*) FROM (SELECT account, max(number) <> count(*) AS gap FROM billing_invoices
                                        WHERE account = ANY($1) GROUP BY account) g WHERE gap)",
    )
    .bind(&run_accounts)
    .fetch_one(&pool)
    .await?;
    let total: i64 = per_kind.iter().map(|k| k.1 + k.2).sum();
    println!();
    println!("== summary ({:.1}s, {:.0} jobs/s) ==", elapsed.as_secs_f64(), total as f64 / elapsed.as_secs_f64());
    println!("{:<10} {:>10} {:>10} {:>22}", "kind", "completed", "discarded", "completed after retry");
    for (kind, c, d, r) in &per_kind {
        println!("{kind:<10} {c:>10} {d:>10} {r:>22}");
    }
    println!(
        "attempts recorded (all runs in this database): {} ({} retried, {} rescued)",
        h.attempts, h.retried_attempts, h.rescued_attempts
    );
    println!(
        "ledger rows {ledger}, invoices {invoices} (accounts with invoice-number gaps: {gaps}), notifications {notes}"
    );
    println!("per-account overlapping attempts: {}", h.overlaps);
    println!("per-account order violations:     {}", h.order_violations);
    println!("completed jobs that ran again:    {}", h.reruns_after_completion + h.double_completions);
    let charges_done = per_kind.iter().find(|k| k.0 == "charge").map(|k| k.1).unwrap_or(0);
    let consistent = ledger == charges_done && invoices == charges_done && gaps == 0;
    if !h.is_clean() || !consistent {
        anyhow::bail!("the serial guarantee or the billing books are violated (see above)");
    }
    println!("OK: every charged purchase has exactly one ledger row, one invoice and gapless invoice numbers");
    Ok(())
}
