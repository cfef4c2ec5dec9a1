//! The double refund: three instances of a payment service receive the same "refund order 42"
//! request at once. Order 42 was paid $200.
//!
//! Without a lock each instance reads "refundable: $200", calls the payment provider, and writes
//! the refund back: $600 leave the company. With a fenced lock around the read-refund-write, one
//! instance refunds $200 and the others see nothing left to refund.
//!
//! ```text
//! cargo run -p fenced --example refund                                   # memory://
//! cargo run -p fenced --example refund -- sqlite:///tmp/refund-locks.db
//! cargo run -p fenced --features redis --example refund -- redis://127.0.0.1:6379
//! ```
//!
//! The payment provider also checks the fencing token, as a real resource should: a refund
//! carrying a token lower than one it has already seen for the order is rejected.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fenced::{FencingToken, LockOptions};

/// What the order database knows about order 42.
#[derive(Debug, Default)]
struct Order {
    paid: u64,
    refunded: u64,
}

/// The payment provider: pays out refunds, rejecting stale fencing tokens.
#[derive(Debug, Default)]
struct Provider {
    paid_out: u64,
    highest_token: Option<FencingToken>,
}

impl Provider {
    fn refund(&mut self, amount: u64, token: Option<FencingToken>) -> Result<(), String> {
        if let (Some(token), Some(seen)) = (token, self.highest_token) {
            if token < seen {
                return Err(format!("stale fencing token {token} (seen {seen})"));
            }
        }
        if token.is_some() {
            self.highest_token = token;
        }
        self.paid_out += amount;
        Ok(())
    }
}

/// One service instance handling "refund order 42".
async fn handle_refund(
    order: Arc<Mutex<Order>>,
    provider: Arc<Mutex<Provider>>,
    token: Option<FencingToken>,
) -> Result<u64, String> {
    // Read the order (a SELECT in real life).
    let refundable = {
        let o = order.lock().map_err(|e| e.to_string())?;
        o.paid - o.refunded
    };
    if refundable == 0 {
        return Ok(0);
    }
    // Call the payment provider: slow, and the other instances run meanwhile.
    tokio::time::sleep(Duration::from_millis(50)).await;
    provider
        .lock()
        .map_err(|e| e.to_string())?
        .refund(refundable, token)?;
    // Write the refund back (an UPDATE in real life).
    order.lock().map_err(|e| e.to_string())?.refunded += refundable;
    Ok(refundable)
}

async fn scenario(url: Option<&str>) -> Result<u64, Box<dyn std::error::Error>> {
    let order = Arc::new(Mutex::new(Order {
        paid: 200,
        refunded: 0,
    }));
    let provider = Arc::new(Mutex::new(Provider::default()));
    let key = format!("refund-example:order:42:{:x}", rand_suffix());
    let mut instances = Vec::new();
    for instance in 0..3 {
        let (order, provider, key) = (order.clone(), provider.clone(), key.clone());
        // Each instance has its own client, as separate processes would.
        let client = match url {
            Some(url) => Some(fenced::connect(url).await?),
            None => None,
        };
        instances.push(tokio::spawn(async move {
            match client {
                None => handle_refund(order, provider, None).await,
                Some(client) => {
                    let options = LockOptions::new()
                        .wait(Duration::from_secs(30))
                        .label(format!("refund service instance {instance}"));
                    client
                        .with_lock(&key, &options, |lock| {
                            handle_refund(order, provider, Some(lock.token))
                        })
                        .await
                        .map_err(|e| e.to_string())?
                }
            }
        }));
    }
    for instance in instances {
        instance.await??;
    }
    let paid_out = provider.lock().map_err(|e| e.to_string())?.paid_out;
    Ok(paid_out)
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://".to_owned());
    println!("order 42 was paid $200; three instances refund it at once");

    let unlocked = scenario(None).await?;
    println!("without a lock:   refunded ${unlocked}");

    let locked = scenario(Some(&url)).await?;
    println!("with fenced ({}): refunded ${locked}", fenced::redact(&url));

    if locked != 200 {
        eprintln!("unexpected: the locked run refunded ${locked}, not $200");
        std::process::exit(1);
    }
    Ok(())
}
