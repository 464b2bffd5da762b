//! The chat screen's state without a model or a terminal: a loaded screen, typing, fixed
//! request numbers, and drawing to a TestBackend as text.
#![allow(dead_code)]

use ratatui::backend::TestBackend;
use ratatui::Terminal;

use slimchat::config::AppConfig;
use slimchat::engine::{GenStats, PrefillKind, StopReason};
use slimchat::tui::app::{update, App, Msg};
use slimchat::tui::render;
use slimchat::tui::worker::WorkerEvent;

/// A fresh screen with the model loaded, with a fixed conversation id.
pub fn loaded() -> App {
    let mut app = App::new(&AppConfig::default(), None);
    app.conv.id = "0000000000000-00000".into();
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Loaded {
            model: "SmolLM2-135M-Instruct".into(),
            context_length: 8192,
            n_layers: 30,
            tokenizer: None,
            pruning: true,
            remote: None,
        }),
    );
    app
}

pub fn type_text(app: &mut App, text: &str) {
    for c in text.chars() {
        update(app, Msg::Insert(c));
    }
}

pub fn stats(text: &str) -> GenStats {
    GenStats {
        gpu_memory: None,
        text: text.into(),
        prompt_tokens: 1480,
        reused_tokens: 0,
        prefilled_tokens: 1480,
        generated_tokens: 9,
        ttft_ms: 812.0,
        heal_ms: None,
        prefill_tok_s: 1822.7,
        decode_tok_s: 41.3,
        kv_bytes: 11_206_656,
        kv: Default::default(),
        stop_reason: StopReason::EndOfTurn,
        slim: true,
        prefill_kind: PrefillKind::Full,
        kept_per_layer: (0..30)
            .map(|l| {
                if l < 10 {
                    1480
                } else if l < 20 {
                    1036
                } else if l < 28 {
                    518
                } else {
                    259
                }
            })
            .collect(),
        blocks_swapped_per_step: vec![],
        blocks_revived: 0,
        revival_bytes: 0,
        slim_note: None,
        slim_preset: "smollm2".into(),
        slim_stages: vec![],
    }
}

pub fn draw(app: &mut App, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    let mut view = app.view;
    t.draw(|f| view = render::draw(f, app)).unwrap();
    app.view = view;
    t
}

pub fn screen(t: &Terminal<TestBackend>) -> String {
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        for x in 0..buf.area.width {
            out.push_str(buf[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}
