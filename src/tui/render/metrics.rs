//! The metrics panel: model load gauge, TTFT clock, prefill progress with ETA, tokens/s,
//! context used of the maximum, KV bytes, RSS, the pruning knob and kept tokens per layer.

use std::time::Duration;

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};
use ratatui::Frame;

use crate::tui::app::{thousands, App, LastStats, RequestKind};

/// A bar of `width` cells filled to `frac`.
pub fn bar(frac: f64, width: usize) -> String {
    let frac = frac.clamp(0.0, 1.0);
    let full = (frac * width as f64).round() as usize;
    format!(
        "{}{}",
        "█".repeat(full),
        "░".repeat(width - full.min(width))
    )
}

/// Bytes as `12.3 MB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KB", "MB", "GB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn kv(label: &str, value: impl Into<String>) -> Line<'static> {
    Line::from(vec![
        Span::styled(format!("{label:<8}"), Style::default().fg(Color::DarkGray)),
        Span::raw(value.into()),
    ])
}

/// The panel's lines for a panel `width` columns wide with `height` rows.
pub fn lines(app: &App, width: usize, height: usize) -> Vec<Line<'static>> {
    let mut out = Vec::new();
    let bar_w = width.saturating_sub(14).clamp(4, 30);
    let warn = Style::default().fg(Color::Red).add_modifier(Modifier::BOLD);
    match (&app.model, &app.loading, &app.load_error) {
        (_, _, Some(_)) => out.push(Line::styled("no engine (see below)", warn)),
        (Some(m), _, _) => {
            out.push(kv("model", m.name.clone()));
        }
        (None, Some(p), _) => {
            out.push(Line::raw("loading model"));
            out.push(Line::styled(
                p.what.clone(),
                Style::default().fg(Color::DarkGray),
            ));
            match p.total_bytes.filter(|&t| t > 0) {
                Some(t) => {
                    let f = p.done_bytes as f64 / t as f64;
                    out.push(Line::raw(format!("{} {:>3.0}%", bar(f, bar_w), f * 100.0)));
                    out.push(Line::raw(format!("{} / {}", bytes(p.done_bytes), bytes(t))));
                }
                None => out.push(Line::raw(format!("{} so far", bytes(p.done_bytes)))),
            }
        }
        (None, None, _) => out.push(Line::raw("loading model…")),
    }

    // The request in flight, or the last one.
    if let Some(r) = &app.running {
        let healing = r.healing.is_some() && r.heal_ms.is_none();
        let state = match (r.kind, r.first_token, r.stopping) {
            (_, _, true) => "stopping",
            (RequestKind::Compare, _, _) => "comparing",
            (_, None, _) => "prefill",
            (_, Some(_), _) if healing => "healing",
            (_, Some(_), _) => "decoding",
        };
        out.push(kv("state", state));
        match r.first_token {
            None => out.push(Line::from(vec![
                Span::styled(
                    format!("{:<8}", "TTFT"),
                    Style::default().fg(Color::DarkGray),
                ),
                Span::styled(
                    format!("{} …", secs(app.clock.saturating_sub(r.started))),
                    Style::default().fg(Color::Yellow),
                ),
            ])),
            Some(t) => out.push(kv(
                "TTFT",
                format!("{:.0} ms", t.saturating_sub(r.started).as_secs_f64() * 1e3),
            )),
        }
        if let Some((done, n, tokens, rows)) = r.prefill {
            let f = done as f64 / n.max(1) as f64;
            out.push(Line::raw(format!("{} {done}/{n}", bar(f, bar_w))));
            let since = r.prefill_started.map(|s| app.clock.saturating_sub(s));
            let eta = match since {
                Some(s) if done > 0 && done < n => {
                    format!(
                        " · ETA {}",
                        secs(s.mul_f64((n - done) as f64 / done as f64))
                    )
                }
                _ => String::new(),
            };
            out.push(Line::raw(format!(
                "{}→{} rows{eta}",
                thousands(tokens),
                thousands(rows)
            )));
        }
        // the heal's step (the answer's second) is not decode's: the rate counts the others
        let heal_s = match (r.healing, r.heal_ms) {
            (_, Some(ms)) => ms / 1e3,
            (Some(h0), None) => app.clock.saturating_sub(h0).as_secs_f64(),
            (None, None) => 0.0,
        };
        if r.healing.is_some() {
            let ongoing = if healing { " …" } else { "" };
            out.push(kv("heal", format!("{heal_s:.1} s{ongoing}")));
        }
        if let Some(t0) = r.first_token {
            let d = app.clock.saturating_sub(t0).as_secs_f64() - heal_s;
            let rate = if d > 0.0 { r.tokens as f64 / d } else { 0.0 };
            out.push(kv("decode", format!("{rate:.1} tok/s · {}", r.tokens)));
        }
    } else if let Some(l) = app.last.as_ref().filter(|l| l.stopped_before_answer) {
        out.push(kv("state", "idle"));
        out.push(kv("TTFT", format!("stopped at {:.1} s", l.ttft_ms / 1e3)));
    } else if let Some(l) = &app.last {
        out.push(kv("state", "idle"));
        out.push(kv("TTFT", format!("{:.0} ms", l.ttft_ms)));
        out.push(kv("prefill", format!("{:.0} tok/s", l.prefill_tok_s)));
        if let Some(ms) = l.heal_ms {
            out.push(kv("heal", format!("{:.1} s", ms / 1e3)));
        }
        out.push(kv("decode", format!("{:.1} tok/s", l.decode_tok_s)));
    } else if app.model.is_some() {
        out.push(kv("state", "idle"));
    }

    if let Some(m) = &app.model {
        let used = app.context_used();
        if m.context_length > 0 {
            let f = used as f64 / m.context_length as f64;
            out.push(kv(
                "context",
                format!("{} / {}", thousands(used), thousands(m.context_length)),
            ));
            out.push(Line::raw(format!("{} {:>3.0}%", bar(f, bar_w), f * 100.0)));
        } else {
            out.push(kv("context", format!("{} / ?", thousands(used))));
        }
        let pending = app.pending_tokens();
        if let Some((next, ctx)) = app.overflow_warning() {
            out.push(Line::styled(
                format!(
                    "⚠ next ~{} > {}: won't fit",
                    thousands(next),
                    thousands(ctx)
                ),
                warn,
            ));
        } else if pending > 0 {
            out.push(Line::styled(
                format!("next message ~{} tok", thousands(pending)),
                Style::default().fg(Color::DarkGray),
            ));
        }
    }
    // live while a request runs (the engine's latest reading), else the last request's
    let live = app.running.as_ref().and_then(|r| r.memory);
    if let Some(m) = live.or_else(|| app.last.as_ref().map(LastStats::memory)) {
        if m.kv_host_bytes > 0 {
            // the KV manager: what decode reads (fast) and the backing copy (host)
            out.push(kv("KV fast", bytes(m.kv_fast_bytes as u64)));
            out.push(kv("KV host", bytes(m.kv_host_bytes as u64)));
        } else {
            out.push(kv("KV", bytes(m.kv_fast_bytes as u64)));
        }
        out.push(kv("RSS", bytes(m.rss_bytes)));
        if let Some(g) = m.gpu {
            // the device's memory in use (by every process) of its total, and ours
            let used = g.gpu_total_bytes.saturating_sub(g.gpu_free_bytes);
            let f = used as f64 / g.gpu_total_bytes.max(1) as f64;
            out.push(kv(
                "VRAM",
                format!("{} / {}", bytes(used), bytes(g.gpu_total_bytes)),
            ));
            out.push(Line::raw(format!("{} {:>3.0}%", bar(f, bar_w), f * 100.0)));
            out.push(kv("ours", bytes(g.gpu_own_bytes)));
        }
    }
    let pruning = app.model.as_ref().is_none_or(|m| m.pruning);
    let knob = if !pruning {
        "n/a (remote engine)".to_string()
    } else if app.slim.enabled {
        format!("on · keep {:.2}", app.slim.keep_ratio)
    } else {
        format!("off · keep {:.2}", app.slim.keep_ratio)
    };
    out.push(Line::from(vec![
        Span::styled(
            format!("{:<8}", "pruning"),
            Style::default().fg(Color::DarkGray),
        ),
        Span::styled(
            knob,
            Style::default()
                .fg(Color::Cyan)
                .add_modifier(Modifier::BOLD),
        ),
    ]));
    if pruning {
        out.push(Line::styled(
            "+/- ratio · Ctrl+P toggle",
            Style::default().fg(Color::DarkGray),
        ));
    }
    if let Some(l) = app.last.as_ref().filter(|l| l.slim) {
        out.push(Line::styled(
            format!("schedule {}", l.slim_preset),
            Style::default().fg(Color::DarkGray),
        ));
        // a prompt under the schedule's floors runs dense, and a pruned one is whole again
        // after its answer: say which where the ratio is turned
        let kept = &l.kept_per_layer;
        if !kept.is_empty() && kept.iter().all(|&k| k == kept[0]) {
            let why = match l.whole_again {
                true => "whole again for follow-ups",
                false => "nothing pruned at this length",
            };
            out.push(Line::styled(why, Style::default().fg(Color::DarkGray)));
        }
    }
    if let Some(l) = app.last.as_ref().filter(|l| !l.kept_per_layer.is_empty()) {
        let room = height.saturating_sub(out.len() + 1);
        out.extend(kept_bars(&l.kept_per_layer, width, room));
    }
    out
}

/// One bar per layer (layers grouped when rows are short), scaled to the widest layer.
fn kept_bars(kept: &[usize], width: usize, rows: usize) -> Vec<Line<'static>> {
    if rows < 2 {
        return vec![];
    }
    let mut out = vec![Line::styled(
        "kept tokens per layer",
        Style::default().fg(Color::DarkGray),
    )];
    let per = kept.len().div_ceil(rows - 1).max(1);
    let max = kept.iter().copied().max().unwrap_or(1).max(1);
    let num_w = thousands(max).len();
    let bar_w = width.saturating_sub(4 + num_w + 2).max(1);
    for (g, chunk) in kept.chunks(per).enumerate() {
        let v = chunk.iter().copied().max().unwrap_or(0);
        let label = format!("{:>3}", g * per);
        out.push(Line::from(vec![
            Span::styled(label, Style::default().fg(Color::DarkGray)),
            Span::raw(" "),
            Span::styled(
                bar(v as f64 / max as f64, bar_w),
                Style::default().fg(if v < max { Color::Magenta } else { Color::Blue }),
            ),
            Span::raw(format!(" {:>num_w$}", thousands(v))),
        ]));
    }
    out
}

pub fn draw(f: &mut Frame, app: &App, area: Rect) {
    let block = Block::default().borders(Borders::ALL).title(" Metrics ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    let lines = lines(app, inner.width as usize, inner.height as usize);
    f.render_widget(Paragraph::new(lines), inner);
}
