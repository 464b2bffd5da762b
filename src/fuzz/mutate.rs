//! A seeded byte mutator: xorshift64* randomness and the classic mutations of a
//! coverage-blind fuzzer (bit flips, byte sets, interesting integers written over lengths and
//! counts, truncation, splicing with another seed, repeated and deleted chunks, dictionary
//! words). Every case is a function of its seed, so a failure is reproduced from one number.

/// xorshift64* (Vigna): small, fast, and good enough to choose mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so nearby seeds start far apart (and 0 is no fixed point)
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Integers that break length and count checks, as u64 (written at widths 1, 2, 4 and 8).
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    31,
    32,
    33,
    63,
    64,
    127,
    128,
    255,
    256,
    1023,
    1024,
    4096,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    1 << 60,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX - 1,
    u64::MAX,
];

/// How a case is made from its seeds.
pub struct Mutator<'a> {
    pub rng: Rng,
    /// Other inputs to splice from.
    pub corpus: &'a [Vec<u8>],
    /// Tokens of the input language (Jinja, TOML, JSON, GGUF keys) to insert.
    pub dictionary: &'a [&'a str],
    /// Mutations are concentrated in the first `hot` bytes when set (a GGUF header).
    pub hot: Option<usize>,
}

impl Mutator<'_> {
    /// 1 to 8 stacked mutations of `input`.
    pub fn mutate(&mut self, input: &mut Vec<u8>) {
        let rounds = 1 + self.rng.below(8);
        for _ in 0..rounds {
            self.one(input);
        }
    }

    fn pos(&mut self, len: usize) -> usize {
        let span = match self.hot {
            Some(h) if h > 0 && !self.rng.chance(8) => h.min(len),
            _ => len,
        };
        self.rng.below(span.max(1))
    }

    fn one(&mut self, b: &mut Vec<u8>) {
        if b.is_empty() {
            b.push(self.rng.next_u64() as u8);
            return;
        }
        let len = b.len();
        match self.rng.below(12) {
            0 => {
                let i = self.pos(len);
                b[i] ^= 1 << self.rng.below(8);
            }
            1 => {
                let i = self.pos(len);
                b[i] = self.rng.next_u64() as u8;
            }
            2 | 3 => {
                // an interesting integer over 1, 2, 4 or 8 bytes, little-endian
                let v = *self.rng.pick(INTERESTING);
                let v = if self.rng.chance(4) {
                    v.wrapping_neg()
                } else {
                    v
                };
                let width = *self.rng.pick(&[1usize, 2, 4, 8, 8, 8]);
                let i = self.pos(len);
                let end = (i + width).min(len);
                b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
            }
            4 => {
                // add or subtract a little from a little-endian u64 (a length off by a few)
                let i = self.pos(len);
                if i + 8 <= len {
                    let v = u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
                    let d = 1 + self.rng.below(64) as u64;
                    let v = if self.rng.chance(2) {
                        v.wrapping_add(d)
                    } else {
                        v.wrapping_sub(d)
                    };
                    b[i..i + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            5 => b.truncate(self.rng.below(len)),
            6 => {
                // delete a chunk
                let i = self.pos(len);
                let n = 1 + self.rng.below((len - i).min(256));
                b.drain(i..i + n);
            }
            7 => {
                // repeat a chunk
                let i = self.pos(len);
                let n = 1 + self.rng.below((len - i).min(64));
                let chunk = b[i..i + n].to_vec();
                let times = 1 + self.rng.below(16);
                for _ in 0..times {
                    b.splice(i..i, chunk.iter().copied());
                }
            }
            8 => {
                // splice: our head, another input's tail
                if let Some(other) = self.corpus.get(self.rng.below(self.corpus.len())) {
                    if !other.is_empty() {
                        let cut = self.pos(len);
                        let from = self.rng.below(other.len());
                        b.truncate(cut);
                        b.extend_from_slice(&other[from..]);
                    }
                }
            }
            9 | 10 if !self.dictionary.is_empty() => {
                let word = self.rng.pick(self.dictionary).as_bytes().to_vec();
                let i = self.pos(len + 1).min(len);
                if self.rng.chance(2) {
                    b.splice(i..i, word);
                } else {
                    let end = (i + word.len()).min(len);
                    b.splice(i..end, word);
                }
            }
            _ => {
                // copy a chunk over another place
                let i = self.pos(len);
                let j = self.pos(len);
                let n = 1 + self.rng.below((len - i.max(j)).min(32));
                let chunk = b[i..i + n].to_vec();
                b[j..j + n].copy_from_slice(&chunk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_makes_the_same_case() {
        let corpus = vec![b"other input".to_vec()];
        let run = |seed| {
            let mut m = Mutator {
                rng: Rng::new(seed),
                corpus: &corpus,
                dictionary: &["{{", "}}"],
                hot: None,
            };
            let mut b = b"hello world, a seed input".to_vec();
            for _ in 0..50 {
                m.mutate(&mut b);
                if b.len() > 4096 {
                    b.truncate(4096);
                }
            }
            b
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
