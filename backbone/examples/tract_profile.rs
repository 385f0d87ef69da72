//! Where tract spends a trunk's forward pass: the optimised graph's time per node, summed by op
//! name (the tract CLI's `--profile` view, without the CLI). One table per trunk on stdout.
//!
//!     cargo run --release -p fedpeft-backbone --example tract_profile -- \
//!         [--model efficientnet-lite0] [--size 224] [--seq 128] [--batch 16] [--runs 3] \
//!         [--symbolic] [--nchw] [--tract-depthwise] [--symbolic-seq] [--nodes 15]
//!
//! By default the graph is the one `TractTrunk` runs at `--batch 1`: concrete shapes, depthwise
//! convolutions channel-last and run by fedpeft's `ChannelLastDepthwise`. `--tract-depthwise`
//! leaves them to tract's `DepthWise`, `--symbolic` optimises for a symbolic batch (the trunk before
//! 2026-12), `--nchw` leaves the depthwise convolutions channel-first (tract's default on x86),
//! `--symbolic-seq` keeps a text trunk's sequence length symbolic (as the trunk does).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedpeft_backbone::trunk::{channel_last_depthwise, replace_depthwise};
use fedpeft_backbone::{Backbone, InputSpec};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::eval;

fn main() -> Result<()> {
    let (mut model_id, mut size, mut seq, mut batch, mut runs) = (
        "efficientnet-lite0".to_string(),
        224usize,
        128usize,
        16usize,
        3usize,
    );
    let (mut symbolic, mut nchw, mut symbolic_seq, mut nodes) = (false, false, false, 15usize);
    let mut tract_depthwise = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--symbolic" => symbolic = true,
            "--nchw" => nchw = true,
            "--symbolic-seq" => symbolic_seq = true,
            "--tract-depthwise" => tract_depthwise = true,
            _ => {}
        }
        if [
            "--symbolic",
            "--nchw",
            "--symbolic-seq",
            "--tract-depthwise",
        ]
        .contains(&flag.as_str())
        {
            continue;
        }
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => model_id = v,
            "--size" => size = v.parse()?,
            "--seq" => seq = v.parse()?,
            "--batch" => batch = v.parse()?,
            "--runs" => runs = v.parse()?,
            "--nodes" => nodes = v.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    let backbone = Backbone::by_id(&model_id)?;
    let mut model = tract_onnx::onnx().model_for_path(backbone.trunk_path())?;
    let b = if symbolic {
        model.symbols.sym("batch").to_dim()
    } else {
        batch.to_dim()
    };
    let inputs: TVec<TValue> = match &backbone.manifest.input {
        InputSpec::Image { channels, .. } => {
            model.set_input_fact(
                0,
                f32::fact([b, channels.to_dim(), size.to_dim(), size.to_dim()]).into(),
            )?;
            tvec![Tensor::zero::<f32>(&[batch, *channels, size, size])?.into_tvalue()]
        }
        InputSpec::Text { .. } => {
            let s = if symbolic_seq {
                model.symbols.sym("seq").to_dim()
            } else {
                seq.to_dim()
            };
            for i in 0..2 {
                model.set_input_fact(i, i64::fact([b.clone(), s.clone()]).into())?;
            }
            let ids = tract_ndarray::Array2::from_shape_fn((batch, seq), |(i, s)| {
                1000 + ((i * 131 + s * 17) % 28000) as i64
            });
            let mask = tract_ndarray::Array2::<i64>::ones((batch, seq));
            tvec![ids.into_tvalue(), mask.into_tvalue()]
        }
    };
    let t = Instant::now();
    let mut typed = model.into_typed()?.into_decluttered()?;
    if !nchw {
        let moves = channel_last_depthwise(&mut typed)?;
        eprintln!("{moves} depthwise layout changes applied");
        if !tract_depthwise {
            let ops = replace_depthwise(&mut typed)?;
            eprintln!("{ops} depthwise convolutions replaced by fedpeft's");
        }
    }
    let optimized = typed.into_optimized()?;
    eprintln!("optimised in {:.1}s", t.elapsed().as_secs_f64());
    let plan = optimized.into_runnable()?;
    let mut state = plan.spawn()?;
    state.run(inputs.clone())?; // warm-up
    let mut per_node: HashMap<usize, Duration> = HashMap::new();
    let t = Instant::now();
    for _ in 0..runs {
        state.run_plan_with_eval(inputs.clone(), |ctx, op_state, node, input| {
            let t = Instant::now();
            let out = eval(ctx, op_state, node, input);
            *per_node.entry(node.id).or_default() += t.elapsed();
            out
        })?;
    }
    let wall = t.elapsed().as_secs_f64() / runs as f64;
    let model = plan.model();
    let mut per_op: HashMap<String, (Duration, usize)> = HashMap::new();
    for (id, d) in &per_node {
        let e = per_op
            .entry(model.node(*id).op().name().to_string())
            .or_default();
        e.0 += *d;
        e.1 += 1;
    }
    let total: Duration = per_node.values().sum();
    println!(
        "{model_id} batch {batch}{}: {:.1} ms per run ({:.1} per second), {} nodes",
        if symbolic { " (symbolic)" } else { "" },
        wall * 1e3,
        batch as f64 / wall,
        model.nodes().len()
    );
    let mut ops: Vec<_> = per_op.into_iter().collect();
    ops.sort_by_key(|o| std::cmp::Reverse(o.1.0));
    for (name, (d, n)) in ops {
        println!(
            "  {:>6.1}%  {:>9.2} ms  {n:>4} × {name}",
            100.0 * d.as_secs_f64() / total.as_secs_f64(),
            d.as_secs_f64() * 1e3 / runs as f64
        );
    }
    let mut heavy: Vec<_> = per_node.into_iter().collect();
    heavy.sort_by_key(|h| std::cmp::Reverse(h.1));
    println!("heaviest nodes:");
    for (id, d) in heavy.into_iter().take(nodes) {
        let node = model.node(id);
        let facts = model.node_input_facts(id)?;
        println!(
            "  {:>9.2} ms  #{id} {} {:?}  in {:?}",
            d.as_secs_f64() * 1e3 / runs as f64,
            node.op().name(),
            node.name,
            facts.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>()
        );
        println!("      {}", node.op().info()?.join("; "));
    }
    Ok(())
}
