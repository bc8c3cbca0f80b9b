//! Fixture `acme_loyalty`: the showcase's merchant plug-in (`docs/overview.md`, "The showcase story").
//! Acme hands it to the payments platform, which runs it at its
//! `before_charge` extension point: it looks up the customer's recent
//! purchases through a host function and, for a loyal customer, asks the host
//! to send a discount email. It never blocks the charge.
//!
//! Host imports (module `extism:host/user`, both bytes in / bytes out, JSON):
//! - `lookup_purchases(i64) -> i64`: called with
//!   `{"customer": <customer>, "merchant": <merchant>, "category": <category>, "days": 30}`;
//!   the host answers `{"purchases": [{"amount_cents": int, "category": str, "days_ago": int}, ...]}`.
//! - `send_email(i64) -> i64`: called with
//!   `{"to": <customer>, "subject": "A thank-you discount from <merchant>",
//!   "body": <body>, "discount_percent": <p>}`; its reply (e.g.
//!   `{"queued": true, "id": "..."}`) is read and ignored.
//!
//! Config (Extism config; absent or not a decimal non-negative integer → the
//! default): `loyalty_threshold` (default 10) and `discount_percent` (default 10).
//!
//! The code is in `plugin.rs`, which `acme_loyalty_v2` shares with a different
//! default threshold.
//!
//! Export `before_charge`: input is a JSON object
//! `{"charge_id": str, "customer": str, "merchant": str, "amount_cents": int, "category": str}`
//! (other members are ignored). It calls `lookup_purchases` once and counts
//! the purchases whose `category` equals the charge's category and whose
//! `days_ago` is an integer at most 30 (the guest re-checks what the host was
//! asked to filter; other entries are not counted). If that count n is at
//! least `loyalty_threshold`, it calls `send_email` once, with the body
//! `Thank you for shopping with <merchant>! You made <n> <category> purchases
//! with us in the last 30 days, so your next purchase is <p>% off.`
//! It then logs one line at info level (`log_info`, only if the host's log
//! level lets info through):
//! `before_charge <charge_id>: <n> similar <category> purchases in the last
//! 30 days (threshold <t>), discount email sent` or `..., no discount email`.
//! Output (compact JSON, keys sorted):
//! `{"approve":true,"discount_percent":<p or 0>,"discount_sent":<bool>,"similar_purchases":<n>}`.
//!
//! Guest errors (return code -1): input that is not such an object →
//! `before_charge: expected {"charge_id": string, ...}`; a `lookup_purchases`
//! reply that is not an object with a `purchases` array (a returned handle 0
//! reads as empty) →
//! `before_charge: lookup_purchases returned ...`. A failing host function
//! fails the call as a host error.

/// Purchases that make a customer loyal, unless config says otherwise.
const DEFAULT_THRESHOLD: u64 = 10;

include!("plugin.rs");
