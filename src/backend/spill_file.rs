//! Optional spill file of the host tier (`[kv] spill`): the prompt blocks a tiered layer keeps
//! in RAM are also written to a memory-mapped file under the cache directory, size-capped, with
//! a CRC-32 per block. A fetch of a spilled block reads it from the file and checks the CRC; a
//! block that fails the check is not used (the RAM copy is, and the metrics count it).
//!
//! Honest scope: the RAM copy is kept alongside, so spilling does not lower RSS yet; it
//! exercises the path a later change needs to release the RAM of spilled blocks.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

/// Where one spilled block sits in the file.
#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: usize,
    /// bytes of K then V
    len: usize,
    crc: u32,
}

/// Why a block was not spilled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpillRefusal {
    /// The file is at its cap.
    CapReached,
}

pub struct SpillFile {
    path: PathBuf,
    _file: File,
    map: MmapMut,
    cap: usize,
    used: usize,
    /// (layer, block) → place in the file
    entries: HashMap<(usize, u32), Entry>,
}

impl SpillFile {
    /// A fresh file of `cap` bytes (sparse) in `dir`, removed when dropped.
    pub fn create(dir: &Path, cap: usize) -> std::io::Result<Self> {
        // it holds the prompt's keys and values, from which text can be recovered: 0700 / 0600
        crate::private_fs::create_dir_private(dir)?;
        let path = dir.join(format!(
            "kv-spill-{}-{:x}.bin",
            std::process::id(),
            unique()
        ));
        let file = crate::private_fs::create_new_private(&path)?;
        let result = (|| {
            file.set_len(cap.max(1) as u64)?;
            // SAFETY: the file was just created by this process under a unique name and is only
            // accessed through this map; nothing else truncates it while mapped.
            unsafe { MmapMut::map_mut(&file) }
        })();
        match result {
            Ok(map) => Ok(Self {
                path,
                _file: file,
                map,
                cap,
                used: 0,
                entries: HashMap::new(),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn blocks(&self) -> usize {
        self.entries.len()
    }

    pub fn contains(&self, layer: usize, block: u32) -> bool {
        self.entries.contains_key(&(layer, block))
    }

    /// Write one block (K rows then V rows, 16-bit).
    pub fn write(
        &mut self,
        layer: usize,
        block: u32,
        k: &[u16],
        v: &[u16],
    ) -> Result<(), SpillRefusal> {
        if self.entries.contains_key(&(layer, block)) {
            return Ok(());
        }
        let len = (k.len() + v.len()) * 2;
        if self.used + len > self.cap {
            return Err(SpillRefusal::CapReached);
        }
        let offset = self.used;
        let dst = &mut self.map[offset..offset + len];
        let (dk, dv) = dst.split_at_mut(k.len() * 2);
        for (d, s) in dk.chunks_exact_mut(2).zip(k) {
            d.copy_from_slice(&s.to_le_bytes());
        }
        for (d, s) in dv.chunks_exact_mut(2).zip(v) {
            d.copy_from_slice(&s.to_le_bytes());
        }
        let crc = crc32fast::hash(dst);
        self.entries
            .insert((layer, block), Entry { offset, len, crc });
        self.used += len;
        Ok(())
    }

    /// Read one block into `k` and `v` (their lengths are the block's). False when the block is
    /// not in the file or its CRC does not match (then `k`/`v` must not be used).
    pub fn read(&self, layer: usize, block: u32, k: &mut [u16], v: &mut [u16]) -> bool {
        let Some(e) = self.entries.get(&(layer, block)) else {
            return false;
        };
        if e.len != (k.len() + v.len()) * 2 {
            return false;
        }
        let src = &self.map[e.offset..e.offset + e.len];
        if crc32fast::hash(src) != e.crc {
            return false;
        }
        let (sk, sv) = src.split_at(k.len() * 2);
        for (d, s) in k.iter_mut().zip(sk.chunks_exact(2)) {
            *d = u16::from_le_bytes([s[0], s[1]]);
        }
        for (d, s) in v.iter_mut().zip(sv.chunks_exact(2)) {
            *d = u16::from_le_bytes([s[0], s[1]]);
        }
        true
    }

    /// Test hook: flip one byte of every spilled block, as a bad disk would.
    pub fn corrupt_every_block(&mut self) {
        for e in self.entries.values() {
            self.map[e.offset] ^= 0x5a;
        }
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = SpillFile::create(dir.path(), 1 << 16).unwrap();
        let (k, v): (Vec<u16>, Vec<u16>) = ((0..96).collect(), (100..196).collect());
        f.write(3, 7, &k, &v).unwrap();
        let (mut rk, mut rv) = (vec![0; 96], vec![0; 96]);
        assert!(f.read(3, 7, &mut rk, &mut rv));
        assert_eq!((rk, rv), (k, v));
        assert!(!f.read(3, 8, &mut [0; 96], &mut [0; 96]));
    }

    #[test]
    fn the_cap_refuses_a_block_that_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = SpillFile::create(dir.path(), 500).unwrap();
        f.write(0, 0, &[1; 100], &[2; 100]).unwrap();
        assert_eq!(
            f.write(0, 1, &[1; 100], &[2; 100]),
            Err(SpillRefusal::CapReached)
        );
        assert_eq!(f.used(), 400);
    }

    #[test]
    fn a_corrupted_block_is_detected_and_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = SpillFile::create(dir.path(), 1 << 12).unwrap();
        f.write(0, 0, &[1; 10], &[2; 10]).unwrap();
        f.corrupt_every_block();
        assert!(!f.read(0, 0, &mut [0; 10], &mut [0; 10]));
    }

    #[test]
    fn the_file_and_its_directory_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("kv-spill");
        let f = SpillFile::create(&spill, 100).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&spill), 0o700);
        assert_eq!(mode(&f.path), 0o600);
    }

    #[test]
    fn the_file_is_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        drop(SpillFile::create(dir.path(), 100).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
