//! Calls a service through rsbroker and prints the answer: one
//! request-response, a fire-and-forget, or a request-stream.
//!
//! ```sh
//! cargo run --release -p rsbroker-client --example call -- com.example.Echo.hello 'hi there'
//! cargo run --release -p rsbroker-client --example call -- --stream com.example.Echo.count 5
//! ```
#![allow(clippy::print_stdout)] // a command-line example

use clap::Parser;
use rsbroker_client::metadata::route;
use rsbroker_client::{Client, Payload};
use rsbroker_transports::ListenAddr;

/// Sends DATA to ROUTE (`[group!]service[.method][:version]`) through the broker.
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
    /// Fire-and-forget instead of request-response.
    #[arg(long, conflicts_with = "stream")]
    fnf: bool,
    /// Request-stream, asking for items N at a time.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "16")]
    stream: Option<u32>,
    /// Routing tags after the route, such as `e=echo-1` or `sticky=1`.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Where to send it.
    route: String,
    /// What to send.
    #[arg(default_value = "")]
    data: String,
}

fn main() {
    let args = Args::parse();
    let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(256 << 10)
        .spawn(move || async move {
            let tls = rsbroker_client::trust(&args.broker, args.ca.as_deref(), args.insecure)?;
            let client = Client::builder(rsbroker_client::ClientConfig {
                credentials: rsbroker_client::Credentials::from_flags(
                    args.token.as_deref(),
                    args.user.as_deref(),
                )?,
                ..rsbroker_client::ClientConfig::default()
            })
            .connect_url(&args.broker, tls)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", args.broker))?;
            let mut tags = vec![args.route.as_str()];
            tags.extend(args.tags.iter().map(String::as_str));
            let request = Payload::new(route(&tags), args.data.clone());
            if args.fnf {
                client.fire_and_forget(request).map_err(|e| e.to_string())?;
                client.close();
                client.closed().await;
                println!("sent");
            } else if let Some(n) = args.stream {
                let mut items = client
                    .request_stream(request, n.max(1))
                    .map_err(|e| e.to_string())?;
                let mut got = 0u32;
                while let Some(item) = items.next().await {
                    let item = item.map_err(|e| e.to_string())?;
                    println!("{}", String::from_utf8_lossy(&item.data));
                    got += 1;
                    if got.is_multiple_of(n.max(1)) {
                        items.request(n.max(1)).map_err(|e| e.to_string())?;
                    }
                }
            } else {
                let answer = client
                    .request_response(request)
                    .await
                    .map_err(|e| e.to_string())?;
                println!("{}", String::from_utf8_lossy(&answer.data));
            }
            Ok::<(), String>(())
        })
        .expect("an executor");
    if let Err(e) = handle.join().expect("the executor") {
        eprintln!("call: {e}");
        std::process::exit(1);
    }
}
