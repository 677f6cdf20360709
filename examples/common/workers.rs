//! The end of a thread-per-core example (`reverse_proxy --workers`, `cache_server`): the
//! main thread only waits for SIGTERM or Ctrl-C (or a handoff to a new process), then
//! drains every worker.
//!
//! Included by each example with `#[path = "common/workers.rs"] mod workers;`.

use tower_patterns::server::WorkersHandle;
use tower_patterns::BoxError;

/// Blocks until SIGTERM or Ctrl-C, then stops the workers accepting and waits for their
/// open requests (the drain of [`WorkersHandle::shutdown`]); or until a new process took
/// the listening sockets over (`--handoff`), after which the workers drain by themselves.
pub fn serve_until_stopped(handle: WorkersHandle) -> Result<(), BoxError> {
    // A runtime of its own: the workers' runtimes live on their threads, and the signal
    // streams need one to be polled on.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            tokio::select! {
                r = stop_signal() => r,
                () = handle.stopping() => {
                    eprintln!("handed over to a new process; draining");
                    Ok(())
                }
            }
        })?;
    handle.shutdown();
    handle.join()?;
    Ok(())
}

async fn stop_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await
}
