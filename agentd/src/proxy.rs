//! Local ways into the tailnet for programs that know nothing of it: port forwards, a SOCKS5 proxy and
//! an HTTP proxy (CONNECT and absolute-URL requests). Names resolve from the netmap.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::node::Node;

#[derive(Clone, Debug)]
pub enum Kind {
    Socks5,
    Http,
    Forward(String, u16),
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Serves one local connection.
pub async fn handle(node: &Node, client: TcpStream, userspace: bool, kind: &Kind) -> io::Result<()> {
    match kind {
        Kind::Forward(host, port) => {
            let upstream = dial(node, host, *port, userspace).await?;
            splice(client, upstream, &[]).await
        }
        Kind::Socks5 => socks5(node, client, userspace).await,
        Kind::Http => http(node, client, userspace).await,
    }
}

/// Through the node's own stack (userspace mode), or the kernel's (TUN mode).
async fn dial(node: &Node, host: &str, port: u16, userspace: bool) -> io::Result<Box<dyn Io>> {
    if userspace {
        let stream = node.dial_host(host, port).await.map_err(|e| io::Error::other(e.to_string()))?;
        return Ok(Box::new(stream));
    }
    let ip = node
        .netmap()
        .borrow()
        .resolve(host)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("unknown host {host}")))?;
    let stream = TcpStream::connect(SocketAddr::new(ip, port)).await?;
    stream.set_nodelay(true)?;
    Ok(Box::new(stream))
}

async fn splice(mut client: TcpStream, mut upstream: Box<dyn Io>, already_read: &[u8]) -> io::Result<()> {
    if !already_read.is_empty() {
        upstream.write_all(already_read).await?;
    }
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 256 * 1024, 256 * 1024).await?;
    Ok(())
}

async fn socks5(node: &Node, mut client: TcpStream, userspace: bool) -> io::Result<()> {
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not SOCKS5"));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    client.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        client.write_all(&[5, 0xff]).await?;
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "SOCKS5 client wants authentication"));
    }
    client.write_all(&[5, 0]).await?;
    let mut request = [0u8; 4];
    client.read_exact(&mut request).await?;
    let reply = |code: u8| [5, code, 0, 1, 0, 0, 0, 0, 0, 0];
    if request[1] != 1 {
        client.write_all(&reply(7)).await?; // command not supported
        return Ok(());
    }
    let host = match request[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        4 => {
            let mut ip = [0u8; 16];
            client.read_exact(&mut ip).await?;
            std::net::Ipv6Addr::from(ip).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            client.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
        _ => {
            client.write_all(&reply(8)).await?; // address type not supported
            return Ok(());
        }
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    match dial(node, &host, u16::from_be_bytes(port), userspace).await {
        Ok(upstream) => {
            client.write_all(&reply(0)).await?;
            splice(client, upstream, &[]).await
        }
        Err(e) => {
            let code = if e.kind() == io::ErrorKind::NotFound { 4 } else { 5 };
            client.write_all(&reply(code)).await?;
            Err(e)
        }
    }
}

async fn http(node: &Node, mut client: TcpStream, userspace: bool) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            client.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\r\n").await?;
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, target, version) =
        (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or("HTTP/1.1"));
    let bad_gateway = |why: String| {
        format!(
            "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{why}",
            why.len()
        )
    };

    if method.eq_ignore_ascii_case("CONNECT") {
        let Some((host, port)) = target.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?))) else {
            client.write_all(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n").await?;
            return Ok(());
        };
        return match dial(node, host, port, userspace).await {
            Ok(upstream) => {
                client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await?;
                splice(client, upstream, &buf[head_end..]).await
            }
            Err(e) => {
                client.write_all(bad_gateway(format!("agentd: cannot reach {target}: {e}\n")).as_bytes()).await?;
                Ok(())
            }
        };
    }
    // An absolute URL: http://host[:port]/path.
    let Some(rest) = target.strip_prefix("http://") else {
        client.write_all(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\nagentd: send an absolute http:// URL or CONNECT\n").await?;
        return Ok(());
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    // `host`, `host:port`, `[v6]` or `[v6]:port`.
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !authority.ends_with(']') => (h, p.parse().unwrap_or(80)),
        _ => (authority, 80),
    };
    let upstream = match dial(node, host, port, userspace).await {
        Ok(u) => u,
        Err(e) => {
            client.write_all(bad_gateway(format!("agentd: cannot reach {authority}: {e}\n")).as_bytes()).await?;
            return Ok(());
        }
    };
    let mut forwarded = format!("{method} {path} {version}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        if name != "proxy-connection" && name != "proxy-authorization" {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("\r\n");
    let mut pending = forwarded.into_bytes();
    pending.extend_from_slice(&buf[head_end..]);
    splice(client, upstream, &pending).await
}
