//! Scheduling: one tokio-cron-scheduler cron job per `mode = "schedule"` location, a
//! dedicated long-poll task per `mode = "stream"` location.
//!
//! - a per-location try-lock: two runs of one location never overlap (a fire that finds
//!   the previous run still going is skipped and logged);
//! - a global semaphore (`max_concurrent_pulls`) bounds the scheduled runs;
//! - after a failure a location backs off exponentially with jitter (fires are skipped
//!   until the backoff ends); one dead branch never delays the others;
//! - paused / needs_resync locations are skipped: each fire re-reads the state;
//! - a watchdog flags (log + `hq_puller_job_stalled`) a job that has not fired for two
//!   periods and re-registers it.

use crate::config::{next_fires, Mode};
use crate::error::{Error, Result};
use crate::{metrics as m, pull, App};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_cron_scheduler::{Job, JobScheduler};
use uuid::Uuid;

/// Wait (seconds) of a stream location's long-poll.
pub const STREAM_WAIT_SECONDS: u32 = 25;

/// Per-location scheduling state (in memory).
#[derive(Debug)]
struct Slot {
    /// Held while a run of the location is in progress.
    running: Arc<tokio::sync::Mutex<()>>,
    /// Consecutive failed runs.
    failures: u32,
    /// Fires before this instant are skipped.
    backoff_until: Option<Instant>,
    /// When the job last fired (watchdog).
    last_fire: Instant,
    fires: u64,
    job_id: Option<Uuid>,
    stalled: bool,
}

type Slots = Arc<Mutex<HashMap<String, Slot>>>;

pub struct Scheduler {
    sched: JobScheduler,
    slots: Slots,
}

impl Scheduler {
    /// Registers the jobs and tasks of every enabled location and starts them.
    pub async fn start(app: Arc<App>) -> Result<Scheduler> {
        let sched = JobScheduler::new()
            .await
            .map_err(|e| Error::Scheduler(e.to_string()))?;
        let slots: Slots = Arc::new(Mutex::new(HashMap::new()));
        for loc in app.settings.locations.iter().filter(|l| l.enabled) {
            slots.lock().expect("slots lock").insert(
                loc.id.clone(),
                Slot {
                    running: Arc::new(tokio::sync::Mutex::new(())),
                    failures: 0,
                    backoff_until: None,
                    last_fire: Instant::now(),
                    fires: 0,
                    job_id: None,
                    stalled: false,
                },
            );
            metrics::gauge!(m::JOB_STALLED, "location" => loc.id.clone()).set(0.0);
            match loc.mode {
                Mode::Schedule => {
                    let id = add_job(&sched, &app, &slots, &loc.id, &loc.schedule).await?;
                    slots
                        .lock()
                        .expect("slots lock")
                        .get_mut(&loc.id)
                        .expect("slot")
                        .job_id = Some(id);
                }
                Mode::Stream => {
                    let (app2, slots2, id) = (app.clone(), slots.clone(), loc.id.clone());
                    app.tracker.spawn(stream_task(app2, slots2, id));
                }
            }
        }
        if let (Some(root), Some(cron)) = (&app.settings.files_dir, &app.settings.files_gc_schedule)
        {
            let (store, min_age) = (
                crate::files::Store::new(root),
                app.settings.files_gc_min_age,
            );
            let job = Job::new_async(cron.as_str(), move |_uuid, _lock| {
                Box::pin(crate::files::gc::scheduled(store.clone(), min_age))
            })
            .map_err(|e| Error::Scheduler(format!("files_gc_schedule {cron:?}: {e}")))?;
            sched
                .add(job)
                .await
                .map_err(|e| Error::Scheduler(format!("files_gc_schedule: {e}")))?;
        }
        sched
            .start()
            .await
            .map_err(|e| Error::Scheduler(e.to_string()))?;
        app.tracker
            .spawn(watchdog(app.clone(), sched.clone(), slots.clone()));
        Ok(Scheduler { sched, slots })
    }

    /// Fires recorded per location so far.
    pub fn fires(&self) -> HashMap<String, u64> {
        let s = self.slots.lock().expect("slots lock");
        s.iter().map(|(k, v)| (k.clone(), v.fires)).collect()
    }

    pub async fn shutdown(mut self) {
        if let Err(e) = self.sched.shutdown().await {
            tracing::warn!(error = %e, "scheduler shutdown");
        }
    }
}

async fn add_job(
    sched: &JobScheduler,
    app: &Arc<App>,
    slots: &Slots,
    id: &str,
    cron: &str,
) -> Result<Uuid> {
    let (app, slots, id2) = (app.clone(), slots.clone(), id.to_string());
    let job = Job::new_async(cron, move |_uuid, _lock| {
        let (app, slots, id) = (app.clone(), slots.clone(), id2.clone());
        Box::pin(async move { on_fire(app, slots, id).await })
    })
    .map_err(|e| Error::Scheduler(format!("location {id}: cron {cron:?}: {e}")))?;
    sched
        .add(job)
        .await
        .map_err(|e| Error::Scheduler(format!("location {id}: {e}")))
}

async fn on_fire(app: Arc<App>, slots: Slots, id: String) {
    if app.shutdown.is_cancelled() {
        return;
    }
    // Every fire is recorded, also the skipped ones: `last_fired_at` tells a stalled job
    // from a location that is merely backing off or still running.
    if let Err(e) = crate::store::mark_fired(&app.pool, &id).await {
        tracing::warn!(location = %id, error = %e, "recording the fire");
    }
    let lock = {
        let mut s = slots.lock().expect("slots lock");
        let Some(slot) = s.get_mut(&id) else { return };
        slot.last_fire = Instant::now();
        slot.fires += 1;
        if slot.stalled {
            slot.stalled = false;
            metrics::gauge!(m::JOB_STALLED, "location" => id.clone()).set(0.0);
        }
        if let Some(until) = slot.backoff_until {
            if Instant::now() < until {
                tracing::debug!(location = %id, "backing off after failures, fire skipped");
                return;
            }
        }
        match slot.running.clone().try_lock_owned() {
            Ok(g) => g,
            Err(_) => {
                tracing::info!(location = %id, "previous run still in progress, fire skipped");
                return;
            }
        }
    };
    let tracker = app.tracker.clone();
    tracker.spawn(async move {
        let _running = lock;
        let _permit = tokio::select! {
            p = app.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = app.shutdown.cancelled() => return,
        };
        let failed = match pull::drain(&app, &id, None).await {
            Ok(r) => r.failed(),
            Err(e) => {
                tracing::warn!(location = %id, error = %e, "run could not be recorded");
                true
            }
        };
        after_run(&slots, &id, failed);
    });
}

fn after_run(slots: &Slots, id: &str, failed: bool) -> Option<Duration> {
    let mut s = slots.lock().expect("slots lock");
    let slot = s.get_mut(id)?;
    if failed {
        slot.failures += 1;
        let d = pull::backoff(slot.failures);
        slot.backoff_until = Some(Instant::now() + d);
        tracing::info!(location = %id, failures = slot.failures, backoff_ms = d.as_millis() as u64, "backing off");
        Some(d)
    } else {
        slot.failures = 0;
        slot.backoff_until = None;
        None
    }
}

/// A stream location: long-poll, apply, repeat.
async fn stream_task(app: Arc<App>, slots: Slots, id: String) {
    let running = {
        let s = slots.lock().expect("slots lock");
        s.get(&id).map(|s| s.running.clone())
    };
    let Some(running) = running else { return };
    while !app.shutdown.is_cancelled() {
        let pause = {
            let _g = running.lock().await;
            {
                let mut s = slots.lock().expect("slots lock");
                if let Some(slot) = s.get_mut(&id) {
                    slot.last_fire = Instant::now();
                    slot.fires += 1;
                }
            }
            match pull::drain(&app, &id, Some(STREAM_WAIT_SECONDS)).await {
                Ok(r) if r.outcome == pull::SKIPPED => Some(Duration::from_secs(5)),
                Ok(r) if !r.failed() => {
                    after_run(&slots, &id, false);
                    // A listener that answers an empty long-poll at once (not honouring
                    // `wait`) must not turn this loop into a busy loop.
                    (r.totals.batches == 0).then_some(Duration::from_secs(1))
                }
                Ok(_) => after_run(&slots, &id, true),
                Err(e) => {
                    tracing::warn!(location = %id, error = %e, "stream run could not be recorded");
                    after_run(&slots, &id, true)
                }
            }
        };
        if let Some(d) = pause {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = app.shutdown.cancelled() => {}
            }
        }
    }
}

/// Whether a job whose last fire was `since_fire` ago, with cron period `period`, missed
/// two periods (one second of slack for scheduling jitter).
pub fn is_stalled(since_fire: Duration, period: Duration) -> bool {
    since_fire > period * 2 + Duration::from_secs(1)
}

/// Flags and re-registers cron jobs that stopped firing.
async fn watchdog(app: Arc<App>, sched: JobScheduler, slots: Slots) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = app.shutdown.cancelled() => return,
        }
        let now = chrono::Utc::now();
        let mut stalled = Vec::new();
        {
            let mut s = slots.lock().expect("slots lock");
            for loc in app
                .settings
                .locations
                .iter()
                .filter(|l| l.enabled && l.mode == Mode::Schedule)
            {
                let f = next_fires(&loc.cron, now, 2);
                let period = match f.as_slice() {
                    [a, b] => (*b - *a).to_std().unwrap_or(Duration::from_secs(1)),
                    _ => continue,
                };
                let Some(slot) = s.get_mut(&loc.id) else {
                    continue;
                };
                if !slot.stalled && is_stalled(slot.last_fire.elapsed(), period) {
                    slot.stalled = true;
                    slot.last_fire = Instant::now();
                    stalled.push((loc.id.clone(), loc.schedule.clone(), slot.job_id));
                }
            }
        }
        for (id, cron, old) in stalled {
            tracing::warn!(location = %id, "cron job has not fired for two periods: re-registering it");
            metrics::gauge!(m::JOB_STALLED, "location" => id.clone()).set(1.0);
            if let Some(old) = old {
                let _ = sched.remove(&old).await;
            }
            match add_job(&sched, &app, &slots, &id, &cron).await {
                Ok(new) => {
                    if let Some(slot) = slots.lock().expect("slots lock").get_mut(&id) {
                        slot.job_id = Some(new);
                    }
                }
                Err(e) => tracing::error!(location = %id, error = %e, "re-registering the job"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_is_two_missed_periods() {
        let p = Duration::from_secs(10);
        assert!(!is_stalled(Duration::from_secs(15), p));
        assert!(!is_stalled(Duration::from_secs(21), p));
        assert!(is_stalled(Duration::from_millis(21_001), p));
    }
}
