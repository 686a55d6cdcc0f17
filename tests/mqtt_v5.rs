//! MQTT 5 features end to end against the real binary, mostly with the scripted client in
//! `mqtt_util` so that each packet and property can be checked: retain handling and
//! retain-as-published, wills (reason 0x04, delay, cancel on resume, bound by session expiry),
//! no local, shared subscriptions, topic aliases, message expiry, forwarded properties,
//! reason codes and strings, assigned client ids, session expiry, server keep alive, receive
//! maximum and the client's maximum packet size.
mod common;
mod mqtt_util;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use mqtt_util::*;
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, DisconnectReasonCode, Packet, PubAckReason, Publish, PublishProperties,
};

fn disconnect_of(packets: &[Packet]) -> Option<&rumqttc::v5::mqttbytes::v5::Disconnect> {
    packets.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d),
        _ => None,
    })
}

// ----- retained ----------------------------------------------------------------------------

/// Retain Handling 0 sends retained messages on every SUBSCRIBE, 1 only when the subscription
/// is new, 2 never; Retain As Published keeps the flag on live deliveries.
#[tokio::test]
async fn retain_handling_and_retain_as_published() {
    let node = Node::start();
    let mut publ = C5::connect(node.mqtt, "rh-pub").await;
    publ.publish("rh/t", qos(1), true, "kept", None).await;

    let mut c0 = C5::connect(node.mqtt, "rh-0").await;
    for round in 0..2 {
        c0.subscribe(vec![filter("rh/t", qos(1), false, false, 0)], None)
            .await;
        let m = c0.expect_publish().await;
        assert!(m.retain, "rh=0 round {round}");
        assert_eq!(&m.payload[..], b"kept");
    }

    let mut c1 = C5::connect(node.mqtt, "rh-1").await;
    c1.subscribe(vec![filter("rh/t", qos(1), false, false, 1)], None)
        .await;
    let m = c1.expect_publish().await;
    assert!(m.retain);
    c1.subscribe(vec![filter("rh/t", qos(1), false, false, 1)], None)
        .await;
    c1.assert_silent(
        Duration::from_millis(300),
        "rh=1 on an existing subscription",
    )
    .await;

    let mut c2 = C5::connect(node.mqtt, "rh-2").await;
    c2.subscribe(vec![filter("rh/t", qos(1), false, false, 2)], None)
        .await;
    c2.assert_silent(Duration::from_millis(300), "rh=2").await;

    // Retain As Published: the flag of a live retained publish is kept only with rap=1.
    let mut rap = C5::connect(node.mqtt, "rap-1").await;
    rap.subscribe(vec![filter("rap/t", qos(1), false, true, 2)], None)
        .await;
    let mut norap = C5::connect(node.mqtt, "rap-0").await;
    norap
        .subscribe(vec![filter("rap/t", qos(1), false, false, 2)], None)
        .await;
    publ.publish("rap/t", qos(1), true, "live", None).await;
    assert!(rap.expect_publish().await.retain, "rap=1 keeps retain");
    assert!(!norap.expect_publish().await.retain, "rap=0 clears retain");
}

// ----- wills -------------------------------------------------------------------------------

async fn will_watcher(node: &Node, id: &str) -> C5 {
    let mut w = C5::connect(node.mqtt, id).await;
    w.sub("will/#", qos(1)).await;
    w
}

/// DISCONNECT with reason 0x04 publishes the will; reason 0 does not.
#[tokio::test]
async fn will_on_disconnect_with_will_message() {
    let node = Node::start();
    let mut w = will_watcher(&node, "w5-watch").await;
    let mut o = Opts::clean();
    o.will = Some(will5("will/polite", "normal", None));
    let (mut c, _) = C5::connect_with(node.mqtt, "w5-normal", o.clone()).await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    w.assert_silent(Duration::from_millis(500), "will after reason 0")
        .await;

    o.will = Some(will5("will/asked", "with-will", None));
    let (mut c, _) = C5::connect_with(node.mqtt, "w5-ask", o).await;
    c.disconnect(DisconnectReasonCode::DisconnectWithWillMessage, None)
        .await;
    let m = w.expect_publish().await;
    assert_eq!(topic(&m), "will/asked");
    assert_eq!(&m.payload[..], b"with-will");
}

/// Only reason 0x00 discards the will (MQTT-3.14.4-3): a client that disconnects reporting an
/// error (here 0x80) still has its will published.
#[tokio::test]
async fn will_on_disconnect_with_error_reason() {
    let node = Node::start();
    let mut w = will_watcher(&node, "w5e-watch").await;
    let mut o = Opts::clean();
    o.will = Some(will5("will/error", "failed", None));
    let (mut c, _) = C5::connect_with(node.mqtt, "w5-err", o).await;
    c.disconnect(DisconnectReasonCode::UnspecifiedError, None)
        .await;
    let m = w.expect_publish().await;
    assert_eq!(topic(&m), "will/error");
    assert_eq!(&m.payload[..], b"failed");
}

/// A will with a delay is published after the delay, not before.
#[tokio::test]
async fn will_delay_is_honoured() {
    let node = Node::start();
    let mut w = will_watcher(&node, "wd-watch").await;
    let mut o = Opts::clean();
    o.props = expiry_props(30);
    o.will = Some(will5("will/delayed", "late", Some(1)));
    let (c, _) = C5::connect_with(node.mqtt, "wd-client", o).await;
    let t0 = Instant::now();
    drop(c);
    let m = w.expect_publish().await;
    let dt = t0.elapsed();
    assert_eq!(topic(&m), "will/delayed");
    assert!(
        dt >= Duration::from_millis(900) && dt < Duration::from_secs(4),
        "will after {dt:?}, delay was 1 s"
    );
}

/// Reconnecting to the session before the will delay ends cancels the will.
#[tokio::test]
async fn will_delay_cancelled_by_resume() {
    let node = Node::start();
    let mut w = will_watcher(&node, "wc-watch").await;
    let mut o = Opts::clean();
    o.props = expiry_props(60);
    o.will = Some(will5("will/cancelled", "never", Some(2)));
    let (c, _) = C5::connect_with(node.mqtt, "wc-client", o).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut o2 = Opts::clean();
    o2.clean_start = false;
    o2.props = expiry_props(60);
    let (_back, ack) = C5::connect_with(node.mqtt, "wc-client", o2).await;
    assert!(ack.session_present);
    w.assert_silent(Duration::from_millis(2700), "will after resume")
        .await;
}

/// A will whose delay outlasts the session expiry is published when the session ends.
#[tokio::test]
async fn will_delay_bounded_by_session_expiry() {
    let node = Node::start();
    let mut w = will_watcher(&node, "we-watch").await;
    let mut o = Opts::clean();
    o.props = expiry_props(1);
    o.will = Some(will5("will/expiry", "session-ended", Some(30)));
    let (c, _) = C5::connect_with(node.mqtt, "we-client", o).await;
    let t0 = Instant::now();
    drop(c);
    let m = w.expect_publish().await;
    let dt = t0.elapsed();
    assert_eq!(&m.payload[..], b"session-ended");
    assert!(
        dt >= Duration::from_millis(900) && dt < Duration::from_secs(5),
        "will after {dt:?}; session expiry 1 s, will delay 30 s"
    );
}

// ----- subscriptions -----------------------------------------------------------------------

/// No Local: a client does not get its own messages on that subscription; others' it does.
#[tokio::test]
async fn no_local() {
    let node = Node::start();
    let mut c = C5::connect(node.mqtt, "nl-self").await;
    c.subscribe(vec![filter("nl/t", qos(1), true, false, 0)], None)
        .await;
    c.publish("nl/t", qos(1), false, "mine", None).await;
    c.assert_silent(Duration::from_millis(400), "own message with no local")
        .await;
    let mut other = C5::connect(node.mqtt, "nl-other").await;
    other.publish("nl/t", qos(1), false, "theirs", None).await;
    let m = c.expect_publish().await;
    assert_eq!(&m.payload[..], b"theirs");
}

/// `$share/g/…`: each message to exactly one member, both members used, and a plain
/// subscriber still gets everything.
#[tokio::test]
async fn shared_subscriptions() {
    let node = Node::start();
    let mut m1 = C5::connect(node.mqtt, "sh-1").await;
    m1.sub("$share/g/sh/t", qos(1)).await;
    let mut m2 = C5::connect(node.mqtt, "sh-2").await;
    m2.sub("$share/g/sh/t", qos(1)).await;
    let mut plain = C5::connect(node.mqtt, "sh-plain").await;
    plain.sub("sh/t", qos(1)).await;
    let mut publ = C5::connect(node.mqtt, "sh-pub").await;
    let n = 20;
    for i in 0..n {
        publ.publish("sh/t", qos(1), false, format!("{i}"), None)
            .await;
    }
    let mut all = Vec::new();
    for _ in 0..n {
        let m = plain.expect_publish().await;
        all.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(all, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
    let mut got1 = Vec::new();
    for p in m1.quiet(Duration::from_millis(500)).await {
        if let Packet::Publish(p) = p {
            m1.ack(&p).await;
            assert_eq!(topic(&p), "sh/t");
            got1.push(String::from_utf8(p.payload.to_vec()).unwrap());
        }
    }
    let mut got2 = Vec::new();
    for p in m2.quiet(Duration::from_millis(200)).await {
        if let Packet::Publish(p) = p {
            m2.ack(&p).await;
            got2.push(String::from_utf8(p.payload.to_vec()).unwrap());
        }
    }
    assert!(
        !got1.is_empty() && !got2.is_empty(),
        "both members get messages: {got1:?} / {got2:?}"
    );
    let s1: HashSet<_> = got1.iter().cloned().collect();
    let s2: HashSet<_> = got2.iter().cloned().collect();
    assert!(s1.is_disjoint(&s2), "a message went to both members");
    assert_eq!(got1.len() + got2.len(), n, "{got1:?} + {got2:?}");
    assert_eq!(s1.len() + s2.len(), n);
}

// ----- topic aliases -----------------------------------------------------------------------

/// Client → server aliases: set with a topic, then used with an empty topic; an alias above the
/// server's Topic Alias Maximum gets DISCONNECT 0x94 with a reason string.
#[tokio::test]
async fn topic_alias_client_to_server() {
    let node = Node::start_with(&["--topic-alias-maximum", "3"]);
    let mut sub = C5::connect(node.mqtt, "ta-sub").await;
    sub.sub("ta/#", qos(1)).await;
    let (mut publ, ack) = C5::connect_with(node.mqtt, "ta-pub", Opts::clean()).await;
    assert_eq!(
        ack.properties.as_ref().and_then(|p| p.topic_alias_max),
        Some(3)
    );
    let alias = |a: u16| {
        Some(PublishProperties {
            topic_alias: Some(a),
            ..Default::default()
        })
    };
    publ.publish("ta/x", qos(1), false, "first", alias(2)).await;
    publ.publish("", qos(1), false, "second", alias(2)).await;
    for want in ["first", "second"] {
        let m = sub.expect_publish().await;
        assert_eq!(topic(&m), "ta/x");
        assert_eq!(&m.payload[..], want.as_bytes());
    }
    // Alias 4 > maximum 3.
    let mut p = Publish::new("ta/y", qos(0), Bytes::from_static(b"bad"), alias(4));
    p.pkid = 0;
    publ.send(Packet::Publish(p)).await;
    let before = publ
        .wait_closed(Duration::from_secs(5))
        .await
        .expect("server must close after an invalid alias");
    let d = disconnect_of(&before).expect("DISCONNECT before close");
    assert_eq!(d.reason_code, DisconnectReasonCode::TopicAliasInvalid);
    let reason = d.properties.as_ref().and_then(|p| p.reason_string.clone());
    assert!(
        reason.as_deref().is_some_and(|r| !r.is_empty()),
        "reason string expected (problem info requested by default): {d:?}"
    );
    sub.assert_silent(Duration::from_millis(200), "message with a bad alias")
        .await;
}

/// Server → client aliases when the client allows them: the second PUBLISH on a topic uses
/// the alias alone.
#[tokio::test]
async fn topic_alias_server_to_client() {
    let node = Node::start();
    let mut o = Opts::clean();
    o.props.topic_alias_max = Some(4);
    let (mut sub, _) = C5::connect_with(node.mqtt, "tas-sub", o).await;
    sub.sub("tas/#", qos(0)).await;
    let mut publ = C5::connect(node.mqtt, "tas-pub").await;
    publ.publish("tas/long/topic/name", qos(0), false, "1", None)
        .await;
    publ.publish("tas/long/topic/name", qos(0), false, "2", None)
        .await;
    let a = sub.expect_publish().await;
    let b = sub.expect_publish().await;
    let alias_a = a.properties.as_ref().and_then(|p| p.topic_alias);
    assert!(alias_a.is_some_and(|x| (1..=4).contains(&x)), "{a:?}");
    assert_eq!(topic(&a), "tas/long/topic/name");
    assert_eq!(b.properties.as_ref().and_then(|p| p.topic_alias), alias_a);
    assert!(b.topic.is_empty(), "second use of the alias sends no topic");
}

// ----- message expiry and properties -------------------------------------------------------

/// A message that expires while queued for an offline session is not delivered; the one that
/// is delivered carries a decremented Message Expiry Interval.
#[tokio::test]
async fn message_expiry_for_offline_session() {
    let node = Node::start();
    let mut o = Opts::clean();
    o.props = expiry_props(60);
    let (mut sub, _) = C5::connect_with(node.mqtt, "me-sub", o).await;
    sub.sub("me/t", qos(1)).await;
    sub.disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut publ = C5::connect(node.mqtt, "me-pub").await;
    let exp = |s: u32| {
        Some(PublishProperties {
            message_expiry_interval: Some(s),
            ..Default::default()
        })
    };
    publ.publish("me/t", qos(1), false, "short", exp(1)).await;
    publ.publish("me/t", qos(1), false, "long", exp(30)).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let mut o = Opts::clean();
    o.clean_start = false;
    o.props = expiry_props(60);
    let (mut sub, ack) = C5::connect_with(node.mqtt, "me-sub", o).await;
    assert!(ack.session_present);
    let m = sub.expect_publish().await;
    assert_eq!(
        &m.payload[..],
        b"long",
        "the expired message must be dropped"
    );
    let left = m
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .expect("remaining expiry forwarded");
    assert!(
        (1..=28).contains(&left),
        "expiry must be decremented by the ~2 s waited: {left}"
    );
    sub.assert_silent(Duration::from_millis(300), "expired message")
        .await;
}

/// User properties (order and duplicates kept), content type, response topic, correlation data
/// and payload format indicator reach the subscriber intact.
#[tokio::test]
async fn publish_properties_forwarded() {
    let node = Node::start();
    let mut sub = C5::connect(node.mqtt, "pp-sub").await;
    sub.sub("pp/t", qos(1)).await;
    let mut publ = C5::connect(node.mqtt, "pp-pub").await;
    let user = vec![
        ("k".to_string(), "v1".to_string()),
        ("other".to_string(), "x".to_string()),
        ("k".to_string(), "v2".to_string()),
    ];
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("pp/reply".into()),
        correlation_data: Some(Bytes::from_static(&[0, 1, 2, 0xff])),
        user_properties: user.clone(),
        ..Default::default()
    };
    publ.publish("pp/t", qos(1), false, "{}", Some(props)).await;
    let m = sub.expect_publish().await;
    let p = m.properties.expect("properties");
    assert_eq!(p.user_properties, user);
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.response_topic.as_deref(), Some("pp/reply"));
    assert_eq!(p.correlation_data.as_deref(), Some(&[0u8, 1, 2, 0xff][..]));
    assert_eq!(p.payload_format_indicator, Some(1));
}

/// Reason codes on acknowledgements: PUBACK 0x10 when nobody is subscribed, 0 otherwise.
#[tokio::test]
async fn puback_reason_codes() {
    let node = Node::start();
    let mut c = C5::connect(node.mqtt, "rc-pub").await;
    c.send(Packet::Publish({
        let mut p = Publish::new("rc/none", qos(1), Bytes::from_static(b"x"), None);
        p.pkid = 11;
        p
    }))
    .await;
    match c.next().await {
        Packet::PubAck(a) => {
            assert_eq!(a.pkid, 11);
            assert_eq!(a.reason, PubAckReason::NoMatchingSubscribers);
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let mut s = C5::connect(node.mqtt, "rc-sub").await;
    s.sub("rc/#", qos(1)).await;
    c.send(Packet::Publish({
        let mut p = Publish::new("rc/one", qos(1), Bytes::from_static(b"x"), None);
        p.pkid = 12;
        p
    }))
    .await;
    match c.next().await {
        Packet::PubAck(a) => assert_eq!(a.reason, PubAckReason::Success),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

// ----- CONNECT / CONNACK -------------------------------------------------------------------

/// An empty client id gets an Assigned Client Identifier, unique per connection.
#[tokio::test]
async fn assigned_client_identifier() {
    let node = Node::start();
    let (_a, ack_a) = C5::connect_with(node.mqtt, "", Opts::clean()).await;
    let (_b, ack_b) = C5::connect_with(node.mqtt, "", Opts::clean()).await;
    let id_a = ack_a
        .properties
        .and_then(|p| p.assigned_client_identifier)
        .expect("assigned id");
    let id_b = ack_b
        .properties
        .and_then(|p| p.assigned_client_identifier)
        .expect("assigned id");
    assert!(!id_a.is_empty());
    assert_ne!(id_a, id_b);
    let (_named, ack) = C5::connect_with(node.mqtt, "named", Opts::clean()).await;
    assert!(ack
        .properties
        .and_then(|p| p.assigned_client_identifier)
        .is_none());
}

/// Session expiry 1 s: gone after 2 s. Session expiry 60 s: resumed with its subscription.
#[tokio::test]
async fn session_expiry() {
    let node = Node::start();
    let resume = |secs: u32| {
        let mut o = Opts::clean();
        o.clean_start = false;
        o.props = expiry_props(secs);
        o
    };
    let (mut short, ack) = C5::connect_with(node.mqtt, "se-short", resume(1)).await;
    assert!(!ack.session_present);
    short.sub("se/short", qos(1)).await;
    let (mut long, _) = C5::connect_with(node.mqtt, "se-long", resume(60)).await;
    long.sub("se/long", qos(1)).await;
    short
        .disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    long.disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let (_short, ack) = C5::connect_with(node.mqtt, "se-short", resume(1)).await;
    assert!(!ack.session_present, "expired session must be gone");
    let (mut long, ack) = C5::connect_with(node.mqtt, "se-long", resume(60)).await;
    assert!(
        ack.session_present,
        "session with expiry 60 must be present"
    );
    let mut publ = C5::connect(node.mqtt, "se-pub").await;
    publ.publish("se/long", qos(1), false, "still subscribed", None)
        .await;
    assert_eq!(
        &long.expect_publish().await.payload[..],
        b"still subscribed"
    );
}

/// `--max-keep-alive 5`: a client asking 60 gets Server Keep Alive 5; one asking 3 keeps it.
#[tokio::test]
async fn server_keep_alive() {
    let node = Node::start_with(&["--max-keep-alive", "5"]);
    let mut o = Opts::clean();
    o.keep_alive = 60;
    let (_c, ack) = C5::connect_with(node.mqtt, "ska-60", o.clone()).await;
    assert_eq!(
        ack.properties.as_ref().and_then(|p| p.server_keep_alive),
        Some(5)
    );
    o.keep_alive = 3;
    let (_c, ack) = C5::connect_with(node.mqtt, "ska-3", o).await;
    assert_eq!(
        ack.properties.as_ref().and_then(|p| p.server_keep_alive),
        None
    );
}

/// Receive Maximum 2: the server never has more than 2 unacknowledged QoS 1 PUBLISHes out; an
/// ack lets the next one go.
#[tokio::test]
async fn receive_maximum_limits_inflight() {
    let node = Node::start();
    let mut o = Opts::clean();
    o.props.receive_maximum = Some(2);
    let (mut sub, _) = C5::connect_with(node.mqtt, "rm-sub", o).await;
    sub.sub("rm/t", qos(1)).await;
    let mut publ = C5::connect(node.mqtt, "rm-pub").await;
    for i in 0..5 {
        publ.publish("rm/t", qos(1), false, format!("{i}"), None)
            .await;
    }
    let first = sub.quiet(Duration::from_millis(700)).await;
    let pubs: Vec<Publish> = first
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(pubs.len(), 2, "inflight above Receive Maximum: {pubs:?}");
    sub.ack(&pubs[0]).await;
    let third = sub.expect_publish_noack().await;
    assert_eq!(&third.payload[..], b"2");
    sub.assert_silent(Duration::from_millis(300), "more than 2 in flight")
        .await;
}

/// A client that comes back with a smaller Receive Maximum gets only that many of its
/// unacknowledged PUBLISHes resent (MQTT-3.3.4-9); the rest follow, in order, as it acks.
#[tokio::test]
async fn redelivery_respects_a_smaller_receive_maximum() {
    let node = Node::start();
    let mut o = Opts::clean();
    o.clean_start = false;
    o.props = expiry_props(60);
    o.props.receive_maximum = Some(5);
    let (mut sub, _) = C5::connect_with(node.mqtt, "rm2-sub", o.clone()).await;
    sub.sub("rm2/t", qos(1)).await;
    let mut publ = C5::connect(node.mqtt, "rm2-pub").await;
    for i in 0..5 {
        publ.publish("rm2/t", qos(1), false, format!("{i}"), None)
            .await;
    }
    for _ in 0..5 {
        sub.expect_publish_noack().await;
    }
    drop(sub);
    tokio::time::sleep(Duration::from_millis(200)).await;
    o.props.receive_maximum = Some(2);
    let (mut sub, _) = C5::connect_with(node.mqtt, "rm2-sub", o).await;
    let again: Vec<Publish> = sub
        .quiet(Duration::from_millis(700))
        .await
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(
        again.len(),
        2,
        "resent above the new Receive Maximum: {again:?}"
    );
    assert!(again.iter().all(|p| p.dup), "redeliveries carry DUP");
    assert_eq!(&again[0].payload[..], b"0");
    assert_eq!(&again[1].payload[..], b"1");
    sub.ack(&again[0]).await;
    let next = sub.expect_publish_noack().await;
    assert_eq!(&next.payload[..], b"2", "the rest follow in order");
    assert!(next.dup);
}

/// Maximum Packet Size 100 from the client: larger PUBLISHes are dropped for it, smaller ones
/// still arrive.
#[tokio::test]
async fn client_maximum_packet_size() {
    let node = Node::start();
    let mut o = Opts::clean();
    o.props.max_packet_size = Some(100);
    let (mut sub, _) = C5::connect_with(node.mqtt, "mps-sub", o).await;
    sub.sub("mps/t", qos(1)).await;
    let mut publ = C5::connect(node.mqtt, "mps-pub").await;
    publ.publish("mps/t", qos(1), false, "small-1", None).await;
    publ.publish("mps/t", qos(1), false, vec![b'x'; 200], None)
        .await;
    publ.publish("mps/t", qos(1), false, "small-2", None).await;
    for want in ["small-1", "small-2"] {
        let m = sub.expect_publish().await;
        assert_eq!(&m.payload[..], want.as_bytes());
    }
    sub.assert_silent(Duration::from_millis(300), "oversized PUBLISH")
        .await;
}

/// With Request Problem Information 0 the violation still ends in DISCONNECT with its reason
/// code (the reason string is optional then; `topic_alias_client_to_server` checks it is sent
/// by default).
#[tokio::test]
async fn disconnect_reason_without_problem_info() {
    let node = Node::start_with(&["--topic-alias-maximum", "1"]);
    let mut o = Opts::clean();
    o.props = ConnectProperties::new();
    o.props.request_problem_info = Some(0);
    let (mut c, _) = C5::connect_with(node.mqtt, "rpi-0", o).await;
    let p = Publish::new(
        "x",
        qos(0),
        Bytes::from_static(b"x"),
        Some(PublishProperties {
            topic_alias: Some(2),
            ..Default::default()
        }),
    );
    c.send(Packet::Publish(p)).await;
    let before = c.wait_closed(Duration::from_secs(5)).await.expect("closed");
    let d = disconnect_of(&before).expect("DISCONNECT");
    assert_eq!(d.reason_code, DisconnectReasonCode::TopicAliasInvalid);
}
