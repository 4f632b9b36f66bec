//! Lists of closed dates kept outside a calendar's TOML (`closed_from`): an iCalendar
//! file of all-day events, or plain text with one date a line.
//!
//! The iCalendar reader is hand-written for the subset holiday feeds use: unfolded
//! content lines (RFC 5545 3.1), `VEVENT`s with `DTSTART;VALUE=DATE` and an optional
//! exclusive `DTEND;VALUE=DATE`. Anything that would close days in a way this reader
//! cannot follow (a timed event, a recurrence, a `DURATION`) is an error naming its
//! line rather than a silently wrong calendar.

use chrono::NaiveDate;

/// One problem in a date list, at a 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DateListError {
    pub line: usize,
    pub message: String,
}

/// The dates a list closes, and its problems (all of them, in line order).
#[derive(Debug, Default)]
pub(super) struct DateList {
    pub dates: Vec<NaiveDate>,
    pub errors: Vec<DateListError>,
}

impl DateList {
    fn error(&mut self, line: usize, message: impl Into<String>) {
        self.errors.push(DateListError {
            line,
            message: message.into(),
        });
    }
}

/// An all-day event longer than this is surely a mistake (a year typo in DTEND).
const MAX_EVENT_DAYS: i64 = 366;

/// Plain text: one `YYYY-MM-DD` a line; `#` starts a comment; blank lines are skipped.
pub(super) fn parse_lines(text: &str) -> DateList {
    let mut list = DateList::default();
    for (i, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        match NaiveDate::parse_from_str(content, "%Y-%m-%d") {
            Ok(d) => list.dates.push(d),
            Err(_) => list.error(
                i + 1,
                format!("{content:?} is not a date (one YYYY-MM-DD a line, `#` for comments)"),
            ),
        }
    }
    list
}

/// One unfolded content line: `NAME;PARAM=V;...:VALUE`, with the physical line it starts at.
struct ContentLine {
    line: usize,
    name: String,
    params: Vec<(String, String)>,
    value: String,
}

impl ContentLine {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// RFC 5545 3.1: a line starting with a space or tab continues the previous one.
fn unfold(text: &str) -> Vec<(usize, String)> {
    let mut lines: Vec<(usize, String)> = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        match (raw.strip_prefix([' ', '\t']), lines.last_mut()) {
            (Some(rest), Some((_, last))) => last.push_str(rest),
            _ if raw.is_empty() => {}
            _ => lines.push((i + 1, raw.to_owned())),
        }
    }
    lines
}

/// Split at the first `:` (and the parameters at `;`) outside double quotes.
fn parse_content_line(line: usize, text: &str) -> Option<ContentLine> {
    let mut in_quotes = false;
    let mut parts = Vec::new();
    let mut start = 0;
    let mut value_at = None;
    for (i, c) in text.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            ';' if !in_quotes => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            ':' if !in_quotes => {
                parts.push(&text[start..i]);
                value_at = Some(i + 1);
                break;
            }
            _ => {}
        }
    }
    let value = text[value_at?..].to_owned();
    let mut parts = parts.into_iter();
    let name = parts.next()?.trim().to_ascii_uppercase();
    let params = parts
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_owned(), v.trim_matches('"').to_owned()),
            None => (p.trim().to_owned(), String::new()),
        })
        .collect();
    Some(ContentLine {
        line,
        name,
        params,
        value,
    })
}

/// The date of an all-day `DTSTART`/`DTEND`; a time of day is an error.
fn event_date(prop: &ContentLine) -> Result<NaiveDate, String> {
    let value = prop.value.trim();
    let declared_date = prop
        .param("VALUE")
        .is_some_and(|v| v.eq_ignore_ascii_case("DATE"));
    if value.contains('T') || prop.param("VALUE").is_some() && !declared_date {
        return Err(format!(
            "{} {value:?} has a time of day: only all-day events ({};VALUE=DATE:YYYYMMDD) \
             close days",
            prop.name, prop.name
        ));
    }
    NaiveDate::parse_from_str(value, "%Y%m%d")
        .ok()
        .filter(|_| value.len() == 8)
        .ok_or_else(|| format!("{} {value:?} is not a date (YYYYMMDD)", prop.name))
}

#[derive(Default)]
struct Event {
    line: usize,
    start: Option<(usize, NaiveDate)>,
    end: Option<(usize, NaiveDate)>,
    /// A property already reported: the event closes nothing and says no more.
    broken: bool,
}

/// iCalendar: every date of every all-day `VEVENT`.
pub(super) fn parse_ics(text: &str) -> DateList {
    let mut list = DateList::default();
    let lines = unfold(text);
    if !lines
        .first()
        .is_some_and(|(_, l)| l.trim().eq_ignore_ascii_case("BEGIN:VCALENDAR"))
    {
        list.error(
            lines.first().map_or(1, |(n, _)| *n),
            "not an iCalendar file (it must start with BEGIN:VCALENDAR)",
        );
        return list;
    }
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut event: Option<Event> = None;
    for (n, text) in &lines {
        let Some(prop) = parse_content_line(*n, text) else {
            list.error(*n, format!("not an iCalendar content line: {text:?}"));
            continue;
        };
        match prop.name.as_str() {
            "BEGIN" => {
                let component = prop.value.trim().to_ascii_uppercase();
                if component == "VEVENT" && stack.len() == 1 {
                    event = Some(Event {
                        line: *n,
                        ..Event::default()
                    });
                }
                stack.push((*n, component));
            }
            "END" => {
                let component = prop.value.trim().to_ascii_uppercase();
                match stack.pop() {
                    Some((_, open)) if open == component => {}
                    Some((at, open)) => {
                        list.error(
                            *n,
                            format!("END:{component} closes BEGIN:{open} of line {at}"),
                        );
                        return list;
                    }
                    None => {
                        list.error(*n, format!("END:{component} without BEGIN"));
                        return list;
                    }
                }
                if component == "VEVENT"
                    && stack.len() == 1
                    && let Some(e) = event.take()
                {
                    close_event(&mut list, e);
                }
            }
            _ if stack.len() == 2 && event.is_some() => {
                if let Some(e) = event.as_mut() {
                    event_property(&mut list, e, &prop);
                }
            }
            _ => {}
        }
    }
    if let Some((at, open)) = stack.last() {
        list.error(*at, format!("BEGIN:{open} is never closed (END:{open})"));
    }
    list
}

fn event_property(list: &mut DateList, e: &mut Event, prop: &ContentLine) {
    let errors = list.errors.len();
    match prop.name.as_str() {
        "DTSTART" | "DTEND" => match event_date(prop) {
            Ok(d) if prop.name == "DTSTART" => e.start = Some((prop.line, d)),
            Ok(d) => e.end = Some((prop.line, d)),
            Err(m) => list.error(prop.line, m),
        },
        "RRULE" | "RDATE" => list.error(
            prop.line,
            format!(
                "recurring events ({}) are not supported: list each date",
                prop.name
            ),
        ),
        "DURATION" => list.error(
            prop.line,
            "DURATION is not supported: give the (exclusive) end date as DTEND;VALUE=DATE",
        ),
        _ => {}
    }
    e.broken |= list.errors.len() > errors;
}

fn close_event(list: &mut DateList, e: Event) {
    if e.broken {
        return;
    }
    let Some((_, start)) = e.start else {
        list.error(e.line, "VEVENT without DTSTART");
        return;
    };
    let Some((end_line, end)) = e.end else {
        list.dates.push(start);
        return;
    };
    let days = (end - start).num_days();
    if days < 1 {
        list.error(
            end_line,
            format!("DTEND {end} is not after DTSTART {start} (DTEND is exclusive)"),
        );
    } else if days > MAX_EVENT_DAYS {
        list.error(
            end_line,
            format!("an event of {days} days (more than {MAX_EVENT_DAYS}) is surely a typo"),
        );
    } else {
        list.dates.extend(start.iter_days().take(days as usize));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn text_lists_take_comments_and_blank_lines() {
        let list = parse_lines("# holidays\n\n2026-01-01  # new year\n  2026-01-12\nnope\n");
        assert_eq!(list.dates, [d(2026, 1, 1), d(2026, 1, 12)]);
        assert_eq!(list.errors.len(), 1);
        assert_eq!(list.errors[0].line, 5);
        assert!(list.errors[0].message.contains("\"nope\" is not a date"));
    }

    #[test]
    fn ics_all_day_events_with_folding_and_ranges() {
        let text = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20260101\r\n\
                    SUMMARY:New\r\n  Year\r\nEND:VEVENT\r\nBEGIN:VEVENT\r\nDTSTART;VALUE=DATE:2026\r\n 0503\r\n\
                    DTEND;VALUE=DATE:20260507\r\nBEGIN:VALARM\r\nDTSTART:20260101T000000\r\nEND:VALARM\r\n\
                    END:VEVENT\r\nEND:VCALENDAR\r\n";
        let list = parse_ics(text);
        assert!(list.errors.is_empty(), "{:?}", list.errors);
        assert_eq!(
            list.dates,
            [
                d(2026, 1, 1),
                d(2026, 5, 3),
                d(2026, 5, 4),
                d(2026, 5, 5),
                d(2026, 5, 6)
            ]
        );
    }

    #[test]
    fn ics_timed_events_and_recurrences_are_errors_with_lines() {
        let text = "BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART:20260101T090000Z\nEND:VEVENT\n\
                    BEGIN:VEVENT\nDTSTART;VALUE=DATE:20260101\nRRULE:FREQ=YEARLY\nEND:VEVENT\n\
                    BEGIN:VEVENT\nDTSTART;VALUE=DATE-TIME:20260101\nEND:VEVENT\n\
                    BEGIN:VEVENT\nDTSTART;VALUE=DATE:20260105\nDTEND;VALUE=DATE:20260105\nEND:VEVENT\n\
                    BEGIN:VEVENT\nSUMMARY:x\nEND:VEVENT\n\
                    BEGIN:VEVENT\nDTSTART;VALUE=DATE:2026013\nDURATION:P1D\nEND:VEVENT\nEND:VCALENDAR\n";
        let list = parse_ics(text);
        let lines: Vec<usize> = list.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 7, 10, 14, 16, 20, 21], "{:?}", list.errors);
        assert!(list.errors[0].message.contains("time of day"));
        assert!(list.errors[1].message.contains("RRULE"));
        assert!(list.errors[2].message.contains("time of day"));
        assert!(list.errors[3].message.contains("not after"));
        assert!(list.errors[4].message.contains("without DTSTART"));
        assert!(list.errors[5].message.contains("not a date"));
        assert!(list.errors[6].message.contains("DURATION"));
    }

    #[test]
    fn ics_structure_errors() {
        assert!(
            parse_ics("hello\n").errors[0]
                .message
                .contains("BEGIN:VCALENDAR")
        );
        let list = parse_ics("BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART;VALUE=DATE:20260101\n");
        assert_eq!(list.errors.len(), 1);
        assert_eq!(list.errors[0].line, 2);
        assert!(list.errors[0].message.contains("never closed"));
        let list = parse_ics("BEGIN:VCALENDAR\nBEGIN:VEVENT\nEND:VTODO\n");
        assert_eq!(list.errors[0].line, 3);
        let list = parse_ics("BEGIN:VCALENDAR\nno colon here\nEND:VCALENDAR\n");
        assert_eq!(list.errors[0].line, 2);
    }

    #[test]
    fn quoted_parameters_may_hold_colons() {
        let p = parse_content_line(1, "DTSTART;X-NOTE=\"a:b;c\";VALUE=DATE:20260101").unwrap();
        assert_eq!(p.name, "DTSTART");
        assert_eq!(p.param("value"), Some("DATE"));
        assert_eq!(p.value, "20260101");
    }
}
