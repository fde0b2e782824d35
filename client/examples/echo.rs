//! A responder app: registers a service with rsbroker and answers every
//! interaction model. Request-response echoes the data, fire-and-forget is
//! printed, a request-stream whose data is a number N gets N items, a
//! channel echoes each item it receives.
//!
//! ```sh
//! cargo run --release -p rsbroker-client --example echo -- --service com.example.Echo
//! ```
#![allow(clippy::print_stdout)] // a command-line example

use clap::Parser;
use rsbroker_client::{
    AppConfig, Client, ClientConfig, ClientError, LocalBoxFuture, Payload, Responder, Sink,
    Subscription,
};
use rsbroker_transports::ListenAddr;

/// Registers SERVICE with the broker and echoes what it is sent.
#[derive(Parser)]
struct Args {
    /// The broker: tcp://host:port, tls://host:port, ws://host:port/path or
    /// wss://host:port/path.
    #[arg(long, default_value = "tcp://127.0.0.1:9999")]
    broker: ListenAddr,
    /// For tls:// and wss://: trust the CA certificates in this PEM file.
    #[arg(long, value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
    /// For tls:// and wss://: accept any certificate (test brokers only).
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
    /// A bearer token (JWT) for the SETUP.
    #[arg(long, value_name = "JWT", conflicts_with = "user")]
    token: Option<String>,
    /// Simple authentication for the SETUP: user name and secret.
    #[arg(long, value_name = "NAME:SECRET")]
    user: Option<String>,
    /// Service to publish (`[group!]service[:version]`).
    #[arg(long, default_value = "com.example.Echo")]
    service: String,
    /// Instance id (a second process with the same id joins this instance).
    #[arg(long, default_value = "echo-1")]
    uuid: String,
}

struct Echo;

impl Responder for Echo {
    fn request_response(&self, request: Payload) -> LocalBoxFuture<Result<Payload, ClientError>> {
        Box::pin(async move { Ok(Payload::data(request.data)) })
    }

    fn fire_and_forget(&self, request: Payload) {
        println!(
            "fire-and-forget: {}",
            String::from_utf8_lossy(&request.data)
        );
    }

    fn request_stream(&self, request: Payload, sink: Sink) {
        let n: u64 = String::from_utf8_lossy(&request.data)
            .trim()
            .parse()
            .unwrap_or(10);
        glommio::spawn_local(async move {
            for i in 0..n {
                // `send` waits for the requester's REQUEST_N credit.
                if sink.send(Payload::data(i.to_string())).await.is_err() {
                    return;
                }
            }
            let _ = sink.complete();
        })
        .detach();
    }

    fn request_channel(&self, request: Payload, mut inbound: Subscription, sink: Sink) {
        glommio::spawn_local(async move {
            let _ = inbound.request(64);
            if sink.send(request).await.is_err() {
                return;
            }
            while let Some(Ok(item)) = inbound.next().await {
                let _ = inbound.request(1);
                if sink.send(item).await.is_err() {
                    return;
                }
            }
            let _ = sink.complete();
        })
        .detach();
    }
}

fn split_service(s: &str) -> (String, String, String) {
    let (group, rest) = s.split_once('!').unwrap_or(("", s));
    let (service, version) = rest.split_once(':').unwrap_or((rest, ""));
    (group.into(), service.into(), version.into())
}

fn main() {
    let args = Args::parse();
    let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(256 << 10)
        .spawn(move || async move {
            let tls = rsbroker_client::trust(&args.broker, args.ca.as_deref(), args.insecure)?;
            let (group, service, version) = split_service(&args.service);
            let config = ClientConfig {
                app: Some(AppConfig {
                    name: "echo".into(),
                    uuid: args.uuid.clone(),
                    power_rating: 1,
                }),
                services: vec![(group, service.clone(), version)],
                credentials: rsbroker_client::Credentials::from_flags(
                    args.token.as_deref(),
                    args.user.as_deref(),
                )?,
                ..ClientConfig::default()
            };
            let client = Client::builder(config)
                .responder(&service, Echo)
                .connect_url(&args.broker, tls)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", args.broker))?;
            println!(
                "serving {} as instance {} through {}; Ctrl-C stops",
                args.service, args.uuid, args.broker
            );
            client.closed().await;
            Err::<(), String>("the broker closed the connection".into())
        })
        .expect("an executor");
    if let Err(e) = handle.join().expect("the executor") {
        eprintln!("echo: {e}");
        std::process::exit(1);
    }
}
