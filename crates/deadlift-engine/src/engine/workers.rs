//! The worker threads behind the async `Engine::call`, and how they share out calls
//! between tenants. No guest ever runs on an async thread.
//!
//! Each tenant has its own queue; workers take the next call from the tenants in turn
//! (round robin), so a flood from one tenant waits behind itself, not in front of
//! others. A tenant has at most [`Fairness::tenant_in_flight`] calls running, and while
//! it has any running it may not take the last free worker: that one is kept for a
//! tenant with nothing running, so a newcomer's call starts at once even when another
//! tenant's long calls hold every other worker. Calls are never preempted: how long a
//! call can keep a worker is bounded by its grant's timeout.
//!
//! A call that waited longer than [`Fairness::max_queue_wait`], or that finds its
//! tenant's queue full, is shed with [`CallError::Shed`] instead of waiting on.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::CallError;

/// What a queued job is told when a worker reaches it.
pub(super) enum Admission {
    Run,
    /// It is not run: the caller gets this error.
    Shed(CallError),
}

pub(super) type Job = Box<dyn FnOnce(Admission) + Send + 'static>;

/// How the workers share out calls between tenants.
#[derive(Debug, Clone)]
pub struct Fairness {
    /// Calls of one tenant running at once.
    pub tenant_in_flight: usize,
    /// Calls of one tenant waiting at once; more are shed.
    pub tenant_queue: usize,
    /// Input bytes of one tenant's waiting calls; a call that would pass it is shed.
    pub tenant_queue_bytes: usize,
    /// A call that waited this long for a worker is shed.
    pub max_queue_wait: Duration,
}

impl Fairness {
    pub(super) fn for_workers(workers: usize) -> Self {
        Self {
            tenant_in_flight: workers,
            tenant_queue: 1024,
            tenant_queue_bytes: 64 * 1024 * 1024,
            max_queue_wait: Duration::from_secs(2),
        }
    }
}

struct Queued {
    job: Job,
    since: Instant,
    /// The call's input, held until it runs.
    bytes: usize,
}

#[derive(Default)]
struct TenantQueue {
    waiting: VecDeque<Queued>,
    /// The sum of `waiting`'s input bytes.
    waiting_bytes: usize,
    running: usize,
    /// Whether the tenant is in the ring of tenants with a call ready to start.
    ready: bool,
}

impl TenantQueue {
    fn pop(&mut self) -> Option<Queued> {
        let queued = self.waiting.pop_front()?;
        self.waiting_bytes -= queued.bytes;
        Some(queued)
    }
}

#[derive(Default)]
struct State {
    tenants: HashMap<Arc<str>, TenantQueue>,
    /// Tenants with a waiting call they may start, in turn order.
    ring: VecDeque<Arc<str>>,
    running: usize,
    closed: bool,
}

impl State {
    /// Puts a tenant in the ring if it has a call waiting and room to run it.
    fn offer(&mut self, tenant: &Arc<str>, in_flight: usize) -> bool {
        let Some(queue) = self.tenants.get_mut(tenant) else {
            return false;
        };
        if queue.ready || queue.waiting.is_empty() || queue.running >= in_flight {
            return false;
        }
        queue.ready = true;
        self.ring.push_back(tenant.clone());
        true
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    fairness: Fairness,
    workers: usize,
    shed: AtomicU64,
}

impl Shared {
    fn shed_error(&self, tenant: &str, why: &str) -> CallError {
        self.shed.fetch_add(1, Ordering::Relaxed);
        CallError::Shed {
            reason: format!("tenant `{tenant}` {why}"),
            retry_after: self.fairness.max_queue_wait.max(Duration::from_secs(1)),
        }
    }

    /// The next job a worker may start and the jobs it found too old to start; `None`
    /// once closed with nothing ready.
    fn next(&self) -> Option<Taken> {
        let mut state = self.state.lock();
        loop {
            if let Some(taken) = self.take(&mut state) {
                return Some(taken);
            }
            if state.closed {
                return None;
            }
            self.wake.wait(&mut state);
        }
    }

    fn take(&self, state: &mut State) -> Option<Taken> {
        let now = Instant::now();
        let mut passed = 0;
        // A call run by its caller (`HereSlot`) holds a worker's place too.
        if state.running >= self.workers {
            return None;
        }
        while passed < state.ring.len() {
            let tenant = state.ring.pop_front()?;
            let free = self.workers.saturating_sub(state.running);
            let Some(queue) = state.tenants.get_mut(&tenant) else {
                continue;
            };
            // The last free worker is kept for a tenant with nothing running.
            if queue.running > 0 && free <= 1 && self.workers > 1 {
                state.ring.push_back(tenant);
                passed += 1;
                continue;
            }
            queue.ready = false;
            let mut expired = Vec::new();
            while queue
                .waiting
                .front()
                .is_some_and(|q| now.duration_since(q.since) > self.fairness.max_queue_wait)
            {
                expired.extend(queue.pop());
            }
            let Some(job) = queue.pop() else {
                if queue.running == 0 {
                    state.tenants.remove(&tenant);
                }
                if expired.is_empty() {
                    continue;
                }
                return Some(Taken {
                    tenant,
                    job: None,
                    expired,
                });
            };
            queue.running += 1;
            state.running += 1;
            state.offer(&tenant, self.fairness.tenant_in_flight);
            return Some(Taken {
                tenant,
                job: Some(job),
                expired,
            });
        }
        None
    }

    /// A call of `tenant` ended. A worker that ran it goes straight on to the next
    /// ready call itself, so only a call that ran elsewhere (`HereSlot`) wakes one.
    fn finished(&self, tenant: &Arc<str>, wake: bool) {
        let mut state = self.state.lock();
        state.running -= 1;
        let Some(queue) = state.tenants.get_mut(tenant) else {
            return;
        };
        queue.running -= 1;
        if queue.running == 0 && queue.waiting.is_empty() {
            state.tenants.remove(tenant);
        } else {
            state.offer(tenant, self.fairness.tenant_in_flight);
        }
        if wake && !state.ring.is_empty() {
            self.wake.notify_one();
        }
    }
}

/// A worker's place taken by a call its caller runs (see `WorkerPool::try_run_here`).
pub(super) struct HereSlot {
    shared: Arc<Shared>,
    tenant: Arc<str>,
}

impl Drop for HereSlot {
    fn drop(&mut self) {
        self.shared.finished(&self.tenant, true);
    }
}

/// What a worker took from a tenant's queue.
struct Taken {
    tenant: Arc<str>,
    /// The job to run (counted as running until `finished`).
    job: Option<Queued>,
    /// Jobs that waited too long: shed.
    expired: Vec<Queued>,
}

/// The worker threads and the tenants' queues in front of them.
#[derive(Clone)]
pub(super) struct WorkerPool {
    shared: Arc<Shared>,
    _threads: Arc<Threads>,
}

/// Closes the queues when the last handle goes: each worker ends once it has nothing
/// ready (they are not joined, so dropping an engine never waits for a call).
struct Threads {
    shared: Arc<Shared>,
    _handles: Vec<JoinHandle<()>>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.shared.state.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

impl WorkerPool {
    pub(super) fn start(workers: usize, fairness: Fairness) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            fairness,
            workers,
            shed: AtomicU64::new(0),
        });
        let handles = (0..workers)
            .map(|n| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("deadlift-worker-{n}"))
                    .spawn(move || work(&shared))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            _threads: Arc::new(Threads {
                shared: shared.clone(),
                _handles: handles,
            }),
            shared,
        })
    }

    /// Queues a job for `tenant`; it is refused at once when the tenant's queue is full
    /// or its oldest call has waited too long already.
    pub(super) fn submit(&self, tenant: &str, bytes: usize, job: Job) -> Result<(), CallError> {
        let shared = &self.shared;
        let mut state = shared.state.lock();
        if state.closed {
            return Err(CallError::Overloaded {
                reason: "the engine is shutting down".into(),
            });
        }
        let key: Arc<str> = match state.tenants.get_key_value(tenant) {
            Some((key, _)) => key.clone(),
            None => Arc::from(tenant),
        };
        let queue = state.tenants.entry(key.clone()).or_default();
        let now = Instant::now();
        if queue.waiting.len() >= shared.fairness.tenant_queue {
            drop(state);
            return Err(shared.shed_error(tenant, "has too many calls waiting"));
        }
        if queue.waiting_bytes.saturating_add(bytes) > shared.fairness.tenant_queue_bytes {
            drop(state);
            return Err(shared.shed_error(tenant, "has too much input waiting"));
        }
        if queue
            .waiting
            .front()
            .is_some_and(|q| now.duration_since(q.since) > shared.fairness.max_queue_wait)
        {
            drop(state);
            return Err(shared.shed_error(tenant, "has calls waiting longer than the bound"));
        }
        queue.waiting_bytes += bytes;
        queue.waiting.push_back(Queued {
            job,
            since: now,
            bytes,
        });
        let busy_tenant = queue.running > 0;
        // Wake a worker only if one could start the call now: otherwise (every worker
        // busy, or only the spare free and the tenant already running) the next worker
        // to finish takes it.
        let free = shared.workers.saturating_sub(state.running);
        let startable = free > 0 && !(busy_tenant && free <= 1 && shared.workers > 1);
        if state.offer(&key, shared.fairness.tenant_in_flight) && startable {
            shared.wake.notify_one();
        }
        Ok(())
    }

    /// Takes a worker's place for a call the caller runs itself, when the workers are
    /// all idle (so the call would start at once anyway). The
    /// same limits hold as for queued calls; the place is given back when the slot
    /// drops.
    pub(super) fn try_run_here(&self, tenant: &str) -> Option<HereSlot> {
        let shared = &self.shared;
        let mut state = shared.state.lock();
        // Only when no call runs at all: under load, handing the async thread's work
        // elsewhere costs more than the hop it saves.
        if state.closed || state.running > 0 {
            return None;
        }
        // Nothing runs, so no limit can stand in the way; only the tenant's own waiting
        // calls go first.
        if state
            .tenants
            .get(tenant)
            .is_some_and(|queue| !queue.waiting.is_empty())
        {
            return None;
        }
        let key: Arc<str> = Arc::from(tenant);
        let queue = state.tenants.entry(key.clone()).or_default();
        queue.running += 1;
        state.running += 1;
        Some(HereSlot {
            shared: shared.clone(),
            tenant: key,
        })
    }

    /// Calls shed so far.
    pub(super) fn shed(&self) -> u64 {
        self.shared.shed.load(Ordering::Relaxed)
    }
}

fn work(shared: &Shared) {
    while let Some(Taken {
        tenant,
        job,
        expired,
    }) = shared.next()
    {
        for queued in expired {
            let error = shared.shed_error(&tenant, "waited longer than the bound for a worker");
            (queued.job)(Admission::Shed(error));
        }
        let Some(job) = job else { continue };
        // A panic is a bug, but it must not take a worker with it.
        if std::panic::catch_unwind(AssertUnwindSafe(|| (job.job)(Admission::Run))).is_err() {
            tracing::error!("a call panicked; the worker carries on");
        }
        shared.finished(&tenant, false);
    }
}
