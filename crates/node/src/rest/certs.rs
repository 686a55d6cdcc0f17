//! `/tenant/tenants/{tenant}/trusted-certificates[/{fingerprint}]` (§1.5, §11.5): the CA
//! certificates a tenant trusts for device certificates. Only CA certificates are accepted;
//! the stored PEM is re-encoded from the DER, so it holds exactly the one certificate whose
//! SHA-1 is the fingerprint.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine;

use super::model::{parse_cert_status, seg, CertOut, CertUpdate, NewCert};
use super::{body, json, no_content, required, Api, ApiError, Caller, Page, St, P};
use crate::identity::records::TrustedCertRec;
use crate::message::now_ms;
use crate::transport::tls;

type R = Result<Response, ApiError>;

fn status(s: &str) -> Result<bool, ApiError> {
    parse_cert_status(s)
        .ok_or_else(|| ApiError::unprocessable(Api::Tenant, "status must be ENABLED or DISABLED"))
}

/// PEM text of one DER certificate, 64 characters a line.
pub fn pem_of(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Fingerprints are compared as lower-case hex; `AA:BB:...` is accepted too.
fn normalise_fingerprint(fp: &str) -> String {
    fp.chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase()
}

/// `POST .../trusted-certificates` `{name, certInPemFormat, status?, autoRegistrationEnabled?}`.
pub async fn create(State(s): St, c: Caller, P(tenant): P<String>, raw: Bytes) -> R {
    let t = c.admin_tenant(&s, &tenant, Api::Tenant)?;
    let req: NewCert = body(&raw)?;
    let pem = required(req.cert_in_pem_format, "certInPemFormat")?;
    let info = tls::parse_ca_pem(&pem).map_err(|e| {
        ApiError::unprocessable(
            Api::Tenant,
            format!("certInPemFormat is not a usable certificate: {e}"),
        )
    })?;
    if !info.is_ca {
        return Err(ApiError::unprocessable(
            Api::Tenant,
            "not a CA certificate (BasicConstraints CA:TRUE is required); upload the CA that \
             issues the device certificates",
        ));
    }
    let enabled = match req.status.as_deref() {
        Some(v) => status(v)?,
        None => true,
    };
    let name = req
        .name
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| info.subject.clone());
    let rec = TrustedCertRec {
        tenant: t.id.clone(),
        fingerprint: info.fingerprint.clone(),
        name,
        pem: pem_of(&info.der),
        auto_registration: req.auto_registration_enabled.unwrap_or(false),
        enabled,
        created_ms: now_ms(),
        subject: info.subject,
        issuer: info.issuer,
        not_before: info.not_before,
        not_after: info.not_after,
    };
    s.auth.dir.put_cert(rec.clone(), true).await.map_err(|e| {
        ApiError::dir(
            Api::Tenant,
            &format!("trusted certificate {}", rec.fingerprint),
            e,
        )
    })?;
    tracing::info!(tenant = %t.id, fingerprint = %rec.fingerprint, by = %c.id.user, "REST: trusted certificate added");
    Ok(json(
        StatusCode::CREATED,
        "trustedCertificate",
        &CertOut::new(&c.base, &rec),
    ))
}

/// `GET .../trusted-certificates`, by fingerprint.
pub async fn list(State(s): St, c: Caller, P(tenant): P<String>, page: Page) -> R {
    let t = c.admin_tenant(&s, &tenant, Api::Tenant)?;
    let mut certs = s.auth.dir.certs(&t.id);
    certs.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
    let items: Vec<CertOut> = certs.iter().map(|x| CertOut::new(&c.base, x)).collect();
    let url = format!(
        "{}/tenant/tenants/{}/trusted-certificates",
        c.base,
        seg(&t.id)
    );
    Ok(page.collection("trustedCertificateCollection", "certificates", &url, items))
}

fn find(
    s: &super::RestState,
    tenant: &str,
    fp: &str,
) -> Result<std::sync::Arc<TrustedCertRec>, ApiError> {
    s.auth.dir.cert(tenant, fp).ok_or_else(|| {
        ApiError::not_found(Api::Tenant, format!("trusted certificate {fp} not found"))
    })
}

/// `GET .../trusted-certificates/{fingerprint}`.
pub async fn get_one(State(s): St, c: Caller, P((tenant, fp)): P<(String, String)>) -> R {
    let t = c.admin_tenant(&s, &tenant, Api::Tenant)?;
    let cert = find(&s, &t.id, &normalise_fingerprint(&fp))?;
    Ok(json(
        StatusCode::OK,
        "trustedCertificate",
        &CertOut::new(&c.base, &cert),
    ))
}

/// `PUT .../trusted-certificates/{fingerprint}`: name, status, autoRegistrationEnabled.
pub async fn update(
    State(s): St,
    c: Caller,
    P((tenant, fp)): P<(String, String)>,
    raw: Bytes,
) -> R {
    let t = c.admin_tenant(&s, &tenant, Api::Tenant)?;
    let req: CertUpdate = body(&raw)?;
    let fp = normalise_fingerprint(&fp);
    let mut rec = (*find(&s, &t.id, &fp)?).clone();
    if let Some(n) = req.name.filter(|n| !n.trim().is_empty()) {
        rec.name = n;
    }
    if let Some(v) = req.status.as_deref() {
        rec.enabled = status(v)?;
    }
    if let Some(a) = req.auto_registration_enabled {
        rec.auto_registration = a;
    }
    s.auth
        .dir
        .put_cert(rec.clone(), false)
        .await
        .map_err(|e| ApiError::dir(Api::Tenant, &format!("trusted certificate {fp}"), e))?;
    tracing::info!(tenant = %t.id, fingerprint = %fp, enabled = rec.enabled, auto_registration = rec.auto_registration, by = %c.id.user, "REST: trusted certificate updated");
    Ok(json(
        StatusCode::OK,
        "trustedCertificate",
        &CertOut::new(&c.base, &rec),
    ))
}

/// `DELETE .../trusted-certificates/{fingerprint}`.
pub async fn delete(State(s): St, c: Caller, P((tenant, fp)): P<(String, String)>) -> R {
    let t = c.admin_tenant(&s, &tenant, Api::Tenant)?;
    let fp = normalise_fingerprint(&fp);
    find(&s, &t.id, &fp)?;
    s.auth
        .dir
        .delete_cert(&t.id, &fp)
        .await
        .map_err(|e| ApiError::dir(Api::Tenant, &format!("trusted certificate {fp}"), e))?;
    tracing::info!(tenant = %t.id, fingerprint = %fp, by = %c.id.user, "REST: trusted certificate deleted");
    Ok(no_content())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        assert_eq!(normalise_fingerprint("AB:cd:01"), "abcd01");
    }

    #[test]
    fn pem_round_trip() {
        let der: Vec<u8> = (0..100u8).collect();
        let pem = pem_of(&der);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap(),
            der
        );
    }
}
