//! A TCP relay of our own between a client and a server: it counts the
//! bytes the server sends, and can cut the link (every connection closed,
//! new ones refused) and restore it, or point at another server. netem is
//! not available here; this is how tests break links.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

struct State {
    upstream: Mutex<SocketAddr>,
    cut: AtomicBool,
    stop: AtomicBool,
    down: AtomicU64,
    up: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
}

pub struct Relay {
    port: u16,
    state: Arc<State>,
}

impl Relay {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            upstream: Mutex::new(upstream),
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            down: AtomicU64::new(0),
            up: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if st.cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let up = *st.upstream.lock().unwrap();
                let Ok(server) = TcpStream::connect(up) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut c = st.conns.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    st.clone(),
                    Dir::Up,
                );
                pipe(server, client, st.clone(), Dir::Down);
            }
        });
        Relay { port, state }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Bytes the server side has sent through the relay so far.
    pub fn bytes_down(&self) -> u64 {
        self.state.down.load(Ordering::SeqCst)
    }

    /// Bytes the client side has sent through the relay so far.
    pub fn bytes_up(&self) -> u64 {
        self.state.up.load(Ordering::SeqCst)
    }

    /// Cuts the link: every connection is closed and new ones are refused
    /// until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for c in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Where new connections go.
    pub fn upstream(&self) -> SocketAddr {
        *self.state.upstream.lock().unwrap()
    }

    /// New connections go to `upstream` from now on.
    pub fn retarget(&self, upstream: SocketAddr) {
        *self.state.upstream.lock().unwrap() = upstream;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wakes the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Up,
    Down,
}

/// Copies `from` to `to` until either side closes, counting the bytes.
fn pipe(mut from: TcpStream, mut to: TcpStream, st: Arc<State>, dir: Dir) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            let counter = match dir {
                Dir::Up => &st.up,
                Dir::Down => &st.down,
            };
            counter.fetch_add(n as u64, Ordering::SeqCst);
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
