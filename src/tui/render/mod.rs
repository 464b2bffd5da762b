//! Drawing the chat screen from an [`App`], one function per area: transcript, chips, input,
//! metrics panel, status line, help overlay, and the guard shown when the terminal is too small.
//! Pure: the same state always draws the same cells.

pub mod metrics;
pub mod transcript;

use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};
use ratatui::Frame;

use super::app::{App, View, COMMANDS};
use super::input::KEYS;

/// Smallest terminal the screen is drawn in; below it only the guard shows.
pub const MIN_WIDTH: u16 = 60;
pub const MIN_HEIGHT: u16 = 16;
/// Width of the metrics panel.
const PANEL_WIDTH: u16 = 34;
/// Most rows the input box grows to.
const MAX_INPUT_ROWS: u16 = 8;

/// Draws everything; returns what the transcript learned about scrolling.
pub fn draw(f: &mut Frame, app: &App) -> View {
    let area = f.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        guard(f, area);
        return app.view;
    }
    // the overflow offer wraps over up to three rows; any other status is one
    let status_rows = app.offer.as_ref().map_or(1, |o| {
        (o.line().chars().count() as u16)
            .div_ceil(area.width)
            .clamp(1, 3)
    });
    let [main, status_row] =
        Layout::vertical([Constraint::Min(1), Constraint::Length(status_rows)]).areas(area);
    let [left, panel] =
        Layout::horizontal([Constraint::Min(20), Constraint::Length(PANEL_WIDTH)]).areas(main);
    let chip_rows = chips_height(app, left.width);
    let input_rows = (app.editor.lines().len() as u16).clamp(1, MAX_INPUT_ROWS) + 2;
    let [log, chips_area, input_area] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(chip_rows),
        Constraint::Length(input_rows),
    ])
    .areas(left);
    let view = transcript::draw(f, app, log);
    chips(f, app, chips_area);
    input(f, app, input_area);
    metrics::draw(f, app, panel);
    status(f, app, status_row);
    if app.help {
        help(f, area);
    }
    view
}

/// "terminal too small" in whatever room there is.
pub fn guard(f: &mut Frame, area: Rect) {
    let text = format!(
        "terminal too small: need at least {MIN_WIDTH}x{MIN_HEIGHT} (now {}x{})",
        area.width, area.height
    );
    let p = Paragraph::new(text)
        .style(Style::default().fg(Color::Yellow))
        .wrap(Wrap { trim: true });
    f.render_widget(p, area);
}

fn chips_height(app: &App, width: u16) -> u16 {
    if app.chips.is_empty() {
        return 0;
    }
    let per = if app.expanded {
        1 + transcript::EXPANDED_LINES.min(6)
    } else {
        1
    };
    let _ = width;
    (app.chips.len() * per).min(12) as u16
}

fn chips(f: &mut Frame, app: &App, area: Rect) {
    if area.height == 0 {
        return;
    }
    let chip = Style::default().fg(Color::Black).bg(Color::Cyan);
    let mut lines = Vec::new();
    for c in &app.chips {
        lines.push(Line::from(vec![
            Span::styled(format!("[{}]", app.chip_label(c)), chip),
            Span::styled(
                if app.expanded {
                    "  Ctrl+E folds"
                } else {
                    "  Ctrl+E shows"
                },
                Style::default().fg(Color::DarkGray),
            ),
        ]));
        if app.expanded {
            for l in transcript::wrap(&c.text, area.width as usize)
                .into_iter()
                .take(6)
            {
                lines.push(Line::styled(l, Style::default().fg(Color::Gray)));
            }
        }
    }
    f.render_widget(Paragraph::new(lines), area);
}

fn input(f: &mut Frame, app: &App, area: Rect) {
    let (title, style) = match app.overflow_warning() {
        Some((next, ctx)) => (
            format!(
                " Message · ⚠ ~{} tokens will not fit in {}: {} ",
                super::app::thousands(next),
                super::app::thousands(ctx),
                if app.conv.messages.iter().any(|m| {
                    m.role == crate::tui::store::Role::User
                        && !m.out_of_context
                        && m.attachments.is_empty()
                }) {
                    "Enter offers to drop old turns or start anew"
                } else {
                    "it will be refused"
                }
            ),
            Style::default().fg(Color::Red),
        ),
        None if app.busy() => (
            " Message · answering (Esc stops) ".to_string(),
            Style::default().fg(Color::DarkGray),
        ),
        None => (
            " Message · Enter sends · Alt+Enter new line ".to_string(),
            Style::default(),
        ),
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(style)
        .title(title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let lines = app.editor.lines();
    let (row, col) = app.editor.cursor();
    let h = inner.height as usize;
    let top = row.saturating_sub(h.saturating_sub(1));
    // Keep the cursor's column in view on long lines.
    let w = inner.width as usize;
    let left = col.saturating_sub(w.saturating_sub(1));
    let shown: Vec<Line> = lines
        .iter()
        .skip(top)
        .take(h)
        .map(|l| Line::raw(l.chars().skip(left).collect::<String>()))
        .collect();
    f.render_widget(Paragraph::new(shown), inner);
    if !app.help {
        let x = inner.x + (col - left) as u16;
        let y = inner.y + (row - top) as u16;
        f.set_cursor_position(Position::new(x.min(inner.right() - 1), y));
    }
}

fn status(f: &mut Frame, app: &App, area: Rect) {
    if let Some(offer) = &app.offer {
        let line = Line::styled(
            offer.line(),
            Style::default()
                .fg(Color::Yellow)
                .add_modifier(Modifier::BOLD),
        );
        f.render_widget(Paragraph::new(line).wrap(Wrap { trim: true }), area);
        return;
    }
    let line = match &app.status {
        Some(s) if s.error => Line::styled(
            format!("✗ {}", s.text),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        Some(s) => Line::styled(s.text.clone(), Style::default().fg(Color::Cyan)),
        None => Line::styled(
            "F1 help · Enter send · Esc stop · Ctrl+R regenerate · F2 compare · +/- keep ratio · Ctrl+C quit",
            Style::default().fg(Color::DarkGray),
        ),
    };
    f.render_widget(Paragraph::new(line), area);
}

fn help(f: &mut Frame, area: Rect) {
    let w = area.width.min(100);
    let h = area.height.min((KEYS.len() + COMMANDS.len() + 6) as u16);
    let r = Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    );
    let key = Style::default()
        .fg(Color::Cyan)
        .add_modifier(Modifier::BOLD);
    let mut lines = vec![Line::styled(
        "Keys",
        Style::default().add_modifier(Modifier::BOLD),
    )];
    for (k, d) in KEYS {
        lines.push(Line::from(vec![
            Span::styled(format!("{k:<36}"), key),
            Span::raw(*d),
        ]));
    }
    lines.push(Line::raw(""));
    lines.push(Line::styled(
        "Commands",
        Style::default().add_modifier(Modifier::BOLD),
    ));
    for (c, d) in COMMANDS {
        lines.push(Line::from(vec![
            Span::styled(format!("{c:<36}"), key),
            Span::raw(*d),
        ]));
    }
    let block = Block::default()
        .borders(Borders::ALL)
        .title(" Help · any key closes ");
    f.render_widget(Clear, r);
    f.render_widget(Paragraph::new(lines).block(block), r);
}
