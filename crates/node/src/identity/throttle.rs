//! Failed-login throttling per source address and per tenant.
//!
//! A source address gets a small budget of failures that refills slowly; once spent, its
//! logins are refused before any password is checked (no brute force, and no argon2 CPU
//! burned for the attacker). A tenant gets a larger budget; once spent (many addresses
//! failing at once), only credentials verified recently (the password cache) still get in,
//! so devices that were connected before ride out the attack: one attacker can never lock a
//! whole tenant out, because its own address runs dry long before the tenant's budget does.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use parking_lot::Mutex;

/// Budgets: `burst` failures at once, refilled at `per_sec`.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub burst: f64,
    pub per_sec: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(b: Budget, now: Instant) -> Bucket {
        Bucket {
            tokens: b.burst,
            at: now,
        }
    }

    fn refill(&mut self, b: Budget, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * b.per_sec).min(b.burst);
        self.at = now;
    }
}

/// Entries kept before full buckets are pruned (memory stays bounded under a spray of addresses).
const PRUNE_AT: usize = 10_000;

/// The throttle shared by MQTT and REST logins.
pub struct Throttle {
    per_ip: Budget,
    per_tenant: Budget,
    ips: Mutex<HashMap<IpAddr, Bucket>>,
    tenants: Mutex<HashMap<String, Bucket>>,
}

impl Throttle {
    /// A throttle with the given budgets.
    pub fn new(per_ip: Budget, per_tenant: Budget) -> Throttle {
        Throttle {
            per_ip,
            per_tenant,
            ips: Mutex::new(HashMap::new()),
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this address has failures left.
    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut ips = self.ips.lock();
        match ips.get_mut(&ip) {
            Some(b) => {
                b.refill(self.per_ip, now);
                b.tokens >= 1.0
            }
            None => true,
        }
    }

    /// Whether this tenant has failures left (if not, only cached credentials get in).
    pub fn tenant_allowed(&self, tenant: &str) -> bool {
        let now = Instant::now();
        let mut t = self.tenants.lock();
        match t.get_mut(tenant) {
            Some(b) => {
                b.refill(self.per_tenant, now);
                b.tokens >= 1.0
            }
            None => true,
        }
    }

    /// Records a failed login from `ip` against `tenant` (if the tenant is known).
    pub fn failed(&self, ip: IpAddr, tenant: Option<&str>) {
        let now = Instant::now();
        {
            let mut ips = self.ips.lock();
            if ips.len() >= PRUNE_AT {
                let b = self.per_ip;
                ips.retain(|_, k| {
                    k.refill(b, now);
                    k.tokens < b.burst
                });
            }
            let b = ips
                .entry(ip)
                .or_insert_with(|| Bucket::full(self.per_ip, now));
            b.refill(self.per_ip, now);
            b.tokens = (b.tokens - 1.0).max(0.0);
        }
        if let Some(tenant) = tenant {
            let mut t = self.tenants.lock();
            if t.len() >= PRUNE_AT {
                let b = self.per_tenant;
                t.retain(|_, k| {
                    k.refill(b, now);
                    k.tokens < b.burst
                });
            }
            let b = t
                .entry(tenant.to_string())
                .or_insert_with(|| Bucket::full(self.per_tenant, now));
            b.refill(self.per_tenant, now);
            b.tokens = (b.tokens - 1.0).max(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_runs_dry_but_others_do_not() {
        let t = Throttle::new(
            Budget {
                burst: 3.0,
                per_sec: 0.001,
            },
            Budget {
                burst: 100.0,
                per_sec: 0.001,
            },
        );
        let bad: IpAddr = "10.0.0.1".parse().unwrap();
        let good: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(t.ip_allowed(bad));
            t.failed(bad, Some("t1"));
        }
        assert!(!t.ip_allowed(bad));
        assert!(t.ip_allowed(good));
        assert!(t.tenant_allowed("t1"));
    }

    #[test]
    fn a_tenant_budget_runs_dry_under_many_addresses() {
        let t = Throttle::new(
            Budget {
                burst: 1.0,
                per_sec: 0.001,
            },
            Budget {
                burst: 5.0,
                per_sec: 0.001,
            },
        );
        for i in 0..5u8 {
            t.failed(IpAddr::from([10, 0, 0, i]), Some("t1"));
        }
        assert!(!t.tenant_allowed("t1"));
        assert!(t.tenant_allowed("t2"));
    }
}
