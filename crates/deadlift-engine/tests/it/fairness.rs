//! Calls are shared out between tenants: a flood from one tenant does not queue in front
//! of another's call, and calls that would wait too long are shed with a typed error.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadlift_engine::{CallError, Code, Engine, Fairness, Grant};

use crate::common::{self, add, ctx};

fn slow_grant() -> Grant {
    Grant::default().with_timeout(Duration::from_millis(150))
}

/// Issue 12: 40 one-second calls from one tenant delayed another tenant's trivial call
/// by 18.8 s (one FIFO queue). Tenant B's call now finishes while A's flood has barely
/// started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_tenant_does_not_queue_in_front_of_another() {
    let engine = common::builder().workers(2).build().unwrap();
    let looper = add(&engine, "tenant-a", "looper");
    let adder = add(&engine, "tenant-b", "add_ten");
    let finished_a = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..8 {
        let (engine, finished_a) = (engine.clone(), finished_a.clone());
        flood.push(tokio::spawn(async move {
            let result = engine
                .call(
                    &looper,
                    "loop_forever",
                    b"",
                    &slow_grant(),
                    &ctx("tenant-a"),
                )
                .await;
            // A's calls time out, or wait too long behind each other and are shed.
            assert!(
                matches!(
                    result,
                    Err(CallError::Timeout { .. } | CallError::Shed { .. })
                ),
                "{result:?}"
            );
            finished_a.fetch_add(1, Ordering::SeqCst);
        }));
    }
    // Let the flood queue up first.
    while engine.stats().calls == 0 && finished_a.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let out = engine
        .call(&adder, "_main", b"1", &Grant::default(), &ctx("tenant-b"))
        .await
        .unwrap();
    assert_eq!(out.output, b"11");
    let a_done = finished_a.load(Ordering::SeqCst);
    assert!(a_done <= 2, "B waited behind {a_done} of A's calls");
    for call in flood {
        call.await.unwrap();
    }
}

async fn call_looper(
    engine: &Engine,
    tenant: &str,
    module: &deadlift_engine::ModuleId,
) -> Result<(), CallError> {
    engine
        .call(module, "loop_forever", b"", &slow_grant(), &ctx(tenant))
        .await
        .map(|_| ())
}

/// A tenant's queue is bounded: beyond it calls are shed at once, with their own code,
/// and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_a_tenants_queue_are_shed() {
    let engine = common::builder()
        .workers(2)
        .fairness(Fairness {
            tenant_in_flight: 1,
            tenant_queue: 2,
            tenant_queue_bytes: usize::MAX,
            max_queue_wait: Duration::from_secs(30),
            tenant_suspended: 1024,
            max_suspended: 4096,
        })
        .build()
        .unwrap();
    let looper = add(&engine, "tenant-a", "looper");
    // One call running (its instance made), then five more long before it ends.
    let first = {
        let engine = engine.clone();
        tokio::spawn(async move { call_looper(&engine, "tenant-a", &looper).await })
    };
    while engine.stats().instances_created == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut calls =
        futures_util::future::join_all((0..5).map(|_| call_looper(&engine, "tenant-a", &looper)))
            .await;
    calls.push(first.await.unwrap());
    let mut shed = 0;
    for call in calls {
        match call {
            Err(error @ CallError::Shed { .. }) => {
                assert_eq!(error.code(), Code::TenantOverloaded);
                shed += 1;
            }
            other => assert!(matches!(other, Err(CallError::Timeout { .. })), "{other:?}"),
        }
    }
    // One running, two waiting; the other three are shed.
    assert_eq!(shed, 3);
    assert_eq!(engine.stats().calls_shed, 3);
    assert_eq!(engine.stats().errors_by_code[&Code::TenantOverloaded], 3);
}

/// Waiting calls hold their input: a tenant's queue is bounded in bytes too, or 1,024
/// calls of 4 MiB each would hold 4 GiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_a_tenants_queued_bytes_are_shed() {
    let engine = common::builder()
        .workers(1)
        .fairness(Fairness {
            tenant_in_flight: 1,
            tenant_queue: 100,
            tenant_queue_bytes: 1024 * 1024,
            max_queue_wait: Duration::from_secs(30),
            tenant_suspended: 1024,
            max_suspended: 4096,
        })
        .build()
        .unwrap();
    let looper = add(&engine, "tenant-a", "looper");
    let big = vec![b' '; 600 * 1024];
    let grant = slow_grant().with_max_input_bytes(1 << 20);
    let tenant = ctx("tenant-a");
    // Two waiting calls would hold 1.2 MiB: whether the first has started running when
    // the others arrive or not, at least one is shed, and at least one runs.
    let calls = futures_util::future::join_all(
        (0..3).map(|_| engine.call(&looper, "loop_forever", &big, &grant, &tenant)),
    )
    .await;
    let shed = calls
        .iter()
        .filter(|r| matches!(r, Err(CallError::Shed { reason, .. }) if reason.contains("input")))
        .count();
    let ran = calls
        .iter()
        .filter(|r| matches!(r, Err(CallError::Timeout { .. })))
        .count();
    assert!((1..=2).contains(&shed) && ran + shed == 3, "{calls:?}");
}

/// A call that waited longer than the bound for a worker is shed rather than run late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_waited_too_long_is_shed() {
    let engine = common::builder()
        .workers(1)
        .fairness(Fairness {
            tenant_in_flight: 1,
            tenant_queue: 10,
            tenant_queue_bytes: usize::MAX,
            max_queue_wait: Duration::from_millis(50),
            tenant_suspended: 1024,
            max_suspended: 4096,
        })
        .build()
        .unwrap();
    let looper = add(&engine, "tenant-a", "looper");
    // Whichever of the two runs first (150 ms), the other waits longer than 50 ms.
    let (one, other) = tokio::join!(
        call_looper(&engine, "tenant-a", &looper),
        call_looper(&engine, "tenant-a", &looper)
    );
    let mut outcomes = [one, other].map(|r| match r {
        Err(CallError::Timeout { .. }) => "ran",
        Err(CallError::Shed { .. }) => "shed",
        other => panic!("{other:?}"),
    });
    outcomes.sort();
    assert_eq!(outcomes, ["ran", "shed"]);
}

/// `call_direct` runs a call on the caller's own thread when every worker is idle (no
/// hand-over), and on a worker otherwise; the answer is the same either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_call_runs_here_only_while_the_workers_are_idle() {
    let (engine, started, release) = holding_engine(2);
    let caller = add(&engine, "tenant-a", "host_caller");
    let grant = Grant::default().allow(["reflect"]);
    let thread_of = |out: deadlift_engine::CallOutput| {
        let answer = String::from_utf8(out.output).unwrap();
        answer.split('|').next().unwrap_or_default().to_owned()
    };
    let tenant_a = ctx("tenant-a");
    let call_direct = || engine.call_direct(&caller, "call_reflect", b"", &grant, &tenant_a);
    let here = thread_of(call_direct().await.unwrap());
    assert!(!here.starts_with("deadlift-worker"), "{here}");
    let queued = engine
        .call(&caller, "call_reflect", b"", &grant, &ctx("tenant-a"))
        .await
        .unwrap();
    assert!(thread_of(queued).starts_with("deadlift-worker"));
    // While another tenant's call runs, a direct call goes to a worker like any other.
    let other = add(&engine, "tenant-b", "host_caller");
    let busy = {
        let (engine, grant) = (engine.clone(), grant.clone());
        tokio::spawn(async move {
            engine
                .call(&other, "call_reflect", b"hold", &grant, &ctx("tenant-b"))
                .await
        })
    };
    tokio::task::spawn_blocking(move || started.recv().unwrap())
        .await
        .unwrap();
    let during = thread_of(call_direct().await.unwrap());
    release.send(()).unwrap();
    busy.await.unwrap().unwrap();
    assert!(during.starts_with("deadlift-worker"), "{during}");
}

/// A call run in its caller's thread holds a worker's place: queued calls wait for it
/// rather than run beyond the worker count (the count once went past it and the free
/// workers were reckoned by an underflowing subtraction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_call_holds_a_workers_place() {
    let (engine, started, release) = holding_engine(1);
    let grant = Grant::default().allow(["reflect"]);
    let modules: Vec<_> = ["tenant-a", "tenant-b", "tenant-c"]
        .iter()
        .map(|tenant| add(&engine, tenant, "host_caller"))
        .collect();
    let held = {
        let (engine, grant, module) = (engine.clone(), grant.clone(), modules[0]);
        tokio::spawn(async move {
            engine
                .call_direct(&module, "call_reflect", b"hold", &grant, &ctx("tenant-a"))
                .await
        })
    };
    tokio::task::spawn_blocking(move || started.recv().unwrap())
        .await
        .unwrap();
    let queued: Vec<_> = ["tenant-b", "tenant-c"]
        .iter()
        .zip(&modules[1..])
        .map(|(tenant, module)| {
            let (engine, grant, module) = (engine.clone(), grant.clone(), *module);
            tokio::spawn(async move {
                engine
                    .call(&module, "call_reflect", b"queued", &grant, &ctx(tenant))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        engine.stats().calls,
        0,
        "a queued call ran beside the held one"
    );
    release.send(()).unwrap();
    assert!(held.await.unwrap().unwrap().output.ends_with(b"|hold"));
    for call in queued {
        assert!(call.await.unwrap().unwrap().output.ends_with(b"|queued"));
    }
}

/// An engine whose `reflect` answers `<the thread it ran on>|<its input>`; given `hold`,
/// it first says it started (`started`) and waits to be released (`release`).
fn holding_engine(
    workers: usize,
) -> (
    Engine,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let hold = std::sync::Mutex::new((started_tx, release_rx));
    let engine = Engine::builder()
        .workers(workers)
        .host_function(deadlift_engine::HostFunction::bytes(
            "reflect",
            move |_ctx, input| {
                if input == b"hold" {
                    let hold = hold.lock().unwrap();
                    hold.0.send(()).unwrap();
                    hold.1.recv().unwrap();
                }
                let thread = std::thread::current();
                let mut answer = thread.name().unwrap_or_default().as_bytes().to_vec();
                answer.push(b'|');
                answer.extend_from_slice(input);
                Ok(answer)
            },
        ))
        .build()
        .unwrap();
    (engine, started, release)
}
