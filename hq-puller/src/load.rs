//! Initial load and resync: a branch's existing rows reach HQ by snapshot pages, then the
//! change stream continues from the snapshot's start T0.
//!
//! "Fuzzy snapshot + replay": T0 (a tick made by `/v1/snapshot/start`) is taken before
//! any page is read; each page is read in its own short statement and applied with the
//! ordinary upsert, its rows stamped `_seq = 0`; then the change stream runs from T0.
//! Per row, sequence order is commit order, and every change not visible at T0 is in the
//! stream after T0, so replaying them ends at the branch's current image whatever state
//! a page saw; a row deleted before its page was read gets its tombstone from the
//! stream; a row inserted later comes from the stream (and wins over `_seq = 0`).
//!
//! - **initial** (a location whose cursor is NULL): pages go into the location's own
//!   unindexed table `hq_load.<t>@<location>`; the last transaction builds its key,
//!   attaches it as the location's partition of `hq.<t>` ([`crate::partitions`]) and
//!   stores the cursor T0 (checked NULL `FOR UPDATE`): readers see none of the rows,
//!   then all of them. Where the partition exists already (or `hq.<t>` is a plain table
//!   made before partitioning), pages go straight into `hq.<t>`.
//! - **resync** (`hq-puller resync`, or `auto_resync`): pages go into `hq_stage.<t>`;
//!   then ONE transaction deletes the location's rows from `hq.<t>`, copies the staged
//!   rows in, and stores cursor T0 and the new instance: readers of `hq.<t>_live` see the
//!   old rows or the new ones, never a mix. Rows absent at the branch are gone.
//!
//! Progress (table, last key, rows, T0) is stored in `sync.loads` in the same
//! transaction as each page, so a crashed load resumes at its next page. The next page
//! is fetched while the current one is applied.
//!
//! Each page's progress update is a compare-and-set on the position the previous page
//! wrote ([`Position`]), and the last transaction checks the final one: an HQ database
//! that loses acknowledged commits in a crash (`synchronous_commit = off`) loses a
//! suffix of them, and the load then fails at its next page and resumes from what is
//! stored, instead of going on past a page that is not there.

use crate::config::Location;
use crate::error::{Error, Result};
use crate::files::snapshot as fsnap;
use crate::progress::Progress;
use crate::store::{self, state};
use crate::{metrics as m, App};
use schemas::catalogue::Table;
use schemas::files::FILES_TABLE;
use schemas::sql::{hq, snapshot};
use schemas::wire::SnapshotPage;
use schemas::Cursor;
use sqlx::PgPool;
use std::collections::VecDeque;
use uuid::Uuid;

/// `sync.loads.kind`.
pub mod kind {
    pub const INITIAL: &str = "initial";
    pub const RESYNC: &str = "resync";
}

/// A load in progress (`sync.loads`).
#[derive(Debug, Clone)]
pub struct LoadRow {
    pub kind: String,
    pub start: Cursor,
    pub instance_id: Uuid,
    pub time_zone: String,
    pub table_name: Option<String>,
    pub last_key: Option<String>,
    pub rows_loaded: i64,
}

/// Where a load stands in `sync.loads` (`table_name`, `last_key`): what this process
/// last committed, the expected value of the next compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    table: Option<String>,
    key: Option<String>,
}

impl Position {
    fn of(row: &LoadRow) -> Position {
        Position {
            table: row.table_name.clone(),
            key: row.last_key.clone(),
        }
    }
}

/// Moves the load's progress from `from` to `to` (adding `rows`) in `tx`, which commits
/// the page: fails when `sync.loads` does not stand at `from` (another process restarted
/// the load, or HQ lost the previous page's commit in a crash).
async fn advance(
    tx: &mut sqlx::PgConnection,
    location: &str,
    row: &LoadRow,
    from: &Position,
    to: &Position,
    rows: u64,
) -> Result<()> {
    let r = sqlx::query(
        "UPDATE sync.loads SET table_name = $5, last_key = $6, rows_loaded = rows_loaded + $7, \
         updated_at = now() WHERE location_id = $1 AND start_cursor = $2 \
         AND table_name IS NOT DISTINCT FROM $3 AND last_key IS NOT DISTINCT FROM $4",
    )
    .bind(location)
    .bind(row.start.to_string())
    .bind(from.table.as_deref())
    .bind(from.key.as_deref())
    .bind(to.table.as_deref())
    .bind(to.key.as_deref())
    .bind(rows as i64)
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() != 1 {
        return Err(moved(location, row));
    }
    Ok(())
}

/// Checks, in the transaction that ends the load, that `sync.loads` stands at `at`.
async fn expect_position(
    tx: &mut sqlx::PgConnection,
    location: &str,
    row: &LoadRow,
    at: &Position,
) -> Result<()> {
    let stored: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT table_name, last_key FROM sync.loads \
         WHERE location_id = $1 AND start_cursor = $2 FOR UPDATE",
    )
    .bind(location)
    .bind(row.start.to_string())
    .fetch_optional(&mut *tx)
    .await?;
    match stored {
        Some((table, key)) if table == at.table && key == at.key => Ok(()),
        _ => Err(moved(location, row)),
    }
}

fn moved(location: &str, row: &LoadRow) -> Error {
    Error::transient(format!(
        "the progress of the {} of {location} in sync.loads is not where this process left it \
         (another process restarted it, or HQ's database lost recent commits in a crash): \
         it resumes from the stored progress",
        row.kind
    ))
}

/// How a load ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// Loaded; the location's cursor is T0 (or another process finished it first).
    Done { start: Cursor, rows: u64 },
    /// The listener has no snapshot endpoint (older version): nothing was done.
    Unsupported,
    /// Shutdown between pages: progress is kept, the next run resumes.
    Interrupted,
}

pub async fn load_row(pool: &PgPool, location: &str) -> Result<Option<LoadRow>> {
    type Row = (
        String,
        String,
        Uuid,
        String,
        Option<String>,
        Option<String>,
        i64,
    );
    let r: Option<Row> = sqlx::query_as(
        "SELECT kind, start_cursor, instance_id, time_zone, table_name, last_key, rows_loaded \
         FROM sync.loads WHERE location_id = $1",
    )
    .bind(location)
    .fetch_optional(pool)
    .await?;
    r.map(
        |(kind, c, instance_id, time_zone, table_name, last_key, rows_loaded)| {
            Ok(LoadRow {
                kind,
                start: c.parse().map_err(|e| {
                    Error::permanent(format!(
                        "sync.loads of {location}: corrupt start cursor: {e}"
                    ))
                })?,
                instance_id,
                time_zone,
                table_name,
                last_key,
                rows_loaded,
            })
        },
    )
    .transpose()
}

/// Starts a new load: T0 from the listener, a fresh `sync.loads` row, state `loading`.
async fn begin(app: &App, loc: &Location, kind: &str) -> Result<Option<LoadRow>> {
    let client = app.client(&loc.id)?;
    let s = match client.snapshot_start().await {
        Err(Error::NotSupported(msg)) => {
            tracing::warn!(location = %loc.id, reason = %msg, "listener cannot serve a snapshot: streaming from the install tick without an initial load");
            return Ok(None);
        }
        r => r?,
    };
    if s.location != loc.id {
        return Err(Error::permanent(format!(
            "listener at {} serves location {:?}, expected {:?}",
            loc.url, s.location, loc.id
        )));
    }
    for t in &app.settings.catalogue.tables {
        if !s.tables.contains(&t.name) {
            return Err(Error::permanent(format!(
                "the branch's catalogue lacks table {} (HQ's catalogue has it): align the catalogue files",
                t.name
            )));
        }
    }
    sqlx::query(
        "INSERT INTO sync.loads (location_id, kind, start_cursor, instance_id, time_zone) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (location_id) DO UPDATE SET kind = EXCLUDED.kind, \
           start_cursor = EXCLUDED.start_cursor, instance_id = EXCLUDED.instance_id, \
           time_zone = EXCLUDED.time_zone, table_name = NULL, last_key = NULL, \
           rows_loaded = 0, started_at = now(), updated_at = now()",
    )
    .bind(&loc.id)
    .bind(kind)
    .bind(s.start.to_string())
    .bind(s.instance_id)
    .bind(&s.time_zone)
    .execute(&app.pool)
    .await?;
    tracing::info!(location = %loc.id, kind, start_tick = s.start.tick, instance = %s.instance_id, "load started");
    Ok(Some(LoadRow {
        kind: kind.into(),
        start: s.start,
        instance_id: s.instance_id,
        time_zone: s.time_zone,
        table_name: None,
        last_key: None,
        rows_loaded: 0,
    }))
}

async fn set_loading(pool: &PgPool, location: &str, reason: &str) -> Result<()> {
    sqlx::query(
        "UPDATE sync.locations SET state = 'loading', paused_reason = $2, updated_at = now() \
         WHERE id = $1",
    )
    .bind(location)
    .bind(reason)
    .execute(pool)
    .await?;
    m::set_state(location, state::LOADING);
    Ok(())
}

/// Forgets a load and the rows it wrote (the branch's instance changed under it).
async fn discard(app: &App, location: &str, row: &LoadRow) -> Result<()> {
    let mut tx = app.pool.begin().await?;
    for t in &app.settings.catalogue.tables {
        let target = if row.kind == kind::RESYNC {
            snapshot::stage_table(t)
        } else {
            hq::mirror_table(t)
        };
        // An initial load runs while the cursor is NULL: all the location's rows are its own.
        let guard = if row.kind == kind::RESYNC {
            ""
        } else {
            " AND NOT EXISTS (SELECT 1 FROM sync.locations WHERE id = $1 AND cursor IS NOT NULL)"
        };
        if row.kind == kind::RESYNC {
            for s in snapshot::create_stage_table(t) {
                sqlx::query(&s).execute(&mut *tx).await?;
            }
        }
        sqlx::query(&format!(
            "DELETE FROM {target} WHERE location_id = $1{guard}"
        ))
        .bind(location)
        .execute(&mut *tx)
        .await?;
    }
    if row.kind == kind::RESYNC {
        fsnap::clear_stage(&mut tx, location).await?;
    } else {
        crate::partitions::drop_load_tables(&mut tx, &app.settings.catalogue, location).await?;
        sqlx::query(
            "DELETE FROM sync.files WHERE location_id = $1 AND NOT EXISTS \
             (SELECT 1 FROM sync.locations WHERE id = $1 AND cursor IS NOT NULL)",
        )
        .bind(location)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM sync.loads WHERE location_id = $1")
        .bind(location)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The initial load of a location whose cursor is NULL (resumes a crashed one).
pub async fn initial(app: &App, loc: &Location) -> Result<Loaded> {
    let row = match load_row(&app.pool, &loc.id).await? {
        Some(r) if r.kind == kind::INITIAL => {
            // Still the same branch database? Otherwise start over.
            let client = app.client(&loc.id)?;
            let now = client.snapshot_start().await?;
            if now.instance_id != r.instance_id {
                tracing::warn!(location = %loc.id, was = %r.instance_id, now = %now.instance_id, "branch instance changed during the initial load: starting over");
                discard(app, &loc.id, &r).await?;
                match begin(app, loc, kind::INITIAL).await? {
                    Some(r) => r,
                    None => return Ok(Loaded::Unsupported),
                }
            } else {
                tracing::info!(location = %loc.id, table = ?r.table_name, rows = r.rows_loaded, "resuming initial load");
                r
            }
        }
        Some(r) => {
            return Err(Error::Other(format!(
                "a {} of location {} is in progress (sync.loads)",
                r.kind, loc.id
            )))
        }
        None => match begin(app, loc, kind::INITIAL).await? {
            Some(r) => r,
            None => return Ok(Loaded::Unsupported),
        },
    };
    set_loading(&app.pool, &loc.id, "initial load running").await?;
    let mut targets = Vec::new();
    let mut attach = Vec::new();
    let mut c = app.pool.acquire().await?;
    for t in &app.settings.catalogue.tables {
        if crate::partitions::loads_apart(&mut c, t, &loc.id).await? {
            for s in hq::create_load_table(t, &loc.id) {
                sqlx::query(&s).execute(&mut *c).await?;
            }
            targets.push(hq::load_table(t, &loc.id));
            attach.push(t);
        } else {
            targets.push(hq::mirror_table(t));
        }
    }
    drop(c);
    let mut at = Position::of(&row);
    let Some(rows) = load_all(app, loc, &row, &mut at, &targets, "load").await? else {
        return Ok(Loaded::Interrupted);
    };
    let mut tx = app.pool.begin().await?;
    expect_position(&mut tx, &loc.id, &row, &at).await?;
    let stored: Option<String> =
        sqlx::query_scalar("SELECT cursor FROM sync.locations WHERE id = $1 FOR UPDATE")
            .bind(&loc.id)
            .fetch_one(&mut *tx)
            .await?;
    if stored.is_none() {
        let started = std::time::Instant::now();
        for t in &attach {
            crate::partitions::attach(&mut tx, t, &loc.id).await?;
        }
        if !attach.is_empty() {
            tracing::info!(location = %loc.id, tables = attach.len(), seconds = started.elapsed().as_secs_f64(), "loaded tables keyed and attached as the location's partitions");
        }
        sqlx::query(
            "UPDATE sync.locations SET cursor = $2, instance_id = $3, state = 'ok', \
             paused_reason = NULL, snapshot_cursor = $2, last_success_at = now(), updated_at = now() WHERE id = $1",
        )
        .bind(&loc.id)
        .bind(row.start.to_string())
        .bind(row.instance_id)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM sync.loads WHERE location_id = $1")
        .bind(&loc.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    m::set_state(&loc.id, state::OK);
    tracing::info!(location = %loc.id, rows, start_tick = row.start.tick, "initial load done, streaming from its start");
    Ok(Loaded::Done {
        start: row.start,
        rows,
    })
}

/// `hq-puller resync LOCATION`: reload the snapshot into staging, then switch in one
/// transaction. Records a run in `sync.runs`.
pub async fn resync(app: &App, loc: &Location) -> Result<Loaded> {
    let before = store::load_location(&app.pool, &loc.id).await?;
    let run_id = store::start_run(&app.pool, &loc.id, before.cursor.as_ref()).await?;
    let result = resync_inner(app, loc).await;
    let mut totals = store::RunTotals::default();
    let (outcome, err, after) = match &result {
        Ok(Loaded::Done { start, rows }) => {
            totals.changes = *rows as i64;
            ("ok", None, Some(*start))
        }
        Ok(Loaded::Interrupted) => ("interrupted", None, None),
        Ok(Loaded::Unsupported) => (
            "failed",
            Some("the listener has no snapshot endpoint".to_string()),
            None,
        ),
        Err(e) => ("failed", Some(format!("resync: {e}")), None),
    };
    store::finish_run(
        &app.pool,
        run_id,
        &totals,
        after.as_ref(),
        outcome,
        err.as_deref(),
    )
    .await?;
    result
}

async fn resync_inner(app: &App, loc: &Location) -> Result<Loaded> {
    for t in &app.settings.catalogue.tables {
        for s in snapshot::create_stage_table(t) {
            sqlx::query(&s).execute(&app.pool).await?;
        }
    }
    let row = match load_row(&app.pool, &loc.id).await? {
        Some(r) if r.kind == kind::RESYNC => {
            let now = app.client(&loc.id)?.snapshot_start().await?;
            if now.instance_id != r.instance_id {
                discard(app, &loc.id, &r).await?;
                None
            } else {
                tracing::info!(location = %loc.id, table = ?r.table_name, rows = r.rows_loaded, "resuming resync");
                Some(r)
            }
        }
        Some(r) => {
            discard(app, &loc.id, &r).await?;
            None
        }
        None => None,
    };
    let row = match row {
        Some(r) => r,
        None => {
            // A fresh staging area for this location.
            for t in &app.settings.catalogue.tables {
                sqlx::query(&format!(
                    "DELETE FROM {} WHERE location_id = $1",
                    snapshot::stage_table(t)
                ))
                .bind(&loc.id)
                .execute(&app.pool)
                .await?;
            }
            let mut c = app.pool.acquire().await?;
            fsnap::clear_stage(&mut c, &loc.id).await?;
            drop(c);
            match begin(app, loc, kind::RESYNC).await? {
                Some(r) => r,
                None => return Ok(Loaded::Unsupported),
            }
        }
    };
    set_loading(&app.pool, &loc.id, "resync running").await?;
    let mut at = Position::of(&row);
    let stages: Vec<String> = app
        .settings
        .catalogue
        .tables
        .iter()
        .map(snapshot::stage_table)
        .collect();
    let Some(rows) = load_all(app, loc, &row, &mut at, &stages, "resync").await? else {
        return Ok(Loaded::Interrupted);
    };
    // The switch: one transaction, into the location's partitions.
    crate::partitions::ensure(&app.pool, &app.settings.catalogue, &loc.id).await?;
    let mut tx = app.pool.begin().await?;
    expect_position(&mut tx, &loc.id, &row, &at).await?;
    sqlx::query("SELECT 1 FROM sync.locations WHERE id = $1 FOR UPDATE")
        .bind(&loc.id)
        .execute(&mut *tx)
        .await?;
    for t in &app.settings.catalogue.tables {
        for s in snapshot::switch_from_stage(t) {
            sqlx::query(&s).bind(&loc.id).execute(&mut *tx).await?;
        }
    }
    let files_gone = fsnap::switch(&mut tx, &loc.id).await?;
    sqlx::query(
        "UPDATE sync.locations SET cursor = $2, instance_id = $3, state = 'ok', \
         paused_reason = NULL, snapshot_cursor = $2, last_success_at = now(), updated_at = now() WHERE id = $1",
    )
    .bind(&loc.id)
    .bind(row.start.to_string())
    .bind(row.instance_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM sync.loads WHERE location_id = $1")
        .bind(&loc.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    m::set_state(&loc.id, state::OK);
    tracing::info!(location = %loc.id, rows, files_gone, start_tick = row.start.tick, instance = %row.instance_id, "resync switched, streaming from its start");
    // Files absent at the branch: removed or archived now that the switch committed (a
    // crash here leaves stray files, swept by the next resync).
    let swept = fsnap::sweep(app, &loc.id, loc.file_delete).await?;
    if !swept.is_empty() {
        tracing::info!(location = %loc.id, files = swept.len(), mode = ?loc.file_delete, "files absent at the branch handled after resync");
    }
    Ok(Loaded::Done {
        start: row.start,
        rows,
    })
}

/// Fetches the pages of `table` from `after` on, in order, into `pages`, until a page
/// ends the table, a fetch fails (its error is the last item) or the receiver is gone.
async fn fetch_ahead(
    client: crate::client::Client,
    table: String,
    mut after: Option<String>,
    rows: u32,
    pages: tokio::sync::mpsc::Sender<Result<SnapshotPage>>,
) {
    loop {
        let page = client
            .snapshot_page(&table, after.as_deref(), rows, true)
            .await
            .map(|(page, _bytes)| page);
        after = match &page {
            Ok(p) => p.next_after.as_ref().map(|k| k.get().to_string()),
            Err(_) => None,
        };
        if pages.send(page).await.is_err() || after.is_none() {
            return;
        }
    }
}

/// Loads every catalogue table (into `targets`, one per catalogue table), then the file
/// index, moving `at` along with each committed page. Returns the rows loaded by this
/// call, or `None` when interrupted by shutdown.
async fn load_all(
    app: &App,
    loc: &Location,
    row: &LoadRow,
    at: &mut Position,
    targets: &[String],
    what: &'static str,
) -> Result<Option<u64>> {
    let Some(rows) = load_pages(app, loc, row, at, targets, what).await? else {
        return Ok(None);
    };
    let Some(files) = load_files(app, loc, row, at).await? else {
        return Ok(None);
    };
    Ok(Some(rows + files))
}

/// Loads every table from where `row` stands into `targets` (one per catalogue table).
/// Returns the rows loaded by this call, or `None` when interrupted by shutdown.
async fn load_pages(
    app: &App,
    loc: &Location,
    row: &LoadRow,
    at: &mut Position,
    targets: &[String],
    what: &'static str,
) -> Result<Option<u64>> {
    let client = app.client(&loc.id)?.clone();
    let tables = &app.settings.catalogue.tables;
    let first = match &row.table_name {
        Some(name) if name == "(done)" || name == FILES_TABLE || name == fsnap::FILES_DONE => {
            tables.len()
        }
        Some(name) => tables.iter().position(|t| &t.name == name).ok_or_else(|| {
            Error::permanent(format!(
                "sync.loads of {}: table {name} is not in the catalogue",
                loc.id
            ))
        })?,
        None => 0,
    };
    let page_rows = app.settings.snapshot_page_rows;
    let mut progress = Progress::new(&loc.id, what);
    for (ti, table) in tables.iter().enumerate().skip(first) {
        let upserts = Upserts::new(table, &targets[ti]);
        let after = if ti == first {
            row.last_key.clone()
        } else {
            None
        };
        // The pages are fetched ahead by their own task (each page's `after` is the
        // previous page's last key), so the listener and the branch work while HQ
        // inserts.
        let (tx_pages, mut pages) = tokio::sync::mpsc::channel(PAGES_FETCHED_AHEAD);
        let mut next = Some(tokio::spawn(fetch_ahead(
            client.clone(),
            table.name.clone(),
            after,
            page_rows,
            tx_pages,
        )));
        // Pages in flight: their rows are being inserted, each in its own open
        // transaction; they commit strictly in page order, each with the progress up to
        // its own last key, so a crash never records a page whose predecessors are not
        // committed.
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        loop {
            let fetched = match next.as_mut() {
                Some(task) => match pages.recv().await {
                    Some(page) => Some(page.and_then(|page| {
                        check_page(&page, loc, row, table)?;
                        Ok(page)
                    })),
                    // The fetcher ended. It ends by itself only after sending a page
                    // without `next_after` (the last) or an error; a task that died
                    // (panicked) is an error, not the end of the table.
                    None => {
                        let ended = task
                            .await
                            .map_err(|e| Error::Other(format!("snapshot fetch task: {e}")));
                        next = None;
                        ended.err().map(Err)
                    }
                },
                None => None,
            };
            match fetched {
                Some(Ok(page)) => {
                    let next_after = page.next_after.as_ref().map(|k| k.get().to_string());
                    let (rows, data) = match page.copy {
                        Some(copy) => (copy.rows, Some(PageRows::Copy(copy))),
                        None => (
                            page.rows.len() as u64,
                            (!page.rows.is_empty()).then(|| {
                                PageRows::Json(crate::apply::images_json(
                                    page.rows.iter().map(|r| (r.get(), 0, false)),
                                ))
                            }),
                        ),
                    };
                    inflight.push_back(InFlight {
                        insert: tokio::spawn(insert_page(
                            app.pool.clone(),
                            row.time_zone.clone(),
                            upserts.clone(),
                            loc.id.clone(),
                            table.name.clone(),
                            data,
                        )),
                        rows,
                        next_after,
                    });
                }
                Some(Err(e)) => {
                    abort_all(&mut next, &mut inflight);
                    return Err(e);
                }
                None => {}
            }
            let drain_all = next.is_none();
            while inflight.len() >= PAGES_IN_FLIGHT || (drain_all && !inflight.is_empty()) {
                let f = inflight.pop_front().expect("not empty");
                let committed = match f.insert.await {
                    Ok(Ok(tx)) => {
                        commit_page(app, loc, row, at, table, tx, f.rows, f.next_after).await
                    }
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(Error::Other(format!("snapshot insert task: {e}"))),
                };
                if let Err(e) = committed {
                    abort_all(&mut next, &mut inflight);
                    return Err(e);
                }
                metrics::counter!(m::LOADED_ROWS, "location" => loc.id.clone()).increment(f.rows);
                progress.inc(f.rows, &table.name);
                if app.shutdown.is_cancelled() {
                    abort_all(&mut next, &mut inflight);
                    progress.finish();
                    tracing::info!(location = %loc.id, table = %table.name, "load interrupted by shutdown, resumes at the next run");
                    return Ok(None);
                }
            }
            if next.is_none() && inflight.is_empty() {
                break;
            }
        }
    }
    progress.finish();
    tracing::info!(
        location = %loc.id,
        what,
        rows = progress.rows(),
        seconds = progress.elapsed().as_secs_f64(),
        rows_per_s = progress.rate() as u64,
        "snapshot loaded"
    );
    Ok(Some(progress.rows()))
}

fn check_page(page: &SnapshotPage, loc: &Location, row: &LoadRow, table: &Table) -> Result<()> {
    if page.instance_id != row.instance_id {
        return Err(Error::transient(format!(
            "branch instance changed during the {} (was {}, now {}): it restarts at the next run",
            row.kind, row.instance_id, page.instance_id
        )));
    }
    if page.location != loc.id || page.table != table.name {
        return Err(Error::permanent(format!(
            "listener answered a snapshot page of {}/{} for {}/{}",
            page.location, page.table, loc.id, table.name
        )));
    }
    if let Some(copy) = &page.copy {
        if !page.rows.is_empty() {
            return Err(Error::permanent(format!(
                "snapshot page of {} holds both JSON rows and COPY text",
                table.name
            )));
        }
        check_copy(copy, table)?;
    }
    for r in &page.rows {
        let s = r.get().trim();
        if s.len() < 2 || !s.starts_with('{') || !s.ends_with('}') {
            return Err(Error::permanent(format!(
                "snapshot page of {} holds a row that is not a JSON object",
                table.name
            )));
        }
    }
    Ok(())
}

/// A `COPY` text page must name catalogue columns of `table` (each once, the key among
/// them) and hold no rows besides: its lines are copied by these names, so a branch
/// whose column order differs still lands each value in its column.
fn check_copy(copy: &schemas::wire::CopyRows, table: &Table) -> Result<()> {
    if table.name == FILES_TABLE {
        return Err(Error::permanent(
            "listener answered the _files snapshot page as COPY text (only JSON rows are valid there)"
                .to_string(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for c in &copy.columns {
        if table.column(c).is_none() || !seen.insert(c.as_str()) {
            return Err(Error::permanent(format!(
                "snapshot page of {} in COPY text names column {:?} twice or not in the catalogue",
                table.name,
                c.chars().take(64).collect::<String>()
            )));
        }
    }
    if let Some(k) = table
        .primary_key
        .iter()
        .find(|k| !seen.contains(k.as_str()))
    {
        return Err(Error::permanent(format!(
            "snapshot page of {} in COPY text lacks key column {k}",
            table.name
        )));
    }
    Ok(())
}

/// A table's load statements: the upsert (and plain insert) of JSON images, and the
/// temporary table and upsert (and plain insert) of a page copied in as `COPY` text.
#[derive(Clone)]
struct Upserts {
    json: String,
    json_insert: String,
    copied: String,
    copied_insert: String,
    create_page: String,
    /// The target table and its catalogue table (for [`crate::copy_page`]).
    target: String,
    table: Table,
}

impl Upserts {
    /// The statements loading `table` into `target`.
    fn new(table: &Table, target: &str) -> Upserts {
        Upserts {
            json: hq::upsert_into(table, target),
            json_insert: hq::insert_into(table, target),
            copied: hq::upsert_from_load_page(table, target),
            copied_insert: hq::insert_from_load_page(table, target),
            create_page: hq::create_load_page(table),
            target: target.to_string(),
            table: table.clone(),
        }
    }
}

/// A COPY page must hold as many lines as the listener counted in it.
fn check_copied(table: &str, copied: u64, expected: u64) -> Result<()> {
    if copied != expected {
        return Err(Error::permanent(format!(
            "snapshot page of {table} in COPY text holds {copied} lines, the listener said {expected}"
        )));
    }
    Ok(())
}

/// Runs a page's plain insert (`insert`, half the cost of the upsert) in a savepoint;
/// when the target already holds one of the page's keys (`unique_violation`: a page
/// loaded again after its progress was lost, rows left by another process), rolls the
/// savepoint back and runs the guarded upsert instead, so the outcome is the upsert's
/// in every case.
async fn insert_or_upsert(
    tx: &mut sqlx::PgConnection,
    insert: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    upsert: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> std::result::Result<(), sqlx::Error> {
    sqlx::query("SAVEPOINT hq_load_page")
        .execute(&mut *tx)
        .await?;
    match insert.execute(&mut *tx).await {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
            sqlx::query("ROLLBACK TO SAVEPOINT hq_load_page")
                .execute(&mut *tx)
                .await?;
            upsert.execute(&mut *tx).await?;
        }
        Err(e) => return Err(e),
    }
    sqlx::query("RELEASE SAVEPOINT hq_load_page")
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// A page's rows as sent to HQ's database.
enum PageRows {
    /// The JSON array of images (with `_seq` 0, `_deleted` false) for `json_to_recordset`.
    Json(String),
    /// `COPY` text, copied into [`hq::LOAD_PAGE`] then upserted from there.
    Copy(schemas::wire::CopyRows),
}

/// Pages whose rows are inserted concurrently (each in its own transaction) while the
/// oldest one commits. Two backends inserting into the same primary key at once cost
/// HQ more CPU than one after the other (each loses the B-tree's rightmost-leaf fast
/// path: 3.7 against 2.2 CPU-seconds per million rows on the benchmark machine), but
/// use both cores: the load is faster with two than with one taking turns (2.7 s
/// against 3.2 s for 1,000,000 rows).
const PAGES_IN_FLIGHT: usize = 2;

/// Pages fetched ahead of the inserts.
const PAGES_FETCHED_AHEAD: usize = 1;

/// A page being inserted.
struct InFlight {
    insert: tokio::task::JoinHandle<Result<sqlx::Transaction<'static, sqlx::Postgres>>>,
    rows: u64,
    next_after: Option<String>,
}

fn abort_all(next: &mut Option<tokio::task::JoinHandle<()>>, inflight: &mut VecDeque<InFlight>) {
    if let Some(t) = next.take() {
        t.abort();
    }
    // Aborted inserts drop their transactions: rolled back.
    for f in inflight.drain(..) {
        f.insert.abort();
    }
}

/// Inserts one page's rows in a new transaction, left open for [`commit_page`].
async fn insert_page(
    pool: PgPool,
    time_zone: String,
    upserts: Upserts,
    location: String,
    table: String,
    rows: Option<PageRows>,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let db_error = |e: sqlx::Error| {
        let msg = format!("loading table {table}: {e}");
        // The load's own table, made at the start of this run, is gone: HQ's database
        // lost its latest commits in a crash (`synchronous_commit = off`), and with them
        // every later page. The next run makes it again and resumes from the stored
        // progress, which lost the same suffix.
        let undefined =
            matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01"));
        if undefined && upserts.target.starts_with("hq_load.") {
            return Error::transient(format!(
                "{msg} (HQ's database lost recent commits in a crash?): the load resumes from its stored progress"
            ));
        }
        match crate::error::db_error_kind(&e) {
            crate::ErrorKind::Transient => Error::transient(msg),
            _ => Error::permanent(msg),
        }
    };
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('TimeZone', $1, true)")
        .bind(&time_zone)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            Error::permanent(format!(
                "branch time_zone {time_zone:?} is not a zone PostgreSQL knows: {e}"
            ))
        })?;
    match rows {
        None => {}
        Some(PageRows::Json(json)) => {
            insert_or_upsert(
                &mut tx,
                sqlx::query(&upserts.json_insert)
                    .bind(&json)
                    .bind(&location),
                sqlx::query(&upserts.json).bind(&json).bind(&location),
            )
            .await
            .map_err(db_error)?;
        }
        Some(PageRows::Copy(copy)) => {
            // Straight into the target when that gives the same rows (no blob, every
            // numeric fits); on a key already present, the checked way below.
            if let Some(text) = crate::copy_page::direct_text(&upserts.table, &copy, &location) {
                sqlx::query("SAVEPOINT hq_load_page")
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                let mut sink = tx
                    .copy_in_raw(&crate::copy_page::statement(&upserts.target, &copy.columns))
                    .await
                    .map_err(db_error)?;
                sink.send(text).await.map_err(db_error)?;
                match sink.finish().await {
                    Ok(copied) => {
                        check_copied(&table, copied, copy.rows)?;
                        sqlx::query("RELEASE SAVEPOINT hq_load_page")
                            .execute(&mut *tx)
                            .await
                            .map_err(db_error)?;
                        return Ok(tx);
                    }
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                        sqlx::query("ROLLBACK TO SAVEPOINT hq_load_page")
                            .execute(&mut *tx)
                            .await
                            .map_err(db_error)?;
                    }
                    Err(e) => return Err(db_error(e)),
                }
            }
            sqlx::query(&upserts.create_page)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            let cols: Vec<String> = copy.columns.iter().map(|c| schemas::sql::q(c)).collect();
            let mut sink = tx
                .copy_in_raw(&format!(
                    "COPY {} ({}) FROM STDIN",
                    hq::LOAD_PAGE,
                    cols.join(", ")
                ))
                .await
                .map_err(db_error)?;
            sink.send(copy.text.into_bytes()).await.map_err(db_error)?;
            check_copied(&table, sink.finish().await.map_err(db_error)?, copy.rows)?;
            insert_or_upsert(
                &mut tx,
                sqlx::query(&upserts.copied_insert).bind(&location),
                sqlx::query(&upserts.copied).bind(&location),
            )
            .await
            .map_err(db_error)?;
        }
    }
    Ok(tx)
}

/// Records the progress up to this page's last key and commits its transaction.
#[allow(clippy::too_many_arguments)]
async fn commit_page(
    app: &App,
    loc: &Location,
    row: &LoadRow,
    at: &mut Position,
    table: &Table,
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    rows: u64,
    next_after: Option<String>,
) -> Result<()> {
    let to = match next_after {
        Some(k) => Position {
            table: Some(table.name.clone()),
            key: Some(k),
        },
        // Done with this table: the next one starts at its beginning.
        None => {
            let tables = &app.settings.catalogue.tables;
            let i = tables
                .iter()
                .position(|t| t.name == table.name)
                .unwrap_or(0);
            Position {
                table: Some(
                    tables
                        .get(i + 1)
                        .map_or("(done)", |t| t.name.as_str())
                        .to_string(),
                ),
                key: None,
            }
        }
    };
    advance(&mut tx, &loc.id, row, at, &to, rows).await?;
    tx.commit().await?;
    *at = to;
    Ok(())
}

/// In-process retries of a `_files` page whose downloads failed transiently.
const PAGE_FILE_RETRIES: u32 = 120;

/// Loads the `_files` pages (files already in the branch's folder) after the catalogue
/// tables, from where `row` stands: initial load places and records them in each page's
/// transaction, resync places them and stages the index rows (see
/// [`crate::files::snapshot`]). Returns the files loaded, `None` when interrupted.
async fn load_files(
    app: &App,
    loc: &Location,
    row: &LoadRow,
    at: &mut Position,
) -> Result<Option<u64>> {
    let mut after = match row.table_name.as_deref() {
        Some(fsnap::FILES_DONE) => return Ok(Some(0)),
        Some(FILES_TABLE) => row.last_key.clone(),
        _ => None,
    };
    let client = app.client(&loc.id)?.clone();
    let files_table = schemas::catalogue::files_table();
    let mut n_files = 0u64;
    loop {
        let (page, _) = client
            .snapshot_page(
                FILES_TABLE,
                after.as_deref(),
                app.settings.snapshot_page_rows,
                false,
            )
            .await?;
        check_page(&page, loc, row, &files_table)?;
        let next_after = page.next_after.as_ref().map(|k| k.get().to_string());
        // All of the page's file I/O before its transaction commits.
        // A transient failure (a listener rate-limiting thousands of downloads) retries
        // the page here: contents already stored are not fetched again.
        let mut attempt = 0u32;
        let plan = loop {
            match fsnap::prepare_page(app, &loc.id, &page).await {
                Ok(p) => break p,
                Err(e)
                    if e.kind() == crate::ErrorKind::Transient
                        && attempt < PAGE_FILE_RETRIES
                        && !app.shutdown.is_cancelled() =>
                {
                    attempt += 1;
                    tracing::warn!(location = %loc.id, attempt, error = %e, "downloading the files of a snapshot page failed, retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        };
        if row.kind == kind::RESYNC {
            fsnap::place_page(&loc.id, &plan).await?;
        }
        let mut tx = app.pool.begin().await?;
        if row.kind == kind::RESYNC {
            fsnap::stage_page(&mut tx, &loc.id, &plan).await?;
        } else {
            crate::files::place_and_record(&mut tx, &loc.id, &plan).await?;
        }
        let to = Position {
            table: Some(
                if next_after.is_some() {
                    FILES_TABLE
                } else {
                    fsnap::FILES_DONE
                }
                .to_string(),
            ),
            key: next_after.clone(),
        };
        advance(&mut tx, &loc.id, row, at, &to, page.rows.len() as u64).await?;
        tx.commit().await?;
        *at = to;
        n_files += page.rows.len() as u64;
        tracing::debug!(location = %loc.id, files = page.rows.len(), "snapshot page of _files loaded");
        after = next_after;
        if after.is_none() {
            break;
        }
        if app.shutdown.is_cancelled() {
            tracing::info!(location = %loc.id, "file load interrupted by shutdown, resumes at the next run");
            return Ok(None);
        }
    }
    if n_files > 0 {
        tracing::info!(location = %loc.id, kind = %row.kind, files = n_files, "files of the snapshot loaded");
    }
    Ok(Some(n_files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::wire::CopyRows;

    fn copy_page(text: &str) -> PageRows {
        PageRows::Copy(CopyRows {
            columns: ["product_id", "sku", "unit_price", "updated_at"]
                .map(String::from)
                .to_vec(),
            rows: text.lines().count() as u64,
            text: text.into(),
        })
    }

    /// `(product_id, sku, unit_price, updated_at in UTC, _seq)`.
    type Loaded = (i64, Option<String>, Option<String>, String, i64);

    async fn load(pool: &PgPool, table: &Table, rows: PageRows) -> Result<()> {
        let tx = insert_page(
            pool.clone(),
            "Europe/Berlin".into(),
            Upserts::new(table, &hq::mirror_table(table)),
            "b01".into(),
            table.name.clone(),
            Some(rows),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A COPY page lands with the upsert's conversions: exact numerics, instants, NULLs,
    /// escapes; a numeric that does not fit is refused, not rounded; a page meeting keys
    /// already present falls back to the guarded upsert (a newer row is kept); a line
    /// count different from the listener's fails the page.
    #[tokio::test]
    async fn copy_pages_insert_with_the_upserts_checks() {
        let url = ::tests::pg::fresh_database("hqp_copy").await.unwrap();
        let pool = PgPool::connect(&url).await.unwrap();
        schemas::migrations::MIGRATOR.run(&pool).await.unwrap();
        let cat = schemas::Catalogue::product_management();
        for s in hq::create_mirror_tables(&cat) {
            sqlx::query(&s).execute(&pool).await.unwrap();
        }
        crate::partitions::ensure(&pool, &cat, "b01").await.unwrap();
        let t = cat.table("products").unwrap();
        load(
            &pool,
            t,
            copy_page(
                "1\tA\\tB\\\\c\t19.90\t2026-03-29 02:30:00+02\n2\t\\N\t\\N\t2026-01-01 00:00:00\n",
            ),
        )
        .await
        .unwrap();
        let rows: Vec<Loaded> = sqlx::query_as(
            "SELECT product_id, sku, unit_price::text, to_char(updated_at AT TIME ZONE 'UTC', \
             'YYYY-MM-DD HH24:MI'), _seq FROM hq.products ORDER BY product_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(
            rows,
            vec![
                (
                    1,
                    Some("A\tB\\c".into()),
                    Some("19.90".into()),
                    "2026-03-29 00:30".into(),
                    0
                ),
                // Zone-less: read in the branch's zone.
                (2, None, None, "2025-12-31 23:00".into(), 0),
            ]
        );

        let e = load(&pool, t, copy_page("3\tx\t1.505\t\\N\n"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit numeric(12,2)"), "{e}");

        // Key 1 exists with a streamed change (seq 5): the page's row loses; key 4 is new.
        sqlx::query("UPDATE hq.products SET sku = 'streamed', _seq = 5 WHERE product_id = 1")
            .execute(&pool)
            .await
            .unwrap();
        load(&pool, t, copy_page("1\told\t1\t\\N\n4\tnew\t2\t\\N\n"))
            .await
            .unwrap();
        let skus: Vec<String> =
            sqlx::query_scalar("SELECT sku FROM hq.products WHERE sku IS NOT NULL ORDER BY 1")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(skus, vec!["new", "streamed"]);

        let mut short = copy_page("5\ty\t1\t\\N\n");
        if let PageRows::Copy(c) = &mut short {
            c.rows = 2;
        }
        let e = load(&pool, t, short).await.unwrap_err().to_string();
        assert!(e.contains("holds 1 lines, the listener said 2"), "{e}");
    }
}
