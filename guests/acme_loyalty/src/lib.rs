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
//! Config (Extism config; absent or not a decimal non-negative integer → 10):
//! `loyalty_threshold` and `discount_percent`.
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

use extism_pdk::*;
use serde_json::{json, Value};

#[host_fn("extism:host/user")]
extern "ExtismHost" {
    fn lookup_purchases(request: Vec<u8>) -> Vec<u8>;
    fn send_email(request: Vec<u8>) -> Vec<u8>;
}

const EXPECTED: &str = r#"before_charge: expected {"charge_id": string, "customer": string, "merchant": string, "amount_cents": integer, "category": string}"#;
const DEFAULT_CONFIG: u64 = 10;
const WINDOW_DAYS: i64 = 30;

struct Charge {
    charge_id: String,
    customer: String,
    merchant: String,
    category: String,
}

fn parse_charge(input: &[u8]) -> Result<Charge, Error> {
    let value: Value = serde_json::from_slice(input).unwrap_or(Value::Null);
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
    match (
        text("charge_id"),
        text("customer"),
        text("merchant"),
        value.get("amount_cents").and_then(Value::as_i64),
        text("category"),
    ) {
        (Some(charge_id), Some(customer), Some(merchant), Some(_), Some(category)) => Ok(Charge {
            charge_id,
            customer,
            merchant,
            category,
        }),
        _ => Err(Error::msg(EXPECTED)),
    }
}

/// A config value as a non-negative integer; absent or unparseable → 10.
fn config_number(key: &str) -> u64 {
    config::get(key)
        .ok()
        .flatten()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_CONFIG)
}

/// Asks the host for the customer's purchases and counts the similar ones.
fn similar_purchases(charge: &Charge) -> Result<u64, Error> {
    let request = json!({
        "customer": charge.customer,
        "merchant": charge.merchant,
        "category": charge.category,
        "days": WINDOW_DAYS,
    });
    let reply = unsafe { lookup_purchases(serde_json::to_vec(&request)?)? };
    let reply: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
    let Some(purchases) = reply.get("purchases").and_then(Value::as_array) else {
        return Err(Error::msg(format!(
            r#"before_charge: lookup_purchases returned {reply}, expected {{"purchases": [...]}}"#
        )));
    };
    let similar = purchases.iter().filter(|p| {
        p.get("category").and_then(Value::as_str) == Some(charge.category.as_str())
            && p.get("days_ago")
                .and_then(Value::as_i64)
                .is_some_and(|d| d <= WINDOW_DAYS)
    });
    Ok(similar.count() as u64)
}

#[plugin_fn]
pub fn before_charge(input: Vec<u8>) -> FnResult<Vec<u8>> {
    let charge = parse_charge(&input)?;
    let count = similar_purchases(&charge)?;
    let threshold = config_number("loyalty_threshold");
    let send = count >= threshold;
    let percent = if send {
        config_number("discount_percent")
    } else {
        0
    };
    if send {
        let email = json!({
            "to": charge.customer,
            "subject": format!("A thank-you discount from {}", charge.merchant),
            "body": format!(
                "Thank you for shopping with {}! You made {count} {} purchases with us \
                 in the last 30 days, so your next purchase is {percent}% off.",
                charge.merchant, charge.category
            ),
            "discount_percent": percent,
        });
        unsafe { send_email(serde_json::to_vec(&email)?)? };
    }
    info!(
        "before_charge {}: {count} similar {} purchases in the last 30 days (threshold {threshold}), {}",
        charge.charge_id,
        charge.category,
        if send { "discount email sent" } else { "no discount email" }
    );
    Ok(serde_json::to_vec(&json!({
        "approve": true,
        "similar_purchases": count,
        "discount_sent": send,
        "discount_percent": percent,
    }))?)
}
