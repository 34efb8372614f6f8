//! The node's UDP socket with batching: sendmmsg/GSO for runs of datagrams to one peer and
//! recvmmsg/GRO on receive (through quinn-udp), so a busy tunnel costs a few syscalls per hundred
//! packets instead of one each.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

const RECV_BUFFERS: usize = 4;
const RECV_BUFFER: usize = 64 * 1024;
const SOCKET_BUFFER: usize = 4 << 20;

pub struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
    bufs: Vec<Vec<u8>>,
    metas: Vec<RecvMeta>,
    batch: Vec<u8>,
}

impl Udp {
    pub fn new(socket: UdpSocket) -> io::Result<Udp> {
        let state = UdpSocketState::new((&socket).into())?;
        // Best effort: bigger buffers absorb bursts; the kernel caps them at its limits.
        let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER);
        let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER);
        Ok(Udp {
            socket,
            state,
            bufs: vec![vec![0; RECV_BUFFER]; RECV_BUFFERS],
            metas: vec![RecvMeta::default(); RECV_BUFFERS],
            batch: Vec::with_capacity(RECV_BUFFER),
        })
    }

    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Reads what is waiting without blocking; calls `f` for each datagram. Returns how many.
    pub fn try_recv(&mut self, mut f: impl FnMut(SocketAddr, &[u8])) -> usize {
        let mut iovs: Vec<IoSliceMut<'_>> = self.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let (socket, state, metas) = (&self.socket, &self.state, &mut self.metas);
        let n = match socket.try_io(Interest::READABLE, || state.recv(socket.into(), &mut iovs, metas)) {
            Ok(n) => n,
            Err(_) => return 0,
        };
        let mut count = 0;
        for (meta, buf) in self.metas.iter().zip(&self.bufs).take(n) {
            let stride = meta.stride.max(1);
            for datagram in buf[..meta.len].chunks(stride) {
                f(meta.addr, datagram);
                count += 1;
            }
        }
        count
    }

    /// Sends everything queued, coalescing equal-sized datagrams to one destination into GSO batches.
    pub async fn send_all(&mut self, transmits: &mut VecDeque<(SocketAddr, Vec<u8>)>) {
        let max = self.state.max_gso_segments().max(1);
        while let Some((dst, first)) = transmits.pop_front() {
            let size = first.len();
            self.batch.clear();
            self.batch.extend_from_slice(&first);
            let mut count = 1;
            while count < max {
                // Segments must share the destination; only the last may be shorter.
                match transmits.front() {
                    Some((d, p)) if *d == dst && p.len() <= size && self.batch.len() + size <= u16::MAX as usize => {
                        let (_, p) = transmits.pop_front().expect("front exists");
                        self.batch.extend_from_slice(&p);
                        count += 1;
                        if p.len() < size {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            let segment_size = (count > 1).then_some(size);
            self.send(dst, segment_size).await;
        }
    }

    /// Sends one datagram (a STUN request).
    pub async fn send_one(&mut self, dst: SocketAddr, payload: &[u8]) {
        self.batch.clear();
        self.batch.extend_from_slice(payload);
        self.send(dst, None).await;
    }

    async fn send(&self, destination: SocketAddr, segment_size: Option<usize>) {
        let transmit = Transmit { destination, ecn: None, contents: &self.batch, segment_size, src_ip: None };
        loop {
            let (socket, state) = (&self.socket, &self.state);
            match socket.try_io(Interest::WRITABLE, || state.send(socket.into(), &transmit)) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.socket.writable().await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::trace!(%destination, error = %e, "send failed");
                    return;
                }
            }
        }
    }
}
