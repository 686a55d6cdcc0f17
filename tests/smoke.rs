//! The quickest end-to-end check: a node starts, a client publishes, another receives.
mod common;

use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[tokio::test]
async fn publish_reaches_subscriber() {
    let node = Node::start();
    let mut o = MqttOptions::new("smoke-sub", "127.0.0.1", node.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (sub, mut sub_loop) = AsyncClient::new(o, 10);
    sub.subscribe("smoke/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_loop.poll().await.unwrap() {
            break;
        }
    }
    let (publ, mut pub_loop) =
        AsyncClient::new(MqttOptions::new("smoke-pub", "127.0.0.1", node.port()), 10);
    tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
    publ.publish("smoke/a", QoS::AtLeastOnce, false, "hi")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = sub_loop.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .expect("delivery");
    assert_eq!(got.topic, "smoke/a");
    assert_eq!(&got.payload[..], b"hi");
    let (status, body) = node.http_get("/health/ready");
    assert_eq!(status, 200, "{body}");
    assert!(node.metric("fleetmq_messages_received_total") >= 1.0);
}
