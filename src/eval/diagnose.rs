//! Where a fact was lost: which tokens of the prompt hold it, and at which step of pruning its
//! blocks went (a prefill stage, decode's choice of blocks, or neither).

use serde::Serialize;

use crate::slim::session::SlimTrace;

/// Tokens `[start, end)` of `prompt` whose text holds `probe`: the shortest prefix whose
/// decoding contains it, then the latest start that still does (two binary searches over
/// `decode`). None when the prompt does not hold it.
pub fn locate(
    prompt: &[u32],
    probe: &str,
    decode: &dyn Fn(&[u32]) -> String,
) -> Option<(usize, usize)> {
    let holds = |a: usize, b: usize| decode(&prompt[a..b]).contains(probe);
    if !holds(0, prompt.len()) {
        return None;
    }
    // smallest end with the probe in prompt[..end]
    let (mut lo, mut hi) = (1, prompt.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if holds(0, mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let end = lo;
    // largest start with the probe in prompt[start..end]
    let (mut lo, mut hi) = (0, end - 1);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if holds(mid, end) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some((lo, end))
}

/// The step of pruning that dropped a fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lost {
    /// A prefill stage did not keep one of its blocks (the stage's index).
    Prefill(usize),
    /// Every stage kept it, but some slim layers do not attend to it in decode.
    DecodeSet,
    /// Every stage kept it and every slim layer attends to it: the answer changed anyway.
    Kept,
}

#[derive(Debug, Clone, Serialize)]
pub struct Diagnosis {
    /// Prompt blocks holding the fact.
    pub blocks: Vec<u32>,
    pub lost: Lost,
    /// Per stage: the worst rank (1 = best) of the fact's blocks among the stage's candidates,
    /// and how many candidates there were; None past the stage that dropped it.
    pub ranks: Vec<Option<(usize, usize)>>,
    /// Slim layers whose decode set holds every block of the fact, of all slim layers.
    pub decode_layers: (usize, usize),
}

/// Where the fact in prompt tokens `span` stands in `trace`.
pub fn diagnose(trace: &SlimTrace, span: (usize, usize)) -> Diagnosis {
    let bs = trace.block_size;
    let blocks: Vec<u32> = (span.0 / bs..=(span.1.max(span.0 + 1) - 1) / bs)
        .map(|b| b as u32)
        .collect();
    let mut lost = None;
    let mut ranks = Vec::new();
    for (s, st) in trace.stages.iter().enumerate() {
        if lost.is_some() {
            ranks.push(None);
            continue;
        }
        let mut order: Vec<&(u32, f32)> = st.scores.iter().collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        let worst = (blocks.iter())
            .filter_map(|b| order.iter().position(|(id, _)| id == b).map(|r| r + 1))
            .max();
        ranks.push(worst.map(|r| (r, order.len())));
        if blocks.iter().any(|b| st.pool.binary_search(b).is_err()) {
            lost = Some(Lost::Prefill(s));
        }
    }
    let holding = (trace.decode_sets.iter())
        .filter(|(_, set)| blocks.iter().all(|b| set.binary_search(b).is_ok()))
        .count();
    let decode_layers = (holding, trace.decode_sets.len());
    let lost = lost.unwrap_or(if holding < decode_layers.1 {
        Lost::DecodeSet
    } else {
        Lost::Kept
    });
    Diagnosis {
        blocks,
        lost,
        ranks,
        decode_layers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slim::session::StageTrace;

    #[test]
    fn locate_finds_the_tokens_that_spell_the_probe() {
        // one "token" per word
        let words = ["The ", "code ", "is ", "48", "213", ". ", "Bye"];
        let ids: Vec<u32> = (0..words.len() as u32).collect();
        let decode = |t: &[u32]| t.iter().map(|&i| words[i as usize]).collect::<String>();
        assert_eq!(locate(&ids, "48213", &decode), Some((3, 5)));
        assert_eq!(locate(&ids, "The", &decode), Some((0, 1)));
        assert_eq!(locate(&ids, "49", &decode), None);
    }

    #[test]
    fn a_fact_is_lost_at_the_first_stage_that_drops_a_block_of_it() {
        let stage = |layer, scores: &[(u32, f32)], pool: &[u32]| StageTrace {
            start_layer: layer,
            scores: scores.to_vec(),
            pool: pool.to_vec(),
        };
        let trace = SlimTrace {
            block_size: 64,
            stages: vec![
                stage(10, &[(0, 0.5), (1, 0.1), (2, 0.3), (3, 0.2)], &[0, 1, 2, 3]),
                stage(20, &[(0, 0.5), (1, 0.1), (2, 0.3), (3, 0.2)], &[0, 2, 3]),
            ],
            decode_sets: vec![(10, vec![0, 2]), (20, vec![0, 2])],
        };
        // tokens 70..75 are block 1: rank 4 of 4 at both stages, dropped at the second
        let d = diagnose(&trace, (70, 75));
        assert_eq!(d.blocks, vec![1]);
        assert_eq!(d.lost, Lost::Prefill(1));
        assert_eq!(d.ranks, vec![Some((4, 4)), Some((4, 4))]);
        // block 3 is kept by both stages but no layer attends to it
        let d = diagnose(&trace, (200, 201));
        assert_eq!(d.lost, Lost::DecodeSet);
        assert_eq!(d.decode_layers, (0, 2));
        // a fact across blocks 0 and 2's boundary... block 2 alone: kept everywhere
        assert_eq!(diagnose(&trace, (130, 140)).lost, Lost::Kept);
    }
}
