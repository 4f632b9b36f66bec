//! The SSRF guard: which schemes and addresses a callback may be sent to. Pure: the
//! caller resolves the host and asks about every address it got, then connects to one
//! it was told is fine (so DNS cannot change the answer between check and connect).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address range in CIDR notation (`10.0.0.0/8`, `fd00::/8`, `127.0.0.1/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address range like 10.0.0.0/8 or fd00::/8")]
pub struct BadCidr(String);

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCidr(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(u32::from(net)) << 96,
                u128::from(u32::from(ip)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let mask = u128::MAX << (128 - u32::from(prefix));
    a & mask == b & mask
}

/// An IPv4 address written as IPv6 (`::ffff:10.0.0.1`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why a callback target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("only http and https callbacks are allowed, not {0:?}")]
    Scheme(String),
    #[error("{addr} is a {kind} address; list it in --callback-allow to call it")]
    Address { addr: IpAddr, kind: &'static str },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("not a usable URL: {0}")]
    Url(String),
}

pub fn check_scheme(scheme: &str) -> Result<(), Refusal> {
    match scheme {
        "http" | "https" => Ok(()),
        other => Err(Refusal::Scheme(other.to_owned())),
    }
}

/// The kind of range `ip` lies in when it is one a callback must not reach unless
/// allowed: loopback, private, link-local (the cloud metadata address included),
/// multicast, unspecified, broadcast, shared (CGNAT) or unique-local.
pub fn forbidden_kind(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => v6_kind(v6),
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (CGNAT)")
    } else {
        None
    }
}

fn v6_kind(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if first & 0xfe00 == 0xfc00 {
        Some("unique-local (private)")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else {
        None
    }
}

/// Whether a callback may be sent to `ip`: refused in a forbidden range, unless a range
/// in `allow` lists it.
pub fn check_addr(ip: IpAddr, allow: &[Cidr]) -> Result<(), Refusal> {
    match forbidden_kind(ip) {
        Some(kind) if !allow.iter().any(|c| c.contains(ip)) => Err(Refusal::Address {
            addr: canonical(ip),
            kind,
        }),
        _ => Ok(()),
    }
}

/// Every resolved address must pass: a host with one public and one private address
/// is refused, since the connection could go to either.
pub fn check_all(host: &str, addrs: &[IpAddr], allow: &[Cidr]) -> Result<(), Refusal> {
    if addrs.is_empty() {
        return Err(Refusal::NoAddress {
            host: host.to_owned(),
        });
    }
    addrs.iter().try_for_each(|ip| check_addr(*ip, allow))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn kind(s: &str) -> Option<&'static str> {
        forbidden_kind(ip(s))
    }

    #[test]
    fn every_forbidden_ipv4_range_is_refused_at_both_ends() {
        let cases = [
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("10.0.0.0", "private"),
            ("10.255.255.255", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.0.1", "private"),
            ("192.168.255.255", "private"),
            ("169.254.169.254", "link-local"),
            ("169.254.0.1", "link-local"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.255", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("100.127.255.255", "shared (CGNAT)"),
        ];
        for (addr, want) in cases {
            assert_eq!(kind(addr), Some(want), "{addr}");
            assert!(check_addr(ip(addr), &[]).is_err(), "{addr}");
        }
    }

    #[test]
    fn public_ipv4_next_to_the_ranges_passes() {
        for addr in [
            "8.8.8.8",
            "11.0.0.1",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "169.253.255.255",
            "100.63.255.255",
            "100.128.0.0",
            "223.255.255.255",
        ] {
            assert_eq!(kind(addr), None, "{addr}");
            assert_eq!(check_addr(ip(addr), &[]), Ok(()), "{addr}");
        }
    }

    #[test]
    fn ipv6_ranges_and_mapped_ipv4_are_refused() {
        let cases = [
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("ff02::1", "multicast"),
            ("fc00::1", "unique-local (private)"),
            ("fdff:ffff::1", "unique-local (private)"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:10.1.2.3", "private"),
        ];
        for (addr, want) in cases {
            assert_eq!(kind(addr), Some(want), "{addr}");
        }
        for addr in [
            "2001:db8::1",
            "2606:4700::1111",
            "fec0::1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(kind(addr), None, "{addr}");
        }
        // The refusal names the IPv4 address a mapped one stands for.
        assert_eq!(
            check_addr(ip("::ffff:127.0.0.1"), &[]),
            Err(Refusal::Address {
                addr: ip("127.0.0.1"),
                kind: "loopback"
            })
        );
    }

    #[test]
    fn the_allow_list_opens_exactly_its_ranges() {
        let allow: Vec<Cidr> = ["127.0.0.1/32", "10.1.0.0/16", "fd00::/8"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(check_addr(ip("127.0.0.1"), &allow), Ok(()));
        assert_eq!(check_addr(ip("::ffff:127.0.0.1"), &allow), Ok(()));
        assert!(check_addr(ip("127.0.0.2"), &allow).is_err());
        assert_eq!(check_addr(ip("10.1.255.1"), &allow), Ok(()));
        assert!(check_addr(ip("10.2.0.1"), &allow).is_err());
        assert_eq!(check_addr(ip("fd12::1"), &allow), Ok(()));
        assert!(check_addr(ip("fc00::1"), &allow).is_err());
        assert!(check_addr(ip("::1"), &allow).is_err());
        assert!(check_addr(ip("169.254.169.254"), &allow).is_err());
    }

    #[test]
    fn one_forbidden_address_among_several_refuses_the_host() {
        let addrs = [ip("93.184.215.14"), ip("127.0.0.1")];
        assert!(check_all("evil.example", &addrs, &[]).is_err());
        assert_eq!(check_all("ok.example", &addrs[..1], &[]), Ok(()));
        assert!(matches!(
            check_all("nothing.example", &[], &[]),
            Err(Refusal::NoAddress { .. })
        ));
    }

    #[test]
    fn cidrs_parse_with_or_without_a_prefix_and_bad_ones_are_refused() {
        assert_eq!(
            "127.0.0.1".parse::<Cidr>().unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("1.2.3.4")));
        for bad in ["10.0.0.0/33", "::/129", "nope/8", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_http_and_https_are_allowed() {
        assert_eq!(check_scheme("http"), Ok(()));
        assert_eq!(check_scheme("https"), Ok(()));
        for s in ["ftp", "file", "gopher", "unix"] {
            assert_eq!(check_scheme(s), Err(Refusal::Scheme(s.into())));
        }
    }
}
