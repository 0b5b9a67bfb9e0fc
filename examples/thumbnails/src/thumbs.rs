//! The work that runs on FLAME runners: pipe an upload into ffmpeg as it arrives, and send each
//! thumbnail back as ffmpeg writes it.

use std::process::Stdio;

use bytes::{Bytes, BytesMut};
use flame::channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::gallery::{Gallery, Upload};

/// What the thumbnails task tells its caller while it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Event {
    /// ffmpeg runs on `runner` as process `ffmpeg_pid`.
    Started { runner: String, ffmpeg_pid: u32 },
    /// Thumbnail number `index`, made on `runner`: a PNG.
    Thumb {
        index: u32,
        runner: String,
        png: Bytes,
    },
}

/// How the thumbnails are made.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Settings {
    /// Thumbnails per second of video.
    pub(crate) fps: f32,
    /// Width of each thumbnail, in pixels (the height keeps the aspect ratio).
    pub(crate) width: u32,
}

/// Runs ffmpeg on the video as it arrives through `video` and sends `events` back: first where
/// it runs, then each thumbnail. Keeps them in the app's `gallery` (its database pool and
/// storage, as this runner's `main` provided them) once all are made, and returns how many. Dropping the call
/// (the user left) drops this future: `kill_on_drop` takes ffmpeg with it, and the staged
/// thumbnails are removed.
#[flame::task]
pub(crate) async fn thumbnails(
    video: Receiver<Bytes>,
    events: Sender<Event>,
    settings: Settings,
    upload: Upload,
    gallery: flame::State<Gallery>,
) -> Result<u32, String> {
    let runner = flame::parent().map_or_else(|| "local".to_string(), |p| p.runner_id().to_string());
    let mut staging = gallery.stage(&upload)?;
    let mut ffmpeg = tokio::process::Command::new(ffmpeg_program())
        .args(["-hide_banner", "-loglevel", "error", "-i", "pipe:0", "-vf"])
        .arg(format!("fps={},scale={}:-2", settings.fps, settings.width))
        .args(["-f", "image2pipe", "-vcodec", "png", "pipe:1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| missing_ffmpeg(&runner, &e))?;
    let started = Event::Started {
        runner: runner.clone(),
        ffmpeg_pid: ffmpeg.id().unwrap_or(0),
    };
    events.send(started).await.map_err(|e| e.to_string())?;

    let mut stdin = ffmpeg.stdin.take().expect("piped");
    let mut stdout = ffmpeg.stdout.take().expect("piped");
    let mut stderr = ffmpeg.stderr.take().expect("piped");
    let feed = async move {
        let copied = tokio::io::copy(&mut flame::channel::into_reader(video), &mut stdin).await;
        // Closing stdin tells ffmpeg the video is complete.
        drop(stdin);
        match copied {
            // ffmpeg stopped reading: its exit status and stderr say why.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            Err(e) => Err(format!("the upload failed: {e}")),
            Ok(_) => Ok(()),
        }
    };
    let split = async {
        let mut splitter = PngSplitter::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut index = 0;
        loop {
            let n = stdout.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok::<u32, String>(index);
            }
            for png in splitter.push(&buf[..n])? {
                staging.add(&png).await?;
                let thumb = Event::Thumb {
                    index,
                    runner: runner.clone(),
                    png,
                };
                events.send(thumb).await.map_err(|e| e.to_string())?;
                index += 1;
            }
        }
    };
    let mut errors = String::new();
    let (fed, made, _) = tokio::join!(feed, split, stderr.read_to_string(&mut errors));
    let status = ffmpeg.wait().await.map_err(|e| e.to_string())?;
    fed?;
    if !status.success() {
        return Err(format!("ffmpeg failed ({status}): {}", errors.trim()));
    }
    let made = made?;
    gallery.keep(staging, &upload, &runner).await?;
    Ok(made)
}

/// The ffmpeg to run: `FFMPEG` if set, else `ffmpeg` from the `PATH`.
pub(crate) fn ffmpeg_program() -> String {
    std::env::var("FFMPEG").unwrap_or_else(|_| "ffmpeg".to_string())
}

fn missing_ffmpeg(runner: &str, e: &std::io::Error) -> String {
    format!(
        "could not start {} on runner {runner} ({e}): the thumbnails need ffmpeg on every \
         runner; install it (Debian/Ubuntu: apt-get install ffmpeg) or set FFMPEG",
        ffmpeg_program()
    )
}

const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// Cuts a stream of concatenated PNG files into files, as the bytes arrive: each starts with the
/// PNG signature and ends with its `IEND` chunk.
#[derive(Default)]
pub(crate) struct PngSplitter {
    buf: BytesMut,
}

impl PngSplitter {
    /// Takes more bytes; returns the PNGs they complete.
    pub(crate) fn push(&mut self, data: &[u8]) -> Result<Vec<Bytes>, String> {
        self.buf.extend_from_slice(data);
        let mut done = Vec::new();
        while let Some(len) = complete_png(&self.buf)? {
            done.push(self.buf.split_to(len).freeze());
        }
        Ok(done)
    }
}

/// The length of the PNG at the start of `buf` if it is all there.
fn complete_png(buf: &[u8]) -> Result<Option<usize>, String> {
    if buf.len() < PNG_SIGNATURE.len() {
        return Ok(None);
    }
    if &buf[..8] != PNG_SIGNATURE {
        return Err("ffmpeg's output is not a PNG stream".into());
    }
    let mut at = 8;
    loop {
        // Each chunk: length (4), type (4), data, CRC (4).
        let Some(header) = buf.get(at..at + 8) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let end = at + 12 + len;
        if buf.len() < end {
            return Ok(None);
        }
        if &header[4..8] == b"IEND" {
            return Ok(Some(end));
        }
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny PNG with an IEND chunk, as the splitter sees one (CRCs are not its business).
    fn png(marker: u8) -> Vec<u8> {
        let mut png = PNG_SIGNATURE.to_vec();
        for (kind, data) in [
            (b"IHDR", vec![marker; 13]),
            (b"IDAT", vec![marker; 5]),
            (b"IEND", vec![]),
        ] {
            png.extend_from_slice(&(data.len() as u32).to_be_bytes());
            png.extend_from_slice(kind);
            png.extend_from_slice(&data);
            png.extend_from_slice(&[0, 0, 0, 0]);
        }
        png
    }

    #[test]
    fn splits_pngs_however_the_bytes_arrive() {
        let stream: Vec<u8> = [png(1), png(2), png(3)].concat();
        for step in [1, 7, 33, stream.len()] {
            let mut splitter = PngSplitter::default();
            let mut got = Vec::new();
            for piece in stream.chunks(step) {
                got.extend(splitter.push(piece).unwrap());
            }
            assert_eq!(
                got,
                vec![png(1), png(2), png(3)],
                "arriving {step} bytes at a time"
            );
        }
    }

    #[test]
    fn refuses_what_is_not_png() {
        assert!(PngSplitter::default().push(b"GIF89a and more").is_err());
    }
}
