//! Tapes: a call's host calls, in order, with their arguments and answers. Recording one
//! costs a copy of each host call's bytes; replaying one answers every host call from the
//! tape instead of running it, so a new version of a plug-in can run on recorded inputs
//! deterministically and with no side effect (no KV write, no event, no request). A host
//! call the tape cannot answer (another function, other arguments, one call too many) is
//! a divergence: it is not run, and the call fails with `CallError::Diverged`.
//!
//! A tape covers the `extism:host/user` functions (the built-ins `kv_*` and `emit`
//! included) and `http_request`, and what the call started with besides its input
//! ([`Start`]): the instance's vars, which a replay's fresh instance starts with, and the
//! grant's config, which the embedder may give the replay's grant (a replay runs with the
//! config of the grant it is given).

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::CallError;

/// One host call as the guest made it and as the host answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCall {
    pub function: String,
    /// The bytes behind each argument handle.
    #[serde(with = "hex_list")]
    pub args: Vec<Vec<u8>>,
    /// The answer: bytes (none for a function without a result, or an empty answer), or
    /// the host function's error message.
    pub answer: Answer,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Output(#[serde(with = "hex_option")] Option<Vec<u8>>),
    Error(String),
}

/// What a recorded call started with besides its input.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// The instance's Extism vars when the call began (they live across calls).
    #[serde(default, with = "hex_map", skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, Vec<u8>>,
    /// The grant's config.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

/// Records a call's host calls, or answers them from an earlier recording. Cheap to
/// clone: clones share the tape.
#[derive(Debug, Clone)]
pub struct Tape(Arc<Mutex<State>>);

#[derive(Debug)]
struct State {
    /// `None` while recording; the recording to answer from while replaying.
    replay: Option<Vec<HostCall>>,
    /// Recorded calls, or (replaying) how many were answered.
    calls: Vec<HostCall>,
    /// What the call started with: recorded when it begins, or given to replay from.
    start: Start,
    answered: usize,
    /// Bytes recorded so far; past [`MAX_RECORDED_BYTES`] recording stops.
    bytes: usize,
    overflowed: bool,
}

/// The most argument and answer bytes one tape records: past it the tape is incomplete
/// (`overflowed`), and a replay could not answer from it anyway.
pub const MAX_RECORDED_BYTES: usize = 4 << 20;

/// What a replayed host call gets.
pub(crate) enum Replayed {
    Answer(Answer),
    /// Not on the tape: the call fails without running it.
    Diverged(CallError),
}

impl Tape {
    /// A tape that records the host calls of the call it is given to.
    pub fn recording() -> Self {
        Self(Arc::new(Mutex::new(State {
            replay: None,
            calls: Vec::new(),
            start: Start::default(),
            answered: 0,
            bytes: 0,
            overflowed: false,
        })))
    }

    /// A tape that answers host calls from `recorded`, in order, on an instance with no
    /// vars.
    pub fn replaying(recorded: Vec<HostCall>) -> Self {
        Self::replaying_from(recorded, Start::default())
    }

    /// A tape that answers host calls from `recorded`, in order, on an instance whose
    /// vars are `start`'s (its config is the embedder's to put in the replay's grant).
    pub fn replaying_from(recorded: Vec<HostCall>, start: Start) -> Self {
        Self(Arc::new(Mutex::new(State {
            replay: Some(recorded),
            calls: Vec::new(),
            start,
            answered: 0,
            bytes: 0,
            overflowed: false,
        })))
    }

    /// The host calls recorded so far.
    pub fn calls(&self) -> Vec<HostCall> {
        self.0.lock().calls.clone()
    }

    /// What the recorded call started with (or what a replay starts from).
    pub fn start(&self) -> Start {
        self.0.lock().start.clone()
    }

    /// Recording: notes what the call starts with. Counts towards the tape's size.
    pub(crate) fn begin(
        &self,
        vars: &BTreeMap<String, Vec<u8>>,
        config: &BTreeMap<String, String>,
    ) {
        let mut state = self.0.lock();
        if state.replay.is_some() {
            return;
        }
        let size = vars.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + config.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        state.bytes = state.bytes.saturating_add(size);
        if state.bytes > MAX_RECORDED_BYTES {
            state.overflowed = true;
            return;
        }
        state.start = Start {
            vars: vars.clone(),
            config: config.clone(),
        };
    }

    /// Replaying: how many recorded host calls the call used; recording: how many it made.
    pub fn used(&self) -> usize {
        let state = self.0.lock();
        if state.replay.is_some() {
            state.answered
        } else {
            state.calls.len()
        }
    }

    pub fn is_replaying(&self) -> bool {
        self.0.lock().replay.is_some()
    }

    /// Whether the recording stopped short ([`MAX_RECORDED_BYTES`]).
    pub fn overflowed(&self) -> bool {
        self.0.lock().overflowed
    }

    pub(crate) fn record(&self, call: HostCall) {
        let mut state = self.0.lock();
        if state.replay.is_some() || state.overflowed {
            return;
        }
        let size = call.args.iter().map(Vec::len).sum::<usize>()
            + match &call.answer {
                Answer::Output(output) => output.as_ref().map_or(0, Vec::len),
                Answer::Error(message) => message.len(),
            };
        state.bytes = state.bytes.saturating_add(size);
        if state.bytes > MAX_RECORDED_BYTES {
            state.overflowed = true;
            state.calls = Vec::new();
            return;
        }
        state.calls.push(call);
    }

    /// The recorded answer to this host call, if the tape has it next.
    pub(crate) fn replay(&self, function: &str, args: &[Vec<u8>]) -> Replayed {
        let mut state = self.0.lock();
        let index = state.answered;
        let Some(recorded) = state.replay.as_ref() else {
            return Replayed::Diverged(CallError::Internal {
                message: "the tape is recording, not replaying".into(),
            });
        };
        let diverged = |expected: String| {
            Replayed::Diverged(CallError::Diverged {
                index,
                function: function.to_owned(),
                expected,
            })
        };
        match recorded.get(index) {
            None => diverged("no more host calls".into()),
            Some(call) if call.function != function => {
                diverged(format!("a call of `{}`", call.function))
            }
            Some(call) if call.args != args => {
                diverged(format!("`{}` with other arguments", call.function))
            }
            Some(call) => {
                let answer = call.answer.clone();
                state.answered += 1;
                Replayed::Answer(answer)
            }
        }
    }
}

mod hex_list {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(args: &[Vec<u8>], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(args.iter().map(hex::encode))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| hex::decode(text).map_err(serde::de::Error::custom))
            .collect()
    }
}

mod hex_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Vec<u8>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(map.iter().map(|(k, v)| (k, hex::encode(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer)?
            .into_iter()
            .map(|(k, v)| {
                hex::decode(v)
                    .map(|v| (k, v))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

mod hex_option {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        bytes: &Option<Vec<u8>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(bytes) => serializer.serialize_some(&hex::encode(bytes)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| hex::decode(text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hostile plug-in cannot make its tape hold more than the cap: past it, the tape
    /// is marked incomplete and keeps nothing.
    #[test]
    fn a_tape_stops_recording_past_its_cap() {
        let tape = Tape::recording();
        let call = |bytes: usize| HostCall {
            function: "kv_get".into(),
            args: vec![vec![0; bytes]],
            answer: Answer::Output(None),
        };
        tape.record(call(MAX_RECORDED_BYTES / 2));
        assert!(!tape.overflowed());
        assert_eq!(tape.calls().len(), 1);
        tape.record(call(MAX_RECORDED_BYTES / 2 + 1));
        assert!(tape.overflowed());
        assert!(tape.calls().is_empty());
        tape.record(call(1));
        assert!(tape.calls().is_empty());
    }
}
