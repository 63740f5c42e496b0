//! `iptables`: netfilter `LOG` target lines (and `TRACE` lines).
//!
//! ```text
//! Jan  2 03:04:05 host kernel: [ 12.345678] [UFW BLOCK] IN=eth0 OUT= MAC=aa:..:08:00 SRC=1.2.3.4 DST=5.6.7.8 LEN=60 ... PROTO=TCP SPT=1234 DPT=80 ... SYN URGP=0
//! ```
//!
//! An optional syslog header (as for [`syslog`](crate::syslog), giving
//! `@timestamp`, `host.hostname`, `process.name`, and PRI fields), an optional
//! kernel timestamp `[12345.678901]` and an optional log prefix may precede
//! the `KEY=VALUE` part, which starts at the first `IN=` (or `OUT=`). A line
//! with neither and no `TRACE:` marker is an error of kind
//! [`ParseErrorKind::Unrecognized`].
//!
//! | field | content |
//! | --- | --- |
//! | `iptables.kernel_time` | kernel timestamp, seconds since boot |
//! | `iptables.prefix` | log prefix, trimmed (e.g. `[UFW BLOCK]`, `DROP:`) |
//! | `iptables.trace.table`, `.chain`, `.type`, `.rule_number` | from `TRACE: raw:PREROUTING:rule:2` |
//! | `observer.ingress.interface.name` | `IN` (omitted when empty) |
//! | `observer.egress.interface.name` | `OUT` (omitted when empty) |
//! | `iptables.mac` | `MAC` as written (omitted when empty) |
//! | `destination.mac`, `source.mac` | first and second 6 bytes of a 14-byte Ethernet `MAC`, colon-separated |
//! | `source.ip`, `destination.ip` | `SRC`, `DST` |
//! | `network.transport` | `PROTO` lowercased (`tcp`, `udp`, `icmp`; `ICMPv6` → `ipv6-icmp`) |
//! | `source.port`, `destination.port` | `SPT`, `DPT` |
//! | `iptables.length`, `iptables.ttl`, `iptables.id` | `LEN`, `TTL`, `ID` (an `ID` after `PROTO=ICMP` is `iptables.icmp.id`) |
//! | `iptables.tcp.window`, `iptables.tcp.reserved_bits`, `iptables.tcp.urgp` | `WINDOW`, `RES`, `URGP` |
//! | `iptables.icmp.type`, `.code`, `.seq` | ICMP `TYPE`, `CODE`, `SEQ` |
//! | `iptables.udp.length` | a `LEN` after `PROTO` (UDP length) |
//! | `iptables.tcp.seq`, `iptables.tcp.ack` | TCP `SEQ=`, `ACK=` (with `--log-tcp-sequence`) |
//! | `iptables.opt` | `OPT (...)` IP/TCP options, with the parentheses |
//! | `iptables.tcp.flags` | TCP flags (`CWR ECE URG ACK PSH RST SYN FIN`), space-separated in line order |
//! | `iptables.fragment_flags` | IP flags (`CE DF MF`), space-separated |
//! | `iptables.icmp.embedded` | the bracketed header of the packet quoted in an ICMP error, as written |
//! | `iptables.<key>` | any other `KEY=VALUE`, key lowercased (e.g. `iptables.tos`, `iptables.prec`) |
//! | `iptables.<flag>` | any other valueless word, lowercased: value `true`, or the `(...)` group that follows it |

use std::borrow::Cow;

use crate::scan::{skip_ws, trim_cr};
use crate::syslog::{bsd_header, bsd_timestamp_len, pri};
use crate::{Fields, ParseError, ParseErrorKind, Parser, TimestampFormat};

/// The `iptables` parser.
#[derive(Debug, Clone, Copy, Default)]
pub struct IptablesParser;

fn has_syslog_header(b: &[u8]) -> bool {
    b.first() == Some(&b'<') || bsd_timestamp_len(b).is_some()
}

/// Position of `pat` at a word boundary (start of line or after a space).
fn find_word(b: &[u8], pat: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(n) = memchr::memmem::find(&b[from..], pat) {
        let p = from + n;
        if p == 0 || b[p - 1] == b' ' {
            return Some(p);
        }
        from = p + 1;
    }
    None
}

const TCP_FLAGS: [&str; 8] = ["CWR", "ECE", "URG", "ACK", "PSH", "RST", "SYN", "FIN"];
const IP_FLAGS: [&str; 3] = ["CE", "DF", "MF"];

fn static_key(key: &str, icmp: bool) -> Option<&'static str> {
    Some(match key {
        "IN" => "observer.ingress.interface.name",
        "OUT" => "observer.egress.interface.name",
        "MAC" => "iptables.mac",
        "SRC" => "source.ip",
        "DST" => "destination.ip",
        "SPT" => "source.port",
        "DPT" => "destination.port",
        "LEN" => "iptables.length",
        "TTL" => "iptables.ttl",
        "ID" if icmp => "iptables.icmp.id",
        "ID" => "iptables.id",
        "TOS" => "iptables.tos",
        "PREC" => "iptables.prec",
        "WINDOW" => "iptables.tcp.window",
        "RES" => "iptables.tcp.reserved_bits",
        "URGP" => "iptables.tcp.urgp",
        "TYPE" => "iptables.icmp.type",
        "CODE" => "iptables.icmp.code",
        "SEQ" if icmp => "iptables.icmp.seq",
        "SEQ" => "iptables.tcp.seq",
        "ACK" => "iptables.tcp.ack",
        "TC" => "iptables.tc",
        "HOPLIMIT" => "iptables.hoplimit",
        "FLOWLBL" => "iptables.flowlbl",
        "MARK" => "iptables.mark",
        "UID" => "iptables.uid",
        "GID" => "iptables.gid",
        "PHYSIN" => "iptables.physin",
        "PHYSOUT" => "iptables.physout",
        "OPT" => "iptables.opt",
        "MTU" => "iptables.mtu",
        _ => return None,
    })
}

fn transport(p: &str) -> Cow<'static, str> {
    Cow::Borrowed(match p {
        "TCP" => "tcp",
        "UDP" => "udp",
        "ICMP" => "icmp",
        "ICMPv6" | "ICMPV6" => "ipv6-icmp",
        "SCTP" => "sctp",
        "UDPLITE" => "udplite",
        "IGMP" => "igmp",
        "GRE" => "gre",
        "ESP" => "esp",
        "AH" => "ah",
        _ => return Cow::Owned(p.to_ascii_lowercase()),
    })
}

/// Collects space-separated words, borrowing while they are contiguous.
#[derive(Default)]
struct FlagSet<'a> {
    start: usize,
    end: usize,
    owned: Option<String>,
    _l: std::marker::PhantomData<&'a ()>,
}

impl<'a> FlagSet<'a> {
    fn add(&mut self, line: &'a str, s: usize, e: usize, contiguous: bool) {
        if self.end == 0 {
            (self.start, self.end) = (s, e);
        } else if contiguous && self.owned.is_none() {
            self.end = e;
        } else {
            let o = self
                .owned
                .get_or_insert_with(|| line[self.start..self.end].to_string());
            o.push(' ');
            o.push_str(&line[s..e]);
        }
    }

    fn finish(self, line: &'a str, key: &'static str, out: &mut Fields<'a>) {
        match self.owned {
            Some(o) => out.push(key, o),
            None if self.end > 0 => out.push(key, &line[self.start..self.end]),
            None => {}
        }
    }
}

impl Parser for IptablesParser {
    fn parse<'a>(&mut self, line: &'a str, out: &mut Fields<'a>) -> Result<(), ParseError> {
        let line = trim_cr(line);
        let b = line.as_bytes();
        if line.trim().is_empty() {
            return Err(ParseError::empty());
        }
        let mut i = 0;
        if has_syslog_header(b) {
            i = pri(line, out)?;
            i = bsd_header(line, i, i > 0, out)?;
        }
        i = skip_ws(b, i);
        // kernel timestamp "[ 12345.678901]"
        if b.get(i) == Some(&b'[') {
            if let Some(n) = memchr::memchr(b']', &b[i..]) {
                let inner = line[i + 1..i + n].trim_start();
                if !inner.is_empty() && inner.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
                    out.push("iptables.kernel_time", inner);
                    i = skip_ws(b, i + n + 1);
                }
            }
        }
        let body = &b[i..];
        let kv = find_word(body, b"IN=").or_else(|| find_word(body, b"OUT="));
        let trace = find_word(body, b"TRACE: ");
        if kv.is_none() && trace.is_none() {
            return Err(ParseError::new(
                ParseErrorKind::Unrecognized,
                "not a netfilter log line (no IN=, OUT= or TRACE:)",
            )
            .at(i));
        }
        let kv_start = kv.map_or(b.len(), |k| i + k);
        let mut prefix_end = kv_start;
        if let Some(t) = trace.map(|t| i + t).filter(|&t| t < kv_start) {
            prefix_end = t;
            let spec_start = t + 7;
            let spec = line[spec_start..kv_start].trim_end();
            let mut parts = spec.splitn(4, ':');
            for key in [
                "iptables.trace.table",
                "iptables.trace.chain",
                "iptables.trace.type",
                "iptables.trace.rule_number",
            ] {
                match parts.next() {
                    Some(p) if !p.is_empty() => out.push(key, p),
                    _ => {}
                }
            }
        }
        let prefix = line[i..prefix_end].trim();
        if !prefix.is_empty() {
            out.push("iptables.prefix", prefix);
        }
        self.pairs(line, kv_start, out);
        Ok(())
    }

    fn timestamp_field(&self) -> Option<(&'static str, TimestampFormat)> {
        Some(("@timestamp", TimestampFormat::Auto))
    }
}

impl IptablesParser {
    fn pairs<'a>(&self, line: &'a str, mut i: usize, out: &mut Fields<'a>) {
        let b = line.as_bytes();
        let mut tcp = FlagSet::default();
        let mut ip = FlagSet::default();
        let mut icmp = false;
        let mut proto_seen = false;
        let mut last_flag_end = usize::MAX; // end of the previous TCP flag word
        let mut last_ip_end = usize::MAX;
        while i < b.len() {
            if b[i] == b'[' {
                // embedded header of the offending packet in ICMP errors
                let end = memchr::memchr(b']', &b[i..]).map_or(b.len(), |n| i + n + 1);
                out.push("iptables.icmp.embedded", &line[i..end]);
                i = skip_ws(b, end);
                continue;
            }
            let end = memchr::memchr(b' ', &b[i..]).map_or(b.len(), |n| i + n);
            let word = &line[i..end];
            match word.find('=') {
                Some(eq) => {
                    let (key, value) = (&word[..eq], &word[eq + 1..]);
                    match key {
                        "IN" | "OUT" | "MAC" if value.is_empty() => {}
                        "LEN" if proto_seen => out.push("iptables.udp.length", value),
                        "PROTO" => {
                            icmp = value.starts_with("ICMP");
                            proto_seen = true;
                            out.push("network.transport", transport(value));
                        }
                        "MAC" => {
                            out.push("iptables.mac", value);
                            if let (Some(dst), Some(src)) = (value.get(..17), value.get(18..35)) {
                                if value.as_bytes()[17] == b':' {
                                    out.push("destination.mac", dst);
                                    out.push("source.mac", src);
                                }
                            }
                        }
                        _ => match static_key(key, icmp) {
                            Some(k) => out.push(k, value),
                            None => {
                                out.push(format!("iptables.{}", key.to_ascii_lowercase()), value)
                            }
                        },
                    }
                }
                None if TCP_FLAGS.contains(&word) => {
                    tcp.add(line, i, end, last_flag_end == i);
                    last_flag_end = end + 1;
                }
                None if IP_FLAGS.contains(&word) => {
                    ip.add(line, i, end, last_ip_end == i);
                    last_ip_end = end + 1;
                }
                None if !word.is_empty() => {
                    let key = format!("iptables.{}", word.to_ascii_lowercase());
                    // `OPT (020405B4)`: a word followed by a parenthesised value
                    let next = skip_ws(b, end);
                    if b.get(next) == Some(&b'(') {
                        let close =
                            memchr::memchr(b')', &b[next..]).map_or(b.len(), |n| next + n + 1);
                        out.push(key, &line[next..close]);
                        i = skip_ws(b, close);
                        continue;
                    }
                    out.push(key, "true")
                }
                None => {}
            }
            i = skip_ws(b, end);
        }
        tcp.finish(line, "iptables.tcp.flags", out);
        ip.finish(line, "iptables.fragment_flags", out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Fields<'_>, ParseError> {
        let mut f = Fields::new();
        IptablesParser.parse(line, &mut f)?;
        Ok(f)
    }

    #[test]
    fn ufw_with_syslog_header() {
        let f = parse("Jan  2 03:04:05 fw kernel: [ 1234.567890] [UFW BLOCK] IN=eth0 OUT= MAC=52:54:00:12:34:56:52:54:00:ab:cd:ef:08:00 SRC=203.0.113.9 DST=192.0.2.1 LEN=60 TOS=0x00 PREC=0x00 TTL=51 ID=4242 DF PROTO=TCP SPT=44321 DPT=22 WINDOW=64240 RES=0x00 CWR ECE SYN URGP=0 ").unwrap();
        assert_eq!(f.get("host.hostname"), Some("fw"));
        assert_eq!(f.get("iptables.kernel_time"), Some("1234.567890"));
        assert_eq!(f.get("iptables.prefix"), Some("[UFW BLOCK]"));
        assert_eq!(f.get("observer.egress.interface.name"), None);
        assert_eq!(f.get("source.mac"), Some("52:54:00:ab:cd:ef"));
        assert_eq!(f.get("destination.mac"), Some("52:54:00:12:34:56"));
        assert_eq!(f.get("network.transport"), Some("tcp"));
        assert_eq!(f.get("iptables.tcp.flags"), Some("CWR ECE SYN"));
        assert_eq!(f.get("iptables.fragment_flags"), Some("DF"));
        assert_eq!(f.get("iptables.tos"), Some("0x00"));
    }

    #[test]
    fn trace_and_icmp() {
        let f = parse("TRACE: raw:PREROUTING:rule:2 IN=eth0 OUT= SRC=10.0.0.1 DST=10.0.0.2 LEN=84 TOS=0x00 PREC=0x00 TTL=64 ID=1 PROTO=ICMP TYPE=8 CODE=0 ID=77 SEQ=1 MARK=0x1").unwrap();
        assert_eq!(f.get("iptables.trace.table"), Some("raw"));
        assert_eq!(f.get("iptables.trace.chain"), Some("PREROUTING"));
        assert_eq!(f.get("iptables.trace.type"), Some("rule"));
        assert_eq!(f.get("iptables.trace.rule_number"), Some("2"));
        assert_eq!(f.get("iptables.prefix"), None);
        assert_eq!(f.get("iptables.id"), Some("1"));
        assert_eq!(f.get("iptables.icmp.id"), Some("77"));
        let e = parse("Jan  2 03:04:05 fw sshd[1]: hello").unwrap_err();
        assert_eq!(e.kind, ParseErrorKind::Unrecognized);
    }

    #[test]
    fn flags_not_contiguous() {
        let f = parse("Mar IN=eth0 OUT= ACK URGP=0 FIN").unwrap();
        assert_eq!(f.get("iptables.prefix"), Some("Mar"));
        assert_eq!(f.get("iptables.tcp.flags"), Some("ACK FIN"));
        let f = parse("IN=eth0 MAC=00:00:00:00:00:00:00:00:00:00:00:0\u{e9}").unwrap();
        assert_eq!(f.get("source.mac"), None);
    }
}
