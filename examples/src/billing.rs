//! A billing flow per account: `charge` → `invoice` → `notify`. Each step writes its
//! business rows through `ctx.tx()` and enqueues the next step in the same
//! transaction, so a step's effects and its follow-up exist exactly once.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use warden::{async_trait, Backoff, Handler, HandlerResult, JobContext, JobOptions, NewJob, Outcome};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Purchase {
    pub purchase: i64,
    pub amount_cents: i64,
}

/// Failure rates injected by the demo (0.0 ..= 1.0).
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Transient processor errors on `charge` (retried).
    pub charge_transient: f64,
    /// Permanent declines on `charge` (discarded, no follow-ups).
    pub charge_declined: f64,
    /// Transient errors on `notify` (retried).
    pub notify_transient: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Self { charge_transient: 0.08, charge_declined: 0.005, notify_transient: 0.03 }
    }
}

pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    // Nodes start together: CREATE ... IF NOT EXISTS races in PostgreSQL ("type already
    // exists"), so serialise on an advisory lock held for the transaction.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('warden-examples-billing'))").execute(&mut *tx).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS billing_ledger (
             account text NOT NULL, purchase bigint NOT NULL, amount_cents bigint NOT NULL,
             charged_at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (account, purchase));
         CREATE TABLE IF NOT EXISTS billing_invoices (
             account text NOT NULL, purchase bigint NOT NULL, number bigint NOT NULL,
             PRIMARY KEY (account, purchase));
         CREATE TABLE IF NOT EXISTS billing_notifications (
             account text NOT NULL, purchase bigint NOT NULL, sent_at timestamptz NOT NULL DEFAULT clock_timestamp(),
             PRIMARY KEY (account, purchase));",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

fn options() -> JobOptions {
    JobOptions {
        max_attempts: 8,
        timeout: Duration::from_secs(10),
        backoff: Backoff { base: Duration::from_millis(50), max: Duration::from_secs(2), jitter: 0.3 },
        ..Default::default()
    }
}

pub struct Charge(pub Faults);

#[async_trait]
impl Handler for Charge {
    type Args = Purchase;
    const KIND: &'static str = "charge";

    fn options(&self) -> JobOptions {
        options()
    }

    async fn run(&self, ctx: &mut JobContext, p: Purchase) -> HandlerResult {
        // Pretend to call the card processor.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(1..4))).await;
        let roll = fastrand::f64();
        if roll < self.0.charge_declined {
            return Ok(Outcome::Discard(format!("card declined for purchase {}", p.purchase)));
        }
        if roll < self.0.charge_declined + self.0.charge_transient {
            return Err("card processor timed out".into());
        }
        let account = ctx.account().to_string();
        sqlx::query("INSERT INTO billing_ledger (account, purchase, amount_cents) VALUES ($1, $2, $3)")
            .bind(&account)
            .bind(p.purchase)
            .bind(p.amount_cents)
            .execute(ctx.tx().await?)
            .await?;
        ctx.enqueue(NewJob::new(account, Invoice::KIND, &p)?).await?;
        Ok(Outcome::Done)
    }
}

pub struct Invoice;

#[async_trait]
impl Handler for Invoice {
    type Args = Purchase;
    const KIND: &'static str = "invoice";

    fn options(&self) -> JobOptions {
        options()
    }

    async fn run(&self, ctx: &mut JobContext, p: Purchase) -> HandlerResult {
        let account = ctx.account().to_string();
        // Invoice numbers are per account and gapless: only correct if this account's
        // invoices are created one at a time, in order.
        sqlx::query(
            "INSERT INTO billing_invoices (account, purchase, number)
             SELECT $1, $2, COALESCE(max(number), 0) + 1 FROM billing_invoices WHERE account = $1",
        )
        .bind(&account)
        .bind(p.purchase)
        .execute(ctx.tx().await?)
        .await?;
        ctx.enqueue(NewJob::new(account, Notify::KIND, &p)?).await?;
        Ok(Outcome::Done)
    }
}

pub struct Notify(pub Faults);

#[async_trait]
impl Handler for Notify {
    type Args = Purchase;
    const KIND: &'static str = "notify";

    fn options(&self) -> JobOptions {
        options()
    }

    async fn run(&self, ctx: &mut JobContext, p: Purchase) -> HandlerResult {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..2))).await;
        if fastrand::f64() < self.0.notify_transient {
            return Ok(Outcome::Retry { after: Some(Duration::from_millis(100)) });
        }
        let account = ctx.account().to_string();
        sqlx::query("INSERT INTO billing_notifications (account, purchase) VALUES ($1, $2)")
            .bind(&account)
            .bind(p.purchase)
            .execute(ctx.tx().await?)
            .await?;
        Ok(Outcome::Done)
    }
}
