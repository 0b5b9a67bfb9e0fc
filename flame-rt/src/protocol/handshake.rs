//! The handshake's ingredients: one-time tokens, the build fingerprint, and the checks the
//! parent makes on a runner's `Hello`.

use std::io::{Read, Seek, SeekFrom};
use std::sync::OnceLock;

use subtle::ConstantTimeEq;

use futures::SinkExt;
use tokio::io::AsyncWrite;
use tokio_util::codec::FramedWrite;

use crate::protocol::{self, Hello, PROTOCOL_VERSION, ToRunner};

/// A fresh 128-bit token from the OS random source.
pub(crate) fn new_token() -> std::io::Result<[u8; 16]> {
    let mut token = [0u8; 16];
    getrandom::fill(&mut token).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(token)
}

/// Why a runner speaking protocol `version` is refused.
pub(crate) fn version_mismatch(version: u32) -> String {
    format!(
        "protocol version mismatch: the runner speaks {version}, the parent {PROTOCOL_VERSION}; parent \
         and runners must run the same flame-rt release"
    )
}

/// Whether the hello carries the token of the runner it names, compared in constant time. The
/// listener asks this first: nothing else about a hello counts until it holds.
pub(crate) fn token_matches(hello: &Hello, token: &[u8; 16]) -> bool {
    bool::from(hello.token.ct_eq(token))
}

/// Tells a runner why it is refused (best effort: it may be gone already).
pub(crate) async fn refuse<W: AsyncWrite + Unpin>(stream: &mut W, reason: &str) {
    tracing::warn!(%reason, "flame: refused a runner");
    if let Ok(frame) = protocol::encode(&ToRunner::Refused {
        reason: reason.to_string(),
    }) {
        let mut sink = FramedWrite::new(stream, protocol::codec());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), sink.send(frame)).await;
    }
}

/// Identifies the executable: its GNU build-id when it has one, else its size and mtime.
/// Differing fingerprints with matching task manifests are allowed (and logged).
pub(crate) fn fingerprint() -> &'static str {
    static FINGERPRINT: OnceLock<String> = OnceLock::new();
    FINGERPRINT.get_or_init(|| {
        let path = std::path::Path::new("/proc/self/exe");
        if let Some(id) = std::fs::File::open(path)
            .ok()
            .and_then(|f| gnu_build_id(f).ok().flatten())
        {
            return format!("build-id:{id}");
        }
        let meta = std::env::current_exe().and_then(std::fs::metadata);
        match meta {
            Ok(m) => {
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                format!("size:{}:mtime:{mtime}", m.len())
            }
            Err(_) => "unknown".to_string(),
        }
    })
}

/// Reads the NT_GNU_BUILD_ID note of a 64-bit little-endian ELF file, touching only its
/// program headers and note segments (a few hundred bytes, however big the binary).
fn gnu_build_id(mut f: impl Read + Seek) -> std::io::Result<Option<String>> {
    let mut ehdr = [0u8; 64];
    f.read_exact(&mut ehdr)?;
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return Ok(None);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let phoff = u64_at(&ehdr, 0x20);
    let phentsize = usize::from(u16_at(&ehdr, 0x36));
    let phnum = usize::from(u16_at(&ehdr, 0x38));
    if phentsize < 0x28 || phnum > 256 {
        return Ok(None);
    }
    let mut phdrs = vec![0u8; phentsize * phnum];
    f.seek(SeekFrom::Start(phoff))?;
    f.read_exact(&mut phdrs)?;
    for ph in phdrs.chunks_exact(phentsize) {
        const PT_NOTE: u32 = 4;
        if u32_at(ph, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(ph, 0x08), u64_at(ph, 0x20));
        if size > 64 * 1024 {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut notes)?;
        let mut at = 0;
        while at + 12 <= notes.len() {
            let namesz = u32_at(&notes, at) as usize;
            let descsz = u32_at(&notes, at + 4) as usize;
            let kind = u32_at(&notes, at + 8);
            let name_at = at + 12;
            let desc_at = name_at + namesz.next_multiple_of(4);
            let end = desc_at + descsz.next_multiple_of(4);
            if end > notes.len() {
                break;
            }
            const NT_GNU_BUILD_ID: u32 = 3;
            if kind == NT_GNU_BUILD_ID && &notes[name_at..name_at + namesz] == b"GNU\0" {
                return Ok(Some(crate::parent::hex(&notes[desc_at..desc_at + descsz])));
            }
            at = end;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprint_is_stable_and_nonempty() {
        let a = super::fingerprint();
        // Debian's toolchain (and most Linux ones) link with --build-id.
        #[cfg(target_os = "linux")]
        assert!(
            a.starts_with("build-id:") && a.len() > "build-id:".len() + 16,
            "{a}"
        );
        #[cfg(not(target_os = "linux"))]
        assert!(a.starts_with("size:"), "{a}");
        assert_eq!(a, super::fingerprint());
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(super::new_token().unwrap(), super::new_token().unwrap());
    }
}
