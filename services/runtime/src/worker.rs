//! A thread that owns a service's libtorch state. tch tensors are `Send` but not `Sync`, and libtorch calls
//! block: async handlers send closures here and await the reply, so the tokio runtime never blocks and
//! the state is touched by one thread only.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic::Status;

type Task<S> = Box<dyn FnOnce(&mut S) + Send>;

thread_local! {
    /// The cancellation flag of the call the worker thread is running.
    static CURRENT: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Whether the caller of the work running on this worker thread has gone away (its client disconnected
/// or its deadline passed: tonic drops the handler's future). Long work polls this between steps (tokens,
/// batches) and stops with CANCELLED.
pub fn cancelled() -> bool {
    CURRENT.with(|c| c.borrow().as_ref().is_some_and(|f| f.load(Ordering::Relaxed)))
}

/// Sets its flag when dropped: when the awaiting handler future is dropped before the work replied.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The message of a caught panic (`panic!` payloads are a `String` or a `&str`).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Runs blocking work (file I/O, a merge) on tokio's blocking pool; a panic there becomes INTERNAL.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("internal error: {e}")))?
}

/// Handle to the worker thread.
pub struct Worker<S> {
    tx: std::sync::mpsc::Sender<Task<S>>,
}

impl<S> Clone for Worker<S> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone() }
    }
}

impl<S: 'static> Worker<S> {
    /// Starts the thread with `threads` CPU threads for its libtorch work (0 = all this process may use);
    /// `init` builds the state on it.
    pub fn spawn(name: &str, threads: usize, init: impl FnOnce() -> S + Send + 'static) -> anyhow::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Task<S>>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                ferrotune_core::threads::set_for_this_thread(ferrotune_core::threads::resolve(threads));
                let mut state = init();
                while let Ok(task) = rx.recv() {
                    task(&mut state);
                }
            })
            .map_err(|e| anyhow::anyhow!("starting worker {name}: {e}"))?;
        Ok(Self { tx })
    }

    /// Runs `f` on the worker thread and returns its result. A panic in `f` becomes INTERNAL (the worker
    /// keeps running). When the caller goes away first, queued work never starts and running work sees
    /// [`cancelled`].
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> Result<R, Status> + Send + 'static,
    ) -> Result<R, Status> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let flag = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(flag.clone());
        let task: Task<S> = Box::new(move |s: &mut S| {
            if flag.load(Ordering::Relaxed) {
                return;
            }
            CURRENT.with(|c| *c.borrow_mut() = Some(flag));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(s)));
            CURRENT.with(|c| *c.borrow_mut() = None);
            let r = r.unwrap_or_else(|p| {
                Err(Status::internal(format!("internal error (panic): {}", panic_message(p.as_ref()))))
            });
            let _ = tx.send(r);
        });
        self.tx.send(task).map_err(|_| Status::unavailable("the worker has stopped"))?;
        rx.await.map_err(|_| Status::internal("the worker dropped the request"))?
    }

    /// Queues `f` without waiting (streaming handlers report through their own channel).
    pub fn submit(&self, f: impl FnOnce(&mut S) + Send + 'static) -> Result<(), Status> {
        self.tx.send(Box::new(f)).map_err(|_| Status::unavailable("the worker has stopped"))
    }
}
