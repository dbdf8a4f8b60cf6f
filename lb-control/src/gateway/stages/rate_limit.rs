//! Rate limit: each key's allowance, GCRA at the key's `rps` with `burst` calls at once. A
//! batch takes one per call; a key without a limit is never held back; a changed limit starts
//! a fresh allowance.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use governor::{
    Quota, RateLimiter, clock::Clock, clock::DefaultClock, state::InMemoryState, state::NotKeyed,
};

use crate::{
    gateway::jsonrpc::Body,
    keys::LiveKey,
    model::{ApiKeyId, RateLimit},
};

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// A request over its key's rate.
#[derive(Debug)]
pub struct RateLimited {
    pub retry_after: Duration,
}

impl RateLimited {
    /// Whole seconds to wait, at least one (`Retry-After` takes whole seconds).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// Each key's limiter, made on the key's first request.
#[derive(Default)]
pub struct RateLimits {
    limiters: Mutex<HashMap<ApiKeyId, (RateLimit, Arc<DirectLimiter>)>>,
}

impl RateLimits {
    /// Takes `body`'s calls from `key`'s allowance (a batch counts each call).
    pub fn admit(&self, key: &LiveKey, body: &Body) -> Result<(), RateLimited> {
        let Some(limit) = key.rate_limit else {
            return Ok(());
        };
        let limiter = {
            // The map holds no invariant a panicking holder could break.
            let mut limiters = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = limiters
                .entry(key.id)
                .or_insert_with(|| (limit, Arc::new(limiter(limit))));
            // A changed limit starts a fresh allowance.
            if entry.0 != limit {
                *entry = (limit, Arc::new(limiter(limit)));
            }
            entry.1.clone()
        };
        let calls = u32::try_from(body.entries().len()).unwrap_or(u32::MAX);
        let calls = NonZeroU32::new(calls).unwrap_or(NonZeroU32::MIN);
        match limiter.check_n(calls) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }),
            // A batch larger than the burst can never pass: wait a full period and retry smaller.
            Err(_) => Err(RateLimited {
                retry_after: Duration::from_secs(1),
            }),
        }
    }
}

/// GCRA at `rps` per second; `burst` calls at once (at least one).
fn limiter(limit: RateLimit) -> DirectLimiter {
    let rps = NonZeroU32::new(limit.rps).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct(Quota::per_second(rps).allow_burst(burst))
}
