//! Issue 16: async host functions. A plug-in call that reaches one is suspended while its
//! future is pending, and the worker runs other calls meanwhile; deadlines, cancels,
//! panics and the engine's bounds still hold. Time slicing lets a short call through
//! while a long one runs on the only worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use deadlift_engine::{
    CallContext, CallError, CancelToken, Engine, Grant, HostError, HostFunction,
};

use crate::common::{TENANT, add};

/// Set when dropped: tells that the engine dropped a host function's future.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn until(what: &str, check: impl Fn() -> bool) {
    for _ in 0..3000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

/// An async `reflect` that answers only once released: counts the calls waiting on it.
struct Gate {
    waiting: Arc<AtomicUsize>,
    release: tokio::sync::watch::Sender<bool>,
    released: tokio::sync::watch::Receiver<bool>,
}

impl Gate {
    fn new() -> Self {
        let (release, released) = tokio::sync::watch::channel(false);
        Self {
            waiting: Arc::default(),
            release,
            released,
        }
    }

    fn offer(&self, builder: deadlift_engine::EngineBuilder) -> deadlift_engine::EngineBuilder {
        let (waiting, released) = (self.waiting.clone(), self.released.clone());
        builder.host_function(HostFunction::bytes_async("reflect", move |_ctx, input| {
            let waiting = waiting.clone();
            let mut released = released.clone();
            async move {
                waiting.fetch_add(1, Ordering::SeqCst);
                let _ = released.wait_for(|go| *go).await;
                Ok(input)
            }
        }))
    }
}

fn reflecting() -> Grant {
    Grant::default()
        .allow(["reflect"])
        .with_timeout(Duration::from_secs(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_host_function_answers_as_a_sync_one_does() {
    let engine = Engine::builder()
        .workers(2)
        .max_instances(16)
        .host_function(HostFunction::bytes_async(
            "reflect",
            |_ctx, input| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(input)
            },
        ))
        .build()
        .unwrap();
    let module = add(&engine, TENANT, "host_caller");
    let grant = reflecting().with_fuel(10_000_000);
    let ctx = CallContext::new(TENANT);
    let out = engine
        .call(&module, "call_reflect", b"ping", &grant, &ctx)
        .await
        .unwrap();
    assert_eq!(out.output, b"ping");
    let out = engine
        .call(&module, "call_reflect_n", b"50", &grant, &ctx)
        .await
        .unwrap();
    assert_eq!(out.output, b"50");
    // Waiting spends no fuel: the same call as with a sync host function.
    let sync = crate::common::engine();
    let sync_module = add(&sync, TENANT, "host_caller");
    for input in [&b"ping"[..], b"50"] {
        let function = if input == b"ping" {
            "call_reflect"
        } else {
            "call_reflect_n"
        };
        sync.call(&sync_module, function, input, &grant, &ctx)
            .await
            .unwrap();
    }
    let same = sync
        .call(&sync_module, "call_reflect_n", b"50", &grant, &ctx)
        .await
        .unwrap();
    let out = engine
        .call(&module, "call_reflect_n", b"50", &grant, &ctx)
        .await
        .unwrap();
    assert_eq!(out.fuel_used, same.fuel_used);
    // The embedder's own threads can call it too.
    let blocking = engine.clone();
    let answered = tokio::task::spawn_blocking(move || {
        blocking.call_blocking(&module, "call_reflect", b"pong", &grant, &ctx)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(answered.output, b"pong");
}

/// Two workers, 2,000 calls waiting on the host at once: each waiting call gives its
/// worker back. With blocking host functions this could never finish: the host answers
/// only once every call is waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_calls_wait_at_once_on_two_workers() {
    const CALLS: usize = 2000;
    let gate = Gate::new();
    let engine = gate
        .offer(
            Engine::builder()
                .workers(2)
                .max_instances(CALLS as u32)
                .tenant_queue(CALLS)
                .tenant_suspended(CALLS),
        )
        .build()
        .unwrap();
    let (waiting, release) = (gate.waiting.clone(), gate.release);
    let module = add(&engine, TENANT, "host_caller");
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let (engine, input) = (engine.clone(), i.to_string().into_bytes());
            tokio::spawn(async move {
                let out = engine
                    .call(
                        &module,
                        "call_reflect",
                        &input,
                        &reflecting(),
                        &CallContext::new(TENANT),
                    )
                    .await;
                (input, out)
            })
        })
        .collect();
    until("every call waits on the host", || {
        waiting.load(Ordering::SeqCst) == CALLS
    })
    .await;
    release.send(true).unwrap();
    for call in calls {
        let (input, out) = call.await.unwrap();
        assert_eq!(out.unwrap().output, input);
    }
}

/// Calls past the engine's instance bound are refused, not queued without end: what
/// waiting calls hold (an instance and a fiber stack each) stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_calls_stay_within_the_instance_bound() {
    let gate = Gate::new();
    let engine = gate
        .offer(Engine::builder().workers(2).max_instances(32))
        .build()
        .unwrap();
    let (waiting, release) = (gate.waiting.clone(), gate.release);
    let module = add(&engine, TENANT, "host_caller");
    let refused = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> = (0..48)
        .map(|_| {
            let (engine, refused) = (engine.clone(), refused.clone());
            tokio::spawn(async move {
                let out = engine
                    .call(
                        &module,
                        "call_reflect",
                        b"x",
                        &reflecting(),
                        &CallContext::new(TENANT),
                    )
                    .await;
                if matches!(out, Err(CallError::Overloaded { .. })) {
                    refused.fetch_add(1, Ordering::SeqCst);
                }
                out
            })
        })
        .collect();
    until("32 calls wait and 16 are refused", || {
        waiting.load(Ordering::SeqCst) == 32 && refused.load(Ordering::SeqCst) == 16
    })
    .await;
    release.send(true).unwrap();
    let done = futures_util::future::join_all(calls).await;
    assert_eq!(done.iter().filter(|r| matches!(r, Ok(Ok(_)))).count(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_or_a_cancel_ends_a_wait_and_drops_the_future() {
    let dropped = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(AtomicUsize::new(0));
    let engine = {
        let (dropped, entered) = (dropped.clone(), entered.clone());
        Engine::builder()
            .workers(2)
            .max_instances(16)
            .host_function(HostFunction::bytes_async("reflect", move |_ctx, _input| {
                let flag = DropFlag(dropped.clone());
                entered.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _flag = flag;
                    std::future::pending::<()>().await;
                    Ok(Vec::new())
                }
            }))
            .build()
            .unwrap()
    };
    let module = add(&engine, TENANT, "host_caller");
    let grant = Grant::default()
        .allow(["reflect"])
        .with_timeout(Duration::from_millis(200));
    let out = engine
        .call(
            &module,
            "call_reflect",
            b"x",
            &grant,
            &CallContext::new(TENANT),
        )
        .await;
    assert_eq!(
        out.unwrap_err(),
        CallError::Timeout {
            limit: Duration::from_millis(200)
        }
    );
    until("the future is dropped", || dropped.load(Ordering::SeqCst)).await;
    // The instance that was waiting is not used again.
    assert!(engine.stats().instances_discarded >= 1);

    // A cancel while waiting.
    dropped.store(false, Ordering::SeqCst);
    let cancel = CancelToken::new();
    let ctx = CallContext::new(TENANT).with_cancel(cancel.clone());
    let waiting = {
        let (engine, grant) = (engine.clone(), reflecting());
        tokio::spawn(async move {
            engine
                .call(&module, "call_reflect", b"x", &grant, &ctx)
                .await
        })
    };
    until("the call waits", || entered.load(Ordering::SeqCst) == 2).await;
    cancel.cancel();
    assert_eq!(waiting.await.unwrap().unwrap_err(), CallError::Cancelled);
    until("the future is dropped", || dropped.load(Ordering::SeqCst)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_that_fails_or_panics_is_a_typed_error() {
    let engine = Engine::builder()
        .workers(2)
        .max_instances(16)
        .host_function(HostFunction::bytes_async(
            "reflect",
            |_ctx, input| async move {
                match input.as_slice() {
                    b"fail" => Err(HostError::new("the purchase database is down")),
                    b"panic" => panic!("a bug in the embedder's host function"),
                    _ => Ok(input),
                }
            },
        ))
        .build()
        .unwrap();
    let module = add(&engine, TENANT, "host_caller");
    let call = |input: &'static [u8]| {
        let engine = engine.clone();
        async move {
            engine
                .call(
                    &module,
                    "call_reflect",
                    input,
                    &reflecting(),
                    &CallContext::new(TENANT),
                )
                .await
        }
    };
    match call(b"fail").await {
        Err(CallError::HostFunction { name, message }) => {
            assert_eq!(name, "reflect");
            assert_eq!(message, "the purchase database is down");
        }
        other => panic!("{other:?}"),
    }
    match call(b"panic").await {
        Err(CallError::HostFunction { name, message }) => {
            assert_eq!(name, "reflect");
            assert!(message.contains("panicked"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The engine carries on.
    assert_eq!(call(b"fine").await.unwrap().output, b"fine");
}

/// One worker: a guest that spins until its timeout, and a short call of another tenant
/// behind it. With time slicing the short call is answered while the long one still
/// runs; without, only after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_slicing_lets_a_short_call_past_a_long_one() {
    for sliced in [false, true] {
        let engine = Engine::builder()
            .workers(1)
            .max_instances(16)
            .time_slice(sliced.then_some(Duration::from_millis(5)))
            .build()
            .unwrap();
        let looper = add(&engine, "spinner", "looper");
        let adder = add(&engine, TENANT, "add_ten");
        let long = {
            let engine = engine.clone();
            let grant = Grant::default().with_timeout(Duration::from_millis(1500));
            tokio::spawn(async move {
                let out = engine
                    .call(
                        &looper,
                        "loop_forever",
                        b"",
                        &grant,
                        &CallContext::new("spinner"),
                    )
                    .await;
                assert!(matches!(out, Err(CallError::Timeout { .. })), "{out:?}");
            })
        };
        // The long call has the worker.
        until("the long call runs", || {
            engine.stats().instances_created >= 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let short = engine
            .call(
                &adder,
                "_main",
                b"5",
                &Grant::default(),
                &CallContext::new(TENANT),
            )
            .await
            .unwrap();
        assert_eq!(short.output, b"15");
        assert_eq!(
            long.is_finished(),
            !sliced,
            "sliced: {sliced}: the short call came {} the long one ended",
            if sliced { "after" } else { "before" }
        );
        long.await.unwrap();
    }
}

/// Worker threads run no Tokio runtime: a sync host function may block on a Tokio
/// primitive as on any thread (the agent's `emit` waits for its commit so), in a blocking
/// call and in a suspendable one alike. (An earlier version of the suspendable workers
/// ran a runtime on them, and such a wait panicked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_host_function_may_block_on_a_worker() {
    for sliced in [false, true] {
        let engine = Engine::builder()
            .workers(2)
            .max_instances(16)
            .time_slice(sliced.then_some(Duration::from_millis(5)))
            .host_function(HostFunction::bytes("reflect", |_ctx, input| {
                let (answer, answered) = tokio::sync::oneshot::channel();
                let input = input.to_vec();
                std::thread::spawn(move || answer.send(input));
                answered
                    .blocking_recv()
                    .map_err(|e| HostError::new(e.to_string()))
            }))
            .build()
            .unwrap();
        let module = add(&engine, TENANT, "host_caller");
        let out = engine
            .call(
                &module,
                "call_reflect",
                b"ping",
                &reflecting(),
                &CallContext::new(TENANT),
            )
            .await
            .unwrap();
        assert_eq!(out.output, b"ping", "sliced: {sliced}");
    }
}
