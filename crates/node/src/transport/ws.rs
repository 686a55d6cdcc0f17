//! MQTT over WebSocket (MQTT 3.1.1 §6, MQTT 5 §6): the HTTP upgrade on `/mqtt` with the `mqtt`
//! subprotocol, and [`WsStream`], which turns the message stream back into the byte stream the
//! MQTT decoder reads. MQTT packets may span WebSocket messages or share one, so message
//! boundaries carry no meaning here.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// The only path MQTT is served on.
const PATH: &str = "/mqtt";
/// A peer gets this long to complete the HTTP upgrade.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest WebSocket message/frame: the 2 MiB packet limit plus headroom for the fixed header
/// and for clients that put several packets in one message. The broker's own packet limit is
/// enforced above this layer.
const MAX_MESSAGE: usize = 2 * 1024 * 1024 + 64 * 1024;
/// tungstenite allocates its read buffer eagerly (128 KiB by default); most connections are
/// idle devices, so start small and let large messages grow it.
const READ_BUFFER: usize = 16 * 1024;

/// Why a WebSocket upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The client did not complete the upgrade in time.
    #[error("WebSocket handshake timed out")]
    Timeout,
    /// The request was malformed or refused (wrong path, wrong subprotocol), or I/O failed.
    #[error("WebSocket handshake: {0}")]
    Handshake(Box<tungstenite::Error>),
}

impl From<tungstenite::Error> for WsError {
    fn from(e: tungstenite::Error) -> Self {
        WsError::Handshake(Box::new(e))
    }
}

/// Runs the server side of the WebSocket upgrade on an accepted (possibly TLS) stream.
pub async fn accept<S>(stream: S) -> Result<WsStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let upgrade =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_request, Some(config));
    let ws = tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade)
        .await
        .map_err(|_| WsError::Timeout)??;
    Ok(WsStream::new(ws))
}

/// Accepts `/mqtt` only, and selects the `mqtt` (or legacy `mqttv3.1`) subprotocol.
#[allow(clippy::result_large_err)] // the type tungstenite's handshake callback requires
fn check_request(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() != PATH {
        return Err(refuse(StatusCode::NOT_FOUND, "MQTT is served on /mqtt"));
    }
    let offered: Vec<&str> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        // A value that is not ASCII names no protocol we know; it still counts as an offer.
        .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        // The spec requires the subprotocol, but some clients omit it; MQTT bytes follow anyway.
        return Ok(resp);
    }
    // Echo the client's own spelling: clients check the answer against what they offered.
    let chosen = offered
        .iter()
        .find(|p| p.eq_ignore_ascii_case("mqtt"))
        .or_else(|| offered.iter().find(|p| p.eq_ignore_ascii_case("mqttv3.1")));
    match chosen.and_then(|p| HeaderValue::from_str(p).ok()) {
        Some(value) => {
            resp.headers_mut()
                .insert(header::SEC_WEBSOCKET_PROTOCOL, value);
            Ok(resp)
        }
        // MQTT §6: the server must select "mqtt"; a client that cannot speak it gets nothing.
        None => Err(refuse(
            StatusCode::BAD_REQUEST,
            "the mqtt subprotocol is required",
        )),
    }
}

fn refuse(status: StatusCode, why: &str) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(why.to_owned()));
    *resp.status_mut() = status;
    resp
}

/// A WebSocket connection seen as a byte stream: Binary message payloads in, one Binary
/// message per write out.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// The unread rest of the current incoming message (advancing it is the read cursor).
    incoming: Bytes,
    /// A Close arrived or the connection ended: reads return 0 from now on.
    eof: bool,
}

impl<S> std::fmt::Debug for WsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsStream")
            .field("buffered", &self.incoming.len())
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl<S> WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Wraps an established WebSocket.
    pub fn new(inner: WebSocketStream<S>) -> Self {
        WsStream {
            inner,
            incoming: Bytes::new(),
            eof: false,
        }
    }

    /// The underlying stream (e.g. to read the peer address or TLS state).
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }
}

impl<S> AsyncRead for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.incoming.is_empty() {
                let n = this.incoming.len().min(buf.remaining());
                buf.put_slice(&this.incoming[..n]);
                this.incoming.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Polling the stream is also what sends tungstenite's queued Pong and Close replies.
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                // Empty messages are legal and simply carry nothing; keep reading.
                Some(Ok(Message::Binary(data))) => this.incoming = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on an MQTT WebSocket",
                    )))
                }
                Some(Ok(Message::Close(_))) | None => {
                    this.eof = true;
                    // Push out the Close reply tungstenite queued; if the socket is full, the
                    // owner's flush or shutdown sends it.
                    let _ = Pin::new(&mut this.inner).poll_flush(cx);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S> AsyncWrite for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut inner = Pin::new(&mut self.get_mut().inner);
        // poll_ready first: once start_send accepts the message it is queued in full, so a
        // write either takes all of `buf` or reports an error; nothing is dropped half-way.
        ready!(inner.as_mut().poll_ready(cx)).map_err(to_io)?;
        inner
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_flush(cx)
            .map_err(to_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sends our Close (or the reply to the peer's) and flushes everything before it.
        Pin::new(&mut self.get_mut().inner)
            .poll_close(cx)
            .map_err(to_io)
    }
}

fn to_io(e: tungstenite::Error) -> io::Error {
    use tungstenite::Error as E;
    match e {
        E::Io(e) => e,
        E::ConnectionClosed | E::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket closed")
        }
        e @ (E::Protocol(_) | E::Capacity(_) | E::Utf8) => {
            io::Error::new(io::ErrorKind::InvalidData, e)
        }
        e => io::Error::other(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    /// Accepts one connection and echoes every byte back until EOF.
    async fn echo_server() -> (String, JoinHandle<Result<io::Result<()>, WsError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = accept(tcp).await?;
            let echo = async {
                let mut buf = [0u8; 3];
                loop {
                    let n = ws.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    ws.write_all(&buf[..n]).await?;
                    ws.flush().await?;
                }
                ws.shutdown().await
            };
            Ok(echo.await)
        });
        (addr.to_string(), task)
    }

    async fn connect(
        addr: &str,
        path: &str,
        protocol: Option<&str>,
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<TcpStream>,
            tungstenite::handshake::client::Response,
        ),
        tungstenite::Error,
    > {
        let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
        if let Some(p) = protocol {
            req.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(p).unwrap(),
            );
        }
        let tcp = TcpStream::connect(addr).await.unwrap();
        tokio_tungstenite::client_async(req, tcp).await
    }

    #[tokio::test]
    async fn echoes_binary_messages_and_answers_pings() {
        let (addr, server) = echo_server().await;
        let (mut ws, resp) = connect(&addr, "/mqtt", Some("mqtt")).await.unwrap();
        assert_eq!(resp.headers()[header::SEC_WEBSOCKET_PROTOCOL], "mqtt");

        // A CONNECT split over two messages: the byte stream must not care.
        let sent: Vec<u8> = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04dev1".to_vec();
        ws.send(Message::binary(sent[..5].to_vec())).await.unwrap();
        ws.send(Message::Ping(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        ws.send(Message::binary(sent[5..].to_vec())).await.unwrap();

        let mut echoed = Vec::new();
        let mut ponged = false;
        while echoed.len() < sent.len() || !ponged {
            match ws.next().await.unwrap().unwrap() {
                Message::Binary(b) => echoed.extend_from_slice(&b),
                Message::Pong(p) => {
                    assert_eq!(&p[..], b"hi");
                    ponged = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(echoed, sent);

        // Close → the server reads EOF, shuts down cleanly, and the client sees the close.
        ws.close(None).await.unwrap();
        while let Some(msg) = ws.next().await {
            if msg.is_err() {
                break;
            }
        }
        server.await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn legacy_and_missing_subprotocol_are_accepted() {
        let (addr, server) = echo_server().await;
        let (mut ws, resp) = connect(&addr, "/mqtt", Some("foo, mqttv3.1"))
            .await
            .unwrap();
        assert_eq!(resp.headers()[header::SEC_WEBSOCKET_PROTOCOL], "mqttv3.1");
        ws.close(None).await.unwrap();
        drop(ws);
        server.await.unwrap().unwrap().unwrap();

        let (addr, server) = echo_server().await;
        let (mut ws, resp) = connect(&addr, "/mqtt", None).await.unwrap();
        assert!(resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).is_none());
        ws.send(Message::binary(b"\xc0\x00".to_vec()))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::binary(b"\xc0\x00".to_vec())
        );
        ws.close(None).await.unwrap();
        drop(ws);
        server.await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn wrong_path_is_404() {
        let (addr, server) = echo_server().await;
        match connect(&addr, "/other", Some("mqtt")).await {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), StatusCode::NOT_FOUND),
            other => panic!("expected 404, got {other:?}"),
        }
        assert!(matches!(server.await.unwrap(), Err(WsError::Handshake(_))));
    }

    #[tokio::test]
    async fn foreign_subprotocol_is_400() {
        let (addr, server) = echo_server().await;
        match connect(&addr, "/mqtt", Some("foo")).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), StatusCode::BAD_REQUEST)
            }
            other => panic!("expected 400, got {other:?}"),
        }
        assert!(matches!(server.await.unwrap(), Err(WsError::Handshake(_))));
    }

    #[tokio::test]
    async fn text_message_is_invalid_data() {
        let (addr, server) = echo_server().await;
        let (mut ws, _) = connect(&addr, "/mqtt", Some("mqtt")).await.unwrap();
        ws.send(Message::text("hello")).await.unwrap();
        let err = server.await.unwrap().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
