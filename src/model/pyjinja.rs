//! The parts of transformers' chat-template environment that minijinja does not have by itself:
//! its `tojson` filter, which is Python's `json.dumps` (spaces after `,` and `:`, no HTML
//! escaping, `indent`/`separators`/`sort_keys`/`ensure_ascii` options), and `strftime_now`, which
//! is Python's `datetime.now().strftime(format)` (Llama 3.2's template prints the date with it).
//!
//! Reference: `_compile_jinja_template` in transformers' `utils/chat_template_utils.py`, and
//! Python's `json` encoder and `strftime` format codes. minijinja's own `tojson` differs on every
//! dict (`{"a":1}` against `{"a": 1}`) and escapes `<`, `>`, `&` and `'`, which would change the
//! prompt of every template that prints a tool schema or tool-call arguments.

use std::fmt::Write;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, each option a keyword argument.
pub fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match (v.kind(), i64::try_from(v.clone())) {
            (ValueKind::Number, Ok(n)) if n <= MAX_INDENT => " ".repeat(n.max(0) as usize),
            (ValueKind::Number, Ok(_)) => {
                return Err(invalid("tojson: indent is larger than 64"));
            }
            (ValueKind::String, _) if v.as_str().is_some_and(|s| s.len() > MAX_INDENT as usize) => {
                return Err(invalid("tojson: indent is longer than 64"));
            }
            (ValueKind::String, _) => v.to_string(),
            _ => return Err(invalid("tojson: indent must be an integer or a string")),
        }),
    };
    let separators = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(s) if s.len() == 2 => Some((s[0].clone(), s[1].clone())),
        Some(_) => return Err(invalid("tojson: separators must be a pair of strings")),
        None => None,
    };
    let (item_sep, key_sep) = separators.unwrap_or_else(|| {
        let item = if indent.is_some() { "," } else { ", " };
        (item.to_string(), ": ".to_string())
    });
    let opts = JsonOptions {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    // The text is JSON, not HTML: mark it safe so no auto-escaping touches it.
    Ok(Value::from_safe_string(out))
}

struct JsonOptions {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn invalid(msg: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.to_string())
}

/// Widest `indent` (a template is a stranger's code: the width must not size an allocation).
const MAX_INDENT: i64 = 64;
/// Longest text `tojson` writes (a template can double a string until memory runs out; this
/// stops the doubling when it goes through `tojson`).
const MAX_JSON_BYTES: usize = 16 << 20;
/// Deepest nesting `tojson` writes (a template can build a list nested as deep as its fuel).
const MAX_JSON_DEPTH: usize = 128;

/// Python's JSON encoder over a template value; `depth` is the nesting level for `indent`.
fn write_json(out: &mut String, v: &Value, o: &JsonOptions, depth: usize) -> Result<(), Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(invalid("tojson: the value is nested more than 128 deep"));
    }
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => out.push_str(&python_float(f64::try_from(v.clone())?)),
        ValueKind::String => {
            let text = v.as_str().unwrap_or_default();
            if out.len() + text.len() > MAX_JSON_BYTES {
                return Err(invalid("tojson: the text is longer than 16 MiB"));
            }
            write_json_string(out, text, o.ensure_ascii)
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort();
            }
            let mut items = Vec::with_capacity(keys.len());
            for k in keys {
                let mut item = String::new();
                let key = match k.kind() {
                    ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                    ValueKind::Bool => if k.is_true() { "true" } else { "false" }.to_string(),
                    ValueKind::None => "null".to_string(),
                    _ => k.to_string(),
                };
                write_json_string(&mut item, &key, o.ensure_ascii);
                item.push_str(&o.key_sep);
                write_json(&mut item, &v.get_item(&k)?, o, depth + 1)?;
                items.push(item);
            }
            write_container(out, '{', '}', &items, o, depth);
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let mut items = Vec::new();
            for x in v.try_iter()? {
                let mut item = String::new();
                write_json(&mut item, &x, o, depth + 1)?;
                items.push(item);
            }
            write_container(out, '[', ']', &items, o, depth);
        }
        _ => {
            return Err(invalid(&format!(
                "tojson: a {} is not JSON serializable",
                v.kind()
            )))
        }
    }
    Ok(())
}

/// `[a, b]`, or with `indent` each item on its own line one level deeper.
fn write_container(
    out: &mut String,
    open: char,
    close: char,
    items: &[String],
    o: &JsonOptions,
    depth: usize,
) {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return;
    }
    match &o.indent {
        None => out.push_str(&items.join(&o.item_sep)),
        Some(unit) => {
            let inner = format!("\n{}", unit.repeat(depth + 1));
            out.push_str(&inner);
            out.push_str(&items.join(&format!("{}{inner}", o.item_sep)));
            out.push('\n');
            out.push_str(&unit.repeat(depth));
        }
    }
    out.push(close);
}

/// A JSON string as Python writes it: `"` `\` and control characters escaped, the rest kept
/// (or, with `ensure_ascii`, every non-ASCII character as `\uXXXX`, astral ones as a surrogate pair).
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr` of a float: shortest round-trip digits (Rust's `{:?}` switches to an
/// exponent at the same bounds, 1e-4 and 1e16), exponents as `e+20`/`e-07`, and `NaN` and
/// `Infinity` as `json.dumps` writes them.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{f:?}");
    let Some((mantissa, exp)) = s.split_once('e') else {
        return s;
    };
    let (sign, digits) = match exp.strip_prefix('-') {
        Some(d) => ('-', d),
        None => ('+', exp),
    };
    format!("{mantissa}e{sign}{digits:0>2}")
}

/// `strftime_now(format)`: the time now in UTC, formatted like Python's `strftime`.
pub fn strftime_now(unix_secs: i64, format: &str) -> String {
    strftime(unix_secs, format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// The UTC calendar fields of a Unix time.
struct DateTime {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    /// 1..=366
    yday: u32,
    /// 0 = Monday
    weekday: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let jan1 = days_from_civil(year, 1, 1);
        Self {
            year,
            month,
            day,
            yday: (days - jan1) as u32 + 1,
            // 1970-01-01 was a Thursday (3 when Monday is 0).
            weekday: (days + 3).rem_euclid(7) as u32,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
        }
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar, by counting
/// 400-year eras of 146097 days from 0000-03-01 (so leap days fall at the end of each year).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year, 0..365
    let mp = (5 * doy + 2) / 153; // March-based month, 0..11
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Python's `strftime` codes for dates and times in UTC (`%d %b %Y`, `%Y-%m-%d`, ...), with glibc's
/// `%-d` form that drops the padding; unknown codes are kept as written, as glibc does.
fn strftime(unix_secs: i64, format: &str) -> String {
    let t = DateTime::from_unix(unix_secs);
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let Some(code) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |n: i64, width: usize| {
            if unpadded {
                n.to_string()
            } else {
                format!("{n:0width$}")
            }
        };
        let hour12 = if t.hour.is_multiple_of(12) {
            12
        } else {
            t.hour % 12
        };
        let text = match code {
            'Y' => t.year.to_string(),
            'y' => num(t.year.rem_euclid(100), 2),
            'm' => num(t.month.into(), 2),
            'd' => num(t.day.into(), 2),
            'e' => format!("{:>2}", t.day),
            'j' => num(t.yday.into(), 3),
            'H' => num(t.hour.into(), 2),
            'I' => num(hour12.into(), 2),
            'M' => num(t.minute.into(), 2),
            'S' => num(t.second.into(), 2),
            'p' => if t.hour < 12 { "AM" } else { "PM" }.to_string(),
            'B' => MONTHS[t.month as usize - 1].to_string(),
            'b' | 'h' => MONTHS[t.month as usize - 1][..3].to_string(),
            'A' => WEEKDAYS[t.weekday as usize].to_string(),
            'a' => WEEKDAYS[t.weekday as usize][..3].to_string(),
            'u' => (t.weekday + 1).to_string(),
            'w' => ((t.weekday + 1) % 7).to_string(),
            'F' => format!("{}-{:02}-{:02}", t.year, t.month, t.day),
            'T' => format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second),
            'Z' => "UTC".to_string(),
            'z' => "+0000".to_string(),
            '%' => "%".to_string(),
            other => format!("%{}{other}", if unpadded { "-" } else { "" }),
        };
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_round_trips_and_knows_leap_years() {
        for days in [
            -719_468, -1, 0, 59, 10_956, 11_016, 19_782, 20_517, 2_932_896,
        ] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_517), (2026, 3, 5));
    }

    #[test]
    fn strftime_formats_like_python() {
        // 2026-03-05 09:07:03 UTC, a Thursday, day 64 of the year.
        let t = 1_772_701_623;
        assert_eq!(strftime(t, "%d %b %Y"), "05 Mar 2026");
        assert_eq!(strftime(t, "%Y-%m-%d %H:%M:%S"), "2026-03-05 09:07:03");
        assert_eq!(
            strftime(t, "%A %B %-d %j %y %I%p %a %e %% %Q"),
            "Thursday March 5 064 26 09AM Thu  5 % %Q"
        );
        assert_eq!(strftime(0, "%F %T %u %w"), "1970-01-01 00:00:00 4 4");
    }

    #[test]
    fn floats_print_as_python_repr() {
        assert_eq!(python_float(2.5), "2.5");
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e20), "1e+20");
        assert_eq!(python_float(1.5e-7), "1.5e-07");
        assert_eq!(python_float(-0.0001), "-0.0001");
        assert_eq!(python_float(1e-5), "1e-05");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1e15), "1000000000000000.0");
    }
}
