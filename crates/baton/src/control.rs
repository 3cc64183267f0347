//! The control socket: HTTP/1.1 over a Unix socket, JSON in, NDJSON out.
//!
//! The server side only translates between HTTP and [`supervisor::Handle`];
//! an upgrade runs in the supervisor whether or not its client stays
//! connected, so a client that disconnects mid-upgrade changes nothing.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::protocol::{
    ErrorKind, ErrorReply, EventKind, Outcome, Reply, Request, Trigger, MAX_REQUEST_BYTES,
    REQUEST_PATH,
};
use crate::supervisor::{Ask, Handle, How};
use baton_core::UpgradeOptions;

/// A client must send its request within this time.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the socket's backlog.
const MAX_CONNECTIONS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {}: {what}", .path.display())]
    Setup {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the supervisor at {} (is `baton run` running? set --control or BATON_CONTROL)", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the supervisor")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the supervisor sent an unreadable reply: {0}")]
    BadReply(String),
}

/// Creates the control socket: its directory is created 0700 if missing,
/// must be a real directory (not a symlink), owned by us or root and not
/// writable by others; the socket itself is 0600. A stale socket file is
/// replaced, a live one or any other kind of file is an error.
///
/// With `open_to_others` (some uids are allowed besides ours), a created
/// directory is 0711 and the socket 0666, so those users can reach it;
/// SO_PEERCRED then decides who may talk.
pub fn bind(path: &Path, open_to_others: bool) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let setup = |what: &str, source| ControlError::Setup {
        path: path.to_owned(),
        what: what.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(if open_to_others { 0o711 } else { 0o700 })
            .create(dir)
            .map_err(|e| setup("creating its directory", e))?;
    }
    // Not followed: a symlinked directory could be swapped under us.
    let meta = std::fs::symlink_metadata(dir).map_err(|e| setup("reading its directory", e))?;
    // Anyone who can write the directory could replace the socket file.
    let own = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.mode() & 0o002 != 0 || (meta.uid() != own && meta.uid() != 0) {
        return Err(setup(
            "its directory is a symlink, writable by others or owned by another user; choose a private directory",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        ));
    }
    if let Ok(existing) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !existing.file_type().is_socket() {
            return Err(setup(
                "a file that is not a socket is in the way",
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(setup(
                    "another baton is running there",
                    std::io::Error::from(std::io::ErrorKind::AddrInUse),
                ))
            }
            Err(_) => {
                std::fs::remove_file(path).map_err(|e| setup("removing the stale socket", e))?
            }
        }
    }
    // Bind with a restrictive umask-independent mode: create, then chmod
    // before listen() so no client can connect while it is wider.
    let std_listener = {
        let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .map_err(|e| setup("creating", e))?;
        let addr = socket2::SockAddr::unix(path).map_err(|e| setup("bad path", e))?;
        sock.bind(&addr).map_err(|e| setup("binding", e))?;
        let mode = if open_to_others { 0o666 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| setup("setting its mode", e))?;
        sock.listen(1024).map_err(|e| setup("listening", e))?;
        sock.set_nonblocking(true)
            .map_err(|e| setup("configuring", e))?;
        std::os::unix::net::UnixListener::from(sock)
    };
    UnixListener::from_std(std_listener).map_err(|e| setup("registering", e))
}

/// Limits concurrent control connections; also lets the supervisor wait
/// for replies in flight before it exits.
#[derive(Clone)]
pub struct Connections(std::sync::Arc<tokio::sync::Semaphore>);

impl Default for Connections {
    fn default() -> Self {
        Self(std::sync::Arc::new(tokio::sync::Semaphore::new(
            MAX_CONNECTIONS,
        )))
    }
}

impl Connections {
    /// Waits (at most `limit`) until no control connection is being served,
    /// so a reply such as `stop`'s is written before the process exits.
    pub async fn drained(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.0.acquire_many(MAX_CONNECTIONS as u32)).await;
    }
}

/// Serves control connections until the task is dropped. While `paused`
/// is true nothing is accepted: connections wait in the socket's backlog
/// (baton is handing itself over, and the next image accepts them).
pub async fn serve(
    listener: UnixListener,
    handle: Handle,
    allowed_uids: Vec<u32>,
    connections: Connections,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    let limit = connections.0;
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        if *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
            continue;
        }
        let permit = match limit.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Paused while waiting: the permit goes back, so in-flight
            // connections can be waited for.
            _ = paused.changed() => continue,
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        let allowed = uid.is_some_and(|u| u == own_uid || u == 0 || allowed_uids.contains(&u));
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(stream, handle, allowed.then_some(()).ok_or(uid)).await;
        });
    }
}

/// Serves one control connection. `access` is `Err(uid)` for a peer that
/// may not control the supervisor: it gets a 403 for whatever it asks.
pub async fn serve_connection(stream: UnixStream, handle: Handle, access: Result<(), Option<u32>>) {
    let svc = hyper::service::service_fn(move |req| {
        let handle = handle.clone();
        async move { Ok::<_, Infallible>(respond(req, handle, access).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(REQUEST_READ_TIMEOUT)
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

type ReplyBody = http_body_util::Either<Full<Bytes>, ChannelBody>;

fn line(reply: &Reply) -> Bytes {
    let mut v = serde_json::to_vec(reply).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    Bytes::from(v)
}

fn single(status: StatusCode, reply: &Reply) -> Response<ReplyBody> {
    let mut res = Response::new(http_body_util::Either::Left(Full::new(line(reply))));
    *res.status_mut() = status;
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    res
}

fn error(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Response<ReplyBody> {
    single(
        status,
        &Reply::Error(ErrorReply {
            kind,
            message: message.into(),
        }),
    )
}

async fn respond(
    req: hyper::Request<Incoming>,
    handle: Handle,
    access: Result<(), Option<u32>>,
) -> Response<ReplyBody> {
    if let Err(uid) = access {
        return error(
            StatusCode::FORBIDDEN,
            ErrorKind::Forbidden,
            format!("uid {uid:?} may not control this supervisor (see control_allow_uids)"),
        );
    }
    if req.uri().path() != REQUEST_PATH {
        return error(
            StatusCode::NOT_FOUND,
            ErrorKind::BadRequest,
            format!("unknown path; POST {REQUEST_PATH}"),
        );
    }
    if req.method() != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::BadRequest,
            format!("use POST {REQUEST_PATH}"),
        );
    }
    let body = match tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        Limited::new(req.into_body(), MAX_REQUEST_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::BadRequest,
                format!("request body larger than {MAX_REQUEST_BYTES} bytes"),
            )
        }
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                ErrorKind::BadRequest,
                format!("reading request: {e}"),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                ErrorKind::BadRequest,
                "request body not received in time",
            )
        }
    };
    let request: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                ErrorKind::BadRequest,
                format!("bad request: {e}"),
            )
        }
    };
    match request {
        Request::Status => match handle.status().await {
            Some(s) => single(StatusCode::OK, &Reply::Status(s)),
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorKind::Stopping,
                "the supervisor is stopping",
            ),
        },
        Request::Stop => {
            handle.stop().await;
            single(StatusCode::OK, &Reply::Stopping)
        }
        Request::UpgradeSelf => match handle.upgrade_self().await {
            Ok(h) => single(StatusCode::OK, &Reply::HandingOver(h)),
            Err(e) => single(StatusCode::OK, &Reply::Error(e)),
        },
        Request::Upgrade {
            wait_drain,
            no_wait,
            canary,
            canary_for_ms,
            bake_ms,
        } => {
            if canary.is_some_and(|c| c > 100) {
                return error(
                    StatusCode::BAD_REQUEST,
                    ErrorKind::BadRequest,
                    "canary is a percentage: 0 to 100",
                );
            }
            let options = UpgradeOptions {
                canary,
                canary_for: canary_for_ms.map(Duration::from_millis),
                bake: bake_ms.map(Duration::from_millis),
            };
            let until = match (canary, no_wait) {
                (Some(_), _) => Until::Canary,
                (None, true) => Until::Active,
                (None, false) => Until::Outcome,
            };
            upgrade(handle, Ask::Upgrade(options), until, wait_drain && !no_wait).await
        }
        Request::Rollback { wait_drain } => {
            upgrade(handle, Ask::Rollback, Until::Outcome, wait_drain).await
        }
        Request::Promote {
            wait_drain,
            no_wait,
        } => {
            let until = if no_wait {
                Until::Active
            } else {
                Until::Outcome
            };
            upgrade(handle, Ask::Promote, until, wait_drain && !no_wait).await
        }
    }
}

/// What ends an upgrade stream with success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// The upgrade succeeded (after its bake, if any).
    Outcome,
    /// The new generation took the traffic.
    Active,
    /// The canary runs.
    Canary,
    /// The traffic went back (an instant rollback).
    RolledBack,
}

async fn upgrade(handle: Handle, ask: Ask, until: Until, wait_drain: bool) -> Response<ReplyBody> {
    // Subscribe before asking, so no event of this upgrade is missed.
    let mut events = handle.subscribe();
    let started = match handle.upgrade(Trigger::Control, ask).await {
        Ok(started) => started,
        Err(e) => {
            let status = match e.kind {
                ErrorKind::Busy | ErrorKind::Stopping => StatusCode::CONFLICT,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            return single(status, &Reply::Error(e));
        }
    };
    let id = started.id;
    // An instant rollback ends at the rollback, whatever was asked.
    let until = match started.how {
        How::RolledBack => Until::RolledBack,
        How::Upgrading | How::Promoting => until,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut draining = std::collections::BTreeSet::new();
        let mut outcome: Option<Outcome> = None;
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    // Missed events may include the outcome: if the upgrade
                    // has ended, take it from the state instead.
                    tracing::warn!("control stream missed {n} events");
                    if outcome.is_none() {
                        outcome = outcome_from_status(&handle, id).await;
                    }
                    if outcome.is_some() {
                        break;
                    }
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            if ev.upgrade != Some(id) {
                continue;
            }
            // By process: every worker of a drained generation is waited for.
            match &ev.kind {
                EventKind::Draining { pid, .. } | EventKind::Retiring { pid } => {
                    draining.insert((ev.generation, *pid));
                }
                EventKind::Exited { pid, .. } => {
                    draining.remove(&(ev.generation, *pid));
                }
                _ => {}
            }
            if outcome.is_none() {
                outcome = ends(until, id, &ev);
            }
            // A closed client just stops the stream; the upgrade goes on.
            if !send_line(&tx, line(&Reply::Event(ev))).await {
                return;
            }
            if outcome.is_some() && (!wait_drain || draining.is_empty()) {
                break;
            }
        }
        if let Some(mut outcome) = outcome {
            outcome.active = handle.status().await.and_then(|s| s.active);
            send_line(&tx, line(&Reply::Done(outcome))).await;
        }
    });
    let mut res = Response::new(http_body_util::Either::Right(ChannelBody(rx)));
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    res
}

/// The outcome `ev` gives upgrade `id`, if it ends the stream.
fn ends(until: Until, id: u64, ev: &crate::protocol::Event) -> Option<Outcome> {
    let done = |success: bool, reason: Option<String>, stderr_tail: Vec<String>| Outcome {
        upgrade: id,
        success,
        active: None,
        elapsed_us: ev.elapsed_us.unwrap_or(0),
        reason,
        stderr_tail,
        config_error: false,
    };
    match (&ev.kind, until) {
        (EventKind::RolledBack { .. }, Until::RolledBack) => Some(done(true, None, Vec::new())),
        (EventKind::Canary { .. }, Until::Canary) => Some(done(true, None, Vec::new())),
        (EventKind::Active { .. }, Until::Active) if ev.generation == id => {
            Some(done(true, None, Vec::new()))
        }
        (EventKind::UpgradeSucceeded, _) => Some(done(true, None, Vec::new())),
        (EventKind::UpgradeFailed { .. }, Until::RolledBack) => None,
        (
            EventKind::UpgradeFailed {
                reason,
                stderr_tail,
            },
            _,
        ) => Some(done(false, Some(reason.clone()), stderr_tail.clone())),
        _ => None,
    }
}

/// A client that stops reading for this long is dropped (the upgrade
/// itself goes on regardless).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Queues one line for the client; false if it is gone or stuck.
async fn send_line(tx: &mpsc::Sender<Bytes>, line: Bytes) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, tx.send(line)).await,
        Ok(Ok(()))
    )
}

/// The outcome of upgrade `id` read from the supervisor's state, once it
/// is no longer in progress.
async fn outcome_from_status(handle: &Handle, id: u64) -> Option<Outcome> {
    let status = handle.status().await?;
    if status.upgrading == Some(id) {
        return None;
    }
    // Becoming active is what success means; a later upgrade cannot have
    // replaced it yet in the moment since it ended, barring a tight race.
    let success = status.active == Some(id);
    Some(Outcome {
        upgrade: id,
        success,
        active: status.active,
        elapsed_us: 0,
        reason: (!success)
            .then(|| "the upgrade failed (details were lost: the event stream lagged)".into()),
        stderr_tail: Vec::new(),
        config_error: false,
    })
}

/// A response body fed line by line from a channel.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

// ----- client ---------------------------------------------------------------

/// Sends one request and calls `on_reply` for every reply line as it
/// arrives (so `baton upgrade` can print phases live).
pub async fn request(
    path: &Path,
    req: &Request,
    on_reply: impl FnMut(Reply),
) -> Result<(), ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
    request_on(stream, req, on_reply).await
}

/// [`request`] over an already connected stream.
pub async fn request_on(
    stream: UnixStream,
    req: &Request,
    mut on_reply: impl FnMut(Reply),
) -> Result<(), ControlError> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ControlError::Http(e.into()))?;
    let conn = tokio::spawn(conn);
    let body = serde_json::to_vec(req).map_err(|e| ControlError::Http(e.into()))?;
    let http_req = hyper::Request::post(REQUEST_PATH)
        .header(hyper::header::HOST, "baton")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| ControlError::Http(e.into()))?;
    let res = sender
        .send_request(http_req)
        .await
        .map_err(|e| ControlError::Http(e.into()))?;
    let mut body = res.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ControlError::Http(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let reply: Reply = serde_json::from_slice(&line).map_err(|e| {
                ControlError::BadReply(format!("{e}: {}", String::from_utf8_lossy(&line)))
            })?;
            on_reply(reply);
        }
    }
    conn.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Event, Status};
    use crate::supervisor::Command;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn status() -> Status {
        Status {
            pid: 1,
            version: "t".into(),
            uptime_ms: 0,
            stopping: false,
            sockets: vec![],
            traffic: "shared".into(),
            active: Some(6),
            upgrading: None,
            generations: vec![],
            binary: Default::default(),
            handovers: 0,
            self_upgrade_error: None,
            releases: None,
            rollback_to: None,
        }
    }

    /// A control connection served in memory, with a fake supervisor that
    /// answers status and accepts upgrades as generation 7. The returned
    /// watch counts the upgrade commands the fake supervisor has received.
    fn serve_fake(
        access: Result<(), Option<u32>>,
    ) -> (
        UnixStream,
        tokio::sync::broadcast::Sender<Event>,
        tokio::sync::watch::Receiver<u32>,
    ) {
        let (client, server) = UnixStream::pair().unwrap();
        let (handle, mut commands, events) = Handle::detached();
        let (upgrades_tx, upgrades) = tokio::sync::watch::channel(0u32);
        tokio::spawn(serve_connection(server, handle, access));
        tokio::spawn(async move {
            while let Some(cmd) = commands.recv().await {
                match cmd {
                    Command::Status(r) => drop(r.send(status())),
                    Command::Upgrade { reply, .. } => {
                        upgrades_tx.send_modify(|n| *n += 1);
                        drop(reply.send(Ok(crate::supervisor::Started {
                            id: 7,
                            how: crate::supervisor::How::Upgrading,
                        })))
                    }
                    Command::Stop(r) => drop(r.send(())),
                    Command::UpgradeSelf(r) => drop(r.send(Ok(crate::protocol::HandingOver {
                        exe: "/usr/local/bin/baton".into(),
                        handover: 1,
                    }))),
                }
            }
        });
        (client, events, upgrades)
    }

    async fn raw(request: &[u8], access: Result<(), Option<u32>>) -> String {
        let (mut client, _events, _) = serve_fake(access);
        client.write_all(request).await.unwrap();
        let mut out = String::new();
        let _ = client.read_to_string(&mut out).await;
        out
    }

    fn post(body: &str) -> Vec<u8> {
        format!(
            "POST /v1/request HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn status_round_trip() {
        let (client, _events, _) = serve_fake(Ok(()));
        let mut replies = Vec::new();
        request_on(client, &Request::Status, |r| replies.push(r))
            .await
            .unwrap();
        assert_eq!(replies, vec![Reply::Status(status())]);
    }

    /// `{"cmd":"upgrade_self"}` is answered with the hand-over's binary
    /// and number; fields are refused as for every command.
    #[tokio::test]
    async fn upgrade_self_round_trip() {
        let (client, _events, _) = serve_fake(Ok(()));
        let mut replies = Vec::new();
        request_on(client, &Request::UpgradeSelf, |r| replies.push(r))
            .await
            .unwrap();
        assert_eq!(
            replies,
            vec![Reply::HandingOver(crate::protocol::HandingOver {
                exe: "/usr/local/bin/baton".into(),
                handover: 1,
            })]
        );
        let out = raw(&post(r#"{"cmd":"upgrade_self","force":true}"#), Ok(())).await;
        assert!(
            out.starts_with("HTTP/1.1 400") && out.contains("force"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn bad_requests_get_clear_errors() {
        let out = raw(&post("{not json"), Ok(())).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.contains("\"kind\":\"bad_request\""), "{out}");
        let out = raw(&post(r#"{"cmd":"upgrade","force":true}"#), Ok(())).await;
        assert!(
            out.starts_with("HTTP/1.1 400") && out.contains("force"),
            "{out}"
        );
        let big = format!(
            r#"{{"cmd":"status","x":"{}"}}"#,
            "a".repeat(MAX_REQUEST_BYTES)
        );
        let out = raw(&post(&big), Ok(())).await;
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
        let out = raw(b"GET /v1/request HTTP/1.1\r\nhost: x\r\n\r\n", Ok(())).await;
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
        let out = raw(
            b"POST /other HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
            Ok(()),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        let out = raw(b"\x00\x01garbage\r\n\r\n", Ok(())).await;
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
    }

    #[tokio::test]
    async fn other_users_are_refused() {
        let out = raw(&post(r#"{"cmd":"stop"}"#), Err(Some(1234))).await;
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert!(out.contains("forbidden") && out.contains("1234"), "{out}");
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_client_is_dropped() {
        let (mut client, _events, _) = serve_fake(Ok(()));
        client
            .write_all(b"POST /v1/request HTTP/1.1\r\nhost:")
            .await
            .unwrap();
        let mut out = String::new();
        // With time paused, the header timeout fires as soon as all is idle.
        let read =
            tokio::time::timeout(Duration::from_secs(60), client.read_to_string(&mut out)).await;
        assert!(read.is_ok(), "connection not closed");
    }

    #[tokio::test]
    async fn upgrade_streams_until_the_old_generation_exited() {
        let (client, events, mut upgrades) = serve_fake(Ok(()));
        let emit = move |generation: u64, kind: EventKind| {
            let _ = events.send(Event {
                time_us: 0,
                generation,
                upgrade: Some(7),
                elapsed_us: Some(1),
                kind,
            });
        };
        let task = tokio::spawn(async move {
            let mut replies = Vec::new();
            request_on(client, &Request::upgrade(true), |r| replies.push(r))
                .await
                .unwrap();
            replies
        });
        // The server subscribes before it asks for the upgrade, so once the
        // fake supervisor has the request, every event sent is seen.
        tokio::time::timeout(Duration::from_secs(10), upgrades.wait_for(|n| *n == 1))
            .await
            .expect("the upgrade request never reached the supervisor")
            .unwrap();
        emit(
            7,
            EventKind::Ready {
                pid: 2,
                via: "notify".into(),
            },
        );
        emit(
            6,
            EventKind::Draining {
                pid: 1,
                signal: "SIGTERM".into(),
            },
        );
        emit(7, EventKind::UpgradeSucceeded);
        emit(
            6,
            EventKind::Exited {
                pid: 1,
                status: "exit status 0".into(),
                worker: None,
            },
        );
        let replies = task.await.unwrap();
        assert_eq!(replies.len(), 5, "{replies:?}");
        match replies.last().unwrap() {
            Reply::Done(o) => {
                assert!(o.success);
                assert_eq!(o.upgrade, 7);
            }
            other => panic!("{other:?}"),
        }
    }
}
