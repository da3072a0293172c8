//! The gRPC test service of the e2e tests (`mesh-grpc`): a small `echo.v1.Echo` service and
//! a client that makes N calls of one kind over ONE channel (one HTTP/2 connection, h2c with
//! prior knowledge) and prints one JSON line per call.
//!
//! ```proto
//! package echo.v1;
//! service Echo {
//!   rpc Unary(EchoRequest) returns (EchoReply);
//!   rpc ServerStream(EchoRequest) returns (stream EchoReply);     // `count` replies
//!   rpc ClientStream(stream EchoRequest) returns (EchoReply);     // `received` = messages read
//!   rpc Bidi(stream EchoRequest) returns (stream EchoReply);      // one reply per message
//! }
//! message EchoRequest { string message = 1; uint32 count = 2; int32 status = 3;
//!                       string status_message = 4; uint32 delay_ms = 5; }
//! message EchoReply { string message = 1; string server = 2; uint32 index = 3;
//!                     uint32 received = 4; map<string, string> metadata = 5; }
//! ```
//!
//! No `protoc`: the messages are hand-written `prost::Message` derives (the field numbers
//! above are the wire contract) and the service is tonic's generic server ([`serve_echo`]
//! dispatches on the path) and client ([`run_calls`]).
//!
//! Every reply names the server (`--name`) and carries the request metadata the server saw
//! (so tests see what the waypoint added or removed); every response has the header
//! `x-echo-server: <name>`. A request with `status` ≠ 0 is answered with that gRPC status and
//! `status_message` (after `count` replies for the streaming kinds, after reading every
//! message for client streaming, at that message for bidi), with `x-echo-server` in the
//! trailers too, so a client can tell that trailers came from the server. `delay_ms`
//! (at most [`MAX_DELAY`]) delays the unary answer.

// tonic::Status is large, and it is the error type tonic's traits require.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::Stream;
use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tonic::codec::ProstCodec;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

/// The fully qualified service name.
pub const SERVICE: &str = "echo.v1.Echo";
/// Response header (and error trailer) naming the server.
pub const SERVER_HEADER: &str = "x-echo-server";
/// Longest `delay_ms` honoured.
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// Replies one server-streaming call may ask for.
pub const MAX_COUNT: u32 = 10_000;

// === messages ===

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    /// Server streaming: how many replies.
    #[prost(uint32, tag = "2")]
    pub count: u32,
    /// A gRPC status code for the server to answer with (0 = OK).
    #[prost(int32, tag = "3")]
    pub status: i32,
    #[prost(string, tag = "4")]
    pub status_message: String,
    /// Unary: wait this long before answering.
    #[prost(uint32, tag = "5")]
    pub delay_ms: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(string, tag = "2")]
    pub server: String,
    /// 0-based position in a stream.
    #[prost(uint32, tag = "3")]
    pub index: u32,
    /// Client streaming: how many messages the server read.
    #[prost(uint32, tag = "4")]
    pub received: u32,
    /// The request metadata (headers) the server saw.
    #[prost(btree_map = "string, string", tag = "5")]
    pub metadata: BTreeMap<String, String>,
}

/// The four methods of `echo.v1.Echo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Unary,
    ServerStream,
    ClientStream,
    Bidi,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Unary,
        Kind::ServerStream,
        Kind::ClientStream,
        Kind::Bidi,
    ];

    /// The method name in the path.
    pub fn method(self) -> &'static str {
        match self {
            Kind::Unary => "Unary",
            Kind::ServerStream => "ServerStream",
            Kind::ClientStream => "ClientStream",
            Kind::Bidi => "Bidi",
        }
    }

    /// `/echo.v1.Echo/<Method>`.
    pub fn path(self) -> String {
        format!("/{SERVICE}/{}", self.method())
    }

    /// The name used on the command line and in the JSON lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::ServerStream => "server-stream",
            Kind::ClientStream => "client-stream",
            Kind::Bidi => "bidi",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

// === server ===

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;
type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The service state: the name every reply carries.
#[derive(Clone)]
pub struct Echo {
    name: Arc<str>,
}

impl Echo {
    pub fn new(name: &str) -> Echo {
        Echo {
            name: Arc::from(name),
        }
    }

    fn reply(&self, message: String, index: u32, metadata: &BTreeMap<String, String>) -> EchoReply {
        EchoReply {
            message,
            server: self.name.to_string(),
            index,
            received: 0,
            metadata: metadata.clone(),
        }
    }

    /// A status the request asked for, with `x-echo-server` in its metadata (trailers).
    fn status(&self, code: i32, message: &str) -> Status {
        let mut md = MetadataMap::new();
        if let Ok(v) = MetadataValue::try_from(&*self.name) {
            md.insert(SERVER_HEADER, v);
        }
        let message = if message.is_empty() {
            format!("status {code} as requested")
        } else {
            message.to_string()
        };
        Status::with_metadata(Code::from(code), message, md)
    }

    fn response<T>(&self, body: T) -> Response<T> {
        let mut rsp = Response::new(body);
        if let Ok(v) = MetadataValue::try_from(&*self.name) {
            rsp.metadata_mut().insert(SERVER_HEADER, v);
        }
        rsp
    }

    /// Answers one HTTP/2 request: the method its path names, else `UNIMPLEMENTED`.
    pub async fn handle(&self, req: http::Request<Incoming>) -> http::Response<tonic::body::Body> {
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
        let path = req.uri().path().to_string();
        match Kind::ALL.into_iter().find(|k| k.path() == path) {
            Some(Kind::Unary) => grpc.unary(UnarySvc(self.clone()), req).await,
            Some(Kind::ServerStream) => {
                grpc.server_streaming(ServerStreamSvc(self.clone()), req)
                    .await
            }
            Some(Kind::ClientStream) => {
                grpc.client_streaming(ClientStreamSvc(self.clone()), req)
                    .await
            }
            Some(Kind::Bidi) => grpc.streaming(BidiSvc(self.clone()), req).await,
            None => Status::unimplemented(format!("no method {path}")).into_http(),
        }
    }
}

/// The request metadata as a map (values that are not text are left out).
fn metadata_map(md: &MetadataMap) -> BTreeMap<String, String> {
    md.clone()
        .into_headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

struct UnarySvc(Echo);

impl tonic::server::UnaryService<EchoRequest> for UnarySvc {
    type Response = EchoReply;
    type Future = BoxFuture<Result<Response<EchoReply>, Status>>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let echo = self.0.clone();
        Box::pin(async move {
            let md = metadata_map(request.metadata());
            let req = request.into_inner();
            if req.delay_ms > 0 {
                let delay = Duration::from_millis(req.delay_ms.into()).min(MAX_DELAY);
                tokio::time::sleep(delay).await;
            }
            if req.status != 0 {
                return Err(echo.status(req.status, &req.status_message));
            }
            Ok(echo.response(echo.reply(req.message, 0, &md)))
        })
    }
}

struct ServerStreamSvc(Echo);

impl tonic::server::ServerStreamingService<EchoRequest> for ServerStreamSvc {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<Response<ReplyStream>, Status>>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let echo = self.0.clone();
        Box::pin(async move {
            let md = metadata_map(request.metadata());
            let req = request.into_inner();
            let mut items: Vec<Result<EchoReply, Status>> = (0..req.count.min(MAX_COUNT))
                .map(|i| Ok(echo.reply(format!("{} {i}", req.message), i, &md)))
                .collect();
            if req.status != 0 {
                items.push(Err(echo.status(req.status, &req.status_message)));
            }
            let stream: ReplyStream = Box::pin(futures::stream::iter(items));
            Ok(echo.response(stream))
        })
    }
}

struct ClientStreamSvc(Echo);

impl tonic::server::ClientStreamingService<EchoRequest> for ClientStreamSvc {
    type Response = EchoReply;
    type Future = BoxFuture<Result<Response<EchoReply>, Status>>;

    fn call(&mut self, request: Request<Streaming<EchoRequest>>) -> Self::Future {
        let echo = self.0.clone();
        Box::pin(async move {
            let md = metadata_map(request.metadata());
            let mut stream = request.into_inner();
            let mut received = 0;
            let mut messages = Vec::new();
            let mut asked: Option<(i32, String)> = None;
            while let Some(msg) = stream.message().await? {
                received += 1;
                if msg.status != 0 && asked.is_none() {
                    asked = Some((msg.status, msg.status_message.clone()));
                }
                messages.push(msg.message);
            }
            if let Some((code, message)) = asked {
                return Err(echo.status(code, &message));
            }
            let mut reply = echo.reply(messages.join(","), 0, &md);
            reply.received = received;
            Ok(echo.response(reply))
        })
    }
}

struct BidiSvc(Echo);

impl tonic::server::StreamingService<EchoRequest> for BidiSvc {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<Response<ReplyStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<EchoRequest>>) -> Self::Future {
        let echo = self.0.clone();
        Box::pin(async move {
            let md = metadata_map(request.metadata());
            let input = request.into_inner();
            let state = (echo.clone(), input, 0u32, false);
            let stream = futures::stream::unfold(state, move |(echo, mut input, i, done)| {
                let md = md.clone();
                async move {
                    if done {
                        return None;
                    }
                    match input.message().await {
                        Ok(Some(msg)) if msg.status != 0 => {
                            let status = echo.status(msg.status, &msg.status_message);
                            Some((Err(status), (echo, input, i + 1, true)))
                        }
                        Ok(Some(msg)) => {
                            let reply = echo.reply(msg.message, i, &md);
                            Some((Ok(reply), (echo, input, i + 1, false)))
                        }
                        Ok(None) => None,
                        Err(status) => Some((Err(status), (echo, input, i, true))),
                    }
                }
            });
            let stream: ReplyStream = Box::pin(stream);
            Ok(echo.response(stream))
        })
    }
}

/// Serves `echo.v1.Echo` over h2c on `listener` until the process ends; prints
/// `listening on <addr>` first (tests wait for it).
pub async fn serve_echo(listener: TcpListener, echo: Echo) -> Result<()> {
    let local = listener.local_addr().context("local address")?;
    println!("listening on {local}");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("mesh-grpc {local}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let echo = echo.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let echo = echo.clone();
                async move { Ok::<_, Infallible>(echo.handle(req).await) }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                eprintln!("mesh-grpc {local}: connection from {peer}: {e}");
            }
        });
    }
}

// === client ===

/// What the client asks of each call.
#[derive(Clone, Debug)]
pub struct CallSpec {
    pub kind: Kind,
    pub message: String,
    /// Server streaming: replies asked for; client streaming / bidi: messages sent.
    pub count: u32,
    /// gRPC status the server is asked to answer with (0 = OK).
    pub status: i32,
    /// Unary: how long the server waits before answering.
    pub delay_ms: u32,
    /// Request metadata added to every call.
    pub metadata: Vec<(String, String)>,
    /// `grpc-timeout` of every call.
    pub timeout: Option<Duration>,
}

/// Connects ONE channel to `addr` (h2c; `authority` as `:authority` when given) and makes
/// `calls` calls of `spec` on it, one after the other, passing each result (see
/// [`call_json`]) to `out`. Each call is bounded by `call_limit`.
pub async fn run_calls(
    addr: SocketAddr,
    authority: Option<&str>,
    spec: &CallSpec,
    calls: usize,
    call_limit: Duration,
    mut out: impl FnMut(Value),
) -> Result<()> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .context("endpoint")?
        .connect_timeout(Duration::from_secs(10));
    if let Some(a) = authority {
        endpoint = endpoint.origin(
            format!("http://{a}")
                .parse()
                .with_context(|| format!("authority {a:?}"))?,
        );
    }
    let channel = tokio::time::timeout(call_limit, endpoint.connect())
        .await
        .with_context(|| format!("connect to {addr}: timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    for i in 0..calls {
        let result = tokio::time::timeout(call_limit, call(&mut grpc, spec)).await;
        let mut line = match result {
            Ok(r) => r,
            Err(_) => bail!("call {i} took longer than {call_limit:?}"),
        };
        line["call"] = json!(i);
        out(line);
    }
    Ok(())
}

/// What one call saw: `code` (0 = OK), `message`, `replies` (messages received), `servers`
/// (the `server` of each reply), `server` (the first, else the `x-echo-server` header or
/// trailer), `received` (client streaming), `headers`, `trailers` (for a status that came in
/// the response headers, "trailers-only", these are the headers), `echoed` (the request
/// metadata the server saw, from the first reply).
async fn call(grpc: &mut tonic::client::Grpc<tonic::transport::Channel>, spec: &CallSpec) -> Value {
    let mut replies: Vec<EchoReply> = Vec::new();
    let mut headers = BTreeMap::new();
    let outcome: Result<Option<MetadataMap>, Status> = async {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        let path = PathAndQuery::try_from(spec.kind.path())
            .map_err(|e| Status::internal(e.to_string()))?;
        let codec = ProstCodec::<EchoRequest, EchoReply>::default();
        let message = |i: u32| EchoRequest {
            message: format!("{} {i}", spec.message),
            count: spec.count,
            status: spec.status,
            status_message: String::new(),
            delay_ms: spec.delay_ms,
        };
        let rsp = match spec.kind {
            Kind::Unary | Kind::ServerStream => {
                let mut req = Request::new(EchoRequest {
                    message: spec.message.clone(),
                    ..message(0)
                });
                decorate(&mut req, spec);
                grpc.server_streaming(req, path, codec).await?
            }
            Kind::ClientStream | Kind::Bidi => {
                let items: Vec<EchoRequest> = (0..spec.count.max(1)).map(message).collect();
                let mut req = Request::new(futures::stream::iter(items));
                decorate(&mut req, spec);
                grpc.streaming(req, path, codec).await?
            }
        };
        headers = metadata_map(rsp.metadata());
        let mut stream = rsp.into_inner();
        while let Some(reply) = stream.message().await? {
            replies.push(reply);
        }
        stream.trailers().await
    }
    .await;
    let (code, message, trailers) = match outcome {
        Ok(trailers) => (0, String::new(), trailers.as_ref().map(metadata_map)),
        Err(status) => (
            status.code() as i32,
            status.message().to_string(),
            Some(metadata_map(status.metadata())),
        ),
    };
    let trailers = trailers.unwrap_or_default();
    let server = replies
        .first()
        .map(|r| r.server.clone())
        .or_else(|| headers.get(SERVER_HEADER).cloned())
        .or_else(|| trailers.get(SERVER_HEADER).cloned())
        .unwrap_or_default();
    json!({
        "kind": spec.kind.as_str(),
        "code": code,
        "message": message,
        "server": server,
        "servers": replies.iter().map(|r| r.server.as_str()).collect::<Vec<_>>(),
        "replies": replies.len(),
        "received": replies.first().map_or(0, |r| r.received),
        "headers": headers,
        "trailers": trailers,
        "echoed": replies.first().map(|r| r.metadata.clone()).unwrap_or_default(),
    })
}

fn decorate<T>(req: &mut Request<T>, spec: &CallSpec) {
    for (k, v) in &spec.metadata {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            MetadataValue::try_from(v.as_str()),
        ) {
            req.metadata_mut().insert(k, v);
        }
    }
    if let Some(t) = spec.timeout {
        req.set_timeout(t);
    }
}

/// The JSON lines of a client run (non-JSON lines are an error).
pub fn parse_lines(stdout: &str) -> Result<Vec<Value>> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l:?}")))
        .collect()
}

// === in a mesh ===

impl crate::Mesh {
    /// Starts `mesh-grpc server --port <port> --name <name>` in the pod and returns once it
    /// listens; killed when the guard drops.
    pub fn spawn_grpc(&self, pod: &str, port: u16, name: &str) -> Result<crate::ChildGuard> {
        let bin = self.binaries().mesh_grpc()?;
        let bin = bin.to_string_lossy();
        let port = port.to_string();
        let mut guard = self.spawn(pod, &[&bin, "server", "--port", &port, "--name", name])?;
        guard.wait_for_stdout("listening on", Duration::from_secs(10))?;
        Ok(guard)
    }

    /// Runs `mesh-grpc client --addr <addr> --calls <calls> <args>` in the pod (one channel,
    /// `calls` calls) and returns one JSON value per call (see [`run_calls`]); an error when
    /// the client fails or prints another number of lines.
    pub fn grpc_calls(
        &self,
        pod: &str,
        addr: &str,
        calls: usize,
        args: &[&str],
    ) -> Result<Vec<Value>> {
        let bin = self.binaries().mesh_grpc()?;
        let bin = bin.to_string_lossy();
        let calls_text = calls.to_string();
        let mut argv = vec![&*bin, "client", "--addr", addr, "--calls", &calls_text];
        argv.extend_from_slice(args);
        let out = self.exec_ok(pod, &argv)?;
        let lines = parse_lines(&out)?;
        if lines.len() != calls {
            bail!("{calls} calls but {} lines: {out}", lines.len());
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_name_their_method_paths() {
        assert_eq!(Kind::Unary.path(), "/echo.v1.Echo/Unary");
        assert_eq!(Kind::Bidi.path(), "/echo.v1.Echo/Bidi");
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("nope"), None);
    }

    /// The server and client in-process over loopback: every kind, an asked-for status, and
    /// that one channel carries every call.
    #[tokio::test]
    async fn every_kind_round_trips_and_statuses_reach_the_client() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(serve_echo(listener, Echo::new("s1")));
        let spec = |kind, status| CallSpec {
            kind,
            message: "hi".to_string(),
            count: 3,
            status,
            delay_ms: 0,
            metadata: vec![("x-test".to_string(), "yes".to_string())],
            timeout: Some(Duration::from_secs(5)),
        };
        for kind in Kind::ALL {
            let mut lines = Vec::new();
            run_calls(
                addr,
                None,
                &spec(kind, 0),
                2,
                Duration::from_secs(10),
                |l| lines.push(l),
            )
            .await?;
            assert_eq!(lines.len(), 2, "{lines:?}");
            for l in &lines {
                assert_eq!(l["code"], 0, "{l}");
                assert_eq!(l["server"], "s1", "{l}");
                assert_eq!(l["echoed"]["x-test"], "yes", "{l}");
                assert_eq!(l["headers"][SERVER_HEADER], "s1", "{l}");
                let want = match kind {
                    Kind::Unary | Kind::ClientStream => 1,
                    _ => 3,
                };
                assert_eq!(l["replies"], want, "{kind:?}: {l}");
                if kind == Kind::ClientStream {
                    assert_eq!(l["received"], 3, "{l}");
                }
            }
            let mut lines = Vec::new();
            run_calls(
                addr,
                None,
                &spec(kind, 9),
                1,
                Duration::from_secs(10),
                |l| lines.push(l),
            )
            .await?;
            let l = &lines[0];
            assert_eq!(l["code"], 9, "{kind:?}: {l}");
            assert_eq!(l["trailers"][SERVER_HEADER], "s1", "{kind:?}: {l}");
            if kind == Kind::ServerStream {
                assert_eq!(l["replies"], 3, "replies before the status: {l}");
            }
        }
        server.abort();
        Ok(())
    }
}
