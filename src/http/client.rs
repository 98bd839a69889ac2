//! The one HTTP client of meshd and meshctl: a `GET` over a connection the caller opened (TCP
//! to a peer's catalog sync or to a metrics port, the admin API's Unix socket), on hyper 1, with
//! the answer's body capped and the whole exchange under a deadline. The caller opens the
//! connection because only it knows what a failure to connect means (a peer down, meshd not
//! running, a socket only root may open) and how to say so.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// A complete answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// The value of header `name`, when it is there and is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }
}

/// Why a `GET` got no complete answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer's body is larger than the {0}-byte limit")]
    TooLarge(usize),
    /// The other side does not speak HTTP/1, or broke off the answer.
    #[error("not an HTTP answer: {0}")]
    Protocol(String),
    /// A header this side was asked to send cannot be sent (not visible ASCII).
    #[error("cannot send header {name}: {problem}")]
    Header { name: String, problem: String },
}

/// `GET target` with `headers` over `connection`, the body at most `max_body` bytes, all of it
/// within `timeout`.
pub async fn get<C>(
    connection: C,
    host: &str,
    target: &str,
    headers: &[(&str, &str)],
    max_body: usize,
    timeout: Duration,
) -> Result<Response, HttpError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let request = request(host, target, headers)?;
    tokio::time::timeout(timeout, exchange(connection, request, max_body))
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

fn request(
    host: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Result<hyper::Request<Empty<Bytes>>, HttpError> {
    let bad = |name: &str, problem: String| HttpError::Header {
        name: name.to_string(),
        problem,
    };
    let mut request = hyper::Request::get(target)
        .body(Empty::new())
        .map_err(|e| bad("(request target)", format!("{target:?}: {e}")))?;
    let list = request.headers_mut();
    list.insert(
        HOST,
        HeaderValue::from_str(host).map_err(|e| bad("host", e.to_string()))?,
    );
    for (name, value) in headers {
        let key = HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad(name, e.to_string()))?;
        let value = HeaderValue::from_str(value).map_err(|e| bad(name, e.to_string()))?;
        list.insert(key, value);
    }
    Ok(request)
}

async fn exchange<C>(
    connection: C,
    request: hyper::Request<Empty<Bytes>>,
    max_body: usize,
) -> Result<Response, HttpError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let protocol = |e: hyper::Error| HttpError::Protocol(e.to_string());
    let (mut sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(connection))
        .await
        .map_err(protocol)?;
    let answer = async move {
        let response = sender.send_request(request).await.map_err(protocol)?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    HttpError::TooLarge(max_body)
                } else {
                    HttpError::Protocol(e.to_string())
                }
            })?
            .to_bytes();
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    tokio::pin!(answer, driver);
    tokio::select! {
        biased;
        done = &mut answer => done,
        ended = &mut driver => match ended {
            // The connection closed: what was read before is the whole answer, or an error.
            Ok(()) => answer.await,
            Err(e) => Err(protocol(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    //! Against real servers on loopback: a well-behaved one, and the ones an attacker runs.
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A server that reads the request and answers `reply` (raw bytes), then closes.
    async fn server(reply: &'static [u8]) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
            }
        });
        addr
    }

    async fn ask(addr: std::net::SocketAddr, max: usize) -> Result<Response, HttpError> {
        let s = TcpStream::connect(addr).await.unwrap();
        get(
            s,
            "peer",
            "/v1/catalog",
            &[("if-none-match", "\"3\"")],
            max,
            Duration::from_millis(500),
        )
        .await
    }

    #[tokio::test]
    async fn answers_with_length_chunked_and_close_delimited_bodies() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\netag: \"4\"\r\ncontent-length: 5\r\n\r\nhello"[..],
            &b"HTTP/1.1 200 OK\r\netag: \"4\"\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"[..],
            &b"HTTP/1.0 200 OK\r\netag: \"4\"\r\n\r\nhello"[..],
        ] {
            let r = ask(server(reply).await, 100).await.unwrap();
            assert_eq!((r.status, r.header("etag"), &r.body[..]), (200, Some("\"4\""), &b"hello"[..]));
        }
        let r = ask(server(b"HTTP/1.1 304 Not Modified\r\n\r\n").await, 100)
            .await
            .unwrap();
        assert_eq!(r.status, 304);
    }

    #[tokio::test]
    async fn bodies_over_the_cap_silence_and_garbage_are_errors() {
        let mut reply = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec();
        reply.resize(reply.len() + 1000, b'x');
        let big = ask(server(reply.leak()).await, 100).await;
        assert!(matches!(big, Err(HttpError::TooLarge(100))), "{big:?}");
        let endless = ask(server(b"HTTP/1.0 200 OK\r\n\r\n0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789extra").await, 100).await;
        assert!(
            matches!(endless, Err(HttpError::TooLarge(100))),
            "{endless:?}"
        );
        let ssh = ask(server(b"SSH-2.0-OpenSSH_9.2\r\n").await, 100).await;
        assert!(matches!(ssh, Err(HttpError::Protocol(_))), "{ssh:?}");
        let cut = ask(
            server(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc").await,
            100,
        )
        .await;
        assert!(matches!(cut, Err(HttpError::Protocol(_))), "{cut:?}");
        // A server that accepts and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let kept = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(kept);
        });
        let silent = ask(addr, 100).await;
        assert!(matches!(silent, Err(HttpError::Timeout(_))), "{silent:?}");
    }

    #[tokio::test]
    async fn a_header_that_cannot_be_sent_is_named() {
        let s = TcpStream::connect(server(b"HTTP/1.1 200 OK\r\n\r\n").await)
            .await
            .unwrap();
        let e = get(
            s,
            "peer",
            "/",
            &[("if-none-match", "a\r\nb")],
            10,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("if-none-match"), "{e}");
    }
}
