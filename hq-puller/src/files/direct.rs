//! Writing downloads past the page cache (`O_DIRECT`).
//!
//! A verified content is written once and then only linked: keeping it in the page cache
//! buys nothing, and a buffered write costs a copy into the cache, the cache's bookkeeping,
//! and a writeback that the download's fsync then waits for. With `O_DIRECT` the disk
//! reads the download's own (aligned) buffer, so the fsync has only the inode left to
//! write (`bench-files`, 2 GiB: see tests/bench/notes/files.md).
//!
//! Direct writes need 4 KiB-aligned memory, offsets and lengths. The received bytes are
//! copied into an [`Aligned`] buffer (a memory copy, far cheaper than the page cache's);
//! a last partial block is written with an ordinary write.
//! A file system without `O_DIRECT` (tmpfs) refuses the open or a write with `EINVAL`:
//! the [`Sink`] then goes on with ordinary writes, so nothing depends on it.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;

/// Alignment of direct writes (memory, offset, length): the page size, which covers the
/// logical block size of the disks HQ runs on.
pub const ALIGN: usize = 4096;

/// Size of the pooled buffers: a gathered download (up to 1 MiB) fits in one.
pub const BUFFER: usize = 1 << 20;

/// Buffers kept for reuse (a fresh buffer costs a page fault per 4 KiB on first use).
const POOL_KEEP: usize = 32;

static POOL: Mutex<Vec<Aligned>> = Mutex::new(Vec::new());

/// A byte buffer of [`BUFFER`] bytes whose start is [`ALIGN`]-aligned.
pub struct Aligned {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    /// A buffer from the pool, or a new one.
    pub fn take() -> Aligned {
        let pooled = POOL.lock().ok().and_then(|mut p| p.pop());
        pooled.unwrap_or_else(|| {
            let vec = vec![0u8; BUFFER + ALIGN];
            let start = vec.as_ptr().align_offset(ALIGN);
            Aligned { vec, start, len: 0 }
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == BUFFER
    }

    /// Appends as much of `data` as fits; returns how much did.
    pub fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(BUFFER - self.len);
        let at = self.start + self.len;
        self.vec[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    pub fn bytes(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }
}

/// A dropped buffer goes back to the pool (or is freed when the pool is full).
impl Drop for Aligned {
    fn drop(&mut self) {
        if self.vec.is_empty() {
            return;
        }
        if let Ok(mut p) = POOL.lock() {
            if p.len() < POOL_KEEP {
                p.push(Aligned {
                    vec: std::mem::take(&mut self.vec),
                    start: self.start,
                    len: 0,
                });
            }
        }
    }
}

/// A file being written, directly when the file system allows it.
pub struct Sink {
    pub file: File,
    direct: bool,
    /// Bytes written so far.
    pos: u64,
}

/// `EINVAL`: how a file system or device refuses `O_DIRECT` or a direct write.
fn refused(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

impl Sink {
    /// Creates (truncates) `path` for direct writes; ordinary writes where the file system
    /// refuses `O_DIRECT`. `create` makes the file with the extra open flags given.
    pub fn create(
        path: &Path,
        create: impl Fn(&Path, i32) -> std::io::Result<File>,
    ) -> std::io::Result<Sink> {
        let direct = rustix::fs::OFlags::DIRECT.bits() as i32;
        let (file, direct) = match create(path, direct) {
            Ok(file) => (file, true),
            Err(e) if refused(&e) => (create(path, 0)?, false),
            Err(e) => return Err(e),
        };
        Ok(Sink {
            file,
            direct,
            pos: 0,
        })
    }

    /// Ordinary writes appended to `path`, which holds `pos` bytes (a resumed download).
    pub fn append(path: &Path, pos: u64) -> std::io::Result<Sink> {
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(Sink {
            file,
            direct: false,
            pos,
        })
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Writes `bytes`: when direct, whole [`ALIGN`] blocks from aligned memory (a full
    /// [`Aligned`] buffer).
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        debug_assert!(
            !self.direct
                || (bytes.len().is_multiple_of(ALIGN) && bytes.as_ptr().align_offset(ALIGN) == 0)
        );
        self.write_bytes(bytes)
    }

    /// Writes the last `bytes` (any length, from aligned memory): their whole blocks
    /// directly, the rest with an ordinary write (cheaper than a padded block cut back,
    /// which makes the file system read the block back to zero its end). Writes after
    /// it are ordinary ones. The caller still syncs the file.
    pub fn finish(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let whole = bytes.len() / ALIGN * ALIGN;
        let tail = if self.direct && whole < bytes.len() {
            self.write_bytes(&bytes[..whole])?;
            self.buffered()?;
            whole
        } else {
            0
        };
        self.write_bytes(&bytes[tail..])
    }

    /// Goes on with ordinary writes (the open file's flag cleared).
    fn buffered(&mut self) -> std::io::Result<()> {
        use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
        let flags = fcntl_getfl(&self.file)?;
        fcntl_setfl(&self.file, flags - OFlags::DIRECT)?;
        self.direct = false;
        Ok(())
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self.file.write_all(bytes) {
            Ok(()) => {
                self.pos += bytes.len() as u64;
                Ok(())
            }
            Err(e) if self.direct && refused(&e) => {
                // Refused by the file system or the device (its block size, say): go on
                // with ordinary writes from where the direct ones ended. A partly written
                // direct write left no more than it reported.
                self.buffered()?;
                self.file.set_len(self.pos)?;
                self.file.seek(SeekFrom::Start(self.pos))?;
                self.write_bytes(bytes)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::files::download::create_file as create;

    /// Writes `data` through a sink in pooled buffers, as the downloader does.
    fn write_all(path: &Path, data: &[u8]) -> bool {
        let mut sink = Sink::create(path, create).unwrap();
        let mut buf = Aligned::take();
        let mut rest = data;
        while !rest.is_empty() {
            let n = buf.fill(rest);
            rest = &rest[n..];
            if buf.is_full() {
                sink.write(buf.bytes()).unwrap();
                buf = Aligned::take();
            }
        }
        sink.finish(buf.bytes()).unwrap();
        sink.file.sync_all().unwrap();
        sink.is_direct()
    }

    #[test]
    fn lengths_aligned_or_not_are_written_exactly() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * BUFFER + 5000)
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        for len in [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            BUFFER,
            BUFFER + 1,
            data.len(),
        ] {
            let p = d.path().join(format!("f{len}"));
            write_all(&p, &data[..len]);
            assert_eq!(std::fs::read(&p).unwrap(), &data[..len], "length {len}");
        }
    }

    #[test]
    fn a_refused_direct_write_goes_on_buffered() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let mut sink = Sink::create(&p, create).unwrap();
        // An unaligned direct write is refused with EINVAL (where O_DIRECT is supported at
        // all): the sink must switch to ordinary writes and lose nothing.
        sink.write_bytes(b"abc").unwrap();
        sink.write_bytes(b"defg").unwrap();
        assert!(!sink.is_direct());
        drop(sink);
        assert_eq!(std::fs::read(&p).unwrap(), b"abcdefg");
    }

    #[test]
    fn pooled_buffers_are_aligned_and_empty() {
        let mut a = Aligned::take();
        a.fill(b"xyz");
        drop(a);
        let b = Aligned::take();
        assert!(b.is_empty());
        assert_eq!(b.bytes().as_ptr().align_offset(ALIGN), 0);
    }
}
