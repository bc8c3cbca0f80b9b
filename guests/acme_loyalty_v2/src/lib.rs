//! Fixture `acme_loyalty_v2`: version 2 of the showcase's merchant plug-in. The same
//! code as `acme_loyalty` (its `plugin.rs`, described in its `lib.rs`) with one change:
//! a customer is loyal from 15 similar purchases, not 10, unless config says otherwise.
//! The showcase replays it against the charges version 1 served, then rolls it out as
//! a canary.

/// Purchases that make a customer loyal, unless config says otherwise.
const DEFAULT_THRESHOLD: u64 = 15;

include!("../../acme_loyalty/src/plugin.rs");
