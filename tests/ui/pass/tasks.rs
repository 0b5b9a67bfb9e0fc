use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub struct Video {
    pub path: std::path::PathBuf,
}

/// Doc comments stay on the task.
#[flame::task]
pub async fn generate_thumbnails(video: Video, interval: u32) -> Result<Vec<String>, String> {
    Ok(vec![format!("{}@{interval}", video.path.display())])
}

#[flame::task]
async fn no_arguments_no_result() {}

#[flame::task]
async fn patterns(mut count: u32, (a, b): (u8, u8), _: String) -> u32 {
    count += u32::from(a) + u32::from(b);
    count
}

/// Heavy work on the blocking pool.
#[flame::task(blocking)]
async fn crunch(data: Vec<u8>) -> u64 {
    data.iter().map(|b| u64::from(*b)).sum()
}

fn main() {
    let _ = crunch(vec![1]);
    let call: flame::Call<Result<Vec<String>, String>> =
        generate_thumbnails(Video { path: "a.mp4".into() }, 5);
    assert!(call.task_id().ends_with("::generate_thumbnails"));
    let _ = no_arguments_no_result();
    let _ = patterns(1, (2, 3), String::new());
}
