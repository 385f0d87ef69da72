//! A fleet on the user's own images, end to end: the test writes image folders (PNG and JPEG,
//! none at the model's 96 px, grey, RGB and RGBA), and `fedpeft-fleet` runs a trial file that
//! gives each of two edge clients its own folder (`client_roots`, each client missing a class,
//! as real devices do) and the aggregator a held-out folder (`eval_root`). The class list is
//! the held-out folder's sub-folders, read by the runner and handed to everyone; the aggregator
//! evaluates every global adapter on the held-out folder, so its accuracy rising well above
//! chance (1/3) shows the clients and the aggregator numbered the classes alike.

mod common;
use common::exported::{Inputs, argmax, max_diff, onnxruntime_logits, tract_logits};

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::process::{Command, Output};

use fedpeft_tests::binary;
use fedpeft_tests::e2e::{backbone, round_record, run_fleet, shared_cache};

const ROUNDS: u32 = 3;

/// Class `class`'s picture number `k`: a reddish or bluish field, or black and white
/// horizontal stripes, at a size and in a format that vary with `k`.
fn picture(class: &str, k: u32) -> image::DynamicImage {
    let (w, h) = [(40, 30), (120, 90), (64, 64), (33, 50)][k as usize % 4];
    let shade = (k * 37 % 60) as u8;
    match class {
        "red" if k % 3 == 2 => image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            w,
            h,
            image::Rgba([190 + shade, 20, 30, 255]),
        )),
        "red" => image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            w,
            h,
            image::Rgb([190 + shade, 10 + shade / 2, 20]),
        )),
        "blue" => image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            w,
            h,
            image::Rgb([20, 30 + shade, 180 + shade]),
        )),
        _ => {
            let period = 4 + k % 5;
            image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |_, y| {
                image::Luma([if (y / period) % 2 == 0 { 15 } else { 240 }])
            }))
        }
    }
}

/// `root/<class>/<k>.png|jpg`, `n` pictures per class, from picture number `first` on.
fn write_folder(root: &Path, classes: &[&str], first: u32, n: u32) {
    for class in classes {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).expect("class folder");
        for k in first..first + n {
            let img = picture(class, k);
            let path = if k % 2 == 0 {
                dir.join(format!("{k}.png"))
            } else {
                // JPEG has no alpha: an RGBA picture goes in as PNG either way.
                match img {
                    image::DynamicImage::ImageRgba8(_) => dir.join(format!("{k}.png")),
                    _ => dir.join(format!("{k}.jpg")),
                }
            };
            img.save(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

fn trial(dir: &Path, site_a: &Path, site_b: &Path, held_out: &Path) -> PathBuf {
    let text = format!(
        r#"name = "own-images"
rounds = {ROUNDS}
clients = 2
round_timeout_secs = 60
seed = 11
cache_dir = "{cache}"

[model]
backbone = "{backbone}"
peft = "head"
runtime = "auto"
image_size = 96
eval_examples = 200

[data]
dataset = "image-folder"
client_roots = ["{a}", "{b}"]
eval_root = "{held_out}"

[local]
epochs = 4
batch_size = 8
learning_rate = 0.01
optimizer = "adamw"
update_dtype = "f32"
"#,
        cache = shared_cache().display(),
        backbone = backbone().display(),
        a = site_a.display(),
        b = site_b.display(),
        held_out = held_out.display(),
    );
    let path = dir.join("own-images.toml");
    std::fs::write(&path, text).expect("write trial");
    path
}

/// `edge-client predict ARGS`, its output, with stderr shown.
fn predict(args: &[&std::ffi::OsStr]) -> Output {
    let out = Command::new(binary("edge-client"))
        .arg("predict")
        .args(args)
        .output()
        .expect("run fedpeft-edge predict");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn os<S: AsRef<std::ffi::OsStr> + ?Sized>(s: &S) -> &std::ffi::OsStr {
    s.as_ref()
}

/// Refused, with a message on stderr that contains every one of `needles`.
fn refused(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted; stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "the refusal does not name {n:?}:\n{err}");
    }
}

/// The federation's model in use: every kept round's adapter, run by `edge-client predict` on
/// the held-out folder, scores what the aggregator reported for that round; unlabelled images
/// get a label and probabilities; bad adapters and inputs are refused by name.
fn predictions_match_the_aggregators_evaluation(
    out: &Path,
    report: &serde_json::Value,
    dir: &Path,
    held_out: &Path,
) {
    let globals = report["globals"].clone();
    assert_eq!(
        globals["rounds"].as_array().map(Vec::len),
        Some(ROUNDS as usize + 1),
        "{globals}"
    );
    for r in 0..=ROUNDS {
        let reported = round_record(report, r)["eval_accuracy"]
            .as_f64()
            .expect("accuracy");
        let o = predict(&[
            os("--adapter"),
            out.as_os_str(),
            os("--round"),
            os(&r.to_string()),
            os("--evaluate"),
            held_out.as_os_str(),
        ]);
        assert!(o.status.success(), "predict --evaluate, round {r}");
        let summary: serde_json::Value =
            serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
        assert_eq!(summary["round"], r);
        assert_eq!(summary["examples"], 18);
        let got = summary["accuracy"].as_f64().expect("accuracy");
        assert!(
            (got - reported).abs() < 1e-9,
            "round {r}: predict scores {got}, the aggregator reported {reported}"
        );
        let confusion: Vec<Vec<u64>> =
            serde_json::from_value(summary["confusion"].clone()).unwrap();
        assert_eq!(confusion.iter().flatten().sum::<u64>(), 18);
        assert_eq!(
            confusion
                .iter()
                .map(|row| row[0] + row[1] + row[2])
                .collect::<Vec<_>>(),
            [6, 6, 6]
        );
    }
    // Unlabelled images, a file and a folder: one line each, the best round by default, the
    // same answers as the evaluation of that round (its confusion matrix's `stripes` row).
    let o = predict(&[
        os("--adapter"),
        out.as_os_str(),
        os("--evaluate"),
        held_out.as_os_str(),
    ]);
    assert!(o.status.success());
    let best: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(
        best["round"], globals["best"],
        "--round defaults to the best"
    );
    let o = predict(&[
        os("--adapter"),
        out.as_os_str(),
        os("--top-k"),
        os("2"),
        held_out.join("red/16.png").as_os_str(),
        held_out.join("stripes").as_os_str(),
    ]);
    assert!(o.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 7, "one file and a folder of six");
    assert!(
        lines[0]["input"].as_str().unwrap().ends_with("red/16.png"),
        "{}",
        lines[0]
    );
    let stripes = lines[1..]
        .iter()
        .filter(|l| l["label"] == "stripes")
        .count() as u64;
    assert_eq!(
        stripes,
        best["confusion"][2][2].as_u64().unwrap(),
        "{lines:?}"
    );
    for l in &lines {
        let top = l["top"].as_array().expect("top-k");
        assert_eq!(top.len(), 2);
        let (p0, p1) = (top[0]["p"].as_f64().unwrap(), top[1]["p"].as_f64().unwrap());
        assert!(p0 >= p1 && p0 <= 1.0 && p1 >= 0.0, "{l}");
        assert_eq!(l["label"], top[0]["label"]);
    }
    let o = predict(&[
        os("--adapter"),
        out.as_os_str(),
        os("--format"),
        os("csv"),
        held_out.join("blue").as_os_str(),
    ]);
    assert!(o.status.success());
    let csv = String::from_utf8_lossy(&o.stdout);
    assert!(
        csv.starts_with("input,label,top1,p1,top2,p2,top3,p3\n"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 7);

    // Bad input: each refused, naming what and where.
    let last = out.join(format!("globals/round-{ROUNDS:04}.bin"));
    let bytes = std::fs::read(&last).expect("the last round's adapter");
    let cut = dir.join("cut/round.bin");
    std::fs::create_dir_all(cut.parent().unwrap()).unwrap();
    std::fs::copy(out.join("globals/index.json"), dir.join("cut/index.json")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    refused(
        &predict(&[os("--adapter"), cut.as_os_str(), held_out.as_os_str()]),
        &["cut/round.bin", "envelope"],
    );
    let text_model = fedpeft_tests::workspace_root().join("models/build/all-minilm-l6-v2");
    refused(
        &predict(&[
            os("--adapter"),
            out.as_os_str(),
            os("--model-dir"),
            text_model.as_os_str(),
            held_out.as_os_str(),
        ]),
        &["all-minilm-l6-v2", "trunk", "efficientnet-lite0"],
    );
    let junk = dir.join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("photo.jpg"), b"not a jpeg").unwrap();
    refused(
        &predict(&[os("--adapter"), out.as_os_str(), junk.as_os_str()]),
        &["photo.jpg", "decode"],
    );
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    refused(
        &predict(&[os("--adapter"), out.as_os_str(), empty.as_os_str()]),
        &["empty", "no .png"],
    );
    refused(
        &predict(&[
            os("--adapter"),
            out.as_os_str(),
            os("--round"),
            os("99"),
            held_out.as_os_str(),
        ]),
        &["round 99"],
    );
}

/// The exported model (trunk + merged tail in one ONNX file) gives the Rust path's logits on
/// the held-out images in tract and in onnxruntime's Python API, and so the same accuracy.
fn the_exported_model_matches_the_rust_path(out: &Path, dir: &Path, held_out: &Path) {
    use fedpeft_edge::model::{Model, ModelOptions, RoundChoice, locate, read_adapter};
    let export = dir.join("model");
    eprintln!("{}", common::exported::export(out, &export));
    for f in ["tail-merged.safetensors", "model.json", "model.onnx"] {
        assert!(export.join(f).is_file(), "{f} missing");
    }
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(export.join("model.json")).unwrap()).unwrap();
    assert_eq!(
        info["classes"],
        serde_json::json!(["blue", "red", "stripes"])
    );

    let (file, index) = locate(out, RoundChoice::Best).unwrap();
    let adapter = read_adapter(&file, index, None).unwrap();
    assert_eq!(info["round"], adapter.round);
    let model = Model::open(
        &adapter,
        &ModelOptions {
            model_dir: None,
            runtime: Some(fedpeft_backbone::Runtime::Tract),
            threads: 1,
        },
    )
    .unwrap();
    let ds = fedpeft_backbone::data::OwnData::ImageFolder {
        root: held_out.to_path_buf(),
    }
    .load_images(&model.classes, 96)
    .unwrap();
    let idx: Vec<usize> = (0..ds.len()).collect();
    let rust = model.image_logits(&ds, &idx).unwrap();
    let pre = fedpeft_backbone::ImagePreprocess::from_manifest(&model.backbone.manifest, Some(96))
        .unwrap();
    let pixels = pre.batch(&ds, &idx).unwrap();
    let onnx = export.join("model.onnx");
    let inputs = Inputs::Pixels(pixels);
    let (tract, ort) = (
        tract_logits(&onnx, &inputs),
        onnxruntime_logits(&onnx, &inputs, dir),
    );
    let (dt, dort) = (max_diff(&rust, &tract), max_diff(&rust, &ort));
    eprintln!("exported model against the Rust path: tract {dt:e}, onnxruntime {dort:e}");
    assert!(dt < 1e-4 && dort < 1e-4, "tract {dt}, onnxruntime {dort}");
    assert_eq!(argmax(&rust), argmax(&ort));
    assert_eq!(argmax(&rust), argmax(&tract));
}

/// The `model_id=` a log line that contains `needle` carries.
fn model_id(log: &str, needle: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"));
    line.split("model_id=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no model_id in {line}"))
        .to_string()
}

#[test]
fn a_fleet_trains_on_each_devices_own_image_folder_and_the_held_out_accuracy_rises() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, b, held_out) = (
        dir.path().join("site-a"),
        dir.path().join("site-b"),
        dir.path().join("held-out"),
    );
    // Site A has no stripes, site B no red: the class list is the fleet's, not a folder's.
    write_folder(&a, &["red", "blue"], 0, 8);
    write_folder(&b, &["blue", "stripes"], 8, 8);
    write_folder(&held_out, &["red", "blue", "stripes"], 16, 6);
    let path = trial(dir.path(), &a, &b, &held_out);
    let out = dir.path().join("out");
    let report = run_fleet(&path, &out, Duration::from_secs(180)).report;

    for r in 1..=ROUNDS {
        let rec = round_record(&report, r);
        assert_eq!(rec["status"], "ok", "round {r}: {rec}");
        assert_eq!(rec["clients_ok"], 2, "round {r}: {rec}");
    }
    let accuracy = |r: u32| {
        round_record(&report, r)["eval_accuracy"]
            .as_f64()
            .unwrap_or_else(|| panic!("no eval accuracy for round {r} in the report"))
    };
    let (first, last) = (accuracy(0), accuracy(ROUNDS));
    eprintln!("held-out accuracy: round 0 {first:.3}, round {ROUNDS} {last:.3} (chance 0.333)");
    assert!(
        last >= 0.8 && last >= first,
        "accuracy did not rise: round 0 {first}, round {ROUNDS} {last}"
    );

    // The aggregator evaluated on the user's held-out folder (18 pictures, 3 classes in sorted
    // order), and every client joined with the same class list's model id.
    let logs = out.join("logs");
    let agg = std::fs::read_to_string(logs.join("aggregator.log")).expect("aggregator log");
    let held = agg
        .lines()
        .find(|l| l.contains("held-out set read"))
        .unwrap_or_else(|| panic!("no held-out line in:\n{agg}"));
    assert!(
        held.contains("dataset=\"image-folder\"") || held.contains("dataset=image-folder"),
        "{held}"
    );
    assert!(
        held.contains("examples=18") && held.contains(r#"["blue", "red", "stripes"]"#),
        "{held}"
    );
    predictions_match_the_aggregators_evaluation(&out, &report, dir.path(), &held_out);
    the_exported_model_matches_the_rust_path(&out, dir.path(), &held_out);
    let id = model_id(&agg, "the fleet's class list");
    assert!(id.starts_with("efficientnet-lite0#classes-"), "{id}");
    for i in 0..2 {
        let log = std::fs::read_to_string(logs.join(format!("client-{i:02}.log")))
            .unwrap_or_else(|e| panic!("client {i}'s log: {e}"));
        assert_eq!(model_id(&log, "the fleet's class list"), id, "client {i}");
        assert!(
            log.contains("examples=16"),
            "client {i} read 16 pictures:\n{log}"
        );
    }
}
