//! Per-tenant limits and quotas, enforced per node (cluster-wide enforcement comes with the
//! cluster): connections, persistent sessions, subscriptions, inbound messages and bytes per
//! second, and packet sizes per topic class.
//!
//! Reactions (also in docs/security.md):
//! - connections, sessions: CONNACK 0x97 Quota exceeded (3.1.1: 3 Server unavailable);
//! - subscriptions: SUBACK 0x97 (3.1.1: 0x80) for the filters over the quota;
//! - message and byte rate: the tenant's connections stop being read until the tenant is
//!   back under its rate (TCP backpressure on the devices). Nothing is dropped or refused,
//!   which is what "requests are queued/delayed" means in Cumulocity's rate limiting (§5.3);
//! - packet size: MQTT 5 DISCONNECT 0x95, 3.1.1 close.
//!
//! Each reaction counts `fleetmq_tenant_quota_exceeded_total{tenant, quota}`.

use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::Config;
use crate::identity::records::TenantLimits;

/// Effective limits of one tenant (0 in a setting = unlimited, stored here as MAX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub reserved_packet: usize,
    pub freeform_packet: usize,
    pub connections: usize,
    pub sessions: usize,
    pub subscriptions: usize,
    /// 0 = unlimited.
    pub messages_per_sec: u32,
    /// 0 = unlimited.
    pub bytes_per_sec: u64,
}

fn unlimited_if_zero(v: u64) -> usize {
    if v == 0 {
        usize::MAX
    } else {
        usize::try_from(v).unwrap_or(usize::MAX)
    }
}

impl Limits {
    /// The tenant's overrides over the node's defaults.
    pub fn resolve(cfg: &Config, t: &TenantLimits) -> Limits {
        Limits {
            reserved_packet: t
                .reserved_packet_size
                .map(|v| v as usize)
                .unwrap_or(cfg.reserved_packet_size),
            freeform_packet: t
                .freeform_packet_size
                .map(|v| v as usize)
                .unwrap_or(cfg.max_packet_size),
            connections: unlimited_if_zero(
                t.max_connections.unwrap_or(cfg.tenant_max_connections) as u64
            ),
            sessions: unlimited_if_zero(t.max_sessions.unwrap_or(cfg.tenant_max_sessions) as u64),
            subscriptions: unlimited_if_zero(
                t.max_subscriptions.unwrap_or(cfg.tenant_max_subscriptions) as u64,
            ),
            messages_per_sec: t
                .messages_per_second
                .unwrap_or(cfg.tenant_messages_per_second),
            bytes_per_sec: t.bytes_per_second.unwrap_or(cfg.tenant_bytes_per_second),
        }
    }

    /// The largest packet the decoder must let through (the larger of the two classes).
    pub fn max_packet(&self) -> usize {
        self.reserved_packet.max(self.freeform_packet)
    }
}

#[derive(Debug)]
struct Rate {
    messages: f64,
    bytes: f64,
    at: Instant,
}

/// Live usage of one tenant on this node.
#[derive(Debug)]
pub struct Usage {
    pub connections: AtomicUsize,
    /// Persistent sessions held (connected or not).
    pub sessions: AtomicUsize,
    /// Subscriptions in the tenant's routing trie.
    pub subscriptions: AtomicUsize,
    rate: Mutex<Rate>,
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            connections: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
            rate: Mutex::new(Rate {
                messages: 0.0,
                bytes: 0.0,
                at: Instant::now(),
            }),
        }
    }
}

impl Usage {
    /// Charges one inbound PUBLISH of `bytes` to the tenant's rate budgets (one second of
    /// burst). Returns how long the connection must pause reading before the tenant is back
    /// under its rates, or `None` when it is within them.
    ///
    /// The budget may go into debt by the packet just charged; every connection of the
    /// tenant then pauses until the debt is repaid, so the tenant as a whole is held to its
    /// rate however many connections it spreads the load over.
    pub fn charge(&self, limits: &Limits, bytes: usize) -> Option<Duration> {
        if limits.messages_per_sec == 0 && limits.bytes_per_sec == 0 {
            return None;
        }
        let now = Instant::now();
        let mut r = self.rate.lock();
        let dt = now.saturating_duration_since(r.at).as_secs_f64();
        r.at = now;
        let mut wait: f64 = 0.0;
        if limits.messages_per_sec > 0 {
            let rate = limits.messages_per_sec as f64;
            r.messages = (r.messages + dt * rate).min(rate) - 1.0;
            if r.messages < 0.0 {
                wait = wait.max(-r.messages / rate);
            }
        }
        if limits.bytes_per_sec > 0 {
            let rate = limits.bytes_per_sec as f64;
            r.bytes = (r.bytes + dt * rate).min(rate) - bytes as f64;
            if r.bytes < 0.0 {
                wait = wait.max(-r.bytes / rate);
            }
        }
        (wait > 0.0).then(|| Duration::from_secs_f64(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(mps: u32, bps: u64) -> Limits {
        Limits {
            reserved_packet: 16384,
            freeform_packet: 1 << 20,
            connections: usize::MAX,
            sessions: usize::MAX,
            subscriptions: usize::MAX,
            messages_per_sec: mps,
            bytes_per_sec: bps,
        }
    }

    #[test]
    fn unlimited_never_pauses() {
        let u = Usage::default();
        for _ in 0..10_000 {
            assert_eq!(u.charge(&limits(0, 0), 1000), None);
        }
    }

    #[test]
    fn message_rate_pauses_once_the_burst_is_spent() {
        let u = Usage::default();
        // The budget starts empty (a fresh node grants no burst), so the first message waits
        // about 1/rate; the debt grows by 1/rate per message.
        let l = limits(100, 0);
        let mut last = Duration::ZERO;
        for _ in 0..50 {
            last = u.charge(&l, 10).expect("over the rate");
        }
        assert!(last >= Duration::from_millis(400), "{last:?}");
        assert!(last <= Duration::from_millis(600), "{last:?}");
    }

    #[test]
    fn byte_rate_counts_bytes() {
        let u = Usage::default();
        let l = limits(0, 1000);
        let w = u.charge(&l, 5000).expect("over the byte rate");
        assert!(w >= Duration::from_secs(4), "{w:?}");
    }

    #[test]
    fn zero_in_settings_means_unlimited() {
        let cfg = Config::default();
        let l = Limits::resolve(&cfg, &TenantLimits::default());
        assert_eq!(l.connections, usize::MAX);
        assert_eq!(l.reserved_packet, 16_384);
        assert_eq!(l.freeform_packet, 1024 * 1024);
        let l = Limits::resolve(
            &cfg,
            &TenantLimits {
                max_connections: Some(3),
                ..TenantLimits::default()
            },
        );
        assert_eq!(l.connections, 3);
    }
}
