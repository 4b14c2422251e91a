//! The narration's lines: headings, prose, HTTP calls, Kafka messages, process actions.
//!
//! Each kind of line has its own tag in a fixed column, so that a flow reads top down:
//!
//! ```text
//! == 3. A quote reserves its stock (event-driven) ==============================
//!    The quote service stores the quote ...
//!    http   POST /quotes                              201  Q1 for Ada: 3 x LATHE
//!    kafka  quote.quote.events          quote.QuoteCreated                 Q1
//! ```

use std::time::Duration;

/// Width of a heading line.
const WIDTH: usize = 100;

/// A flow's heading.
pub(crate) fn heading(title: &str) {
    let bar = "=".repeat(WIDTH.saturating_sub(title.chars().count() + 4));
    println!();
    println!("== {title} {bar}");
}

/// Prose: what the flow shows, in a sentence or two (lines are wrapped at the heading's
/// width).
pub(crate) fn say(text: &str) {
    for line in wrap(text, WIDTH - 3) {
        println!("   {line}");
    }
}

/// An HTTP call: method, path, status and what the answer says.
pub(crate) fn http(method: &str, path: &str, status: u16, what: &str) {
    println!("   http   {method:<4} {path:<40} {status}  {what}");
}

/// A message seen on Kafka: its topic, type and key, and what it says.
pub(crate) fn kafka(topic: &str, message_type: &str, key: &str, what: &str) {
    let line = format!("   kafka  {topic:<28} {message_type:<37} {key:<12} {what}");
    println!("{}", line.trim_end());
}

/// Something the narrator did to a process (start, stop) or checked.
pub(crate) fn action(tag: &str, subject: &str, what: &str) {
    println!("   {tag:<6} {subject:<45} {what}");
}

/// Any other line with a tag of its own (`metric`).
pub(crate) fn tagged(tag: &str, text: &str) {
    println!("   {tag:<6} {text}");
}

/// A result line of the summary.
pub(crate) fn check(ok: bool, what: &str) {
    println!("   {}  {what}", if ok { "ok  " } else { "FAIL" });
}

/// A plain line, indented like the others.
pub(crate) fn line(text: &str) {
    println!("   {text}");
}

/// `1.25 s`, `340 ms`.
pub(crate) fn secs(elapsed: Duration) -> String {
    if elapsed < Duration::from_secs(1) {
        format!("{} ms", elapsed.as_millis())
    } else {
        format!("{:.1} s", elapsed.as_secs_f64())
    }
}

/// Cents as an amount: `7,500.00`.
pub(crate) fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let cents = cents.unsigned_abs();
    let units = (cents / 100).to_string();
    let mut grouped = String::new();
    for (n, digit) in units.chars().enumerate() {
        if n > 0 && (units.len() - n).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    format!("{sign}{grouped}.{:02}", cents % 100)
}

/// An id shortened for display: `…` and its last eight hex digits (a UUIDv7 begins with
/// its timestamp, so ids made in one run share their first digits).
pub(crate) fn short(id: &str) -> String {
    let tail: String = id.chars().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect();
    format!("…{tail}")
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        if !current.is_empty() && current.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_grouped_by_thousands() {
        assert_eq!(money(750_000), "7,500.00");
        assert_eq!(money(100_000_000), "1,000,000.00");
        assert_eq!(money(5), "0.05");
        assert_eq!(money(-123_456), "-1,234.56");
    }

    #[test]
    fn ids_keep_their_tail() {
        assert_eq!(short("0193f2a4-1b2c-7d3e-8f40-5a6b7c8d9e0f"), "…7c8d9e0f");
    }

    #[test]
    fn prose_wraps_at_words() {
        assert_eq!(wrap("aa bb cc", 5), ["aa bb", "cc"]);
    }
}
