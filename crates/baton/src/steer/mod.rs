//! The listening sockets, and who gets each new connection.
//!
//! With steered traffic, every TCP listener is a reuseport group: one
//! socket per *slot*, all bound to the listener's address, and a classic
//! BPF program ([`program`]) that picks the socket for each new
//! connection by the machine's traffic plan. A generation takes a slot
//! when it first starts and keeps it through crash restarts; the slot goes
//! back to the pool once nothing of the generation runs, for a later
//! generation to take.
//!
//! Slots are never closed while baton runs. The kernel keeps a group's
//! sockets in an array that the program's return value indexes; closing
//! one moves the last socket into its place, and until the program is
//! replaced (a second system call later) connections could go to the wrong
//! socket, a dark or parked one among them. With a pool that only grows
//! (to as many generations as ever run at once: two or three), indices
//! never move. The price: socket options an app sets on its
//! listener stay for the slot's next tenant. A generation is drained only
//! once its sockets' queues are empty; anything that still lands there
//! after it has gone is reset when its slot is freed.
//!
//! Unix listeners, datagram (UDP) sockets (and every listener with
//! `traffic = "shared"`, or where the kernel refuses the program) are one
//! socket shared by every generation, as in the systemd model: whichever
//! process accepts (or reads) gets the connection (or the datagram).

pub mod program;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use baton_core::{GenId, TrafficMode, TrafficPlan};
use socket2::{Domain, Socket, Type};

use crate::config::{ListenAddr, ListenSpec};
use crate::handover::FdNum;
use crate::listener::{adopt, describe, BindError, InheritedSockets, Listener};
use program::{Family, PortRange, Routes};

/// One declared listener.
enum Endpoint {
    Shared(Listener),
    Steered(Group),
}

/// A reuseport group: a socket per slot on one address.
struct Group {
    name: String,
    address: SocketAddr,
    family: Family,
    /// `IPV6_V6ONLY` of the group's sockets: a member must match it to
    /// join (an inherited `[::]` socket may be dual-stack).
    v6only: bool,
    /// Slot 0's socket was passed in by a service manager.
    first_inherited: bool,
    /// The socket of each slot.
    sockets: Vec<Socket>,
    /// The kernel's array: the slot whose socket is at each index.
    members: Vec<usize>,
}

/// Every listening socket baton holds, and the traffic plan applied to
/// them.
pub struct Sockets {
    mode: TrafficMode,
    endpoints: Vec<Endpoint>,
    /// The generation holding each slot.
    slots: Vec<Option<GenId>>,
    plan: TrafficPlan,
    probes: PortRange,
    backlog: u32,
    /// Bumped whenever a listening socket is added, replaced or closed,
    /// so that a watcher of their hang-ups ([`crate::hup`]) looks again.
    version: u64,
}

/// The sockets as handed to a new baton image: descriptors by number,
/// with the layout that gives them meaning (the slots, the mirror of each
/// group's kernel array, the traffic plan in force).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SocketsState {
    mode: TrafficMode,
    endpoints: Vec<EndpointState>,
    slots: Vec<Option<GenId>>,
    plan: TrafficPlan,
    probes: PortRange,
    backlog: u32,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum EndpointState {
    Shared {
        name: String,
        address: ListenAddr,
        fd: FdNum,
        unix_file: Option<(std::path::PathBuf, u64)>,
        inherited: bool,
    },
    Steered {
        name: String,
        address: SocketAddr,
        v6only: bool,
        first_inherited: bool,
        fds: Vec<FdNum>,
        members: Vec<usize>,
    },
}

impl SocketsState {
    pub fn fds(&self) -> Vec<FdNum> {
        self.endpoints
            .iter()
            .flat_map(|e| match e {
                EndpointState::Shared { fd, .. } => vec![*fd],
                EndpointState::Steered { fds, .. } => fds.clone(),
            })
            .collect()
    }
}

/// What [`Sockets::recover_detached`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The active generation must be restarted on a fresh socket.
    pub restart_active: bool,
    /// Listeners whose storable socket is new.
    pub replaced: Vec<String>,
    /// Sockets that stopped listening and could not be replaced (yet).
    pub failed: usize,
}

/// What `baton status` shows of a listener.
pub struct SocketInfo {
    pub name: String,
    pub address: String,
    pub steered: bool,
    /// A datagram socket: shared by every generation, never steered.
    pub datagram: bool,
}

impl Sockets {
    /// Binds every declared listener, in order; the first failure wins and
    /// the ones already bound are closed. With steered traffic, TCP
    /// listeners get their first slot, and a program is attached to each
    /// group to check that the kernel takes it: if it does not, baton says
    /// why and shares the sockets instead.
    ///
    /// A listener whose name is among the `inherited` sockets (socket
    /// activation) takes that socket instead of binding. An inherited TCP
    /// socket is steered only if baton's own sockets can join its reuseport
    /// group (it has `SO_REUSEPORT`, and belongs to baton's user); otherwise
    /// baton says why and shares every socket instead.
    pub fn bind(
        specs: &[ListenSpec],
        backlog: u32,
        mode: TrafficMode,
        probes: PortRange,
        inherited: &mut InheritedSockets,
    ) -> Result<Self, BindError> {
        let mut endpoints = Vec::with_capacity(specs.len());
        let mut unsteerable = None;
        for spec in specs {
            let endpoint = match inherited.take(spec)? {
                Some(socket) => {
                    let adopted = adopt(spec, socket, backlog)?;
                    match (&adopted.address, mode) {
                        (ListenAddr::Tcp(addr), TrafficMode::Steered) => {
                            let addr = *addr;
                            match joinable(&adopted.socket, addr) {
                                Ok(v6only) => {
                                    let mut g =
                                        Group::new(spec.name.clone(), addr, v6only, adopted.socket);
                                    g.first_inherited = true;
                                    Endpoint::Steered(g)
                                }
                                Err(why) => {
                                    unsteerable.get_or_insert(format!(
                                        "the inherited socket named {} ({addr}) {why}",
                                        spec.name
                                    ));
                                    Endpoint::Shared(Listener::inherited(spec, adopted))
                                }
                            }
                        }
                        _ => Endpoint::Shared(Listener::inherited(spec, adopted)),
                    }
                }
                None => match (&spec.address, mode) {
                    (ListenAddr::Tcp(addr), TrafficMode::Steered) => {
                        let v6only = addr.is_ipv6();
                        let socket =
                            bind_member(*addr, backlog, v6only).map_err(|e| BindError {
                                name: spec.name.clone(),
                                address: spec.address.to_string(),
                                reason: describe(&e),
                            })?;
                        let address = socket
                            .local_addr()
                            .ok()
                            .and_then(|a| a.as_socket())
                            .unwrap_or(*addr);
                        Endpoint::Steered(Group::new(spec.name.clone(), address, v6only, socket))
                    }
                    _ => Endpoint::Shared(Listener::bind(spec, backlog)?),
                },
            };
            endpoints.push(endpoint);
        }
        let mut sockets = Self {
            mode,
            endpoints,
            slots: vec![None],
            plan: TrafficPlan::default(),
            probes,
            backlog,
            version: 0,
        };
        if let Some(why) = unsteerable {
            tracing::warn!(
                "steered traffic is unavailable ({why}): every generation shares each socket \
                 instead (no dark candidates, canary or bake)"
            );
            sockets.share();
        } else if sockets.groups().next().is_none() {
            sockets.mode = TrafficMode::Shared;
        } else if let Err(e) = sockets.attach_all() {
            tracing::warn!(
                "steered traffic is unavailable ({e}): every generation shares each socket \
                 instead (no dark candidates, canary or bake)"
            );
            sockets.share();
        }
        Ok(sockets)
    }

    /// The state for a new baton image, and the descriptors it names.
    pub fn hand_over(&self) -> (SocketsState, Vec<BorrowedFd<'_>>) {
        let mut fds = Vec::new();
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| match e {
                Endpoint::Shared(l) => {
                    fds.push(l.as_fd());
                    EndpointState::Shared {
                        name: l.name.clone(),
                        address: l.address.clone(),
                        fd: FdNum::of(l.as_fd()),
                        unix_file: l.unix_file().cloned(),
                        inherited: l.inherited,
                    }
                }
                Endpoint::Steered(g) => {
                    fds.extend(g.sockets.iter().map(|s| s.as_fd()));
                    EndpointState::Steered {
                        name: g.name.clone(),
                        address: g.address,
                        v6only: g.v6only,
                        first_inherited: g.first_inherited,
                        fds: g.sockets.iter().map(|s| FdNum::of(s.as_fd())).collect(),
                        members: g.members.clone(),
                    }
                }
            })
            .collect();
        let state = SocketsState {
            mode: self.mode,
            endpoints,
            slots: self.slots.clone(),
            plan: self.plan.clone(),
            probes: self.probes,
            backlog: self.backlog,
        };
        (state, fds)
    }

    /// The sockets a previous baton image handed over, exactly as they
    /// were: the kernel still has the same groups and program.
    pub fn take_over(state: SocketsState) -> io::Result<Self> {
        let endpoints = state
            .endpoints
            .into_iter()
            .map(|e| match e {
                EndpointState::Shared {
                    name,
                    address,
                    fd,
                    unix_file,
                    inherited,
                } => Ok(Endpoint::Shared(Listener::handed_over(
                    name,
                    address,
                    Socket::from(fd.take()?),
                    unix_file,
                    inherited,
                ))),
                EndpointState::Steered {
                    name,
                    address,
                    v6only,
                    first_inherited,
                    fds,
                    members,
                } => {
                    let sockets = fds
                        .into_iter()
                        .map(|fd| fd.take().map(Socket::from))
                        .collect::<io::Result<Vec<_>>>()?;
                    let mut rest = sockets.into_iter();
                    let first = rest
                        .next()
                        .ok_or_else(|| io::Error::other("a steered listener without sockets"))?;
                    let mut g = Group::new(name, address, v6only, first);
                    g.sockets.extend(rest);
                    g.first_inherited = first_inherited;
                    g.members = members;
                    Ok(Endpoint::Steered(g))
                }
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            mode: state.mode,
            endpoints,
            slots: state.slots,
            plan: state.plan,
            probes: state.probes,
            backlog: state.backlog,
            version: 0,
        })
    }

    /// The traffic mode in force (steered only if the kernel took it).
    pub fn mode(&self) -> TrafficMode {
        self.mode
    }

    pub fn probe_ports(&self) -> PortRange {
        self.probes
    }

    fn groups(&self) -> impl Iterator<Item = &Group> {
        self.endpoints.iter().filter_map(|e| match e {
            Endpoint::Steered(g) => Some(g),
            Endpoint::Shared(_) => None,
        })
    }

    fn groups_mut(&mut self) -> impl Iterator<Item = &mut Group> {
        self.endpoints.iter_mut().filter_map(|e| match e {
            Endpoint::Steered(g) => Some(g),
            Endpoint::Shared(_) => None,
        })
    }

    /// Falls back to shared sockets: each group's first socket serves
    /// every generation.
    fn share(&mut self) {
        self.mode = TrafficMode::Shared;
        self.version += 1;
        self.endpoints = std::mem::take(&mut self.endpoints)
            .into_iter()
            .map(|e| match e {
                Endpoint::Steered(mut g) => {
                    let socket = g.sockets.swap_remove(0);
                    let mut l = Listener::from_tcp(g.name, g.address, socket);
                    l.inherited = g.first_inherited;
                    Endpoint::Shared(l)
                }
                shared => shared,
            })
            .collect();
    }

    pub fn info(&self) -> Vec<SocketInfo> {
        self.endpoints
            .iter()
            .map(|e| match e {
                Endpoint::Shared(l) => SocketInfo {
                    name: l.name.clone(),
                    address: l.address.to_string(),
                    steered: false,
                    datagram: matches!(l.address, ListenAddr::Udp(_)),
                },
                Endpoint::Steered(g) => SocketInfo {
                    name: g.name.clone(),
                    address: g.address.to_string(),
                    steered: true,
                    datagram: false,
                },
            })
            .collect()
    }

    /// The sockets that belong in a service manager's fd store, by
    /// listener name: each listener's shared socket or its group's first
    /// (through which the group, and its queue, outlive baton), unless the
    /// manager passed it in and so holds it already.
    pub fn storable(&self) -> Vec<(&str, BorrowedFd<'_>)> {
        self.endpoints
            .iter()
            .filter_map(|e| match e {
                Endpoint::Shared(l) if !l.inherited => Some((l.name.as_str(), l.as_fd())),
                Endpoint::Steered(g) if !g.first_inherited => {
                    Some((g.name.as_str(), g.sockets[0].as_fd()))
                }
                _ => None,
            })
            .collect()
    }

    /// How many slots (sockets per steered listener) exist.
    pub fn slot_count(&self) -> usize {
        if self.mode == TrafficMode::Steered {
            self.slots.len()
        } else {
            0
        }
    }

    fn slot_of(&self, gen: GenId) -> Option<usize> {
        self.slots.iter().position(|t| *t == Some(gen))
    }

    /// The sockets `gen`'s processes get, as fds 3, 4, … in declared order
    /// (copies, closed after the spawn), with their names. With steered
    /// traffic the generation takes a slot first: a free one, or a new one
    /// (a new socket in every group, appended: no index moves).
    pub fn for_spawn(&mut self, gen: GenId) -> io::Result<Vec<(String, OwnedFd)>> {
        let slot = if self.mode == TrafficMode::Steered {
            Some(match self.slot_of(gen) {
                Some(slot) => slot,
                None => self.take_slot(gen)?,
            })
        } else {
            None
        };
        self.endpoints
            .iter()
            .map(|e| match (e, slot) {
                (Endpoint::Steered(g), Some(slot)) => Ok((
                    g.name.clone(),
                    g.sockets[slot].as_fd().try_clone_to_owned()?,
                )),
                (Endpoint::Steered(g), None) => {
                    Ok((g.name.clone(), g.sockets[0].as_fd().try_clone_to_owned()?))
                }
                (Endpoint::Shared(l), _) => Ok((l.name.clone(), l.as_fd().try_clone_to_owned()?)),
            })
            .collect()
    }

    fn take_slot(&mut self, gen: GenId) -> io::Result<usize> {
        if let Some(free) = self.slots.iter().position(Option::is_none) {
            self.slots[free] = Some(gen);
            self.apply(&self.plan.clone());
            return Ok(free);
        }
        let slot = self.slots.len();
        let backlog = self.backlog;
        for g in self.groups_mut() {
            let socket = bind_member(g.address, backlog, g.v6only)?;
            // listen() appended it to the group: the kernel's array grows
            // at the end, and the program, which names no index that
            // large, sends it nothing until the plan says so.
            g.sockets.push(socket);
            g.members.push(slot);
        }
        self.version += 1;
        self.slots.push(Some(gen));
        tracing::info!(
            slot,
            generation = gen.0,
            "new socket slot for steered traffic"
        );
        self.apply(&self.plan.clone());
        Ok(slot)
    }

    /// `gen` has ended: its slot goes back to the pool. Connections still
    /// queued in its sockets (a generation that died with clients waiting,
    /// or a handshake that completed after it stopped accepting) have
    /// nobody to serve them: they are reset at once, so their clients can
    /// retry, rather than left waiting for the slot's next tenant.
    pub fn free(&mut self, gen: GenId) {
        let Some(slot) = self.slot_of(gen) else {
            return;
        };
        self.slots[slot] = None;
        for g in self.groups() {
            let reset = reset_queued(&g.sockets[slot]);
            if reset > 0 {
                tracing::warn!(
                    listener = %g.name,
                    generation = gen.0,
                    reset,
                    "connections left queued by an ended generation were reset"
                );
            }
        }
    }

    /// `to` takes `from`'s place (an upgrade without overlap): `from`'s
    /// slot becomes `to`'s, with every connection waiting in its sockets,
    /// which `to` accepts once it runs (it has not run yet, so it holds no
    /// slot of its own). Nothing is reset. A generation without a slot
    /// passes nothing; `to` then takes one when it spawns.
    pub fn pass(&mut self, from: GenId, to: GenId) {
        let Some(slot) = self.slot_of(from) else {
            return;
        };
        self.slots[slot] = Some(to);
        tracing::debug!(
            slot,
            from = from.0,
            to = to.0,
            "socket slot handed over with its queue"
        );
    }

    /// Copies of `gen`'s steered sockets, to watch their queues.
    pub fn watch_fds(&self, gen: GenId) -> Vec<OwnedFd> {
        let Some(slot) = self.slot_of(gen) else {
            return Vec::new();
        };
        self.groups()
            .filter_map(|g| g.sockets[slot].as_fd().try_clone_to_owned().ok())
            .collect()
    }

    /// Where a probe connects to reach the probe target through the kernel's
    /// choice: the first steered listener's address (its loopback form, for
    /// a wildcard).
    pub fn probe_addr(&self) -> Option<SocketAddr> {
        let g = self.groups().next()?;
        let ip = match g.address.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Some(SocketAddr::new(ip, g.address.port()))
    }

    /// Applies the traffic plan: a new program for every group.
    pub fn apply(&mut self, plan: &TrafficPlan) {
        self.plan = plan.clone();
        if self.mode != TrafficMode::Steered {
            return;
        }
        if let Err(e) = self.attach_all() {
            tracing::error!("steering new connections: {e}");
        }
    }

    fn attach_all(&self) -> io::Result<()> {
        let slot = |gen: Option<GenId>| gen.and_then(|g| self.slot_of(g));
        let active = slot(self.plan.active);
        let candidate = self
            .plan
            .candidate
            .and_then(|c| slot(Some(c.gen)).map(|s| (s, c.share)));
        let probe = slot(self.plan.probe_target());
        for g in self.groups() {
            let index = |slot: usize| -> Option<u32> {
                g.members.iter().position(|m| *m == slot).map(|i| i as u32)
            };
            // Before the first spawn nobody holds a slot: slot 0 (the first
            // generation's to be) takes everything, queued for it.
            let active = active.and_then(index).unwrap_or(0);
            let routes = Routes {
                active,
                canary: candidate.and_then(|(s, share)| Some((index(s)?, share))),
                probe: probe.and_then(index).unwrap_or(active),
            };
            let prog = program::build(g.family, routes, self.probes);
            let insns: Vec<baton_sys::SockFilter> = prog
                .iter()
                .map(|i| baton_sys::SockFilter {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect();
            // The program belongs to the whole group; any listening member
            // can attach it.
            let member = &g.sockets[g.members[0]];
            baton_sys::attach_reuseport_cbpf(member.as_fd(), &insns).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("listener {} ({}): {e}", g.name, g.address),
                )
            })?;
        }
        Ok(())
    }

    /// An app that calls `shutdown()` on its copy of a listening socket
    /// stops it listening for every holder, and takes it out of its group
    /// (moving another socket into its index). `listen()` on it again
    /// succeeds but, as of Linux 6.18, the socket still refuses every
    /// connection, so it is replaced by a fresh one on the same address
    /// (the mirror and the program follow). Returns true when the socket
    /// replaced was carrying live traffic (a shared one, or the active
    /// generation's): no running process holds the fresh one, so the active
    /// generation must be restarted on it; connections queue there
    /// meanwhile. Also names the listeners whose [`Sockets::storable`]
    /// socket was replaced, for the fd store.
    pub fn recover_detached(&mut self) -> Recovered {
        let backlog = self.backlog;
        let active_slot = self.plan.active.and_then(|g| self.slot_of(g));
        let mut live = false;
        let mut changed = false;
        let mut replaced = Vec::new();
        let mut failed = 0;
        for e in &mut self.endpoints {
            match e {
                Endpoint::Shared(l) => {
                    let ListenAddr::Tcp(addr) = l.address else {
                        continue;
                    };
                    if accepting(l.as_fd()) {
                        continue;
                    }
                    tracing::error!(
                        listener = %l.name,
                        "the socket stopped listening (an app called shutdown() on it): \
                         replacing it; the active generation is restarted on the fresh one"
                    );
                    match bind_shared(addr, backlog) {
                        Ok(socket) => {
                            *l = Listener::from_tcp(l.name.clone(), addr, socket);
                            replaced.push(l.name.clone());
                            live = true;
                        }
                        Err(err) => {
                            tracing::error!(listener = %l.name, "replacing it: {err}");
                            failed += 1;
                        }
                    }
                }
                Endpoint::Steered(g) => {
                    for slot in 0..g.sockets.len() {
                        if accepting(g.sockets[slot].as_fd()) {
                            continue;
                        }
                        tracing::warn!(
                            listener = %g.name,
                            slot,
                            "a socket stopped listening (an app called shutdown() on it): \
                             replacing it"
                        );
                        // The kernel took it out of the group, moving the
                        // last socket into its index.
                        if let Some(i) = g.members.iter().position(|m| *m == slot) {
                            g.members.swap_remove(i);
                        }
                        match bind_member(g.address, backlog, g.v6only) {
                            Ok(socket) => {
                                g.sockets[slot] = socket;
                                g.members.push(slot);
                                live |= active_slot == Some(slot);
                                if slot == 0 {
                                    g.first_inherited = false;
                                    replaced.push(g.name.clone());
                                }
                            }
                            Err(err) => {
                                tracing::error!(listener = %g.name, slot, "replacing it: {err}");
                                failed += 1;
                            }
                        }
                        changed = true;
                    }
                }
            }
        }
        if changed || !replaced.is_empty() || live {
            self.version += 1;
        }
        if changed {
            self.apply(&self.plan.clone());
        }
        Recovered {
            restart_active: live,
            replaced,
            failed,
        }
    }

    /// Closes every socket: baton is stopping.
    pub fn close(&mut self) {
        for g in self.groups() {
            let waiting: u32 = g
                .sockets
                .iter()
                .filter_map(|s| baton_sys::tcp_accept_queue_len(s.as_fd()).ok())
                .sum();
            if waiting > 0 {
                tracing::warn!(
                    listener = %g.name,
                    waiting,
                    "closing sockets with connections still queued: they are reset"
                );
            }
        }
        self.endpoints.clear();
        self.version += 1;
    }

    /// Changes whenever a listening socket is added, replaced or closed.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Every listening TCP socket baton holds: the ones an app's
    /// `shutdown()` can stop listening ([`Self::recover_detached`]).
    pub fn tcp_listeners(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = Vec::new();
        for e in &self.endpoints {
            match e {
                Endpoint::Shared(l) if matches!(l.address, ListenAddr::Tcp(_)) => {
                    fds.push(l.as_fd())
                }
                Endpoint::Shared(_) => {}
                Endpoint::Steered(g) => fds.extend(g.sockets.iter().map(|s| s.as_fd())),
            }
        }
        fds
    }
}

/// Accepts and resets every connection waiting in `socket`'s queue; the
/// socket is left in blocking mode, as the next generation may expect.
fn reset_queued(socket: &Socket) -> usize {
    if !matches!(baton_sys::tcp_accept_queue_len(socket.as_fd()), Ok(n) if n > 0) {
        return 0;
    }
    let mut reset = 0;
    if socket.set_nonblocking(true).is_ok() {
        while let Ok((conn, _)) = socket.accept() {
            // Closed with a reset: the client learns at once.
            let _ = conn.set_linger(Some(std::time::Duration::ZERO));
            reset += 1;
        }
        let _ = socket.set_nonblocking(false);
    }
    reset
}

fn accepting(fd: BorrowedFd<'_>) -> bool {
    nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn).unwrap_or(true)
}

/// A shared listening socket on `addr` (one that replaces a shut-down one).
fn bind_shared(addr: SocketAddr, backlog: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket)
}

impl Group {
    fn new(name: String, address: SocketAddr, v6only: bool, first: Socket) -> Self {
        Self {
            name,
            address,
            family: if address.is_ipv4() {
                Family::V4
            } else {
                Family::V6
            },
            v6only,
            first_inherited: false,
            sockets: vec![first],
            members: vec![0],
        }
    }
}

/// A new member of a reuseport group on `addr`.
fn bind_member(addr: SocketAddr, backlog: u32, v6only: bool) -> io::Result<Socket> {
    let socket = unlistened_member(addr, v6only)?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket)
}

/// A socket bound to `addr` with `SO_REUSEPORT`, not listening yet: not in
/// the group, so the kernel sends it nothing.
fn unlistened_member(addr: SocketAddr, v6only: bool) -> io::Result<Socket> {
    // socket2 creates the socket close-on-exec.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // [::]:80 means IPv6 only by default (a separate 0.0.0.0 listener
        // serves v4); an inherited socket's setting is kept.
        socket.set_only_v6(v6only)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Whether sockets baton binds can join the reuseport group of `socket`,
/// inherited and listening on `addr`: it must have `SO_REUSEPORT`, and the
/// kernel lets only the same user join. Tried with a bind that is never
/// followed by `listen()`, so the trial socket never joins the group (and
/// no connection can land in it). Returns the `IPV6_V6ONLY` setting new
/// members must share.
fn joinable(socket: &Socket, addr: SocketAddr) -> Result<bool, String> {
    match socket.reuse_port() {
        Ok(true) => {}
        Ok(false) => {
            return Err("has no SO_REUSEPORT (set ReusePort=yes in the .socket unit)".into())
        }
        Err(e) => return Err(format!("cannot be inspected: {}", describe(&e))),
    }
    let v6only = addr.is_ipv6() && socket.only_v6().unwrap_or(true);
    match unlistened_member(addr, v6only) {
        Ok(_trial) => Ok(v6only),
        Err(e) => Err(format!(
            "cannot be joined by baton's own sockets: {} (it belongs to another user: \
             run baton as the user that created it)",
            describe(&e)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::Candidate;
    use std::net::TcpStream;

    fn spec() -> ListenSpec {
        "http=127.0.0.1:0".parse().unwrap()
    }

    fn ports() -> PortRange {
        PortRange {
            first: 61000,
            last: 61999,
        }
    }

    /// Which of `fds` received a connection just made.
    fn landed(fds: &[(GenId, OwnedFd)]) -> Vec<GenId> {
        fds.iter()
            .filter(|(_, fd)| baton_sys::tcp_accept_queue_len(fd.as_fd()).unwrap_or(0) > 0)
            .map(|(g, _)| *g)
            .collect()
    }

    fn drain_queues(fds: &[(GenId, OwnedFd)]) {
        for (_, fd) in fds {
            let s = socket2::SockRef::from(fd);
            s.set_nonblocking(true).unwrap();
            while s.accept().is_ok() {}
            s.set_nonblocking(false).unwrap();
        }
    }

    fn plan(active: u64, candidate: Option<(u64, u8)>) -> TrafficPlan {
        TrafficPlan {
            active: Some(GenId(active)),
            candidate: candidate.map(|(g, share)| Candidate {
                gen: GenId(g),
                share,
            }),
            parked: None,
        }
    }

    /// Without overlap the new generation takes the old one's slot: the
    /// connections queued there are not reset when the old one ends, the
    /// new one gets that very socket, and new connections keep landing in
    /// it.
    #[test]
    fn a_handed_over_slot_keeps_its_queue() {
        let mut s = Sockets::bind(
            &[spec()],
            64,
            TrafficMode::Steered,
            ports(),
            &mut InheritedSockets::default(),
        )
        .unwrap();
        let addr = s.probe_addr().unwrap();
        let old = s.for_spawn(GenId(1)).unwrap().remove(0).1;
        s.apply(&plan(1, None));
        let queued: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let waiting = |fd: &OwnedFd| baton_sys::tcp_accept_queue_len(fd.as_fd()).unwrap();
        wait_for(|| waiting(&old) == 3);
        s.pass(GenId(1), GenId(2));
        s.apply(&plan(2, None));
        // The old generation no longer holds the slot: freeing it (the
        // machine does not even ask) resets nothing.
        s.free(GenId(1));
        assert_eq!(waiting(&old), 3, "handed over: nothing reset");
        let new = s.for_spawn(GenId(2)).unwrap().remove(0).1;
        let inode = |fd: &OwnedFd| {
            use std::os::fd::AsRawFd;
            std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
        };
        assert_eq!(inode(&new), inode(&old), "the very same socket");
        let _more = TcpStream::connect(addr).unwrap();
        wait_for(|| waiting(&new) == 4);
        assert_eq!(s.slot_count(), 1, "no new slot was needed");
        s.free(GenId(2));
        assert_eq!(waiting(&new), 0, "positive control: a freed slot is reset");
        drop(queued);
    }

    /// Polls `cond` for up to 2 s (the kernel completes handshakes
    /// asynchronously).
    fn wait_for(mut cond: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if cond() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("condition not met within 2 s");
    }

    /// The kernel's array of a group, mirrored: connections land on the
    /// socket the plan names, also after a member left the group (an app's
    /// `shutdown()`) and the mirror had to follow the kernel moving the last
    /// socket into its index.
    #[test]
    fn the_mirror_follows_the_kernel() {
        let mut s = Sockets::bind(
            &[spec()],
            64,
            TrafficMode::Steered,
            ports(),
            &mut InheritedSockets::default(),
        )
        .unwrap();
        assert_eq!(
            s.mode(),
            TrafficMode::Steered,
            "the kernel takes the program"
        );
        let addr = s.probe_addr().unwrap();
        let fds: Vec<(GenId, OwnedFd)> = (1..=3)
            .map(|g| {
                let mut v = s.for_spawn(GenId(g)).unwrap();
                (GenId(g), v.remove(0).1)
            })
            .collect();
        assert_eq!(s.slot_count(), 3);
        // Five new connections under plan `p` all land in `want`'s socket
        // (of those in `fds`).
        let check_in =
            |fds: &[(GenId, OwnedFd)], s: &mut Sockets, p: TrafficPlan, want: u64, when: &str| {
                s.apply(&p);
                for _ in 0..5 {
                    let _c = TcpStream::connect(addr).unwrap();
                    // The handshake is done by the kernel; the queue shows where.
                    let mut got = Vec::new();
                    for _ in 0..200 {
                        got = landed(fds);
                        if !got.is_empty() {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    assert_eq!(got, vec![GenId(want)], "{when}plan {p:?}");
                    drain_queues(fds);
                }
            };
        let check = |s: &mut Sockets, p, want| check_in(&fds, s, p, want, "");
        check(&mut s, plan(3, None), 3);
        check(&mut s, plan(1, None), 1);
        // Generation 1's app shuts its socket down: the kernel takes it out
        // of the group and moves the last socket (slot 2) into index 0.
        s.apply(&plan(3, None));
        let victim = socket2::SockRef::from(&fds[0].1);
        victim.shutdown(std::net::Shutdown::Read).unwrap();
        assert!(
            !s.recover_detached().restart_active,
            "slot 0 carried no live traffic: nothing to restart"
        );
        // Slot 0 has a fresh socket, which generation 1's copy is not: the
        // others must still be found where the plan says.
        let fds_now: Vec<(GenId, OwnedFd)> = fds[1..]
            .iter()
            .map(|(g, fd)| (*g, fd.as_fd().try_clone_to_owned().unwrap()))
            .collect();
        let check_now =
            |s: &mut Sockets, p, want| check_in(&fds_now, s, p, want, "after recovery, ");
        check_now(&mut s, plan(3, None), 3);
        check_now(&mut s, plan(2, None), 2);
        // A 100% canary is the candidate's too.
        check_now(&mut s, plan(2, Some((3, 100))), 3);
        // The active generation's own socket shut down: baton must restart
        // it on the fresh one.
        let active = socket2::SockRef::from(&fds_now[0].1);
        active.shutdown(std::net::Shutdown::Read).unwrap();
        assert!(
            s.recover_detached().restart_active,
            "the active slot carried live traffic"
        );
    }
}
