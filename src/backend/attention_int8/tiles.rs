//! AMX tiles for the 8-bit attention's dot products: the instructions the kernel uses, behind
//! [`Tiles`], with two machines that carry them out: [`Amx`] (the CPU's tile registers through
//! `asm!`, where the CPU exposes AMX-INT8 and Linux grants the process the tile state) and
//! [`Emulated`] (the same instructions in Rust, following the Intel SDM's pseudocode, so that the
//! tile kernel's layouts, strides and padding are tested on CPUs without AMX).
//!
//! Every tile is configured as 16 rows of 64 bytes (palette 1). `tdpbsud` is the one product:
//! C (16 x 16 i32) += A (16 x 64 i8) · B (16 x 64 u8), where row k of B holds, for each of C's
//! 16 columns, the four bytes that meet A's bytes 4k..4k+4 (the "VNNI" layout).

/// The AMX instructions the tile kernel uses. Tile numbers are const parameters (they are part
/// of the instruction); [`WIRED`] lists the products the kernel issues.
pub trait Tiles {
    /// Load the tile configuration (every tile 16 rows of 64 bytes) on this thread.
    ///
    /// # Safety
    /// For [`Amx`]: the CPU exposes AMX-INT8 and the process holds the tile data (what
    /// [`amx_usable`] checks, with the probe, before it says yes).
    unsafe fn configure(&mut self);
    /// Return the tile state to its initial state (cheap context switches).
    ///
    /// # Safety
    /// As [`Tiles::configure`].
    unsafe fn release(&mut self);
    /// Tile `T` = 0.
    ///
    /// # Safety
    /// Configured on this thread.
    unsafe fn zero<const T: usize>(&mut self);
    /// Tile `T`'s 16 rows of 64 bytes from `src + r * stride`.
    ///
    /// # Safety
    /// Configured on this thread; the 16 rows are readable.
    unsafe fn load<const T: usize>(&mut self, src: *const u8, stride: usize);
    /// Tile `T`'s 16 rows of 64 bytes to `dst + r * stride`.
    ///
    /// # Safety
    /// Configured on this thread; the 16 rows are writable.
    unsafe fn store<const T: usize>(&mut self, dst: *mut u8, stride: usize);
    /// Tile `C` += tile `A` (i8) · tile `B` (u8): `tdpbsud`, wrapping i32 sums.
    ///
    /// # Safety
    /// Configured on this thread; (C, A, B) is in [`WIRED`].
    unsafe fn dot_su<const C: usize, const A: usize, const B: usize>(&mut self);
}

/// The (C, A, B) tile triples of `tdpbsud` that [`Amx`] encodes: the keys' product (C 0, A 1,
/// B 4..=7, one B tile per 64 channels of a head) and the values' (C 0..=3, A 5, B 4).
pub const WIRED: [(usize, usize, usize); 8] = [
    (0, 1, 4),
    (0, 1, 5),
    (0, 1, 6),
    (0, 1, 7),
    (0, 5, 4),
    (1, 5, 4),
    (2, 5, 4),
    (3, 5, 4),
];

/// Bytes a tile row holds; rows a tile has.
pub const ROW_BYTES: usize = 64;
pub const ROWS: usize = 16;

/// The tile instructions carried out in Rust on eight 1 KiB tiles.
pub struct Emulated {
    tiles: [[u8; ROWS * ROW_BYTES]; 8],
    configured: bool,
}

impl Default for Emulated {
    fn default() -> Self {
        Emulated {
            tiles: [[0; ROWS * ROW_BYTES]; 8],
            configured: false,
        }
    }
}

impl Emulated {
    fn tile<const T: usize>(&mut self) -> &mut [u8; ROWS * ROW_BYTES] {
        assert!(self.configured, "tile {T} used before the configuration");
        &mut self.tiles[T]
    }
}

impl Tiles for Emulated {
    unsafe fn configure(&mut self) {
        self.configured = true;
    }

    unsafe fn release(&mut self) {
        // TILERELEASE returns every tile to zero
        self.tiles = [[0; ROWS * ROW_BYTES]; 8];
        self.configured = false;
    }

    unsafe fn zero<const T: usize>(&mut self) {
        self.tile::<T>().fill(0);
    }

    unsafe fn load<const T: usize>(&mut self, src: *const u8, stride: usize) {
        let t = self.tile::<T>();
        for (r, row) in t.chunks_exact_mut(ROW_BYTES).enumerate() {
            // SAFETY: row r of the source is readable (the caller's promise)
            let s = unsafe { std::slice::from_raw_parts(src.add(r * stride), ROW_BYTES) };
            row.copy_from_slice(s);
        }
    }

    unsafe fn store<const T: usize>(&mut self, dst: *mut u8, stride: usize) {
        let t = self.tile::<T>();
        for (r, row) in t.chunks_exact(ROW_BYTES).enumerate() {
            // SAFETY: row r of the destination is writable (the caller's promise)
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(r * stride), ROW_BYTES) };
        }
    }

    unsafe fn dot_su<const C: usize, const A: usize, const B: usize>(&mut self) {
        assert!(
            WIRED.contains(&(C, A, B)),
            "tdpbsud tmm{C}, tmm{A}, tmm{B} is not wired"
        );
        assert!(self.configured, "tdpbsud before the configuration");
        let (a, b) = (self.tiles[A], self.tiles[B]);
        let c = &mut self.tiles[C];
        // FOR m, FOR k < A.colsb / 4, FOR n < C.colsb / 4:
        //   C[m].dword[n] += Σ_i sext(A[m].byte[4k + i]) * zext(B[k].byte[4n + i])
        for m in 0..ROWS {
            for n in 0..ROW_BYTES / 4 {
                let at = m * ROW_BYTES + 4 * n;
                let mut acc = i32::from_le_bytes(c[at..at + 4].try_into().unwrap());
                for k in 0..ROW_BYTES / 4 {
                    for i in 0..4 {
                        let x = a[m * ROW_BYTES + 4 * k + i] as i8 as i32;
                        let y = b[k * ROW_BYTES + 4 * n + i] as i32;
                        acc = acc.wrapping_add(x * y);
                    }
                }
                c[at..at + 4].copy_from_slice(&acc.to_le_bytes());
            }
        }
    }
}

/// The CPU's tile registers. Obtain the right to use them from [`amx_usable`].
#[cfg(target_arch = "x86_64")]
pub struct Amx;

/// Palette 1, every tile 16 rows of 64 bytes (the `ldtilecfg` operand).
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(target_arch = "x86_64")]
static CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1; // palette 1
    let mut t = 0;
    while t < 8 {
        // bytes 16.. : colsb of tile t (u16); bytes 48.. : rows of tile t
        c[16 + 2 * t] = ROW_BYTES as u8;
        c[48 + t] = ROWS as u8;
        t += 1;
    }
    TileConfig(c)
};

// The tile number is part of the instruction: one `asm!` per tile, chosen by a `match` on
// the const parameter (resolved at compile time).
#[cfg(target_arch = "x86_64")]
macro_rules! zero_tile {
    ($t:literal) => {
        std::arch::asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! load_tile {
    ($t:literal, $src:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tileloadd tmm", $t, ", [{s} + {k}*1]"),
            s = in(reg) $src,
            k = in(reg) $stride,
            options(nostack, readonly)
        )
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! store_tile {
    ($t:literal, $dst:expr, $stride:expr) => {
        std::arch::asm!(
            concat!("tilestored [{d} + {k}*1], tmm", $t),
            d = in(reg) $dst,
            k = in(reg) $stride,
            options(nostack)
        )
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! dot_tiles {
    ($c:literal, $a:literal, $b:literal) => {
        std::arch::asm!(
            concat!("tdpbsud tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nostack, nomem)
        )
    };
}

#[cfg(target_arch = "x86_64")]
impl Tiles for Amx {
    unsafe fn configure(&mut self) {
        // SAFETY: the process holds the tile state (the caller's promise)
        unsafe {
            std::arch::asm!("ldtilecfg [{c}]", c = in(reg) &CONFIG, options(nostack, readonly))
        }
    }

    unsafe fn release(&mut self) {
        // SAFETY: as configure
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) }
    }

    unsafe fn zero<const T: usize>(&mut self) {
        // SAFETY: configured on this thread (the caller's promise)
        unsafe {
            match T {
                0 => zero_tile!(0),
                1 => zero_tile!(1),
                2 => zero_tile!(2),
                3 => zero_tile!(3),
                4 => zero_tile!(4),
                5 => zero_tile!(5),
                6 => zero_tile!(6),
                7 => zero_tile!(7),
                _ => unreachable!("no tile {T}"),
            }
        }
    }

    unsafe fn load<const T: usize>(&mut self, src: *const u8, stride: usize) {
        // SAFETY: configured; 16 rows of 64 bytes readable (the caller's promise)
        unsafe {
            match T {
                0 => load_tile!(0, src, stride),
                1 => load_tile!(1, src, stride),
                2 => load_tile!(2, src, stride),
                3 => load_tile!(3, src, stride),
                4 => load_tile!(4, src, stride),
                5 => load_tile!(5, src, stride),
                6 => load_tile!(6, src, stride),
                7 => load_tile!(7, src, stride),
                _ => unreachable!("no tile {T}"),
            }
        }
    }

    unsafe fn store<const T: usize>(&mut self, dst: *mut u8, stride: usize) {
        // SAFETY: configured; 16 rows of 64 bytes writable (the caller's promise)
        unsafe {
            match T {
                0 => store_tile!(0, dst, stride),
                1 => store_tile!(1, dst, stride),
                2 => store_tile!(2, dst, stride),
                3 => store_tile!(3, dst, stride),
                4 => store_tile!(4, dst, stride),
                5 => store_tile!(5, dst, stride),
                6 => store_tile!(6, dst, stride),
                7 => store_tile!(7, dst, stride),
                _ => unreachable!("no tile {T}"),
            }
        }
    }

    unsafe fn dot_su<const C: usize, const A: usize, const B: usize>(&mut self) {
        // SAFETY: configured on this thread (the caller's promise); register operands only
        unsafe {
            match (C, A, B) {
                (0, 1, 4) => dot_tiles!(0, 1, 4),
                (0, 1, 5) => dot_tiles!(0, 1, 5),
                (0, 1, 6) => dot_tiles!(0, 1, 6),
                (0, 1, 7) => dot_tiles!(0, 1, 7),
                (0, 5, 4) => dot_tiles!(0, 5, 4),
                (1, 5, 4) => dot_tiles!(1, 5, 4),
                (2, 5, 4) => dot_tiles!(2, 5, 4),
                (3, 5, 4) => dot_tiles!(3, 5, 4),
                _ => unreachable!("tdpbsud tmm{C}, tmm{A}, tmm{B} is not wired"),
            }
        }
    }
}

/// Whether this process uses AMX-INT8, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmxStatus {
    Usable,
    /// `SLIMCHAT_NO_AMX` is set
    Declined,
    /// the CPU does not report AMX-TILE and AMX-INT8, or the OS does not enable their state
    NotExposed,
    /// Linux refused the tile data to this process
    Refused,
    /// the tiles computed a probe differently from the emulation: not trusted
    FailedProbe,
}

/// Whether this process may use AMX-INT8: the CPU reports AMX-TILE and AMX-INT8 (CPUID leaf 7),
/// the OS enables their state (XCR0 bits 17 and 18), Linux grants this process the tile data
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16 on), and the tiles then
/// compute [`probe`] exactly as [`Emulated`] does. Asked once. `SLIMCHAT_NO_AMX=1` in the
/// environment says no, for measuring the VNNI path on an AMX CPU.
pub fn amx_status() -> AmxStatus {
    static STATUS: std::sync::OnceLock<AmxStatus> = std::sync::OnceLock::new();
    *STATUS.get_or_init(|| {
        if std::env::var_os("SLIMCHAT_NO_AMX").is_some_and(|v| !v.is_empty() && v != "0") {
            AmxStatus::Declined
        } else if !cpu_reports_amx() {
            AmxStatus::NotExposed
        } else if !request_tile_data() {
            AmxStatus::Refused
        } else if !cpu_tiles_match_emulation() {
            AmxStatus::FailedProbe
        } else {
            AmxStatus::Usable
        }
    })
}

/// [`amx_status`] is `Usable`.
pub fn amx_usable() -> bool {
    amx_status() == AmxStatus::Usable
}

#[cfg(target_arch = "x86_64")]
fn cpu_tiles_match_emulation() -> bool {
    // SAFETY: the CPU reports AMX-INT8 and the process holds the tile data (`amx_status`
    // checked both before it asks)
    unsafe { probe(&mut Amx) == probe(&mut Emulated::default()) }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_tiles_match_emulation() -> bool {
    false
}

/// 16 rows of 64 bytes from a seed (every byte value, both signs as i8).
fn pattern(seed: u32) -> Vec<u8> {
    (0..(ROWS * ROW_BYTES) as u32)
        .map(|i| {
            (i.wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503))
                >> 13) as u8
        })
        .collect()
}

/// Every instruction form the kernel issues, on patterned tiles: loads at a stride of 64 and
/// of 96 bytes, each wired product, zeroing, and stores; returns the four accumulators.
///
/// # Safety
/// As [`Tiles::configure`] for `T`.
unsafe fn probe<T: Tiles>(t: &mut T) -> Vec<i32> {
    let a = pattern(1);
    let mut strided = vec![0xAAu8; ROWS * 96];
    for r in 0..ROWS {
        strided[r * 96..][..ROW_BYTES].copy_from_slice(&a[r * ROW_BYTES..][..ROW_BYTES]);
    }
    let (b4, b5, b6, b7) = (pattern(4), pattern(5), pattern(6), pattern(7));
    let mut out = vec![0i32; 4 * ROWS * ROWS];
    let base = out.as_mut_ptr();
    // SAFETY: quarters of `out`
    let at = |i: usize| unsafe { base.add(i * ROWS * ROWS) } as *mut u8;
    let (c0, c1, c2, c3) = (at(0), at(1), at(2), at(3));
    // SAFETY: every load reads 16 rows of its buffer at its stride, every store writes one
    // quarter of `out`; the tiles: the caller's promise
    unsafe {
        t.configure();
        t.load::<1>(strided.as_ptr(), 96);
        t.load::<4>(b4.as_ptr(), ROW_BYTES);
        t.load::<5>(b5.as_ptr(), ROW_BYTES);
        t.load::<6>(b6.as_ptr(), ROW_BYTES);
        t.load::<7>(b7.as_ptr(), ROW_BYTES);
        t.zero::<0>();
        t.dot_su::<0, 1, 4>();
        t.dot_su::<0, 1, 5>();
        t.dot_su::<0, 1, 6>();
        t.dot_su::<0, 1, 7>();
        t.zero::<1>();
        t.zero::<2>();
        t.zero::<3>();
        t.dot_su::<1, 5, 4>();
        t.dot_su::<2, 5, 4>();
        t.dot_su::<3, 5, 4>();
        t.dot_su::<0, 5, 4>();
        t.store::<0>(c0, ROW_BYTES);
        t.store::<1>(c1, ROW_BYTES);
        t.store::<2>(c2, ROW_BYTES);
        t.store::<3>(c3, ROW_BYTES);
        t.release();
    }
    out
}

#[cfg(target_arch = "x86_64")]
fn cpu_reports_amx() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // (CPUID exists on every x86_64 CPU; leaf 7 is read only where leaf 0 reports it)
    if __cpuid(0).eax < 7 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    let (tile, int8) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 25 & 1 == 1);
    let osxsave = __cpuid(1).ecx >> 27 & 1 == 1;
    if !(tile && int8 && osxsave) {
        return false;
    }
    let xcr0: u64 = {
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV with ECX = 0 is valid where CPUID reports OSXSAVE (checked above)
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        (hi as u64) << 32 | lo as u64
    };
    xcr0 >> 17 & 3 == 3
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_reports_amx() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks the kernel for a permission
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_data() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C += A · B by the definition: C[m][n] += Σ_k a[m][k] (signed) · b[k / 4][4 n + k % 4]
    /// (unsigned).
    fn product(a: &[u8], b: &[u8], c: &mut [i32]) {
        for m in 0..ROWS {
            for n in 0..ROWS {
                let mut acc = c[m * ROWS + n];
                for k in 0..ROW_BYTES {
                    let x = a[m * ROW_BYTES + k] as i8 as i32;
                    let y = b[(k / 4) * ROW_BYTES + 4 * n + k % 4] as i32;
                    acc = acc.wrapping_add(x * y);
                }
                c[m * ROWS + n] = acc;
            }
        }
    }

    #[test]
    fn emulated_tiles_compute_the_defined_products() {
        // SAFETY: emulated tiles
        let got = unsafe { probe(&mut Emulated::default()) };
        let (a, b) = (pattern(1), [pattern(4), pattern(5), pattern(6), pattern(7)]);
        let mut want = vec![0i32; 4 * ROWS * ROWS];
        let (c0, rest) = want.split_at_mut(ROWS * ROWS);
        for b in &b {
            product(&a, b, c0);
        }
        product(&b[1], &b[0], c0);
        for c in rest.chunks_exact_mut(ROWS * ROWS) {
            product(&b[1], &b[0], c);
        }
        assert_eq!(got, want);
        // signed A: sums of both signs
        assert!(want.iter().any(|&x| x < 0) && want.iter().any(|&x| x > 0));
    }

    /// On a CPU whose tiles this process uses, the tile registers compute what the emulation
    /// does (`amx_status` checked it before saying `Usable`); elsewhere this says why not.
    #[test]
    fn amx_tiles_match_the_emulation_where_usable() {
        let status = amx_status();
        if status != AmxStatus::Usable {
            println!("AMX {status:?} here: the tile kernel is checked on emulated tiles only");
            assert_ne!(status, AmxStatus::FailedProbe, "the CPU's tiles disagree");
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `Usable`: the process holds the tile data
            let (cpu, emulated) = unsafe { (probe(&mut Amx), probe(&mut Emulated::default())) };
            assert_eq!(cpu, emulated);
            println!("AMX tiles checked against the emulation");
        }
    }

    #[test]
    #[should_panic(expected = "not wired")]
    fn emulation_refuses_a_product_the_cpu_path_does_not_encode() {
        let mut t = Emulated::default();
        // SAFETY: emulated tiles
        unsafe {
            t.configure();
            t.dot_su::<1, 2, 3>();
        }
    }
}
