//! Device registration (bootstrap, §6.1): a tenant admin creates a request for a device
//! identifier; the device, logged in as `management/devicebootstrap`, polls on `s/ucr` (or
//! REST `POST /devicecontrol/deviceCredentials`); its first poll moves the request from
//! WAITING_FOR_CONNECTION to PENDING_ACCEPTANCE; once the admin accepts, the next poll creates
//! the device user `device_<id>` with a fresh password and answers with the credentials (on
//! MQTT as `70,<tenant>,<user>,<password>` on `s/dcr`), and the request is done.

use super::directory::{DirError, Directory};
use super::password;
use super::records::{RequestStatus, Role};

/// Serialises polls, so two polls racing after acceptance cannot issue two passwords (the
/// second would silently invalidate the first).
static POLL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Issued device credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub tenant: String,
    pub user: String,
    pub password: String,
}

impl Credentials {
    /// The SmartREST line sent on `s/dcr`.
    pub fn smartrest(&self) -> String {
        format!("70,{},{},{}", self.tenant, self.user, self.password)
    }
}

/// One poll for `device_id`: `Some` once the request was accepted.
pub async fn poll(dir: &Directory, device_id: &str) -> Result<Option<Credentials>, DirError> {
    let _one = POLL.lock().await;
    let Some(mut req) = dir.find_request(device_id) else {
        return Ok(None);
    };
    match req.status {
        RequestStatus::WaitingForConnection => {
            req.status = RequestStatus::PendingAcceptance;
            dir.put_request(req, false).await?;
            Ok(None)
        }
        RequestStatus::PendingAcceptance => Ok(None),
        RequestStatus::Accepted => {
            let pw = password::generate(24);
            let user = format!("device_{device_id}");
            dir.create_user_generated(&req.tenant, &user, &pw, Role::Device)
                .await?;
            dir.delete_request(&req.tenant, &req.id).await?;
            tracing::info!(tenant = %req.tenant, device = %device_id, "device credentials issued");
            Ok(Some(Credentials {
                tenant: req.tenant,
                user,
                password: pw,
            }))
        }
    }
}
