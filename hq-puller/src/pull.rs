//! Draining one location: fetch → validate → apply, batch after batch, until caught up,
//! the run budget ends, or shutdown. The cursor only moves inside the apply transaction;
//! a failure never touches it.

use crate::apply::{apply_batch, lag_seconds, Applied};
use crate::config::Location;
use crate::error::{Error, ErrorKind, Result};
use crate::store::{self, outcome, state, RunTotals};
use crate::{metrics as m, App};
use schemas::Cursor;
use std::time::{Duration, Instant};
use tracing::Instrument;
use uuid::Uuid;

/// The result of one run.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub location: String,
    /// `None` when the location was not pulled (paused or awaiting resync).
    pub run_id: Option<i64>,
    pub totals: RunTotals,
    /// `ok`, `failed`, `paused`, `needs_resync`, `interrupted`, or `skipped`.
    pub outcome: String,
    pub error: Option<String>,
    /// Kind of the error, when the run failed.
    pub error_kind: Option<ErrorKind>,
}

/// Outcome of a run that was not pulled (paused / needs resync).
pub const SKIPPED: &str = "skipped";

impl RunReport {
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }
}

/// Where a run is in the stream.
struct Position {
    cursor: Option<Cursor>,
    instance: Option<Uuid>,
}

/// What one fetch → validate → apply step did.
enum Step {
    Applied { more: bool },
    CaughtUp,
    AppliedElsewhere,
    Interrupted,
}

/// Drains one location. `wait` long-polls the first request (stream mode).
pub async fn drain(app: &App, location: &str, wait: Option<u32>) -> Result<RunReport> {
    let loc = app
        .settings
        .location(location)
        .ok_or_else(|| Error::Other(format!("unknown location {location:?}")))?
        .clone();
    let row = store::load_location(&app.pool, &loc.id).await?;
    if row.state == state::NEEDS_RESYNC && loc.auto_resync {
        return auto_resync(app, &loc).await;
    }
    let resyncing = row.state == state::LOADING
        && crate::load::load_row(&app.pool, &loc.id)
            .await?
            .is_some_and(|l| l.kind == crate::load::kind::RESYNC);
    if row.state == state::PAUSED || row.state == state::NEEDS_RESYNC || resyncing {
        tracing::debug!(location = %loc.id, state = %row.state, "not pulling until hq-puller resume");
        m::set_state(&loc.id, &row.state);
        return Ok(RunReport {
            location: loc.id.clone(),
            run_id: None,
            totals: RunTotals::default(),
            outcome: SKIPPED.into(),
            error: None,
            error_kind: None,
        });
    }
    let run_id = store::start_run(&app.pool, &loc.id, row.cursor.as_ref()).await?;
    let span = tracing::info_span!("run", location = %loc.id, run_id);
    async move {
        let mut pos = Position {
            cursor: row.cursor,
            instance: row.instance_id,
        };
        let mut totals = RunTotals::default();
        let result = run_loop(app, &loc, &mut pos, &mut totals, wait).await;
        let (out, err) = match result {
            Ok(o) => {
                if o == outcome::OK && totals.batches == 0 {
                    // A caught-up run also clears a `failing` state.
                    store::clear_failing(&app.pool, &loc.id).await?;
                    m::caught_up(&loc.id);
                }
                m::set_state(&loc.id, state::OK);
                (o, None)
            }
            Err(e) => {
                let kind = e.kind();
                let msg = e.to_string();
                let (o, st) = match kind {
                    ErrorKind::Transient => (outcome::FAILED, state::FAILING),
                    ErrorKind::Permanent => (outcome::PAUSED, state::PAUSED),
                    ErrorKind::NeedsResync => (outcome::NEEDS_RESYNC, state::NEEDS_RESYNC),
                };
                if kind == ErrorKind::Transient {
                    tracing::warn!(error = %msg, "pull failed, will retry");
                } else {
                    tracing::error!(error = %msg, state = st, "location stopped until an operator runs hq-puller resume");
                }
                metrics::counter!(m::ERRORS, "location" => loc.id.clone(), "kind" => kind.as_str())
                    .increment(1);
                store::record_failure(&app.pool, &loc.id, st, &msg).await?;
                m::set_state(&loc.id, st);
                (o, Some((msg, kind)))
            }
        };
        store::finish_run(
            &app.pool,
            run_id,
            &totals,
            pos.cursor.as_ref(),
            out,
            err.as_ref().map(|(m, _)| m.as_str()),
        )
        .await?;
        if loc.auto_resync && err.as_ref().is_some_and(|(_, k)| *k == ErrorKind::NeedsResync) {
            auto_resync(app, &loc).await?;
        }
        crate::dashboard::samples::record(&app.pool, &loc.id).await?;
        Ok(RunReport {
            location: loc.id.clone(),
            run_id: Some(run_id),
            totals,
            outcome: out.to_string(),
            error_kind: err.as_ref().map(|(_, k)| *k),
            error: err.map(|(m, _)| m),
        })
    }
    .instrument(span)
    .await
}

/// `auto_resync = true`: a location that needs a resync is reloaded at once.
async fn auto_resync(app: &App, loc: &Location) -> Result<RunReport> {
    tracing::warn!(location = %loc.id, "location needs a resync: auto_resync is on, reloading its snapshot");
    let r = crate::load::resync(app, loc).await;
    let (outcome, error, error_kind) = match &r {
        Ok(crate::load::Loaded::Done { .. }) => (outcome::OK.to_string(), None, None),
        Ok(other) => (format!("{other:?}").to_lowercase(), None, None),
        Err(e) => (
            outcome::FAILED.to_string(),
            Some(e.to_string()),
            Some(e.kind()),
        ),
    };
    if let Err(e) = &r {
        tracing::error!(location = %loc.id, error = %e, "auto resync failed");
    }
    Ok(RunReport {
        location: loc.id.clone(),
        run_id: None,
        totals: RunTotals::default(),
        outcome,
        error,
        error_kind,
    })
}

async fn run_loop(
    app: &App,
    loc: &Location,
    pos: &mut Position,
    totals: &mut RunTotals,
    mut wait: Option<u32>,
) -> Result<&'static str> {
    if pos.cursor.is_none() {
        // A location without a cursor first loads the branch's existing rows.
        match crate::load::initial(app, loc).await? {
            crate::load::Loaded::Done { start, rows } => {
                totals.changes += rows as i64;
                pos.cursor = Some(start);
                pos.instance = Some(start.instance_id);
            }
            crate::load::Loaded::Interrupted => return Ok(outcome::INTERRUPTED),
            crate::load::Loaded::Unsupported => {
                // Streaming from the install tick: rows arrive without a load.
                crate::partitions::ensure(&app.pool, &app.settings.catalogue, &loc.id).await?;
            }
        }
    }
    let started = Instant::now();
    loop {
        if app.shutdown.is_cancelled() {
            return Ok(outcome::INTERRUPTED);
        }
        if totals.batches > 0 && started.elapsed() >= app.settings.run_budget {
            tracing::info!("run budget used up, continuing at the next fire");
            return Ok(outcome::OK);
        }
        match step(app, loc, pos, totals, wait.take()).await? {
            Step::Applied { more: true } => continue,
            Step::Applied { more: false } | Step::CaughtUp => return Ok(outcome::OK),
            Step::AppliedElsewhere => return Ok(outcome::OK),
            Step::Interrupted => return Ok(outcome::INTERRUPTED),
        }
    }
}

async fn step(
    app: &App,
    loc: &Location,
    pos: &mut Position,
    totals: &mut RunTotals,
    wait: Option<u32>,
) -> Result<Step> {
    let client = app.client(&loc.id)?;
    let t0 = Instant::now();
    // A fetch is abandoned on shutdown: nothing has been applied yet.
    let fetched = tokio::select! {
        r = client.changes(pos.cursor.as_ref(), loc.batch_limit, wait) => r?,
        _ = app.shutdown.cancelled() => return Ok(Step::Interrupted),
    };
    metrics::histogram!(m::PULL_DURATION, "location" => loc.id.clone())
        .record(t0.elapsed().as_secs_f64());
    let resp = &fetched.response;
    let expected = crate::validate::Expected {
        location: loc.id.clone(),
        after: pos.cursor,
        instance_id: pos.instance,
    };
    let checked = crate::validate::check(resp, &expected, &app.settings.catalogue)?;
    let n = checked.changes.len() + checked.files.len();
    if n == 0 && Some(resp.next) == pos.cursor {
        return Ok(Step::CaughtUp);
    }
    let after_tick = pos.cursor.map(|c| c.tick).unwrap_or(0);
    // Every line about this batch carries its range (inside the run's span).
    let span = tracing::info_span!("batch", from = after_tick, to = resp.next.tick, changes = n);
    // File contents are downloaded and verified before the transaction; abandoned on
    // shutdown (partial downloads are resumed next time).
    let files = tokio::select! {
        r = crate::files::prepare(app, &loc.id, &checked.files).instrument(span.clone()) => r?,
        _ = app.shutdown.cancelled() => return Ok(Step::Interrupted),
    };
    let t1 = Instant::now();
    // The apply is not raced against shutdown: an in-flight batch commits or rolls back.
    let applied = apply_batch(
        &app.pool,
        &app.settings.catalogue,
        &app.statements,
        &loc.id,
        resp,
        &checked,
        &files,
    )
    .instrument(span.clone())
    .await?;
    let _batch = span.enter();
    metrics::histogram!(m::APPLY_DURATION, "location" => loc.id.clone())
        .record(t1.elapsed().as_secs_f64());
    let Applied::Committed { rows } = applied else {
        tracing::warn!(
            after_tick,
            next_tick = resp.next.tick,
            "batch already applied by another process, ending this run"
        );
        return Ok(Step::AppliedElsewhere);
    };
    totals.batches += 1;
    totals.changes += n as i64;
    totals.bytes += fetched.bytes as i64;
    tracing::info!(
        after_tick,
        next_tick = resp.next.tick,
        changes = n,
        rows,
        files = files.items.len(),
        bytes = fetched.bytes,
        backlog = resp.backlog,
        "batch applied"
    );
    let l = loc.id.clone();
    metrics::counter!(m::APPLIED_CHANGES, "location" => l.clone()).increment(n as u64);
    metrics::counter!(m::APPLIED_BYTES, "location" => l.clone()).increment(fetched.bytes);
    metrics::gauge!(m::BACKLOG, "location" => l.clone()).set(resp.backlog as f64);
    metrics::gauge!(m::LAG, "location" => l.clone()).set(lag_seconds(resp));
    metrics::gauge!(m::LAST_SUCCESS, "location" => l).set(chrono::Utc::now().timestamp() as f64);
    pos.cursor = Some(resp.next);
    pos.instance = Some(resp.instance_id);
    Ok(Step::Applied { more: resp.more })
}

/// Exponential backoff with jitter after `failures` consecutive failures: 1 s, 2 s,
/// 4 s … capped at 5 min, each times a random factor in [0.5, 1).
pub fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1);
    let max = Duration::from_secs(300);
    let exp = base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(max);
    exp.mul_f64(rand::random::<f64>() * 0.5 + 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..50 {
            let d1 = backoff(1);
            assert!(d1 >= Duration::from_millis(500) && d1 < Duration::from_secs(1));
            let d4 = backoff(4);
            assert!(d4 >= Duration::from_secs(4) && d4 < Duration::from_secs(8));
            assert!(backoff(40) < Duration::from_secs(300));
        }
    }
}
