// The plug-in's code, shared by `acme_loyalty` and `acme_loyalty_v2` (each sets
// `DEFAULT_THRESHOLD`); `acme_loyalty/src/lib.rs` describes it.

use extism_pdk::*;
use serde_json::{json, Value};

#[host_fn("extism:host/user")]
extern "ExtismHost" {
    fn lookup_purchases(request: Vec<u8>) -> Vec<u8>;
    fn send_email(request: Vec<u8>) -> Vec<u8>;
}

const EXPECTED: &str = r#"before_charge: expected {"charge_id": string, "customer": string, "merchant": string, "amount_cents": integer, "category": string}"#;
const DEFAULT_DISCOUNT_PERCENT: u64 = 10;
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

/// A config value as a non-negative integer; absent or unparseable → `default`.
fn config_number(key: &str, default: u64) -> u64 {
    config::get(key)
        .ok()
        .flatten()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
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
    let threshold = config_number("loyalty_threshold", DEFAULT_THRESHOLD);
    let send = count >= threshold;
    let percent = if send {
        config_number("discount_percent", DEFAULT_DISCOUNT_PERCENT)
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
