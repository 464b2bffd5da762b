//! Token counts of text waiting to be sent (paste chips, the typed message): exact with the
//! model's tokenizer once it has loaded, an estimate of 4 characters a token before that.
//! Counts are remembered by text hash, so redrawing does not tokenize a long paste again.

use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tokenizers::Tokenizer;

/// The model's tokenizer, shared with the engine thread.
#[derive(Clone)]
pub struct SharedTokenizer(pub Arc<Tokenizer>);

impl std::fmt::Debug for SharedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedTokenizer")
    }
}

/// A count and whether it came from the tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    pub tokens: usize,
    pub exact: bool,
}

/// Entries kept before the memo starts over (each typed keystroke adds one).
const MEMO_ENTRIES: usize = 256;

#[derive(Debug, Clone, Default)]
pub struct TokenCounter {
    tokenizer: Option<SharedTokenizer>,
    memo: RefCell<HashMap<u64, usize>>,
}

impl TokenCounter {
    pub fn set_tokenizer(&mut self, t: SharedTokenizer) {
        self.tokenizer = Some(t);
        self.memo.borrow_mut().clear();
    }

    pub fn count(&self, text: &str) -> Count {
        let Some(SharedTokenizer(tok)) = &self.tokenizer else {
            return Count {
                tokens: estimate_tokens(text.chars().count()),
                exact: false,
            };
        };
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        let key = h.finish();
        if let Some(&n) = self.memo.borrow().get(&key) {
            return Count {
                tokens: n,
                exact: true,
            };
        }
        let Ok(enc) = tok.encode(text, false) else {
            return Count {
                tokens: estimate_tokens(text.chars().count()),
                exact: false,
            };
        };
        let n = enc.len();
        let mut memo = self.memo.borrow_mut();
        if memo.len() >= MEMO_ENTRIES {
            memo.clear();
        }
        memo.insert(key, n);
        Count {
            tokens: n,
            exact: true,
        }
    }
}

/// About how many tokens `chars` characters of text make (4 chars a token for English).
pub fn estimate_tokens(chars: usize) -> usize {
    chars.div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_without_a_tokenizer() {
        let c = TokenCounter::default().count("abcdefghi");
        assert_eq!(
            c,
            Count {
                tokens: 3,
                exact: false
            }
        );
    }
}
