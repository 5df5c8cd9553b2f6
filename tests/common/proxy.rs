//! Test support: a link-cutting TCP proxy on 127.0.0.1, between a ferry
//! process and one of its peers (the source Redis, the target Redis, or the
//! drainer), steered by the test while traffic flows.
//!
//! In: connections to [`Proxy::addr`] (a free port). Out: the same bytes to
//! the upstream address, or a fault instead:
//!
//! - [`Proxy::pass`]: forward everything as it comes (also heals every
//!   fault below; connections held by a blackhole resume).
//! - [`Proxy::delay`] / [`Proxy::delay_each`]: every chunk read is written
//!   `delay` later (latency, not a bandwidth cap: chunks queue up behind
//!   each other, up to [`QUEUED_CHUNKS`] per direction).
//! - [`Proxy::cut`]: every connection is closed with FIN both ways (write
//!   side shut down, what still arrives is read and dropped until the peer
//!   closes, at most [`FIN_GRACE`]); new connections are accepted and closed
//!   the same way at once.
//! - [`Proxy::reset`]: the same with RST (`SO_LINGER` 0, through tokio's
//!   `set_zero_linger`: no extra dependency).
//! - [`Proxy::blackhole`]: connections stay open but nothing is read or
//!   written either way (each side sees a silent, half-open peer; its sends
//!   pile up in the kernel buffers); new connections are accepted and left
//!   silent, and connect upstream only once the blackhole ends.
//! - [`Proxy::reset_after_bytes`]: forwarding goes on until `n` more bytes
//!   have been written in one direction (whichever gets there first), then
//!   every connection is reset: exactly `n` bytes reach that side, so the
//!   cut lands in the middle of whatever was being sent. One shot:
//!   forwarding resumes for new connections ([`Proxy::resets_fired`] counts).
//! - [`Proxy::hold_open_up`]: every connection open now keeps what its
//!   client sends from then on (read and queued in order, its FIN after
//!   it) instead of forwarding it, until [`Proxy::release_held`]; new
//!   connections are not held. The upstream sees those bytes arrive late,
//!   after whatever newer connections did meanwhile (a client's abandoned
//!   request reaching the server late). [`Proxy::is_open`] tells when a
//!   connection has ended both ways.
//! - [`Proxy::blackhole_after_bytes`]: the same, but instead of the reset
//!   the proxy turns into a blackhole (connections stay open, what was read
//!   beyond the `n` bytes is held until [`Proxy::pass`]).
//! - [`Proxy::set_upstream`]: where new connections go (a failover).
//!
//! Connections refused by "cut" are accepted and closed rather than refused
//! by a closed listening socket: giving the port up could let another test
//! take it. Either way the client's attempt fails.
//!
//! The proxy runs on a thread of its own with a single-threaded tokio
//! runtime, usable from blocking and async tests alike; dropping the proxy
//! stops that runtime (closing every socket) and joins the thread.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};

/// Chunks queued per direction of a connection (delayed or blackholed)
/// before the proxy stops reading that side.
pub const QUEUED_CHUNKS: usize = 256;
/// Longest a cut connection is drained, waiting for the peers' FIN.
pub const FIN_GRACE: Duration = Duration::from_secs(1);
/// Longest the proxy waits to connect upstream.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A direction of traffic through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (the connecting side) to the upstream.
    Up,
    /// From the upstream back to the client.
    Down,
}

/// What the proxy does with connections right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    Cut,
    Reset,
    Blackhole,
}

/// How a connection is ended by a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Fin,
    Rst,
}

#[derive(Debug, Clone)]
struct State {
    mode: Mode,
    upstream: SocketAddr,
    delay_up: Duration,
    delay_down: Duration,
    /// `reset_after_bytes`: bytes still to forward per direction (up, down)
    /// before every connection is reset.
    armed: Option<(u64, u64)>,
    /// Connections numbered up to this one hold what their client sends
    /// ([`Proxy::hold_open_up`]); 0 holds none.
    hold_up_through: u64,
    /// What the armed count fires: a blackhole instead of a reset.
    armed_blackhole: bool,
    /// Bumped by every fault that ends the open connections; each
    /// connection remembers the value it started under.
    kill_epoch: u64,
    kill_close: Close,
    stopping: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped after every change of `state`.
    changed: watch::Sender<u64>,
    accepted: AtomicU64,
    /// Numbers (1 = first accepted) of the connections not yet ended.
    open: Mutex<std::collections::BTreeSet<u64>>,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    resets_fired: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the state from the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.lock());
        self.changed.send_modify(|version| *version += 1);
    }

    fn snapshot(&self) -> State {
        self.lock().clone()
    }
}

/// A running proxy; stops on drop.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy on a free 127.0.0.1 port in front of `upstream`
    /// (`127.0.0.1:PORT`), forwarding.
    pub fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream
            .parse()
            .unwrap_or_else(|e| panic!("upstream {upstream:?}: {e}"));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy addr");
        let (changed, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                mode: Mode::Pass,
                upstream,
                delay_up: Duration::ZERO,
                delay_down: Duration::ZERO,
                armed: None,
                hold_up_through: 0,
                armed_blackhole: false,
                kill_epoch: 0,
                kill_close: Close::Fin,
                stopping: false,
            }),
            changed,
            accepted: AtomicU64::new(0),
            open: Mutex::new(std::collections::BTreeSet::new()),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            resets_fired: AtomicU64::new(0),
        });
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("proxy runtime");
                    runtime.block_on(accept_loop(listener, shared));
                    // Dropping the runtime drops every connection task and
                    // with them every socket.
                }
            })
            .expect("spawn proxy thread");
        Proxy {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Forward everything without delay; ends every fault.
    pub fn pass(&self) {
        self.shared.update(|state| {
            state.mode = Mode::Pass;
            state.delay_up = Duration::ZERO;
            state.delay_down = Duration::ZERO;
            state.armed = None;
            state.hold_up_through = 0;
        });
    }

    /// Forward every chunk `delay` late, both ways.
    pub fn delay(&self, delay: Duration) {
        self.delay_each(delay, delay);
    }

    /// Forward chunks going up `up` late and chunks coming down `down` late.
    pub fn delay_each(&self, up: Duration, down: Duration) {
        self.shared.update(|state| {
            state.mode = Mode::Pass;
            state.delay_up = up;
            state.delay_down = down;
        });
    }

    /// Close every connection with FIN; close new ones at once.
    pub fn cut(&self) {
        self.shared.update(|state| {
            state.mode = Mode::Cut;
            state.kill_epoch += 1;
            state.kill_close = Close::Fin;
        });
    }

    /// Close every connection with RST; reset new ones at once.
    pub fn reset(&self) {
        self.shared.update(|state| {
            state.mode = Mode::Reset;
            state.kill_epoch += 1;
            state.kill_close = Close::Rst;
        });
    }

    /// Stop forwarding both ways, keeping connections open; new ones are
    /// accepted and left silent.
    pub fn blackhole(&self) {
        self.shared.update(|state| state.mode = Mode::Blackhole);
    }

    /// Forward (without delay) until `n` more bytes went one way, then reset
    /// every connection once.
    pub fn reset_after_bytes(&self, n: u64) {
        self.shared.update(|state| {
            state.mode = Mode::Pass;
            state.armed = Some((n, n));
            state.armed_blackhole = false;
        });
    }

    /// Forward (without delay) until `n` more bytes went one way, then hold
    /// everything as [`Proxy::blackhole`] does (counted by
    /// [`Proxy::resets_fired`] too).
    pub fn blackhole_after_bytes(&self, n: u64) {
        self.shared.update(|state| {
            state.mode = Mode::Pass;
            state.armed = Some((n, n));
            state.armed_blackhole = true;
        });
    }

    /// Whether a [`Proxy::reset_after_bytes`] is still waiting for its bytes.
    pub fn armed(&self) -> bool {
        self.shared.snapshot().armed.is_some()
    }

    /// Every connection open now stops forwarding what its client sends:
    /// the bytes are read and queued (at most [`QUEUED_CHUNKS`] reads), the
    /// client's FIN after them, until [`Proxy::release_held`]. Replies still
    /// flow down. Connections accepted later are not held. Returns the
    /// number of the newest connection held (0: none was open).
    pub fn hold_open_up(&self) -> u64 {
        let newest = self.connections();
        self.shared.update(|state| state.hold_up_through = newest);
        newest
    }

    /// Lets the connections held by [`Proxy::hold_open_up`] forward what
    /// they kept, in order.
    pub fn release_held(&self) {
        self.shared.update(|state| state.hold_up_through = 0);
    }

    /// Whether connection number `n` (1 = the first accepted) is still open
    /// in either direction.
    pub fn is_open(&self, n: u64) -> bool {
        self.shared
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&n)
    }

    /// New connections go to `upstream` (`127.0.0.1:PORT`); open ones stay
    /// where they are.
    pub fn set_upstream(&self, upstream: &str) {
        let upstream: SocketAddr = upstream
            .parse()
            .unwrap_or_else(|e| panic!("upstream {upstream:?}: {e}"));
        self.shared.update(|state| state.upstream = upstream);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Bytes forwarded so far in `direction`.
    pub fn bytes(&self, direction: Direction) -> u64 {
        match direction {
            Direction::Up => self.shared.bytes_up.load(Ordering::SeqCst),
            Direction::Down => self.shared.bytes_down.load(Ordering::SeqCst),
        }
    }

    /// How many [`Proxy::reset_after_bytes`] fired.
    pub fn resets_fired(&self) -> u64 {
        self.shared.resets_fired.load(Ordering::SeqCst)
    }

    /// Waits until `resets_fired() > before`; false after `timeout`.
    pub fn wait_fired(&self, before: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.resets_fired() <= before {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.update(|state| state.stopping = true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits for the next change of the proxy's state; false once the proxy is
/// stopping (or gone).
async fn next_change(changed: &mut watch::Receiver<u64>) -> bool {
    changed.changed().await.is_ok()
}

async fn accept_loop(listener: std::net::TcpListener, shared: Arc<Shared>) {
    let listener = TcpListener::from_std(listener).expect("register proxy listener");
    let mut changed = shared.changed.subscribe();
    loop {
        if shared.snapshot().stopping {
            return;
        }
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of fds or the like: let the client retry.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let number = shared.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                shared.open.lock().unwrap_or_else(|e| e.into_inner()).insert(number);
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    connection(client, number, Arc::clone(&shared)).await;
                    shared.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&number);
                });
            }
            alive = next_change(&mut changed) => if !alive { return },
        }
    }
}

/// A socket's second descriptor, kept by the connection task to shut the
/// socket down or make its close a reset while the pumps own the halves.
fn control_handle(stream: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let std_stream = stream.into_std()?;
    let control = std_stream.try_clone()?;
    Ok((TcpStream::from_std(std_stream)?, control))
}

/// Ends `sockets` as `close` says, once every descriptor is dropped.
fn prepare_close(sockets: &[&std::net::TcpStream], close: Close) {
    for socket in sockets {
        match close {
            Close::Fin => {
                let _ = socket.shutdown(std::net::Shutdown::Write);
            }
            Close::Rst => {
                if let Ok(copy) = socket.try_clone() {
                    // SO_LINGER is per socket, not per descriptor.
                    let _ = TcpSocket::from_std_stream(copy).set_zero_linger();
                }
            }
        }
    }
}

/// Reads and drops what `stream` still sends until it closes (at most
/// [`FIN_GRACE`]), so that closing it after a FIN is not turned into a
/// reset by unread data.
async fn drain(stream: &mut TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(FIN_GRACE, async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

async fn connection(client: TcpStream, number: u64, shared: Arc<Shared>) {
    let mut changed = shared.changed.subscribe();
    let Ok((mut client, client_control)) = control_handle(client) else {
        return;
    };
    // Until the proxy forwards: a blackhole holds the new connection silent.
    let (epoch, upstream) = loop {
        let state = shared.snapshot();
        match state.mode {
            Mode::Pass => break (state.kill_epoch, state.upstream),
            Mode::Cut => {
                prepare_close(&[&client_control], Close::Fin);
                drain(&mut client).await;
                return;
            }
            Mode::Reset => {
                prepare_close(&[&client_control], Close::Rst);
                return;
            }
            Mode::Blackhole => {
                if !next_change(&mut changed).await {
                    return;
                }
            }
        }
    };
    let upstream =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
            Ok(Ok(stream)) => stream,
            _ => {
                // What the client would have got connecting directly.
                prepare_close(&[&client_control], Close::Rst);
                return;
            }
        };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let Ok((upstream, upstream_control)) = control_handle(upstream) else {
        prepare_close(&[&client_control], Close::Rst);
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let mut pumps = tokio::task::JoinSet::new();
    spawn_direction(
        &mut pumps,
        &shared,
        number,
        Direction::Up,
        client_read,
        upstream_write,
    );
    spawn_direction(
        &mut pumps,
        &shared,
        number,
        Direction::Down,
        upstream_read,
        client_write,
    );
    let close = loop {
        tokio::select! {
            done = pumps.join_next() => {
                if done.is_none() {
                    // Both directions ended (each passed its FIN on).
                    return;
                }
            }
            alive = next_change(&mut changed) => {
                if !alive {
                    return;
                }
                let state = shared.snapshot();
                if state.stopping {
                    return;
                }
                if state.kill_epoch != epoch {
                    break state.kill_close;
                }
            }
        }
    };
    let sockets = [&client_control, &upstream_control];
    match close {
        Close::Rst => {
            prepare_close(&sockets, Close::Rst);
            pumps.shutdown().await;
        }
        Close::Fin => {
            pumps.shutdown().await;
            prepare_close(&sockets, Close::Fin);
            // The pumps are gone; drain through the control descriptors.
            let mut client = client_control.try_clone().ok().and_then(to_tokio);
            let mut upstream = upstream_control.try_clone().ok().and_then(to_tokio);
            tokio::join!(
                async {
                    if let Some(stream) = client.as_mut() {
                        drain(stream).await;
                    }
                },
                async {
                    if let Some(stream) = upstream.as_mut() {
                        drain(stream).await;
                    }
                }
            );
        }
    }
}

fn to_tokio(stream: std::net::TcpStream) -> Option<TcpStream> {
    TcpStream::from_std(stream).ok()
}

/// A write half whose drop does not send a FIN (tokio's does): a reset
/// must reach the peer as the first thing after the data, and a cut sends
/// its FIN itself.
struct NoFinOnDrop(Option<OwnedWriteHalf>);

impl Drop for NoFinOnDrop {
    fn drop(&mut self) {
        if let Some(half) = self.0.take() {
            half.forget();
        }
    }
}

/// A chunk on its way: when it may be written, and whether writing it
/// fires an armed fault.
struct Chunk {
    due: Instant,
    data: Bytes,
    fire: Option<Fire>,
}

/// The fault an armed byte count fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fire {
    Reset,
    Blackhole,
}

fn spawn_direction(
    pumps: &mut tokio::task::JoinSet<()>,
    shared: &Arc<Shared>,
    number: u64,
    direction: Direction,
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
) {
    let (chunk_tx, chunk_rx) = mpsc::channel(QUEUED_CHUNKS);
    pumps.spawn(read_side(Arc::clone(shared), direction, from, chunk_tx));
    pumps.spawn(write_side(
        Arc::clone(shared),
        number,
        direction,
        to,
        chunk_rx,
    ));
}

/// Waits while the proxy is blackholed; false once it is stopping.
async fn wait_flowing(shared: &Shared, changed: &mut watch::Receiver<u64>) -> bool {
    wait_unheld(shared, changed, None).await
}

/// Waits while the proxy is blackholed or, for `held` (a connection number
/// going up), while that connection is held; false once it is stopping.
async fn wait_unheld(
    shared: &Shared,
    changed: &mut watch::Receiver<u64>,
    held: Option<u64>,
) -> bool {
    loop {
        let state = shared.snapshot();
        if state.stopping {
            return false;
        }
        let holding = held.is_some_and(|number| number <= state.hold_up_through);
        if state.mode != Mode::Blackhole && !holding {
            return true;
        }
        if !next_change(changed).await {
            return false;
        }
    }
}

async fn read_side(
    shared: Arc<Shared>,
    direction: Direction,
    mut from: OwnedReadHalf,
    chunk_tx: mpsc::Sender<Chunk>,
) {
    let mut changed = shared.changed.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !wait_flowing(&shared, &mut changed).await {
            return;
        }
        // A blackhole starting while the read waits must stop it.
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return, // EOF: the writer passes it on
                Ok(n) => n,
            },
            alive = next_change(&mut changed) => {
                if !alive {
                    return;
                }
                continue;
            }
        };
        let (due, take, fire) = {
            let mut state = shared.lock();
            let delay = match direction {
                Direction::Up => state.delay_up,
                Direction::Down => state.delay_down,
            };
            let (mut take, mut fire) = (n, None);
            let blackhole = state.armed_blackhole;
            if let Some((up, down)) = state.armed.as_mut() {
                let left = match direction {
                    Direction::Up => up,
                    Direction::Down => down,
                };
                if n as u64 >= *left {
                    take = *left as usize;
                    fire = Some(if blackhole {
                        Fire::Blackhole
                    } else {
                        Fire::Reset
                    });
                    state.armed = None;
                } else {
                    *left -= n as u64;
                }
            }
            (Instant::now() + delay, take, fire)
        };
        let chunk = Chunk {
            due,
            data: Bytes::copy_from_slice(&buf[..take]),
            fire,
        };
        if chunk_tx.send(chunk).await.is_err() || fire == Some(Fire::Reset) {
            // After the byte that fires a reset, nothing more goes through.
            return;
        }
        if fire == Some(Fire::Blackhole) && take < n {
            // Held behind the blackhole the first chunk turns on.
            let rest = Chunk {
                due,
                data: Bytes::copy_from_slice(&buf[take..n]),
                fire: None,
            };
            if chunk_tx.send(rest).await.is_err() {
                return;
            }
        }
    }
}

async fn write_side(
    shared: Arc<Shared>,
    number: u64,
    direction: Direction,
    to: OwnedWriteHalf,
    mut chunk_rx: mpsc::Receiver<Chunk>,
) {
    let mut to = NoFinOnDrop(Some(to));
    let Some(to) = to.0.as_mut() else {
        return;
    };
    let mut changed = shared.changed.subscribe();
    let held = (direction == Direction::Up).then_some(number);
    while let Some(chunk) = chunk_rx.recv().await {
        tokio::time::sleep_until(chunk.due.into()).await;
        if !wait_unheld(&shared, &mut changed, held).await {
            return;
        }
        if to.write_all(&chunk.data).await.is_err() {
            return;
        }
        let counter = match direction {
            Direction::Up => &shared.bytes_up,
            Direction::Down => &shared.bytes_down,
        };
        counter.fetch_add(chunk.data.len() as u64, Ordering::SeqCst);
        if chunk.fire == Some(Fire::Blackhole) {
            let _ = to.flush().await;
            shared.update(|state| state.mode = Mode::Blackhole);
            shared.resets_fired.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        if chunk.fire == Some(Fire::Reset) {
            let _ = to.flush().await;
            shared.resets_fired.fetch_add(1, Ordering::SeqCst);
            shared.update(|state| {
                state.kill_epoch += 1;
                state.kill_close = Close::Rst;
            });
            // The connection task resets both sockets; hold this half so
            // that nothing closes them with a FIN first.
            std::future::pending::<()>().await;
        }
    }
    // The other side closed: pass the FIN on (after what a hold kept).
    if !wait_unheld(&shared, &mut changed, held).await {
        return;
    }
    let _ = to.shutdown().await;
}
