//! Device registration (§6, §11.5): `/devicecontrol/newDeviceRequests[/{id}]` for tenant
//! administrators and `POST /devicecontrol/deviceCredentials` for the bootstrap user (the same
//! state machine as the MQTT `s/ucr` poll).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;

use super::model::{
    seg, CredentialsRequest, DeviceCredentialsOut, DeviceRequestOut, DeviceRequestUpdate,
    NewDeviceRequest,
};
use super::{body, json, no_content, required, Api, ApiError, Caller, Page, RestState, St, P};
use crate::identity::bootstrap;
use crate::identity::records::{DeviceRequestRec, RequestStatus, Role};
use crate::message::now_ms;

type R = Result<Response, ApiError>;

/// `POST /devicecontrol/newDeviceRequests` `{id, groupId?, type?}`: registers a device
/// identifier for the caller's tenant (management administrators may name another tenant
/// with `tenantId`).
pub async fn create(State(s): St, c: Caller, raw: Bytes) -> R {
    c.require_admin()?;
    let req: NewDeviceRequest = body(&raw)?;
    let id = required(req.id, "id")?;
    let tenant = match req.tenant_id.filter(|t| !t.is_empty()) {
        Some(t) => c.admin_tenant(&s, &t, Api::DeviceControl)?,
        None => c.tenant().clone(),
    };
    let rec = DeviceRequestRec {
        tenant: tenant.id.clone(),
        id: id.clone(),
        status: RequestStatus::WaitingForConnection,
        created_ms: now_ms(),
        owner: c.id.user.clone(),
        group_id: req.group_id,
        device_type: req.device_type,
    };
    s.auth
        .dir
        .put_request(rec.clone(), true)
        .await
        .map_err(|e| {
            ApiError::dir(
                Api::DeviceControl,
                &format!("an open registration request for device {id}"),
                e,
            )
        })?;
    tracing::info!(tenant = %rec.tenant, device = %id, by = %c.id.user, "REST: device registration requested");
    Ok(json(
        StatusCode::CREATED,
        "newDeviceRequest",
        &DeviceRequestOut::new(&c.base, &rec),
    ))
}

/// `GET /devicecontrol/newDeviceRequests`: the caller's tenant's requests (every tenant's for
/// management administrators), by id.
pub async fn list(State(s): St, c: Caller, page: Page) -> R {
    c.require_admin()?;
    let dir = &s.auth.dir;
    let mut reqs = if c.is_management_admin() {
        dir.tenants()
            .iter()
            .flat_map(|t| dir.requests(&t.id))
            .collect::<Vec<_>>()
    } else {
        dir.requests(&c.tenant().id)
    };
    reqs.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| a.tenant.cmp(&b.tenant)));
    let items: Vec<DeviceRequestOut> = reqs
        .iter()
        .map(|r| DeviceRequestOut::new(&c.base, r))
        .collect();
    let url = format!("{}/devicecontrol/newDeviceRequests", c.base);
    Ok(page.collection(
        "newDeviceRequestCollection",
        "newDeviceRequests",
        &url,
        items,
    ))
}

/// The request for `id` if the caller may see it (404 otherwise: identifiers are global, and
/// another tenant's request is simply not there for a tenant administrator).
fn visible(s: &RestState, c: &Caller, id: &str) -> Result<DeviceRequestRec, ApiError> {
    c.require_admin()?;
    let found = if c.is_management_admin() {
        s.auth.dir.find_request(id)
    } else {
        s.auth.dir.request(&c.tenant().id, id)
    };
    found.ok_or_else(|| {
        ApiError::not_found(
            Api::DeviceControl,
            format!("no registration request for device {id}"),
        )
    })
}

/// `GET /devicecontrol/newDeviceRequests/{id}`.
pub async fn get_one(State(s): St, c: Caller, P(id): P<String>) -> R {
    let r = visible(&s, &c, &id)?;
    Ok(json(
        StatusCode::OK,
        "newDeviceRequest",
        &DeviceRequestOut::new(&c.base, &r),
    ))
}

/// `PUT /devicecontrol/newDeviceRequests/{id}` `{"status":"ACCEPTED"}`: only from
/// PENDING_ACCEPTANCE, i.e. after the device has polled at least once. Accepting an already
/// accepted request changes nothing (so a retried PUT succeeds).
pub async fn update(State(s): St, c: Caller, P(id): P<String>, raw: Bytes) -> R {
    let mut r = visible(&s, &c, &id)?;
    let req: DeviceRequestUpdate = body(&raw)?;
    let status = required(req.status, "status")?;
    if !status.eq_ignore_ascii_case(RequestStatus::Accepted.as_str()) {
        return Err(ApiError::unprocessable(
            Api::DeviceControl,
            format!("status {status} cannot be set; only ACCEPTED"),
        ));
    }
    match r.status {
        RequestStatus::WaitingForConnection => {
            return Err(ApiError::unprocessable(
                Api::DeviceControl,
                format!(
                    "device {id} has not polled yet (status WAITING_FOR_CONNECTION); it can be \
                     accepted once it has connected with the bootstrap credentials and is \
                     PENDING_ACCEPTANCE"
                ),
            ))
        }
        RequestStatus::Accepted => {}
        RequestStatus::PendingAcceptance => {
            r.status = RequestStatus::Accepted;
            s.auth
                .dir
                .put_request(r.clone(), false)
                .await
                .map_err(|e| {
                    ApiError::dir(
                        Api::DeviceControl,
                        &format!("registration request for device {id}"),
                        e,
                    )
                })?;
            tracing::info!(tenant = %r.tenant, device = %id, by = %c.id.user, "REST: device registration accepted");
        }
    }
    Ok(json(
        StatusCode::OK,
        "newDeviceRequest",
        &DeviceRequestOut::new(&c.base, &r),
    ))
}

/// `DELETE /devicecontrol/newDeviceRequests/{id}`.
pub async fn delete(State(s): St, c: Caller, P(id): P<String>) -> R {
    let r = visible(&s, &c, &id)?;
    s.auth
        .dir
        .delete_request(&r.tenant, &r.id)
        .await
        .map_err(|e| {
            ApiError::dir(
                Api::DeviceControl,
                &format!("registration request for device {id}"),
                e,
            )
        })?;
    tracing::info!(tenant = %r.tenant, device = %id, by = %c.id.user, "REST: device registration request deleted");
    Ok(no_content())
}

/// `POST /devicecontrol/deviceCredentials` `{id}` (bootstrap user only): one poll; 404 until
/// the request was accepted, then 201 with the new device user's credentials (once).
pub async fn credentials(State(s): St, c: Caller, raw: Bytes) -> R {
    if c.id.role != Role::Bootstrap {
        return Err(ApiError::forbidden(
            "only the device bootstrap user may request device credentials",
        ));
    }
    let req: CredentialsRequest = body(&raw)?;
    let id = required(req.id, "id")?;
    let issued = bootstrap::poll(&s.auth.dir, &id).await.map_err(|e| {
        ApiError::dir(
            Api::DeviceControl,
            &format!("registration request for device {id}"),
            e,
        )
    })?;
    let Some(cr) = issued else {
        return Err(ApiError::not_found(
            Api::DeviceControl,
            format!("no accepted registration request for device {id}"),
        ));
    };
    let out = DeviceCredentialsOut {
        self_: format!("{}/devicecontrol/deviceCredentials/{}", c.base, seg(&id)),
        id,
        tenant_id: cr.tenant,
        username: cr.user,
        password: cr.password,
    };
    let mut resp = json(StatusCode::CREATED, "deviceCredentials", &out);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
