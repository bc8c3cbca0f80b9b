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
//!
//! A blocking job (a plain call) runs on its worker from start to end. A suspendable job
//! (a call that may wait on an async host function or the network, or that yields at the
//! end of its time slice) is a future the worker polls itself (workers run no Tokio
//! runtime, so a sync host function may block as on any thread): while it waits, it
//! gives its place back (`Suspend`: it counts neither against the
//! workers nor against its tenant's calls in flight, but against
//! [`Fairness::tenant_suspended`] and [`Fairness::max_suspended`]), and the worker takes
//! other calls; when its wait ends it takes a place again, and the worker that started
//! it polls it on.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::CallError;
use crate::executor::Suspend;

/// What a queued job is told when a worker reaches it.
pub(super) enum Admission {
    Run,
    /// It is not run: the caller gets this error.
    Shed(CallError),
}

/// A call as queued: run to its end on the worker's thread, or as a local task that may
/// wait (suspended) while the worker runs others.
pub(super) enum Job {
    Blocking(Box<dyn FnOnce(Admission) + Send + 'static>),
    Suspendable(Box<dyn FnOnce(Admission, Suspend) -> Option<LocalCall> + Send + 'static>),
}

/// A suspendable call's future, run on the worker thread that took it.
pub(super) type LocalCall = Pin<Box<dyn Future<Output = ()> + 'static>>;

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
    /// Calls of one tenant waiting on async host functions at once without holding a
    /// worker; beyond, a waiting call keeps its place (as a blocking one does).
    pub tenant_suspended: usize,
    /// Calls waiting on async host functions at once, across tenants, without holding
    /// a worker.
    pub max_suspended: usize,
}

impl Fairness {
    pub(super) fn for_workers(workers: usize) -> Self {
        Self {
            tenant_in_flight: workers,
            tenant_queue: 1024,
            tenant_queue_bytes: 64 * 1024 * 1024,
            max_queue_wait: Duration::from_secs(2),
            tenant_suspended: 1024,
            max_suspended: 4096,
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
    /// Calls waiting on an async host function, not holding a worker.
    suspended: usize,
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
    /// Calls holding a worker's place.
    running: usize,
    suspended: usize,
    /// Workers waiting for a call to take, each woken by its own signal.
    idle: Vec<Arc<Signal>>,
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

    /// Wakes one waiting worker.
    fn wake_one(&mut self) {
        if let Some(worker) = self.idle.pop() {
            worker.notify_one();
        }
    }

    fn forget_if_done(&mut self, tenant: &Arc<str>) {
        if self
            .tenants
            .get(tenant)
            .is_some_and(|q| q.running == 0 && q.suspended == 0 && q.waiting.is_empty())
        {
            self.tenants.remove(tenant);
        }
    }
}

/// What a worker finds when it looks for a call.
enum Next {
    Taken(Taken),
    /// Nothing to take: wait for the worker's signal.
    Wait,
    Closed,
}

/// How a worker is woken (a call to take, one of its waiting calls ready, closing): a
/// permit and a condition variable. A spare wake-up only makes the worker look again.
#[derive(Default)]
struct Signal {
    permit: Mutex<bool>,
    cond: Condvar,
}

impl Signal {
    fn notify_one(&self) {
        *self.permit.lock() = true;
        self.cond.notify_one();
    }

    fn wait_blocking(&self) {
        let mut permit = self.permit.lock();
        while !*permit {
            self.cond.wait(&mut permit);
        }
        *permit = false;
    }
}

thread_local! {
    /// The signal of the worker this thread is, if it is one.
    static WORKER: RefCell<Option<Arc<Signal>>> = const { RefCell::new(None) };
}

/// Wakes the worker this thread is (its loop looks for work again).
fn wake_this_worker() {
    WORKER.with(|worker| {
        if let Some(worker) = worker.borrow().as_ref() {
            worker.notify_one();
        }
    });
}

struct Shared {
    state: Mutex<State>,
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

    /// The next job a worker may start and the jobs it found too old to start; else the
    /// worker is registered to be woken by `me`.
    fn next(&self, me: &Arc<Signal>) -> Next {
        let mut state = self.state.lock();
        if let Some(taken) = self.take(&mut state) {
            return Next::Taken(taken);
        }
        if state.closed {
            return Next::Closed;
        }
        if !state.idle.iter().any(|w| Arc::ptr_eq(w, me)) {
            state.idle.push(me.clone());
        }
        Next::Wait
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
                state.forget_if_done(&tenant);
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

    /// A call of `tenant` ended. A worker that ran a blocking call goes straight on to
    /// the next ready call itself, so only a call that ran elsewhere (`HereSlot`) or as
    /// a local task wakes one.
    fn finished(&self, tenant: &Arc<str>, wake: bool) {
        let mut state = self.state.lock();
        state.running -= 1;
        let Some(queue) = state.tenants.get_mut(tenant) else {
            return;
        };
        queue.running -= 1;
        state.forget_if_done(tenant);
        state.offer(tenant, self.fairness.tenant_in_flight);
        if wake && !state.ring.is_empty() {
            state.wake_one();
        }
    }

    /// A call of `tenant` starts waiting on an async host function: it gives its place
    /// back, if the bounds on waiting calls allow, and this thread looks for other work.
    fn suspend(self: &Arc<Self>, tenant: &Arc<str>) -> Option<Suspended> {
        let mut state = self.state.lock();
        if state.suspended >= self.fairness.max_suspended {
            return None;
        }
        let queue = state.tenants.get_mut(tenant)?;
        if queue.suspended >= self.fairness.tenant_suspended {
            return None;
        }
        queue.running -= 1;
        queue.suspended += 1;
        state.running -= 1;
        state.suspended += 1;
        state.offer(tenant, self.fairness.tenant_in_flight);
        drop(state);
        wake_this_worker();
        Some(Suspended {
            shared: self.clone(),
            tenant: tenant.clone(),
        })
    }
}

/// A call waiting on an async host function without holding a worker; dropped when the
/// wait ends, and the call holds a place again (on the thread it was running on).
struct Suspended {
    shared: Arc<Shared>,
    tenant: Arc<str>,
}

impl Drop for Suspended {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock();
        state.running += 1;
        state.suspended -= 1;
        if let Some(queue) = state.tenants.get_mut(&self.tenant) {
            queue.running += 1;
            queue.suspended -= 1;
        }
        // This thread runs the call again: it is not free for another one meanwhile.
        WORKER.with(|worker| {
            if let Some(me) = worker.borrow().as_ref() {
                state.idle.retain(|w| !Arc::ptr_eq(w, me));
            }
        });
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
        let mut state = self.shared.state.lock();
        state.closed = true;
        for worker in state.idle.drain(..) {
            worker.notify_one();
        }
    }
}

impl WorkerPool {
    pub(super) fn start(workers: usize, fairness: Fairness) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            fairness,
            workers,
            shed: AtomicU64::new(0),
        });
        let handles = (0..workers)
            .map(|n| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("deadlift-worker-{n}"))
                    .spawn(move || work(shared))
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
            state.wake_one();
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

fn work(shared: Arc<Shared>) {
    let me = Arc::new(Signal::default());
    WORKER.with(|worker| *worker.borrow_mut() = Some(me.clone()));
    serve(&shared, &me);
}

/// A suspendable call that waits, kept by the worker that started it.
struct Waiting {
    tenant: Arc<str>,
    call: LocalCall,
}

/// Wakes a waiting call: queues it as ready and signals its worker.
struct CallWaker {
    id: u64,
    ready: Arc<Mutex<Vec<u64>>>,
    signal: Arc<Signal>,
}

impl std::task::Wake for CallWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.lock().push(self.id);
        self.signal.notify_one();
    }
}

/// A worker's loop: take a call and run it (a suspendable one until it ends or waits);
/// poll the waiting calls that were woken; block when there is nothing to do. Worker
/// threads run no Tokio runtime: a sync host function may block as on any plain thread.
fn serve(shared: &Arc<Shared>, me: &Arc<Signal>) {
    let ready: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut waiting: HashMap<u64, Waiting> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        // Calls whose wait ended run on first: they hold a place again already.
        let woken = std::mem::take(&mut *ready.lock());
        for id in woken {
            let Some(mut entry) = waiting.remove(&id) else {
                continue;
            };
            let waker = Arc::new(CallWaker {
                id,
                ready: ready.clone(),
                signal: me.clone(),
            })
            .into();
            if poll_call(&mut entry.call, &waker) {
                shared.finished(&entry.tenant, true);
            } else {
                waiting.insert(id, entry);
            }
        }
        let Taken {
            tenant,
            job,
            expired,
        } = match shared.next(me) {
            Next::Taken(taken) => taken,
            Next::Wait => {
                me.wait_blocking();
                continue;
            }
            Next::Closed if waiting.is_empty() => return,
            Next::Closed => {
                me.wait_blocking();
                continue;
            }
        };
        for queued in expired {
            let error = shared.shed_error(&tenant, "waited longer than the bound for a worker");
            match queued.job {
                Job::Blocking(job) => job(Admission::Shed(error)),
                Job::Suspendable(job) => drop(job(Admission::Shed(error), inert_suspend())),
            }
        }
        let Some(queued) = job else { continue };
        match queued.job {
            Job::Blocking(job) => {
                // A panic is a bug, but it must not take a worker with it.
                if std::panic::catch_unwind(AssertUnwindSafe(|| job(Admission::Run))).is_err() {
                    tracing::error!("a call panicked; the worker carries on");
                }
                shared.finished(&tenant, false);
            }
            Job::Suspendable(job) => {
                let suspend = suspender(shared, &tenant);
                let started =
                    std::panic::catch_unwind(AssertUnwindSafe(|| job(Admission::Run, suspend)));
                let Ok(Some(mut call)) = started else {
                    if started.is_err() {
                        tracing::error!("a call panicked; the worker carries on");
                    }
                    shared.finished(&tenant, false);
                    continue;
                };
                let id = next_id;
                next_id += 1;
                let waker = Arc::new(CallWaker {
                    id,
                    ready: ready.clone(),
                    signal: me.clone(),
                })
                .into();
                if poll_call(&mut call, &waker) {
                    shared.finished(&tenant, false);
                } else {
                    waiting.insert(id, Waiting { tenant, call });
                }
            }
        }
    }
}

/// Polls a call once; whether it ended (a panic ends it too).
fn poll_call(call: &mut LocalCall, waker: &std::task::Waker) -> bool {
    let mut context = std::task::Context::from_waker(waker);
    match std::panic::catch_unwind(AssertUnwindSafe(|| call.as_mut().poll(&mut context))) {
        Ok(std::task::Poll::Ready(())) => true,
        Ok(std::task::Poll::Pending) => false,
        Err(_) => {
            tracing::error!("a call panicked; the worker carries on");
            true
        }
    }
}

/// Runs a suspendable call to its end on this thread (an embedder's own thread, for
/// `Engine::call_blocking`), sleeping while it waits.
pub(super) fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut context = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}

/// The `Suspend` a call of `tenant` uses to give its worker back while it waits.
fn suspender(shared: &Arc<Shared>, tenant: &Arc<str>) -> Suspend {
    let (shared, tenant) = (shared.clone(), tenant.clone());
    Suspend(Arc::new(move || {
        shared
            .suspend(&tenant)
            .map(|guard| Box::new(guard) as Box<dyn std::any::Any + Send>)
    }))
}

/// A `Suspend` that never gives a place back (for a call that is not run).
pub(super) fn inert_suspend() -> Suspend {
    Suspend(Arc::new(|| None))
}
