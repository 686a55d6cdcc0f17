//! `/user/{tenant}/users[/{userName}]` and `/user/currentUser`. `{tenant}` is a tenant id or
//! domain. Passwords are hashed on the way in and never returned.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::model::{parse_role, role_str, user_url, CurrentUser, NewUser, UserOut, UserUpdate};
use super::{body, json, no_content, required, Api, ApiError, Caller, Page, RestState, St, P};
use crate::identity::directory::DirError;
use crate::identity::records::{Role, UserRec};
use crate::message::now_ms;

type R = Result<Response, ApiError>;

fn role(s: &str) -> Result<Role, ApiError> {
    parse_role(s).ok_or_else(|| {
        ApiError::unprocessable(Api::User, "fleetmqRole must be one of admin, user, device")
    })
}

async fn hash(s: &RestState, password: &str) -> Result<String, ApiError> {
    s.auth
        .dir
        .passwords
        .hash(password)
        .await
        .map_err(|e| ApiError::dir(Api::User, "user", DirError::Hash(e)))
}

/// True when `u` is the only administrator of its tenant.
fn last_admin(s: &RestState, u: &UserRec) -> bool {
    u.role == Role::Admin
        && !s
            .auth
            .dir
            .users(&u.tenant)
            .iter()
            .any(|o| o.role == Role::Admin && o.user_name != u.user_name)
}

fn last_admin_error(tenant: &str) -> ApiError {
    ApiError::unprocessable(
        Api::User,
        format!(
            "this is the last administrator of tenant {tenant}; create another administrator first"
        ),
    )
}

/// `POST /user/{tenant}/users`.
pub async fn create(State(s): St, c: Caller, P(tenant): P<String>, raw: Bytes) -> R {
    let t = c.admin_tenant(&s, &tenant, Api::User)?;
    let req: NewUser = body(&raw)?;
    let name = required(req.user_name, "userName")?;
    let role = match req.fleetmq_role.as_deref() {
        Some(r) => role(r)?,
        None if name.starts_with("device_") => Role::Device,
        None => Role::User,
    };
    let password = req.password.filter(|p| !p.is_empty());
    if password.is_none() && role != Role::Device {
        return Err(ApiError::missing("password"));
    }
    let password_hash = match &password {
        Some(p) => Some(hash(&s, p).await?),
        None => None,
    };
    let rec = UserRec {
        tenant: t.id.clone(),
        user_name: name.clone(),
        cert_auth: password_hash.is_none(),
        password_hash,
        role,
        created_ms: now_ms(),
        email: req.email.filter(|e| !e.is_empty()),
    };
    let rec = s
        .auth
        .dir
        .put_user(rec, true)
        .await
        .map_err(|e| ApiError::dir(Api::User, &format!("user {name}"), e))?;
    tracing::info!(tenant = %t.id, user = %name, role = role_str(role), by = %c.id.user, "REST: user created");
    Ok(json(
        StatusCode::CREATED,
        "user",
        &UserOut::new(&c.base, &rec),
    ))
}

/// `GET /user/{tenant}/users`.
pub async fn list(State(s): St, c: Caller, P(tenant): P<String>, page: Page) -> R {
    let t = c.admin_tenant(&s, &tenant, Api::User)?;
    let items: Vec<UserOut> = s
        .auth
        .dir
        .users(&t.id)
        .iter()
        .map(|u| UserOut::new(&c.base, u))
        .collect();
    let url = format!("{}/user/{}/users", c.base, super::model::seg(&t.id));
    Ok(page.collection("userCollection", "users", &url, items))
}

fn find(s: &RestState, tenant: &str, name: &str) -> Result<std::sync::Arc<UserRec>, ApiError> {
    s.auth
        .dir
        .user(tenant, name)
        .ok_or_else(|| ApiError::not_found(Api::User, format!("user {name} not found")))
}

/// `GET /user/{tenant}/users/{userName}`.
pub async fn get_one(State(s): St, c: Caller, P((tenant, name)): P<(String, String)>) -> R {
    let t = c.admin_tenant(&s, &tenant, Api::User)?;
    let u = find(&s, &t.id, &name)?;
    Ok(json(StatusCode::OK, "user", &UserOut::new(&c.base, &u)))
}

/// `PUT /user/{tenant}/users/{userName}`: password, email, fleetmqRole.
pub async fn update(
    State(s): St,
    c: Caller,
    P((tenant, name)): P<(String, String)>,
    raw: Bytes,
) -> R {
    let t = c.admin_tenant(&s, &tenant, Api::User)?;
    let req: UserUpdate = body(&raw)?;
    let current = find(&s, &t.id, &name)?;
    let mut rec = (*current).clone();
    if let Some(r) = req.fleetmq_role.as_deref() {
        let r = role(r)?;
        if r != Role::Admin && last_admin(&s, &current) {
            return Err(last_admin_error(&t.id));
        }
        rec.role = r;
    }
    if let Some(p) = req.password {
        if p.is_empty() {
            return Err(ApiError::unprocessable(
                Api::User,
                "password must not be empty",
            ));
        }
        rec.password_hash = Some(hash(&s, &p).await?);
    }
    if let Some(e) = req.email {
        rec.email = Some(e).filter(|e| !e.is_empty());
    }
    let rec = s
        .auth
        .dir
        .put_user(rec, false)
        .await
        .map_err(|e| ApiError::dir(Api::User, &format!("user {name}"), e))?;
    tracing::info!(tenant = %t.id, user = %name, by = %c.id.user, "REST: user updated");
    Ok(json(StatusCode::OK, "user", &UserOut::new(&c.base, &rec)))
}

/// `DELETE /user/{tenant}/users/{userName}`.
pub async fn delete(State(s): St, c: Caller, P((tenant, name)): P<(String, String)>) -> R {
    let t = c.admin_tenant(&s, &tenant, Api::User)?;
    let current = find(&s, &t.id, &name)?;
    if last_admin(&s, &current) {
        return Err(last_admin_error(&t.id));
    }
    s.auth
        .dir
        .delete_user(&t.id, &name)
        .await
        .map_err(|e| ApiError::dir(Api::User, &format!("user {name}"), e))?;
    tracing::info!(tenant = %t.id, user = %name, by = %c.id.user, "REST: user deleted");
    Ok(no_content())
}

/// `GET /user/currentUser`.
pub async fn current(c: Caller) -> R {
    c.require_not_bootstrap()?;
    Ok(json(
        StatusCode::OK,
        "currentUser",
        &CurrentUser {
            id: c.id.user.clone(),
            user_name: c.id.user.clone(),
            self_: user_url(&c.base, &c.tenant().id, &c.id.user),
            fleetmq_role: role_str(c.id.role),
            tenant: c.tenant().id.clone(),
        },
    ))
}
