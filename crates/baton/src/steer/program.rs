//! The classic BPF program that picks, for each new connection, which
//! socket of a reuseport group gets it (`SO_ATTACH_REUSEPORT_CBPF`; no
//! privileges needed). Its return value is an index into the kernel's
//! array of the group's sockets, which baton mirrors.
//!
//! What it decides, in order:
//! 1. a connection from loopback (127.0.0.0/8 or ::1) whose source port is
//!    in baton's reserved probe range goes to the probe target (the
//!    candidate, else the active generation): that is how baton's
//!    readiness and health probes reach a generation no client can reach.
//!    Remote clients cannot pose as probes: the kernel drops packets with a
//!    loopback source that arrive on any other interface;
//! 2. else, with a canary, a random `share` percent goes to the candidate
//!    (per connection, not per client);
//! 3. everything else goes to the active generation.
//!
//! It reads only the network header, through `SKF_NET_OFF` (a load at a
//! positive offset would read the TCP payload, which a SYN does not have,
//! and abort the program with return value 0), and it always returns a
//! valid index: an index out of range would make the kernel spread the
//! connection over every socket of the group, dark and parked ones too.

use std::fmt;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Opcodes (linux/bpf_common.h, linux/filter.h).
const BPF_LD: u16 = 0x00;
const BPF_LDX: u16 = 0x01;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_H: u16 = 0x08;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_IND: u16 = 0x40;
const BPF_MSH: u16 = 0xa0;
const BPF_AND: u16 = 0x50;
const BPF_MOD: u16 = 0x90;
const BPF_JEQ: u16 = 0x10;
const BPF_JGT: u16 = 0x20;
const BPF_JGE: u16 = 0x30;
const BPF_K: u16 = 0x00;

/// Negative offsets the kernel maps to the network header and to
/// ancillary data.
const SKF_NET_OFF: u32 = (-0x100000i32) as u32;
const SKF_AD_OFF: u32 = (-0x1000i32) as u32;
const SKF_AD_RANDOM: u32 = 56;

/// Where new connections go, as indices into the group's socket array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routes {
    pub active: u32,
    /// The candidate's index and its share of ordinary connections.
    pub canary: Option<(u32, u8)>,
    /// Where probes from the reserved range go.
    pub probe: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The reserved source ports baton's probes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> Self {
        r.to_string()
    }
}

impl PortRange {
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad port range {s:?}: expected FIRST-LAST, e.g. 61000-61999");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || last < first {
            return Err(bad());
        }
        Ok(Self { first, last })
    }
}

/// A jump target not placed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Label(usize);

enum Target {
    Next,
    To(Label),
}

/// A tiny assembler: jumps to labels, resolved (forward only, within the
/// 255-instruction reach of classic BPF) when finished.
#[derive(Default)]
struct Asm {
    code: Vec<(u16, Option<Label>, Option<Label>, u32)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn place(&mut self, l: Label) {
        self.labels[l.0] = Some(self.code.len());
    }

    fn op(&mut self, code: u16, k: u32) {
        self.code.push((code, None, None, k));
    }

    fn jump(&mut self, code: u16, k: u32, jt: Target, jf: Target) {
        let t = |t: Target| match t {
            Target::Next => None,
            Target::To(l) => Some(l),
        };
        self.code.push((code, t(jt), t(jf), k));
    }

    fn finish(self) -> Vec<Insn> {
        let offset = |at: usize, l: Option<Label>| -> u8 {
            let Some(l) = l else { return 0 };
            let target = self.labels[l.0].expect("every label is placed");
            let delta = target - (at + 1);
            u8::try_from(delta).expect("jumps stay within 255 instructions")
        };
        self.code
            .iter()
            .enumerate()
            .map(|(i, &(code, jt, jf, k))| Insn {
                code,
                jt: offset(i, jt),
                jf: offset(i, jf),
                k,
            })
            .collect()
    }
}

/// The program for one reuseport group.
pub fn build(family: Family, routes: Routes, probes: PortRange) -> Vec<Insn> {
    let mut a = Asm::default();
    let ordinary = a.label();
    let probe = a.label();
    let ld_abs = |size: u16| BPF_LD | size | BPF_ABS;
    match family {
        Family::V4 => {
            // Source address in 127.0.0.0/8?
            a.op(ld_abs(BPF_W), SKF_NET_OFF + 12);
            a.op(BPF_ALU | BPF_AND | BPF_K, 0xff00_0000);
            a.jump(
                BPF_JMP | BPF_JEQ | BPF_K,
                0x7f00_0000,
                Target::Next,
                Target::To(ordinary),
            );
            // X = IPv4 header length; A = TCP source port.
            a.op(BPF_LDX | BPF_B | BPF_MSH, SKF_NET_OFF);
            a.op(BPF_LD | BPF_H | BPF_IND, SKF_NET_OFF);
        }
        Family::V6 => {
            // Source address ::1 (fixed header: addresses at 8 and 24)?
            for (off, want) in [(8, 0), (12, 0), (16, 0), (20, 1)] {
                a.op(ld_abs(BPF_W), SKF_NET_OFF + off);
                a.jump(
                    BPF_JMP | BPF_JEQ | BPF_K,
                    want,
                    Target::Next,
                    Target::To(ordinary),
                );
            }
            // TCP source port, right after the 40-byte header.
            a.op(ld_abs(BPF_H), SKF_NET_OFF + 40);
        }
    }
    a.jump(
        BPF_JMP | BPF_JGE | BPF_K,
        u32::from(probes.first),
        Target::Next,
        Target::To(ordinary),
    );
    a.jump(
        BPF_JMP | BPF_JGT | BPF_K,
        u32::from(probes.last),
        Target::To(ordinary),
        Target::To(probe),
    );
    a.place(probe);
    a.op(BPF_RET | BPF_K, routes.probe);
    a.place(ordinary);
    match routes.canary {
        Some((candidate, share)) if share > 0 => {
            let active = a.label();
            let canary = a.label();
            a.op(ld_abs(BPF_W), SKF_AD_OFF + SKF_AD_RANDOM);
            a.op(BPF_ALU | BPF_MOD | BPF_K, 100);
            a.jump(
                BPF_JMP | BPF_JGE | BPF_K,
                u32::from(share.min(100)),
                Target::To(active),
                Target::To(canary),
            );
            a.place(canary);
            a.op(BPF_RET | BPF_K, candidate);
            a.place(active);
            a.op(BPF_RET | BPF_K, routes.active);
        }
        _ => a.op(BPF_RET | BPF_K, routes.active),
    }
    a.finish()
}

#[cfg(test)]
pub(crate) mod interp {
    //! A classic BPF interpreter for the instructions [`build`] emits, run
    //! on a synthetic SYN: a network header, and the random number the
    //! kernel would supply.
    use super::*;

    pub struct Packet {
        pub net: Vec<u8>,
        pub random: u32,
    }

    impl Packet {
        pub fn v4(src: [u8; 4], sport: u16, random: u32) -> Self {
            let mut net = vec![0u8; 40];
            net[0] = 0x45; // version 4, IHL 5
            net[12..16].copy_from_slice(&src);
            net[20..22].copy_from_slice(&sport.to_be_bytes());
            Self { net, random }
        }

        pub fn v6(src: std::net::Ipv6Addr, sport: u16, random: u32) -> Self {
            let mut net = vec![0u8; 60];
            net[0] = 0x60;
            net[8..24].copy_from_slice(&src.octets());
            net[40..42].copy_from_slice(&sport.to_be_bytes());
            Self { net, random }
        }

        fn load(&self, off: u32, size: usize) -> Option<u32> {
            if off == SKF_AD_OFF + SKF_AD_RANDOM {
                return Some(self.random);
            }
            let off = off.checked_sub(SKF_NET_OFF)? as usize;
            let b = self.net.get(off..off + size)?;
            Some(b.iter().fold(0u32, |acc, x| (acc << 8) | u32::from(*x)))
        }
    }

    /// Runs `prog`; `None` where the kernel would abort (returning 0).
    pub fn run(prog: &[Insn], p: &Packet) -> Option<u32> {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        loop {
            let i = prog.get(pc)?;
            pc += 1;
            let size = |code: u16| match code & 0x18 {
                BPF_W => 4,
                BPF_H => 2,
                _ => 1,
            };
            match i.code {
                c if c & 0x07 == BPF_LD && c & 0xe0 == BPF_ABS => a = p.load(i.k, size(c))?,
                c if c & 0x07 == BPF_LD && c & 0xe0 == BPF_IND => {
                    a = p.load(i.k.wrapping_add(x), size(c))?
                }
                c if c == BPF_LDX | BPF_B | BPF_MSH => x = 4 * (p.load(i.k, 1)? & 0xf),
                c if c == BPF_ALU | BPF_AND | BPF_K => a &= i.k,
                c if c == BPF_ALU | BPF_MOD | BPF_K => a %= i.k,
                c if c & 0x07 == BPF_JMP => {
                    let taken = match c & 0xf0 {
                        BPF_JEQ => a == i.k,
                        BPF_JGT => a > i.k,
                        BPF_JGE => a >= i.k,
                        _ => return None,
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c if c == BPF_RET | BPF_K => return Some(i.k),
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::interp::{run, Packet};
    use super::*;
    use std::net::Ipv6Addr;

    const PROBES: PortRange = PortRange {
        first: 61000,
        last: 61999,
    };

    fn routes(active: u32, canary: Option<(u32, u8)>, probe: u32) -> Routes {
        Routes {
            active,
            canary,
            probe,
        }
    }

    #[test]
    fn probes_from_the_reserved_loopback_range_reach_the_probe_target() {
        for family in [Family::V4, Family::V6] {
            let prog = build(family, routes(0, None, 2), PROBES);
            let from = |port: u16, loopback: bool| match family {
                Family::V4 => Packet::v4(
                    if loopback {
                        [127, 0, 0, 1]
                    } else {
                        [10, 0, 0, 7]
                    },
                    port,
                    0,
                ),
                Family::V6 => Packet::v6(
                    if loopback {
                        Ipv6Addr::LOCALHOST
                    } else {
                        "2001:db8::7".parse().unwrap()
                    },
                    port,
                    0,
                ),
            };
            for port in [61000, 61500, 61999] {
                assert_eq!(run(&prog, &from(port, true)), Some(2), "{family:?} {port}");
                // The same port from elsewhere is an ordinary client.
                assert_eq!(run(&prog, &from(port, false)), Some(0), "{family:?} {port}");
            }
            for port in [1, 60999, 62000, 65535] {
                assert_eq!(run(&prog, &from(port, true)), Some(0), "{family:?} {port}");
            }
        }
        // Anywhere in 127.0.0.0/8 counts as loopback for v4.
        let prog = build(Family::V4, routes(0, None, 2), PROBES);
        assert_eq!(run(&prog, &Packet::v4([127, 9, 8, 7], 61001, 0)), Some(2));
        assert_eq!(run(&prog, &Packet::v4([128, 0, 0, 1], 61001, 0)), Some(0));
    }

    #[test]
    fn the_v4_program_honours_ip_options() {
        // IHL 6: the TCP header (and its source port) starts 4 bytes later.
        let prog = build(Family::V4, routes(0, None, 1), PROBES);
        let mut p = Packet::v4([127, 0, 0, 1], 0, 0);
        p.net[0] = 0x46;
        p.net[24..26].copy_from_slice(&61001u16.to_be_bytes());
        assert_eq!(run(&prog, &p), Some(1));
    }

    #[test]
    fn a_canary_takes_exactly_its_share_of_random_values() {
        for share in [0u8, 1, 10, 50, 99, 100] {
            let prog = build(Family::V4, routes(3, Some((1, share)), 1), PROBES);
            let to_candidate = (0..1000u32)
                .filter(|r| run(&prog, &Packet::v4([10, 0, 0, 1], 40000, *r)) == Some(1))
                .count();
            assert_eq!(to_candidate, usize::from(share) * 10, "share {share}");
            // Every other connection goes to the active socket.
            let to_active = (0..1000u32)
                .filter(|r| run(&prog, &Packet::v4([10, 0, 0, 1], 40000, *r)) == Some(3))
                .count();
            assert_eq!(to_active + to_candidate, 1000);
        }
    }

    #[test]
    fn every_path_returns_a_valid_index_and_never_reads_the_payload() {
        // All layouts of up to 6 sockets, every role assignment.
        for n in 1..=6u32 {
            for active in 0..n {
                for probe in 0..n {
                    for canary in [None, Some(((active + 1) % n, 30))] {
                        let r = routes(active, canary, probe);
                        for family in [Family::V4, Family::V6] {
                            let prog = build(family, r, PROBES);
                            assert!(prog.len() < 64);
                            for &(lo, port) in &[(true, 61000), (false, 61000), (true, 80)] {
                                for random in [0, 29, 30, 99, u32::MAX] {
                                    let p = match family {
                                        Family::V4 => Packet::v4(
                                            if lo { [127, 0, 0, 1] } else { [192, 0, 2, 1] },
                                            port,
                                            random,
                                        ),
                                        Family::V6 => Packet::v6(
                                            if lo {
                                                Ipv6Addr::LOCALHOST
                                            } else {
                                                "2001:db8::1".parse().unwrap()
                                            },
                                            port,
                                            random,
                                        ),
                                    };
                                    let got = run(&prog, &p).expect("no abort");
                                    assert!(got < n, "{r:?} {family:?}: index {got}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn port_ranges_parse_and_print() {
        let r: PortRange = "61000-61999".parse().unwrap();
        assert_eq!(r, PROBES);
        assert_eq!(r.to_string(), "61000-61999");
        for bad in ["", "61000", "0-10", "20-10", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }
}
