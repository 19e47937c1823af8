//! The autoscaling and rollout harness (`warden-deploy-bench`, and its smoke run in
//! `tests/rollout.rs`): real `warden-test-node` processes and PostgreSQL.
//!
//! - [`rollout`] — N nodes under a steady load are replaced one at a time, with one
//!   surge node, each by a node of a new generation (optionally a new *version*,
//!   published in gossip): start the new node, wait for its `/readyz` (active and
//!   holding what the ring assigns it), SIGTERM an old one, wait for it to exit.
//! - [`autoscale`] — a load ramp with a controller loop that behaves like the
//!   Kubernetes HPA (target utilisation on the nodes' `warden_saturation` read from
//!   `/metrics`, tolerance, stabilisation windows, step limits), scaling between
//!   `min` and `max` nodes; scale-in removes the cheapest node (the fewest busy slots,
//!   what `pod-deletion-cost` would express) with SIGTERM.
//!
//! Both check the guarantee at the end (history checker over the attempts table and
//! the audit handler's own log: lost, re-run, overlapping, order) and measure per
//! partition the largest wait of a job beyond its in-flight predecessor (handler
//! start − max(enqueue, previous job's handler end), database clock) and how many
//! times each partition moved (lease epochs: every grant is a new epoch).

use crate::workload::AuditArgs;
use crate::{free_tcp_port, http_get, NodeProc};
use anyhow::bail;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use warden_runtime::{Client, NewJob};

type Ts = chrono::DateTime<chrono::Utc>;

/// The value of an unlabelled metric in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// A node process of the harness's cluster.
pub struct Member {
    pub proc: NodeProc,
    pub gossip: u16,
    pub admin: u16,
    pub version: Option<String>,
}

/// A node's figures scraped from `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scrape {
    pub saturation: f64,
    pub busy: f64,
    pub slots: f64,
    pub cpu: f64,
    pub runnable: f64,
}

/// A cluster of node processes on 127.0.0.1.
pub struct Cluster {
    pub url: String,
    pub pool: sqlx::PgPool,
    bin: String,
    partitions: u32,
    extra: Vec<String>,
    pub members: Vec<Member>,
    next_id: usize,
}

impl Cluster {
    pub fn new(url: String, pool: sqlx::PgPool, bin: &str, partitions: u32, extra: &[&str]) -> Self {
        Self {
            url,
            pool,
            bin: bin.to_string(),
            partitions,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            members: Vec::new(),
            next_id: 1,
        }
    }

    /// Start a node (`version`: `--node-version`) and wait until `/readyz` is 200.
    /// Its seeds are every current member (a headless Service's addresses).
    pub async fn add(&mut self, version: Option<&str>) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let (gossip, admin) = (crate::free_udp_port(), free_tcp_port());
        let id = format!("n{}", self.next_id);
        self.next_id += 1;
        let seeds: Vec<String> = if self.members.is_empty() {
            vec![format!("127.0.0.1:{gossip}")]
        } else {
            self.members.iter().map(|m| format!("127.0.0.1:{}", m.gossip)).collect()
        };
        let mut args: Vec<String> = vec![
            "--partitions".into(),
            self.partitions.to_string(),
            "--gossip-listen".into(),
            format!("127.0.0.1:{gossip}"),
            "--seeds".into(),
            seeds.join(","),
            "--admin-addr".into(),
            format!("127.0.0.1:{admin}"),
        ];
        if let Some(v) = version {
            args.extend(["--node-version".into(), v.into()]);
        }
        args.extend(self.extra.iter().cloned());
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let proc = NodeProc::spawn(&self.bin, &self.url, &id, &refs).await?;
        self.members.push(Member { proc, gossip, admin, version: version.map(str::to_string) });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_get(admin, "/readyz").await {
                // Ready means holding its share (every node here has one: P ≫ nodes),
                // checked from outside in the lease table, not taken on its word.
                let held = crate::owners(&self.pool).await.values().filter(|o| **o == id).count();
                if held == 0 {
                    bail!("node {id} said ready holding no partition");
                }
                return Ok(t.elapsed());
            }
            if Instant::now() > deadline {
                let why = http_get(admin, "/readyz").await.map(|(_, b)| b).unwrap_or_default();
                bail!("node {id} not ready in 60 s: {why}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM member `idx` and wait for it to exit: (exit code, SIGTERM → exit).
    pub async fn remove(&mut self, idx: usize, grace: Duration) -> anyhow::Result<(Option<i32>, Duration)> {
        let mut m = self.members.remove(idx);
        let t = Instant::now();
        m.proc.signal(libc::SIGTERM);
        let status = m.proc.wait_exit(grace).await;
        let took = t.elapsed();
        match status {
            Some(s) => Ok((s.code(), took)),
            None => {
                m.proc.signal(libc::SIGKILL);
                bail!("node {} did not exit within the grace period {grace:?} after SIGTERM", m.proc.node_id)
            }
        }
    }

    pub async fn scrape(&self, idx: usize) -> anyhow::Result<Scrape> {
        let (_, text) = http_get(self.members[idx].admin, "/metrics").await?;
        Ok(Scrape {
            saturation: metric(&text, "warden_saturation").unwrap_or(0.0),
            busy: metric(&text, "warden_execution_slots_busy").unwrap_or(0.0),
            slots: metric(&text, "warden_execution_slots").unwrap_or(0.0),
            cpu: metric(&text, "warden_process_cpu_ratio").unwrap_or(0.0),
            runnable: metric(&text, "warden_runnable_accounts").unwrap_or(0.0),
        })
    }

    /// Wait until every partition has an unexpired lease held by one of the current
    /// members, unchanged for 1 s.
    pub async fn wait_stable(&self) -> anyhow::Result<()> {
        let ids: std::collections::BTreeSet<String> = self.members.iter().map(|m| m.proc.node_id.clone()).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut last, mut since) = (BTreeMap::new(), Instant::now());
        loop {
            let o = crate::owners(&self.pool).await;
            let complete = o.len() == self.partitions as usize && o.values().all(|n| ids.contains(n));
            if o != last || !complete {
                last = o;
                since = Instant::now();
            } else if since.elapsed() > Duration::from_secs(1) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("ownership did not settle on {:?}", ids);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A steady producer: `rate` jobs/s (changeable while it runs) round-robin over
/// `accounts`, each an audit job of `sleep_ms` with per-account sequence numbers.
pub struct Load {
    /// Jobs per second × 1000.
    rate_milli: Arc<AtomicU64>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<u64>>,
}

impl Load {
    pub fn start(client: Client, accounts: usize, sleep_ms: u64, rate: f64) -> Load {
        let rate_milli = Arc::new(AtomicU64::new((rate * 1000.0) as u64));
        let stop = CancellationToken::new();
        let (r, s) = (rate_milli.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut seqs = vec![0i64; accounts];
            let (mut next, mut owed, mut sent) = (0usize, 0.0f64, 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = Instant::now();
            while !s.is_cancelled() {
                tick.tick().await;
                let now = Instant::now();
                owed += r.load(Ordering::Relaxed) as f64 / 1000.0 * now.duration_since(last).as_secs_f64();
                last = now;
                let n = owed.floor() as usize;
                if n == 0 {
                    continue;
                }
                owed -= n as f64;
                let mut batch = Vec::with_capacity(n);
                for _ in 0..n {
                    let a = next % accounts;
                    next += 1;
                    let args = AuditArgs { seq: seqs[a], sleep_ms, fail_times: 0, finish_on_stop: true };
                    batch.push(NewJob::new(format!("acct-{a}"), "audit", args)?);
                    seqs[a] += 1;
                }
                client.enqueue_many(&batch).await?;
                sent += n as u64;
            }
            Ok(sent)
        });
        Load { rate_milli, stop, task }
    }

    pub fn set_rate(&self, rate: f64) {
        self.rate_milli.store((rate * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Stop producing; the number of jobs enqueued.
    pub async fn stop(self) -> anyhow::Result<u64> {
        self.stop.cancel();
        self.task.await?
    }
}

pub async fn db_now(pool: &sqlx::PgPool) -> anyhow::Result<Ts> {
    Ok(sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(pool).await?)
}

/// Every partition's lease epoch.
pub async fn epochs(pool: &sqlx::PgPool) -> anyhow::Result<BTreeMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as("SELECT partition, epoch FROM warden.leases").fetch_all(pool).await?;
    Ok(rows.into_iter().collect())
}

/// Every lease grant seen while it runs, per partition: (epoch, owner, ms since the
/// start), polled every 20 ms (a grant and a re-grant within one poll show as one;
/// the epochs say how many there were). Stop it with the returned token.
pub fn track_grants(
    pool: sqlx::PgPool,
) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<BTreeMap<i32, Vec<(i64, String, u64)>>>) {
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let t0 = Instant::now();
        let mut seen: BTreeMap<i32, Vec<(i64, String, u64)>> = BTreeMap::new();
        while !s.is_cancelled() {
            let rows: Vec<(i32, i64, Option<String>)> =
                sqlx::query_as("SELECT partition, epoch, owner_node FROM warden.leases")
                    .fetch_all(&pool)
                    .await
                    .unwrap_or_default();
            for (p, e, o) in rows {
                let v = seen.entry(p).or_default();
                if v.last().map(|(le, _, _)| *le) != Some(e) {
                    v.push((e, o.unwrap_or_default(), t0.elapsed().as_millis() as u64));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    });
    (stop, task)
}

/// Per partition, the largest wait beyond the in-flight predecessor (ms) of jobs
/// enqueued in [from, to] (first attempts' audit rows).
pub async fn pauses(pool: &sqlx::PgPool, from: Ts, to: Ts) -> anyhow::Result<Vec<(i32, f64)>> {
    Ok(sqlx::query_as::<_, (i32, f64)>(
        "WITH a AS (
            SELECT j.partition, j.created_at, w.started_at,
                   lag(w.ended_at) OVER (PARTITION BY w.account ORDER BY w.seq) AS prev_end
            FROM workload_audit w JOIN warden.jobs j ON j.id = w.job_id)
         SELECT partition,
                max(EXTRACT(EPOCH FROM started_at - greatest(created_at, coalesce(prev_end, created_at))) * 1000)::float8
         FROM a WHERE created_at BETWEEN $1 AND $2 GROUP BY partition",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?)
}

/// Wait until no job is unfinished (up to `timeout`).
pub async fn wait_drained(pool: &sqlx::PgPool, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while crate::count_unfinished(pool).await > 0 {
        if Instant::now() > deadline {
            bail!("{} jobs still unfinished after {timeout:?}", crate::count_unfinished(pool).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The guarantee's figures at the end of a run.
#[derive(Debug, Clone, Default)]
pub struct Guarantee {
    pub enqueued: u64,
    pub completed: i64,
    /// Jobs enqueued but not completed (after the drain).
    pub lost: i64,
    /// Completed jobs that ran again (history: double completions + reruns after
    /// completion; audit: duplicate committed rows).
    pub reran: i64,
    /// Overlapping attempts (history) + overlapping committed runs (audit) +
    /// overlapping handler runs seen from outside.
    pub overlaps: i64,
    pub order_violations: i64,
    /// Attempts that did not complete (interrupted by a handoff, aborted at the drain
    /// timeout, failed) and handler runs that never ended: in-flight work a scale-in
    /// or handoff killed. The jobs here finish well within the drain, so 0 expected.
    pub killed_in_flight: i64,
}

impl Guarantee {
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.reran == 0 && self.overlaps == 0 && self.order_violations == 0
    }
}

pub async fn guarantee(pool: &sqlx::PgPool, enqueued: u64) -> anyhow::Result<Guarantee> {
    let h = warden_runtime::history::check(pool).await?;
    let a = crate::workload::check(pool).await?;
    let not_completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM warden.attempts WHERE outcome <> 'completed'").fetch_one(pool).await?;
    Ok(Guarantee {
        enqueued,
        completed: h.completed,
        lost: enqueued as i64 - h.completed,
        reran: h.double_completions + h.reruns_after_completion + a.duplicate_jobs,
        overlaps: h.overlaps + a.overlaps + a.run_overlaps,
        order_violations: h.order_violations + a.order_violations,
        killed_in_flight: not_completed + a.runs_without_end,
    })
}

/// `q`-quantile (nearest rank) of `v`; NaN when empty.
pub fn pct(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Rolling-restart settings.
#[derive(Debug, Clone)]
pub struct RolloutOpts {
    pub nodes: usize,
    pub partitions: u32,
    pub accounts: usize,
    /// Jobs per second during the rollout.
    pub rate: f64,
    pub sleep_ms: u64,
    /// New nodes publish a new version (`--node-version v2`; old ones `v1`).
    pub versioned: bool,
    /// Kubernetes' `terminationGracePeriodSeconds`: SIGTERM → exit must fit.
    pub grace: Duration,
    pub extra_args: Vec<String>,
}

impl RolloutOpts {
    /// The benchmark's rolling restart (5 nodes, 150 jobs/s over 300 accounts) or,
    /// with `smoke`, the CI test's (3 nodes, 50 jobs/s over 100 accounts); 5 ms jobs,
    /// a 30 s grace period.
    pub fn new(smoke: bool, partitions: u32, versioned: bool) -> Self {
        RolloutOpts {
            nodes: if smoke { 3 } else { 5 },
            partitions,
            accounts: if smoke { 100 } else { 300 },
            rate: if smoke { 50.0 } else { 150.0 },
            sleep_ms: 5,
            versioned,
            grace: Duration::from_secs(30),
            extra_args: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RolloutReport {
    /// Per partition with jobs in the window: the largest wait beyond its in-flight
    /// job during the rollout (ms).
    pub pauses_ms: Vec<f64>,
    /// The same over the 3 s before the rollout.
    pub baseline_ms: Vec<f64>,
    /// Per partition: lease grants during the rollout (moves).
    pub moves: Vec<i64>,
    /// Per partition: the grants seen during the rollout (see [`track_grants`]).
    pub grants: BTreeMap<i32, Vec<(i64, String, u64)>>,
    /// The rollout's steps, ms since it began (the grants' clock): `+nK` started,
    /// `nK ready`, `-nK` SIGTERMed, `nK exited`.
    pub events: Vec<(String, u64)>,
    /// Per replaced node: SIGTERM → exit, and the exit codes.
    pub stop_times: Vec<Duration>,
    pub exit_codes: Vec<Option<i32>>,
    /// Per new node: start → ready.
    pub ready_times: Vec<Duration>,
    pub took: Duration,
    pub guarantee: Guarantee,
}

/// Replace every node of an N-node cluster under load, one at a time with one surge
/// node (see the module docs).
pub async fn rollout(url: &str, pool: &sqlx::PgPool, bin: &str, o: &RolloutOpts) -> anyhow::Result<RolloutReport> {
    let extra: Vec<&str> = o.extra_args.iter().map(|s| s.as_str()).collect();
    let mut c = Cluster::new(url.to_string(), pool.clone(), bin, o.partitions, &extra);
    let (old_v, new_v) = if o.versioned { (Some("v1"), Some("v2")) } else { (None, None) };
    for _ in 0..o.nodes {
        c.add(old_v).await?;
    }
    c.wait_stable().await?;
    let client = Client::connect(pool.clone()).await?;
    let load = Load::start(client, o.accounts, o.sleep_ms, o.rate);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let t0 = db_now(pool).await?;
    let e0 = epochs(pool).await?;
    let started = Instant::now();
    let (tracking, tracker) = track_grants(pool.clone());
    let mut r = RolloutReport::default();
    let ms = |t: Instant| t.duration_since(started).as_millis() as u64;
    for _ in 0..o.nodes {
        let t = Instant::now();
        let id = format!("n{}", c.next_id);
        r.ready_times.push(c.add(new_v).await?);
        r.events.push((format!("+{id}"), ms(t)));
        r.events.push((format!("{id} ready"), ms(Instant::now())));
        // The oldest remaining member of the old generation.
        let gone = c.members[0].proc.node_id.clone();
        r.events.push((format!("-{gone}"), ms(Instant::now())));
        let (code, took) = c.remove(0, o.grace).await?;
        r.events.push((format!("{gone} exited"), ms(Instant::now())));
        r.exit_codes.push(code);
        r.stop_times.push(took);
    }
    c.wait_stable().await?;
    r.took = started.elapsed();
    let t1 = db_now(pool).await?;
    let e1 = epochs(pool).await?;
    tracking.cancel();
    r.grants = tracker.await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let enqueued = load.stop().await?;
    wait_drained(pool, Duration::from_secs(120)).await?;
    r.pauses_ms = pauses(pool, t0, t1).await?.into_iter().map(|(_, w)| w).collect();
    r.baseline_ms = pauses(pool, t0 - chrono::Duration::seconds(3), t0).await?.into_iter().map(|(_, w)| w).collect();
    r.moves = e1.iter().map(|(p, e)| e - e0.get(p).copied().unwrap_or(0)).collect();
    r.guarantee = guarantee(pool, enqueued).await?;
    Ok(r)
}

/// The HPA-like controller's settings (Kubernetes' names).
#[derive(Debug, Clone)]
pub struct Hpa {
    pub min: usize,
    pub max: usize,
    /// Target mean `warden_saturation`.
    pub target: f64,
    /// No change while |ratio − 1| ≤ tolerance (Kubernetes: 0.1).
    pub tolerance: f64,
    /// How often the controller runs (Kubernetes: 15 s).
    pub period: Duration,
    /// Scale up to the *lowest* recommendation of this window.
    pub up_window: Duration,
    /// Scale down to the *highest* recommendation of this window (Kubernetes: 300 s).
    pub down_window: Duration,
    /// Nodes added / removed per period at most.
    pub max_up_step: usize,
    pub max_down_step: usize,
}

/// The HPA's recommendation: `ceil(current × metric / target)`, unchanged within the
/// tolerance.
pub fn hpa_desired(current: usize, metric: f64, h: &Hpa) -> usize {
    let ratio = metric / h.target;
    if (ratio - 1.0).abs() <= h.tolerance {
        return current;
    }
    ((current as f64 * ratio).ceil() as usize).clamp(h.min, h.max)
}

/// The stabilised target from the recommendations (time, value) seen so far.
pub fn hpa_stabilised(now: Instant, current: usize, recs: &[(Instant, usize)], h: &Hpa) -> usize {
    let within = |w: Duration| recs.iter().filter(move |(t, _)| now.duration_since(*t) <= w).map(|(_, r)| *r);
    let up = within(h.up_window).min().unwrap_or(current);
    let down = within(h.down_window).max().unwrap_or(current);
    let target = if up > current {
        up.min(current + h.max_up_step)
    } else if down < current {
        down.max(current.saturating_sub(h.max_down_step))
    } else {
        current
    };
    target.clamp(h.min, h.max)
}

/// Load ramp settings: (duration, jobs/s at its start, jobs/s at its end) per phase.
#[derive(Debug, Clone)]
pub struct AutoscaleOpts {
    pub partitions: u32,
    pub accounts: usize,
    pub sleep_ms: u64,
    pub slots: usize,
    pub phases: Vec<(Duration, f64, f64)>,
    pub hpa: Hpa,
    pub grace: Duration,
}

impl AutoscaleOpts {
    /// The benchmark's ramp (3 → 10 → 3 nodes of 4 slots, 15 → 160 → 15 jobs/s over
    /// 300 accounts, Kubernetes' HPA in compressed time: every 3 s, 30 s down window)
    /// or, with `smoke`, the CI test's (2 → 4 → 2 nodes of 2 slots, 4 → 40 → 4 jobs/s
    /// over 100 accounts, every 2 s, 10 s down window); 200 ms jobs, target 0.6.
    pub fn new(smoke: bool, partitions: u32) -> Self {
        let s = Duration::from_secs;
        let (slots, accounts, low, high) = if smoke { (2, 100, 4.0, 40.0) } else { (4, 300, 15.0, 160.0) };
        let phases = if smoke {
            vec![(s(6), low, low), (s(6), low, high), (s(16), high, high), (s(6), high, low), (s(30), low, low)]
        } else {
            vec![(s(20), low, low), (s(20), low, high), (s(60), high, high), (s(20), high, low), (s(100), low, low)]
        };
        let hpa = Hpa {
            min: if smoke { 2 } else { 3 },
            max: if smoke { 4 } else { 10 },
            target: 0.6,
            tolerance: 0.1,
            period: if smoke { s(2) } else { s(3) },
            up_window: if smoke { s(2) } else { s(3) },
            down_window: if smoke { s(10) } else { s(30) },
            max_up_step: if smoke { 2 } else { 4 },
            max_down_step: 1,
        };
        AutoscaleOpts { partitions, accounts, sleep_ms: 200, slots, phases, hpa, grace: s(30) }
    }
}

/// One controller step.
#[derive(Debug, Clone)]
pub struct Step {
    pub at: Duration,
    pub rate: f64,
    pub saturation: f64,
    pub replicas: usize,
    pub desired: usize,
    pub runnable: f64,
}

#[derive(Debug, Clone, Default)]
pub struct AutoscaleReport {
    pub steps: Vec<Step>,
    pub max_replicas: usize,
    pub final_replicas: usize,
    /// Changes of scaling direction (up after down or down after up).
    pub reversals: usize,
    pub scale_ups: usize,
    pub scale_downs: usize,
    pub exit_codes: Vec<Option<i32>>,
    pub stop_times: Vec<Duration>,
    /// Most PostgreSQL sessions of the test database seen at once.
    pub max_db_sessions: i64,
    pub pauses_ms: Vec<f64>,
    pub moves: Vec<i64>,
    pub guarantee: Guarantee,
}

/// Run the load ramp with the controller (see the module docs).
pub async fn autoscale(
    url: &str,
    pool: &sqlx::PgPool,
    bin: &str,
    o: &AutoscaleOpts,
    mut progress: impl FnMut(&Step),
) -> anyhow::Result<AutoscaleReport> {
    let slots = o.slots.to_string();
    let mut c = Cluster::new(url.to_string(), pool.clone(), bin, o.partitions, &["--max-concurrent-attempts", &slots]);
    for _ in 0..o.hpa.min {
        c.add(None).await?;
    }
    c.wait_stable().await?;
    let client = Client::connect(pool.clone()).await?;
    let first_rate = o.phases.first().map(|p| p.1).unwrap_or(0.0);
    let load = Load::start(client, o.accounts, o.sleep_ms, first_rate);
    let (t0, e0) = (db_now(pool).await?, epochs(pool).await?);
    let start = Instant::now();
    let total: Duration = o.phases.iter().map(|p| p.0).sum();
    let mut r = AutoscaleReport { max_replicas: c.members.len(), ..Default::default() };
    let mut recs: Vec<(Instant, usize)> = Vec::new();
    let mut last_direction = 0i32;
    let mut next_tick = Instant::now();
    while start.elapsed() < total {
        // The load profile.
        let mut at = start.elapsed();
        let mut rate = 0.0;
        for (d, from, to) in &o.phases {
            if at <= *d {
                rate = from + (to - from) * at.as_secs_f64() / d.as_secs_f64().max(1e-9);
                break;
            }
            at -= *d;
        }
        load.set_rate(rate);
        if Instant::now() < next_tick {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        next_tick = Instant::now() + o.hpa.period;
        // The metric: mean saturation over the nodes (a node that fails to answer
        // counts as fully busy for scale-up, like the HPA's conservative handling).
        let mut sum = 0.0;
        let mut runnable = 0.0;
        for i in 0..c.members.len() {
            match c.scrape(i).await {
                Ok(s) => {
                    sum += s.saturation;
                    runnable += s.runnable;
                }
                Err(_) => sum += 1.0,
            }
        }
        let current = c.members.len();
        let saturation = sum / current as f64;
        let now = Instant::now();
        recs.push((now, hpa_desired(current, saturation, &o.hpa)));
        recs.retain(|(t, _)| now.duration_since(*t) <= o.hpa.up_window.max(o.hpa.down_window));
        let desired = hpa_stabilised(now, current, &recs, &o.hpa);
        let step = Step { at: start.elapsed(), rate, saturation, replicas: current, desired, runnable };
        progress(&step);
        r.steps.push(step);
        let sessions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(pool)
        .await?;
        r.max_db_sessions = r.max_db_sessions.max(sessions);
        if desired > current {
            if last_direction < 0 {
                r.reversals += 1;
            }
            last_direction = 1;
            r.scale_ups += 1;
            for _ in current..desired {
                c.add(None).await?;
            }
        } else if desired < current {
            if last_direction > 0 {
                r.reversals += 1;
            }
            last_direction = -1;
            r.scale_downs += 1;
            for _ in desired..current {
                // The cheapest node: the fewest busy slots now (ties: the newest).
                let mut cheapest = (f64::MAX, 0usize);
                for i in 0..c.members.len() {
                    let busy = c.scrape(i).await.map(|s| s.busy).unwrap_or(f64::MAX);
                    if busy <= cheapest.0 {
                        cheapest = (busy, i);
                    }
                }
                let (code, took) = c.remove(cheapest.1, o.grace).await?;
                r.exit_codes.push(code);
                r.stop_times.push(took);
            }
        }
        r.max_replicas = r.max_replicas.max(c.members.len());
    }
    r.final_replicas = c.members.len();
    c.wait_stable().await?;
    let t1 = db_now(pool).await?;
    let e1 = epochs(pool).await?;
    let enqueued = load.stop().await?;
    wait_drained(pool, Duration::from_secs(180)).await?;
    r.pauses_ms = pauses(pool, t0, t1).await?.into_iter().map(|(_, w)| w).collect();
    r.moves = e1.iter().map(|(p, e)| e - e0.get(p).copied().unwrap_or(0)).collect();
    r.guarantee = guarantee(pool, enqueued).await?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa() -> Hpa {
        Hpa {
            min: 3,
            max: 10,
            target: 0.6,
            tolerance: 0.1,
            period: Duration::from_secs(2),
            up_window: Duration::from_secs(4),
            down_window: Duration::from_secs(20),
            max_up_step: 4,
            max_down_step: 1,
        }
    }

    #[test]
    fn the_controller_follows_the_hpa_formula_and_windows() {
        let h = hpa();
        assert_eq!(hpa_desired(3, 0.62, &h), 3, "within tolerance");
        assert_eq!(hpa_desired(3, 1.0, &h), 5);
        assert_eq!(hpa_desired(5, 1.0, &h), 9);
        assert_eq!(hpa_desired(9, 1.0, &h), 10, "max");
        assert_eq!(hpa_desired(10, 0.1, &h), 3, "min");
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        // Up: the lowest recommendation of the up window, at most +4.
        assert_eq!(hpa_stabilised(s(4), 3, &[(s(0), 9), (s(2), 5), (s(4), 9)], &h), 5);
        assert_eq!(hpa_stabilised(s(10), 3, &[(s(8), 9), (s(10), 9)], &h), 7);
        // Down: the highest recommendation of the down window, at most −1.
        assert_eq!(hpa_stabilised(s(20), 10, &[(s(2), 10), (s(10), 3), (s(20), 3)], &h), 10);
        assert_eq!(hpa_stabilised(s(30), 10, &[(s(10), 3), (s(20), 3), (s(30), 3)], &h), 9);
    }

    #[test]
    fn metrics_are_read_from_prometheus_text() {
        let text = "# HELP warden_saturation x\n# TYPE warden_saturation gauge\nwarden_saturation 0.25\nwarden_saturation_other 3\nwarden_execution_slots 4\n";
        assert_eq!(metric(text, "warden_saturation"), Some(0.25));
        assert_eq!(metric(text, "warden_execution_slots"), Some(4.0));
        assert_eq!(metric(text, "warden_missing"), None);
    }
}
