//! Do the dense and pruned answers of a compare (F2) agree? Identical text, or the same facts
//! (numbers and names) said differently, or different facts, and where the words part.

use std::collections::{HashMap, HashSet};

/// How two answers to one question relate.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    pub identical: bool,
    /// Words of the dense answer.
    pub dense_words: usize,
    /// Index of the first word where they differ (None when identical).
    pub first_difference: Option<usize>,
    /// Share of the dense answer's words (as a bag) that the pruned answer also has.
    pub shared: f64,
    /// Numbers and names in the dense answer that the pruned one lacks, and the reverse.
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    /// Numbers and names the dense answer has.
    pub terms: usize,
}

/// Compare two answers word by word.
pub fn agreement(dense: &str, slim: &str) -> Agreement {
    let a: Vec<&str> = dense.split_whitespace().collect();
    let b: Vec<&str> = slim.split_whitespace().collect();
    let identical = a == b;
    let first_difference =
        (!identical).then(|| a.iter().zip(&b).take_while(|(x, y)| x == y).count());
    // the bag of the pruned answer's words, counted (linear: answers can be long)
    let mut pool: HashMap<String, usize> = HashMap::new();
    for w in &b {
        *pool.entry(w.to_lowercase()).or_default() += 1;
    }
    let mut shared = 0usize;
    for w in &a {
        if let Some(n) = pool.get_mut(&w.to_lowercase()).filter(|n| **n > 0) {
            *n -= 1;
            shared += 1;
        }
    }
    let (ka, kb) = (key_terms(&a), key_terms(&b));
    // a term is missing from the other answer only when none of its words is the term
    let words =
        |ws: &[&str]| -> HashSet<String> { ws.iter().map(|w| bare(w).to_lowercase()).collect() };
    let (wa, wb) = (words(&a), words(&b));
    Agreement {
        identical,
        dense_words: a.len(),
        first_difference,
        shared: if a.is_empty() {
            1.0
        } else {
            shared as f64 / a.len() as f64
        },
        missing: ka
            .iter()
            .filter(|t| !wb.contains(&t.to_lowercase()))
            .cloned()
            .collect(),
        extra: kb
            .iter()
            .filter(|t| !wa.contains(&t.to_lowercase()))
            .cloned()
            .collect(),
        terms: ka.len(),
    }
}

/// A word without the punctuation around it.
fn bare(w: &str) -> &str {
    w.trim_matches(|c: char| !c.is_alphanumeric())
}

/// Numbers and capitalised words that do not open a sentence, without their punctuation, in
/// order of first appearance.
fn key_terms(words: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut sentence_start = true;
    for w in words {
        let t = bare(w);
        let is_number = t.chars().any(|c| c.is_ascii_digit());
        let is_name = !sentence_start && t.chars().next().is_some_and(char::is_uppercase);
        if (is_number || is_name) && seen.insert(t) {
            out.push(t.to_string());
        }
        sentence_start = w.ends_with(['.', '!', '?', ':']);
    }
    out
}

impl Agreement {
    /// One line for the status bar and the transcript.
    pub fn summary(&self) -> String {
        if self.identical {
            return "answers identical".into();
        }
        let part = format!(
            "parting at word {} of {}, {:.0}% of dense's words shared",
            self.first_difference.unwrap_or(0) + 1,
            self.dense_words,
            self.shared * 100.0
        );
        if self.missing.is_empty() && self.extra.is_empty() {
            return if self.terms > 0 {
                format!("same numbers and names, worded differently ({part})")
            } else {
                format!("answers differ ({part})")
            };
        }
        let list = |v: &[String]| v.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
        let mut s = String::from("answers differ:");
        if !self.missing.is_empty() {
            s.push_str(&format!(" pruned lacks {}", list(&self.missing)));
        }
        if !self.extra.is_empty() {
            let sep = if self.missing.is_empty() { "" } else { ";" };
            s.push_str(&format!("{sep} pruned adds {}", list(&self.extra)));
        }
        format!("{s} ({part})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_answers_agree() {
        let a = agreement("The code is 48213.", "The  code is 48213.");
        assert!(a.identical);
        assert_eq!(a.summary(), "answers identical");
    }

    #[test]
    fn the_same_facts_worded_differently_are_told_apart_from_different_facts() {
        let a = agreement(
            "The keeper is Agnes Thornbury, in room 417.",
            "Agnes Thornbury keeps it; room 417.",
        );
        assert!(!a.identical && a.missing.is_empty() && a.extra.is_empty());
        assert!(
            a.summary().starts_with("same numbers and names"),
            "{}",
            a.summary()
        );

        let b = agreement("The code is 48213.", "The code is 48231.");
        assert_eq!(b.missing, vec!["48213"]);
        assert_eq!(b.extra, vec!["48231"]);
        assert_eq!(b.first_difference, Some(3));
        assert!(
            b.summary()
                .contains("pruned lacks 48213; pruned adds 48231"),
            "{}",
            b.summary()
        );
        assert!(b
            .summary()
            .contains("parting at word 4 of 4, 75% of dense's words shared"));

        let c = agreement("Dense answer.", "Pruned answer.");
        assert!(
            c.summary()
                .starts_with("answers differ (parting at word 1 of 2"),
            "{}",
            c.summary()
        );
    }

    /// Found by the fuzzer: two long answers (a compare with a large max_tokens) took minutes,
    /// the word bag and term lists being compared pairwise. Now linear, and counted as a bag.
    #[test]
    fn long_answers_compare_in_linear_time() {
        let dense: String = (0..60_000).map(|i| format!("Word{i} ")).collect();
        let slim: String = (0..60_000).map(|i| format!("Word{} ", i + 7)).collect();
        let start = std::time::Instant::now();
        let a = agreement(&dense, &slim);
        assert!(start.elapsed().as_secs_f64() < 5.0, "{:?}", start.elapsed());
        assert_eq!(a.dense_words, 60_000);
        assert!(
            (a.shared - 59_993.0 / 60_000.0).abs() < 1e-9,
            "{}",
            a.shared
        );
        assert_eq!(a.terms, 60_000);
        assert_eq!(a.missing.len(), 7);
        assert_eq!(a.extra.len(), 7);
        // repeated words count once each in the bag
        let b = agreement("a a a b", "a b b");
        assert!((b.shared - 0.5).abs() < 1e-9, "{}", b.shared);
    }
}
