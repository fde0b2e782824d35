//! Request-response between two clients: the answer arrives and leaves
//! nothing open on either side; a request dropped before its answer is
//! cancelled, so the responder's side of the stream closes too.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use rsbroker_client::metadata::route;
use rsbroker_client::{Client, ClientConfig, ClientError, LocalBoxFuture, Payload, Responder};
use rsbroker_transports::tcp::{TcpFrames, bind};

/// Echoes requests whose data is "echo"; never answers the others.
struct EchoOrHang;

impl Responder for EchoOrHang {
    fn request_response(&self, request: Payload) -> LocalBoxFuture<Result<Payload, ClientError>> {
        if request.data == "echo" {
            Box::pin(std::future::ready(Ok(request)))
        } else {
            Box::pin(std::future::pending())
        }
    }
}

/// Waits (up to 5 s) until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
}

#[test]
fn answered_and_dropped_requests_leave_no_stream_open() {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(64 << 10)
        .spawn(|| async move {
            let listener = bind("127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            let served: Rc<RefCell<Option<Client>>> = Rc::default();
            let server = {
                let served = served.clone();
                glommio::spawn_local(async move {
                    let stream = listener.accept().await.unwrap();
                    let client = Client::builder(ClientConfig::default())
                        .default_responder(EchoOrHang)
                        .serve(TcpFrames::new(stream, rsocket_proto::frame::MAX_U24));
                    *served.borrow_mut() = Some(client);
                })
            };
            let client = Client::connect(addr).await.unwrap();
            let server_streams = || {
                served
                    .borrow()
                    .as_ref()
                    .map_or(usize::MAX, Client::open_streams)
            };

            let answer = client
                .request_response(Payload::new(route(&["svc"]), Bytes::from("echo")))
                .await
                .unwrap();
            assert_eq!(answer.data, "echo");
            assert_eq!(answer.metadata, Some(route(&["svc"])));
            assert_eq!(client.open_streams(), 0);
            eventually("the responder's stream closed", || server_streams() == 0).await;

            // A request that is never answered, dropped while it waits.
            let unanswered = futures_lite::future::or(
                async { Some(client.request_response(Payload::data("hang")).await) },
                async {
                    eventually("the responder has the request", || server_streams() == 1).await;
                    None
                },
            )
            .await;
            assert!(unanswered.is_none(), "the hanging request was answered");
            assert_eq!(
                client.open_streams(),
                0,
                "the requester cancelled the stream"
            );
            eventually("the responder saw the cancel", || server_streams() == 0).await;

            // The connection still serves.
            let again = client
                .request_response(Payload::data("echo"))
                .await
                .unwrap();
            assert_eq!(again.data, "echo");
            client.close();
            server.await;
        })
        .unwrap()
        .join()
        .unwrap();
}
