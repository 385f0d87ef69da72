//! Data loaders on the real data sets and on broken user files.

use std::io::Write;

use fedpeft_backbone::BackboneError;
use fedpeft_backbone::data::{
    TextColumns, fashion_mnist, load_csv, load_idx_pair, load_image_folder, load_jsonl,
    load_spam_assassin, spam_assassin_dir,
};
use fedpeft_backbone::{Partitioner, partition};

#[test]
fn fashion_mnist_has_60000_train_and_10000_test_images_of_10_balanced_classes() {
    let train = fashion_mnist(true).unwrap();
    let test = fashion_mnist(false).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!((train.height, train.width, train.channels), (28, 28, 1));
    let mut per = [0usize; 10];
    for &l in &test.labels {
        per[l as usize] += 1;
    }
    assert_eq!(per, [1000; 10]);
    assert_eq!(train.classes[9], "Ankle boot");
}

#[test]
fn spam_assassin_loads_6046_mails_with_mailing_lists_as_natural_clients() {
    let ds = load_spam_assassin(&spam_assassin_dir()).unwrap();
    assert_eq!(ds.len(), 6046);
    let spam = ds.labels.iter().filter(|&&l| l == 1).count();
    assert_eq!(spam, 1896);
    let with_list = ds.keys.iter().filter(|k| k.is_some()).count();
    assert!(with_list > 1500, "{with_list} mails with a list header");
    let p = partition(&ds.labels, Some(&ds.keys), 0, &Partitioner::Natural, 0).unwrap();
    assert!(p.clients.len() >= 20, "{} natural clients", p.clients.len());
    let fork = p
        .clients
        .iter()
        .find(|c| c.name.contains("fork"))
        .expect("the FoRK list");
    assert!(fork.indices.len() > 500);
    // routing headers are dropped (a few remain inside forwarded messages' bodies)
    let routed = ds
        .texts
        .iter()
        .filter(|t| t.contains("Return-Path:"))
        .count();
    assert!(
        routed < ds.len() / 20,
        "{routed} texts still carry routing headers"
    );
}

fn write(dir: &std::path::Path, name: &str, body: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(body).unwrap();
    p
}

fn idx(rank_dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, rank_dims.len() as u8];
    for d in rank_dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

#[test]
fn a_user_idx_pair_loads_and_a_mislabelled_one_names_the_file_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = write(dir.path(), "imgs.idx", &idx(&[3, 2, 2], &[0; 12]));
    let good = write(dir.path(), "good.idx", &idx(&[3], &[0, 1, 1]));
    let ds = load_idx_pair(&imgs, &good, Some(vec!["a".into(), "b".into()])).unwrap();
    assert_eq!(ds.len(), 3);
    let bad = write(dir.path(), "bad.idx", &idx(&[3], &[0, 1, 7]));
    let e = load_idx_pair(&imgs, &bad, Some(vec!["a".into(), "b".into()])).unwrap_err();
    assert!(
        matches!(
            e,
            BackboneError::Data {
                record: Some(2),
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("bad.idx"), "{e}");
    let short = write(dir.path(), "short.idx", &idx(&[3, 2, 2], &[0; 5]));
    let e = load_idx_pair(&short, &good, None).unwrap_err();
    assert!(
        e.to_string().contains("short.idx") && e.to_string().contains("need"),
        "{e}"
    );
}

#[test]
fn csv_and_jsonl_text_load_and_bad_records_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write(
        dir.path(),
        "t.csv",
        b"text,label,key\n\"hello, world\",pos,u1\nbad day,neg,\n",
    );
    let ds = load_csv(&csv, None, &TextColumns::default()).unwrap();
    assert_eq!(ds.texts[0], "hello, world");
    assert_eq!(ds.classes, vec!["pos", "neg"]);
    assert_eq!(ds.keys, vec![Some("u1".to_string()), None]);

    let fixed = vec!["pos".to_string(), "neg".to_string()];
    let bad = write(dir.path(), "bad.csv", b"text,label\nok,pos\nfine,maybe\n");
    let e = load_csv(&bad, Some(&fixed), &TextColumns::default()).unwrap_err();
    assert!(matches!(e, BackboneError::DataLine { line: 3, .. }), "{e}");
    assert!(e.to_string().contains("maybe"), "{e}");

    let nolabel = write(dir.path(), "h.csv", b"body,label\nx,1\n");
    assert!(
        load_csv(&nolabel, None, &TextColumns::default())
            .unwrap_err()
            .to_string()
            .contains("`text`")
    );

    let jl = write(
        dir.path(),
        "t.jsonl",
        b"{\"text\":\"a\",\"label\":1}\n\n{\"text\":\"b\",\"label\":0,\"key\":\"k\"}\n",
    );
    let ds = load_jsonl(&jl, None, &TextColumns::default()).unwrap();
    assert_eq!(ds.labels, vec![0, 1]);
    assert_eq!(ds.classes, vec!["1", "0"]);
    let broken = write(
        dir.path(),
        "b.jsonl",
        b"{\"text\":\"a\",\"label\":1}\n{\"text\": \"oops\"\n",
    );
    let e = load_jsonl(&broken, None, &TextColumns::default()).unwrap_err();
    assert!(matches!(e, BackboneError::DataLine { line: 2, .. }), "{e}");
    assert!(e.to_string().contains("b.jsonl"));
}

#[test]
fn an_image_folder_loads_per_class_and_a_broken_image_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for (class, shade) in [("cat", 10u8), ("dog", 200u8)] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        for k in 0..2 {
            let img = image::RgbImage::from_pixel(5, 4, image::Rgb([shade, k, 0]));
            img.save(dir.path().join(class).join(format!("{k}.png")))
                .unwrap();
        }
    }
    let ds = load_image_folder(dir.path(), None, None).unwrap();
    assert_eq!(ds.len(), 4);
    assert_eq!((ds.width, ds.height, ds.channels), (5, 4, 3));
    assert_eq!(ds.labels, vec![0, 0, 1, 1]);
    assert_eq!(ds.image(2)[0], 200);
    let resized = load_image_folder(dir.path(), None, Some((8, 8))).unwrap();
    assert_eq!(resized.image_len(), 8 * 8 * 3);

    write(&dir.path().join("dog"), "2.png", b"not a png at all");
    let e = load_image_folder(dir.path(), None, None).unwrap_err();
    assert!(e.to_string().contains("2.png"), "{e}");
}
