//! gRPC through the real proxy binary, with a real tonic server and client:
//! unary calls, server/client/bidi streaming with trailers intact, status
//! codes passed through, route timeouts answered as DEADLINE_EXCEEDED, and
//! the inbound listener in front of a gRPC app.

use remora_tests::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

/// Longest any single call in these tests may take before the test fails.
const CALL_DEADLINE: Duration = Duration::from_secs(10);

use remora_tests::grpc::echo::echo_client::EchoClient;
use remora_tests::grpc::echo::{EchoRequest, StreamRequest};
use remora_tests::grpc::GrpcServer;

// ------------------------------------------------------------ helpers

/// A client that connects to `proxy` but addresses `authority` (the
/// `:authority` the proxy routes on), as an app calling through its sidecar.
async fn client_via(proxy: SocketAddr, authority: &str) -> EchoClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{proxy}"))
        .unwrap()
        .origin(format!("http://{authority}").parse().unwrap())
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_DEADLINE)
        .connect()
        .await
        .expect("connect to the proxy");
    EchoClient::new(channel)
}

/// A proxy whose config has the Service `greeter`, port 50051, protocol
/// grpc, served by `server`, plus `extra` YAML documents.
async fn proxy_for(server: &GrpcServer, extra: &str) -> (ProxyProcess, TempDir) {
    let mut yaml = service_yaml("greeter", 50051, "grpc", &[server.addr]);
    if !extra.is_empty() {
        yaml.push_str("---\n");
        yaml.push_str(extra);
    }
    let dir = TempDir::new("grpc");
    let cfg = dir.write("mesh.yaml", &yaml);
    let proxy = ProxyBuilder::new().config(&cfg).start().await;
    (proxy, dir)
}

fn echo_req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_string(),
        ..Default::default()
    }
}

// ------------------------------------------------------------ tests

#[tokio::test]
async fn unary_call_through_outbound_listener_arrives_intact() {
    let server = GrpcServer::start("greeter-1").await;
    let (proxy, _dir) = proxy_for(&server, "").await;
    let mut client = client_via(proxy.outbound, "greeter:50051").await;

    // A message with bytes beyond ASCII and a size past one HTTP/2 frame.
    let big = "héllo wörld ✓ ".repeat(4096);
    let mut req = Request::new(echo_req(&big));
    req.metadata_mut()
        .insert("x-request-tag", "tag-42".parse().unwrap());
    let resp = client.unary(req).await.expect("unary call");
    assert_eq!(
        resp.metadata()
            .get("x-echoed-tag")
            .map(|v| v.to_str().unwrap()),
        Some("tag-42"),
        "request metadata reached the server and response metadata came back"
    );
    let reply = resp.into_inner();
    assert_eq!(reply.message, big);
    assert_eq!(reply.server, "greeter-1");

    // The long and the short names of the Service route the same way.
    let mut client = client_via(proxy.outbound, "greeter.default.svc.cluster.local:50051").await;
    let reply = client.unary(echo_req("short")).await.unwrap().into_inner();
    assert_eq!(reply.message, "short");

    let m = proxy.metrics().await;
    assert!(
        sum_metric(
            &m,
            "remora_requests_total",
            &["direction=\"outbound\"", "code_class=\"2xx\""]
        ) >= 2.0,
        "both calls counted as outbound requests:\n{m}"
    );
}

#[tokio::test]
async fn server_streaming_delivers_every_message_in_order_and_trailers_intact() {
    let server = GrpcServer::start("greeter-1").await;
    let (proxy, _dir) = proxy_for(&server, "").await;
    let mut client = client_via(proxy.outbound, "greeter:50051").await;
    let n = 500u32;

    // A stream that ends OK, with custom trailing metadata.
    let resp = client
        .server_stream(StreamRequest {
            message: "ok-run".into(),
            count: n,
            end_code: 0,
        })
        .await
        .expect("server stream starts");
    let mut stream = resp.into_inner();
    let mut seqs = Vec::new();
    while let Some(m) = stream.message().await.expect("stream message") {
        assert_eq!(m.message, format!("ok-run-{}", m.seq));
        seqs.push(m.seq);
    }
    assert_eq!(seqs, (0..n).collect::<Vec<_>>(), "all messages, in order");
    let trailers = stream
        .trailers()
        .await
        .expect("trailers")
        .expect("the stream ended with trailers");
    assert_eq!(
        trailers.get("x-echo-trailer").map(|v| v.to_str().unwrap()),
        Some("ok-run"),
        "custom trailing metadata passed through: {trailers:?}"
    );
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0")
    );

    // A stream that ends with an error status after its messages: the
    // status, its message and its metadata all arrive as trailers.
    let resp = client
        .server_stream(StreamRequest {
            message: "bad-run".into(),
            count: n,
            end_code: Code::Aborted as i32,
        })
        .await
        .expect("server stream starts");
    let mut stream = resp.into_inner();
    let mut got = 0u32;
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => {
                assert_eq!(m.seq, got, "in order");
                got += 1;
            }
            Ok(None) => panic!("stream ended OK, expected ABORTED"),
            Err(status) => break status,
        }
    };
    assert_eq!(got, n, "every message arrived before the status");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(status.message(), "stream ended");
    assert_eq!(
        status
            .metadata()
            .get("x-echo-trailer")
            .map(|v| v.to_str().unwrap()),
        Some("bad-run"),
        "{status:?}"
    );
}

#[tokio::test]
async fn error_status_codes_and_messages_pass_through() {
    let server = GrpcServer::start("greeter-1").await;
    let (proxy, _dir) = proxy_for(&server, "").await;
    let mut client = client_via(proxy.outbound, "greeter:50051").await;

    for (code, message) in [
        (Code::NotFound, "no such greeting"),
        (Code::PermissionDenied, "not for you: ünïcode ✓ and 100%"),
        (Code::InvalidArgument, "bad"),
        // Codes the proxy itself uses for its own errors must still be the
        // server's when the server sent them.
        (Code::Unavailable, "server says unavailable"),
        (Code::Internal, "server says internal"),
    ] {
        let status = client
            .unary(EchoRequest {
                message: message.into(),
                sleep_ms: 0,
                fail_code: code as i32,
            })
            .await
            .expect_err("the server fails this call");
        assert_eq!(status.code(), code, "{status:?}");
        assert_eq!(status.message(), message, "{status:?}");
        assert!(
            status.metadata().get("x-remora-error").is_none(),
            "the server's status, not one the proxy made up: {status:?}"
        );
    }
}

#[tokio::test]
async fn route_request_timeout_answers_deadline_exceeded() {
    let server = GrpcServer::start("greeter-1").await;
    let route = r#"
kind: HTTPRoute
metadata: {name: greeter-timeout}
spec:
  parentRefs: [{name: greeter}]
  rules:
  - timeouts: {request: 200ms}
    backendRefs: [{name: greeter}]
"#;
    let (proxy, _dir) = proxy_for(&server, route).await;
    let mut client = client_via(proxy.outbound, "greeter:50051").await;

    // A fast call on the same route still works.
    let reply = client.unary(echo_req("quick")).await.expect("fast call");
    assert_eq!(reply.into_inner().message, "quick");

    let t0 = Instant::now();
    let status = client
        .unary(EchoRequest {
            message: "slow".into(),
            sleep_ms: 2000,
            fail_code: 0,
        })
        .await
        .expect_err("the route timeout cuts the slow call");
    let took = t0.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("x-remora-error")
            .map(|v| v.to_str().unwrap()),
        Some("timeout"),
        "the proxy answered: {status:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "answered at the 200ms route timeout, not when the server finished: {took:?}"
    );

    let m = proxy.metrics().await;
    assert!(
        sum_metric(
            &m,
            "remora_proxy_errors_total",
            &["direction=\"outbound\"", "reason=\"timeout\""]
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn unary_and_streaming_through_inbound_listener_with_app_protocol_grpc() {
    let server = GrpcServer::start("local-app").await;
    let proxy = ProxyBuilder::new()
        .app(server.addr)
        .arg("--app-protocol")
        .arg("grpc")
        .start()
        .await;
    let channel = Endpoint::from_shared(format!("http://{}", proxy.inbound))
        .unwrap()
        .timeout(CALL_DEADLINE)
        .connect()
        .await
        .expect("connect to the inbound listener");
    let mut client = EchoClient::new(channel);

    let reply = client
        .unary(echo_req("from the mesh"))
        .await
        .expect("unary via inbound")
        .into_inner();
    assert_eq!(reply.message, "from the mesh");
    assert_eq!(reply.server, "local-app");

    let status = client
        .unary(EchoRequest {
            message: "missing".into(),
            sleep_ms: 0,
            fail_code: Code::NotFound as i32,
        })
        .await
        .expect_err("server fails it");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "missing");

    let mut stream = client
        .server_stream(StreamRequest {
            message: "in".into(),
            count: 50,
            end_code: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        seqs.push(m.seq);
    }
    assert_eq!(seqs, (0..50).collect::<Vec<_>>());
    let trailers = stream.trailers().await.unwrap().expect("trailers");
    assert_eq!(
        trailers.get("x-echo-trailer").map(|v| v.to_str().unwrap()),
        Some("in")
    );

    let m = proxy.metrics().await;
    assert!(
        sum_metric(
            &m,
            "remora_requests_total",
            &["direction=\"inbound\"", "code_class=\"2xx\""]
        ) >= 3.0,
        "the calls went through the inbound listener:\n{m}"
    );
}

#[tokio::test]
async fn client_streaming_and_bidi_streaming_through_outbound_listener() {
    let server = GrpcServer::start("greeter-1").await;
    let (proxy, _dir) = proxy_for(&server, "").await;
    let mut client = client_via(proxy.outbound, "greeter:50051").await;

    // Client streaming: many requests, one reply.
    let words: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
    let reqs = tokio_stream::iter(words.clone().into_iter().map(|w| echo_req(&w)));
    let reply = client
        .client_stream(reqs)
        .await
        .expect("client stream")
        .into_inner();
    assert_eq!(reply.seq, 200);
    assert_eq!(reply.message, words.join(","));

    // Bidi, in lock step: each request is sent only after the reply to the
    // previous one came back, so a proxy that waited for the whole request
    // body before forwarding would stall here.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let mut replies = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi starts")
        .into_inner();
    tokio::time::timeout(CALL_DEADLINE, async {
        for i in 1..=20u32 {
            tx.send(echo_req(&format!("ping {i}"))).await.unwrap();
            let r = replies
                .message()
                .await
                .expect("bidi reply")
                .expect("a reply, not the end");
            assert_eq!(r.message, format!("PING {i}"));
            assert_eq!(r.seq, i);
        }
        drop(tx);
        assert!(
            replies.message().await.expect("clean end").is_none(),
            "the stream ends when the client half-closes"
        );
    })
    .await
    .expect("bidi in lock step through the proxy");
    drop(proxy);
}

#[tokio::test]
async fn proxy_own_failures_reach_grpc_clients_as_statuses() {
    let server = GrpcServer::start("greeter-1").await;
    // `gone` has an endpoint where nothing listens.
    let gone = service_yaml("gone", 50051, "grpc", &[free_addr()]);
    let (proxy, _dir) = proxy_for(&server, &gone).await;

    // A host that names no Service: UNIMPLEMENTED, not an HTTP 404 that a
    // gRPC client could only report as a protocol error.
    let mut client = client_via(proxy.outbound, "nowhere:50051").await;
    let status = client.unary(echo_req("x")).await.expect_err("no route");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("x-remora-error")
            .map(|v| v.to_str().unwrap()),
        Some("no-route"),
        "{status:?}"
    );

    // An endpoint that refuses connections: UNAVAILABLE.
    let mut client = client_via(proxy.outbound, "gone:50051").await;
    let status = client.unary(echo_req("x")).await.expect_err("refused");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("x-remora-error")
            .map(|v| v.to_str().unwrap()),
        Some("connect"),
        "{status:?}"
    );

    // The good service on the same proxy is unaffected.
    let mut client = client_via(proxy.outbound, "greeter:50051").await;
    let reply = client.unary(echo_req("fine")).await.unwrap().into_inner();
    assert_eq!(reply.message, "fine");
}
