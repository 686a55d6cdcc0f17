//! TLS for MQTT over TLS (8883) and secure WebSocket (8084): the server configuration, swapped
//! atomically when the certificate files change or the tenants' trusted CAs change, the
//! handshake, and the X.509 helpers the REST API and certificate logins use.
//!
//! Client certificates are optional on the same port: a client without one logs in with a
//! password, a client with one must present a chain anchored in some tenant's trusted CA
//! (which tenant is decided later, by `identity::auth`, with [`issued_by`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use parking_lot::{Mutex, RwLock};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha1::{Digest, Sha1};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A peer gets this long to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the reloader looks at the certificate files' modification times.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why a TLS configuration or certificate could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file is not well-formed PEM.
    #[error("malformed PEM in {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    /// The input holds no certificate.
    #[error("no certificate found")]
    NoCertificates,
    /// The key file holds no PKCS#8, PKCS#1 or SEC1 private key.
    #[error("no private key found")]
    NoKey,
    /// A certificate is not valid base64 or not a parseable X.509 certificate.
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// The configuration in force and what it was built from, so either half can be replaced.
struct Current {
    config: Arc<ServerConfig>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// The live TLS server configuration, shared by the TLS and WSS listeners.
pub struct TlsState {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Current>,
    /// Serialises updates so a certificate reload and a CA change cannot undo each other.
    updating: Mutex<()>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl TlsState {
    /// Loads the server certificate chain and key from PEM files and trusts `cas` for clients.
    pub fn new(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
        cas: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<TlsState>, TlsError> {
        let (cert_path, key_path) = (cert_path.into(), key_path.into());
        // Explicit provider: never depend on whatever process-wide default some crate installed.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = load_chain(&cert_path)?;
        let key = load_key(&key_path)?;
        let verifier = build_verifier(&provider, cas)?;
        let config = build_config(&provider, verifier.clone(), chain.clone(), key.clone_key())?;
        Ok(Arc::new(TlsState {
            cert_path,
            key_path,
            provider,
            current: RwLock::new(Current {
                config: Arc::new(config),
                chain,
                key,
                verifier,
            }),
            updating: Mutex::new(()),
        }))
    }

    /// The configuration to use for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().config.clone()
    }

    /// Re-reads the certificate and key files; on error the previous configuration stays.
    pub fn reload_cert(&self) -> Result<(), TlsError> {
        let result = self.try_reload_cert();
        match &result {
            Ok(()) => tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded"),
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate reload failed, keeping the previous one")
            }
        }
        result
    }

    fn try_reload_cert(&self) -> Result<(), TlsError> {
        let _updating = self.updating.lock();
        let chain = load_chain(&self.cert_path)?;
        let key = load_key(&self.key_path)?;
        let verifier = self.current.read().verifier.clone();
        self.install(chain, key, verifier)
    }

    /// Replaces the trusted client CAs (union over tenants), keeping the server certificate.
    pub fn set_trusted_cas(&self, cas: Vec<CertificateDer<'static>>) {
        let _updating = self.updating.lock();
        let verifier = match build_verifier(&self.provider, cas) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "keeping the previous trusted CAs");
                return;
            }
        };
        let (chain, key) = {
            let cur = self.current.read();
            (cur.chain.clone(), cur.key.clone_key())
        };
        if let Err(e) = self.install(chain, key, verifier) {
            tracing::warn!(error = %e, "keeping the previous trusted CAs");
        }
    }

    /// Builds a configuration from its parts and makes it the current one. The parts are kept
    /// so that a later certificate reload or CA change can rebuild with the other half.
    fn install(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        verifier: Arc<dyn ClientCertVerifier>,
    ) -> Result<(), TlsError> {
        let config = build_config(
            &self.provider,
            verifier.clone(),
            chain.clone(),
            key.clone_key(),
        )?;
        *self.current.write() = Current {
            config: Arc::new(config),
            chain,
            key,
            verifier,
        };
        Ok(())
    }

    /// Size and modification time of both files: a change in either means "reload".
    async fn file_stamps(&self) -> [Option<(Option<SystemTime>, u64)>; 2] {
        let stamp = |m: std::fs::Metadata| (m.modified().ok(), m.len());
        [
            tokio::fs::metadata(&self.cert_path).await.ok().map(stamp),
            tokio::fs::metadata(&self.key_path).await.ok().map(stamp),
        ]
    }
}

/// Reloads the certificate on SIGHUP and when a PEM file changes, until `shutdown` is true.
pub fn spawn_reloader(state: Arc<TlsState>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    enum Event {
        Stop,
        Hup,
        HupGone,
        Tick,
    }
    tokio::spawn(async move {
        let mut hup = hangup_signal();
        let mut seen = state.file_stamps().await;
        let start = tokio::time::Instant::now() + POLL_INTERVAL;
        let mut tick = tokio::time::interval_at(start, POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow_and_update() {
                return;
            }
            let event = tokio::select! {
                changed = shutdown.changed() => match changed {
                    Ok(()) => continue,
                    // The sender is gone: the node is stopping.
                    Err(_) => Event::Stop,
                },
                got = async {
                    match hup.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                } => if got.is_some() { Event::Hup } else { Event::HupGone },
                _ = tick.tick() => Event::Tick,
            };
            match event {
                Event::Stop => return,
                Event::HupGone => hup = None,
                Event::Hup => {
                    tracing::info!("SIGHUP: reloading the TLS certificate");
                    seen = state.file_stamps().await;
                    let _ = state.reload_cert();
                }
                Event::Tick => {
                    let now = state.file_stamps().await;
                    // Remember the new stamps even if the reload fails: a half-written pair
                    // changes again when the writer finishes, and retrying every tick on a
                    // broken file would only repeat the same warning.
                    if now != seen {
                        seen = now;
                        let _ = state.reload_cert();
                    }
                }
            }
        }
    })
}

#[cfg(unix)]
fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS reloads only on file changes");
            None
        }
    }
}

/// No SIGHUP off Unix; the type only has to offer `recv` to the reloader.
#[cfg(not(unix))]
struct NoSignal;

#[cfg(not(unix))]
impl NoSignal {
    async fn recv(&mut self) -> Option<()> {
        None
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Option<NoSignal> {
    None
}

/// Runs the server handshake; returns the stream and the client's chain (leaf first), if any.
pub async fn accept(
    state: &TlsState,
    tcp: TcpStream,
) -> io::Result<(
    tokio_rustls::server::TlsStream<TcpStream>,
    Option<Vec<CertificateDer<'static>>>,
)> {
    let acceptor = tokio_rustls::TlsAcceptor::from(state.current());
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .filter(|c| !c.is_empty())
        .map(|c| c.to_vec());
    Ok((stream, chain))
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificates);
    }
    Ok(chain)
}

/// PKCS#8, PKCS#1 and SEC1 are all recognised by their PEM labels.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey,
        e => pem_error(path, e),
    })
}

fn pem_error(path: &Path, e: pem::Error) -> TlsError {
    match e {
        pem::Error::Io(source) => TlsError::Io {
            path: path.to_owned(),
            source,
        },
        e => TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        },
    }
}

fn build_verifier(
    provider: &Arc<CryptoProvider>,
    cas: Vec<CertificateDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        // One tenant's bad upload must not take client certificates away from the others.
        if let Err(e) = roots.add(ca) {
            tracing::warn!(error = %e, "skipping a trusted CA that cannot be used as a root");
        }
    }
    if roots.is_empty() {
        // The builder refuses an empty root store; with nothing to trust, do not ask at all.
        return Ok(WebPkiClientVerifier::no_client_auth());
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        // The hints would list every tenant's CA name to any unauthenticated peer, and with
        // many tenants they overflow the 64 KiB CertificateRequest; devices are configured
        // with their one certificate and send it without hints.
        .clear_root_hint_subjects()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
}

fn build_config(
    provider: &Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    Ok(ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?)
}

/// An uploaded trusted CA certificate, as the REST API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaInfo {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Lower-case hex SHA-1 of the DER.
    pub fingerprint: String,
    /// Subject distinguished name (RFC 4514 style).
    pub subject: String,
    /// Issuer distinguished name (RFC 4514 style).
    pub issuer: String,
    /// Start of validity, RFC 3339 UTC.
    pub not_before: String,
    /// End of validity, RFC 3339 UTC.
    pub not_after: String,
    /// Whether BasicConstraints marks it as a CA.
    pub is_ca: bool,
}

/// Parses the first certificate of a PEM, with or without the BEGIN/END lines.
pub fn parse_ca_pem(pem: &str) -> Result<CaInfo, TlsError> {
    let der = pem_body_to_der(pem)?;
    let (rest, cert) =
        X509Certificate::from_der(&der).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    // Trailing bytes would make the fingerprint disagree with what clients compute.
    if !rest.is_empty() {
        return Err(TlsError::BadCertificate(
            "trailing data after the certificate".into(),
        ));
    }
    let validity = cert.validity();
    let info = CaInfo {
        fingerprint: hex(&Sha1::digest(&der)),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: rfc3339(validity.not_before.timestamp()),
        not_after: rfc3339(validity.not_after.timestamp()),
        is_ca: matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca),
        der: Vec::new(),
    };
    Ok(CaInfo { der, ..info })
}

/// Decodes the first CERTIFICATE block, or the whole input when it has no PEM markers.
/// Parsed by hand rather than with `PemObject` because clients send bodies without markers
/// or with the line breaks collapsed to spaces, which a strict PEM parser rejects.
fn pem_body_to_der(pem: &str) -> Result<Vec<u8>, TlsError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let body = match pem.find(BEGIN) {
        Some(start) => {
            let after = &pem[start + BEGIN.len()..];
            match after.find(END) {
                Some(end) => &after[..end],
                None => return Err(TlsError::BadCertificate("missing END CERTIFICATE".into())),
            }
        }
        // Some other PEM block (a key, a CSR) but no certificate.
        None if pem.contains("-----BEGIN") => return Err(TlsError::NoCertificates),
        None => pem,
    };
    let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err(TlsError::NoCertificates);
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(compact.as_bytes())
        .map_err(|e| TlsError::BadCertificate(format!("base64: {e}")))
}

/// The subject CN of a DER certificate, if it parses and has one.
pub fn leaf_common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Whether `ca_der` anchors `chain`: it is in the chain, or it signed a certificate in it.
pub fn issued_by(chain: &[CertificateDer<'_>], ca_der: &[u8]) -> bool {
    let Ok((_, ca)) = X509Certificate::from_der(ca_der) else {
        return false;
    };
    chain.iter().any(|c| {
        if c.as_ref() == ca_der {
            return true;
        }
        let Ok((_, cert)) = X509Certificate::from_der(c) else {
            return false;
        };
        // The name alone is not enough: two tenants may upload CAs with the same subject.
        cert.issuer().as_raw() == ca.subject().as_raw()
            && cert.verify_signature(Some(ca.public_key())).is_ok()
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Unix seconds to `YYYY-MM-DDThh:mm:ssZ` (civil-from-days, proleptic Gregorian), so the
/// result is UTC whatever offset the certificate's time was parsed with.
fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    struct Issued {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca(cn: &str) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.distinguished_name.push(DnType::OrganizationName, "Acme");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.not_before = rcgen::date_time_ymd(2024, 1, 2);
        p.not_after = rcgen::date_time_ymd(2044, 12, 31);
        Issued {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    fn leaf(cn: &str, sans: &[&str], issuer: &Issued, client: bool) -> Issued {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        Issued {
            cert: p.signed_by(&key, &issuer.cert, &issuer.key).unwrap(),
            key,
        }
    }

    fn key_der(i: &Issued) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(i.key.serialize_der()).into()
    }

    /// Writes the server cert (with its CA) and key; returns the dir guard and both paths.
    fn write_server_files(server: &Issued, ca: &Issued) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::write(&cert, server.cert.pem() + &ca.cert.pem()).unwrap();
        std::fs::write(&key, server.key.serialize_pem()).unwrap();
        (dir, cert, key)
    }

    fn leaf_of(state: &TlsState) -> Vec<u8> {
        state.current.read().chain[0].to_vec()
    }

    #[test]
    fn parse_ca_pem_fields() {
        let root = ca("Tenant CA");
        let pem = root.cert.pem();
        let info = parse_ca_pem(&pem).unwrap();
        assert_eq!(info.der, root.cert.der().to_vec());
        assert_eq!(info.fingerprint.len(), 40);
        assert!(info
            .fingerprint
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(info.fingerprint, hex(&Sha1::digest(root.cert.der())));
        assert!(info.subject.contains("CN=Tenant CA"), "{}", info.subject);
        assert!(info.subject.contains("O=Acme"), "{}", info.subject);
        assert_eq!(info.issuer, info.subject);
        assert_eq!(info.not_before, "2024-01-02T00:00:00Z");
        assert_eq!(info.not_after, "2044-12-31T00:00:00Z");
        assert!(info.is_ca);

        // Bare base64 body, and the body with line breaks collapsed to spaces.
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert_eq!(parse_ca_pem(&body).unwrap(), info);
        assert_eq!(parse_ca_pem(&pem.replace('\n', " ")).unwrap(), info);
        // First certificate only.
        let other = ca("Other CA");
        assert_eq!(
            parse_ca_pem(&(pem.clone() + &other.cert.pem())).unwrap(),
            info
        );

        let l = leaf("dev-1", &[], &root, true);
        assert!(!parse_ca_pem(&l.cert.pem()).unwrap().is_ca);
        assert!(matches!(parse_ca_pem(""), Err(TlsError::NoCertificates)));
        assert!(matches!(
            parse_ca_pem(&root.key.serialize_pem()),
            Err(TlsError::NoCertificates)
        ));
        assert!(matches!(
            parse_ca_pem("not base64!"),
            Err(TlsError::BadCertificate(_))
        ));
        assert!(matches!(
            parse_ca_pem("aGVsbG8="),
            Err(TlsError::BadCertificate(_))
        ));
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn common_name_and_issuer() {
        let ca1 = ca("Tenant CA");
        // Same subject name, different key: must not count as the issuer.
        let impostor = ca("Tenant CA");
        let dev = leaf("device-42", &[], &ca1, true);
        assert_eq!(
            leaf_common_name(dev.cert.der()).as_deref(),
            Some("device-42")
        );
        assert_eq!(leaf_common_name(b"garbage"), None);

        let chain = vec![dev.cert.der().clone()];
        assert!(issued_by(&chain, ca1.cert.der()));
        assert!(!issued_by(&chain, impostor.cert.der()));
        // A chain that carries the CA itself.
        let with_ca = vec![dev.cert.der().clone(), ca1.cert.der().clone()];
        assert!(issued_by(&with_ca, ca1.cert.der()));
        assert!(!issued_by(&chain, b"garbage"));
        assert!(!issued_by(&[], ca1.cert.der()));
    }

    #[test]
    fn state_with_and_without_cas() {
        let root = ca("Server CA");
        let server = leaf("broker", &["localhost"], &root, false);
        let (_dir, cert, key) = write_server_files(&server, &root);
        let none = TlsState::new(&cert, &key, vec![]).unwrap();
        assert_eq!(leaf_of(&none), server.cert.der().to_vec());
        let one = TlsState::new(&cert, &key, vec![root.cert.der().clone()]).unwrap();
        // An unparseable CA is skipped, not fatal.
        let before = one.current();
        one.set_trusted_cas(vec![
            CertificateDer::from(b"junk".to_vec()),
            root.cert.der().clone(),
        ]);
        assert!(!Arc::ptr_eq(&before, &one.current()));
        let two = TlsState::new(&cert, &key, vec![CertificateDer::from(b"junk".to_vec())]);
        assert!(two.is_ok());

        let missing = TlsState::new(_dir.path().join("nope"), &key, vec![]);
        assert!(matches!(missing, Err(TlsError::Io { .. })));
        let no_key = TlsState::new(&cert, &cert, vec![]);
        assert!(matches!(no_key, Err(TlsError::NoKey)));
        let no_cert = TlsState::new(&key, &key, vec![]);
        assert!(matches!(no_cert, Err(TlsError::NoCertificates)));
        // A key that does not belong to the certificate.
        let stranger = ca("x");
        std::fs::write(&key, stranger.key.serialize_pem()).unwrap();
        assert!(matches!(
            TlsState::new(&cert, &key, vec![]),
            Err(TlsError::Rustls(_))
        ));
    }

    #[test]
    fn reload_keeps_old_config_on_error() {
        let root = ca("Server CA");
        let first = leaf("broker", &["localhost"], &root, false);
        let (_dir, cert, key) = write_server_files(&first, &root);
        let state = TlsState::new(&cert, &key, vec![]).unwrap();
        let before = state.current();

        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
        assert!(state.reload_cert().is_err());
        assert!(Arc::ptr_eq(&before, &state.current()));
        assert_eq!(leaf_of(&state), first.cert.der().to_vec());

        let second = leaf("broker", &["localhost"], &root, false);
        std::fs::write(&cert, second.cert.pem()).unwrap();
        std::fs::write(&key, second.key.serialize_pem()).unwrap();
        state.reload_cert().unwrap();
        assert!(!Arc::ptr_eq(&before, &state.current()));
        assert_eq!(leaf_of(&state), second.cert.der().to_vec());
    }

    #[tokio::test]
    async fn reloader_follows_file_changes() {
        let root = ca("Server CA");
        let first = leaf("broker", &["localhost"], &root, false);
        let (_dir, cert, key) = write_server_files(&first, &root);
        let state = TlsState::new(&cert, &key, vec![]).unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let task = spawn_reloader(state.clone(), stop_rx);
        tokio::time::sleep(Duration::from_millis(100)).await;

        let second = leaf("broker", &["localhost"], &root, false);
        std::fs::write(&key, second.key.serialize_pem()).unwrap();
        std::fs::write(&cert, second.cert.pem()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while leaf_of(&state) != second.cert.der().to_vec() {
            assert!(tokio::time::Instant::now() < deadline, "not reloaded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    /// One loopback handshake; returns what the server's `accept` returned.
    async fn handshake(
        state: Arc<TlsState>,
        server_ca: &Issued,
        client: Option<&Issued>,
    ) -> io::Result<Option<Vec<CertificateDer<'static>>>> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (mut tls, chain) = accept(&state, tcp).await?;
            tls.write_all(b"ok").await?;
            tls.flush().await?;
            Ok::<_, io::Error>(chain)
        });

        let mut roots = RootCertStore::empty();
        roots.add(server_ca.cert.der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = match client {
            Some(c) => builder
                .with_client_auth_cert(vec![c.cert.der().clone()], key_der(c))
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        // With TLS 1.3 the client finishes before the server has judged its certificate, so
        // a refusal shows up on the client only as a failed read; the server's result counts.
        if let Ok(mut tls) = connector.connect(name, tcp).await {
            let mut buf = [0u8; 2];
            if tls.read_exact(&mut buf).await.is_ok() {
                assert_eq!(&buf, b"ok");
            }
        }
        server.await.unwrap()
    }

    #[tokio::test]
    async fn loopback_handshakes() {
        let root = ca("Server CA");
        let server = leaf("broker", &["localhost"], &root, false);
        let (_dir, cert, key) = write_server_files(&server, &root);
        let tenant_ca = ca("Tenant CA");
        let impostor = ca("Tenant CA");
        let state = TlsState::new(&cert, &key, vec![tenant_ca.cert.der().clone()]).unwrap();

        let dev = leaf("device-1", &[], &tenant_ca, true);
        let chain = handshake(state.clone(), &root, Some(&dev)).await.unwrap();
        assert_eq!(chain, Some(vec![dev.cert.der().clone()]));

        let chain = handshake(state.clone(), &root, None).await.unwrap();
        assert_eq!(chain, None);

        let rogue = leaf("device-1", &[], &impostor, true);
        assert!(handshake(state.clone(), &root, Some(&rogue)).await.is_err());

        // Once the impostor is trusted too, its devices get in; with no CA at all, nobody is
        // asked for a certificate.
        state.set_trusted_cas(vec![
            tenant_ca.cert.der().clone(),
            impostor.cert.der().clone(),
        ]);
        let chain = handshake(state.clone(), &root, Some(&rogue)).await.unwrap();
        assert_eq!(chain, Some(vec![rogue.cert.der().clone()]));
        state.set_trusted_cas(vec![]);
        assert_eq!(
            handshake(state.clone(), &root, Some(&dev)).await.unwrap(),
            None
        );
    }
}
