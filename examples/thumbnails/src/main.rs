//! The showcase: a web app that makes video thumbnails on FLAME runners *while the video
//! uploads*, shows each one as it is made, and abandons the work the moment the user leaves.
//!
//! ```sh
//! cargo run --release -p flame-example-thumbnails   # then open the URL it prints
//! ```
//!
//! The browser sends the video in chunks over a WebSocket; the server forwards them into a
//! `flame::channel` to a task placed on the `thumbs` pool, which pipes them into ffmpeg on its
//! runner and sends each PNG back through a second channel as ffmpeg writes it. Closing the page
//! drops the call's handle: the runner drops the task, ffmpeg dies with it, the slot frees, and
//! the idle runner goes away. `POST /thumbnails` does the same for a whole file, without a
//! browser; `GET /stats` shows the pool.
//!
//! The app keeps what it makes, as any app would: the task writes each thumbnail under the
//! storage directory and a row per thumbnail into the app's database, through the pool `main`
//! opened and `flame::provide`d on the runner (see `gallery.rs`). The page shows a gallery of
//! past videos from that database, and a chart of the pool's runners and busy slots.
//!
//! Configuration (environment): `BIND` (127.0.0.1), `PORT` (4000), `THUMBS_BACKEND` (`process`,
//! the default: runners are child processes of this program; `local`; `docker`; `k8s`; or `fly`),
//! `THUMBS_MAX` runners (4), `THUMBS_FPS` (1),
//! `THUMBS_WIDTH` (240), `THUMBS_MAX_UPLOAD_MB` (512), `FFMPEG` (the ffmpeg program),
//! `THUMBS_DATA` (the storage directory, `thumbnails-data`), `DATABASE_URL` (SQLite in the
//! storage directory by default; a `postgres://` URL for runners on other hosts, which then also
//! need the storage directory shared: `THUMBS_DATA_VOLUME` names the Docker volume, or the pod's
//! volume, that runners mount).

mod gallery;
mod thumbs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;

use gallery::{Gallery, Upload};
use serde_json::json;

use thumbs::{Event, Settings, thumbnails};

const PAGE: &str = include_str!("../static/index.html");

struct App {
    pool: flame::Pool,
    gallery: flame::State<Gallery>,
    settings: Settings,
    /// The largest upload taken, in bytes.
    max_upload: u64,
}

#[flame::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // In the parent and in each runner alike: the app's database pool and storage, which the
    // thumbnails task takes as a `flame::State<Gallery>`.
    flame::provide(Gallery::open(flame::parent().is_none()).await?);
    let pool = thumbs_pool().await?;
    if flame::parent().is_some() {
        return Ok(()); // a runner: it serves the pool's calls
    }
    check_ffmpeg()?;
    let settings = Settings {
        fps: env_or("THUMBS_FPS", 1.0),
        width: env_or("THUMBS_WIDTH", 240),
    };
    let max_upload = env_or("THUMBS_MAX_UPLOAD_MB", 512u64) << 20;
    let app = Arc::new(App {
        pool,
        gallery: flame::state::<Gallery>().expect("provided above"),
        settings,
        max_upload,
    });
    let router = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/ws", get(upload_socket))
        .route("/thumbnails", post(whole_file))
        .route("/stats", get(stats))
        .route("/gallery", get(gallery_page))
        .route("/files/{id}/{index}", get(gallery_file))
        .layer(DefaultBodyLimit::max(max_upload as usize))
        .with_state(app);
    let addr = SocketAddr::new(
        env_or("BIND", std::net::IpAddr::from([127, 0, 0, 1])),
        env_or("PORT", 4000),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!(
        "thumbnails: open http://{}/ (runners: {} backend)",
        listener.local_addr()?,
        std::env::var("THUMBS_BACKEND").unwrap_or_else(|_| "process".into())
    );
    axum::serve(listener, router).await?;
    Ok(())
}

/// The `thumbs` pool, on the backend the configuration names.
async fn thumbs_pool() -> anyhow::Result<flame::Pool> {
    let builder = flame::Pool::builder("thumbs")
        .max(env_or("THUMBS_MAX", 4))
        .max_concurrency(2)
        .idle_shutdown_after(Duration::from_secs(10));
    let builder = match std::env::var("THUMBS_BACKEND").as_deref() {
        Ok("process") | Err(_) => builder.backend(flame::ProcessBackend::new()),
        Ok("local") => builder.backend(flame::LocalBackend::new()),
        // In a container with the engine's socket mounted (docs/deploy-docker.md).
        Ok("docker") => {
            // Runners get only the environment given here: the gallery's, and its storage.
            let mut docker = flame_backend_docker::DockerBackend::builder();
            for name in ["DATABASE_URL", "THUMBS_DATA", "FFMPEG"] {
                if let Ok(value) = std::env::var(name) {
                    docker = docker.env(name, value);
                }
            }
            if let (Ok(volume), Ok(data)) = (
                std::env::var("THUMBS_DATA_VOLUME"),
                std::env::var("THUMBS_DATA"),
            ) {
                docker = docker.bind(format!("{volume}:{data}"));
            }
            builder.backend(docker.build().await?)
        }
        // In a pod: runners are pods cloned from it, env and volumes included
        // (docs/deploy-kubernetes.md).
        Ok("k8s") => {
            let mut k8s = flame_backend_k8s::K8sBackend::builder();
            // The gallery's storage: a claim every runner pod mounts too.
            if let Ok(volume) = std::env::var("THUMBS_DATA_VOLUME") {
                k8s = k8s.share_volume(volume);
            }
            builder.backend(k8s.build().await?)
        }
        // On Fly: FLY_* and the FLY_API_TOKEN secret configure it (docs/deploy-fly.md).
        Ok("fly") => builder.backend(flame_backend_fly::FlyBackend::builder().build()?),
        Ok(other) => anyhow::bail!(
            "THUMBS_BACKEND={other:?}: this build knows `process` (the default), `local`, `docker`, `k8s` and `fly`"
        ),
    };
    Ok(builder.start().await?)
}

/// The app is useless without ffmpeg: say so at start, with what to do.
fn check_ffmpeg() -> anyhow::Result<()> {
    let program = thumbs::ffmpeg_program();
    match std::process::Command::new(&program)
        .arg("-version")
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => anyhow::bail!(
            "`{program} -version` failed ({}): is it a working ffmpeg?",
            out.status
        ),
        Err(e) => anyhow::bail!(
            "ffmpeg is needed to make thumbnails, and `{program}` could not be run ({e}). \
             Install it (Debian/Ubuntu: apt-get install ffmpeg; macOS: brew install ffmpeg), \
             or point FFMPEG at one."
        ),
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Deserialize)]
struct UploadQuery {
    name: Option<String>,
}

impl UploadQuery {
    fn upload(self) -> Upload {
        Upload {
            id: gallery::new_id(),
            name: self.name.unwrap_or_else(|| "upload".into()),
        }
    }
}

async fn upload_socket(
    ws: WebSocketUpgrade,
    State(app): State<Arc<App>>,
    Query(query): Query<UploadQuery>,
) -> Response {
    ws.on_upgrade(move |socket| upload_session(socket, app, query.upload()))
}

/// One upload from the page: video chunks in, thumbnails out, until the work is done, the upload
/// is refused, or the page goes away.
async fn upload_session(socket: WebSocket, app: Arc<App>, upload: Upload) {
    let (mut to_page, mut from_page) = socket.split();
    let (video, task_video) = flame::channel::<Bytes>(8);
    let (task_events, mut events) = flame::channel::<Event>(16);
    // The handle is the work: dropping it cancels it.
    let mut handle = flame::spawn_on(
        &app.pool,
        thumbnails(task_video, task_events, app.settings, upload),
    );

    // Thumbnails go to the page as they come, whatever the upload is doing; then the last word.
    let (say, mut said) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let writer = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let message = page_event(&event).to_string();
            if to_page.send(Message::Text(message.into())).await.is_err() {
                return;
            }
        }
        while let Some(message) = said.recv().await {
            if to_page
                .send(Message::Text(message.to_string().into()))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = to_page.close().await;
    });
    let mut video = Some(video);
    let mut received = 0u64;
    let outcome: Result<u32, String> = loop {
        tokio::select! {
            message = from_page.next() => match message {
                Some(Ok(Message::Binary(chunk))) => {
                    received += chunk.len() as u64;
                    if received > app.max_upload {
                        break Err(format!(
                            "the file is larger than the {} MB this app accepts",
                            app.max_upload >> 20
                        ));
                    }
                    if let Some(tx) = &video
                        && tx.send(chunk).await.is_err()
                    {
                        video = None; // the task stopped reading: its result says why
                    }
                }
                // The whole video is uploaded: ffmpeg sees the end of its input.
                Some(Ok(Message::Text(text))) if text.as_str() == "end" => {
                    if received == 0 {
                        break Err("the file is empty: pick a video".into());
                    }
                    video = None;
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    tracing::info!("the page went away: the thumbnails call is cancelled");
                    writer.abort();
                    return;
                }
                Some(Ok(_)) => {}
            },
            result = &mut handle => break match result {
                Ok(Ok(count)) => Ok(count),
                Ok(Err(error)) => Err(format!("could not make thumbnails: {error}")),
                Err(error) => Err(error.to_string()),
            },
        }
    };
    // A refused upload cancels the work; a finished one has sent every event before its result.
    drop(handle);
    let last = match outcome {
        Ok(count) => json!({ "type": "done", "count": count }),
        Err(error) => json!({ "type": "error", "error": error }),
    };
    let _ = say.send(last);
    drop(say);
    let _ = writer.await;
    // The closing handshake: read on until the page answers our Close. A socket dropped with
    // unread upload chunks in it is reset, and a reset can discard the last word before the
    // browser has read it (seen when a too-large upload was refused mid-stream).
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(message)) = from_page.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// An event as the page gets it: JSON, with a thumbnail as a `data:` URL.
fn page_event(event: &Event) -> serde_json::Value {
    match event {
        Event::Started { runner, ffmpeg_pid } => {
            json!({ "type": "started", "runner": runner, "ffmpeg_pid": ffmpeg_pid })
        }
        Event::Thumb { index, runner, png } => json!({
            "type": "thumb",
            "index": index,
            "runner": runner,
            "src": format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png)),
        }),
    }
}

#[derive(Deserialize)]
struct FileQuery {
    fps: Option<f32>,
    width: Option<u32>,
    #[serde(flatten)]
    upload: UploadQuery,
}

/// `POST /thumbnails` with a whole video as the body: its thumbnails when all are done (the
/// seed's `FLAME.call`), as JSON `{count, runner, thumbnails: [data URLs]}`.
async fn whole_file(
    State(app): State<Arc<App>>,
    Query(query): Query<FileQuery>,
    body: Bytes,
) -> Response {
    let settings = Settings {
        fps: query.fps.unwrap_or(app.settings.fps),
        width: query.width.unwrap_or(app.settings.width),
    };
    let (video, task_video) = flame::channel::<Bytes>(8);
    let (task_events, mut events) = flame::channel::<Event>(16);
    let handle = flame::spawn_on(
        &app.pool,
        thumbnails(task_video, task_events, settings, query.upload.upload()),
    );
    let upload = tokio::spawn(async move {
        for at in (0..body.len()).step_by(128 * 1024) {
            let chunk = body.slice(at..(at + 128 * 1024).min(body.len()));
            if video.send(chunk).await.is_err() {
                break;
            }
        }
    });
    let (mut thumbnails, mut runner) = (Vec::new(), None);
    while let Some(event) = events.recv().await {
        let page = page_event(&event);
        match event {
            Event::Started { runner: r, .. } => runner = Some(r),
            Event::Thumb { .. } => thumbnails.push(page["src"].clone()),
        }
    }
    upload.abort();
    match handle.await {
        Ok(Ok(count)) => {
            Json(json!({ "count": count, "runner": runner, "thumbnails": thumbnails }))
                .into_response()
        }
        Ok(Err(error)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": error })),
        )
            .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": error.to_string() })),
        )
            .into_response(),
    }
}

/// `GET /stats`: the pool's state, to watch runners come and go.
async fn stats(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let s = app.pool.stats();
    Json(json!({
        "runners": s.runners,
        "booting": s.booting,
        "in_flight": s.in_flight,
        "queued": s.queued,
        "booted": s.booted,
        "failed_boots": s.failed_boots,
        "served": s.served,
        "max": s.max,
    }))
}

/// `GET /gallery`: the newest videos and their thumbnails, from the database.
async fn gallery_page(State(app): State<Arc<App>>) -> Response {
    match app.gallery.recent(20).await {
        Ok(videos) => Json(json!({ "videos": videos })).into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": format!("reading the gallery: {error:#}") })),
        )
            .into_response(),
    }
}

/// `GET /files/{id}/{index}`: one thumbnail of the gallery, as a PNG.
async fn gallery_file(
    State(app): State<Arc<App>>,
    Path((id, index)): Path<(String, i64)>,
) -> Response {
    match app.gallery.file(&id, index).await {
        Ok(Some(png)) => ([("content-type", "image/png")], png).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, format!("{error:#}")).into_response(),
    }
}
