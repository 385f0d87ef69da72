//! What one device's side of a SecAgg+ round costs in time, stage by stage, and (separately)
//! what the aggregator's side of the same round costs.
//!
//! The device is one of `n` real clients: every client advertises real keys, the device's `k`
//! neighbours deal it real encrypted shares, and the device goes through the calls
//! `edge-client/src/secure.rs` makes: `ClientRound::new` (keys), `share` (deal and encrypt
//! share pairs for its `k` neighbours), `quantize` + `masked_input` (decrypt and check the `k`
//! received share pairs, expand the self mask and `k` pairwise masks with ChaCha20) + `pack`
//! (the vector on the wire), and `unmask` (pick the shares to reveal). Only the device's calls
//! are timed; the peers' work is not.
//!
//! With `--server-reps S > 0` the example then runs S whole rounds in which all `n` clients
//! share, mask and reveal (untimed) and times the aggregator's calls: `ServerRound::new`,
//! `accept_shares` and `close_sharing`, `unpack` + `accept_masked` and `close_masking`,
//! `accept_reveals` and `finish` (reconstruct every secret, subtract `n` self masks and the
//! pairwise masks of dropped clients). The unmasked sum is checked against the sum of the
//! inputs.
//!
//! Timer: one thread. `std::time::Instant` (wall time) around each call, and the thread's CPU
//! time over the call as that wall time minus the time the thread waited runnable meanwhile
//! (`run_delay` in `/proc/thread-self/schedstat`; std only: the crate has no libc binding for
//! `CLOCK_THREAD_CPUTIME_ID`). So a busy machine that preempts the thread inflates the wall
//! column, not the CPU one (time stolen by a hypervisor is invisible to both). One untimed round
//! runs first. The example also prints the thread's CPU time over the whole run against its
//! wall time.
//! Peak RSS is `VmHWM` of `/proc/self/status`: under qemu user-mode that is the emulator's
//! process, so it includes qemu's own memory and translated code.
//!
//! ```text
//! cargo run --release -p fedpeft-secagg --example device_cost -- --n 64 --len 25611
//! ```
//!
//! Options (defaults in brackets): `--n` clients [8], `--k` neighbours and `--t` threshold
//! [the aggregator's defaults for n: k = min(2⌈log2 n⌉, largest even ≤ n − 1), t = k/2 + 1, as
//! `SecureSettings::params` in aggregator/src/config.rs], `--bits` m [16], `--clip` [0.25],
//! `--len` input length 1 + d [25611: LoRA r 8 on EfficientNet-Lite0 plus the weight slot],
//! `--reps` device repetitions [11], `--server-reps` [0], `--drop` clients that drop after
//! sharing [0], `--seed` [1], `--noise-steps` σ of the distributed-DP noise in quantization
//! steps, timed apart on a copy of the input [300; 0: not timed].

use std::collections::BTreeSet;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use fedpeft_secagg::{
    ClientRound, Params, ServerRound, add_discrete_gaussian, neighbourhoods, pack, quantize, unpack,
};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
struct Options {
    n: usize,
    k: Option<u16>,
    t: Option<u16>,
    bits: u8,
    clip: f32,
    len: usize,
    reps: usize,
    server_reps: usize,
    drop: usize,
    seed: u64,
    noise_steps: f64,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        n: 8,
        k: None,
        t: None,
        bits: 16,
        clip: 0.25,
        len: 25_611,
        reps: 11,
        server_reps: 0,
        drop: 0,
        seed: 1,
        noise_steps: 300.0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--n" => o.n = value.parse().map_err(|e| bad(&e))?,
            "--k" => o.k = Some(value.parse().map_err(|e| bad(&e))?),
            "--t" => o.t = Some(value.parse().map_err(|e| bad(&e))?),
            "--bits" => o.bits = value.parse().map_err(|e| bad(&e))?,
            "--clip" => o.clip = value.parse().map_err(|e| bad(&e))?,
            "--len" => o.len = value.parse().map_err(|e| bad(&e))?,
            "--reps" => o.reps = value.parse().map_err(|e| bad(&e))?,
            "--server-reps" => o.server_reps = value.parse().map_err(|e| bad(&e))?,
            "--drop" => o.drop = value.parse().map_err(|e| bad(&e))?,
            "--seed" => o.seed = value.parse().map_err(|e| bad(&e))?,
            "--noise-steps" => o.noise_steps = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if o.len < 2 || o.reps == 0 || o.n < 3 {
        return Err("need --len >= 2, --reps >= 1, --n >= 3".into());
    }
    if o.drop + 1 >= o.n {
        return Err("--drop must leave the device and at least one other client".into());
    }
    Ok(o)
}

/// The aggregator's default k and t for a round of `n` sampled clients (the rule of
/// `SecureSettings::params`, aggregator/src/config.rs): k = 2·⌈log2 n⌉, at most the largest
/// even number ≤ n − 1, at least 2; t = k/2 + 1.
fn default_params(n: usize, bits: u8, clip: f32) -> Params {
    let log2 = (usize::BITS - n.max(2).saturating_sub(1).leading_zeros()) as usize;
    let cap = n.saturating_sub(1) & !1;
    let k = (2 * log2).min(cap).clamp(2, 254) as u16;
    Params {
        neighbours: k,
        threshold: k / 2 + 1,
        modulus_bits: bits,
        clip,
    }
}

/// The time of one call: thread CPU time and wall time, ms.
#[derive(Debug, Clone, Copy, Default)]
struct Ms {
    cpu: f64,
    wall: f64,
}

impl std::ops::Add for Ms {
    type Output = Ms;
    fn add(self, o: Ms) -> Ms {
        Ms {
            cpu: self.cpu + o.cpu,
            wall: self.wall + o.wall,
        }
    }
}

/// Times per repetition, by stage, in the order the stages were first recorded.
#[derive(Debug, Default)]
struct Timings(Vec<(&'static str, Vec<Ms>)>);

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let m = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (m, v[0], v[n - 1])
}

impl Timings {
    fn push(&mut self, stage: &'static str, ms: Ms) {
        match self.0.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, v)) => v.push(ms),
            None => self.0.push((stage, vec![ms])),
        }
    }

    fn print(&self, title: &str) {
        println!("| {title} | CPU ms, median | CPU ms, min | CPU ms, max | wall ms, median |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for (stage, v) in &self.0 {
            let (cpu, lo, hi) = median(v.iter().map(|m| m.cpu).collect());
            let (wall, _, _) = median(v.iter().map(|m| m.wall).collect());
            println!(
                "| {stage} | {} | {} | {} | {} |",
                fmt_ms(cpu),
                fmt_ms(lo),
                fmt_ms(hi),
                fmt_ms(wall)
            );
        }
    }
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else if ms >= 1.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.3}")
    }
}

/// Runs `f`, returning its result and its time: wall time from `Instant`, and the thread's
/// CPU time as that wall time minus the time the thread spent waiting runnable meanwhile
/// (`run_delay`, second field of `/proc/thread-self/schedstat`, which the kernel brings up to
/// date whenever the thread gets a CPU back; exact to the ns, unlike the first field, which
/// lags by up to a scheduler tick). The thread computes and never blocks, so this is its CPU
/// time. Without the file both are the wall time. A wait that falls between a read of the file
/// and the clock is subtracted too, so a single figure can be too low (down to 0 in the min
/// column); the medians are what the results page uses.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Ms) {
    let d0 = run_delay_ns();
    let t0 = Instant::now();
    let out = black_box(f());
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let waited = match (d0, run_delay_ns()) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e6,
        _ => 0.0,
    };
    let cpu = (wall - waited).max(0.0);
    (out, Ms { cpu, wall })
}

/// Fields of `/proc/thread-self/schedstat`: ns on a CPU (lags by up to a tick), ns waiting
/// runnable (exact whenever the thread runs), times scheduled in.
fn schedstat() -> Option<[u64; 3]> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut it = s.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

fn run_delay_ns() -> Option<u64> {
    schedstat().map(|s| s[1])
}

/// `VmHWM` (peak resident set) of this process, MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU time of this thread so far, ns (first field of `/proc/thread-self/schedstat`: up to a
/// scheduler tick behind, so good over a whole run, not around one call).
fn thread_cpu_ns() -> Option<u64> {
    schedstat().map(|s| s[0])
}

/// An update like a trained adapter's delta: mostly small values, a few clipped.
fn update(len: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-0.3f32..0.3)).collect()
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("edge-{i:04}")).collect()
}

/// One round as the device sees it; returns its stage times.
fn device_round(o: &Options, p: Params, rep: usize, out: &mut Timings) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(o.seed.wrapping_add(rep as u64));
    let round = 1 + rep as u32;
    let names = ids(o.n);
    let me = o.n / 2;
    let d = o.len - 1;
    let values = update(d, &mut rng);
    let reference_total = 200 * o.n as u64;

    // Stage 1: everyone advertises; only the device's key generation is timed.
    let mut clients = Vec::with_capacity(o.n);
    let mut roster = Vec::with_capacity(o.n);
    for (i, id) in names.iter().enumerate() {
        let (client, ad) = if i == me {
            let (r, ms) = timed(|| ClientRound::new(p, round, id, &mut rng));
            out.push(
                "keys: ClientRound::new (2 X25519 key pairs, self-mask seed, commitment)",
                ms,
            );
            r
        } else {
            ClientRound::new(p, round, id, &mut rng)
        };
        roster.push(ad.entry(id.as_str()));
        clients.push(client);
    }
    let graph_seed: [u8; 32] = rng.random();
    let graph = neighbourhoods(&graph_seed, &names, p.neighbours);
    let hood = graph[&names[me]].clone();

    // Stage 2: the device deals; its neighbours deal too (untimed), so it has shares to open.
    let (mine, ms) = timed(|| clients[me].share(&roster, &graph_seed, &mut rng));
    let mine = mine.map_err(|e| e.to_string())?;
    out.push(
        "share: ClientRound::share (check the k neighbours' keys; deal and encrypt k share pairs)",
        ms,
    );
    // What `share` spends on checking every roster entry's two keys (one X25519 scalar
    // multiplication each), timed apart; not added to the device's total.
    let (checked, ms) = timed(|| roster.iter().try_for_each(|e| e.check_keys(round)));
    checked.map_err(|e| e.to_string())?;
    out.push(
        "(RosterEntry::check_keys over all n entries, timed apart; not in share)",
        ms,
    );
    black_box(&mine);
    let mut inbox = Vec::new();
    for (i, id) in names.iter().enumerate() {
        if hood.binary_search(id).is_ok() {
            let shares = clients[i]
                .share(&roster, &graph_seed, &mut rng)
                .map_err(|e| e.to_string())?;
            let ct = shares
                .into_iter()
                .find(|(to, _)| *to == names[me])
                .ok_or("a neighbour dealt the device nothing")?
                .1;
            inbox.push((id.clone(), ct));
        }
    }
    inbox.sort();
    // Everyone shared (u2 = the roster); `drop` clients other than the device then drop.
    let u2: Vec<String> = names.clone();
    let dropped: BTreeSet<String> = sample(&mut rng, o.n - 1, o.drop)
        .into_iter()
        .map(|i| names[if i >= me { i + 1 } else { i }].clone())
        .collect();

    // Stage 3: quantize, mask, pack.
    let (x, ms_q) = timed(|| quantize(&p, o.n, &values, 200, reference_total, &mut rng));
    let x = x.map_err(|e| e.to_string())?;
    out.push("quantize (clip, scale, stochastic rounding)", ms_q);
    if o.noise_steps > 0.0 {
        // Distributed DP ([dp] in a secure run): the device adds discrete Gaussian noise to its
        // quantized input before masking. Timed on a copy; the round goes on without it.
        let mut noised = x.clone();
        let ((), ms) = timed(|| {
            add_discrete_gaussian(&mut noised, o.noise_steps, p.modulus_bits, &mut rng);
        });
        out.push(
            "(with [dp] only: add_discrete_gaussian, not in the totals)",
            ms,
        );
        black_box(&noised);
    }
    let (y, ms_m) = timed(|| clients[me].masked_input(&inbox, &u2, &x));
    let y = y.map_err(|e| e.to_string())?;
    out.push(
        "masked_input (open k share pairs; self mask + k pairwise masks, ChaCha20)",
        ms_m,
    );
    let (bytes, ms_p) = timed(|| pack(&y, p.modulus_bits));
    out.push("pack (m bits a value)", ms_p);
    out.push(
        "= masked-input stage (quantize + masked_input + pack)",
        ms_q + ms_m + ms_p,
    );
    black_box(&bytes);

    // Stage 4.
    let u3: Vec<String> = names
        .iter()
        .filter(|c| !dropped.contains(*c))
        .cloned()
        .collect();
    let dropped: Vec<String> = dropped.into_iter().collect();
    let (reveals, ms) = timed(|| clients[me].unmask(&u3, &dropped));
    let reveals = reveals.map_err(|e| e.to_string())?;
    out.push(
        "unmask: ClientRound::unmask (pick the shares to reveal)",
        ms,
    );
    if reveals.len() != hood.len() {
        return Err(format!(
            "{} reveals for {} neighbours",
            reveals.len(),
            hood.len()
        ));
    }
    Ok(())
}

/// One whole round of `n` clients; times the aggregator's calls.
fn server_round(o: &Options, p: Params, rep: usize, out: &mut Timings) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(o.seed.wrapping_add(1_000_000 + rep as u64));
    let round = 1 + rep as u32;
    let names = ids(o.n);
    let d = o.len - 1;
    let reference_total = 200 * o.n as u64;
    let mut total = Ms::default();
    let mut time = |stage: &'static str, ms: Ms, out: &mut Timings| {
        total = total + ms;
        out.push(stage, ms);
    };

    let mut clients = Vec::with_capacity(o.n);
    let mut roster = Vec::with_capacity(o.n);
    for id in &names {
        let (c, ad) = ClientRound::new(p, round, id, &mut rng);
        roster.push(ad.entry(id.as_str()));
        clients.push(c);
    }
    let graph_seed: [u8; 32] = rng.random();
    let (server, ms) = timed(|| ServerRound::new(p, round, o.n, o.len, graph_seed, roster.clone()));
    let mut server = server.map_err(|e| e.to_string())?;
    time("ServerRound::new (check roster, build graph)", ms, out);

    let mut ms_acc = Ms::default();
    for (c, id) in clients.iter_mut().zip(&names) {
        let shares = c
            .share(&roster, &graph_seed, &mut rng)
            .map_err(|e| e.to_string())?;
        let (r, ms) = timed(|| server.accept_shares(id, shares));
        r.map_err(|e| e.to_string())?;
        ms_acc = ms_acc + ms;
    }
    time("accept_shares × n", ms_acc, out);
    let (relay, ms) = timed(|| server.close_sharing());
    let relay = relay.map_err(|e| e.to_string())?;
    time("close_sharing (relay)", ms, out);

    let dropped: BTreeSet<String> = sample(&mut rng, o.n, o.drop)
        .into_iter()
        .map(|i| names[i].clone())
        .collect();
    let mask = (1u64 << p.modulus_bits) - 1;
    let mut expected = vec![0u32; o.len];
    let mut ms_acc = Ms::default();
    for (c, id) in clients.iter_mut().zip(&names) {
        if dropped.contains(id) {
            continue;
        }
        let values = update(d, &mut rng);
        let x = quantize(&p, o.n, &values, 200, reference_total, &mut rng)
            .map_err(|e| e.to_string())?;
        for (e, v) in expected.iter_mut().zip(&x) {
            *e = ((u64::from(*e) + u64::from(*v)) & mask) as u32;
        }
        let y = c
            .masked_input(&relay.inbox[id], &relay.u2, &x)
            .map_err(|e| e.to_string())?;
        let bytes = pack(&y, p.modulus_bits);
        let (r, ms) = timed(|| {
            let y = unpack(&bytes, p.modulus_bits, o.len).map_err(|e| e.to_string())?;
            server.accept_masked(id, &y).map_err(|e| e.to_string())
        });
        r?;
        ms_acc = ms_acc + ms;
    }
    time(
        "unpack + accept_masked × (n − dropped) (running sum)",
        ms_acc,
        out,
    );
    let (request, ms) = timed(|| server.close_masking());
    let request = request.map_err(|e| e.to_string())?;
    time("close_masking", ms, out);

    let mut ms_acc = Ms::default();
    for (c, id) in clients.iter_mut().zip(&names) {
        if dropped.contains(id) {
            continue;
        }
        let reveals = c
            .unmask(&request.u3, &request.dropped)
            .map_err(|e| e.to_string())?;
        let (r, ms) = timed(|| server.accept_reveals(id, reveals));
        r.map_err(|e| e.to_string())?;
        ms_acc = ms_acc + ms;
    }
    time("accept_reveals × (n − dropped)", ms_acc, out);
    let (done, ms) = timed(|| server.finish());
    let done = done.map_err(|e| e.to_string())?;
    time(
        "finish (reconstruct secrets; subtract n self masks + pairwise masks of dropped)",
        ms,
        out,
    );
    out.push("= aggregator total", total);
    if done.sum != expected {
        return Err("the unmasked sum is not the sum of the inputs".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("device_cost: {e}");
            return ExitCode::from(2);
        }
    };
    let mut p = default_params(o.n, o.bits, o.clip);
    if let Some(k) = o.k {
        p.neighbours = k;
        p.threshold = k / 2 + 1;
    }
    if let Some(t) = o.t {
        p.threshold = t;
    }
    if let Err(e) = p.check(o.n) {
        eprintln!("device_cost: parameters: {e}");
        return ExitCode::from(2);
    }
    let rss_start = peak_rss_mib();
    let cpu0 = thread_cpu_ns();
    let wall0 = Instant::now();
    println!(
        "device_cost: {} {}; n {}, k {}, t {}, m {}, clip {}, input length {} (1 + {}), \
         {} dropped after sharing; DP noise σ {} steps; {} device repetitions, \
         {} server repetitions; \
         one thread; CPU = wall − time waiting runnable (/proc/thread-self/schedstat){}",
        std::env::consts::ARCH,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "optimised"
        },
        o.n,
        p.neighbours,
        p.threshold,
        p.modulus_bits,
        p.clip,
        o.len,
        o.len - 1,
        o.drop,
        o.noise_steps,
        o.reps,
        o.server_reps,
        if run_delay_ns().is_some() {
            ""
        } else {
            " NOT READABLE: CPU = wall"
        },
    );
    // One round untimed first (page faults, caches, qemu's translation of the code).
    if let Err(e) = device_round(&o, p, o.reps, &mut Timings::default()) {
        eprintln!("device_cost: warm-up round: {e}");
        return ExitCode::FAILURE;
    }
    let mut device = Timings::default();
    for rep in 0..o.reps {
        if let Err(e) = device_round(&o, p, rep, &mut device) {
            eprintln!("device_cost: device round {rep}: {e}");
            return ExitCode::FAILURE;
        }
    }
    // Median of the per-repetition sums of the device's stages.
    let sums: Vec<Ms> = (0..o.reps)
        .map(|i| {
            device
                .0
                .iter()
                .filter(|(s, _)| !s.starts_with(['=', '(']))
                .fold(Ms::default(), |acc, (_, v)| acc + v[i])
        })
        .collect();
    for s in sums {
        device.push("= device total", s);
    }
    let rss_device = peak_rss_mib();
    println!();
    device.print("device stage");
    if o.server_reps > 0 {
        let mut server = Timings::default();
        for rep in 0..o.server_reps {
            if let Err(e) = server_round(&o, p, rep, &mut server) {
                eprintln!("device_cost: server round {rep}: {e}");
                return ExitCode::FAILURE;
            }
        }
        println!();
        server.print(&format!("aggregator stage, {} clients", o.n));
    }
    let wall = wall0.elapsed().as_secs_f64();
    let fmt = |m: Option<f64>| m.map_or("n/a".to_owned(), |m| format!("{m:.1} MiB"));
    println!();
    println!(
        "peak RSS (VmHWM): {} at start, {} after the device repetitions, {} at the end",
        fmt(rss_start),
        fmt(rss_device),
        fmt(peak_rss_mib())
    );
    match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) => println!(
            "thread CPU time over the run: {:.2} s of {:.2} s wall ({:.0} %)",
            (b - a) as f64 / 1e9,
            wall,
            (b - a) as f64 / 1e9 / wall * 100.0
        ),
        _ => {
            println!("thread CPU time: /proc/thread-self/schedstat not readable; wall {wall:.2} s")
        }
    }
    ExitCode::SUCCESS
}
