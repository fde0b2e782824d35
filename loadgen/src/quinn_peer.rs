//! The peer our QUIC path is measured against: an RSocket responder on
//! quinn's own runtime (tokio), answering frames decoded with rsocket-proto,
//! so that the same requester drives it, our direct QUIC path
//! (`responder --listen quic://`) and the broker over QUIC in one run.
//!
//! It answers what perf/ sends: request-response (echo), fire-and-forget,
//! request-stream (`items` copies of the request, within the requester's
//! REQUEST_N credit), KEEPALIVE; one RSocket connection per QUIC
//! connection, on the client's first bidirectional stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rsocket_proto::codec::{ChunkCutter, put_prefix};
use rsocket_proto::frame::{Flags, Frame, FrameType, HEADER_LEN, Keepalive, MAX_U24, put_header};

/// Payloads larger than this go to quinn as their own chunk (no copy), as
/// our transports write them.
const COPY_THRESHOLD: usize = 4096;

/// Items written per active stream before the connection reads again.
const ITEMS_PER_TURN: u32 = 64;

/// Serves on `addr` until `stop` is set.
pub fn run(
    addr: SocketAddr,
    tls: Arc<rsbroker_transports::rustls::ServerConfig>,
    items: u32,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut tls = (*tls).clone();
    tls.alpn_protocols.clear();
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| format!("QUIC needs TLS 1.3: {e}"))?;
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let endpoint = quinn::Endpoint::server(config, addr)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        eprintln!("loadgen quinn-responder: serving RSocket on quic://{addr}");
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    continue;
                }
            };
            let Some(incoming) = incoming else { break };
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    let _ = serve(conn, items).await;
                }
            });
        }
        endpoint.close(0u32.into(), b"");
        Ok(())
    })
}

struct Stream {
    credit: u64,
    left: u32,
    data: Bytes,
}

/// A PAYLOAD of `data` without metadata: a large one is queued as its own
/// chunk after the header.
fn put_payload(out: &mut BytesMut, chunks: &mut Vec<Bytes>, id: u32, complete: bool, data: &Bytes) {
    let flags = Flags::NEXT | if complete { Flags::COMPLETE } else { 0 };
    if put_prefix(out, HEADER_LEN + data.len()).is_err() {
        return;
    }
    put_header(out, id, FrameType::Payload, flags);
    if data.len() > COPY_THRESHOLD {
        chunks.push(out.split().freeze());
        chunks.push(data.clone());
    } else {
        out.extend_from_slice(data);
    }
}

fn put(out: &mut BytesMut, frame: &Frame) {
    if put_prefix(out, frame.encoded_len()).is_ok() {
        frame.encode(out);
    }
}

async fn serve(conn: quinn::Connection, items: u32) -> Result<(), String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let mut cutter = ChunkCutter::new(MAX_U24);
    let mut frames = Vec::new();
    let mut out = BytesMut::new();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut streams: HashMap<u32, Stream> = HashMap::new();
    loop {
        let busy = streams.values().any(|s| s.credit > 0 && s.left > 0);
        // Read: wait when there is nothing to send, otherwise take only
        // what is there already.
        let chunk = if busy {
            futures_lite::future::poll_once(recv.read_chunk(usize::MAX, true)).await
        } else {
            Some(recv.read_chunk(usize::MAX, true).await)
        };
        match chunk {
            Some(Ok(Some(c))) => cutter
                .push(c.bytes, &mut frames)
                .map_err(|e| e.to_string())?,
            Some(Ok(None)) => return Ok(()),
            Some(Err(e)) => return Err(e.to_string()),
            None => {}
        }
        for f in frames.drain(..) {
            match Frame::decode(f) {
                Ok(Frame::RequestResponse(r)) => {
                    put_payload(&mut out, &mut chunks, r.stream_id, true, &r.data)
                }
                Ok(Frame::RequestStream(r)) => {
                    streams.insert(
                        r.stream_id,
                        Stream {
                            credit: u64::from(r.initial_n),
                            left: items,
                            data: r.data,
                        },
                    );
                }
                Ok(Frame::RequestN(n)) => {
                    if let Some(s) = streams.get_mut(&n.stream_id) {
                        s.credit += u64::from(n.n);
                    }
                }
                Ok(Frame::Cancel(c)) => {
                    streams.remove(&c.stream_id);
                }
                Ok(Frame::Keepalive(k)) if k.respond => put(
                    &mut out,
                    &Frame::Keepalive(Keepalive {
                        respond: false,
                        last_received_position: 0,
                        data: k.data,
                    }),
                ),
                _ => {}
            }
        }
        for (&id, s) in streams.iter_mut() {
            let mut n = 0;
            while s.credit > 0 && s.left > 0 && n < ITEMS_PER_TURN {
                s.credit -= 1;
                s.left -= 1;
                n += 1;
                put_payload(&mut out, &mut chunks, id, s.left == 0, &s.data);
            }
        }
        streams.retain(|_, s| s.left > 0);
        if !out.is_empty() {
            chunks.push(out.split().freeze());
        }
        if !chunks.is_empty() {
            send.write_all_chunks(&mut chunks)
                .await
                .map_err(|e| e.to_string())?;
            chunks.clear();
        }
    }
}
