//! RSocket over TCP: frames with a 24-bit length prefix, and the TCP
//! listener helpers every transport on TCP shares.

use std::io;
use std::net::SocketAddr;

use glommio::net::{TcpListener, TcpStream};

use crate::stream::Prefixed;

/// A TCP connection carrying length-prefixed RSocket frames.
pub type TcpFrames = Prefixed<TcpStream>;

impl Prefixed<TcpStream> {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr, max_frame: usize) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await.map_err(io_error)?;
        Ok(Self::tcp(stream, max_frame))
    }

    /// Wraps an accepted or connected stream; frames over `max_frame` bytes
    /// end the connection.
    pub fn new(stream: TcpStream, max_frame: usize) -> Self {
        Self::tcp(stream, max_frame)
    }
}

/// The `io::Error` inside a glommio error, keeping its kind.
pub fn io_error<T>(e: glommio::GlommioError<T>) -> io::Error {
    match e {
        glommio::GlommioError::IoError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// Binds `addr` for this executor. glommio sets SO_REUSEPORT, so every
/// shard binds the same address and the kernel spreads connections over
/// them; each connection stays on the shard that accepted it.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(io_error)
}

/// A process other than this one that listens where this one wants to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Its process id, when this user may see it.
    pub pid: Option<u32>,
    /// Its command name (`/proc/PID/comm`).
    pub command: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.pid, &self.command) {
            (Some(pid), Some(cmd)) => write!(f, "pid {pid} ({cmd})"),
            (Some(pid), None) => write!(f, "pid {pid}"),
            _ => f.write_str("a process this user cannot see"),
        }
    }
}

/// The other processes with a TCP socket listening on `addr`'s port at
/// `addr`'s address, or where either address is the unspecified one (so
/// the two would share connections). Read from `/proc/net/tcp` and
/// `/proc/net/tcp6` and the processes' descriptors; empty for port 0, and
/// where `/proc` cannot be read.
///
/// Every shard listens with SO_REUSEPORT, which would also let a second
/// broker started on the same address by the same user join in: the kernel
/// would then split new connections between two processes with two route
/// tables. Checking for other listeners is what keeps the address ours.
pub fn other_listeners(addr: SocketAddr) -> Vec<Holder> {
    other_holders(addr, ["/proc/net/tcp", "/proc/net/tcp6"], "0A")
}

/// The processes other than this one with a UDP socket bound to `addr`
/// (QUIC listeners share their port with SO_REUSEPORT, as TCP ones do).
pub fn other_udp_sockets(addr: SocketAddr) -> Vec<Holder> {
    other_holders(addr, ["/proc/net/udp", "/proc/net/udp6"], "07")
}

fn other_holders(addr: SocketAddr, tables: [&str; 2], state: &str) -> Vec<Holder> {
    if addr.port() == 0 {
        return Vec::new();
    }
    let mut inodes = Vec::new();
    for table in tables {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        inodes.extend(text.lines().skip(1).filter_map(|line| {
            let (local, inode) = parse_socket(line, state)?;
            overlaps(local, addr).then_some(inode)
        }));
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let owners = socket_owners(&inodes);
    inodes
        .iter()
        .filter_map(|inode| {
            let pids: Vec<u32> = owners
                .iter()
                .filter(|(_, i)| i == inode)
                .map(|(p, _)| *p)
                .collect();
            if pids.contains(&me) {
                return None;
            }
            let pid = pids.first().copied();
            let command = pid.and_then(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .ok()
                    .map(|c| c.trim().to_owned())
            });
            Some(Holder { pid, command })
        })
        .collect()
}

/// The local address and inode of a LISTEN line of `/proc/net/tcp{,6}`.
#[cfg(test)]
fn parse_listener(line: &str) -> Option<(SocketAddr, u64)> {
    parse_socket(line, "0A")
}

/// The local address and inode of a line of `/proc/net/{tcp,udp}{,6}` in
/// state `want` (LISTEN, or an unconnected UDP socket).
fn parse_socket(line: &str, want: &str) -> Option<(SocketAddr, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
    let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
    if *state != want {
        return None;
    }
    let (ip, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // Each 32-bit word is printed as the host reads it from network order.
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| {
            ip.get(i * 8..i * 8 + 8)
                .and_then(|w| u32::from_str_radix(w, 16).ok())
        })
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| u32::from_be(*w).to_be_bytes())
        .collect();
    let ip: std::net::IpAddr = match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok()?.into(),
        16 => <[u8; 16]>::try_from(bytes).ok()?.into(),
        _ => return None,
    };
    Some((SocketAddr::new(ip, port), inode.parse().ok()?))
}

/// Whether a listener on `a` takes connections meant for `b`, or the other
/// way round.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
        match ip {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        }
    }
    let (x, y) = (canonical(a.ip()), canonical(b.ip()));
    a.port() == b.port() && (x == y || x.is_unspecified() || y.is_unspecified())
}

/// (pid, inode) of every socket descriptor of every process this user may
/// see whose inode is in `inodes`.
fn socket_owners(inodes: &[u64]) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(inode) = inode.filter(|i| inodes.contains(i)) {
                out.push((pid, inode));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_lines_of_proc_net_tcp_are_read() {
        let v4 = "   1: 0100007F:270F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_listener(v4),
            Some(("127.0.0.1:9999".parse().unwrap(), 4242))
        );
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(parse_listener(&established), None);
        let v6 = "   0: 00000000000000000000000001000000:270F 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_listener(v6),
            Some(("[::1]:9999".parse().unwrap(), 77))
        );
        assert_eq!(parse_listener("garbage"), None);
    }

    #[test]
    fn addresses_overlap_on_the_same_port_when_equal_or_unspecified() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(a("127.0.0.1:1"), a("127.0.0.1:1")));
        assert!(overlaps(a("0.0.0.0:1"), a("127.0.0.1:1")));
        assert!(overlaps(a("[::]:1"), a("10.0.0.1:1")));
        assert!(overlaps(a("[::ffff:127.0.0.1]:1"), a("127.0.0.1:1")));
        assert!(!overlaps(a("127.0.0.2:1"), a("127.0.0.1:1")));
        assert!(!overlaps(a("0.0.0.0:2"), a("127.0.0.1:1")));
    }

    #[test]
    fn another_process_listening_is_found_and_this_one_is_not() {
        // This process: not reported.
        let mine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = mine.local_addr().unwrap();
        assert!(other_listeners(addr).is_empty());
        drop(mine);
        // Another process on a port of its own.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let script = format!(
            "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',{port}))\ns.listen()\nprint('up',flush=True)\ntime.sleep(30)"
        );
        let Ok(mut child) = std::process::Command::new("python3")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            return; // no python3: the parsing tests above still run
        };
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        let found = other_listeners(SocketAddr::from(([0, 0, 0, 0], port)));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pid, Some(child.id()));
        assert_eq!(found[0].command.as_deref(), Some("python3"));
    }
}
