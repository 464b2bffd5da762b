//! The texts of the fact evaluation and the questions their own words answer.
//!
//! Four kinds of real prose (assets/, see its README for sources and licences): a language
//! reference (the Python 3.11 reference), licences (GPL-3, Apache-2.0, MPL-2.0, LGPL-2.1),
//! narrative prose (Moby-Dick, chapters 1-16) and speeches (State of the Union addresses,
//! 1962-1968). Each text is split at the paragraph break after its middle: documents of the
//! tuning part come from the first half, documents of the reported part from the second, so a
//! reported number never reads a sentence that tuning read.
//!
//! A person's own documents (`slimchat facts --text FILE`, [`OwnText`]) take the built-in
//! texts' place: each is read whole by either part, and only planted facts are asked of them.

use std::ops::Range;

/// Which half of the evaluation a case belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// Chosen on: schedule, score and budget changes are tried here.
    Tune,
    /// Only reported: the bars are read here.
    Report,
}

impl Part {
    pub fn parse(s: &str) -> Option<Vec<Part>> {
        match s {
            "tune" => Some(vec![Part::Tune]),
            "report" => Some(vec![Part::Report]),
            "all" => Some(vec![Part::Tune, Part::Report]),
            _ => None,
        }
    }
}

/// One kind of text.
#[derive(Debug, Clone, Copy)]
pub struct Text<'a> {
    pub kind: &'a str,
    pub body: &'a str,
    /// Built-in texts are split into a tuning and a reported half; a person's own text is read
    /// whole by either part.
    pub halves: bool,
}

pub const TEXTS: [Text<'static>; 4] = [
    Text {
        kind: "reference",
        body: include_str!("../../assets/long_text.txt"),
        halves: true,
    },
    Text {
        kind: "licences",
        body: include_str!("../../assets/eval/licences.txt"),
        halves: true,
    },
    Text {
        kind: "narrative",
        body: include_str!("../../assets/eval/narrative.txt"),
        halves: true,
    },
    Text {
        kind: "speeches",
        body: include_str!("../../assets/eval/speeches.txt"),
        halves: true,
    },
];

impl Text<'_> {
    /// The bytes a part's documents come from.
    pub fn range(&self, part: Part) -> Range<usize> {
        if !self.halves {
            return 0..self.body.len();
        }
        let half = self.body.len() / 2;
        let split = self.body[half..]
            .find("\n\n")
            .map_or(self.body.len(), |i| half + i);
        match part {
            Part::Tune => 0..split,
            Part::Report => split..self.body.len(),
        }
    }
}

/// A person's own document (`slimchat facts --text FILE`), named by its file.
#[derive(Debug, Clone)]
pub struct OwnText {
    pub name: String,
    pub body: String,
}

impl OwnText {
    pub fn text(&self) -> Text<'_> {
        Text {
            kind: &self.name,
            body: &self.body,
            halves: false,
        }
    }
}

/// Where a run's documents come from.
#[derive(Debug, Clone, Copy)]
pub enum Corpus<'a> {
    /// [`TEXTS`], with their natural questions.
    BuiltIn,
    /// A person's own texts: planted facts only.
    Own(&'a [Text<'a>]),
}

impl<'a> Corpus<'a> {
    pub fn texts(&self) -> &[Text<'a>] {
        match self {
            Corpus::BuiltIn => &TEXTS,
            Corpus::Own(texts) => texts,
        }
    }

    /// Whether cases may ask [`NATURAL`] questions (they are about the built-in texts).
    pub fn has_naturals(&self) -> bool {
        matches!(self, Corpus::BuiltIn)
    }
}

/// A question the text itself answers, at the sentence that holds `anchor`.
pub struct NaturalQuestion {
    /// Index into [`TEXTS`].
    pub text: usize,
    pub anchor: &'static str,
    pub question: &'static str,
    /// The answer is found when it contains one of these (case-insensitive).
    pub answers: &'static [&'static str],
}

/// Three per text and part; which part a question belongs to is where its anchor lies.
pub const NATURAL: [NaturalQuestion; 24] = [
    // reference, tuning half
    NaturalQuestion {
        text: 0,
        anchor: "**PEP 634** – Structural Pattern Matching: Specification",
        question: "Which PEP number is given as the specification of structural pattern matching?",
        answers: &["634"],
    },
    NaturalQuestion {
        text: 0,
        anchor: "decorators were introduced in **PEP 318**",
        question: "According to the text, which PEP first brought in function and method decorators?",
        answers: &["318"],
    },
    NaturalQuestion {
        text: 0,
        anchor: "Originally proposed by **PEP 448**",
        question: "Which PEP first proposed allowing dictionary unpackings in calls?",
        answers: &["448"],
    },
    // reference, reported half
    NaturalQuestion {
        text: 0,
        anchor: "typically 8 bytes on 64-bit builds",
        question: "How many bytes does a Py_ssize_t usually occupy on a 64-bit build?",
        answers: &["8 bytes", "eight"],
    },
    NaturalQuestion {
        text: 0,
        anchor: "**PEP 562** - Module __getattr__ and __dir__",
        question: "Which PEP describes the module-level __getattr__ and __dir__ functions?",
        answers: &["562"],
    },
    NaturalQuestion {
        text: 0,
        anchor: "**PEP 3135** - New super",
        question: "Which PEP describes the new form of super() and its implicit __class__ cell?",
        answers: &["3135"],
    },
    // licences, tuning half
    NaturalQuestion {
        text: 1,
        anchor: "Version 3, 29 June 2007",
        question: "On what date was version 3 of the GNU General Public License issued?",
        answers: &["2007"],
    },
    NaturalQuestion {
        text: 1,
        anchor: "you cure the violation prior to 30 days after",
        question: "Under the GPL, how many days does a licensee have to fix a first violation after being told about it?",
        answers: &["30", "thirty"],
    },
    NaturalQuestion {
        text: 1,
        anchor: "Version 2.0, January 2004",
        question: "In which year was the Apache License, Version 2.0 published?",
        answers: &["2004"],
    },
    // licences, reported half
    NaturalQuestion {
        text: 1,
        anchor: "Mozilla Foundation is the license steward",
        question: "Who acts as the steward of the Mozilla Public License?",
        answers: &["foundation"],
    },
    NaturalQuestion {
        text: 1,
        anchor: "Version 2.1, February 1999",
        question: "In what year did version 2.1 of the GNU Lesser General Public License appear?",
        answers: &["1999"],
    },
    NaturalQuestion {
        text: 1,
        anchor: "51 Franklin Street, Fifth Floor, Boston",
        question: "On which street is the Free Software Foundation's office, as printed in the Lesser GPL?",
        answers: &["franklin"],
    },
    // narrative, tuning half
    NaturalQuestion {
        text: 2,
        anchor: "Call me Ishmael",
        question: "By what name does the narrator of the story ask to be called?",
        answers: &["ishmael"],
    },
    NaturalQuestion {
        text: 2,
        anchor: "Spouter Inn:—Peter Coffin",
        question: "Who is the landlord of the inn where the narrator first stays in New Bedford?",
        answers: &["coffin"],
    },
    NaturalQuestion {
        text: 2,
        anchor: "Father Mapple, so called by the whalemen",
        question: "What is the name of the preacher of the whalemen's chapel?",
        answers: &["mapple"],
    },
    // narrative, reported half
    NaturalQuestion {
        text: 2,
        anchor: "Rokovoko, an island far away to the West and South",
        question: "On which island was Queequeg born?",
        answers: &["rokovoko"],
    },
    NaturalQuestion {
        text: 2,
        anchor: "cousin Hosea Hussey of the Try Pots",
        question: "Who keeps the Try Pots, the chowder house in Nantucket?",
        answers: &["hussey"],
    },
    NaturalQuestion {
        text: 2,
        anchor: "Pequod, looked around her for a moment",
        question: "What is the name of the ship the narrator decides to sail on?",
        answers: &["pequod"],
    },
    // speeches, tuning half
    NaturalQuestion {
        text: 3,
        anchor: "Eight million adult Americans are classified as functionally illiterate",
        question: "How many adult Americans could not read or write well enough, according to the 1962 address?",
        answers: &["eight million", "8 million", "8,000,000"],
    },
    NaturalQuestion {
        text: 3,
        anchor: "Alliance for Progress fund of $3 billion",
        question: "How large a long-term fund did the President propose for the Alliance for Progress?",
        answers: &["3 billion", "three billion"],
    },
    NaturalQuestion {
        text: 3,
        anchor: "\"Mister Sam\" Rayburn is gone",
        question: "Which late Speaker of the House is remembered at the opening of the 1962 address?",
        answers: &["rayburn"],
    },
    // speeches, reported half
    NaturalQuestion {
        text: 3,
        anchor: "$662 million for the Model Cities program",
        question: "How much money had Congress authorized for the Model Cities program the year before?",
        answers: &["662"],
    },
    NaturalQuestion {
        text: 3,
        anchor: "build 6 million new housing units",
        question: "How many new homes for low and middle-income families did the President want built in ten years?",
        answers: &["6 million", "six million"],
    },
    NaturalQuestion {
        text: 3,
        anchor: "took $4 billion out of their country last year in travel costs",
        question: "How much did Americans spend travelling abroad the previous year, according to the 1968 address?",
        answers: &["4 billion", "four billion"],
    },
];

impl NaturalQuestion {
    /// Byte offset of the anchor in its text.
    pub fn offset(&self) -> usize {
        TEXTS[self.text]
            .body
            .find(self.anchor)
            .expect("every anchor is in its text (tested)")
    }

    pub fn part(&self) -> Part {
        if TEXTS[self.text].range(Part::Tune).contains(&self.offset()) {
            Part::Tune
        } else {
            Part::Report
        }
    }
}

/// A window of `range` of about `bytes` bytes that starts at `start` (clamped so that the
/// window fits), cut to whole sentences at both ends; returns the window and its first byte.
pub fn window(body: &str, range: Range<usize>, start: usize, bytes: usize) -> (&str, usize) {
    let bytes = bytes.min(range.len());
    let start = start.clamp(range.start, range.end - bytes);
    let (mut from, mut to) = (floor_char(body, start), floor_char(body, start + bytes));
    // start after a sentence end (unless at the start of the text), end at one
    if from > 0 {
        if let Some(i) = sentence_ends(&body[from..to]).next() {
            from += i;
            from += body[from..].len() - body[from..].trim_start().len();
        }
    }
    if let Some(i) = sentence_ends(&body[from..to]).last() {
        to = from + i;
    }
    (&body[from..to], from)
}

/// Byte offsets just past each '.' that ends a sentence (one followed by whitespace).
fn sentence_ends(s: &str) -> impl Iterator<Item = usize> + '_ {
    let b = s.as_bytes();
    (0..b.len().saturating_sub(1))
        .filter(move |&i| b[i] == b'.' && b[i + 1].is_ascii_whitespace())
        .map(|i| i + 1)
}

fn floor_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_anchor_is_in_its_text_once_and_each_part_has_three_per_text() {
        for q in &NATURAL {
            let body = TEXTS[q.text].body;
            assert!(body.contains(q.anchor), "{}", q.anchor);
            assert!(q.offset() == body.find(q.anchor).unwrap());
        }
        for t in 0..TEXTS.len() {
            for part in [Part::Tune, Part::Report] {
                let n = (NATURAL.iter())
                    .filter(|q| q.text == t && q.part() == part)
                    .count();
                assert_eq!(n, 3, "text {t} {part:?}");
            }
        }
    }

    #[test]
    fn halves_split_each_text_at_a_paragraph_break() {
        for t in &TEXTS {
            let (a, b) = (t.range(Part::Tune), t.range(Part::Report));
            assert_eq!(a.end, b.start);
            assert!(t.body[a.end..].starts_with("\n\n"));
            assert!(a.len() > t.body.len() / 3 && b.len() > t.body.len() / 3);
        }
    }

    #[test]
    fn windows_stay_in_their_half_and_end_on_sentences() {
        let t = &TEXTS[2];
        let r = t.range(Part::Report);
        let (w, from) = window(t.body, r.clone(), r.end - 10, 20_000);
        assert!(from >= r.start && from + w.len() <= r.end);
        assert!(w.len() > 19_000 && w.len() <= 20_000);
        assert!(w.ends_with('.'), "{:?}", &w[w.len() - 20..]);
    }
}
