//! Arbitrary bytes → a valid `.cnn` model, for the `jit_vs_interp` target (and
//! as seeds for `pipeline`). The bytes are read as a stream of choices (a byte
//! past the end reads as 0, which always picks the plainest option), and the
//! generator tracks every value's shape itself, so each choice it makes is one
//! the checker accepts: convolutions with stride, padding (explicit or `same`),
//! dilation, groups and rectangular kernels; depthwise and pointwise convs;
//! batch and group norm; max and average pooling; every activation; dropout;
//! `detach`; `frozen` layers; branches (`from`), residual `add` and channel
//! `concat` of earlier values; then `global_avg_pool` or `flatten` and a linear
//! head, sometimes with a hidden layer.
//!
//! Sizes stay small (at most 16 channels, 12×12 inputs, 12 body layers), so one
//! model's training step takes milliseconds on either backend.

use std::fmt::Write as _;

/// Reads choices from fuzzer bytes; past the end every byte is 0.
pub struct Choices<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Choices<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Choices { data, pos: 0 }
    }

    pub fn exhausted(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    /// A number in `lo..=hi` (`hi - lo < 256`); `lo` when exhausted.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi && hi - lo < 256);
        lo + u64::from(self.byte()) % (hi - lo + 1)
    }

    /// True with about `percent`% probability; false when exhausted.
    pub fn chance(&mut self, percent: u32) -> bool {
        u32::from(self.byte()) * 100 >= (100 - percent.min(100)) * 256
    }

    /// One of `xs` (the first when exhausted).
    pub fn pick<'x, T>(&mut self, xs: &'x [T]) -> &'x T {
        &xs[self.byte() as usize % xs.len()]
    }
}

/// Which graph of a generated model is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The training step: loss, correct count, parameter gradients, running
    /// statistics.
    Train,
    /// Inference mode: loss, correct count, logits.
    Eval,
    /// Inference mode: logits and the gradient of one class score per image
    /// with respect to the input (saliency).
    InputGrad,
}

/// A generated model and how to run it.
#[derive(Clone, Debug)]
pub struct Generated {
    /// The graph to compare.
    pub which: Which,
    /// The model's source text (no `train` block: the loss graph only needs the
    /// model).
    pub text: String,
    /// Images per batch (1 to 3).
    pub batch: usize,
    /// Threads of the JIT executable (1 or 2).
    pub threads: usize,
    /// Label smoothing of the loss.
    pub smoothing: f64,
    /// Seeds the random inputs and parameters.
    pub seed: u64,
    /// The number of classes (the last layer's size).
    pub classes: u64,
}

/// A named value of the model and its per-image shape: `[C, H, W]` or `[N]`.
#[derive(Clone, Debug)]
struct Val {
    name: String,
    shape: Vec<u64>,
}

const MAX_CHANNELS: u64 = 16;
const MAX_BODY: usize = 12;

struct Builder<'c, 'a> {
    c: &'c mut Choices<'a>,
    vals: Vec<Val>,
    cur: usize,
    body: String,
    next_name: usize,
}

/// `floor((n + 2p - d(k-1) - 1)/s) + 1`, or `None` when the window does not fit.
fn window(n: u64, k: u64, s: u64, p: u64, d: u64) -> Option<u64> {
    let reach = d * (k - 1) + 1;
    (n + 2 * p >= reach).then(|| (n + 2 * p - reach) / s + 1)
}

/// `[a, b]`, or `a` when both are equal.
fn pair(a: u64, b: u64) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("[{a}, {b}]")
    }
}

fn divisors(n: u64) -> Vec<u64> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Builder<'_, '_> {
    fn fresh(&mut self) -> String {
        self.next_name += 1;
        format!("l{}", self.next_name)
    }

    /// Emits `line` as a layer producing `shape` and makes it the current value.
    fn emit(&mut self, name: String, line: String, shape: Vec<u64>) {
        let _ = writeln!(self.body, "  {line}");
        self.vals.push(Val { name, shape });
        self.cur = self.vals.len() - 1;
    }

    /// The input of a single-input layer: usually the current value, sometimes
    /// an earlier spatial one (a branch, written `from NAME`).
    fn source(&mut self) -> (usize, String) {
        if self.c.chance(15) {
            let spatial: Vec<usize> = (0..self.vals.len())
                .filter(|&i| self.vals[i].shape.len() == 3)
                .collect();
            let i = *self.c.pick(&spatial);
            if i != self.cur {
                return (i, format!(" from {}", self.vals[i].name));
            }
        }
        (self.cur, String::new())
    }

    fn frozen(&mut self) -> &'static str {
        if self.c.chance(8) {
            "frozen "
        } else {
            ""
        }
    }

    /// One body layer (or a few, for a residual branch).
    fn layer(&mut self) {
        match self.c.range(0, 15) {
            0..=2 => self.conv(),
            3 => self.depthwise(),
            4 => self.pointwise(),
            5 => self.batchnorm(),
            6 => self.groupnorm(),
            7 | 8 => self.activation(),
            9 | 10 => self.pool(),
            11 => self.dropout_or_detach(),
            12 | 13 => self.residual(),
            _ => self.concat(),
        }
    }

    fn conv(&mut self) {
        let (src, from) = self.source();
        let [ch, h, w] = self.vals[src].shape[..] else {
            unreachable!("a spatial source")
        };
        let out = self.c.range(1, 8);
        let kh = self.c.range(1, 3);
        let kw = if self.c.chance(25) {
            self.c.range(1, 3)
        } else {
            kh
        };
        let s = if self.c.chance(30) {
            self.c.range(2, 3)
        } else {
            1
        };
        let d = if self.c.chance(20) { 2 } else { 1 };
        let groups = *self.c.pick(&divisors(gcd(ch, out)));
        let bias = self.c.chance(70);
        // `same` when the reach is even in both dimensions and it fits;
        // explicit padding otherwise, raised until the window fits.
        let (mut ph, mut pw) = (d * (kh - 1) / 2, d * (kw - 1) / 2);
        let same = (d * (kh - 1)).is_multiple_of(2)
            && (d * (kw - 1)).is_multiple_of(2)
            && self.c.chance(30);
        if !same {
            ph = self.c.range(0, 2);
            pw = if self.c.chance(20) {
                self.c.range(0, 2)
            } else {
                ph
            };
        }
        while window(h, kh, s, ph, d).is_none() {
            ph += 1;
        }
        while window(w, kw, s, pw, d).is_none() {
            pw += 1;
        }
        let oh = window(h, kh, s, ph, d).expect("fits");
        let ow = window(w, kw, s, pw, d).expect("fits");
        let pad = if same && (ph, pw) == (d * (kh - 1) / 2, d * (kw - 1) / 2) {
            "same".to_string()
        } else {
            pair(ph, pw)
        };
        let name = self.fresh();
        let frozen = self.frozen();
        let line = format!(
            "{frozen}conv {name}({out}, kernel={}, stride={s}, pad={pad}, dilation={d}, groups={groups}, bias={bias}){from}",
            pair(kh, kw)
        );
        self.emit(name, line, vec![out, oh, ow]);
    }

    fn depthwise(&mut self) {
        let (src, from) = self.source();
        let [ch, h, w] = self.vals[src].shape[..] else {
            unreachable!("a spatial source")
        };
        let m = if ch * 2 <= MAX_CHANNELS && self.c.chance(30) {
            2
        } else {
            1
        };
        let k = self.c.range(1, 3);
        let s = if self.c.chance(30) { 2 } else { 1 };
        let d = if self.c.chance(15) { 2 } else { 1 };
        let mut p = d * (k - 1) / 2;
        // The default padding is `same`, which needs an even reach.
        let explicit = (d * (k - 1)) % 2 == 1 || self.c.chance(30);
        if explicit {
            p = self.c.range(0, 2);
        }
        while window(h, k, s, p, d).is_none() || window(w, k, s, p, d).is_none() {
            p += 1;
        }
        let pad = if explicit || p != d * (k - 1) / 2 {
            format!(", pad={p}")
        } else {
            String::new()
        };
        let oh = window(h, k, s, p, d).expect("fits");
        let ow = window(w, k, s, p, d).expect("fits");
        let bias = self.c.chance(50);
        let name = self.fresh();
        let line = format!(
            "depthwise {name}(kernel={k}, stride={s}{pad}, dilation={d}, multiplier={m}, bias={bias}){from}"
        );
        self.emit(name, line, vec![ch * m, oh, ow]);
    }

    fn pointwise(&mut self) {
        let (src, from) = self.source();
        let shape = self.vals[src].shape.clone();
        let out = self.c.range(1, 8);
        let bias = self.c.chance(50);
        let name = self.fresh();
        let frozen = self.frozen();
        let line = format!("{frozen}pointwise {name}({out}, bias={bias}){from}");
        self.emit(name, line, vec![out, shape[1], shape[2]]);
    }

    fn batchnorm(&mut self) {
        let (src, from) = self.source();
        let shape = self.vals[src].shape.clone();
        let args = if self.c.chance(20) {
            "(momentum=0.5, eps=0.001)"
        } else {
            ""
        };
        let name = self.fresh();
        let frozen = self.frozen();
        self.emit(
            name.clone(),
            format!("{frozen}batchnorm {name}{args}{from}"),
            shape,
        );
    }

    fn groupnorm(&mut self) {
        let (src, from) = self.source();
        let shape = self.vals[src].shape.clone();
        let g = *self.c.pick(&divisors(shape[0]));
        let name = self.fresh();
        self.emit(name.clone(), format!("groupnorm {name}({g}){from}"), shape);
    }

    fn activation_name(&mut self) -> &'static str {
        const ACTS: [&str; 6] = ["relu", "relu", "leaky_relu(0.2)", "sigmoid", "tanh", "gelu"];
        ACTS[usize::from(self.c.byte()) % ACTS.len()]
    }

    fn activation(&mut self) {
        let (src, from) = self.source();
        let shape = self.vals[src].shape.clone();
        let act = self.activation_name();
        let name = self.fresh();
        let line = match act.split_once('(') {
            Some((op, args)) => format!("{op} {name}({args}{from}"),
            None => format!("{act} {name}{from}"),
        };
        self.emit(name, line, shape);
    }

    fn pool(&mut self) {
        let (src, from) = self.source();
        let [ch, h, w] = self.vals[src].shape[..] else {
            unreachable!("a spatial source")
        };
        let op = if self.c.chance(50) {
            "avgpool"
        } else {
            "maxpool"
        };
        let kh = self.c.range(1, 3).min(h);
        let kw = if self.c.chance(20) {
            self.c.range(1, 3)
        } else {
            kh
        }
        .min(w);
        let s = self.c.range(1, 3);
        let ph = self.c.range(0, kh / 2);
        let pw = self.c.range(0, kw / 2);
        let oh = window(h, kh, s, ph, 1).expect("kernel <= height");
        let ow = window(w, kw, s, pw, 1).expect("kernel <= width");
        let name = self.fresh();
        let line = format!(
            "{op} {name}(kernel={}, stride={s}, pad={}){from}",
            pair(kh, kw),
            pair(ph, pw)
        );
        self.emit(name, line, vec![ch, oh, ow]);
    }

    fn dropout_or_detach(&mut self) {
        let (src, from) = self.source();
        let shape = self.vals[src].shape.clone();
        let name = self.fresh();
        let line = if self.c.chance(25) {
            format!("detach {name}{from}")
        } else {
            let p = self.c.pick(&["0.5", "0.1", "0.9", "0"]);
            format!("dropout {name}({p}){from}")
        };
        self.emit(name, line, shape);
    }

    /// `add` of the current value and an earlier value of its shape, or of a
    /// branch made for it: a conv of an earlier value with the same height and
    /// width, sometimes followed by an activation.
    fn residual(&mut self) {
        let shape = self.vals[self.cur].shape.clone();
        let same: Vec<usize> = (0..self.vals.len())
            .filter(|&i| i != self.cur && self.vals[i].shape == shape)
            .collect();
        let mut terms = vec![self.cur];
        if !same.is_empty() && self.c.chance(50) {
            terms.push(*self.c.pick(&same));
        } else {
            let hw: Vec<usize> = (0..self.vals.len())
                .filter(|&i| self.vals[i].shape.len() == 3 && self.vals[i].shape[1..] == shape[1..])
                .collect();
            let src = *self.c.pick(&hw);
            let k = *self.c.pick(&[1, 3]);
            let name = self.fresh();
            let line = format!(
                "conv {name}({}, kernel={k}, pad={}) from {}",
                shape[0],
                k / 2,
                self.vals[src].name
            );
            self.emit(name, line, shape.clone());
            if self.c.chance(40) {
                let act = self.activation_name();
                let name = self.fresh();
                let line = match act.split_once('(') {
                    Some((op, args)) => format!("{op} {name}({args}"),
                    None => format!("{act} {name}"),
                };
                self.emit(name, line, shape.clone());
            }
            terms.push(self.cur);
        }
        if self.c.chance(20) {
            terms.push(terms[0]);
        }
        let names: Vec<&str> = terms.iter().map(|&i| self.vals[i].name.as_str()).collect();
        let line_args = names.join(", ");
        let name = self.fresh();
        self.emit(name.clone(), format!("add {name}({line_args})"), shape);
    }

    /// `concat` of the current value and earlier values of its height and width,
    /// within the channel limit.
    fn concat(&mut self) {
        let shape = self.vals[self.cur].shape.clone();
        let mut channels = shape[0];
        let mut terms = vec![self.cur];
        for _ in 0..self.c.range(1, 2) {
            let fits: Vec<usize> = (0..self.vals.len())
                .filter(|&i| {
                    let v = &self.vals[i].shape;
                    v.len() == 3 && v[1..] == shape[1..] && channels + v[0] <= MAX_CHANNELS
                })
                .collect();
            if fits.is_empty() {
                break;
            }
            let i = *self.c.pick(&fits);
            channels += self.vals[i].shape[0];
            terms.push(i);
        }
        if terms.len() == 1 {
            return self.pointwise();
        }
        if self.c.chance(30) {
            terms.reverse();
        }
        let names: Vec<&str> = terms.iter().map(|&i| self.vals[i].name.as_str()).collect();
        let line_args = names.join(", ");
        let name = self.fresh();
        self.emit(
            name.clone(),
            format!("concat {name}({line_args})"),
            vec![channels, shape[1], shape[2]],
        );
    }

    /// `global_avg_pool` or `flatten`, an optional hidden layer, the classifier.
    fn head(&mut self) -> u64 {
        let shape = self.vals[self.cur].shape.clone();
        let n: u64 = shape.iter().product();
        let name = self.fresh();
        if n <= 256 && self.c.chance(40) {
            self.emit(name.clone(), format!("flatten {name}"), vec![n]);
        } else {
            self.emit(
                name.clone(),
                format!("global_avg_pool {name}"),
                vec![shape[0]],
            );
        }
        if self.c.chance(35) {
            let hidden = self.c.range(1, 16);
            let name = self.fresh();
            let bias = self.c.chance(70);
            let frozen = self.frozen();
            self.emit(
                name.clone(),
                format!("{frozen}linear {name}({hidden}, bias={bias})"),
                vec![hidden],
            );
            match self.c.range(0, 4) {
                0 => {}
                1 => {
                    let name = self.fresh();
                    self.emit(name.clone(), format!("batchnorm {name}"), vec![hidden]);
                }
                2 => {
                    let name = self.fresh();
                    self.emit(name.clone(), format!("dropout {name}(0.3)"), vec![hidden]);
                }
                _ => {
                    let act = self.activation_name();
                    let name = self.fresh();
                    let line = match act.split_once('(') {
                        Some((op, args)) => format!("{op} {name}({args}"),
                        None => format!("{act} {name}"),
                    };
                    self.emit(name, line, vec![hidden]);
                }
            }
        }
        let classes = self.c.range(2, 5);
        let bias = self.c.chance(80);
        let name = self.fresh();
        self.emit(
            name.clone(),
            format!("linear {name}({classes}, bias={bias})"),
            vec![classes],
        );
        classes
    }
}

/// The model the bytes `data` describe. Every choice is one the checker
/// accepts; a refused model is a disagreement between this generator's shape
/// arithmetic and the checker's (one of them is wrong).
pub fn model(data: &[u8]) -> Generated {
    let mut c = Choices::new(data);
    let which = match c.range(0, 9) {
        0..=5 => Which::Train,
        6 | 7 => Which::Eval,
        _ => Which::InputGrad,
    };
    let batch = c.range(1, 3) as usize;
    let threads = c.range(1, 2) as usize;
    let smoothing = *c.pick(&[0.0, 0.1]);
    let seed = u64::from(c.byte()) | u64::from(c.byte()) << 8;
    let (ch, h, w) = (c.range(1, 4), c.range(1, 12), c.range(1, 12));
    let mut b = Builder {
        c: &mut c,
        vals: vec![Val {
            name: "x".into(),
            shape: vec![ch, h, w],
        }],
        cur: 0,
        body: String::new(),
        next_name: 0,
    };
    let mut layers = 0;
    while !b.c.exhausted() && layers < MAX_BODY {
        b.layer();
        layers += 1;
    }
    let classes = b.head();
    let text = format!("model Fuzz {{\n  input x: [{ch}, {h}, {w}]\n{}}}\n", b.body);
    Generated {
        which,
        text,
        batch,
        threads,
        smoothing,
        seed,
        classes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_input_gives_the_plainest_model() {
        let g = model(&[]);
        assert_eq!(g.batch, 1);
        assert_eq!(g.threads, 1);
        assert_eq!(
            g.text,
            "model Fuzz {\n  input x: [1, 1, 1]\n  global_avg_pool l1\n  linear l2(2, bias=false)\n}\n"
        );
    }

    #[test]
    fn windows() {
        assert_eq!(window(5, 3, 1, 0, 1), Some(3));
        assert_eq!(window(5, 3, 2, 1, 1), Some(3));
        assert_eq!(window(2, 3, 1, 0, 1), None);
        assert_eq!(window(1, 3, 1, 1, 1), Some(1));
        assert_eq!(window(5, 3, 1, 0, 2), Some(1));
    }
}
