//! Watch and `FollowLog` as server-sent events: each message of the gRPC stream (the same
//! stream, with its heartbeats) becomes one event named after what it carries, its data the
//! message as JSON (a log's bytes as text). A stream that fails ends with an `error` event
//! carrying the same body as an HTTP error.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use drover_proto::v1::{LogEvent, WatchEvent, log_event, watch_event};
use futures_util::StreamExt as _;
use tokio_stream::Stream;
use tonic::Status;

use super::errors;
use crate::grpc::shutdown::Outbound;

/// A Watch of a build as events: `state`, `step`, `build`, `estimate`, `heartbeat`.
pub fn watch(stream: Outbound<WatchEvent>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    events(stream, |message| {
        let Some(event) = message.event else {
            return Event::default().event("heartbeat").data("{}");
        };
        match event {
            watch_event::Event::State(state) => json_event("state", &state),
            watch_event::Event::Step(step) => json_event("step", &step),
            watch_event::Event::Build(build) => json_event("build", &build),
            watch_event::Event::Estimate(estimate) => json_event("estimate", &estimate),
            watch_event::Event::Heartbeat(heartbeat) => json_event("heartbeat", &heartbeat),
        }
    })
}

/// A step's log as events: `log` (the next bytes, as text) and `heartbeat`. A character split
/// between two chunks goes out whole with the second; a carriage return, which server-sent
/// events cannot carry, goes out as a line end.
pub fn log(stream: Outbound<LogEvent>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut text = LogText::default();
    events(stream, move |message| match message.event {
        Some(log_event::Event::Data(bytes)) => {
            Event::default().event("log").data(text.next(&bytes))
        }
        Some(log_event::Event::Heartbeat(heartbeat)) => json_event("heartbeat", &heartbeat),
        None => Event::default().event("heartbeat").data("{}"),
    })
}

/// A log's bytes as text, a chunk at a time.
#[derive(Default)]
struct LogText {
    /// The start of a character the last chunk ended in.
    pending: Vec<u8>,
}

impl LogText {
    fn next(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let complete = match std::str::from_utf8(&self.pending) {
            // An incomplete character at the end waits for the rest; invalid bytes do not.
            Err(error) if error.error_len().is_none() => error.valid_up_to(),
            _ => self.pending.len(),
        };
        let rest = self.pending.split_off(complete);
        let text = String::from_utf8_lossy(&self.pending)
            .replace("\r\n", "\n")
            .replace('\r', "\n");
        self.pending = rest;
        text
    }
}

/// `stream` as events made by `event`, ended by an `error` event if it fails.
fn events<T: Send + 'static>(
    stream: Outbound<T>,
    mut event: impl FnMut(T) -> Event + Send + 'static,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = stream
        .scan(false, move |failed, item: Result<T, Status>| {
            let next = if *failed {
                None
            } else {
                match item {
                    Ok(message) => Some(event(message)),
                    Err(status) => {
                        *failed = true;
                        Some(json_event("error", &errors::body(&status)))
                    }
                }
            };
            std::future::ready(next)
        })
        .map(Ok);
    Sse::new(events)
}

/// An event named `name` whose data is `value` as JSON.
fn json_event(name: &str, value: &impl serde::Serialize) -> Event {
    let data = serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned());
    Event::default().event(name).data(data)
}

#[cfg(test)]
mod tests {
    use super::LogText;

    #[test]
    fn a_character_split_between_chunks_arrives_whole() {
        let mut text = LogText::default();
        let bytes = "é\r\nb".as_bytes();
        assert_eq!(text.next(&bytes[..1]), "");
        assert_eq!(text.next(&bytes[1..]), "é\nb");
        assert_eq!(text.next(&[0xff, b'x']), "\u{fffd}x");
    }
}
