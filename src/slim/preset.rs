//! Which SlimInfer preset fits a model, from its GGUF metadata, for `[slim] preset = "auto"`.
//!
//! A preset is matched on architecture and shape (block count, embedding length) and, where two
//! models share a shape, on the context length; a layer count alone is not enough (Llama-3.2-3B
//! and Qwen2.5-7B both have 28 layers). Models without a preset of their own get `"generic"`: its
//! stages sit at fixed fractions of the depth (round(L/3), round(2L/3), L-2 keeping 1, 1/2 and
//! 1/4 of the prompt at ratio 1) and its floors are shares of the context ([`generic_floors`]).

use crate::model::gguf::GgufFile;

/// What the preset choice reads from a model file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelFacts {
    /// `general.architecture`
    pub arch: String,
    /// `general.basename` and `general.size_label` when the file has them (for the note only)
    pub name: String,
    pub n_layers: usize,
    pub hidden: usize,
    /// the trained context in tokens
    pub context: usize,
}

impl ModelFacts {
    pub fn from_gguf(f: &GgufFile, n_layers: usize, hidden: usize, context: usize) -> Self {
        let text = |key: &str| {
            f.metadata(key)
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_default()
        };
        let name = [text("general.basename"), text("general.size_label")]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            arch: text("general.architecture"),
            name,
            n_layers,
            hidden,
            context,
        }
    }
}

/// The preset for `preset = "auto"`, with the model it was matched to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFit {
    pub preset: &'static str,
    /// the model's context, for the generic preset's floors
    pub context: usize,
}

/// The preset that fits the model (see the module doc).
pub fn fit(m: &ModelFacts) -> ModelFit {
    let preset = match (m.arch.as_str(), m.n_layers, m.hidden) {
        // SmolLM2-135M
        ("llama", 30, 576) => "smollm2",
        // Llama-3.1/3-8B (128k context); Llama-2-7B (4k) and Mistral-7B (32k) share the shape
        ("llama", 32, 4096) if m.context >= 65536 => "llama3.1-8b",
        ("llama", 16, 2048) => "llama3.2-1b",
        ("llama", 28, 3072) => "llama3.2-3b",
        ("qwen2", 28, 3584) => "qwen2.5-7b",
        _ => "generic",
    };
    ModelFit {
        preset,
        context: m.context,
    }
}

/// The generic preset's floors: 1/4, 1/8 and 1/16 of the context, counted up to 8192 tokens:
/// 2048/1024/512 tokens for a model of 8k context or more (the floors `slimchat eval` chose for
/// SmolLM2, whose first stage lost facts below them), 1024/512/256 for one of 4k. On the default
/// model's weights as `qwen2` (bench/NOTES.md) shares of up to 32k (512/256/128 at 8k) kept
/// top-1 agreement 0.875 at 2k tokens against these floors' 0.953.
pub fn generic_floors(context: usize) -> Vec<usize> {
    let c = context.min(8192);
    vec![c / 4, c / 8, c / 16]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(arch: &str, n_layers: usize, hidden: usize, context: usize) -> ModelFacts {
        ModelFacts {
            arch: arch.into(),
            n_layers,
            hidden,
            context,
            ..Default::default()
        }
    }

    #[test]
    fn models_of_one_depth_get_their_own_presets() {
        // 28 layers: Llama-3.2-3B and Qwen2.5-7B
        assert_eq!(fit(&facts("llama", 28, 3072, 131072)).preset, "llama3.2-3b");
        assert_eq!(fit(&facts("qwen2", 28, 3584, 32768)).preset, "qwen2.5-7b");
        assert_eq!(fit(&facts("llama", 16, 2048, 131072)).preset, "llama3.2-1b");
        assert_eq!(fit(&facts("llama", 30, 576, 8192)).preset, "smollm2");
        assert_eq!(fit(&facts("llama", 32, 4096, 131072)).preset, "llama3.1-8b");
        // Mistral-7B's shape with a 32k context, and an unknown Qwen3: the generic rule
        assert_eq!(fit(&facts("llama", 32, 4096, 32768)).preset, "generic");
        assert_eq!(fit(&facts("qwen3", 28, 1024, 40960)).preset, "generic");
    }

    #[test]
    fn generic_floors_are_shares_of_the_context() {
        assert_eq!(generic_floors(4096), vec![1024, 512, 256]);
        assert_eq!(generic_floors(8192), vec![2048, 1024, 512]);
        assert_eq!(generic_floors(131072), vec![2048, 1024, 512]);
    }
}
