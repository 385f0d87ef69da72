//! The user-space link model, with no I/O and no clock of its own: every function takes the
//! time (seconds since an arbitrary origin), so tests drive it with a virtual clock and the
//! relay ([`crate::relay`]) drives it with the real one.
//!
//! - [`TokenBucket`]: rate with a burst. Tokens (bytes) accrue at `rate` up to `burst`; sending
//!   `n` bytes takes `n` tokens and may run the bucket into debt, and the bytes have passed when
//!   the debt is paid. Over a long transfer the time is `(bytes - burst) / rate`.
//! - [`DirectionModel`]: one direction of a link: the bucket (or none, when the kernel shapes
//!   the rate), then a one-way delay with uniform jitter that never reorders bytes (TCP would
//!   deliver them in order anyway), then loss as TCP sees it on a lossy path: a lost segment is
//!   sent again after a retransmission timeout (Linux's floor, 200 ms, or the path's RTT plus
//!   four jitters if larger) and its bytes cost rate twice.

/// TCP payload per segment on an Ethernet-MTU path: loss is decided per segment of this size.
pub const SEGMENT: usize = 1448;

/// Linux's minimum retransmission timeout.
pub const MIN_RTO_SECS: f64 = 0.2;

/// A token bucket on a caller-supplied clock.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: f64,
}

impl TokenBucket {
    /// `rate` bytes per second, `burst` bytes deep, full at time `now`.
    pub fn new(rate: f64, burst: f64, now: f64) -> Self {
        assert!(rate > 0.0 && burst > 0.0, "rate and burst must be positive");
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Sends `n` bytes, offered at `now`; returns the time their last byte has passed.
    pub fn send(&mut self, now: f64, n: usize) -> f64 {
        // Time never runs backwards for the bucket (a caller's clock read may be a hair older
        // than the last debt it was told about).
        let now = now.max(self.last);
        self.tokens = (self.tokens + (now - self.last) * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            now
        } else {
            now + -self.tokens / self.rate
        }
    }
}

/// One direction's properties for [`DirectionModel`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DirectionSpec {
    /// Bytes per second and bucket depth; `None` when something else (the kernel) shapes rate.
    pub rate: Option<(f64, f64)>,
    pub latency_secs: f64,
    pub jitter_secs: f64,
    /// Probability that a segment is lost (0 = none).
    pub loss: f64,
}

impl DirectionSpec {
    /// Whether this direction changes anything at all.
    pub fn is_pass_through(&self) -> bool {
        self.rate.is_none()
            && self.latency_secs == 0.0
            && self.jitter_secs == 0.0
            && self.loss == 0.0
    }
}

/// When a piece of a stream has crossed the emulated link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Its last byte has left the sender (the rate's part): the relay reads no more before.
    pub sent: f64,
    /// It arrives at the far end (plus delay, jitter and any retransmission).
    pub delivered: f64,
    /// Segments of it that were lost and sent again.
    pub lost_segments: u32,
}

/// One direction of an emulated link.
#[derive(Debug, Clone)]
pub struct DirectionModel {
    spec: DirectionSpec,
    bucket: Option<TokenBucket>,
    last_delivery: f64,
    rng: u64,
}

impl DirectionModel {
    pub fn new(spec: DirectionSpec, seed: u64, now: f64) -> Self {
        DirectionModel {
            spec,
            bucket: spec
                .rate
                .map(|(rate, burst)| TokenBucket::new(rate, burst, now)),
            last_delivery: now,
            rng: seed,
        }
    }

    pub fn spec(&self) -> &DirectionSpec {
        &self.spec
    }

    /// A uniform draw in [0, 1) (SplitMix64: deterministic for a seed).
    fn uniform(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `n` bytes offered at `now`: when they have been sent and when they arrive.
    pub fn schedule(&mut self, now: f64, n: usize) -> Schedule {
        let mut lost_segments = 0u32;
        if self.spec.loss > 0.0 {
            for _ in 0..n.div_ceil(SEGMENT).max(1) {
                if self.uniform() < self.spec.loss {
                    lost_segments += 1;
                }
            }
        }
        let resent = lost_segments as usize * SEGMENT.min(n);
        let sent = match &mut self.bucket {
            Some(bucket) => bucket.send(now, n + resent),
            None => now,
        };
        let jitter = if self.spec.jitter_secs > 0.0 {
            (self.uniform() * 2.0 - 1.0) * self.spec.jitter_secs
        } else {
            0.0
        };
        let rto = if lost_segments > 0 {
            (2.0 * self.spec.latency_secs + 4.0 * self.spec.jitter_secs).max(MIN_RTO_SECS)
        } else {
            0.0
        };
        let arrival = sent + (self.spec.latency_secs + jitter).max(0.0) + rto;
        // In order: a byte never overtakes the one before it.
        self.last_delivery = self.last_delivery.max(arrival);
        Schedule {
            sent,
            delivered: self.last_delivery,
            lost_segments,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_goes_at_once_and_the_rest_at_the_rate() {
        let mut b = TokenBucket::new(1000.0, 500.0, 0.0);
        assert_eq!(
            b.send(0.0, 500),
            0.0,
            "a full bucket lets its burst through"
        );
        assert_eq!(
            b.send(0.0, 1000),
            1.0,
            "then 1000 bytes take 1 s at 1000 B/s"
        );
        // Offered later than the debt is paid: 0.5 s of refill covers 500 bytes.
        assert_eq!(b.send(1.5, 500), 1.5);
    }

    #[test]
    fn a_long_transfer_takes_bytes_minus_burst_over_rate() {
        let (rate, burst) = (7500.0, 3028.0);
        let mut b = TokenBucket::new(rate, burst, 0.0);
        let mut t = 0.0;
        let total = 102_400;
        for _ in 0..total / 1024 {
            // The sender offers the next piece as soon as the last has passed.
            t = b.send(t, 1024);
        }
        let expected = (total as f64 - burst) / rate;
        assert!((t - expected).abs() < 1e-9, "{t} vs {expected}");
    }

    #[test]
    fn idle_time_refills_no_more_than_the_burst() {
        let mut b = TokenBucket::new(100.0, 200.0, 0.0);
        assert_eq!(b.send(0.0, 200), 0.0);
        // 1000 s idle would be 100 000 tokens without the cap.
        assert_eq!(b.send(1000.0, 1200), 1010.0);
    }

    #[test]
    fn a_clock_read_older_than_the_bucket_does_not_mint_tokens() {
        let mut b = TokenBucket::new(100.0, 100.0, 10.0);
        assert_eq!(b.send(10.0, 300), 12.0);
        assert_eq!(b.send(5.0, 100), 13.0);
    }

    #[test]
    fn delay_and_jitter_keep_order_and_stay_within_bounds() {
        let spec = DirectionSpec {
            rate: Some((10_000.0, 2000.0)),
            latency_secs: 0.3,
            jitter_secs: 0.1,
            loss: 0.0,
        };
        let mut m = DirectionModel::new(spec, 7, 0.0);
        let mut now = 0.0;
        let mut last = 0.0;
        for _ in 0..1000 {
            let s = m.schedule(now, 500);
            assert!(s.delivered >= last, "reordered");
            assert!(
                s.delivered >= s.sent + 0.2 - 1e-12,
                "below latency - jitter"
            );
            assert!(
                s.delivered <= s.sent + 0.4 + 0.1,
                "beyond the in-order bound"
            );
            last = s.delivered;
            now = s.sent;
        }
        // 1000 x 500 B at 10 kB/s after a 2000 B burst.
        assert!(
            (now - (500_000.0 - 2000.0) / 10_000.0).abs() < 1e-6,
            "{now}"
        );
    }

    #[test]
    fn lost_segments_are_about_the_loss_rate_and_cost_a_timeout_and_rate() {
        let spec = DirectionSpec {
            rate: Some((1e6, 1e4)),
            latency_secs: 0.05,
            jitter_secs: 0.0,
            loss: 0.02,
        };
        let mut m = DirectionModel::new(spec, 42, 0.0);
        let (mut lost, mut now) = (0u32, 0.0);
        let n = 20_000;
        for _ in 0..n {
            let s = m.schedule(now, SEGMENT);
            if s.lost_segments > 0 {
                assert!(s.delivered >= s.sent + 0.05 + MIN_RTO_SECS - 1e-9);
            }
            lost += s.lost_segments;
            now = s.sent;
        }
        // Seeded: deterministic. 2 % of 20 000 is 400; binomial sd is ~20.
        assert!((340..=460).contains(&lost), "{lost} lost of {n}");
        let bytes = (n as usize + lost as usize) * SEGMENT;
        assert!(
            (now - (bytes as f64 - 1e4) / 1e6).abs() < 1e-6,
            "resent bytes cost rate"
        );
    }

    #[test]
    fn without_a_rate_only_delay_applies() {
        let spec = DirectionSpec {
            rate: None,
            latency_secs: 0.8,
            jitter_secs: 0.0,
            loss: 0.0,
        };
        assert!(!spec.is_pass_through());
        let mut m = DirectionModel::new(spec, 1, 0.0);
        let s = m.schedule(3.0, 1_000_000);
        assert_eq!((s.sent, s.delivered), (3.0, 3.8));
    }
}
