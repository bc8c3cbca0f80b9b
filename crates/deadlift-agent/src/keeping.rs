//! What the agent keeps of one plug-in call, for direct calls and steps alike: the call's
//! tape when the tape sampler picks it (stored for replays), and, when a shadow rollout
//! wants the call, a tape handed to the shadow to replay through the candidate.

use std::sync::Arc;

use deadlift_engine::tape::Tape;
use deadlift_engine::{CallError, CallOutput, Grant};

use crate::releases::{Releases, Routed, Shadowed};
use crate::replay::Recorded;
use crate::tapes::{Recording, TapeError, Tapes};

/// The tapes one call records on.
#[derive(Debug)]
pub(crate) struct Keeping {
    /// The sampler's tape, to store.
    sampled: Option<Tape>,
    /// The tape the call records on: the sampler's, or one for the shadow alone.
    tape: Option<Tape>,
}

/// One finished call, as the agent keeps it.
#[derive(Debug)]
pub(crate) struct Kept<'a> {
    pub tenant: &'a str,
    pub routed: Option<&'a Routed>,
    pub module_id: String,
    /// The name the call used; `None` to take the module's own.
    pub module_name: Option<String>,
    pub function: &'a str,
    pub input: &'a [u8],
    pub grant: &'a Grant,
    pub result: &'a Result<CallOutput, CallError>,
    pub duration_us: u64,
}

impl Keeping {
    /// Decides what `module_id`'s call of `function` records.
    pub(crate) fn begin(
        tapes: &Tapes,
        tenant: &str,
        module_id: &str,
        function: &str,
        routed: Option<&Routed>,
    ) -> Self {
        let sampled = tapes.tape_for(tenant, module_id, function);
        let shadowed = routed.is_some_and(|r| r.shadow.is_some());
        let tape = match &sampled {
            Some(tape) => Some(tape.clone()),
            None if shadowed => Some(Tape::recording()),
            None => None,
        };
        Self { sampled, tape }
    }

    /// The tape to give the call, if any.
    pub(crate) fn tape(&self) -> Option<&Tape> {
        self.tape.as_ref()
    }

    /// Hands the call to its shadow rollout, if any, and stores its tape, if sampled.
    pub(crate) fn end(self, tapes: &Tapes, releases: &Arc<Releases>, call: Kept<'_>) {
        let Some(tape) = self.tape else {
            return;
        };
        let outcome = match call.result {
            Ok(out) => Ok(out.output.clone()),
            Err(error) => Err(TapeError::of(error)),
        };
        if let Some(routed) = call.routed.filter(|r| r.shadow.is_some()) {
            releases.shadow(
                call.tenant,
                routed,
                Shadowed {
                    call: Recorded {
                        function: call.function.to_owned(),
                        input: call.input.to_vec(),
                        host_calls: tape.calls(),
                        start: tape.start(),
                        outcome: outcome.clone(),
                    },
                    grant: call.grant.clone(),
                },
            );
        }
        if self.sampled.is_some() {
            let recording = Recording {
                tenant: call.tenant.to_owned(),
                module_name: call.module_name,
                module_id: call.module_id,
                function: call.function.to_owned(),
                input: call.input.to_vec(),
                outcome,
                host_calls: tape.calls(),
                start: tape.start(),
                fuel_used: call.result.as_ref().map_or(0, |out| out.fuel_used),
                duration_us: call.duration_us,
            };
            tapes.record(recording, &tape);
        }
    }
}
