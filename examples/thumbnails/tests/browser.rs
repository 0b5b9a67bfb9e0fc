//! The showcase end to end, in headless Chromium: upload a generated video and watch the
//! thumbnails arrive; leave mid-upload and check the work stopped. Real app, real runners, real
//! ffmpeg, real browser (`.ci/run` installs ffmpeg, chromium and chromium-driver).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use fantoccini::{Client, ClientBuilder, Locator};
use flame_tests::{bounded, is_gone, wait_gone};
use support::{
    Group, Postgres, app_with, files_under, free_port, scratch_dir, start, stats,
    until_no_busy_slot,
};
use tokio::process::Command;

mod support;

const BOUND: Duration = Duration::from_secs(120);

/// Headless Chromium through chromedriver.
async fn browser() -> (Group, Client) {
    // The WebDriver client's TLS stack (unused: chromedriver speaks plain HTTP) needs a crypto
    // provider chosen, as two are linked in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = free_port();
    let mut command = Command::new("chromedriver");
    command.arg(format!("--port={port}"));
    let (group, _) = start(command, "started successfully").await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        }),
    );
    let client = ClientBuilder::rustls()
        .unwrap()
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("chromedriver gives a session");
    client.set_window_size(1100, 760).await.unwrap();
    (group, client)
}

/// A video made by ffmpeg: `filter` is a lavfi source.
fn video(name: &str, filter: &str) -> PathBuf {
    // Each its own directory: tests running at once make videos of the same name.
    let path = scratch_dir("video").join(name);
    let status = std::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            filter,
        ])
        .args(["-pix_fmt", "yuv420p", "-movflags", "+faststart"])
        .arg(&path)
        .status()
        .expect("ffmpeg runs (install it: apt-get install ffmpeg)");
    assert!(status.success());
    path
}

fn decode_png(data_url: &str) -> (u32, u32) {
    let b64 = data_url
        .strip_prefix("data:image/png;base64,")
        .expect("a PNG data URL");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("valid base64");
    let mut reader = png::Decoder::new(bytes.as_slice())
        .read_info()
        .expect("a valid PNG header");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).expect("valid PNG data");
    (frame.width, frame.height)
}

/// The ffmpeg processes among the descendants of `root`.
fn ffmpegs_under(root: u32) -> Vec<u32> {
    let parent_of = |pid: u32| -> Option<(u32, String)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
        let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
        Some((ppid, name.to_string()))
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Some((mut ppid, name)) = parent_of(pid) else {
            continue;
        };
        if name != "ffmpeg" || is_gone(pid) {
            continue;
        }
        while ppid > 1 {
            if ppid == root {
                found.push(pid);
                break;
            }
            ppid = parent_of(ppid).map_or(0, |(p, _)| p);
        }
    }
    found
}

async fn pick_file(client: &Client, url: &str, file: &Path) {
    client.goto(url).await.unwrap();
    let input = client.find(Locator::Css("#file")).await.unwrap();
    input.send_keys(file.to_str().unwrap()).await.unwrap();
}

/// Uploads a 10 s video through the page of the app started with `env`, checks the thumbnails
/// arrive live, then that the gallery lists the video and shows its thumbnails from the
/// database and the storage directory `data`. Returns the client, the page still open.
async fn upload_and_find_it_in_the_gallery(url: &str, data: &Path, client: &Client) {
    let sample = video("sample.mp4", "testsrc=duration=10:size=640x360:rate=25");
    let started = Instant::now();
    pick_file(client, url, &sample).await;
    // Done, or an error said at once rather than a wait to the bound.
    client
        .wait()
        .at_most(BOUND)
        .every(Duration::from_millis(50))
        .for_element(Locator::Css("body[data-done], #error:not(:empty)"))
        .await
        .expect("the page says the work is done");
    let error = client.find(Locator::Css("#error")).await.unwrap();
    assert_eq!(error.text().await.unwrap(), "", "the page shows an error");
    let body = client.find(Locator::Css("body[data-done]")).await.unwrap();
    println!(
        "10 s of video: all thumbnails in the page after {:?}",
        started.elapsed()
    );
    let done: usize = body
        .attr("data-done")
        .await
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    let thumbs = client.find_all(Locator::Css("img.thumb")).await.unwrap();
    assert!(thumbs.len() >= 8, "{} thumbnails", thumbs.len());
    assert_eq!(done, thumbs.len(), "the task's count and the page's");
    for thumb in &thumbs {
        let src = thumb.attr("src").await.unwrap().expect("a src");
        let (width, height) = decode_png(&src);
        assert_eq!(
            (width, height),
            (240, 136),
            "scaled to the configured width"
        );
    }
    let runners = client.find(Locator::Css("#runners")).await.unwrap();
    let runners = runners.text().await.unwrap();
    assert!(
        runners.starts_with("thumbs-"),
        "made on a runner: {runners}"
    );

    // The gallery, read back from the database: the video by its name, every thumbnail served
    // from the storage directory.
    let names = client
        .find_all(Locator::Css("#gallery .video .name"))
        .await
        .unwrap();
    assert_eq!(names.len(), 1, "one video kept");
    assert_eq!(names[0].text().await.unwrap(), "sample.mp4");
    let widths = client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const imgs = [...document.querySelectorAll('#gallery img.kept')];
             Promise.all(imgs.map((i) => i.complete ? null :
               new Promise((r) => { i.onload = r; i.onerror = r; })))
               .then(() => done(imgs.map((i) => i.naturalWidth)));",
            vec![],
        )
        .await
        .unwrap();
    let widths: Vec<u64> = serde_json::from_value(widths).unwrap();
    assert_eq!(widths, vec![240; done], "each kept thumbnail loads");
    let pngs: Vec<_> = files_under(data)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(pngs.len(), done, "{pngs:?}");
    assert!(
        pngs.iter()
            .all(|f| !f.to_string_lossy().contains(".partial")),
        "{pngs:?}"
    );

    // The pool chart samples twice a second: it soon shows the runner that made them.
    let chart = client
        .wait()
        .at_most(BOUND)
        .every(Duration::from_millis(50))
        .for_element(Locator::Css(
            "#chart[data-peak-runners]:not([data-peak-runners='0'])",
        ))
        .await
        .expect("the chart sampled the runner");
    let peak: u64 = chart
        .attr("data-peak-runners")
        .await
        .unwrap()
        .expect("the chart has samples")
        .parse()
        .unwrap();
    assert!(peak >= 1, "the chart saw {peak} runners");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thumbnails_appear_live_and_the_gallery_keeps_them() {
    let data = scratch_dir("data");
    let (_app, url) = app_with(&[("THUMBS_DATA", data.to_str().unwrap())]).await;
    let (_driver, client) = browser().await;
    bounded(BOUND, async {
        upload_and_find_it_in_the_gallery(&url, &data, &client).await;
        assert!(data.join("gallery.db").exists(), "SQLite by default");
        // The README shows this page, with the gallery and the chart.
        client.set_window_size(1100, 900).await.unwrap();
        let screenshot = client.screenshot().await.unwrap();
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/thumbnails.png");
        std::fs::write(&docs, screenshot).unwrap();
    })
    .await;
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gallery_works_the_same_on_postgres() {
    let postgres = Postgres::start().await;
    let data = scratch_dir("data");
    let (_app, url) = app_with(&[
        ("THUMBS_DATA", data.to_str().unwrap()),
        ("DATABASE_URL", &postgres.url),
    ])
    .await;
    let (_driver, client) = browser().await;
    bounded(BOUND, async {
        upload_and_find_it_in_the_gallery(&url, &data, &client).await;
        assert!(
            !data.join("gallery.db").exists(),
            "no SQLite file: Postgres"
        );
        // The rows are in the server, written by the runner.
        let db = sqlx::PgPool::connect(&postgres.url).await.unwrap();
        let (videos, runner): (i64, String) =
            sqlx::query_as("SELECT count(*), min(runner) FROM videos")
                .fetch_one(&db)
                .await
                .unwrap();
        assert_eq!(videos, 1);
        assert!(runner.starts_with("thumbs-"), "{runner}");
        db.close().await;
    })
    .await;
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_mid_upload_stops_ffmpeg_and_frees_the_slot_and_keeps_nothing() {
    let data = scratch_dir("data");
    let (_app, url) = app_with(&[("THUMBS_DATA", data.to_str().unwrap())]).await;
    let (_driver, client) = browser().await;
    // Noise compresses badly: megabytes to upload, at 64 KiB every 50 ms.
    let big = video(
        "noise.mp4",
        "testsrc2=duration=10:size=320x240:rate=25,noise=alls=40:allf=t",
    );
    bounded(BOUND, async {
        pick_file(&client, &format!("{url}?chunk_delay_ms=50"), &big).await;
        let body = client
            .wait()
            .at_most(BOUND)
            .every(Duration::from_millis(20))
            .for_element(Locator::Css("body[data-ffmpeg-pid]"))
            .await
            .expect("ffmpeg starts on a runner");
        let ffmpeg: u32 = body
            .attr("data-ffmpeg-pid")
            .await
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        assert!(!is_gone(ffmpeg), "ffmpeg runs while the video uploads");
        assert_eq!(stats(&url).await["in_flight"], 1);
        assert!(
            client
                .find_all(Locator::Css("body[data-done]"))
                .await
                .unwrap()
                .is_empty(),
            "still uploading"
        );

        // A thumbnail made, and staged on disk, before the user leaves.
        client
            .wait()
            .at_most(BOUND)
            .every(Duration::from_millis(20))
            .for_element(Locator::Css("img.thumb"))
            .await
            .expect("a thumbnail arrives while the video uploads");
        let staged = files_under(&data)
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "png"))
            .count();
        assert!(staged >= 1, "the thumbnails made so far are staged");

        // The user closes the tab (another one stays open, as the session needs a window).
        let other = client.new_window(true).await.unwrap().handle;
        let left = Instant::now();
        client.close_window().await.unwrap();
        client.switch_to_window(other).await.unwrap();
        assert!(
            wait_gone(ffmpeg, Duration::from_secs(2)).await,
            "ffmpeg {ffmpeg} still runs 2 s after the tab was closed"
        );
        let gone_after = left.elapsed();
        until_no_busy_slot(&url, Duration::from_secs(2).saturating_sub(left.elapsed())).await;
        println!(
            "after leaving: ffmpeg gone in {gone_after:?}, slot free in {:?}",
            left.elapsed()
        );
        let app_pid = _app.0.id().unwrap();
        assert_eq!(
            ffmpegs_under(app_pid),
            Vec::<u32>::new(),
            "no ffmpeg left under the app"
        );
        // Thumbnails were made before the tab closed; none was kept: no rows, no files.
        let gallery: serde_json::Value = reqwest::get(format!("{url}gallery"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(gallery["videos"], serde_json::json!([]), "{gallery}");
        let pngs: Vec<_> = files_under(&data)
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "png"))
            .collect();
        assert_eq!(
            pngs,
            Vec::<PathBuf>::new(),
            "files left by a cancelled upload"
        );
    })
    .await;
    client.close().await.unwrap();
}

/// Waits for the page's error message and returns it.
async fn page_error(client: &Client) -> String {
    client
        .wait()
        .at_most(BOUND)
        .every(Duration::from_millis(20))
        .for_element(Locator::Css("#error:not(:empty)"))
        .await
        .expect("the page shows an error")
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistakes_show_a_clear_message_and_leave_no_runner_busy() {
    let (_app, url) = app_with(&[("THUMBS_MAX_UPLOAD_MB", "1")]).await;
    let (_driver, client) = browser().await;
    let dir = video("tiny.mp4", "testsrc=duration=1:size=64x64:rate=5")
        .parent()
        .unwrap()
        .to_path_buf();
    let not_video = dir.join("notes.txt");
    std::fs::write(&not_video, "shopping list: milk, eggs\n".repeat(1000)).unwrap();
    let empty = dir.join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    let too_big = video(
        "big.mp4",
        "testsrc2=duration=5:size=320x240:rate=25,noise=alls=40:allf=t",
    );
    assert!(std::fs::metadata(&too_big).unwrap().len() > 1 << 20);
    bounded(BOUND, async {
        for (file, expected) in [
            (&not_video, "could not make thumbnails: ffmpeg failed"),
            (&empty, "the file is empty"),
            (&too_big, "larger than the 1 MB this app accepts"),
        ] {
            pick_file(&client, &url, file).await;
            let error = page_error(&client).await;
            assert!(error.contains(expected), "{}: {error}", file.display());
            let freed = until_no_busy_slot(&url, Duration::from_secs(5)).await;
            println!(
                "{}: {error:?}; no busy slot after {freed:?}",
                file.display()
            );
        }
        assert_eq!(stats(&url).await["failed_boots"], 0);
    })
    .await;
    client.close().await.unwrap();
}
