//! A serving client picks the responder for a request by its route key
//! (`service.method`), then by its service, then the default; the request's
//! metadata and data reach the responder unchanged.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use rsbroker_client::metadata::route;
use rsbroker_client::{Client, ClientConfig, ClientError, LocalBoxFuture, Payload, Responder};
use rsbroker_transports::tcp::{TcpFrames, bind};

/// Answers with its name, the request's data and the request's metadata length.
struct Named(&'static str);

impl Responder for Named {
    fn request_response(&self, request: Payload) -> LocalBoxFuture<Result<Payload, ClientError>> {
        let metadata_len = request.metadata.as_ref().map_or(0, Bytes::len);
        let answer = format!(
            "{} {} {metadata_len}",
            self.0,
            String::from_utf8_lossy(&request.data)
        );
        Box::pin(std::future::ready(Ok(Payload::data(answer))))
    }
}

#[test]
fn requests_go_to_the_route_key_then_the_service_then_the_default() {
    let answers = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(|| async move {
            let listener = bind("127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            let server = glommio::spawn_local(async move {
                let stream = listener.accept().await.unwrap();
                let served = Client::builder(ClientConfig::default())
                    .responder("svc.hello", Named("key"))
                    .responder("svc", Named("service"))
                    .default_responder(Named("default"))
                    .serve(TcpFrames::new(stream, rsocket_proto::frame::MAX_U24));
                served.closed().await;
            })
            .detach();
            let client = Client::connect(addr).await.unwrap();
            let mut answers = Vec::new();
            // Repeated and alternating routes too, and two of one length
            // that differ in their last byte.
            for (tags, data) in [
                (&["svc.hello"][..], "a"),
                (&["svc.bye"][..], "b"),
                (&["svc.bye"][..], "b2"),
                (&["g!svc.hello:1"][..], "c"),
                (&["svc.hello"][..], "a2"),
                (&["svc.hello"][..], "a3"),
                (&["svc.hellp"][..], "x"),
                (&["other"][..], "d"),
            ] {
                let metadata = route(tags);
                let len = metadata.len();
                let reply = client
                    .request_response(Payload::new(metadata, Bytes::from(data)))
                    .await
                    .unwrap();
                answers.push((String::from_utf8(reply.data.to_vec()).unwrap(), len));
            }
            let without_metadata = client.request_response(Payload::data("e")).await.unwrap();
            answers.push((
                String::from_utf8(without_metadata.data.to_vec()).unwrap(),
                0,
            ));
            client.close();
            glommio::timer::sleep(Duration::from_millis(20)).await;
            drop(server);
            answers
        })
        .unwrap()
        .join()
        .unwrap();
    let expected = [
        "key a",
        "service b",
        "service b2",
        "key c",
        "key a2",
        "key a3",
        "service x",
        "default d",
        "default e",
    ];
    assert_eq!(answers.len(), expected.len());
    for ((answer, metadata_len), who) in answers.iter().zip(expected) {
        assert_eq!(answer, &format!("{who} {metadata_len}"));
    }
}
