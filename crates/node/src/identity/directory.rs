//! The directory: tenants, users, registration requests and trusted certificates, kept in the
//! durable (Raft) state and mirrored in memory so that a login never waits on storage.
//!
//! Writes go through Raft first and reach the in-memory copy only once committed; they are
//! serialised by one lock so that read-check-write sequences (unique domains, request state
//! changes) cannot interleave. (With the cluster, the meta group's apply will feed this copy
//! on every node instead; see docs/architecture.md.)

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use fleetmq_cluster::{ClusterError, Durable};
use fleetmq_storage::records::{Command, Response, Space};
use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

use super::password::{self, Passwords};
use super::records::{
    DeviceRequestRec, Role, TenantLimits, TenantRec, TrustedCertRec, UserRec, ADMIN_USER,
    BOOTSTRAP_USER, MANAGEMENT,
};
use crate::message::now_ms;

/// Why a directory change was refused.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("already exists")]
    Exists,
    #[error("not found")]
    NotFound,
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("storage: {0}")]
    Storage(#[from] ClusterError),
    #[error("encoding: {0}")]
    Encoding(#[from] serde_json::Error),
    #[error("password hashing: {0}")]
    Hash(String),
}

#[derive(Default)]
struct State {
    tenants: HashMap<String, Arc<TenantRec>>,
    /// Domain (tenant name) → tenant id.
    by_domain: HashMap<String, String>,
    users: HashMap<(String, String), Arc<UserRec>>,
    requests: BTreeMap<(String, String), DeviceRequestRec>,
    certs: BTreeMap<(String, String), Arc<TrustedCertRec>>,
    settings: HashMap<String, Vec<u8>>,
}

/// The directory of one node.
pub struct Directory {
    durable: Durable,
    state: RwLock<State>,
    write: tokio::sync::Mutex<()>,
    pub passwords: Arc<Passwords>,
    /// Bumped whenever the set of trusted certificates changes (the TLS verifier rebuilds).
    certs_version: watch::Sender<u64>,
}

fn key_of(space: Space, tenant: &str, name: &str) -> (Space, String, String) {
    (space, tenant.to_string(), name.to_string())
}

/// What `open` did on an empty data directory, for the one-time console message.
pub struct Initialised {
    /// The generated admin password, when none was configured.
    pub generated_admin_password: Option<String>,
}

impl Directory {
    /// Loads the directory and, on first start, creates the management tenant, its admin and
    /// (when a password is configured) the bootstrap user; also the anonymous tenant if asked.
    pub async fn open(
        durable: Durable,
        admin_password: Option<&str>,
        bootstrap_password: Option<&str>,
        anonymous_tenant: Option<&str>,
    ) -> Result<(Arc<Directory>, Initialised), DirError> {
        let parallel = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let dir = Arc::new(Directory {
            durable,
            state: RwLock::new(State::default()),
            write: tokio::sync::Mutex::new(()),
            passwords: Passwords::new(parallel),
            certs_version: watch::channel(0).0,
        });
        dir.load()?;
        let mut init = Initialised {
            generated_admin_password: None,
        };
        if dir.tenant(MANAGEMENT).is_none() {
            dir.put_tenant(
                TenantRec {
                    id: MANAGEMENT.into(),
                    domain: MANAGEMENT.into(),
                    company: "fleetmq management".into(),
                    created_ms: now_ms(),
                    limits: TenantLimits::default(),
                },
                true,
            )
            .await?;
            let pw = match admin_password {
                Some(p) if !p.is_empty() => p.to_string(),
                _ => {
                    let p = password::generate(20);
                    init.generated_admin_password = Some(p.clone());
                    p
                }
            };
            dir.create_user(MANAGEMENT, ADMIN_USER, Some(&pw), Role::Admin, false)
                .await?;
        }
        if let Some(bp) = bootstrap_password.filter(|p| !p.is_empty()) {
            // Applied on every start, so rotating the configured password takes effect.
            let current = dir.user(MANAGEMENT, BOOTSTRAP_USER);
            let same = match current.as_ref().and_then(|u| u.password_hash.clone()) {
                Some(h) => {
                    dir.passwords
                        .verify(MANAGEMENT, BOOTSTRAP_USER, Some(&h), bp.as_bytes())
                        .await
                }
                None => false,
            };
            if !same {
                dir.create_user(MANAGEMENT, BOOTSTRAP_USER, Some(bp), Role::Bootstrap, true)
                    .await?;
            }
        }
        if let Some(anon) = anonymous_tenant {
            if dir.resolve_tenant(anon).is_none() {
                dir.put_tenant(
                    TenantRec {
                        id: anon.into(),
                        domain: anon.into(),
                        company: anon.into(),
                        created_ms: now_ms(),
                        limits: TenantLimits::default(),
                    },
                    true,
                )
                .await?;
            }
        }
        Ok((dir, init))
    }

    /// Mirrors a directory command this node applied, whoever proposed it, into the cache.
    /// The value is re-read from the state machine rather than taken from the command: a
    /// `create_only` put that lost changed nothing, and a later write may already be applied.
    pub fn observe(&self, cmd: &Command) -> Result<(), DirError> {
        match cmd {
            Command::PutEntry {
                space,
                tenant,
                name,
                ..
            }
            | Command::DeleteEntry {
                space,
                tenant,
                name,
            } => {
                let value = self.durable.entry(*space, tenant, name)?;
                self.cache_entry(*space, tenant, name, value.as_deref())
            }
            Command::DeleteTenantEntries { space, tenant } => {
                let mut st = self.state.write();
                match space {
                    Space::User => {
                        st.users.retain(|(t, _), _| t != tenant);
                        drop(st);
                        self.passwords.forget_tenant(tenant);
                    }
                    Space::DeviceRequest => st.requests.retain(|(t, _), _| t != tenant),
                    Space::TrustedCert => {
                        st.certs.retain(|(t, _), _| t != tenant);
                        drop(st);
                        self.certs_version.send_modify(|v| *v += 1);
                    }
                    Space::Tenant | Space::Setting | Space::Holder => {}
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn cache_entry(
        &self,
        space: Space,
        tenant: &str,
        name: &str,
        value: Option<&[u8]>,
    ) -> Result<(), DirError> {
        let key = (tenant.to_string(), name.to_string());
        let mut st = self.state.write();
        match space {
            Space::Tenant => {
                if let Some(old) = st.tenants.remove(name) {
                    st.by_domain.remove(&old.domain.to_lowercase());
                }
                if let Some(v) = value {
                    let t: TenantRec = serde_json::from_slice(v)?;
                    st.by_domain.insert(t.domain.to_lowercase(), t.id.clone());
                    st.tenants.insert(t.id.clone(), Arc::new(t));
                }
            }
            Space::User => {
                match value {
                    Some(v) => st.users.insert(key, Arc::new(serde_json::from_slice(v)?)),
                    None => st.users.remove(&key),
                };
                drop(st);
                self.passwords.forget(tenant, name);
            }
            Space::DeviceRequest => {
                match value {
                    Some(v) => st.requests.insert(key, serde_json::from_slice(v)?),
                    None => st.requests.remove(&key),
                };
            }
            Space::TrustedCert => {
                match value {
                    Some(v) => st.certs.insert(key, Arc::new(serde_json::from_slice(v)?)),
                    None => st.certs.remove(&key),
                };
                drop(st);
                self.certs_version.send_modify(|v| *v += 1);
            }
            Space::Setting => {
                match value {
                    Some(v) => st.settings.insert(name.to_string(), setting_value(v)),
                    None => st.settings.remove(name),
                };
            }
            // Session holders are the cluster's business (`cluster::Cluster`).
            Space::Holder => {}
        }
        Ok(())
    }

    /// Rebuilds the whole cache from the state machine (after a snapshot was installed).
    pub fn reload(&self) -> Result<(), DirError> {
        *self.state.write() = State::default();
        self.load()?;
        self.certs_version.send_modify(|v| *v += 1);
        Ok(())
    }

    fn load(&self) -> Result<(), DirError> {
        let mut st = self.state.write();
        for (_, _, _, v) in self.durable.entries(Space::Tenant)? {
            let t: TenantRec = serde_json::from_slice(&v)?;
            st.by_domain.insert(t.domain.to_lowercase(), t.id.clone());
            st.tenants.insert(t.id.clone(), Arc::new(t));
        }
        for (_, tenant, name, v) in self.durable.entries(Space::User)? {
            st.users
                .insert((tenant, name), Arc::new(serde_json::from_slice(&v)?));
        }
        for (_, tenant, name, v) in self.durable.entries(Space::DeviceRequest)? {
            st.requests
                .insert((tenant, name), serde_json::from_slice(&v)?);
        }
        for (_, tenant, name, v) in self.durable.entries(Space::TrustedCert)? {
            st.certs
                .insert((tenant, name), Arc::new(serde_json::from_slice(&v)?));
        }
        for (_, _, name, v) in self.durable.entries(Space::Setting)? {
            st.settings.insert(name, setting_value(&v));
        }
        Ok(())
    }

    async fn put<T: Serialize>(
        &self,
        space: Space,
        tenant: &str,
        name: &str,
        value: &T,
        create_only: bool,
    ) -> Result<(), DirError> {
        let (space, tenant, name) = key_of(space, tenant, name);
        let resp = self
            .durable
            .propose(Command::PutEntry {
                space,
                tenant,
                name,
                value: serde_json::to_vec(value)?,
                create_only,
            })
            .await?;
        match resp {
            Response::Exists => Err(DirError::Exists),
            _ => Ok(()),
        }
    }

    async fn delete(&self, space: Space, tenant: &str, name: &str) -> Result<(), DirError> {
        let (space, tenant, name) = key_of(space, tenant, name);
        self.durable
            .propose(Command::DeleteEntry {
                space,
                tenant,
                name,
            })
            .await?;
        Ok(())
    }

    // ----- tenants --------------------------------------------------------------------------

    /// A tenant by id.
    pub fn tenant(&self, id: &str) -> Option<Arc<TenantRec>> {
        self.state.read().tenants.get(id).cloned()
    }

    /// A tenant by id or by domain/name (case-insensitive), as usernames may use either.
    pub fn resolve_tenant(&self, id_or_domain: &str) -> Option<Arc<TenantRec>> {
        let st = self.state.read();
        if let Some(t) = st.tenants.get(id_or_domain) {
            return Some(t.clone());
        }
        st.by_domain
            .get(&id_or_domain.to_lowercase())
            .and_then(|id| st.tenants.get(id))
            .cloned()
    }

    /// All tenants, by id.
    pub fn tenants(&self) -> Vec<Arc<TenantRec>> {
        let mut v: Vec<_> = self.state.read().tenants.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Stores a tenant (create_only: refuse an existing id or a domain in use).
    pub async fn put_tenant(&self, t: TenantRec, create_only: bool) -> Result<(), DirError> {
        let _w = self.write.lock().await;
        {
            let st = self.state.read();
            if let Some(owner) = st.by_domain.get(&t.domain.to_lowercase()) {
                if owner != &t.id {
                    return Err(DirError::Exists);
                }
            }
            // A domain equal to another tenant's id would make `<x>/user` ambiguous.
            if st.tenants.contains_key(&t.domain) && t.domain != t.id {
                return Err(DirError::Exists);
            }
        }
        self.put(Space::Tenant, "", &t.id, &t, create_only).await?;
        let mut st = self.state.write();
        if let Some(old) = st.tenants.get(&t.id).cloned() {
            st.by_domain.remove(&old.domain.to_lowercase());
        }
        st.by_domain.insert(t.domain.to_lowercase(), t.id.clone());
        st.tenants.insert(t.id.clone(), Arc::new(t));
        Ok(())
    }

    /// Creates a tenant with a fresh `t` + 8 digits id.
    pub async fn create_tenant(
        &self,
        company: &str,
        domain: &str,
        limits: TenantLimits,
    ) -> Result<Arc<TenantRec>, DirError> {
        if domain.is_empty() || domain.contains('/') || domain.contains(':') {
            return Err(DirError::Invalid(
                "domain must be non-empty, without '/' or ':'".into(),
            ));
        }
        for _ in 0..20 {
            let id = format!("t{:08}", rand::random::<u32>() % 100_000_000);
            let rec = TenantRec {
                id: id.clone(),
                domain: domain.to_string(),
                company: company.to_string(),
                created_ms: now_ms(),
                limits: limits.clone(),
            };
            match self.put_tenant(rec, true).await {
                Ok(()) => return self.tenant(&id).ok_or(DirError::NotFound),
                Err(DirError::Exists) if self.tenant(&id).is_some() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(DirError::Invalid("no free tenant id".into()))
    }

    /// Deletes a tenant and its users, requests and certificates.
    pub async fn delete_tenant(&self, id: &str) -> Result<(), DirError> {
        if id == MANAGEMENT {
            return Err(DirError::Invalid(
                "the management tenant cannot be deleted".into(),
            ));
        }
        let _w = self.write.lock().await;
        if self.tenant(id).is_none() {
            return Err(DirError::NotFound);
        }
        for space in [Space::User, Space::DeviceRequest, Space::TrustedCert] {
            self.durable
                .propose(Command::DeleteTenantEntries {
                    space,
                    tenant: id.to_string(),
                })
                .await?;
        }
        self.delete(Space::Tenant, "", id).await?;
        let mut st = self.state.write();
        if let Some(t) = st.tenants.remove(id) {
            st.by_domain.remove(&t.domain.to_lowercase());
        }
        st.users.retain(|(t, _), _| t != id);
        st.requests.retain(|(t, _), _| t != id);
        let before = st.certs.len();
        st.certs.retain(|(t, _), _| t != id);
        let changed = st.certs.len() != before;
        drop(st);
        if changed {
            self.certs_version.send_modify(|v| *v += 1);
        }
        Ok(())
    }

    // ----- users ----------------------------------------------------------------------------

    /// A user of a tenant.
    pub fn user(&self, tenant: &str, name: &str) -> Option<Arc<UserRec>> {
        self.state
            .read()
            .users
            .get(&(tenant.to_string(), name.to_string()))
            .cloned()
    }

    /// The users of a tenant, by name.
    pub fn users(&self, tenant: &str) -> Vec<Arc<UserRec>> {
        let st = self.state.read();
        let mut v: Vec<_> = st
            .users
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|(_, u)| u.clone())
            .collect();
        v.sort_by(|a, b| a.user_name.cmp(&b.user_name));
        v
    }

    /// Creates (or with `replace`, overwrites) a user; the password is hashed here.
    pub async fn create_user(
        &self,
        tenant: &str,
        name: &str,
        password: Option<&str>,
        role: Role,
        replace: bool,
    ) -> Result<Arc<UserRec>, DirError> {
        let password_hash = match password {
            Some(p) => Some(self.passwords.hash(p).await.map_err(DirError::Hash)?),
            None => None,
        };
        let rec = UserRec {
            tenant: tenant.to_string(),
            user_name: name.to_string(),
            cert_auth: password_hash.is_none(),
            password_hash,
            role,
            created_ms: now_ms(),
            email: None,
        };
        self.put_user(rec, !replace).await
    }

    /// Creates or replaces a user whose password this node generated (registration): hashed
    /// with light argon2 parameters, see `Passwords::hash_generated`.
    pub async fn create_user_generated(
        &self,
        tenant: &str,
        name: &str,
        password: &str,
        role: Role,
    ) -> Result<Arc<UserRec>, DirError> {
        let pw = password.to_string();
        let hash = tokio::task::spawn_blocking(move || Passwords::hash_generated(&pw))
            .await
            .map_err(|e| DirError::Hash(e.to_string()))?
            .map_err(DirError::Hash)?;
        let rec = UserRec {
            tenant: tenant.to_string(),
            user_name: name.to_string(),
            password_hash: Some(hash),
            role,
            created_ms: now_ms(),
            email: None,
            cert_auth: false,
        };
        self.put_user(rec, false).await
    }

    /// Stores a user record as given.
    pub async fn put_user(
        &self,
        rec: UserRec,
        create_only: bool,
    ) -> Result<Arc<UserRec>, DirError> {
        validate_name(&rec.user_name)?;
        let _w = self.write.lock().await;
        if self.tenant(&rec.tenant).is_none() {
            return Err(DirError::NotFound);
        }
        self.put(Space::User, &rec.tenant, &rec.user_name, &rec, create_only)
            .await?;
        self.passwords.forget(&rec.tenant, &rec.user_name);
        let rec = Arc::new(rec);
        self.state
            .write()
            .users
            .insert((rec.tenant.clone(), rec.user_name.clone()), rec.clone());
        Ok(rec)
    }

    /// Deletes a user.
    pub async fn delete_user(&self, tenant: &str, name: &str) -> Result<(), DirError> {
        let _w = self.write.lock().await;
        if self.user(tenant, name).is_none() {
            return Err(DirError::NotFound);
        }
        self.delete(Space::User, tenant, name).await?;
        self.passwords.forget(tenant, name);
        self.state
            .write()
            .users
            .remove(&(tenant.to_string(), name.to_string()));
        Ok(())
    }

    // ----- device registration requests -----------------------------------------------------

    /// A request of a tenant.
    pub fn request(&self, tenant: &str, id: &str) -> Option<DeviceRequestRec> {
        self.state
            .read()
            .requests
            .get(&(tenant.to_string(), id.to_string()))
            .cloned()
    }

    /// The request for a device identifier in whichever tenant made it (identifiers of open
    /// requests are unique across tenants, because the bootstrap user is shared).
    pub fn find_request(&self, id: &str) -> Option<DeviceRequestRec> {
        self.state
            .read()
            .requests
            .values()
            .find(|r| r.id == id)
            .cloned()
    }

    /// The requests of a tenant.
    pub fn requests(&self, tenant: &str) -> Vec<DeviceRequestRec> {
        self.state
            .read()
            .requests
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Stores a request; a new one must use an identifier no tenant has an open request for.
    pub async fn put_request(&self, r: DeviceRequestRec, create: bool) -> Result<(), DirError> {
        validate_name(&r.id)?;
        if r.id.contains(':') {
            return Err(DirError::Invalid(
                "':' is not allowed in a device identifier".into(),
            ));
        }
        let _w = self.write.lock().await;
        if create && self.find_request(&r.id).is_some() {
            return Err(DirError::Exists);
        }
        self.put(Space::DeviceRequest, &r.tenant, &r.id, &r, create)
            .await?;
        self.state
            .write()
            .requests
            .insert((r.tenant.clone(), r.id.clone()), r);
        Ok(())
    }

    /// Deletes a request.
    pub async fn delete_request(&self, tenant: &str, id: &str) -> Result<(), DirError> {
        let _w = self.write.lock().await;
        if self.request(tenant, id).is_none() {
            return Err(DirError::NotFound);
        }
        self.delete(Space::DeviceRequest, tenant, id).await?;
        self.state
            .write()
            .requests
            .remove(&(tenant.to_string(), id.to_string()));
        Ok(())
    }

    // ----- trusted certificates -------------------------------------------------------------

    /// The trusted certificates of a tenant.
    pub fn certs(&self, tenant: &str) -> Vec<Arc<TrustedCertRec>> {
        self.state
            .read()
            .certs
            .iter()
            .filter(|((t, _), _)| t == tenant)
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Every enabled trusted certificate of every tenant (for the TLS client verifier).
    pub fn all_enabled_certs(&self) -> Vec<Arc<TrustedCertRec>> {
        self.state
            .read()
            .certs
            .values()
            .filter(|c| c.enabled)
            .cloned()
            .collect()
    }

    /// One trusted certificate.
    pub fn cert(&self, tenant: &str, fingerprint: &str) -> Option<Arc<TrustedCertRec>> {
        self.state
            .read()
            .certs
            .get(&(tenant.to_string(), fingerprint.to_string()))
            .cloned()
    }

    /// Stores a trusted certificate.
    pub async fn put_cert(&self, c: TrustedCertRec, create_only: bool) -> Result<(), DirError> {
        let _w = self.write.lock().await;
        if self.tenant(&c.tenant).is_none() {
            return Err(DirError::NotFound);
        }
        self.put(
            Space::TrustedCert,
            &c.tenant,
            &c.fingerprint,
            &c,
            create_only,
        )
        .await?;
        self.state
            .write()
            .certs
            .insert((c.tenant.clone(), c.fingerprint.clone()), Arc::new(c));
        self.certs_version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Deletes a trusted certificate.
    pub async fn delete_cert(&self, tenant: &str, fingerprint: &str) -> Result<(), DirError> {
        let _w = self.write.lock().await;
        if self.cert(tenant, fingerprint).is_none() {
            return Err(DirError::NotFound);
        }
        self.delete(Space::TrustedCert, tenant, fingerprint).await?;
        self.state
            .write()
            .certs
            .remove(&(tenant.to_string(), fingerprint.to_string()));
        self.certs_version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Changes whenever the trusted certificates change.
    pub fn certs_watch(&self) -> watch::Receiver<u64> {
        self.certs_version.subscribe()
    }

    // ----- settings -------------------------------------------------------------------------

    /// A cluster-wide setting, created with `init` on first use (e.g. a signing key).
    pub async fn setting_or_init(
        &self,
        name: &str,
        init: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, DirError> {
        if let Some(v) = self.state.read().settings.get(name) {
            return Ok(v.clone());
        }
        let _w = self.write.lock().await;
        if let Some(v) = self.state.read().settings.get(name) {
            return Ok(v.clone());
        }
        let v = init();
        self.put(Space::Setting, "", name, &v, true).await?;
        self.state
            .write()
            .settings
            .insert(name.to_string(), v.clone());
        Ok(v)
    }
}

/// A setting's value as stored: `put` wrote the bytes as JSON (an array of numbers). Read
/// back raw, a restarted node (or another node) would use a different signing key than the
/// node that created it.
fn setting_value(stored: &[u8]) -> Vec<u8> {
    serde_json::from_slice::<Vec<u8>>(stored).unwrap_or_else(|_| stored.to_vec())
}

/// Decodes a JSON value stored by this module (for tests and tools).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DirError> {
    Ok(serde_json::from_slice(bytes)?)
}

fn validate_name(name: &str) -> Result<(), DirError> {
    if name.is_empty()
        || name.len() > 255
        || name.contains('/')
        || name.chars().any(char::is_control)
    {
        return Err(DirError::Invalid(
            "names must be 1-255 characters without '/' or control characters".into(),
        ));
    }
    Ok(())
}
