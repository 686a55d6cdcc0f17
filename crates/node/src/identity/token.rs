//! Device access tokens (`s/uat` → `71,<JWT>` on `s/dat`, §1.6) for certificate devices.
//!
//! HS256 with a random key kept in the directory, so every node signs and checks with the same
//! key. thin-edge derives the tenant URL from `iss`, so `iss` is the tenant's domain.

use serde::{Deserialize, Serialize};

use super::auth::Identity;
use super::directory::{DirError, Directory};
use crate::message::now_ms;

const KEY_SETTING: &str = "device-token-key";

/// The claims of a device token (the fields Cumulocity's tokens carry).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Claims {
    pub jti: String,
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub tci: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub tfa: bool,
    pub ten: String,
    pub xsrf_token: String,
}

async fn key(dir: &Directory) -> Result<Vec<u8>, DirError> {
    dir.setting_or_init(KEY_SETTING, || rand::random::<[u8; 32]>().to_vec())
        .await
}

/// Issues a token for an authenticated device, valid for `lifetime_secs`.
pub async fn issue(
    dir: &Directory,
    who: &Identity,
    lifetime_secs: u64,
) -> Result<String, DirError> {
    let key = key(dir).await?;
    let now = now_ms() / 1000;
    let claims = Claims {
        jti: format!("{:032x}", rand::random::<u128>()),
        iss: who.tenant.domain.clone(),
        aud: who.tenant.domain.clone(),
        sub: who.user.clone(),
        tci: "device_token_config".into(),
        iat: now,
        nbf: now,
        exp: now + lifetime_secs,
        tfa: false,
        ten: who.tenant.id.clone(),
        xsrf_token: format!("{:016x}", rand::random::<u64>()),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&key),
    )
    .map_err(|e| DirError::Invalid(e.to_string()))
}

/// Checks a token's signature and expiry and returns its claims.
pub async fn verify(dir: &Directory, token: &str) -> Option<Claims> {
    let key = key(dir).await.ok()?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.validate_aud = false;
    jsonwebtoken::decode::<Claims>(token, &jsonwebtoken::DecodingKey::from_secret(&key), &v)
        .ok()
        .map(|d| d.claims)
}
