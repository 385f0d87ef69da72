//! The aggregator's held-out evaluation on the real EfficientNet-Lite0 backbone: on
//! Fashion-MNIST, keeping the tail's frozen prefix between evaluations (the default) gives the
//! same loss and accuracy as computing the whole tail every time, for every conv-head method;
//! on a user's image folder, the held-out set is that folder and the class list is part of the
//! model id clients must join with. Needs `make models`.

use std::path::{Path, PathBuf};

use fedpeft_aggregator::adapter::Adapter;
use fedpeft_aggregator::host::{HostError, ModelHost};
use fedpeft_aggregator::model::{
    BackboneHost, BackboneHostConfig, DEFAULT_FROZEN_BUDGET, HeldOutData,
};
use fedpeft_backbone::data::{OwnData, model_id};
use fedpeft_protocol::PeftMethod;

fn effnet() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/build/efficientnet-lite0");
    assert!(
        dir.join("trunk.onnx").is_file(),
        "{} is missing: run `make models`",
        dir.display()
    );
    dir
}

fn host(peft: PeftMethod, frozen_budget: usize, cache: &std::path::Path) -> BackboneHost {
    BackboneHost::open(&BackboneHostConfig {
        dir: effnet(),
        peft,
        seed: 7,
        eval_examples: 300,
        eval: HeldOutData::FashionMnist { root: None },
        image_size: 96,
        max_seq_len: None,
        threads: 1,
        cache_dir: cache.to_path_buf(),
        frozen_budget,
        initial_adapter: None,
    })
    .expect("backbone host")
}

/// The initial adapter with every value nudged, so LoRA's zero `B` and the head both matter.
fn nudged(a: &Adapter) -> Adapter {
    let mut a = a.clone();
    for t in &mut a.tensors {
        for (i, v) in t.values.iter_mut().enumerate() {
            *v += 0.01 * ((i % 7) as f32 - 3.0);
        }
    }
    a
}

#[test]
fn keeping_the_frozen_prefix_gives_the_same_evaluation() {
    let cache = tempfile::tempdir().unwrap();
    for peft in [
        PeftMethod::Head,
        PeftMethod::Bias,
        PeftMethod::Lora {
            rank: 8,
            alpha: 16.0,
        },
        PeftMethod::FullTail,
    ] {
        let mut kept = host(peft, DEFAULT_FROZEN_BUDGET, cache.path());
        let mut every_time = host(peft, 0, cache.path());
        let first = kept.initial_adapter().unwrap();
        let second = nudged(&first);
        for adapter in [&first, &second, &first] {
            let a = kept.evaluate(adapter).unwrap().unwrap();
            let b = every_time.evaluate(adapter).unwrap().unwrap();
            assert_eq!(a.examples, 300);
            assert!(
                (a.loss - b.loss).abs() < 1e-5 && a.accuracy == b.accuracy,
                "{peft:?}: {a:?} vs {b:?}"
            );
        }
        // The nudge changes the result, so the comparison above can fail.
        let a = kept.evaluate(&first).unwrap().unwrap();
        let b = kept.evaluate(&second).unwrap().unwrap();
        assert!(
            (a.loss - b.loss).abs() > 1e-4,
            "{peft:?}: nudge changed nothing"
        );
    }
}

/// `root/<class>/<k>.{png,jpg}`: `n` images per class, solid colours of other sizes than 96.
fn image_folder(root: &Path, classes: &[(&str, [u8; 3])], n: usize) {
    for (class, rgb) in classes {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for k in 0..n {
            let img = image::RgbImage::from_pixel(20 + k as u32, 30, image::Rgb(*rgb));
            let ext = if k % 2 == 0 { "png" } else { "jpg" };
            img.save(root.join(class).join(format!("{k}.{ext}")))
                .unwrap();
        }
    }
}

fn own_host(
    root: &Path,
    classes: Option<Vec<String>>,
    cache: &Path,
) -> Result<BackboneHost, HostError> {
    BackboneHost::open(&BackboneHostConfig {
        dir: effnet(),
        peft: PeftMethod::Head,
        seed: 7,
        eval_examples: 5,
        eval: HeldOutData::Own {
            data: OwnData::ImageFolder {
                root: root.to_path_buf(),
            },
            classes,
        },
        image_size: 64,
        max_seq_len: None,
        threads: 1,
        cache_dir: cache.to_path_buf(),
        initial_adapter: None,
        frozen_budget: DEFAULT_FROZEN_BUDGET,
    })
}

/// Rows of the classifier head: its number of classes.
fn head_rows(a: &Adapter) -> usize {
    let head = a.tensors.iter().find(|t| t.name == "head.weight");
    head.expect("a head.weight tensor").shape[0]
}

#[test]
fn a_users_image_folder_is_the_held_out_set_and_its_class_list_is_part_of_the_model_id() {
    let dir = tempfile::tempdir().unwrap();
    let (held_out, cache) = (dir.path().join("held-out"), dir.path().join("cache"));
    image_folder(
        &held_out,
        &[
            ("red", [200, 0, 0]),
            ("green", [0, 200, 0]),
            ("blue", [0, 0, 200]),
        ],
        3,
    );
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Without a list, the folder's sub-folders, sorted; 5 of the 9 images (a seeded subset).
    let mut host = own_host(&held_out, None, &cache).unwrap();
    let sorted = names(&["blue", "green", "red"]);
    assert_eq!(
        host.backbone_id(),
        Some(model_id("efficientnet-lite0", Some(&sorted)))
    );
    let adapter = host.initial_adapter().unwrap();
    assert_eq!(head_rows(&adapter), 3, "a head of 3 classes");
    let eval = host.evaluate(&adapter).unwrap().unwrap();
    assert_eq!(eval.examples, 5);
    // Another order is another model: a client holding it joins with another id.
    let listed = own_host(
        &held_out,
        Some(names(&["red", "green", "blue", "grey"])),
        &cache,
    )
    .unwrap();
    let id = listed.backbone_id().unwrap();
    assert_ne!(Some(id.clone()), host.backbone_id());
    assert_eq!(
        id,
        model_id(
            "efficientnet-lite0",
            Some(&names(&["red", "green", "blue", "grey"]))
        )
    );
    assert_eq!(head_rows(&listed.initial_adapter().unwrap()), 4);
    // A class folder outside the list, or a broken image, stops the aggregator, naming it.
    let err = own_host(&held_out, Some(names(&["red", "green"])), &cache).unwrap_err();
    assert!(err.to_string().contains("blue"), "{err}");
    std::fs::write(held_out.join("green/1.jpg"), b"\xff\xd8 not really").unwrap();
    let err = own_host(&held_out, None, &cache).unwrap_err();
    assert!(err.to_string().contains("1.jpg"), "{err}");
}

#[test]
fn a_users_jsonl_file_is_the_held_out_set_of_a_text_backbone() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/build/all-minilm-l6-v2");
    assert!(
        dir.join("manifest.json").is_file(),
        "{}: run `make models`",
        dir.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("held-out.jsonl");
    std::fs::write(
        &file,
        "{\"body\":\"win a free prize\",\"y\":\"spam\"}\n{\"body\":\"lunch?\",\"y\":\"ham\"}\n",
    )
    .unwrap();
    let cfg = |classes: &[&str]| BackboneHostConfig {
        dir: dir.clone(),
        peft: PeftMethod::Head,
        seed: 7,
        eval_examples: 100,
        eval: HeldOutData::Own {
            data: OwnData::Jsonl {
                path: file.clone(),
                columns: fedpeft_backbone::data::TextColumns {
                    text: "body".into(),
                    label: "y".into(),
                },
            },
            classes: Some(classes.iter().map(|s| s.to_string()).collect()),
        },
        image_size: 96,
        max_seq_len: Some(16),
        threads: 1,
        cache_dir: tmp.path().join("cache"),
        initial_adapter: None,
        frozen_budget: DEFAULT_FROZEN_BUDGET,
    };
    let mut host = BackboneHost::open(&cfg(&["ham", "spam"])).unwrap();
    let adapter = host.initial_adapter().unwrap();
    assert_eq!(host.evaluate(&adapter).unwrap().unwrap().examples, 2);
    let err = BackboneHost::open(&cfg(&["ham", "eggs"]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("held-out.jsonl, line 1") && err.contains("spam"),
        "{err}"
    );
    // Images cannot feed a text backbone.
    let mut images = cfg(&["ham", "spam"]);
    images.eval = HeldOutData::Own {
        data: OwnData::ImageFolder {
            root: tmp.path().to_path_buf(),
        },
        classes: None,
    };
    let err = BackboneHost::open(&images).unwrap_err().to_string();
    assert!(
        err.contains("model.dataset") && err.contains("image-folder"),
        "{err}"
    );
}
