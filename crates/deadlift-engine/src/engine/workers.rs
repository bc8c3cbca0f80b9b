//! The worker threads behind the async `Engine::call`: a fixed set of plain threads fed
//! by a bounded queue, so a burst of calls waits instead of spawning without limit, and
//! no guest ever runs on an async thread.

use std::sync::Arc;
use std::thread::JoinHandle;

use std::panic::AssertUnwindSafe;

use parking_lot::Mutex;

use crate::error::CallError;

pub(super) type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads that run calls, fed by a bounded queue.
#[derive(Clone)]
pub(super) struct WorkerPool {
    jobs: tokio::sync::mpsc::Sender<Job>,
    _threads: Arc<Vec<JoinHandle<()>>>,
}

impl WorkerPool {
    pub(super) fn start(workers: usize) -> std::io::Result<Self> {
        let (jobs, queue) = tokio::sync::mpsc::channel::<Job>(workers * 256);
        let queue = Arc::new(Mutex::new(queue));
        let threads = (0..workers)
            .map(|n| {
                let queue = queue.clone();
                std::thread::Builder::new()
                    .name(format!("deadlift-worker-{n}"))
                    .spawn(move || {
                        loop {
                            let job = queue.lock().blocking_recv();
                            let Some(job) = job else { break };
                            // A panic is a bug, but it must not take a worker with it.
                            if std::panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
                                tracing::error!("a call panicked; the worker carries on");
                            }
                        }
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            jobs,
            _threads: Arc::new(threads),
        })
    }

    pub(super) async fn submit(&self, job: Job) -> Result<(), CallError> {
        self.jobs
            .send(job)
            .await
            .map_err(|_| CallError::Overloaded {
                reason: "the engine is shutting down".into(),
            })
    }
}
