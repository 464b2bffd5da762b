//! The transcript area: every message wrapped to the width, code blocks set apart, pasted
//! documents folded into one line, compare results side by side, and the scroll position.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};
use ratatui::Frame;
use unicode_width::UnicodeWidthChar;

use crate::tui::agreement::agreement;
use crate::tui::app::{thousands, App, View};
use crate::tui::store::{ChatMessage, Comparison, Role};

/// Lines of a chip's text shown when chips are expanded.
pub const EXPANDED_LINES: usize = 12;

/// Splits `text` into lines no wider than `width` columns, breaking at spaces when it can.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut out = Vec::new();
    for raw in text.split('\n') {
        let raw = raw.replace('\t', "    ");
        let mut line = String::new();
        let mut w = 0;
        let mut last_space: Option<(usize, usize)> = None; // (byte index, width before it)
        for c in raw.chars() {
            let cw = c.width().unwrap_or(0);
            if w + cw > width {
                match last_space {
                    Some((at, _)) if at > 0 => {
                        let rest = line[at + 1..].to_string();
                        line.truncate(at);
                        out.push(std::mem::take(&mut line));
                        line = rest;
                    }
                    _ => out.push(std::mem::take(&mut line)),
                }
                w = line.chars().map(|c| c.width().unwrap_or(0)).sum();
                last_space = None;
            }
            if c == ' ' {
                last_space = Some((line.len(), w));
            }
            line.push(c);
            w += cw;
        }
        out.push(line);
    }
    out
}

fn styled(lines: Vec<String>, style: Style) -> impl Iterator<Item = Line<'static>> {
    lines.into_iter().map(move |l| Line::styled(l, style))
}

/// Answer text with ``` fences: code lines in their own colour, fences as a rule.
fn markdownish(text: &str, width: usize, out: &mut Vec<Line<'static>>) {
    let code = Style::default()
        .fg(Color::Yellow)
        .bg(Color::Rgb(30, 30, 30));
    let mut in_code = false;
    for raw in text.split('\n') {
        if let Some(lang) = raw.trim_start().strip_prefix("```") {
            in_code = !in_code;
            let label = if in_code && !lang.trim().is_empty() {
                format!("── {} ", lang.trim())
            } else {
                String::new()
            };
            let fill = width.saturating_sub(label.chars().count());
            out.push(Line::styled(
                format!("{label}{}", "─".repeat(fill)),
                Style::default().fg(Color::DarkGray),
            ));
            continue;
        }
        if in_code {
            out.extend(styled(wrap(raw, width), code));
        } else {
            out.extend(styled(wrap(raw, width), Style::default()));
        }
    }
}

fn attachments(app: &App, m: &ChatMessage, width: usize, out: &mut Vec<Line<'static>>) {
    let expanded = app.expanded;
    let chip = Style::default().fg(Color::Black).bg(Color::Cyan);
    for a in &m.attachments {
        out.push(Line::from(Span::styled(
            format!("[{}]", app.chip_label(a)),
            chip,
        )));
        if expanded {
            let dim = Style::default().fg(Color::Gray);
            let lines = wrap(&a.text, width);
            let more = lines.len().saturating_sub(EXPANDED_LINES);
            out.extend(styled(
                lines.into_iter().take(EXPANDED_LINES).collect(),
                dim,
            ));
            if more > 0 {
                out.push(Line::styled(
                    format!("… {} more lines", thousands(more)),
                    dim,
                ));
            }
        }
    }
}

fn comparison(c: &Comparison, width: usize, out: &mut Vec<Line<'static>>) {
    let col = width.saturating_sub(3) / 2;
    let head = Style::default()
        .add_modifier(Modifier::BOLD)
        .fg(Color::Magenta);
    let left = format!("Dense · TTFT {:.0} ms", c.dense_ttft_ms);
    let right = format!(
        "Pruned keep {:.2} · TTFT {:.0} ms",
        c.keep_ratio, c.slim_ttft_ms
    );
    let pad = |s: &str| {
        let n = s.chars().count();
        format!("{s}{}", " ".repeat(col.saturating_sub(n)))
    };
    out.push(Line::styled(format!("{} │ {}", pad(&left), right), head));
    let verdict = agreement(&c.dense, &c.slim).summary();
    out.extend(
        wrap(&verdict, width)
            .into_iter()
            .map(|l| Line::styled(l, head)),
    );
    let a = wrap(&c.dense, col);
    let b = wrap(&c.slim, col);
    for i in 0..a.len().max(b.len()) {
        let l = a.get(i).map_or("", String::as_str);
        let r = b.get(i).map_or("", String::as_str);
        let lw: usize = l.chars().map(|c| c.width().unwrap_or(0)).sum();
        out.push(Line::raw(format!(
            "{l}{} │ {r}",
            " ".repeat(col.saturating_sub(lw))
        )));
    }
}

/// Every line of the transcript at `width` columns.
pub fn lines(app: &App, width: usize) -> Vec<Line<'static>> {
    let mut out: Vec<Line<'static>> = Vec::new();
    let user = Style::default()
        .fg(Color::Cyan)
        .add_modifier(Modifier::BOLD);
    let bot = Style::default()
        .fg(Color::Green)
        .add_modifier(Modifier::BOLD);
    let dim = Style::default().fg(Color::DarkGray);
    let n = app.conv.messages.len();
    for (i, m) in app.conv.messages.iter().enumerate() {
        if !out.is_empty() {
            out.push(Line::raw(""));
        }
        let gone = if m.out_of_context && m.role != Role::Note {
            " · left out of the model's context"
        } else {
            ""
        };
        match m.role {
            Role::User => {
                let style = if gone.is_empty() { user } else { dim };
                out.push(Line::styled(format!("You{gone}"), style));
                attachments(app, m, width, &mut out);
                if !m.content.is_empty() {
                    out.extend(styled(wrap(&m.content, width), Style::default()));
                }
            }
            Role::Assistant => {
                let streaming = m.partial && i + 1 == n && app.busy();
                let tag = if streaming {
                    " …"
                } else if m.partial {
                    " (cut off)"
                } else {
                    ""
                };
                let style = if gone.is_empty() { bot } else { dim };
                out.push(Line::styled(format!("slimchat{tag}{gone}"), style));
                markdownish(&m.content, width, &mut out);
                if let Some(x) = &m.metrics {
                    let prune = if x.slim {
                        format!("pruned, keep {:.2}", x.keep_ratio)
                    } else {
                        "dense".into()
                    };
                    let stop = if x.stop_reason == "end_of_turn" {
                        String::new()
                    } else {
                        format!(" · {}", x.stop_reason.replace('_', " "))
                    };
                    let footer = format!(
                        "TTFT {:.0} ms · prefill {:.0} tok/s · decode {:.1} tok/s · {} prompt tokens · {prune}{stop}",
                        x.ttft_ms, x.prefill_tok_s, x.decode_tok_s, thousands(x.prompt_tokens)
                    );
                    out.extend(styled(wrap(&footer, width), dim));
                }
            }
            Role::Note => match &m.comparison {
                Some(c) => comparison(c, width, &mut out),
                None => out.extend(styled(wrap(&format!("— {}", m.content), width), dim)),
            },
        }
    }
    out
}

/// Draws the transcript; returns how far it can scroll and a page's height.
pub fn draw(f: &mut Frame, app: &App, area: Rect) -> View {
    let title = format!(" {} ", app.conv.title());
    let block = Block::default().borders(Borders::ALL).title(title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let mut all = lines(app, inner.width as usize);
    if app.conv.messages.is_empty() {
        let hint = Style::default().fg(Color::DarkGray);
        all.push(Line::styled(
            "Paste a document (it becomes a chip), or /read PATH, then ask about it. F1: help.",
            hint,
        ));
    }
    let h = inner.height as usize;
    let max_scroll = all.len().saturating_sub(h);
    let scroll = app.scroll.min(max_scroll);
    let top = max_scroll - scroll;
    let shown: Vec<Line> = all.into_iter().skip(top).take(h).collect();
    f.render_widget(Paragraph::new(shown), inner);
    if scroll > 0 {
        let tag = format!(" ↑ {} more below · Ctrl+End ", scroll);
        let w = tag.chars().count() as u16;
        if w + 2 < area.width {
            let r = Rect::new(area.x + area.width - w - 2, area.y + area.height - 1, w, 1);
            f.render_widget(
                Paragraph::new(tag).style(Style::default().fg(Color::Yellow)),
                r,
            );
        }
    }
    View {
        max_scroll,
        page: h.saturating_sub(1).max(1),
    }
}
