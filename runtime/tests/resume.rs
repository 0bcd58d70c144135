//! `cnnc run --resume` end to end, on a tiny model and synthetic data (a debug
//! build runs it in a fraction of a second): a run stopped early or killed at
//! random points — also in the middle of writing a checkpoint — and resumed, again
//! and again, ends with the same bytes in `final.safetensors` as a run never
//! interrupted; damaged checkpoints and checkpoints of another model are refused
//! with a clear error, and nothing in the run folder changes.
//!
//! The kill test makes every save slow with `CNNC_TEST_SAVE_DELAY_MS` (read by
//! debug builds only; see `checkpoint.rs`) so that many kills land inside a save.
//! A longer version, `killed_runs_resume_bit_identically_long`, is ignored because
//! it takes minutes; run it with
//! `cargo test -p cnnc-runtime --test resume -- --ignored`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Milliseconds each half of a checkpoint file, and the gap between the two
/// files, take in the kill test.
const SAVE_DELAY_MS: &str = "25";

fn cnnc_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cnnc"));
    c.args(args)
        .args(["--threads", "2"])
        .env("NO_COLOR", "1")
        .env_remove("CNNC_TEST_SAVE_DELAY_MS");
    c
}

fn cnnc(args: &[&str]) -> Output {
    cnnc_cmd(args).output().expect("cnnc runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn all_text(o: &Output) -> String {
    format!("{}{}", text(&o.stdout), text(&o.stderr))
}

/// A fresh folder for one test.
fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnnc-resume-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Batchnorm (running statistics, counter), dropout, augmentation, clipping, Adam
/// and a cosine schedule with warm-up: every piece of state a resume must restore.
const TINY: &str = "model Tiny {
  input image: [1, 16, 16]
  conv c1(4, kernel=3, pad=1, bias=false)
  batchnorm
  relu
  maxpool(2)
  conv c2(8, kernel=3, pad=1)
  relu
  global_avg_pool
  dropout(0.1)
  linear fc(3)
}
train {
  data = shapes(n=60, size=16, color=grey, classes=3)
  augment = [hflip(p=0.5)]
  batch = 16
  epochs = 5
  optimizer = adam(lr=0.01)
  schedule = cosine(min_lr=0.001, warmup=1)
  clip = norm(1.0)
  checkpoint = every(epochs=1, keep=2)
  seed = 3
}
";

/// SGD with Nesterov momentum and a step schedule, whose learning rates do not
/// depend on the number of epochs (so `--epochs` may stop a run early).
fn sgd_model() -> String {
    TINY.replace(
        "optimizer = adam(lr=0.01)",
        "optimizer = sgd(lr=0.05, momentum=0.9, nesterov=true, weight_decay=0.0001)",
    )
    .replace(
        "schedule = cosine(min_lr=0.001, warmup=1)",
        "schedule = step(every=2, gamma=0.5)",
    )
}

fn write_model(d: &Path, name: &str, src: &str) -> String {
    let f = d.join(name);
    std::fs::write(&f, src).unwrap();
    f.to_string_lossy().into_owned()
}

fn ok(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "{}", all_text(o));
}

fn final_files(out: &Path) -> (Vec<u8>, Vec<u8>) {
    let c = out.join("checkpoints");
    (
        std::fs::read(c.join("final.safetensors")).unwrap(),
        std::fs::read(c.join("final.optimizer.safetensors")).unwrap(),
    )
}

/// The numbers of each line of `metrics.jsonl` that do not depend on timing.
fn metrics(out: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let keep = [
                "train_loss",
                "train_accuracy",
                "test_loss",
                "test_accuracy",
                "lr",
            ];
            let figures: Vec<String> = keep.iter().map(|k| v[*k].to_string()).collect();
            (v["epoch"].as_u64().unwrap(), figures.join(" "))
        })
        .collect()
}

/// Every file under `d` and its bytes.
fn snapshot(d: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![d.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

fn names(d: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    n.sort();
    n
}

#[test]
fn a_run_stopped_early_and_resumed_ends_with_the_uninterrupted_weights() {
    let d = dir("early");
    let model = write_model(&d, "tiny.cnn", &sgd_model());
    let whole = d.join("whole");
    ok(&cnnc(&["run", &model, "--out", &whole.to_string_lossy()]));
    let part = d.join("part");
    let p = part.to_string_lossy();
    ok(&cnnc(&["run", &model, "--out", &p, "--epochs", "2"]));
    let o = cnnc(&["run", &model, "--out", &p, "--resume"]);
    ok(&o);
    let stdout = text(&o.stdout);
    assert!(
        stdout.contains("resuming from") && stdout.contains("final`: epoch 2 of 5 done, step 8"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("epoch   2/5"),
        "epoch 2 was not trained again: {stdout}"
    );
    assert!(
        final_files(&part) == final_files(&whole),
        "resumed run differs"
    );
    assert_eq!(metrics(&part), metrics(&whole));
    assert_eq!(
        names(&part.join("checkpoints")),
        [
            "epoch-0004.optimizer.safetensors",
            "epoch-0004.safetensors",
            "epoch-0005.optimizer.safetensors",
            "epoch-0005.safetensors",
            "final.optimizer.safetensors",
            "final.safetensors"
        ]
    );
    // Resuming a finished run trains nothing and changes nothing.
    let before = final_files(&part);
    let o = cnnc(&["run", &model, "--out", &p, "--resume"]);
    ok(&o);
    assert!(
        text(&o.stdout).contains("nothing left to train"),
        "{}",
        all_text(&o)
    );
    assert!(final_files(&part) == before);
    assert_eq!(metrics(&part), metrics(&whole));
}

#[test]
fn resume_skips_incomplete_saves_and_says_why() {
    let d = dir("skip");
    let model = write_model(&d, "tiny.cnn", TINY);
    let out = d.join("run");
    let o = out.to_string_lossy();
    ok(&cnnc(&["run", &model, "--out", &o]));
    let reference = final_files(&out);
    let c = out.join("checkpoints");
    // A save of `final` cut after its weights file (new weights beside the state
    // file of an older save), and a save of epoch 5 cut before its state file.
    let older = std::fs::read(c.join("epoch-0004.optimizer.safetensors")).unwrap();
    std::fs::write(c.join("final.optimizer.safetensors"), older).unwrap();
    std::fs::remove_file(c.join("epoch-0005.optimizer.safetensors")).unwrap();
    // A temporary file of an interrupted write.
    std::fs::write(c.join(".epoch-0005.optimizer.safetensors.tmp-1-2"), b"half").unwrap();
    let r = cnnc(&["run", &model, "--out", &o, "--resume"]);
    ok(&r);
    let stdout = text(&r.stdout);
    for needle in [
        "skipping `",
        "final`: its two files come from different saves (weights at epoch 5, step 20, optimizer state at epoch 4, step 16)",
        "epoch-0005`: `epoch-0005.optimizer.safetensors` is missing",
        "resuming from `",
        "epoch-0004`: epoch 4 of 5 done, step 16",
        "epoch   5/5",
    ] {
        assert!(stdout.contains(needle), "no `{needle}` in:\n{stdout}");
    }
    assert!(final_files(&out) == reference);
    assert_eq!(metrics(&out).len(), 5);
    assert!(
        !names(&c).iter().any(|n| n.contains(".tmp-")),
        "{:?}",
        names(&c)
    );
}

/// Runs `cnnc run --resume` on a damaged or foreign checkpoint: exit 1, an error
/// containing every needle, and the run folder exactly as it was.
fn refused(args: &[&str], run: &Path, needles: &[&str]) {
    let before = snapshot(run);
    let o = cnnc(args);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", all_text(&o));
    for n in needles {
        assert!(err.contains(n), "no `{n}` in:\n{err}");
    }
    assert!(
        snapshot(run) == before,
        "a refused resume changed the run folder"
    );
}

#[test]
fn damaged_and_foreign_checkpoints_are_refused_and_nothing_is_written() {
    let d = dir("refuse");
    let model = write_model(&d, "tiny.cnn", &sgd_model());
    let out = d.join("run");
    let o = out.to_string_lossy().into_owned();
    ok(&cnnc(&["run", &model, "--out", &o, "--epochs", "3"]));
    let resume = ["run", model.as_str(), "--out", o.as_str(), "--resume"];
    let c = out.join("checkpoints");
    let weights = c.join("final.safetensors");
    let state = c.join("final.optimizer.safetensors");
    let good_weights = std::fs::read(&weights).unwrap();
    let good_state = std::fs::read(&state).unwrap();

    // Truncated.
    std::fs::write(&weights, &good_weights[..good_weights.len() - 100]).unwrap();
    refused(&resume, &out, &["final.safetensors` is truncated"]);
    std::fs::write(&weights, &good_weights).unwrap();
    // One flipped bit in a tensor, then in the header.
    let mut bad = good_state.clone();
    let k = bad.len() - 7;
    bad[k] ^= 0x10;
    std::fs::write(&state, &bad).unwrap();
    refused(
        &resume,
        &out,
        &["final.optimizer.safetensors` is corrupt: its checksum does not match"],
    );
    std::fs::write(&state, &good_state).unwrap();
    let mut bad = good_weights.clone();
    let needle = b"\"step\":\"12\"";
    let at = bad.windows(needle.len()).position(|w| w == needle).unwrap() + 9;
    bad[at] = b'3';
    std::fs::write(&weights, &bad).unwrap();
    refused(
        &resume,
        &out,
        &["final.safetensors` is corrupt: its checksum"],
    );
    std::fs::write(&weights, &good_weights).unwrap();
    std::fs::write(&state, &good_state).unwrap();

    // Another model, another optimizer, other data.
    let other = write_model(
        &d,
        "other.cnn",
        &sgd_model()
            .replace("model Tiny", "model Other")
            .replace("conv c2(8", "conv c2(6"),
    );
    refused(
        &["run", &other, "--out", &o, "--resume"],
        &out,
        &[
            "was written for another model: `Tiny`",
            "this file's model is `Other`",
            "c2.weight is F32 [8, 4, 3, 3] in the file, the model needs F32 [6, 4, 3, 3]",
        ],
    );
    let adam = write_model(&d, "adam.cnn", TINY);
    refused(
        &["run", &adam, "--out", &o, "--resume"],
        &out,
        &["other train settings: `optimizer`, `schedule` differ"],
    );
    let more = write_model(&d, "more.cnn", &sgd_model().replace("n=60", "n=80"));
    refused(
        &["run", &more, "--out", &o, "--resume"],
        &out,
        &["other train settings: `data` differs"],
    );
    refused(
        &["run", &model, "--out", &o, "--resume", "--epochs", "2"],
        &out,
        &[
            "is at epoch 3, past the 2 epochs asked for",
            "--epochs 3 or more",
        ],
    );

    // No checkpoint, no folder.
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    refused(
        &["run", &model, "--out", &empty.to_string_lossy(), "--resume"],
        &empty,
        &[
            "no complete checkpoint to resume from",
            "checkpoint = every(epochs=N)",
        ],
    );
    let o = cnnc(&[
        "run",
        &model,
        "--out",
        &d.join("none").to_string_lossy(),
        "--resume",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("no run folder"),
        "{}",
        all_text(&o)
    );
    assert!(!d.join("none").exists());
    // --resume continues a run: it cannot also start one over or from other weights.
    let o = cnnc(&[
        "run",
        &model,
        "--out",
        &o_str(&out),
        "--resume",
        "--overwrite",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", all_text(&o));

    // After all that, the run still resumes to the uninterrupted weights.
    let whole = d.join("whole");
    ok(&cnnc(&["run", &model, "--out", &whole.to_string_lossy()]));
    ok(&cnnc(&resume));
    assert!(final_files(&out) == final_files(&whole));
}

fn o_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// SplitMix64: the kill delays, reproducible from the trial number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How an attempt ended.
enum Ended {
    Killed,
    Exited(i32, String),
}

/// Runs `cnnc` and kills it (SIGKILL) after `after`, unless it ends first.
fn run_until(args: &[&str], after: Option<Duration>) -> Ended {
    let mut child = cnnc_cmd(args)
        .env("CNNC_TEST_SAVE_DELAY_MS", SAVE_DELAY_MS)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cnnc starts");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if after.is_some_and(|a| t0.elapsed() >= a) {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    match status {
        None => Ended::Killed,
        Some(s) => Ended::Exited(s.code().unwrap_or(-1), out),
    }
}

/// What the kill trials saw.
#[derive(Debug, Default)]
struct Tally {
    trials: usize,
    kills: usize,
    /// Kills that left a temporary file or an incomplete pair behind: they landed
    /// inside a save.
    kills_in_save: usize,
    /// Resumes that found no checkpoint yet, so the run started over.
    restarts: usize,
    resumes: usize,
}

/// Whether a save was cut short: a temporary file, or an unpaired checkpoint file.
fn save_cut_short(ckpt: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(ckpt) else {
        return false;
    };
    let names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.iter().any(|n| n.contains(".tmp-"))
        || names.iter().any(|n| {
            n.strip_suffix(".optimizer.safetensors").map_or_else(
                || {
                    let stem = n.trim_end_matches(".safetensors");
                    !names.contains(&format!("{stem}.optimizer.safetensors"))
                },
                |stem| !names.contains(&format!("{stem}.safetensors")),
            )
        })
}

/// `trials` runs of TINY, each killed up to `max_kills` times at random points and
/// resumed, all ending with the reference bytes.
fn kill_trials(name: &str, trials: u64, max_kills: usize) -> Tally {
    let d = dir(name);
    let model = write_model(&d, "tiny.cnn", TINY);
    let reference = d.join("reference");
    let t0 = Instant::now();
    match run_until(&["run", &model, "--out", &o_str(&reference)], None) {
        Ended::Exited(0, _) => {}
        Ended::Exited(c, out) => panic!("reference run: exit {c}\n{out}"),
        Ended::Killed => unreachable!(),
    }
    let span = t0.elapsed();
    let want = final_files(&reference);
    let want_metrics = metrics(&reference);
    let mut tally = Tally::default();
    for trial in 0..trials {
        let mut rng = Rng(0x5eed_0000 + trial);
        let out = d.join(format!("trial-{trial}"));
        let o = o_str(&out);
        let fresh = ["run", model.as_str(), "--out", o.as_str(), "--overwrite"];
        let resume = ["run", model.as_str(), "--out", o.as_str(), "--resume"];
        let mut args: &[&str] = &fresh;
        let mut kills = 0;
        loop {
            // Up to 110% of an uninterrupted run's time: some attempts finish.
            let after = (kills < max_kills).then(|| span.mul_f64(1.1 * rng.unit()));
            match run_until(args, after) {
                Ended::Killed => {
                    kills += 1;
                    tally.kills += 1;
                    if save_cut_short(&out.join("checkpoints")) {
                        tally.kills_in_save += 1;
                    }
                    args = &resume;
                    tally.resumes += 1;
                }
                Ended::Exited(0, _) => break,
                Ended::Exited(1, text)
                    if args == resume
                        && (text.contains("no complete checkpoint")
                            || text.contains("no run folder")) =>
                {
                    // Killed before its first checkpoint: start over.
                    tally.restarts += 1;
                    args = &fresh;
                }
                Ended::Exited(c, text) => {
                    panic!(
                        "trial {trial}: `cnnc {}` exited with {c}:\n{text}",
                        args.join(" ")
                    )
                }
            }
        }
        tally.trials += 1;
        assert!(
            final_files(&out) == want,
            "trial {trial}: weights differ after {kills} kills"
        );
        assert_eq!(metrics(&out), want_metrics, "trial {trial}");
        let left = names(&out.join("checkpoints"));
        assert_eq!(left.len(), 6, "trial {trial}: keep=2 and final: {left:?}");
    }
    tally
}

#[test]
fn killed_runs_resume_bit_identically() {
    let tally = kill_trials("kill", 16, 5);
    eprintln!("{tally:?}");
    assert!(tally.kills >= 16, "{tally:?}");
    assert!(
        tally.kills_in_save >= 1,
        "no kill landed inside a save: {tally:?}"
    );
}

/// Ignored: about 60 trials, a few minutes in a debug build. Run it with
/// `cargo test -p cnnc-runtime --test resume -- --ignored --nocapture`.
#[test]
#[ignore]
fn killed_runs_resume_bit_identically_long() {
    let tally = kill_trials("kill-long", 60, 6);
    eprintln!("{tally:?}");
    assert!(tally.kills_in_save >= 10, "{tally:?}");
}
