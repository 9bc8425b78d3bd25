//! The job store: one SQLite file with a `jobs` table (the newest state of each job, its spec as JSON)
//! and an `events` table (every event, protobuf-encoded, in order).

use std::path::Path;

use ferrotune_proto::v1::{job_event, Artifact, Job, JobEvent, JobState, Progress};
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension};

use super::now_ms;

/// A job's stored row: the protobuf view plus what only the runner needs.
#[derive(Debug, Clone)]
pub struct StoredJob {
    /// The job as served.
    pub job: Job,
    /// The runner's spec (JSON).
    pub spec: serde_json::Value,
}

/// The SQLite job store.
pub struct Store {
    db: Connection,
    /// `<db>.lock`, exclusively locked (flock) while this store is open: one serving process per store.
    _lock: std::fs::File,
}

/// Takes the store's lock file, or says which process holds it.
fn lock(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let lock_path = path.with_extension("lock");
    let mut f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| anyhow::anyhow!("job store lock {}: {e}", lock_path.display()))?;
    // SAFETY: a valid descriptor; flock only changes the lock state of its open file description.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        anyhow::bail!(
            "job store {} is in use by another ferrotune server (pid {}); each server needs its own job store \
             (jobs.db) or artifact root",
            path.display(),
            holder.trim()
        );
    }
    f.set_len(0)?;
    f.rewind()?;
    write!(f, "{}", std::process::id())?;
    Ok(f)
}

impl Store {
    /// Opens (creating) the store at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("job store {}: {e}", dir.display()))?;
        }
        let lock = lock(path)?;
        let db = Connection::open(path).map_err(|e| anyhow::anyhow!("job store {}: {e}", path.display()))?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS jobs (
               id TEXT PRIMARY KEY, kind TEXT NOT NULL, state INTEGER NOT NULL,
               created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
               spec TEXT NOT NULL, output_dir TEXT NOT NULL, error TEXT NOT NULL DEFAULT '',
               artifacts BLOB, progress BLOB, resumes INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS events (
               job_id TEXT NOT NULL, seq INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (job_id, seq));",
        )
        .map_err(|e| anyhow::anyhow!("job store {}: {e}", path.display()))?;
        // Stores written before failures carried their code gain the column (0: not failed, or unknown).
        let has_code = db
            .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'error_code'")
            .and_then(|mut s| s.exists([]))
            .map_err(|e| anyhow::anyhow!("job store {}: {e}", path.display()))?;
        if !has_code {
            db.execute_batch("ALTER TABLE jobs ADD COLUMN error_code INTEGER NOT NULL DEFAULT 0;")
                .map_err(|e| anyhow::anyhow!("job store {}: {e}", path.display()))?;
        }
        Ok(Self { db, _lock: lock })
    }

    /// Inserts a new job.
    pub fn insert(&self, job: &Job, spec: &serde_json::Value) -> rusqlite::Result<()> {
        self.db.execute(
            "INSERT INTO jobs (id, kind, state, created_ms, updated_ms, spec, output_dir) VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6)",
            params![job.id, job.kind, job.state, job.created_ms, spec.to_string(), job.output_dir],
        )?;
        Ok(())
    }

    /// One job.
    pub fn get(&self, id: &str) -> rusqlite::Result<Option<StoredJob>> {
        self.db.query_row(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"), params![id], row_to_job).optional()
    }

    /// Jobs, newest first.
    pub fn list(&self, states: &[JobState], limit: usize) -> rusqlite::Result<Vec<StoredJob>> {
        let mut stmt = self.db.prepare(&format!("SELECT {COLUMNS} FROM jobs ORDER BY created_ms DESC, id DESC"))?;
        let rows = stmt.query_map([], row_to_job)?;
        let mut out = vec![];
        for r in rows {
            let r = r?;
            if states.is_empty() || states.contains(&r.job.state()) {
                out.push(r);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// How many jobs of each (kind, state).
    pub fn counts(&self) -> rusqlite::Result<Vec<(String, JobState, u64)>> {
        let mut stmt =
            self.db.prepare("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state ORDER BY kind, state")?;
        let rows = stmt.query_map([], |r| {
            let state: i32 = r.get(1)?;
            Ok((
                r.get::<_, String>(0)?,
                JobState::try_from(state).unwrap_or(JobState::Unspecified),
                r.get::<_, i64>(2)? as u64,
            ))
        })?;
        rows.collect()
    }

    /// Appends an event (its seq must be the next one) and folds it into the job row.
    pub fn append(&self, ev: &JobEvent) -> rusqlite::Result<()> {
        let tx = self.db.unchecked_transaction()?;
        tx.execute(
            "INSERT INTO events (job_id, seq, body) VALUES (?1, ?2, ?3)",
            params![ev.job_id, ev.seq as i64, ev.encode_to_vec()],
        )?;
        match &ev.body {
            Some(job_event::Body::Progress(p)) => {
                tx.execute(
                    "UPDATE jobs SET progress = ?2, updated_ms = ?3 WHERE id = ?1",
                    params![ev.job_id, p.encode_to_vec(), ev.time_ms],
                )?;
            }
            Some(job_event::Body::State(s)) => {
                let job = s.job.clone().unwrap_or_default();
                let artifacts = ArtifactList { items: job.artifacts.clone() }.encode_to_vec();
                tx.execute(
                    "UPDATE jobs SET state = ?2, updated_ms = ?3, error = ?4, artifacts = ?5, resumes = ?6, error_code = ?7 \
                     WHERE id = ?1",
                    params![ev.job_id, s.state, ev.time_ms, job.error, artifacts, job.resumes, job.error_code],
                )?;
            }
            _ => {}
        }
        tx.commit()
    }

    /// The last event seq of a job (0 when none).
    pub fn last_seq(&self, id: &str) -> rusqlite::Result<u64> {
        self.db
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?1", params![id], |r| {
                r.get::<_, i64>(0)
            })
            .map(|s| s as u64)
    }

    /// Events with seq > `after`, in order.
    pub fn events_after(&self, id: &str, after: u64) -> rusqlite::Result<Vec<JobEvent>> {
        let mut stmt = self.db.prepare("SELECT body FROM events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq")?;
        let rows = stmt.query_map(params![id, after as i64], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = vec![];
        for r in rows {
            out.push(
                JobEvent::decode(r?.as_slice()).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
            );
        }
        Ok(out)
    }

    /// Marks a job's state directly (used for jobs that are not running, e.g. cancelling a queued one).
    pub fn touch_state(&self, id: &str, state: JobState) -> rusqlite::Result<()> {
        self.db.execute(
            "UPDATE jobs SET state = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, state as i32, now_ms()],
        )?;
        Ok(())
    }
}

/// Encoded list of artifacts.
#[derive(Clone, PartialEq, prost::Message)]
struct ArtifactList {
    #[prost(message, repeated, tag = "1")]
    items: Vec<Artifact>,
}

const COLUMNS: &str =
    "id, kind, state, created_ms, updated_ms, spec, output_dir, error, artifacts, progress, resumes, error_code";

fn row_to_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredJob> {
    let spec: String = r.get(5)?;
    let artifacts: Option<Vec<u8>> = r.get(8)?;
    let progress: Option<Vec<u8>> = r.get(9)?;
    let job = Job {
        id: r.get(0)?,
        kind: r.get(1)?,
        state: r.get(2)?,
        created_ms: r.get(3)?,
        updated_ms: r.get(4)?,
        output_dir: r.get(6)?,
        error: r.get(7)?,
        artifacts: artifacts.and_then(|b| ArtifactList::decode(b.as_slice()).ok()).map(|l| l.items).unwrap_or_default(),
        progress: progress.and_then(|b| Progress::decode(b.as_slice()).ok()),
        resumes: r.get(10)?,
        error_code: r.get(11)?,
    };
    Ok(StoredJob { job, spec: serde_json::from_str(&spec).unwrap_or(serde_json::Value::Null) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_per_store() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("jobs.sqlite");
        let first = Store::open(&db).unwrap();
        let e = Store::open(&db).err().expect("a second owner is refused").to_string();
        assert!(e.contains("in use by another ferrotune server") && e.contains(&std::process::id().to_string()), "{e}");
        drop(first);
        Store::open(&db).expect("free again once the first owner is gone");
    }

    #[test]
    fn a_store_of_an_older_version_gains_the_error_code_column() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("jobs.sqlite");
        let old = Connection::open(&db).unwrap();
        old.execute_batch(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, state INTEGER NOT NULL,
               created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, spec TEXT NOT NULL, output_dir TEXT NOT NULL,
               error TEXT NOT NULL DEFAULT '', artifacts BLOB, progress BLOB, resumes INTEGER NOT NULL DEFAULT 0);
             INSERT INTO jobs (id, kind, state, created_ms, updated_ms, spec, output_dir, error)
               VALUES ('j', 'sft', 5, 1, 1, '{}', '/o', 'boom');",
        )
        .unwrap();
        drop(old);
        let s = Store::open(&db).unwrap();
        let j = s.get("j").unwrap().unwrap().job;
        assert_eq!((j.error.as_str(), j.error_code), ("boom", 0));
        drop(s);
        Store::open(&db).expect("opening again does not add the column twice");
    }
}
