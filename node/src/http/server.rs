//! The HTTP server loop: at most `max_connections` connections at once (past that a new
//! connection is closed at once, before it costs a task), and a connection that does not
//! send a complete request head within `header_timeout` (a slowloris, or a keep-alive
//! connection left idle) is closed. Request bodies have their own deadlines in the routes
//! that read them.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 512;
/// Time a connection has to send each request head (and the longest idle keep-alive).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `app` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, app: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("http connection: {e}");
            }
            drop(slot);
        });
    }
}
