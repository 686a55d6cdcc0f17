//! The cluster secret: every node-to-node call (Raft and `NodeService`) carries it in the
//! `x-fleetmq-cluster-secret` metadata, and both services refuse a call without the right one
//! (`Unauthenticated`). Without it anyone who reaches the gRPC port could append Raft entries:
//! create tenants, read sessions, take devices over. It is a shared secret, not TLS: the port
//! still belongs on a private network, but a stray client or a node of another cluster can no
//! longer talk to this one.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::ClusterError;

/// Metadata key of the secret.
pub const SECRET_HEADER: &str = "x-fleetmq-cluster-secret";

/// Adds the secret to outgoing calls (no-op without one).
#[derive(Clone, Default)]
pub struct AddSecret(Option<Arc<MetadataValue<Ascii>>>);

impl std::fmt::Debug for AddSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret itself: configs are logged.
        f.write_str(if self.0.is_some() {
            "AddSecret(set)"
        } else {
            "AddSecret(none)"
        })
    }
}

/// Checks the secret of incoming calls (accepts every call without one configured).
#[derive(Clone, Default)]
pub struct CheckSecret(Option<Arc<Vec<u8>>>);

impl std::fmt::Debug for CheckSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "CheckSecret(set)"
        } else {
            "CheckSecret(none)"
        })
    }
}

/// Both halves from the configured secret; `None` or empty: no authentication.
pub fn from_secret(secret: Option<&str>) -> Result<(AddSecret, CheckSecret), ClusterError> {
    let Some(s) = secret.filter(|s| !s.is_empty()) else {
        return Ok((AddSecret(None), CheckSecret(None)));
    };
    let value = MetadataValue::try_from(s).map_err(|_| {
        ClusterError::Raft("the cluster secret must be printable ASCII (a header value)".into())
    })?;
    Ok((
        AddSecret(Some(Arc::new(value))),
        CheckSecret(Some(Arc::new(s.as_bytes().to_vec()))),
    ))
}

impl Interceptor for AddSecret {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request
                .metadata_mut()
                .insert(SECRET_HEADER, v.as_ref().clone());
        }
        Ok(request)
    }
}

impl Interceptor for CheckSecret {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.0 else {
            return Ok(request);
        };
        let got = request
            .metadata()
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        // Constant time: the comparison must not tell an attacker how much of a guess is right.
        if bool::from(got.ct_eq(want.as_slice())) {
            Ok(request)
        } else {
            metrics::counter!("fleetmq_cluster_unauthenticated_calls_total").increment(1);
            tracing::warn!("refused a cluster call without the right cluster secret");
            Err(Status::unauthenticated("wrong or missing cluster secret"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(secret: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(s) = secret {
            r.metadata_mut()
                .insert(SECRET_HEADER, MetadataValue::try_from(s).expect("ascii"));
        }
        r
    }

    #[test]
    fn only_the_right_secret_passes() {
        let (mut add, mut check) = from_secret(Some("s3cret")).expect("secret");
        let sent = add.call(Request::new(())).expect("add");
        assert!(check.call(sent).is_ok());
        for wrong in [None, Some("s3cre"), Some("s3cret!"), Some("")] {
            let e = check.call(with(wrong)).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
    }

    #[test]
    fn no_secret_configured_accepts_everything() {
        let (mut add, mut check) = from_secret(None).expect("none");
        let sent = add.call(Request::new(())).expect("add");
        assert!(sent.metadata().get(SECRET_HEADER).is_none());
        assert!(check.call(with(Some("anything"))).is_ok());
        assert!(from_secret(Some("bad\nvalue")).is_err());
    }
}
