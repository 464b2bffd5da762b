//! The cases of the fact evaluation: which text, which facts where, what is asked.
//!
//! A planted fact is one of ten phrasings (`PHRASINGS`: numbers, names, places, a room, a port,
//! a year, a quoted sentence, a password), each asked with a paraphrase rather than its own
//! words. The tuning part plants phrasings 0-4 and the reported part phrasings 5-9, so the
//! reported numbers are on sentences and questions that tuning never saw. A case plants one,
//! two or three facts and asks for one of them or for all, or asks a question the text itself
//! answers ([`super::corpus::NATURAL`]). Everything is drawn from a seed: the same build gives
//! the same cases.

use super::corpus::{window, Corpus, Part, NATURAL};

/// A fact phrasing: the sentence planted, the question that asks for it, what answers it.
pub struct Phrasing {
    pub name: &'static str,
    /// `{}` is the value.
    pub statement: &'static str,
    pub question: &'static str,
    /// Asked as part of a list: the same question as a noun phrase.
    pub item: &'static str,
    pub values: Values,
}

/// Where a phrasing's values come from.
pub enum Values {
    /// A number of this many digits (no leading zero).
    Digits(u32),
    /// A year in this range.
    Year(u32, u32),
    /// One of these; the answer must contain the `key` part (`Full Name|Key`, or the whole).
    Pool(&'static [&'static str]),
}

const CITIES: &[&str] = &[
    "Tromsø",
    "Valparaíso",
    "Brisbane",
    "Winnipeg",
    "Tbilisi",
    "Kraków",
    "Nagoya",
    "Porto",
    "Mombasa",
    "Reykjavík",
    "Cusco",
    "Tallinn",
    "Dunedin",
    "Marseille",
    "Halifax",
    "Ljubljana",
];
const PEOPLE: &[&str] = &[
    "Agnes Thornbury|Thornbury",
    "Mirela Kovač|Kovač",
    "Harriet Pellow|Pellow",
    "Ines Vandermeer|Vandermeer",
    "Oksana Drozdova|Drozdova",
    "Beatrix Holloway|Holloway",
    "Rosalind Achterberg|Achterberg",
    "Yuki Tanabe|Tanabe",
];
const QUOTES: &[&str] = &[
    "Keep the lamps burning until the fog lifts.|lamps",
    "Trust the tide and never the wind.|tide",
    "Every rope must be coiled before supper.|rope",
    "Sing loudly when the ice starts to crack.|ice",
    "Leave the silver compass with my daughter.|compass",
    "Feed the ship's cat before you feed yourselves.|cat",
];
const PARROTS: &[&str] = &[
    "Barnaby",
    "Clementine",
    "Horatio",
    "Mortimer",
    "Persimmon",
    "Wellington",
    "Ophelia",
    "Rasputin",
];
const PASSWORDS: &[&str] = &[
    "marigold",
    "thunderbox",
    "quillfeather",
    "saltmarsh",
    "copperkettle",
    "juniperwood",
];

pub const PHRASINGS: [Phrasing; 10] = [
    // tuning part: 0..5
    Phrasing {
        name: "code",
        statement: "The access code for the blue cabinet is {}.",
        question: "Which number opens the blue cabinet?",
        item: "the number that opens the blue cabinet",
        values: Values::Digits(5),
    },
    Phrasing {
        name: "keeper",
        statement: "The lighthouse at Gull Point is kept by a woman named {}.",
        question: "Who looks after the lighthouse at Gull Point?",
        item: "who looks after the Gull Point lighthouse",
        values: Values::Pool(PEOPLE),
    },
    Phrasing {
        name: "meeting-city",
        statement: "This year the beekeepers' society holds its annual meeting in {}.",
        question: "In which city do the beekeepers gather for their yearly meeting?",
        item: "the city where the beekeepers meet",
        values: Values::Pool(CITIES),
    },
    Phrasing {
        name: "room",
        statement: "Dr. Okafor's seminar on soil chemistry has moved to room {}.",
        question: "Where will Dr. Okafor's seminar take place now? Give the room number.",
        item: "the room of Dr. Okafor's seminar",
        values: Values::Digits(3),
    },
    Phrasing {
        name: "quote",
        statement: "Before the ship left, the old captain told his crew: \"{}\"",
        question: "What did the old captain say to his crew before they departed?",
        item: "what the old captain told his crew",
        values: Values::Pool(QUOTES),
    },
    // reported part: 5..10
    Phrasing {
        name: "port",
        statement: "The staging server accepts connections on port {}.",
        question: "Which port should a client use to reach the staging server?",
        item: "the staging server's port",
        values: Values::Digits(4),
    },
    Phrasing {
        name: "year",
        statement: "The old stone bridge at Harlow was completed in {}.",
        question: "When was construction of the Harlow bridge finished?",
        item: "the year the Harlow bridge was finished",
        values: Values::Year(1702, 1898),
    },
    Phrasing {
        name: "parrot",
        statement: "My neighbour's grey parrot is called {}.",
        question: "What name does the neighbour's parrot answer to?",
        item: "the name of the neighbour's parrot",
        values: Values::Pool(PARROTS),
    },
    Phrasing {
        name: "found-city",
        statement: "The stolen painting was eventually discovered in a warehouse in {}.",
        question: "In which city did the missing painting turn up?",
        item: "the city where the missing painting turned up",
        values: Values::Pool(CITIES),
    },
    Phrasing {
        name: "password",
        statement: "The password for the archive room is \"{}\".",
        question: "What must someone type to get into the archive room?",
        item: "the word that opens the archive room",
        values: Values::Pool(PASSWORDS),
    },
];

/// The phrasings a part plants.
pub fn phrasings(part: Part) -> std::ops::Range<usize> {
    match part {
        Part::Tune => 0..5,
        Part::Report => 5..10,
    }
}

/// A planted fact: phrasing, value, depth (0..1 of the document).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Planted {
    pub phrasing: usize,
    pub value: String,
    /// What the answer must contain.
    pub key: String,
    pub depth: f64,
}

impl Planted {
    pub fn statement(&self) -> String {
        PHRASINGS[self.phrasing]
            .statement
            .replace("{}", &self.value)
    }
}

/// What a case asks.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ask {
    /// One of the planted facts (index into `facts`).
    One(usize),
    /// Every planted fact.
    All,
    /// A question the text answers (index into `NATURAL`).
    Natural(usize),
}

/// One case, before its document is cut.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Case {
    pub id: String,
    pub part: Part,
    /// Index into the corpus's texts.
    pub text: usize,
    /// Prompt tokens wanted.
    pub length: usize,
    pub facts: Vec<Planted>,
    pub ask: Ask,
    /// Where the document window starts, as a share of the part's half (planted cases); a
    /// natural question's window is placed by its anchor's depth instead.
    pub start: f64,
    /// Natural questions: the anchor's depth in the document.
    pub anchor_depth: f64,
    /// A planted fact the first question leaves out, for a follow-up turn to ask (index into
    /// `facts`; see [`Case::with_follow_up`]).
    pub follow_up: Option<usize>,
}

/// The cases' generator.
pub use crate::rng::SplitMix64 as Rng;

fn value(values: &Values, rng: &mut Rng) -> (String, String) {
    match values {
        Values::Digits(n) => {
            let lo = 10u64.pow(n - 1);
            let v = (lo + rng.next_u64() % (9 * lo)).to_string();
            (v.clone(), v)
        }
        Values::Year(a, b) => {
            let v = (a + rng.below((b - a + 1) as usize) as u32).to_string();
            (v.clone(), v)
        }
        Values::Pool(pool) => {
            let pick = pool[rng.below(pool.len())];
            match pick.split_once('|') {
                Some((full, key)) => (full.to_string(), key.to_string()),
                None => (pick.to_string(), pick.to_string()),
            }
        }
    }
}

/// The shapes of a run of 12 cases: six single facts, then two facts asked one / all, three
/// asked one / all, and two questions about the text.
const SHAPES: [(usize, bool); 12] = [
    (1, false),
    (1, false),
    (1, false),
    (1, false),
    (1, false),
    (1, false),
    (2, false),
    (2, true),
    (3, false),
    (3, true),
    (0, false),
    (0, false),
];

/// `n` cases of `part` at `length` tokens over `corpus`'s texts. The depth asked about is
/// stratified over the cases (a shuffled grid over 0..1), so every depth band holds about a
/// third of them. A corpus without natural questions plants one fact where they would be asked.
pub fn generate(part: Part, length: usize, n: usize, corpus: &Corpus) -> Vec<Case> {
    let seed = (length as u64) << 8 | part as u64;
    let mut rng = Rng::new(seed ^ 0x51_1A_5EED);
    // a stratified, shuffled depth for each case
    let mut depths: Vec<f64> = (0..n).map(|i| (i as f64 + rng.unit()) / n as f64).collect();
    for i in (1..n).rev() {
        depths.swap(i, rng.below(i + 1));
    }
    let naturals: Vec<usize> = (0..NATURAL.len())
        .filter(|&q| NATURAL[q].part() == part)
        .collect();
    let mut natural_turn = 0usize;
    let phr = phrasings(part);
    (0..n)
        .map(|i| {
            let (mut n_facts, all) = SHAPES[i % SHAPES.len()];
            if n_facts == 0 && !corpus.has_naturals() {
                n_facts = 1;
            }
            let text = (i + i / SHAPES.len()) % corpus.texts().len();
            let id = format!(
                "{}-{length}-{i}",
                if part == Part::Tune { "t" } else { "r" }
            );
            if n_facts == 0 {
                // a natural question of this text, in turn
                let of_text: Vec<usize> = (naturals.iter().copied())
                    .filter(|&q| NATURAL[q].text == text)
                    .collect();
                let q = of_text[natural_turn % of_text.len()];
                natural_turn += 1;
                return Case {
                    id,
                    part,
                    text,
                    length,
                    facts: Vec::new(),
                    ask: Ask::Natural(q),
                    start: 0.0,
                    anchor_depth: depths[i],
                    follow_up: None,
                };
            }
            // distinct phrasings; the first fact is the one asked for, at the stratified depth
            let mut chosen: Vec<usize> = Vec::new();
            while chosen.len() < n_facts {
                let p = phr.start + rng.below(phr.len());
                if !chosen.contains(&p) {
                    chosen.push(p);
                }
            }
            let facts = (chosen.iter().enumerate())
                .map(|(k, &p)| {
                    let (value, key) = value(&PHRASINGS[p].values, &mut rng);
                    let depth = if k == 0 { depths[i] } else { rng.unit() };
                    Planted {
                        phrasing: p,
                        value,
                        key,
                        depth,
                    }
                })
                .collect();
            Case {
                id,
                part,
                text,
                length,
                facts,
                ask: if all { Ask::All } else { Ask::One(0) },
                start: rng.unit(),
                anchor_depth: 0.0,
                follow_up: None,
            }
        })
        .collect()
}

/// A case made concrete: the user message and, for each fact asked about, what answers it and
/// at which depth of the document it sits.
#[derive(Debug, Clone)]
pub struct Built {
    pub message: String,
    /// One per fact asked about: (accepted answers, depth 0..1, a probe string whose tokens
    /// locate the fact in the prompt).
    pub asked: Vec<Asked>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Asked {
    pub answers: Vec<String>,
    pub depth: f64,
    pub probe: String,
    pub phrasing: String,
}

impl Case {
    /// This case with one more fact planted, which the first question leaves out and a
    /// follow-up turn asks ([`Case::follow_up_asked`]): a phrasing of the part the case does
    /// not plant, half the document away from the first fact asked (so the follow-up's depths
    /// are as stratified as the first questions'). Drawn from the case's id, so the cases
    /// themselves are drawn as before. None for a question about the text itself.
    pub fn with_follow_up(&self) -> Option<Case> {
        let first = self.facts.first()?;
        let seed = (self.id.bytes()).fold(0xF0_11_0E_u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        let mut rng = Rng::new(seed);
        let free: Vec<usize> = (phrasings(self.part))
            .filter(|p| self.facts.iter().all(|f| f.phrasing != *p))
            .collect();
        let phrasing = free[rng.below(free.len())];
        let (value, key) = value(&PHRASINGS[phrasing].values, &mut rng);
        let mut case = self.clone();
        case.facts.push(Planted {
            phrasing,
            value,
            key,
            depth: (first.depth + 0.5).fract(),
        });
        case.follow_up = Some(case.facts.len() - 1);
        Some(case)
    }

    /// The follow-up turn's question and what answers it (a case made by
    /// [`Case::with_follow_up`]).
    pub fn follow_up_asked(&self) -> Option<(String, Asked)> {
        let f = &self.facts[self.follow_up?];
        Some((PHRASINGS[f.phrasing].question.to_string(), asked(f)))
    }

    fn question(&self) -> String {
        match &self.ask {
            Ask::One(k) => PHRASINGS[self.facts[*k].phrasing].question.to_string(),
            Ask::Natural(q) => NATURAL[*q].question.to_string(),
            Ask::All => {
                let items: Vec<&str> = (self.facts.iter().enumerate())
                    .filter(|(k, _)| self.follow_up != Some(*k))
                    .map(|(_, f)| PHRASINGS[f.phrasing].item)
                    .collect();
                let list = match items.as_slice() {
                    [a, b] => format!("{a} and {b}"),
                    [a, b, c] => format!("{a}, {b} and {c}"),
                    _ => items.join(", "),
                };
                format!("Tell me {list}.")
            }
        }
    }

    /// The message with a document of about `self.length` prompt tokens from the corpus the
    /// case was generated over, as `count` measures a whole message (template included).
    pub fn build(&self, corpus: &Corpus, count: &mut dyn FnMut(&str) -> usize) -> Built {
        let text = &corpus.texts()[self.text];
        let range = text.range(self.part);
        let question = self.question();
        let mut bytes = self.length * 4; // English runs ~4.3 bytes a token here
        let mut best: Option<(usize, Built)> = None;
        for _ in 0..6 {
            let built = self.with_window(text.body, range.clone(), bytes, &question);
            let n = count(&built.message).max(1);
            let off = n.abs_diff(self.length);
            if best.as_ref().is_none_or(|(o, _)| off < *o) {
                best = Some((off, built));
            }
            if off * 50 < self.length {
                break;
            }
            bytes = ((bytes as f64) * self.length as f64 / n as f64) as usize;
        }
        best.expect("at least one attempt").1
    }

    fn with_window(
        &self,
        body: &str,
        range: std::ops::Range<usize>,
        bytes: usize,
        question: &str,
    ) -> Built {
        if let Ask::Natural(q) = self.ask {
            let nq = &NATURAL[q];
            let at = nq.offset();
            let start = at.saturating_sub((bytes as f64 * self.anchor_depth) as usize);
            let (doc, from) = window(body, range, start, bytes);
            let depth = (at.saturating_sub(from)) as f64 / doc.len().max(1) as f64;
            return Built {
                message: format!("{doc}\n\n{question}"),
                asked: vec![Asked {
                    answers: nq.answers.iter().map(|a| a.to_string()).collect(),
                    depth: depth.clamp(0.0, 1.0),
                    probe: nq.anchor.to_string(),
                    phrasing: "natural".into(),
                }],
            };
        }
        let free = range.len().saturating_sub(bytes);
        let start = range.start + (free as f64 * self.start) as usize;
        let (doc, _) = window(body, range, start, bytes);
        // insert from the deepest fact up, so earlier offsets stay valid
        let mut order: Vec<usize> = (0..self.facts.len()).collect();
        order.sort_by(|&a, &b| self.facts[b].depth.total_cmp(&self.facts[a].depth));
        let mut message = doc.to_string();
        for &k in &order {
            let f = &self.facts[k];
            let at = super::sentence_boundary(doc, (doc.len() as f64 * f.depth) as usize);
            message.insert_str(at, &format!(" {} ", f.statement()));
        }
        message.push_str("\n\n");
        message.push_str(question);
        let asked = (self.facts.iter().enumerate())
            .filter(|(k, _)| match self.ask {
                Ask::One(j) => j == *k,
                _ => self.follow_up != Some(*k),
            })
            .map(|(_, f)| asked(f))
            .collect();
        Built { message, asked }
    }
}

fn asked(f: &Planted) -> Asked {
    Asked {
        answers: vec![f.key.clone()],
        depth: f.depth,
        probe: f.value.clone(),
        phrasing: PHRASINGS[f.phrasing].name.into(),
    }
}

/// Whether `answer` contains one of `accepted` (case-insensitive; digit groups may carry
/// commas: "48,213" answers 48213).
pub fn found(answer: &str, accepted: &[String]) -> bool {
    let norm = |s: &str| {
        let lower = s.to_lowercase();
        let b = lower.as_bytes();
        let mut out = String::with_capacity(lower.len());
        for (i, c) in lower.char_indices() {
            let between_digits = c == ','
                && i > 0
                && b[i - 1].is_ascii_digit()
                && b.get(i + 1).is_some_and(u8::is_ascii_digit);
            if !between_digits {
                out.push(c);
            }
        }
        out
    };
    let a = norm(answer);
    accepted.iter().any(|k| a.contains(&norm(k)))
}

/// The depth band of a depth: 0 (0-33%), 1 (33-66%), 2 (66-100%).
pub fn band(depth: f64) -> usize {
    ((depth * 3.0) as usize).min(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::corpus::Text;

    fn fake_count(s: &str) -> usize {
        s.len() / 4 + 30
    }

    #[test]
    fn cases_are_deterministic_and_cover_every_band_and_shape() {
        let a = generate(Part::Report, 4096, 36, &Corpus::BuiltIn);
        let b = generate(Part::Report, 4096, 36, &Corpus::BuiltIn);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let mut bands = [0usize; 3];
        for c in &a {
            let built = c.build(&Corpus::BuiltIn, &mut fake_count);
            for asked in &built.asked {
                bands[band(asked.depth)] += 1;
            }
            // reported cases plant only the reported phrasings
            assert!(c.facts.iter().all(|f| f.phrasing >= 5));
        }
        assert!(bands.iter().all(|&n| n >= 10), "{bands:?}");
        assert!(a.iter().any(|c| matches!(c.ask, Ask::All)));
        assert!(a.iter().any(|c| matches!(c.ask, Ask::Natural(_))));
    }

    #[test]
    fn a_built_case_has_its_length_its_facts_and_its_question() {
        for c in generate(Part::Tune, 2048, 12, &Corpus::BuiltIn) {
            let built = c.build(&Corpus::BuiltIn, &mut fake_count);
            let n = fake_count(&built.message);
            assert!(
                n.abs_diff(2048) < 100,
                "{} tokens in {} {:?}",
                n,
                c.id,
                c.ask
            );
            for f in &c.facts {
                assert!(built.message.contains(&f.statement()), "{}", f.statement());
            }
            for asked in &built.asked {
                assert!(built.message.contains(&asked.probe));
            }
            assert!(built.message.ends_with('?') || built.message.ends_with('.'));
        }
    }

    #[test]
    fn a_persons_own_text_gets_planted_facts_only_from_anywhere_in_it() {
        let body = "A sentence of the person's own document, long enough to cut. ".repeat(600);
        let texts = [
            Text {
                kind: "mine",
                body: &body,
                halves: false,
            },
            Text {
                kind: "theirs",
                body: &body,
                halves: false,
            },
        ];
        let corpus = Corpus::Own(&texts);
        for part in [Part::Tune, Part::Report] {
            assert_eq!(
                texts[0].range(part),
                0..body.len(),
                "read whole by {part:?}"
            );
            let cases = generate(part, 2048, 12, &corpus);
            assert!(
                cases.iter().all(|c| !c.facts.is_empty()),
                "no natural questions"
            );
            assert_eq!(
                (cases.iter().filter(|c| c.text == 1)).count(),
                6,
                "both texts in turn"
            );
            for c in &cases {
                let built = c.build(&corpus, &mut fake_count);
                assert!(fake_count(&built.message).abs_diff(2048) < 100, "{}", c.id);
                for asked in &built.asked {
                    assert!(built.message.contains(&asked.probe));
                }
            }
        }
    }

    #[test]
    fn answers_are_found_case_insensitively_and_through_digit_commas() {
        let k = |s: &str| vec![s.to_string()];
        assert!(found("The code is 48,213.", &k("48213")));
        assert!(found("It is kept by Agnes THORNBURY", &k("Thornbury")));
        assert!(!found("The code is 48214", &k("48213")));
        assert_eq!([band(0.0), band(0.4), band(0.99), band(1.0)], [0, 1, 2, 2]);
    }

    #[test]
    fn a_follow_up_plants_a_fact_the_first_question_leaves_out() {
        let cases = generate(Part::Report, 4096, 12, &Corpus::BuiltIn);
        let mut made = 0;
        for c in &cases {
            let Some(f) = c.with_follow_up() else {
                assert!(matches!(c.ask, Ask::Natural(_)));
                continue;
            };
            made += 1;
            assert_eq!(
                format!("{:?}", c.with_follow_up().unwrap()),
                format!("{f:?}")
            );
            let (question, asked) = f.follow_up_asked().expect("a follow-up");
            let extra = &f.facts[f.follow_up.unwrap()];
            assert!(phrasings(Part::Report).contains(&extra.phrasing));
            assert!(c.facts.iter().all(|p| p.phrasing != extra.phrasing));
            assert!((extra.depth - (c.facts[0].depth + 0.5).fract()).abs() < 1e-12);
            let first = f.build(&Corpus::BuiltIn, &mut fake_count);
            let plain = c.build(&Corpus::BuiltIn, &mut fake_count);
            // planted in the document, asked only by the follow-up
            assert!(first.message.contains(&extra.statement()));
            assert!(!first.message.ends_with(&question));
            assert!(!first.asked.iter().any(|a| a.probe == asked.probe));
            assert_eq!(first.asked.len(), plain.asked.len());
            assert!(first
                .message
                .ends_with(plain.message.rsplit("\n\n").next().unwrap()));
        }
        assert_eq!(made, 10);
    }
}
