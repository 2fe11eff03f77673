//! Token buckets for QoS. A request *reserves* what it needs: the bucket may go into debt, and
//! the request waits until the debt is paid back at the refill rate. Concurrent requests thus
//! queue behind each other in arrival order without a lock held across the wait, and a request
//! larger than the burst still passes (after its wait) instead of starving.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens per second.
    rate: f64,
    /// Most tokens saved up while idle.
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket refilled at `rate` per second holding at most `burst`, starting full.
    pub fn new(rate: u64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        TokenBucket { rate: rate.max(1) as f64, burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` tokens; returns how long the caller must wait before going on.
    pub fn reserve(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.rate) }
    }

    /// Gives back `n` tokens reserved but not used (up to the burst).
    pub fn refund(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + n).min(self.burst);
    }

    /// New rate and burst; debt and savings carry over (capped at the new burst).
    pub fn reconfigure(&mut self, rate: u64, burst: f64, now: Instant) {
        self.refill(now);
        self.rate = rate.max(1) as f64;
        self.burst = burst.max(1.0);
        self.tokens = self.tokens.min(self.burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_holds_over_time_and_debt_is_paid_in_order() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 10.0, t0);
        // The burst passes at once, then each request waits 10 ms more than the one before.
        for _ in 0..10 {
            assert_eq!(b.reserve(1.0, t0), Duration::ZERO);
        }
        let waits: Vec<u128> = (0..5).map(|_| b.reserve(1.0, t0).as_millis()).collect();
        assert_eq!(waits, [10, 20, 30, 40, 50]);
        // A second later the debt is paid and 50 tokens are saved, capped at the burst of 10.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.reserve(10.0, t1), Duration::ZERO);
        assert!(b.reserve(1.0, t1) > Duration::ZERO);
        // One request larger than the burst waits for its whole debt.
        let mut big = TokenBucket::new(1000, 100.0, t0);
        assert_eq!(big.reserve(2100.0, t0).as_millis(), 2000);
    }
}
