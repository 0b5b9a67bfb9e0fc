//! The gallery: what the app keeps of each upload. Thumbnails are files under the app's storage
//! directory (`THUMBS_DATA`), one row each in its database (`DATABASE_URL`: SQLite in that
//! directory by default, Postgres when it says so). `main` opens it in the parent and in every
//! runner and `flame::provide`s it, so the thumbnails task writes through the runner's own pool,
//! as any code of the app would.
//!
//! A video is kept whole or not at all: its thumbnails are written to a staging directory as they
//! are made, and only when ffmpeg is done does the task move them into place and insert every
//! row in one transaction. A cancelled call (the page closed) drops the task, and dropping the
//! staging removes its files: no rows, no files.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

/// The app's database pool and storage directory.
pub(crate) struct Gallery {
    db: AnyPool,
    dir: PathBuf,
}

/// One upload, as the caller names it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Upload {
    /// Made by the parent: letters, digits and `-` only, as it names a directory.
    pub(crate) id: String,
    /// The file's name in the browser.
    pub(crate) name: String,
}

/// A video of the gallery, newest first in [`Gallery::recent`].
#[derive(Debug, Serialize)]
pub(crate) struct Video {
    id: String,
    name: String,
    runner: String,
    created_ms: i64,
    thumbnails: Vec<Thumbnail>,
}

#[derive(Debug, Serialize)]
struct Thumbnail {
    index: i64,
    runner: String,
    size: i64,
    url: String,
}

impl Gallery {
    /// Opens the gallery the environment names; the parent (`migrate`) also brings its schema
    /// up to date, before any runner exists.
    pub(crate) async fn open(migrate: bool) -> anyhow::Result<Gallery> {
        sqlx::any::install_default_drivers();
        let dir = PathBuf::from(std::env::var("THUMBS_DATA").unwrap_or("thumbnails-data".into()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the storage directory {}", dir.display()))?;
        let url = match std::env::var("DATABASE_URL") {
            Ok(url) => url,
            Err(_) => format!("sqlite://{}?mode=rwc", dir.join("gallery.db").display()),
        };
        let db = AnyPoolOptions::new()
            .max_connections(4)
            // A database that is down says so in seconds, not sqlx's default 30.
            .acquire_timeout(std::time::Duration::from_secs(5))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // Runners write while the parent reads: SQLite's write-ahead log lets them.
                    if conn.backend_name() == "SQLite" {
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .with_context(|| {
                format!(
                    "opening the database {}: check DATABASE_URL (sqlite://... or postgres://...)",
                    redact(&url)
                )
            })?;
        if migrate {
            sqlx::migrate!("./migrations")
                .run(&db)
                .await
                .context("bringing the database's schema up to date")?;
        } else if let Err(e) = sqlx::query("SELECT 1 FROM videos LIMIT 1")
            .fetch_optional(&db)
            .await
        {
            // A runner with a database of its own would keep thumbnails where nobody finds them.
            anyhow::bail!(
                "the database {} has no gallery ({e}): runners must use the parent's database \
                 (DATABASE_URL) and storage directory (THUMBS_DATA); for runners on other hosts, \
                 a postgres:// DATABASE_URL and a shared THUMBS_DATA",
                redact(&url)
            );
        }
        Ok(Gallery { db, dir })
    }

    /// Where `upload`'s thumbnails go while they are made.
    pub(crate) fn stage(&self, upload: &Upload) -> Result<Staging, String> {
        if upload.id.is_empty()
            || !upload
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(format!("{:?} is no upload id", upload.id));
        }
        let dir = self.dir.join(".partial").join(&upload.id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(Staging {
            dir: Some(dir),
            files: Vec::new(),
        })
    }

    /// Keeps a finished upload: its files move into place and its rows go in, both or neither.
    pub(crate) async fn keep(
        &self,
        mut staging: Staging,
        upload: &Upload,
        runner: &str,
    ) -> Result<(), String> {
        let now = now_ms();
        let to = self.dir.join(&upload.id);
        let from = staging.dir.clone().expect("staging not yet kept");
        tokio::fs::rename(&from, &to)
            .await
            .map_err(|e| format!("moving {} into place: {e}", from.display()))?;
        // From here the files are at `to`: a failure or cancel below removes them there.
        staging.dir = Some(to);
        let mut tx = self.db.begin().await.map_err(|e| e.to_string())?;
        sqlx::query(
            "INSERT INTO videos (id, name, runner, thumbnails, created_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&upload.id)
        .bind(&upload.name)
        .bind(runner)
        .bind(staging.files.len() as i64)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
        for (index, size) in staging.files.iter().enumerate() {
            sqlx::query(
                "INSERT INTO thumbnails (video_id, idx, runner, path, size, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&upload.id)
            .bind(index as i64)
            .bind(runner)
            .bind(format!("{}/{index}.png", upload.id))
            .bind(*size as i64)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
        }
        tx.commit().await.map_err(|e| e.to_string())?;
        staging.dir = None;
        Ok(())
    }

    /// The newest `limit` videos with their thumbnails.
    pub(crate) async fn recent(&self, limit: i64) -> anyhow::Result<Vec<Video>> {
        let videos: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT id, name, runner, created_ms FROM videos ORDER BY created_ms DESC, id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.db)
        .await?;
        let mut out = Vec::with_capacity(videos.len());
        for (id, name, runner, created_ms) in videos {
            let thumbs: Vec<(i64, String, i64)> = sqlx::query_as(
                "SELECT idx, runner, size FROM thumbnails WHERE video_id = $1 ORDER BY idx",
            )
            .bind(&id)
            .fetch_all(&self.db)
            .await?;
            let thumbnails = thumbs
                .into_iter()
                .map(|(index, runner, size)| Thumbnail {
                    index,
                    runner,
                    size,
                    url: format!("/files/{id}/{index}"),
                })
                .collect();
            out.push(Video {
                id,
                name,
                runner,
                created_ms,
                thumbnails,
            });
        }
        Ok(out)
    }

    /// The PNG of thumbnail `index` of video `id`, if the gallery has it: only files the
    /// database lists are served.
    pub(crate) async fn file(&self, id: &str, index: i64) -> anyhow::Result<Option<Vec<u8>>> {
        let path: Option<(String,)> =
            sqlx::query_as("SELECT path FROM thumbnails WHERE video_id = $1 AND idx = $2")
                .bind(id)
                .bind(index)
                .fetch_optional(&self.db)
                .await?;
        match path {
            Some((path,)) => Ok(Some(tokio::fs::read(self.dir.join(path)).await?)),
            None => Ok(None),
        }
    }
}

/// The thumbnails of an upload not kept yet. Dropping it — the task failed, or was cancelled
/// with its call — removes them.
pub(crate) struct Staging {
    dir: Option<PathBuf>,
    /// Each thumbnail's size, by index.
    files: Vec<u64>,
}

impl Staging {
    /// Writes the next thumbnail.
    pub(crate) async fn add(&mut self, png: &[u8]) -> Result<(), String> {
        let dir = self.dir.as_deref().expect("staging not yet kept");
        let path = dir.join(format!("{}.png", self.files.len()));
        tokio::fs::write(&path, png)
            .await
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        self.files.push(png.len() as u64);
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// A new upload id: time-ordered, unique enough for one app.
pub(crate) fn new_id() -> String {
    let mut random = [0u8; 4];
    getrandom::fill(&mut random).expect("the OS gives random bytes");
    format!("{:x}-{:08x}", now_ms(), u32::from_le_bytes(random))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://app:hunter2@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert_eq!(redact("sqlite://x.db?mode=rwc"), "sqlite://x.db?mode=rwc");
    }

    #[test]
    fn dropped_staging_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("thumbs-staging-{}", std::process::id()));
        let mut staging = Staging {
            dir: Some(dir.clone()),
            files: Vec::new(),
        };
        std::fs::create_dir_all(&dir).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(staging.add(b"png"))
            .unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        drop(staging);
        assert!(!dir.exists());
    }
}
