//! Packet capture on the wire between nodes, and a pcap reader to summarise it.
//!
//! Capture tools deliver packets to their file in batches (up to a second late), so stopping
//! one right after the traffic of interest could silently lose that traffic, and a "no clear
//! bytes on the wire" assertion would then pass for the wrong reason. [`Capture::stop`]
//! therefore sends a unique sentinel datagram across the bridge and waits until the sentinel
//! is in the file before stopping: everything that crossed the wire before it is in the file
//! too. Starting works the same way: a capture counts as started once a first sentinel has
//! reached the file.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::netns::in_netns;
use crate::process::ChildGuard;
use crate::sys::{child_path, find_tool, MARKER_ENV};
use crate::wait::wait_until;

/// How long a capture tool may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the sentinel may take to reach the capture file.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the sentinel is resent while waiting (the first may wait on ARP).
const SENTINEL_INTERVAL: Duration = Duration::from_millis(200);
/// How long the capture tool gets to finish its file after SIGINT.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A capture running on the inter-node bridge; stop it with [`Capture::stop`]. Dropping it
/// without stopping kills the capture tool.
#[derive(Debug)]
pub struct Capture {
    child: ChildGuard,
    file: PathBuf,
    /// Namespace of the bridge, from which the sentinel is sent.
    netns: String,
    /// The bridge's own address (sentinel source; excluded from summaries).
    bridge_ip: Ipv4Addr,
    /// Where the sentinel is sent: a node's wire address, port 9 (discard).
    sentinel_to: SocketAddrV4,
}

impl Capture {
    /// Starts `dumpcap` (from the tshark package) or else `tcpdump` on `iface` inside `netns`,
    /// and returns once the tool reports that it is capturing.
    pub(crate) fn start(
        netns: &str,
        iface: &str,
        prefix: &str,
        log_dir: &Path,
        bridge_ip: Ipv4Addr,
        sentinel_to: SocketAddrV4,
    ) -> Result<Self> {
        let file = log_dir.join(format!("{iface}-{}.pcap", unique_suffix()));
        let file_arg = file.to_string_lossy().into_owned();
        let (tool, args): (PathBuf, Vec<&str>) = if let Some(dumpcap) = find_tool("dumpcap") {
            // -P: classic pcap, which parse_pcap reads; -q: no per-packet counts on stderr.
            (dumpcap, vec!["-i", iface, "-P", "-q", "-w", &file_arg])
        } else if let Some(tcpdump) = find_tool("tcpdump") {
            (
                tcpdump,
                vec![
                    "-i",
                    iface,
                    "-n",
                    "-U",
                    "--immediate-mode",
                    "-s",
                    "0",
                    "-w",
                    &file_arg,
                ],
            )
        } else {
            bail!("no capture tool: install tshark (`apt-get install tshark`) or tcpdump");
        };
        let ip = find_tool("ip").context("`ip` not found: install iproute2")?;
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", netns])
            .arg(&tool)
            .args(&args)
            .env(MARKER_ENV, prefix)
            .env("PATH", child_path());
        let label = format!("capture-{}", unique_suffix());
        let mut child = ChildGuard::spawn(cmd, &label, log_dir)?;
        wait_until(
            &format!("{} to start capturing on {iface}", tool.display()),
            START_TIMEOUT,
            || {
                let err = child.stderr();
                if err.contains("Capturing on") || err.contains("listening on") {
                    return Ok(true);
                }
                if !child.is_running() {
                    bail!("capture tool exited: {}", err.trim());
                }
                Ok(false)
            },
        )?;
        let mut capture = Capture {
            child,
            file,
            netns: netns.to_owned(),
            bridge_ip,
            sentinel_to,
        };
        // "Capturing on" is printed before the tool has finished setting up (libpcap drains
        // the socket when it installs its filter), so only a packet seen in the file proves
        // that what follows will be recorded.
        capture.flush_through("start")?;
        Ok(capture)
    }

    /// Path of the pcap file being written.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Sends a unique sentinel datagram across the bridge until it shows up in the capture
    /// file: then everything that crossed the bridge before it is in the file too.
    fn flush_through(&mut self, phase: &str) -> Result<()> {
        let sentinel = format!("e2e-capture-sentinel-{phase}-{}", unique_suffix());
        let bridge_ip = self.bridge_ip;
        let socket = in_netns(&self.netns, move || {
            UdpSocket::bind(SocketAddrV4::new(bridge_ip, 0))
        })?
        .with_context(|| format!("bind a udp socket on {bridge_ip} in {}", self.netns))?;
        let deadline = Instant::now() + SENTINEL_TIMEOUT;
        let mut next_send = Instant::now();
        loop {
            if Instant::now() >= next_send {
                socket
                    .send_to(sentinel.as_bytes(), self.sentinel_to)
                    .with_context(|| {
                        format!("send the capture sentinel to {}", self.sentinel_to)
                    })?;
                next_send = Instant::now() + SENTINEL_INTERVAL;
            }
            let raw = std::fs::read(&self.file).unwrap_or_default();
            if contains(&raw, sentinel.as_bytes()) {
                return Ok(());
            }
            if !self.child.is_running() {
                bail!("capture tool exited early: {}", self.child.stderr().trim());
            }
            if Instant::now() >= deadline {
                bail!(
                    "capture sentinel ({phase}) did not reach {} within {SENTINEL_TIMEOUT:?}",
                    self.file.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Flushes (see the module docs), stops the capture and summarises what crossed the wire.
    pub fn stop(mut self) -> Result<CaptureSummary> {
        self.flush_through("stop")?;
        let _ = self.child.signal(Signal::SIGINT);
        if self.child.wait_timeout(STOP_GRACE)?.is_none() {
            self.child.kill()?;
        }
        let raw =
            std::fs::read(&self.file).with_context(|| format!("read {}", self.file.display()))?;
        let bridge_ip = self.bridge_ip;
        let mut summary = CaptureSummary::from_pcap(raw)?;
        summary
            .packets
            .retain(|p| *p.src.ip() != bridge_ip && *p.dst.ip() != bridge_ip);
        Ok(summary)
    }
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos:x}", std::process::id())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Transport protocol of a captured IPv4 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
    /// Any other IP protocol number.
    Other(u8),
}

/// One captured IPv4 packet. Ports are 0 for protocols without ports and for non-first
/// fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Transport protocol.
    pub proto: Proto,
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// Transport payload length in bytes.
    pub payload_len: usize,
}

impl Packet {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    /// A TCP connection attempt: SYN without ACK.
    pub fn is_syn(&self) -> bool {
        self.proto == Proto::Tcp
            && self.tcp_flags & Self::SYN != 0
            && self.tcp_flags & Self::ACK == 0
    }
}

/// What a capture saw.
#[derive(Clone, Debug)]
pub struct CaptureSummary {
    /// Every IPv4 packet, in capture order (the harness's sentinel removed).
    pub packets: Vec<Packet>,
    /// Frames that were not IPv4 (ARP, …).
    pub other_frames: usize,
    raw: Vec<u8>,
}

impl CaptureSummary {
    /// Summarises a pcap file's bytes.
    pub fn from_pcap(raw: Vec<u8>) -> Result<Self> {
        let (packets, other_frames) = parse_pcap(&raw)?;
        Ok(CaptureSummary {
            packets,
            other_frames,
            raw,
        })
    }

    /// The set of (protocol, destination port) over all packets (replies included, so
    /// clients' ephemeral ports appear too; see [`CaptureSummary::tcp_connections`]).
    pub fn dst_ports(&self) -> BTreeSet<(Proto, u16)> {
        self.packets
            .iter()
            .map(|p| (p.proto, p.dst.port()))
            .collect()
    }

    /// TCP connections opened across the wire, as (client, server) from their SYNs.
    pub fn tcp_connections(&self) -> BTreeSet<(SocketAddrV4, SocketAddrV4)> {
        self.packets
            .iter()
            .filter(|p| p.is_syn())
            .map(|p| (p.src, p.dst))
            .collect()
    }

    /// The server ports of the TCP connections opened across the wire.
    pub fn tcp_server_ports(&self) -> BTreeSet<u16> {
        self.tcp_connections()
            .into_iter()
            .map(|(_, server)| server.port())
            .collect()
    }

    /// Whether `marker` appears anywhere in the captured bytes (e.g. plaintext that should, or
    /// should not, have crossed the wire in clear).
    pub fn contains(&self, marker: &[u8]) -> bool {
        contains(&self.raw, marker)
    }

    /// The pcap file's bytes.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

/// Link types understood by [`parse_pcap`].
const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;
const LINKTYPE_LINUX_SLL: u32 = 113;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_VLAN: [u16; 2] = [0x8100, 0x88a8];

/// Parses a classic pcap file into its IPv4 packets and a count of other frames. A record cut
/// short at the end (a capture killed mid-write) ends the parse without error.
pub fn parse_pcap(raw: &[u8]) -> Result<(Vec<Packet>, usize)> {
    let Some(magic) = raw.get(0..4) else {
        bail!("pcap file too short for a header ({} bytes)", raw.len());
    };
    let big_endian = match magic {
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
        [0x0a, 0x0d, 0x0d, 0x0a] => bail!("pcapng is not supported: capture with -P"),
        other => bail!("not a pcap file (magic {other:02x?})"),
    };
    let read_u32 = |at: usize| -> Option<u32> {
        let bytes: [u8; 4] = raw.get(at..at + 4)?.try_into().ok()?;
        Some(if big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    };
    let linktype = read_u32(20).context("pcap header cut short")?;
    if ![LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL].contains(&linktype) {
        bail!("unsupported pcap link type {linktype}");
    }
    let mut packets = Vec::new();
    let mut other = 0;
    let mut at = 24;
    while let Some(incl_len) = read_u32(at + 8) {
        let start = at + 16;
        let Some(frame) = usize::try_from(incl_len)
            .ok()
            .and_then(|len| raw.get(start..start.checked_add(len)?))
        else {
            break;
        };
        match ipv4_payload(linktype, frame).and_then(parse_ipv4) {
            Some(packet) => packets.push(packet),
            None => other += 1,
        }
        at = start + frame.len();
    }
    Ok((packets, other))
}

/// The IPv4 header onwards, if the frame carries IPv4.
fn ipv4_payload(linktype: u32, frame: &[u8]) -> Option<&[u8]> {
    let be16 = |b: &[u8], at: usize| -> Option<u16> {
        Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
    };
    match linktype {
        LINKTYPE_ETHERNET => {
            let mut offset = 12;
            let mut ethertype = be16(frame, offset)?;
            while ETHERTYPE_VLAN.contains(&ethertype) {
                offset += 4;
                ethertype = be16(frame, offset)?;
            }
            (ethertype == ETHERTYPE_IPV4).then(|| frame.get(offset + 2..))?
        }
        LINKTYPE_LINUX_SLL => (be16(frame, 14)? == ETHERTYPE_IPV4).then(|| frame.get(16..))?,
        LINKTYPE_RAW => (frame.first()? >> 4 == 4).then_some(frame),
        _ => None,
    }
}

fn parse_ipv4(ip: &[u8]) -> Option<Packet> {
    if ip.first()? >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(ip.first()? & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let fragment_offset = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x1fff;
    let protocol = *ip.get(9)?;
    let src = Ipv4Addr::new(*ip.get(12)?, *ip.get(13)?, *ip.get(14)?, *ip.get(15)?);
    let dst = Ipv4Addr::new(*ip.get(16)?, *ip.get(17)?, *ip.get(18)?, *ip.get(19)?);
    // Segmentation offload can hand the capture a super-packet whose total length field is 0.
    let total_len = if total_len == 0 { ip.len() } else { total_len };
    let l4 = ip.get(header_len..)?;
    let l4_len = total_len.saturating_sub(header_len);
    let port = |at: usize| -> u16 {
        if fragment_offset != 0 {
            return 0;
        }
        l4.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .unwrap_or(0)
    };
    let (proto, src_port, dst_port, tcp_flags, payload_len) = match protocol {
        6 => {
            let data_offset = l4.get(12).map(|b| usize::from(b >> 4) * 4).unwrap_or(0);
            let flags = l4.get(13).copied().unwrap_or(0);
            (
                Proto::Tcp,
                port(0),
                port(2),
                flags,
                l4_len.saturating_sub(data_offset),
            )
        }
        17 => (Proto::Udp, port(0), port(2), 0, l4_len.saturating_sub(8)),
        1 => (Proto::Icmp, 0, 0, 0, l4_len.saturating_sub(8)),
        other => (Proto::Other(other), 0, 0, 0, l4_len),
    };
    Some(Packet {
        proto,
        src: SocketAddrV4::new(src, src_port),
        dst: SocketAddrV4::new(dst, dst_port),
        tcp_flags,
        payload_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian classic pcap file with Ethernet frames.
    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xa1b2_c3d4_u32.to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&65535u32.to_le_bytes());
        out.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        for frame in frames {
            out.extend_from_slice(&[0; 8]);
            let len = u32::try_from(frame.len()).expect("small frame");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(frame);
        }
        out
    }

    fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0xaa; 12];
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn ipv4(protocol: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let total = u16::try_from(20 + l4.len()).expect("small packet");
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(l4);
        ip
    }

    fn tcp(src_port: u16, dst_port: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut seg = Vec::new();
        seg.extend_from_slice(&src_port.to_be_bytes());
        seg.extend_from_slice(&dst_port.to_be_bytes());
        seg.extend_from_slice(&[0; 8]);
        seg.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        seg.extend_from_slice(payload);
        seg
    }

    fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
        let len = u16::try_from(8 + payload.len()).expect("small datagram");
        let mut dgram = Vec::new();
        dgram.extend_from_slice(&src_port.to_be_bytes());
        dgram.extend_from_slice(&dst_port.to_be_bytes());
        dgram.extend_from_slice(&len.to_be_bytes());
        dgram.extend_from_slice(&[0, 0]);
        dgram.extend_from_slice(payload);
        dgram
    }

    const CLIENT: [u8; 4] = [10, 244, 1, 2];
    const SERVER: [u8; 4] = [10, 244, 2, 2];

    #[test]
    fn a_tcp_exchange_summarises_as_one_connection_to_its_server_port() {
        let frames = [
            ethernet(
                0x0800,
                &ipv4(6, CLIENT, SERVER, &tcp(40000, 15008, 0x02, b"")),
            ),
            ethernet(
                0x0800,
                &ipv4(6, SERVER, CLIENT, &tcp(15008, 40000, 0x12, b"")),
            ),
            ethernet(
                0x0800,
                &ipv4(6, CLIENT, SERVER, &tcp(40000, 15008, 0x18, b"secret")),
            ),
            ethernet(0x0806, &[0; 28]),
            ethernet(0x0800, &ipv4(17, CLIENT, SERVER, &udp(5353, 53, b"q"))),
        ];
        let summary = CaptureSummary::from_pcap(pcap(&frames)).expect("parses");
        assert_eq!(summary.packets.len(), 4);
        assert_eq!(summary.other_frames, 1);
        let client = SocketAddrV4::new(CLIENT.into(), 40000);
        let server = SocketAddrV4::new(SERVER.into(), 15008);
        assert_eq!(
            summary.tcp_connections(),
            BTreeSet::from([(client, server)])
        );
        assert_eq!(summary.tcp_server_ports(), BTreeSet::from([15008]));
        assert_eq!(
            summary.dst_ports(),
            BTreeSet::from([(Proto::Tcp, 15008), (Proto::Tcp, 40000), (Proto::Udp, 53)])
        );
        assert_eq!(summary.packets[2].payload_len, 6);
        assert!(summary.contains(b"secret"));
        assert!(!summary.contains(b"public"));
    }

    #[test]
    fn vlan_tagged_frames_are_unwrapped() {
        let mut tagged = vec![0xaa; 12];
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        tagged.extend_from_slice(&0x0800u16.to_be_bytes());
        tagged.extend_from_slice(&ipv4(6, CLIENT, SERVER, &tcp(1, 2, 0x02, b"")));
        let (packets, other) = parse_pcap(&pcap(&[tagged])).expect("parses");
        assert_eq!(other, 0);
        assert_eq!(packets[0].dst.port(), 2);
    }

    #[test]
    fn damaged_files_are_errors_or_end_the_parse_never_panic() {
        assert!(parse_pcap(b"").is_err());
        assert!(parse_pcap(b"\x0a\x0d\x0d\x0a rest").is_err());
        assert!(parse_pcap(&[0xd4, 0xc3, 0xb2, 0xa1, 0, 0]).is_err());
        let whole = pcap(&[ethernet(
            0x0800,
            &ipv4(6, CLIENT, SERVER, &tcp(1, 2, 0x02, b"")),
        )]);
        for cut in 24..whole.len() {
            let (packets, _) = parse_pcap(&whole[..cut]).expect("header intact");
            assert!(packets.is_empty(), "cut at {cut}");
        }
        let runt = pcap(&[ethernet(0x0800, &[0x45, 0, 0])]);
        assert_eq!(parse_pcap(&runt).expect("parses"), (vec![], 1));
    }
}
