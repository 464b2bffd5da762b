//! The two integer dot-product microkernels of the 8-bit prefill attention, in a portable
//! version, an AVX-512 VNNI one (`vpdpbusd`: 16 lanes, each the sum of four u8 x i8
//! products added to an i32) and one on AMX tiles ([`tiled`]: 16 x 16 i32 a `tdpbsud`, on
//! the CPU's tiles or emulated ones). All give the same integers, so the attention built on
//! them gives the same bits on any path.
//!
//! Lanes are 16 stacked query rows (one "row vector"). Layouts:
//! - `qk`: the rows' queries as u8 (int8 + 128), packed `[hd/4][16 lanes][4 bytes]`; keys
//!   int8 row-major `(key, hd)`. Out: `(keys, 16)` i32 dots of the int8 queries: each key's
//!   sum starts at `kstart` (-128 x the key's byte sum: what the u8 offset adds, taken off). The VNNI
//!   version goes on to the masked f32 logits while the dots are in registers.
//! - `pv`: the rows' probabilities as u8, four keys a lane packed in one u32,
//!   `[steps][16 lanes]`, only the groups of four keys where some row's weight is not 0, with
//!   their index `at` (a group of four whose 64 weights all round to 0 adds nothing: in a
//!   peaked head most of them); values int8 in groups of four keys, `[group][hd][4 keys]`, from
//!   the group of the block's first key (a channel's four keys are one 32-bit broadcast, and
//!   the channels of a group sit at fixed offsets from one pointer).
//!   Out: `(hd, 16)` i32 sums over the block's keys.
//!
//! On tiles the queries' packing is B of the keys' product as it stands (a row of it: four
//! channels of each of 16 lanes), the probabilities' packing B of the values' product, and
//! A is read from the key rows and from values stored channel-major (`vt`, a channel's keys
//! in a row): every group of four keys of a block, in order.

/// Lanes per row vector.
pub const LANES: usize = 16;

/// `out[j][lane] = kstart[j] + sum_d q_u8[lane][d] * k[j][d]` for keys `0..keys`.
pub fn qk_scalar(q: &[u8], k: &[i8], kstart: &[i32], hd: usize, keys: usize, out: &mut [i32]) {
    for j in 0..keys {
        let kr = &k[j * hd..][..hd];
        for lane in 0..LANES {
            let mut acc = kstart[j];
            for d4 in 0..hd / 4 {
                for b in 0..4 {
                    acc += q[(d4 * LANES + lane) * 4 + b] as i32 * kr[d4 * 4 + b] as i32;
                }
            }
            out[j * LANES + lane] = acc;
        }
    }
}

/// `out[d][lane] = sum_s sum_b p[s][lane].byte(b) * v4[at[s]][d][b]` for `steps` groups of
/// four keys.
pub fn pv_scalar(p: &[u32], at: &[u32], v4: &[i8], hd: usize, steps: usize, out: &mut [i32]) {
    for d in 0..hd {
        for lane in 0..LANES {
            let mut acc = 0i32;
            for s in 0..steps {
                let w = p[s * LANES + lane];
                let v = &v4[(at[s] as usize * hd + d) * 4..][..4];
                for (b, &v) in v.iter().enumerate() {
                    acc += ((w >> (8 * b)) & 0xFF) as i32 * v as i32;
                }
            }
            out[d * LANES + lane] = acc;
        }
    }
}

/// The two products on AMX tiles ([`super::tiles`]), on the CPU's tiles or their emulation.
/// Heads of a multiple of 64 channels, up to 256.
pub mod tiled {
    use super::super::tiles::{Tiles, ROWS, ROW_BYTES};
    use super::LANES;

    /// `out[j][lane] = sum_d q_u8[lane][d] * k[j][d]` for keys `0..keys` rounded up to 16
    /// (without `kstart`: the logits add it). A tile is 16 keys' rows (64 channels of each)
    /// times 16 rows of the packed queries (the same 64 channels, four of each lane a row).
    ///
    /// # Safety
    /// The tiles are configured on this thread; `q` holds hd/4 x 64 bytes ([`super::qk_scalar`]'s
    /// layout); `k` is readable for keys.div_ceil(16) x 16 rows of hd bytes; `out` writable for
    /// as many rows of 16 i32; hd is 64, 128, 192 or 256.
    pub unsafe fn qk<T: Tiles>(
        t: &mut T,
        q: *const u8,
        k: *const i8,
        hd: usize,
        keys: usize,
        out: *mut i32,
    ) {
        debug_assert!(hd.is_multiple_of(ROW_BYTES) && hd <= 4 * ROW_BYTES);
        let parts = hd / ROW_BYTES;
        let part = ROWS * ROW_BYTES;
        // SAFETY: the reads and writes the caller promised
        unsafe {
            t.load::<4>(q, ROW_BYTES);
            if parts > 1 {
                t.load::<5>(q.add(part), ROW_BYTES);
            }
            if parts > 2 {
                t.load::<6>(q.add(2 * part), ROW_BYTES);
            }
            if parts > 3 {
                t.load::<7>(q.add(3 * part), ROW_BYTES);
            }
            for j in (0..keys).step_by(ROWS) {
                let kj = k.add(j * hd) as *const u8;
                t.zero::<0>();
                t.load::<1>(kj, hd);
                t.dot_su::<0, 1, 4>();
                if parts > 1 {
                    t.load::<1>(kj.add(ROW_BYTES), hd);
                    t.dot_su::<0, 1, 5>();
                }
                if parts > 2 {
                    t.load::<1>(kj.add(2 * ROW_BYTES), hd);
                    t.dot_su::<0, 1, 6>();
                }
                if parts > 3 {
                    t.load::<1>(kj.add(3 * ROW_BYTES), hd);
                    t.dot_su::<0, 1, 7>();
                }
                t.store::<0>(out.add(j * LANES) as *mut u8, LANES * 4);
            }
        }
    }

    /// `out[d][lane] = sum_s sum_b p[s][lane].byte(b) * vt[d][4 s + b]` over `steps` groups of
    /// four consecutive keys (every group: the tiles take the zeros at full rate). A tile is 16
    /// channels' rows of `vt` (64 keys of each) times 16 rows of `p` (the same 64 keys, four of
    /// each lane a row); four channel tiles at a time.
    ///
    /// # Safety
    /// The tiles are configured on this thread; `p` holds steps.div_ceil(16) x 16 rows of 16
    /// u32, those past `steps` zero; `vt` is readable for hd rows at `vt_stride` bytes, each
    /// for steps.div_ceil(16) x 64 bytes; `out` writable for hd x 16 i32; hd a multiple of 64.
    pub unsafe fn pv<T: Tiles>(
        t: &mut T,
        p: *const u32,
        vt: *const i8,
        vt_stride: usize,
        hd: usize,
        steps: usize,
        out: *mut i32,
    ) {
        debug_assert!(hd.is_multiple_of(4 * ROWS));
        let vt = vt as *const u8;
        // SAFETY: the reads and writes the caller promised
        unsafe {
            for d0 in (0..hd).step_by(4 * ROWS) {
                t.zero::<0>();
                t.zero::<1>();
                t.zero::<2>();
                t.zero::<3>();
                for c in 0..steps.div_ceil(ROWS) {
                    t.load::<4>(p.add(c * ROWS * LANES) as *const u8, LANES * 4);
                    let a = |i: usize| vt.add((d0 + i * ROWS) * vt_stride + c * ROW_BYTES);
                    t.load::<5>(a(0), vt_stride);
                    t.dot_su::<0, 5, 4>();
                    t.load::<5>(a(1), vt_stride);
                    t.dot_su::<1, 5, 4>();
                    t.load::<5>(a(2), vt_stride);
                    t.dot_su::<2, 5, 4>();
                    t.load::<5>(a(3), vt_stride);
                    t.dot_su::<3, 5, 4>();
                }
                let o = |i: usize| out.add((d0 + i * ROWS) * LANES) as *mut u8;
                t.store::<0>(o(0), LANES * 4);
                t.store::<1>(o(1), LANES * 4);
                t.store::<2>(o(2), LANES * 4);
                t.store::<3>(o(3), LANES * 4);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// Keys a `qk_logits` step handles at once: independent accumulators, enough to cover
    /// `vpdpbusd`'s latency at two a cycle, with one query load for every 16 dots.
    const KEYS: usize = 16;

    /// Four key bytes at `p`, broadcast (LLVM folds it into `vpdpbusd`'s memory operand).
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        // SAFETY (caller): p..p+4 is readable.
        unsafe { _mm512_set1_epi32((p as *const i32).read_unaligned()) }
    }

    /// The masked logit of key `jj` from its dot (what [`super::super::softmax::logits`]
    /// computes from the stored dot: the same operations, so the same bits).
    #[inline(always)]
    unsafe fn logit(acc: __m512i, ks: f32, m: &Mask, jj: usize) -> __m512 {
        let x = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(ks));
        if jj < m.dead {
            _mm512_set1_ps(f32::NEG_INFINITY)
        } else if jj >= m.open {
            let j = _mm512_set1_epi32((m.j0 + jj) as i32);
            let hidden = _mm512_cmpge_epi32_mask(j, m.vis);
            _mm512_mask_mov_ps(x, hidden, _mm512_set1_ps(f32::NEG_INFINITY))
        } else {
            x
        }
    }

    /// The logits of keys j..j+KEYS from their dots (row vectors of 16 lanes) into `out`, and
    /// `bmax` their max with it.
    ///
    /// # Safety
    /// The CPU has AVX-512F; kscale holds keys j..j+KEYS, out their rows.
    #[inline(always)]
    unsafe fn emit(
        acc: &[__m512i; KEYS],
        j: usize,
        kscale: &[f32],
        m: &Mask,
        out: *mut f32,
        bmax: &mut __m512,
    ) {
        // SAFETY: rows j..j+KEYS of kscale and out (the caller's promise)
        unsafe {
            if j >= m.dead && j + KEYS <= m.open {
                // every row sees all 16 keys (the common case): no mask, straight code, and
                // the max in two chains (max is exact: the same bits in any order)
                let mut odd = *bmax;
                for (t, a) in acc.iter().enumerate() {
                    let ks = _mm512_set1_ps(*kscale.get_unchecked(j + t));
                    let x = _mm512_mul_ps(_mm512_cvtepi32_ps(*a), ks);
                    _mm512_storeu_ps(out.add((j + t) * LANES), x);
                    if t % 2 == 0 {
                        *bmax = _mm512_max_ps(*bmax, x);
                    } else {
                        odd = _mm512_max_ps(odd, x);
                    }
                }
                *bmax = _mm512_max_ps(*bmax, odd);
            } else {
                for (t, a) in acc.iter().enumerate() {
                    emit_one(*a, j + t, kscale, m, out, bmax);
                }
            }
        }
    }

    /// [`emit`] for the one key j.
    ///
    /// # Safety
    /// As [`emit`], for key j.
    #[inline(always)]
    unsafe fn emit_one(
        acc: __m512i,
        j: usize,
        kscale: &[f32],
        m: &Mask,
        out: *mut f32,
        bmax: &mut __m512,
    ) {
        // SAFETY: row j of kscale and out (the caller's promise)
        unsafe {
            let x = logit(acc, *kscale.get_unchecked(j), m, j);
            _mm512_storeu_ps(out.add(j * LANES), x);
            *bmax = _mm512_max_ps(*bmax, x);
        }
    }

    /// Key j's dots (16 lanes) plus its start.
    ///
    /// # Safety
    /// Row j of `dots` and entry j of `kstart` are readable; the CPU has AVX-512F.
    #[inline(always)]
    unsafe fn dot_row(dots: *const i32, kstart: *const i32, j: usize) -> __m512i {
        // SAFETY: as the caller promised
        unsafe {
            let d = _mm512_loadu_si512(dots.add(j * LANES) as *const _);
            _mm512_add_epi32(d, _mm512_set1_epi32(*kstart.add(j)))
        }
    }

    /// [`qk_logits`]'s logits from dots computed elsewhere (the tile kernel's, without the
    /// keys' starts): `dots` holds `kscale.len()` rows of 16 i32, `kstart` as many starts.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW; the buffers hold kscale.len() rows.
    #[inline(always)]
    pub unsafe fn logits_of_dots(
        dots: *const i32,
        kstart: *const i32,
        kscale: &[f32],
        (vis, j0, dead, open): (&[i32; LANES], usize, usize, usize),
        out: *mut f32,
    ) -> [f32; LANES] {
        let keys = kscale.len();
        // SAFETY: rows below keys (the caller's promise)
        unsafe {
            let m = Mask::new(vis, j0, dead, open);
            let mut bmax = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut acc = [_mm512_setzero_si512(); KEYS];
            let mut j = 0;
            // (loops, not `array::from_fn`: a closure called from a function compiled without
            // this one's target features does not inline the intrinsics)
            while j + KEYS <= keys {
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = dot_row(dots, kstart, j + t);
                }
                emit(&acc, j, kscale, &m, out, &mut bmax);
                j += KEYS;
            }
            while j < keys {
                emit_one(dot_row(dots, kstart, j), j, kscale, &m, out, &mut bmax);
                j += 1;
            }
            lanes(bmax)
        }
    }

    /// Which keys of a block are masked (see [`super::super::softmax::logits`]).
    struct Mask {
        vis: __m512i,
        j0: usize,
        dead: usize,
        open: usize,
    }

    impl Mask {
        #[inline(always)]
        unsafe fn new(vis: &[i32; LANES], j0: usize, dead: usize, open: usize) -> Mask {
            Mask {
                // SAFETY: 16 i32 (the caller has AVX-512F)
                vis: unsafe { _mm512_loadu_si512(vis.as_ptr() as *const _) },
                j0,
                dead,
                open,
            }
        }
    }

    /// The 16 lanes of a block max.
    #[inline(always)]
    unsafe fn lanes(bmax: __m512) -> [f32; LANES] {
        let mut r = [0.0f32; LANES];
        // SAFETY: 16 f32 (the caller has AVX-512F)
        unsafe { _mm512_storeu_ps(r.as_mut_ptr(), bmax) };
        r
    }

    /// [`super::qk_scalar`] followed by [`super::super::softmax::logits`], on VNNI, with each
    /// key's logit computed from its accumulator (no i32 dots stored and read back): logits
    /// of the `kscale.len()` keys from key row `k` on into `out` (keys x 16), their max
    /// returned. `HD` is the head size when it is known at compile time (the keys' offsets
    /// are then immediates), else 0 and `hd` gives it.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VNNI; `q` holds hd/4 x 64 bytes, `k` kscale.len() x hd bytes,
    /// `kstart` kscale.len() i32, `out` kscale.len() x 16 f32; hd is a multiple of 4.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub unsafe fn qk_logits<const HD: usize>(
        q: *const u8,
        k: *const i8,
        kstart: *const i32,
        kscale: &[f32],
        hd: usize,
        (vis, j0, dead, open): (&[i32; LANES], usize, usize, usize),
        out: *mut f32,
    ) -> [f32; LANES] {
        let hd = if HD > 0 { HD } else { hd };
        let hd4 = hd / 4;
        let keys = kscale.len();
        // SAFETY: every read is of q's hd4 vectors or of key rows below keys; every write of
        // out's rows below keys (the caller's promise)
        unsafe {
            let m = Mask::new(vis, j0, dead, open);
            let mut bmax = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut j = 0;
            while j + KEYS <= keys {
                let mut acc = [_mm512_setzero_si512(); KEYS];
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_set1_epi32(*kstart.add(j + t));
                }
                let kj = k.add(j * hd);
                for d4 in 0..hd4 {
                    let qv = _mm512_loadu_si512(q.add(d4 * 64) as *const _);
                    for (t, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_dpbusd_epi32(*a, qv, bcast4(kj.add(t * hd + 4 * d4)));
                    }
                }
                emit(&acc, j, kscale, &m, out, &mut bmax);
                j += KEYS;
            }
            while j < keys {
                let mut acc = _mm512_set1_epi32(*kstart.add(j));
                let kj = k.add(j * hd);
                for d4 in 0..hd4 {
                    let qv = _mm512_loadu_si512(q.add(d4 * 64) as *const _);
                    acc = _mm512_dpbusd_epi32(acc, qv, bcast4(kj.add(4 * d4)));
                }
                emit_one(acc, j, kscale, &m, out, &mut bmax);
                j += 1;
            }
            lanes(bmax)
        }
    }

    /// Value channels a `pv_vnni` pass handles: independent accumulators, one load of the
    /// weights and one group index for every 16 dots.
    const CHANNELS: usize = 16;

    /// [`super::pv_scalar`] on VNNI, `CHANNELS` value channels at a time. `HD` as in
    /// [`qk_logits`].
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VNNI; `p` holds steps x 16 u32 and `at` steps indices, `v4`
    /// groups at[s] of hd x 4 bytes, `out` hd x 16 i32; hd is a multiple of 16.
    #[inline(always)]
    pub unsafe fn pv_vnni<const HD: usize>(
        p: *const u32,
        at: *const u32,
        v4: *const i8,
        hd: usize,
        steps: usize,
        out: *mut i32,
    ) {
        let hd = if HD > 0 { HD } else { hd };
        // SAFETY: reads of p's and at's steps entries and of v4's groups at[s]; writes of out's
        // hd rows (the caller's promise)
        unsafe {
            for d0 in (0..hd).step_by(CHANNELS) {
                let mut acc = [_mm512_setzero_si512(); CHANNELS];
                for s in 0..steps {
                    let pv = _mm512_loadu_si512(p.add(s * LANES) as *const _);
                    let group = v4.add((*at.add(s) as usize * hd + d0) * 4);
                    for (dd, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_dpbusd_epi32(*a, pv, bcast4(group.add(4 * dd)));
                    }
                }
                for (dd, a) in acc.iter().enumerate() {
                    _mm512_storeu_si512(out.add((d0 + dd) * LANES) as *mut _, *a);
                }
            }
        }
    }
}
