//! The showcase without a browser: `POST /thumbnails` with a whole file, bad input, and a
//! machine without ffmpeg.

use std::time::Duration;

use flame_tests::bounded;
use support::{APP, app, scratch_dir};
use tokio::process::Command;

mod support;
const BOUND: Duration = Duration::from_secs(60);

fn sample() -> Vec<u8> {
    let out = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi"])
        .args([
            "-i",
            "testsrc=duration=5:size=320x240:rate=25",
            "-pix_fmt",
            "yuv420p",
        ])
        .args([
            "-movflags",
            "frag_keyframe+empty_moov",
            "-f",
            "mp4",
            "pipe:1",
        ])
        .output()
        .expect("ffmpeg runs (install it: apt-get install ffmpeg)");
    assert!(out.status.success());
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_file_gets_all_its_thumbnails_back() {
    let (_app, url) = app().await;
    bounded(BOUND, async {
        let client = reqwest::Client::new();
        let answer: serde_json::Value = client
            .post(format!("{url}thumbnails?fps=2&width=160"))
            .body(sample())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["count"], 10, "5 s at 2 per second: {answer}");
        assert!(answer["runner"].as_str().unwrap().starts_with("thumbs-"));
        let thumbnails = answer["thumbnails"].as_array().unwrap();
        assert_eq!(thumbnails.len(), 10);
        for src in thumbnails {
            assert!(
                src.as_str()
                    .unwrap()
                    .starts_with("data:image/png;base64,iVBORw0KGgo")
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_video_gets_ffmpegs_reason() {
    let (_app, url) = app().await;
    bounded(BOUND, async {
        let answer = reqwest::Client::new()
            .post(format!("{url}thumbnails"))
            .body(vec![7u8; 100_000])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 422);
        let body: serde_json::Value = answer.json().await.unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.starts_with("ffmpeg failed"), "{error}");
        // The pool is fine: the next file works.
        let stats: serde_json::Value = reqwest::get(format!("{url}stats"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(stats["in_flight"], 0);
        assert_eq!(stats["failed_boots"], 0);
    })
    .await;
}

/// Starts the app with `env`, which must stop it at start; returns what it said on stderr.
async fn refused_at_start(env: (&str, &str)) -> String {
    let out = bounded(
        BOUND,
        Command::new(APP)
            .env("PORT", "0")
            .env("THUMBS_DATA", scratch_dir("data"))
            .env(env.0, env.1)
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ffmpeg_the_app_says_what_to_install() {
    let stderr = refused_at_start(("FFMPEG", "/nonexistent/ffmpeg")).await;
    assert!(stderr.contains("apt-get install ffmpeg"), "{stderr}");
    assert!(stderr.contains("/nonexistent/ffmpeg"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_it_cannot_reach_stops_it_at_start_saying_which() {
    // Nothing listens on port 1; the password stays out of the message.
    let url = "postgres://app:hunter2@127.0.0.1:1/gallery";
    let stderr = refused_at_start(("DATABASE_URL", url)).await;
    assert!(
        stderr.contains("opening the database postgres://app:***@127.0.0.1:1/gallery"),
        "{stderr}"
    );
    assert!(stderr.contains("check DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
