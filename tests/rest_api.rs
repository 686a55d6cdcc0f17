//! The REST API against a real node: tenants, users, device registration over REST, trusted
//! certificates and paging, with the per-tenant authorisation rules.
mod common;

use base64::Engine;
use common::*;
use serde_json::{json, Value};

/// One HTTP exchange.
struct Resp {
    status: u16,
    body: Value,
    text: String,
    content_type: String,
    www_authenticate: Option<String>,
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.text)
    }
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

struct Rest {
    base: String,
}

impl Rest {
    fn new(node: &Node) -> Rest {
        Rest {
            base: format!("http://{}", node.http),
        }
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    fn call(&self, method: &str, path: &str, auth: Option<&str>, body: Option<Value>) -> Resp {
        let mut req =
            ureq::request(method, &self.url(path)).timeout(std::time::Duration::from_secs(30));
        if let Some(a) = auth {
            req = req.set("Authorization", a);
        }
        let result = match body {
            // Cumulocity clients send vendor media types; the API must accept them.
            Some(b) => req
                .set(
                    "Content-Type",
                    "application/vnd.com.nsn.cumulocity.tenant+json",
                )
                .set("Accept", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let content_type = resp.header("Content-Type").unwrap_or("").to_string();
        let www_authenticate = resp.header("WWW-Authenticate").map(str::to_string);
        let text = resp.into_string().unwrap_or_default();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::Null)
        };
        Resp {
            status,
            body,
            text,
            content_type,
            www_authenticate,
        }
    }

    fn get(&self, path: &str, auth: &str) -> Resp {
        self.call("GET", path, Some(auth), None)
    }
    fn post(&self, path: &str, auth: &str, body: Value) -> Resp {
        self.call("POST", path, Some(auth), Some(body))
    }
    fn put(&self, path: &str, auth: &str, body: Value) -> Resp {
        self.call("PUT", path, Some(auth), Some(body))
    }
    fn delete(&self, path: &str, auth: &str) -> Resp {
        self.call("DELETE", path, Some(auth), None)
    }
}

fn mgmt() -> String {
    basic("management/admin", ADMIN_PW)
}

fn bootstrap() -> String {
    basic("management/devicebootstrap", BOOTSTRAP_PW)
}

/// Asserts an error response: status, `error` code and the common error shape.
#[track_caller]
fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.body["error"], code, "{r:?}");
    assert!(
        r.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{r:?}"
    );
    assert_eq!(r.body["info"], "see docs/security.md", "{r:?}");
    assert!(
        r.content_type
            .starts_with("application/vnd.com.nsn.cumulocity.error+json"),
        "{}",
        r.content_type
    );
}

fn is_tenant_id(s: &str) -> bool {
    s.len() == 9 && s.starts_with('t') && s[1..].bytes().all(|b| b.is_ascii_digit())
}

/// Creates a tenant with an administrator as the management admin; returns its id.
fn create_tenant(api: &Rest, domain: &str, admin: &str, pw: &str) -> String {
    let r = api.post(
        "/tenant/tenants",
        &mgmt(),
        json!({"company": format!("{domain} Inc."), "domain": domain,
               "adminName": admin, "adminPass": pw}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_str().unwrap().to_string()
}

fn ids(list: &Value, key: &str, field: &str) -> Vec<String> {
    list[key]
        .as_array()
        .unwrap_or_else(|| panic!("no array {key} in {list}"))
        .iter()
        .map(|v| v[field].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn management_admin_creates_and_lists_tenants() {
    let node = Node::start_secure();
    let api = Rest::new(&node);

    let r = api.post(
        "/tenant/tenants",
        &mgmt(),
        json!({"company": "Acme Corp", "domain": "acme", "adminName": "boss",
               "adminPass": "acme-pw", "adminEmail": "boss@acme.example",
               "fleetmqLimits": {"maxConnections": 50}}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert!(
        r.content_type
            .starts_with("application/vnd.com.nsn.cumulocity.tenant+json"),
        "{}",
        r.content_type
    );
    let a = r.body["id"].as_str().unwrap().to_string();
    assert!(is_tenant_id(&a), "{a}");
    // An unknown path gets the API's JSON error, not an empty page.
    assert_error(
        &api.get("/no/such/resource", &mgmt()),
        404,
        "general/Not Found",
    );
    assert_eq!(r.body["company"], "Acme Corp");
    assert_eq!(r.body["domain"], "acme");
    assert_eq!(r.body["status"], "ACTIVE");
    assert_eq!(r.body["adminName"], "boss");
    assert_eq!(r.body["fleetmqLimits"]["maxConnections"], 50);
    assert_eq!(r.body["self"], format!("{}/tenant/tenants/{a}", api.base));
    let created = r.body["creationTime"].as_str().unwrap();
    assert!(
        created.len() >= 20 && created.ends_with('Z') && &created[10..11] == "T",
        "{created}"
    );
    assert!(!r.text.contains("acme-pw"));

    let b = create_tenant(&api, "globex", "chief", "globex-pw");
    assert!(is_tenant_id(&b), "{b}");
    assert_ne!(a, b);

    let list = api.get("/tenant/tenants?pageSize=100", &mgmt());
    assert_eq!(list.status, 200, "{list:?}");
    assert!(list
        .content_type
        .starts_with("application/vnd.com.nsn.cumulocity.tenantCollection+json"));
    let listed = ids(&list.body, "tenants", "id");
    for t in [&a, &b, &"management".to_string()] {
        assert!(listed.contains(t), "{t} missing from {listed:?}");
    }
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "tenants ordered by id");
    assert_eq!(list.body["statistics"]["pageSize"], 100);
    assert_eq!(list.body["statistics"]["currentPage"], 1);
    assert!(list.body.get("next").is_none());

    let one = api.get(&format!("/tenant/tenants/{a}"), &mgmt());
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(one.body["domain"], "acme");

    // The new administrator can log in, with the tenant id or the domain.
    for login in [format!("{a}/boss"), "acme/boss".to_string()] {
        let cur = api.get("/tenant/currentTenant", &basic(&login, "acme-pw"));
        assert_eq!(cur.status, 200, "{cur:?}");
        assert_eq!(cur.body["name"], a.as_str());
        assert_eq!(cur.body["domainName"], "acme");
        assert_eq!(cur.body["companyName"], "Acme Corp");
    }

    // Duplicate domain, in any case.
    for dup in ["acme", "ACME"] {
        let r = api.post(
            "/tenant/tenants",
            &mgmt(),
            json!({"company": "Other", "domain": dup, "adminName": "x", "adminPass": "y"}),
        );
        assert_error(&r, 409, "tenant/Duplicate");
    }

    // Mandatory fields and malformed JSON.
    let r = api.post("/tenant/tenants", &mgmt(), json!({"company": "No Domain"}));
    assert_error(&r, 400, "general/Bad Request");
    assert!(
        r.body["message"].as_str().unwrap().contains("domain"),
        "{r:?}"
    );
    let r = api.post(
        "/tenant/tenants",
        &mgmt(),
        json!({"company": "C", "domain": "half", "adminName": "x"}),
    );
    assert_error(&r, 400, "general/Bad Request");
    assert!(
        r.body["message"].as_str().unwrap().contains("adminPass"),
        "{r:?}"
    );
    let r = api.call(
        "POST",
        "/tenant/tenants",
        Some(&mgmt()),
        Some(json!("not an object")),
    );
    assert_error(&r, 400, "general/Bad Request");

    // Update and delete.
    let r = api.put(
        &format!("/tenant/tenants/{b}"),
        &mgmt(),
        json!({"company": "Globex Renamed", "fleetmqLimits": {"maxSessions": 3}}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["company"], "Globex Renamed");
    assert_eq!(r.body["fleetmqLimits"]["maxSessions"], 3);
    assert_error(
        &api.delete("/tenant/tenants/management", &mgmt()),
        422,
        "tenant/Unprocessable Entity",
    );
    let c = create_tenant(&api, "initech", "bill", "initech-pw");
    let r = api.delete(&format!("/tenant/tenants/{c}"), &mgmt());
    assert_eq!(r.status, 204, "{r:?}");
    assert_error(
        &api.get(&format!("/tenant/tenants/{c}"), &mgmt()),
        404,
        "tenant/Not Found",
    );
    let cur = api.get(
        "/tenant/currentTenant",
        &basic("initech/bill", "initech-pw"),
    );
    assert_error(&cur, 401, "security/Unauthorized");
}

#[test]
fn tenant_admins_are_confined_to_their_tenant() {
    let node = Node::start_secure();
    let api = Rest::new(&node);
    let a = create_tenant(&api, "acme", "boss", "acme-pw");
    let b = create_tenant(&api, "globex", "chief", "globex-pw");
    let admin_a_id = basic(&format!("{a}/boss"), "acme-pw");
    let admin_a_dom = basic("acme/boss", "acme-pw");

    // Users of its own tenant, by tenant id and by domain, with either login.
    let r = api.post(
        &format!("/user/{a}/users"),
        &admin_a_id,
        json!({"userName": "alice", "password": "alice-pw", "email": "alice@acme.example"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert!(r
        .content_type
        .starts_with("application/vnd.com.nsn.cumulocity.user+json"));
    assert_eq!(r.body["id"], "alice");
    assert_eq!(r.body["userName"], "alice");
    assert_eq!(r.body["fleetmqRole"], "user");
    assert_eq!(r.body["email"], "alice@acme.example");
    assert_eq!(r.body["self"], format!("{}/user/{a}/users/alice", api.base));
    assert!(r.body["creationTime"].as_str().is_some());
    assert!(r.body.get("password").is_none() && !r.text.contains("alice-pw"));
    assert!(!r.text.contains("argon2"), "{r:?}");

    let r = api.post(
        "/user/acme/users",
        &admin_a_dom,
        json!({"userName": "device_cert-only"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["fleetmqRole"], "device");
    let r = api.post(
        "/user/acme/users",
        &admin_a_dom,
        json!({"userName": "nopw"}),
    );
    assert_error(&r, 400, "general/Bad Request");
    assert!(r.body["message"].as_str().unwrap().contains("password"));
    let r = api.post(
        "/user/acme/users",
        &admin_a_dom,
        json!({"userName": "alice", "password": "again"}),
    );
    assert_error(&r, 409, "user/Duplicate");

    let list = api.get("/user/acme/users", &admin_a_dom);
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(
        ids(&list.body, "users", "userName"),
        vec!["alice", "boss", "device_cert-only"]
    );
    assert!(!list.text.contains("argon2"));
    let one = api.get(&format!("/user/{a}/users/alice"), &admin_a_id);
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(one.body["email"], "alice@acme.example");
    assert_error(
        &api.get(&format!("/user/{a}/users/nobody"), &admin_a_id),
        404,
        "user/Not Found",
    );

    // Nothing of tenant B, by id or domain, and nothing that tells whether a tenant exists.
    for t in [b.as_str(), "globex", "no-such-tenant"] {
        assert_error(
            &api.get(&format!("/user/{t}/users"), &admin_a_id),
            403,
            "security/Forbidden",
        );
        assert_error(
            &api.get(&format!("/user/{t}/users/chief"), &admin_a_dom),
            403,
            "security/Forbidden",
        );
        assert_error(
            &api.post(
                &format!("/user/{t}/users"),
                &admin_a_id,
                json!({"userName": "intruder", "password": "x"}),
            ),
            403,
            "security/Forbidden",
        );
    }
    assert_error(
        &api.delete(&format!("/user/{b}/users/chief"), &admin_a_id),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.get(&format!("/tenant/tenants/{b}"), &admin_a_id),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.get("/user/management/users", &admin_a_id),
        403,
        "security/Forbidden",
    );
    // The management admin still can.
    let r = api.get(&format!("/user/{b}/users"), &mgmt());
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(ids(&r.body, "users", "userName"), vec!["chief"]);

    // Tenants: only its own, and no creating.
    let own = api.get("/tenant/tenants?pageSize=100", &admin_a_id);
    assert_eq!(own.status, 200, "{own:?}");
    assert_eq!(ids(&own.body, "tenants", "id"), vec![a.clone()]);
    assert_error(
        &api.post(
            "/tenant/tenants",
            &admin_a_id,
            json!({"company": "X", "domain": "x", "adminName": "a", "adminPass": "b"}),
        ),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.put(
            &format!("/tenant/tenants/{a}"),
            &admin_a_id,
            json!({"company": "Mine"}),
        ),
        403,
        "security/Forbidden",
    );

    // A plain user: only currentUser/currentTenant.
    let alice = basic("acme/alice", "alice-pw");
    let me = api.get("/user/currentUser", &alice);
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.body["userName"], "alice");
    assert_eq!(me.body["fleetmqRole"], "user");
    assert_eq!(me.body["tenant"], a.as_str());
    assert_eq!(
        me.body["self"],
        format!("{}/user/{a}/users/alice", api.base)
    );
    assert!(me
        .content_type
        .starts_with("application/vnd.com.nsn.cumulocity.currentUser+json"));
    assert_eq!(
        api.get("/tenant/currentTenant", &alice).body["name"],
        a.as_str()
    );
    assert_error(
        &api.get("/user/acme/users", &alice),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.get("/tenant/tenants", &alice),
        403,
        "security/Forbidden",
    );

    // The last administrator cannot be removed or demoted.
    assert_error(
        &api.delete(&format!("/user/{a}/users/boss"), &admin_a_id),
        422,
        "user/Unprocessable Entity",
    );
    assert_error(
        &api.put(
            &format!("/user/{a}/users/boss"),
            &admin_a_id,
            json!({"fleetmqRole": "user"}),
        ),
        422,
        "user/Unprocessable Entity",
    );
    // PUT changes password and role; DELETE removes.
    let r = api.put(
        &format!("/user/{a}/users/alice"),
        &admin_a_id,
        json!({"password": "alice-pw-2", "fleetmqRole": "admin"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["fleetmqRole"], "admin");
    assert_error(
        &api.get("/user/currentUser", &alice),
        401,
        "security/Unauthorized",
    );
    let alice2 = basic("acme/alice", "alice-pw-2");
    assert_eq!(api.get("/user/acme/users", &alice2).status, 200);
    assert_eq!(
        api.delete(&format!("/user/{a}/users/alice"), &admin_a_id)
            .status,
        204
    );
    assert_error(
        &api.get("/user/currentUser", &alice2),
        401,
        "security/Unauthorized",
    );

    // Credentials: wrong password, none, garbage.
    let r = api.get("/user/currentUser", &basic(&format!("{a}/boss"), "wrong"));
    assert_error(&r, 401, "security/Unauthorized");
    assert_eq!(
        r.www_authenticate.as_deref(),
        Some("Basic realm=\"fleetmq\"")
    );
    let r = api.call("GET", "/user/currentUser", None, None);
    assert_error(&r, 401, "security/Unauthorized");
    assert_eq!(
        r.www_authenticate.as_deref(),
        Some("Basic realm=\"fleetmq\"")
    );
    let r = api.call("GET", "/tenant/tenants", Some("Basic %%%"), None);
    assert_error(&r, 401, "security/Unauthorized");
    assert!(r.www_authenticate.is_some());

    let m = node.metrics();
    assert!(
        metric_sum(&m, "fleetmq_rest_errors_total{status=\"403\"") >= 1.0,
        "metrics:\n{m}"
    );
    assert!(metric_sum(&m, "fleetmq_rest_requests_total{route_group=\"user\"") >= 5.0);
    assert!(
        !m.lines()
            .any(|l| l.starts_with("fleetmq_rest_") && l.contains(&a)),
        "tenant ids must not be REST metric labels"
    );
    assert!(
        !node.log().contains("acme-pw"),
        "passwords must not be logged"
    );
}

#[test]
fn device_registration_over_rest() {
    let node = Node::start_secure();
    let api = Rest::new(&node);
    let a = create_tenant(&api, "acme", "boss", "acme-pw");
    let b = create_tenant(&api, "globex", "chief", "globex-pw");
    let admin_a = basic(&format!("{a}/boss"), "acme-pw");
    let admin_b = basic("globex/chief", "globex-pw");
    let boot = bootstrap();

    let r = api.post(
        "/devicecontrol/newDeviceRequests",
        &admin_a,
        json!({"id": "dev-rest-1", "type": "c8y_Linux"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert!(r
        .content_type
        .starts_with("application/vnd.com.nsn.cumulocity.newDeviceRequest+json"));
    assert_eq!(r.body["id"], "dev-rest-1");
    assert_eq!(r.body["status"], "WAITING_FOR_CONNECTION");
    assert_eq!(r.body["owner"], "boss");
    assert_eq!(r.body["tenantId"], a.as_str());
    assert_eq!(r.body["type"], "c8y_Linux");
    assert_eq!(
        r.body["self"],
        format!("{}/devicecontrol/newDeviceRequests/dev-rest-1", api.base)
    );
    assert!(r.body["creationTime"].as_str().is_some());
    assert_error(
        &api.post(
            "/devicecontrol/newDeviceRequests",
            &admin_a,
            json!({"type": "x"}),
        ),
        400,
        "general/Bad Request",
    );

    // Accepting before the device polled is refused.
    let r = api.put(
        "/devicecontrol/newDeviceRequests/dev-rest-1",
        &admin_a,
        json!({"status": "ACCEPTED"}),
    );
    assert_error(&r, 422, "devicecontrol/Unprocessable Entity");
    assert!(
        r.body["message"].as_str().unwrap().contains("not polled"),
        "{r:?}"
    );

    // First poll: nothing yet, and the request now waits for acceptance.
    let poll = || {
        api.post(
            "/devicecontrol/deviceCredentials",
            &boot,
            json!({"id": "dev-rest-1"}),
        )
    };
    assert_error(&poll(), 404, "devicecontrol/Not Found");
    let r = api.get("/devicecontrol/newDeviceRequests/dev-rest-1", &admin_a);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "PENDING_ACCEPTANCE");
    let list = api.get("/devicecontrol/newDeviceRequests", &admin_a);
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(
        ids(&list.body, "newDeviceRequests", "id"),
        vec!["dev-rest-1"]
    );
    assert_error(&poll(), 404, "devicecontrol/Not Found");

    // Another tenant can neither take the identifier nor see the request.
    assert_error(
        &api.post(
            "/devicecontrol/newDeviceRequests",
            &admin_b,
            json!({"id": "dev-rest-1"}),
        ),
        409,
        "devicecontrol/Duplicate",
    );
    let list_b = api.get("/devicecontrol/newDeviceRequests", &admin_b);
    assert_eq!(list_b.status, 200, "{list_b:?}");
    assert_eq!(
        ids(&list_b.body, "newDeviceRequests", "id"),
        Vec::<String>::new()
    );
    assert_error(
        &api.get("/devicecontrol/newDeviceRequests/dev-rest-1", &admin_b),
        404,
        "devicecontrol/Not Found",
    );
    assert_error(
        &api.put(
            "/devicecontrol/newDeviceRequests/dev-rest-1",
            &admin_b,
            json!({"status": "ACCEPTED"}),
        ),
        404,
        "devicecontrol/Not Found",
    );

    // The bootstrap user can do nothing else; nobody else can poll.
    assert_error(
        &api.get("/devicecontrol/newDeviceRequests", &boot),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.get("/tenant/currentTenant", &boot),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.get("/user/currentUser", &boot),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.post(
            "/user/management/users",
            &boot,
            json!({"userName": "x", "password": "y"}),
        ),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.put(
            "/devicecontrol/newDeviceRequests/dev-rest-1",
            &boot,
            json!({"status": "ACCEPTED"}),
        ),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.post(
            "/devicecontrol/deviceCredentials",
            &admin_a,
            json!({"id": "dev-rest-1"}),
        ),
        403,
        "security/Forbidden",
    );

    // Accept; the next poll returns the credentials, once.
    let r = api.put(
        "/devicecontrol/newDeviceRequests/dev-rest-1",
        &admin_a,
        json!({"status": "ACCEPTED"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "ACCEPTED");
    let r = poll();
    assert_eq!(r.status, 201, "{r:?}");
    assert!(r
        .content_type
        .starts_with("application/vnd.com.nsn.cumulocity.deviceCredentials+json"));
    assert_eq!(r.body["id"], "dev-rest-1");
    assert_eq!(r.body["tenantId"], a.as_str());
    assert_eq!(r.body["username"], "device_dev-rest-1");
    let password = r.body["password"].as_str().unwrap().to_string();
    assert!(password.len() >= 12, "{password}");
    assert!(r.body["self"].as_str().unwrap().starts_with(&api.base));
    assert_error(&poll(), 404, "devicecontrol/Not Found");
    assert_error(
        &api.get("/devicecontrol/newDeviceRequests/dev-rest-1", &admin_a),
        404,
        "devicecontrol/Not Found",
    );

    // The device logs in with what it got.
    let dev = basic(&format!("{a}/device_dev-rest-1"), &password);
    let me = api.get("/user/currentUser", &dev);
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.body["userName"], "device_dev-rest-1");
    assert_eq!(me.body["fleetmqRole"], "device");
    assert_eq!(me.body["tenant"], a.as_str());
    assert_error(
        &api.get(&format!("/user/{a}/users"), &dev),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.post(
            "/devicecontrol/newDeviceRequests",
            &dev,
            json!({"id": "dev-x"}),
        ),
        403,
        "security/Forbidden",
    );

    // Once done, the identifier is free again; a request can also be withdrawn.
    let r = api.post(
        "/devicecontrol/newDeviceRequests",
        &admin_b,
        json!({"id": "dev-rest-1"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["tenantId"], b.as_str());
    assert_eq!(
        api.delete("/devicecontrol/newDeviceRequests/dev-rest-1", &admin_b)
            .status,
        204
    );
    assert_error(
        &api.delete("/devicecontrol/newDeviceRequests/dev-rest-1", &admin_b),
        404,
        "devicecontrol/Not Found",
    );
    assert_error(&poll(), 404, "devicecontrol/Not Found");
}

fn ca_pem(cn: &str) -> String {
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().pem()
}

fn leaf_pem(cn: &str) -> String {
    let mut params = rcgen::CertificateParams::new(vec![cn.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().pem()
}

#[test]
fn trusted_certificates() {
    let node = Node::start_secure();
    let api = Rest::new(&node);
    let a = create_tenant(&api, "acme", "boss", "acme-pw");
    let b = create_tenant(&api, "globex", "chief", "globex-pw");
    let admin_a = basic(&format!("{a}/boss"), "acme-pw");
    let admin_b = basic(&format!("{b}/chief"), "globex-pw");
    let path = format!("/tenant/tenants/{a}/trusted-certificates");

    let pem = ca_pem("Acme Device CA");
    let r = api.post(
        &path,
        &admin_a,
        json!({"name": "acme-ca", "certInPemFormat": pem, "status": "ENABLED",
               "autoRegistrationEnabled": true}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert!(r
        .content_type
        .starts_with("application/vnd.com.nsn.cumulocity.trustedCertificate+json"));
    let fp = r.body["fingerprint"].as_str().unwrap().to_string();
    assert!(
        fp.len() == 40
            && fp
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
        "{fp}"
    );
    assert_eq!(r.body["name"], "acme-ca");
    assert_eq!(r.body["status"], "ENABLED");
    assert_eq!(r.body["autoRegistrationEnabled"], true);
    assert!(
        r.body["subject"]
            .as_str()
            .unwrap()
            .contains("Acme Device CA"),
        "{r:?}"
    );
    assert!(r.body["certInPemFormat"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(r.body["notBefore"].as_str().is_some() && r.body["notAfter"].as_str().is_some());
    assert_eq!(r.body["self"], format!("{}{path}/{fp}", api.base));

    // Same certificate again (also without the PEM markers).
    let bare: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    for again in [pem.clone(), bare] {
        assert_error(
            &api.post(
                &path,
                &admin_a,
                json!({"name": "again", "certInPemFormat": again}),
            ),
            409,
            "tenant/Duplicate",
        );
    }

    // The management admin may add to any tenant; by domain too. Defaults: ENABLED, no
    // auto-registration, name from the subject when absent.
    let r = api.post(
        "/tenant/tenants/acme/trusted-certificates",
        &mgmt(),
        json!({"certInPemFormat": ca_pem("Second CA")}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["status"], "ENABLED");
    assert_eq!(r.body["autoRegistrationEnabled"], false);
    let fp2 = r.body["fingerprint"].as_str().unwrap().to_string();

    let list = api.get(&path, &admin_a);
    assert_eq!(list.status, 200, "{list:?}");
    assert!(list
        .content_type
        .starts_with("application/vnd.com.nsn.cumulocity.trustedCertificateCollection+json"));
    let mut expect = vec![fp.clone(), fp2.clone()];
    expect.sort();
    assert_eq!(ids(&list.body, "certificates", "fingerprint"), expect);

    // Tenant B sees nothing of A's, and has none of its own.
    assert_error(&api.get(&path, &admin_b), 403, "security/Forbidden");
    assert_error(
        &api.get(&format!("{path}/{fp}"), &admin_b),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.delete(&format!("{path}/{fp}"), &admin_b),
        403,
        "security/Forbidden",
    );
    assert_error(
        &api.post(
            &path,
            &admin_b,
            json!({"name": "x", "certInPemFormat": ca_pem("B")}),
        ),
        403,
        "security/Forbidden",
    );
    let own_b = api.get(
        &format!("/tenant/tenants/{b}/trusted-certificates"),
        &admin_b,
    );
    assert_eq!(own_b.status, 200, "{own_b:?}");
    assert_eq!(
        ids(&own_b.body, "certificates", "fingerprint"),
        Vec::<String>::new()
    );

    // Not a CA, not a certificate, nothing at all.
    let r = api.post(
        &path,
        &admin_a,
        json!({"name": "leaf", "certInPemFormat": leaf_pem("device-1")}),
    );
    assert_error(&r, 422, "tenant/Unprocessable Entity");
    assert!(r.body["message"].as_str().unwrap().contains("CA"), "{r:?}");
    assert_error(
        &api.post(
            &path,
            &admin_a,
            json!({"name": "junk", "certInPemFormat": "hello"}),
        ),
        422,
        "tenant/Unprocessable Entity",
    );
    assert_error(
        &api.post(&path, &admin_a, json!({"name": "none"})),
        400,
        "general/Bad Request",
    );

    // Update, then delete.
    let r = api.put(
        &format!("{path}/{fp}"),
        &admin_a,
        json!({"status": "DISABLED", "name": "renamed", "autoRegistrationEnabled": false}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "DISABLED");
    assert_eq!(r.body["name"], "renamed");
    assert_eq!(r.body["autoRegistrationEnabled"], false);
    let r = api.get(&format!("{path}/{}", fp.to_uppercase()), &admin_a);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "DISABLED");
    assert_eq!(api.delete(&format!("{path}/{fp}"), &admin_a).status, 204);
    assert_error(
        &api.get(&format!("{path}/{fp}"), &admin_a),
        404,
        "tenant/Not Found",
    );
    assert_eq!(
        ids(
            &api.get(&path, &admin_a).body,
            "certificates",
            "fingerprint"
        ),
        vec![fp2]
    );
}

#[test]
fn collections_are_paged() {
    let node = Node::start_secure();
    let api = Rest::new(&node);
    let a = create_tenant(&api, "acme", "boss", "acme-pw");
    let admin = basic("acme/boss", "acme-pw");
    for i in 1..=7 {
        let r = api.post(
            &format!("/user/{a}/users"),
            &admin,
            json!({"userName": format!("user-{i:02}"), "password": "pw-pw-pw"}),
        );
        assert_eq!(r.status, 201, "{r:?}");
    }
    // 8 users in all (with boss), by name.
    let p1 = api.get(&format!("/user/{a}/users?pageSize=5"), &admin);
    assert_eq!(p1.status, 200, "{p1:?}");
    assert_eq!(
        ids(&p1.body, "users", "userName"),
        vec!["boss", "user-01", "user-02", "user-03", "user-04"]
    );
    assert_eq!(p1.body["statistics"]["pageSize"], 5);
    assert_eq!(p1.body["statistics"]["currentPage"], 1);
    assert_eq!(
        p1.body["self"],
        format!("{}/user/{a}/users?pageSize=5&currentPage=1", api.base)
    );
    let next = p1.body["next"].as_str().expect("next link").to_string();
    assert_eq!(
        next,
        format!("{}/user/{a}/users?pageSize=5&currentPage=2", api.base)
    );

    let p2 = api.get(&next, &admin);
    assert_eq!(p2.status, 200, "{p2:?}");
    assert_eq!(
        ids(&p2.body, "users", "userName"),
        vec!["user-05", "user-06", "user-07"]
    );
    assert_eq!(p2.body["statistics"]["currentPage"], 2);
    assert!(p2.body.get("next").is_none(), "{p2:?}");

    // Defaults, the end, and bad values.
    let d = api.get(&format!("/user/{a}/users"), &admin);
    assert_eq!(d.body["users"].as_array().unwrap().len(), 5);
    assert_eq!(d.body["statistics"]["pageSize"], 5);
    assert!(d.body["next"].as_str().is_some());
    let p3 = api.get(&format!("/user/{a}/users?pageSize=5&currentPage=3"), &admin);
    assert_eq!(p3.status, 200, "{p3:?}");
    assert_eq!(p3.body["users"].as_array().unwrap().len(), 0);
    let all = api.get(&format!("/user/{a}/users?pageSize=100"), &admin);
    assert_eq!(all.body["users"].as_array().unwrap().len(), 8);
    assert!(all.body.get("next").is_none());
    assert_error(
        &api.get(&format!("/user/{a}/users?pageSize=0"), &admin),
        400,
        "general/Bad Request",
    );
    assert_error(
        &api.get(&format!("/user/{a}/users?currentPage=x"), &admin),
        400,
        "general/Bad Request",
    );
}

#[test]
fn failed_logins_are_throttled() {
    let node = Node::start_secure_with(&["--login-ip-burst", "3", "--login-ip-per-minute", "1"]);
    let api = Rest::new(&node);
    // A correct login first: its credential is then cached.
    assert_eq!(api.get("/user/currentUser", &mgmt()).status, 200);
    for _ in 0..3 {
        let r = api.get("/user/currentUser", &basic("management/admin", "wrong"));
        assert_error(&r, 401, "security/Unauthorized");
    }
    let r = api.get("/user/currentUser", &basic("management/admin", "wrong"));
    assert_error(&r, 429, "security/Too Many Requests");
    // The address is refused before any new password is checked, even a right one...
    let r = api.post(
        "/devicecontrol/deviceCredentials",
        &bootstrap(),
        json!({"id": "x"}),
    );
    assert_error(&r, 429, "security/Too Many Requests");
    // ...while a credential verified recently still gets in.
    assert_eq!(api.get("/tenant/currentTenant", &mgmt()).status, 200);
    assert!(node.metric("fleetmq_rest_errors_total{status=\"429\"") >= 2.0);
    assert!(node.metric("fleetmq_rest_errors_total{status=\"401\"") >= 3.0);
}
