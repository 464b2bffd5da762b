//! The `[kv]` config section: the fast tier's budget and the spill file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The `[kv]` section: the fast tier's budget and the spill file.
///
/// ```toml
/// [kv]
/// resident = false
/// fast_budget = "auto"
/// spill = false
/// spill_dir = ""
/// spill_cap = "4G"
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvConfig {
    /// Keep every block in the fast tier (no manager: the reference run). Default `false`.
    pub resident: bool,
    /// Most bytes the fast tier may hold: `"auto"` (what the request needs: preserve layers,
    /// the slim layers' active blocks, the answer's rows), a size (`"512M"`, `"2G"`, `"1048576"`)
    /// or a count of tokens of dense KV (`"4096tok"`). A request that does not fit is refused
    /// before its prefill. Default `"auto"`.
    pub fast_budget: String,
    /// Also write slim layers' inactive blocks to a memory-mapped spill file (CRC per block).
    /// Default `false`.
    pub spill: bool,
    /// Directory of the spill file; empty = `<cache dir>/slimchat/kv-spill`. Default `""`.
    pub spill_dir: String,
    /// Largest spill file, as a size (`"4G"`); blocks past it stay in RAM only. Default `"4G"`.
    pub spill_cap: String,
}

/// The `[kv]` section as it appears in `config.example.toml`.
pub const EXAMPLE_TOML: &str = r#"[kv]
# Keep every KV block in the fast tier (no KV manager): the reference run (--kv-resident).
resident = false
# Fast-tier budget: "auto" (exactly what each request needs), a size ("512M", "2G", bytes) or
# tokens of dense KV ("4096tok"). A request that does not fit is refused before its prefill.
fast_budget = "auto"
# Also write slim layers' inactive blocks to a memory-mapped spill file (CRC-32 per block;
# RAM copies are kept alongside for now).
spill = false
# Directory of the spill file; "" = <cache dir>/slimchat/kv-spill.
spill_dir = ""
# Largest spill file ("4G"); blocks past it stay in RAM only.
spill_cap = "4G"
"#;

impl Default for KvConfig {
    fn default() -> Self {
        Self {
            resident: false,
            fast_budget: "auto".into(),
            spill: false,
            spill_dir: String::new(),
            spill_cap: "4G".into(),
        }
    }
}

/// A fast-tier budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Auto,
    Bytes(usize),
    /// Tokens of dense KV (every layer).
    Tokens(usize),
}

impl KvConfig {
    /// Check every key; the message names the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.budget()?;
        self.cap()?;
        Ok(())
    }

    pub fn budget(&self) -> std::result::Result<Budget, String> {
        let s = self.fast_budget.trim();
        if s == "auto" {
            return Ok(Budget::Auto);
        }
        if let Some(t) = s.strip_suffix("tok") {
            return match t.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(Budget::Tokens(n)),
                _ => Err(format!(
                    "[kv] fast_budget: expected \"auto\", a size like \"512M\" or tokens like \"4096tok\", got {s:?}"
                )),
            };
        }
        parse_size(s).filter(|&n| n > 0).map(Budget::Bytes).ok_or_else(|| {
            format!(
                "[kv] fast_budget: expected \"auto\", a size like \"512M\" or tokens like \"4096tok\", got {s:?}"
            )
        })
    }

    pub fn cap(&self) -> std::result::Result<usize, String> {
        parse_size(self.spill_cap.trim()).ok_or_else(|| {
            format!(
                "[kv] spill_cap: expected a size like \"4G\", got {:?}",
                self.spill_cap
            )
        })
    }

    /// The spill directory.
    pub fn spill_path(&self) -> PathBuf {
        if !self.spill_dir.is_empty() {
            return PathBuf::from(&self.spill_dir);
        }
        directories::ProjectDirs::from("", "", "slimchat")
            .map(|d| d.cache_dir().join("kv-spill"))
            .unwrap_or_else(|| std::env::temp_dir().join("slimchat-kv-spill"))
    }
}

/// "123", "64K", "512M", "2G" (powers of 1024; an optional trailing "B"/"iB").
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1usize << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let x: f64 = num.trim().parse().ok()?;
    (x >= 0.0 && x.is_finite()).then_some((x * mult as f64) as usize)
}
