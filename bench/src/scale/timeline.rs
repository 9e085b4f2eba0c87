//! When simulated builders received each step and sent each result: a tracing layer that
//! records the builder library's `step received` and `result sent` events with their attempt
//! ids, so latencies come from the builder's side of the real tunnel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Receive and send times by attempt id.
#[derive(Clone, Default)]
pub struct Timeline {
    inner: Arc<Mutex<Times>>,
}

/// The recorded times.
#[derive(Default, Clone)]
pub struct Times {
    pub received: HashMap<String, Instant>,
    pub sent: HashMap<String, Instant>,
}

impl Timeline {
    /// A copy of what was recorded so far.
    pub fn times(&self) -> Times {
        self.inner.lock().unwrap().clone()
    }
}

#[derive(Default)]
struct Fields {
    message: Option<String>,
    attempt: Option<String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = Some(format!("{value:?}")),
            "attempt" => self.attempt = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

impl<S: Subscriber> Layer<S> for Timeline {
    fn on_event(&self, event: &Event<'_>, _context: Context<'_, S>) {
        let now = Instant::now();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let (Some(message), Some(attempt)) = (fields.message, fields.attempt) else {
            return;
        };
        let mut times = self.inner.lock().unwrap();
        match message.as_str() {
            "step received" => times.received.insert(attempt, now),
            "result sent" => times.sent.insert(attempt, now),
            _ => None,
        };
    }
}
