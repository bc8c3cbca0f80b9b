//! Issue 15 (the engine's part): tapes. A call records its host calls with their
//! arguments and answers; a replay answers them from the tape, so nothing the host does
//! happens again (no KV write), and a host call the tape cannot answer is a divergence
//! that is not run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use deadlift_engine::host::KvStore;
use deadlift_engine::tape::{Answer, HostCall, Tape};
use deadlift_engine::{CallContext, CallError, Engine, Grant, HostFunction, MemoryKv};

use crate::common::{TENANT, add};

/// An engine whose `reflect` counts how often it really runs.
fn counting(runs: &Arc<AtomicUsize>, asynchronous: bool) -> Engine {
    let runs = runs.clone();
    let reflect = if asynchronous {
        HostFunction::bytes_async("reflect", move |_ctx, input| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move { Ok(input) }
        })
    } else {
        HostFunction::bytes("reflect", move |_ctx, input| {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(input.to_vec())
        })
    };
    Engine::builder()
        .workers(2)
        .max_instances(16)
        .host_function(reflect)
        .build()
        .unwrap()
}

fn reflect() -> Grant {
    Grant::default().allow(["reflect"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_records_its_host_calls_and_a_replay_answers_them() {
    for asynchronous in [false, true] {
        let runs = Arc::new(AtomicUsize::new(0));
        let engine = counting(&runs, asynchronous);
        let module = add(&engine, TENANT, "host_caller");
        let tape = Tape::recording();
        let ctx = CallContext::new(TENANT).with_tape(tape.clone());
        let live = engine
            .call(&module, "call_reflect_n", b"3", &reflect(), &ctx)
            .await
            .unwrap();
        let recorded = tape.calls();
        assert_eq!(recorded.len(), 3, "async: {asynchronous}");
        assert_eq!(
            recorded[0],
            HostCall {
                function: "reflect".into(),
                args: vec![b"x".to_vec()],
                answer: Answer::Output(Some(b"x".to_vec())),
            }
        );
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        // Stored as JSON and read back, as an agent keeps tapes.
        let stored = serde_json::to_string(&recorded).unwrap();
        let recorded: Vec<HostCall> = serde_json::from_str(&stored).unwrap();

        let replay = Tape::replaying(recorded);
        let ctx = CallContext::new(TENANT).with_tape(replay.clone());
        let again = engine
            .call(&module, "call_reflect_n", b"3", &reflect(), &ctx)
            .await
            .unwrap();
        assert_eq!(again.output, live.output);
        assert_eq!(replay.used(), 3);
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "the replay ran no host function"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reads_kv_from_the_tape_and_writes_nothing() {
    let kv = Arc::new(MemoryKv::new());
    let engine = Engine::builder()
        .workers(2)
        .max_instances(16)
        .kv(kv.clone())
        .build()
        .unwrap();
    let module = add(&engine, TENANT, "kv_counter");
    let grant = Grant::default().allow(["kv_get", "kv_set", "kv_delete"]);
    let tape = Tape::recording();
    let ctx = CallContext::new(TENANT).with_tape(tape.clone());
    let live = engine
        .call(&module, "increment", b"visits", &grant, &ctx)
        .await
        .unwrap();
    assert_eq!(live.output, b"1");
    assert_eq!(kv.get(TENANT, "visits").unwrap(), Some(b"1".to_vec()));
    let names: Vec<String> = tape.calls().into_iter().map(|c| c.function).collect();
    assert_eq!(names, ["kv_get", "kv_set"]);

    // Replayed twice: the counter the guest reads is the tape's, both times.
    for _ in 0..2 {
        let ctx = CallContext::new(TENANT).with_tape(Tape::replaying(tape.calls()));
        let again = engine
            .call(&module, "increment", b"visits", &grant, &ctx)
            .await
            .unwrap();
        assert_eq!(again.output, b"1");
    }
    assert_eq!(kv.get(TENANT, "visits").unwrap(), Some(b"1".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_call_the_tape_lacks_diverges_and_is_not_run() {
    let runs = Arc::new(AtomicUsize::new(0));
    let engine = counting(&runs, false);
    let module = add(&engine, TENANT, "host_caller");
    let tape = Tape::recording();
    let ctx = CallContext::new(TENANT).with_tape(tape.clone());
    engine
        .call(&module, "call_reflect", b"ping", &reflect(), &ctx)
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Another function with other arguments against that tape.
    let ctx = CallContext::new(TENANT).with_tape(Tape::replaying(tape.calls()));
    let diverged = engine
        .call(&module, "call_reflect_n", b"2", &reflect(), &ctx)
        .await
        .unwrap_err();
    assert!(
        matches!(&diverged, CallError::Diverged { index: 0, function, .. } if function == "reflect"),
        "{diverged:?}"
    );
    assert_eq!(diverged.code().as_str(), "replay_diverged");
    // One call more than the tape holds diverges too.
    let ctx = CallContext::new(TENANT).with_tape(Tape::replaying(Vec::new()));
    assert!(matches!(
        engine
            .call(&module, "call_reflect", b"ping", &reflect(), &ctx)
            .await,
        Err(CallError::Diverged { .. })
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "no replayed host call ran");
}

/// A tape notes the vars and config its call started with; a replay's fresh instance
/// starts with those vars, so state kept in vars replays as it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tape_records_the_vars_and_config_a_call_starts_with() {
    let engine = Engine::builder().workers(1).build().unwrap();
    let module = add(&engine, TENANT, "vars_config");
    let grant = Grant::default().with_config("greeting", "Hi");
    let plain = CallContext::new(TENANT);
    for _ in 0..2 {
        engine
            .call(&module, "greet", b"Ada", &grant, &plain)
            .await
            .unwrap();
    }
    let tape = Tape::recording();
    let live = engine
        .call(
            &module,
            "get_count",
            b"",
            &grant,
            &CallContext::new(TENANT).with_tape(tape.clone()),
        )
        .await
        .unwrap();
    assert_eq!(live.output, b"2");
    let start = tape.start();
    assert_eq!(start.vars.get("count").map(Vec::as_slice), Some(&b"2"[..]));
    assert_eq!(start.config.get("greeting").map(String::as_str), Some("Hi"));

    let from_start = CallContext::new(TENANT).with_tape(Tape::replaying_from(Vec::new(), start));
    let replayed = engine
        .call(&module, "get_count", b"", &grant, &from_start)
        .await
        .unwrap();
    assert_eq!(replayed.output, b"2");
    // Without the recorded start, a replay's fresh instance has no vars.
    let bare = CallContext::new(TENANT).with_tape(Tape::replaying(Vec::new()));
    let replayed = engine
        .call(&module, "get_count", b"", &grant, &bare)
        .await
        .unwrap();
    assert_eq!(replayed.output, b"0");
}
