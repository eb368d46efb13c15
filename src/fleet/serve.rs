//! `fleet serve`: the web dashboard. One page (assets compiled into the binary:
//! no CDN, it runs on an offline plant network), kept live by server-sent events
//! fed from the MQTT stream: the device table, per-device loss / accuracy / lr
//! curves of the current and previous run (uPlot, MIT, vendored with its
//! licence), the event feed; train / stop buttons only with `--allow-commands`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeFilter};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::cli::{connect_and_load, new_request_id};
use super::client::{FleetTopics, Target};
use super::command::{self, Verb};
use super::view::{Change, Fleet};
use super::FleetError;
use crate::config::MqttSettings;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const UPLOT_JS: &str = include_str!("assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("assets/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("assets/LICENSE-uPlot.txt");

/// Updates a slow page may fall behind by before it gets a fresh snapshot.
const CHANNEL: usize = 4096;

struct App {
    fleet: Mutex<Fleet>,
    updates: broadcast::Sender<Arc<str>>,
    client: AsyncClient,
    topics: FleetTopics,
    allow_commands: bool,
}

impl App {
    fn fleet(&self) -> MutexGuard<'_, Fleet> {
        self.fleet.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self) -> Value {
        let mut v = self.fleet().snapshot();
        v["allow_commands"] = json!(self.allow_commands);
        v
    }
}

/// Connects, loads the retained statuses, and serves the dashboard on `listen`
/// until SIGINT/SIGTERM.
pub async fn serve(
    settings: MqttSettings,
    wait: Duration,
    listen: SocketAddr,
    allow_commands: bool,
) -> Result<(), FleetError> {
    let (conn, fleet) = connect_and_load(&settings, wait).await?;
    let (updates, _) = broadcast::channel(CHANNEL);
    let app = Arc::new(App {
        fleet: Mutex::new(fleet),
        updates,
        client: conn.client.clone(),
        topics: conn.topics.clone(),
        allow_commands,
    });
    tokio::spawn(follow(app.clone(), conn.eventloop));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| FleetError::Serve(format!("--listen {listen}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| FleetError::Serve(e.to_string()))?;
    // The address on stdout (port 0 picks one), for people and scripts.
    println!("serving the fleet dashboard on http://{local}/");
    tracing::info!(%local, allow_commands, broker = %conn.address, "fleet dashboard up");
    let router = Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route(
            "/uPlot.iife.min.js",
            get(|| async { asset("text/javascript", UPLOT_JS) }),
        )
        .route(
            "/uPlot.min.css",
            get(|| async { asset("text/css", UPLOT_CSS) }),
        )
        .route(
            "/LICENSE-uPlot.txt",
            get(|| async { asset("text/plain", UPLOT_LICENSE) }),
        )
        .route("/api/fleet", get(snapshot))
        .route("/api/stream", get(stream))
        .route("/api/command", post(command_handler))
        .with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(stop_signal())
        .await
        .map_err(|e| FleetError::Serve(e.to_string()))
}

async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Polls the MQTT event loop for the whole life of the server: folds every
/// message into the fleet and tells the pages; resubscribes after a reconnect.
async fn follow(app: Arc<App>, mut eventloop: EventLoop) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let filters = app
                    .topics
                    .filters()
                    .into_iter()
                    .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
                if let Err(e) = app.client.try_subscribe_many(filters) {
                    tracing::error!(error = %e, "cannot resubscribe");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some((device, kind)) = app.topics.parse(&p.topic) else {
                    continue;
                };
                let msg = {
                    let mut fleet = app.fleet();
                    match fleet.apply(device, kind, &p.payload) {
                        None => continue,
                        Some(Change::Status(d)) => json!({
                            "type": "device",
                            "id": d,
                            "summary": fleet.devices.get(&d).map(|x| x.summary()),
                        }),
                        Some(Change::Metrics(d, point, run_id)) => json!({
                            "type": "metrics", "device": d, "run_id": run_id, "point": point,
                        }),
                        Some(Change::Event(item)) => json!({"type": "event", "item": item}),
                    }
                };
                // No page listening is not an error.
                let _ = app.updates.send(Arc::from(msg.to_string()));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "lost the MQTT broker; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn snapshot(State(app): State<Arc<App>>) -> Json<Value> {
    Json(app.snapshot())
}

/// Server-sent events: a `snapshot` first (and again after falling behind),
/// then one `update` per message.
async fn stream(
    State(app): State<Arc<App>>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let rx = app.updates.subscribe();
    let first = app.snapshot().to_string();
    let state = (app, rx, Some(first));
    let s = futures_util::stream::unfold(state, |(app, mut rx, first)| async move {
        if let Some(snap) = first {
            let ev = SseEvent::default().event("snapshot").data(snap);
            return Some((Ok(ev), (app, rx, None)));
        }
        let ev = match rx.recv().await {
            Ok(msg) => SseEvent::default().event("update").data(&*msg),
            Err(broadcast::error::RecvError::Lagged(_)) => SseEvent::default()
                .event("snapshot")
                .data(app.snapshot().to_string()),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(ev), (app, rx, None)))
    });
    Sse::new(s).keep_alive(KeepAlive::default())
}

/// A command from the page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandRequest {
    verb: String,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    all: bool,
    /// `KEY=VALUE` overrides for a train.
    #[serde(default)]
    set: Vec<String>,
}

fn bad(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

async fn command_handler(
    State(app): State<Arc<App>>,
    body: Result<Json<CommandRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !app.allow_commands {
        return bad(
            StatusCode::FORBIDDEN,
            "commands are off: start `fleet serve` with --allow-commands",
        );
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return bad(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let verb = match req.verb.as_str() {
        "train" => Verb::Train,
        "stop" => Verb::Stop,
        "status" => Verb::Status,
        other => return bad(StatusCode::BAD_REQUEST, format!("unknown verb {other:?}")),
    };
    let target = match (req.device, req.group, req.all) {
        (Some(d), None, false) => Target::Device(d),
        (None, Some(g), false) => Target::Group(g),
        (None, None, true) => Target::All,
        _ => {
            return bad(
                StatusCode::BAD_REQUEST,
                "give exactly one of device, group, all",
            )
        }
    };
    if let Err(e) = target.validate() {
        return bad(StatusCode::BAD_REQUEST, e.to_string());
    }
    let request_id = new_request_id();
    let payload = match command::payload(verb, &request_id, &req.set) {
        Ok(p) => p,
        Err(e) => return bad(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let topic = app.topics.command(&target, verb.name());
    if let Err(e) = app
        .client
        .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload)
    {
        return bad(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    tracing::info!(%topic, request_id = %request_id, "command sent from the dashboard");
    Json(json!({"request_id": request_id, "topic": topic})).into_response()
}
