//! `/tenant/tenants[/{id}]` and `/tenant/currentTenant`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::model::{CurrentTenant, NewTenant, TenantOut, TenantUpdate};
use super::{body, json, no_content, required, Api, ApiError, Caller, Page, RestState, St, P};
use crate::identity::directory::DirError;
use crate::identity::records::{Role, TenantRec, UserRec, MANAGEMENT};
use crate::message::now_ms;

type R = Result<Response, ApiError>;

/// The name of the tenant's first administrator (by name), shown as `adminName`.
fn admin_name(s: &RestState, tenant: &str) -> Option<String> {
    s.auth
        .dir
        .users(tenant)
        .into_iter()
        .find(|u| u.role == Role::Admin)
        .map(|u| u.user_name.clone())
}

fn out(s: &RestState, c: &Caller, t: &TenantRec) -> TenantOut {
    TenantOut::new(&c.base, t, admin_name(s, &t.id))
}

fn check_domain(domain: &str) -> Result<(), ApiError> {
    if domain.contains(['/', ':']) || domain.chars().any(char::is_whitespace) {
        return Err(ApiError::unprocessable(
            Api::Tenant,
            "domain must not contain '/', ':' or white space",
        ));
    }
    Ok(())
}

/// `POST /tenant/tenants`: a new tenant and its first administrator.
pub async fn create(State(s): St, c: Caller, raw: Bytes) -> R {
    c.require_management_admin()?;
    let req: NewTenant = body(&raw)?;
    let company = required(req.company, "company")?;
    let domain = required(req.domain, "domain")?.trim().to_string();
    check_domain(&domain)?;
    let admin_name = req.admin_name.filter(|n| !n.trim().is_empty());
    let admin_pass = req.admin_pass.filter(|p| !p.is_empty());
    let admin = match (admin_name, admin_pass) {
        (None, None) => None,
        (Some(n), Some(p)) => Some((n, p)),
        (None, Some(_)) => return Err(ApiError::missing("adminName")),
        (Some(_), None) => return Err(ApiError::missing("adminPass")),
    };
    let dir = &s.auth.dir;
    // Hash first, so a hashing failure cannot leave a tenant without its administrator.
    let admin_rec = match &admin {
        Some((name, pass)) => Some(UserRec {
            tenant: String::new(),
            user_name: name.clone(),
            password_hash: Some(
                dir.passwords
                    .hash(pass)
                    .await
                    .map_err(|e| ApiError::dir(Api::User, "user", DirError::Hash(e)))?,
            ),
            role: Role::Admin,
            created_ms: now_ms(),
            email: req.admin_email.filter(|e| !e.is_empty()),
            cert_auth: false,
        }),
        None => None,
    };
    let t = dir
        .create_tenant(&company, &domain, req.fleetmq_limits.unwrap_or_default())
        .await
        .map_err(|e| ApiError::dir(Api::Tenant, &format!("a tenant with domain {domain}"), e))?;
    if let Some(mut u) = admin_rec {
        u.tenant = t.id.clone();
        if let Err(e) = dir.put_user(u, true).await {
            // Undo: a tenant nobody can administer is worse than none.
            let _ = dir.delete_tenant(&t.id).await;
            return Err(ApiError::dir(Api::User, "administrator", e));
        }
    }
    tracing::info!(tenant = %t.id, domain = %t.domain, by = %c.id.user, "REST: tenant created");
    Ok(json(StatusCode::CREATED, "tenant", &out(&s, &c, &t)))
}

/// `GET /tenant/tenants`: all tenants for management administrators, the caller's own for a
/// tenant administrator.
pub async fn list(State(s): St, c: Caller, page: Page) -> R {
    c.require_admin()?;
    let tenants = if c.is_management_admin() {
        s.auth.dir.tenants()
    } else {
        s.auth.dir.tenant(&c.tenant().id).into_iter().collect()
    };
    let items: Vec<TenantOut> = tenants.iter().map(|t| out(&s, &c, t)).collect();
    let url = format!("{}/tenant/tenants", c.base);
    Ok(page.collection("tenantCollection", "tenants", &url, items))
}

/// `GET /tenant/tenants/{id}` (id or domain).
pub async fn get_one(State(s): St, c: Caller, P(id): P<String>) -> R {
    let t = c.admin_tenant(&s, &id, Api::Tenant)?;
    Ok(json(StatusCode::OK, "tenant", &out(&s, &c, &t)))
}

/// `PUT /tenant/tenants/{id}`: company, domain, limits.
pub async fn update(State(s): St, c: Caller, P(id): P<String>, raw: Bytes) -> R {
    c.require_management_admin()?;
    let t = c.admin_tenant(&s, &id, Api::Tenant)?;
    let req: TenantUpdate = body(&raw)?;
    let mut rec = (*t).clone();
    if let Some(company) = req.company {
        rec.company = company;
    }
    if let Some(domain) = req.domain {
        let domain = domain.trim().to_string();
        if domain.is_empty() {
            return Err(ApiError::unprocessable(
                Api::Tenant,
                "domain must not be empty",
            ));
        }
        check_domain(&domain)?;
        if rec.id == MANAGEMENT && domain != rec.domain {
            return Err(ApiError::unprocessable(
                Api::Tenant,
                "the management tenant's domain cannot be changed",
            ));
        }
        rec.domain = domain;
    }
    if let Some(limits) = req.fleetmq_limits {
        rec.limits = limits;
    }
    let what = format!("a tenant with domain {}", rec.domain);
    s.auth
        .dir
        .put_tenant(rec.clone(), false)
        .await
        .map_err(|e| ApiError::dir(Api::Tenant, &what, e))?;
    tracing::info!(tenant = %rec.id, by = %c.id.user, "REST: tenant updated");
    Ok(json(StatusCode::OK, "tenant", &out(&s, &c, &rec)))
}

/// `DELETE /tenant/tenants/{id}`: the tenant with its users, requests and certificates.
pub async fn delete(State(s): St, c: Caller, P(id): P<String>) -> R {
    c.require_management_admin()?;
    let t = c.admin_tenant(&s, &id, Api::Tenant)?;
    if t.id == MANAGEMENT {
        return Err(ApiError::unprocessable(
            Api::Tenant,
            "the management tenant cannot be deleted",
        ));
    }
    s.auth
        .dir
        .delete_tenant(&t.id)
        .await
        .map_err(|e| ApiError::dir(Api::Tenant, &format!("tenant {}", t.id), e))?;
    tracing::info!(tenant = %t.id, by = %c.id.user, "REST: tenant deleted");
    Ok(no_content())
}

/// `GET /tenant/currentTenant`.
pub async fn current(c: Caller) -> R {
    c.require_not_bootstrap()?;
    Ok(json(
        StatusCode::OK,
        "currentTenant",
        &CurrentTenant::new(&c.base, c.tenant()),
    ))
}
