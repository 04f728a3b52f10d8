//! Draining one location: fetch → validate → apply, batch after batch, until caught up,
//! the run budget ends, or shutdown. The cursor only moves inside the apply transaction;
//! a failure never touches it.

use crate::apply::{apply_batch, Applied};
use crate::error::{Error, ErrorKind, Result};
use crate::store::{self, outcome, state, RunTotals};
use crate::{metrics as m, App};
use std::time::{Duration, Instant};
use tracing::Instrument;

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

impl RunReport {
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }
}

/// Drains one location. `wait` long-polls the first request (stream mode).
pub async fn drain(app: &App, location: &str, wait: Option<u32>) -> Result<RunReport> {
    let loc = app
        .settings
        .location(location)
        .ok_or_else(|| Error::Other(format!("unknown location {location:?}")))?
        .clone();
    let row = store::load_location(&app.pool, &loc.id).await?;
    if row.state == state::PAUSED || row.state == state::NEEDS_RESYNC {
        tracing::debug!(location = %loc.id, state = %row.state, "not pulling: run hq-puller resume");
        m::set_state(&loc.id, &row.state);
        return Ok(RunReport {
            location: loc.id.clone(),
            run_id: None,
            totals: RunTotals::default(),
            outcome: "skipped".into(),
            error: None,
            error_kind: None,
        });
    }
    let run_id = store::start_run(&app.pool, &loc.id, row.cursor.as_ref()).await?;
    let span = tracing::info_span!("run", location = %loc.id, run_id);
    async move {
        let client = app.client(&loc.id)?;
        let started = Instant::now();
        let mut totals = RunTotals::default();
        let mut cursor = row.cursor;
        let mut instance = row.instance_id;
        let mut wait = wait;
        let result: Result<&'static str> = async {
            loop {
                if app.shutdown.is_cancelled() {
                    return Ok(outcome::INTERRUPTED);
                }
                if totals.batches > 0 && started.elapsed() >= app.settings.run_budget {
                    tracing::info!("run budget used up, continuing at the next fire");
                    return Ok(outcome::OK);
                }
                let t0 = Instant::now();
                let fetched = tokio::select! {
                    r = client.changes(cursor.as_ref(), loc.batch_limit, wait.take()) => r?,
                    _ = app.shutdown.cancelled() => return Ok(outcome::INTERRUPTED),
                };
                metrics::histogram!(m::PULL_DURATION, "location" => loc.id.clone())
                    .record(t0.elapsed().as_secs_f64());
                let resp = &fetched.response;
                let expected = crate::validate::Expected {
                    location: loc.id.clone(),
                    after: cursor,
                    instance_id: instance,
                };
                let checked = crate::validate::check(resp, &expected, &app.settings.catalogue)?;
                let n = checked.changes.len();
                let after_tick = cursor.map(|c| c.tick).unwrap_or(0);
                if n == 0 && resp.next == cursor.unwrap_or(resp.next) && cursor.is_some() {
                    // Caught up: nothing to store.
                    return Ok(outcome::OK);
                }
                let t1 = Instant::now();
                // The apply is not raced against shutdown: an in-flight batch commits or
                // rolls back on its own.
                let applied = apply_batch(
                    &app.pool,
                    &app.settings.catalogue,
                    &app.statements,
                    &loc.id,
                    resp,
                    &checked,
                )
                .await?;
                metrics::histogram!(m::APPLY_DURATION, "location" => loc.id.clone())
                    .record(t1.elapsed().as_secs_f64());
                match applied {
                    Applied::AlreadyApplied => {
                        tracing::warn!(
                            after_tick,
                            next_tick = resp.next.tick,
                            "batch already applied by another process, stopping this run"
                        );
                        return Ok(outcome::OK);
                    }
                    Applied::Committed { rows } => {
                        totals.batches += 1;
                        totals.changes += n as i64;
                        totals.bytes += fetched.bytes as i64;
                        tracing::info!(
                            after_tick,
                            next_tick = resp.next.tick,
                            changes = n,
                            rows,
                            bytes = fetched.bytes,
                            backlog = resp.backlog,
                            "batch applied"
                        );
                        let l = loc.id.clone();
                        metrics::counter!(m::APPLIED_CHANGES, "location" => l.clone()).increment(n as u64);
                        metrics::counter!(m::APPLIED_BYTES, "location" => l.clone()).increment(fetched.bytes);
                        metrics::gauge!(m::BACKLOG, "location" => l.clone()).set(resp.backlog as f64);
                        metrics::gauge!(m::LAST_SUCCESS, "location" => l.clone())
                            .set(chrono::Utc::now().timestamp() as f64);
                        let lag = if resp.more {
                            resp.changes.iter().map(|c| c.ts).max()
                                .map(|ts| (chrono::Utc::now() - ts).num_milliseconds().max(0) as f64 / 1000.0)
                                .unwrap_or(0.0)
                        } else {
                            0.0
                        };
                        metrics::gauge!(m::LAG, "location" => l).set(lag);
                        cursor = Some(resp.next);
                        instance = Some(resp.instance_id);
                    }
                }
                if !resp.more {
                    return Ok(outcome::OK);
                }
            }
        }
        .await;
        let (out, err) = match result {
            Ok(o) => {
                m::set_state(&loc.id, state::OK);
                if o == outcome::OK && totals.batches == 0 {
                    // A caught-up run still clears a `failing` state.
                    sqlx::query("UPDATE sync.locations SET state = 'ok', last_success_at = now() WHERE id = $1 AND state = 'failing'")
                        .bind(&loc.id)
                        .execute(&app.pool)
                        .await?;
                }
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
                    tracing::error!(error = %msg, state = st, "location stopped until an operator acts (hq-puller resume)");
                }
                metrics::counter!(m::ERRORS, "location" => loc.id.clone(), "kind" => kind.as_str()).increment(1);
                store::record_failure(&app.pool, &loc.id, st, &msg).await?;
                m::set_state(&loc.id, st);
                (o, Some((msg, kind)))
            }
        };
        store::finish_run(
            &app.pool,
            run_id,
            &totals,
            cursor.as_ref(),
            out,
            err.as_ref().map(|(m, _)| m.as_str()),
        )
        .await?;
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

/// Exponential backoff with jitter after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1);
    let max = Duration::from_secs(300);
    let exp = base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(max);
    let jitter = rand::random::<f64>() * 0.5 + 0.5;
    exp.mul_f64(jitter)
}
