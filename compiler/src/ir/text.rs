//! The text form of a graph, for `cnnc dump --stage=graph|grad` and for pass tests
//! written as text. `parse(print(g))` rebuilds `g` up to value numbering, and
//! printing it again gives the same text.
//!
//! ```text
//! graph train
//!   input x: [64, 1, 28, 28]
//!   param c1.weight: [16, 1, 3, 3]
//!   %0: [64, 16, 28, 28] = conv2d(x, c1.weight) stride=1x1 pad=1x1 dilation=1x1 groups=1 @c1
//!   %1: [], %2: [64, 10] = softmax_xent(%0, labels) smoothing=0.0 @loss
//!   output loss = %1
//! ```
//!
//! Temporaries are numbered `%0, %1, …` in order of definition when printed.

use super::*;
use std::collections::HashMap;
use std::fmt::Write;

/// The graph as text.
pub fn print(g: &Graph) -> String {
    let mut names: HashMap<Vid, String> = HashMap::new();
    let mut out = String::new();
    let _ = writeln!(out, "graph {}", g.name);
    for (i, v) in g.values.iter().enumerate() {
        let kw = match v.role {
            Role::Input => "input",
            Role::Param => "param",
            Role::Buffer => "buffer",
            Role::Temp => continue,
        };
        names.insert(Vid(i), v.name.clone());
        let _ = writeln!(out, "  {kw} {}: {}", v.name, shape(&v.shape));
    }
    let mut next = 0;
    for n in &g.nodes {
        let outs: Vec<String> = n
            .outputs
            .iter()
            .map(|o| {
                let name = format!("%{next}");
                next += 1;
                names.insert(*o, name.clone());
                format!("{name}: {}", shape(g.shape(*o)))
            })
            .collect();
        let ins: Vec<String> = n.inputs.iter().map(|i| name_of(&names, g, *i)).collect();
        let mut line = format!(
            "  {} = {}({})",
            outs.join(", "),
            n.op.name(),
            ins.join(", ")
        );
        for (k, v) in attrs(&n.op) {
            let _ = write!(line, " {k}={v}");
        }
        if let Some(l) = &n.layer {
            let _ = write!(line, " @{l}");
        }
        let _ = writeln!(out, "{line}");
    }
    for (name, v) in &g.outputs {
        let _ = writeln!(out, "  output {name} = {}", name_of(&names, g, *v));
    }
    out
}

fn name_of(names: &HashMap<Vid, String>, g: &Graph, v: Vid) -> String {
    names
        .get(&v)
        .cloned()
        .unwrap_or_else(|| format!("?{}", g.values.get(v.0).map_or("", |x| &x.name)))
}

fn shape(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn pair(p: [usize; 2]) -> String {
    format!("{}x{}", p[0], p[1])
}

fn float(x: f64) -> String {
    format!("{x:?}")
}

fn act(a: &Act) -> String {
    match a {
        Act::Relu => "relu".into(),
        Act::LeakyRelu(s) => format!("leaky_relu({})", float(*s)),
        Act::Sigmoid => "sigmoid".into(),
        Act::Tanh => "tanh".into(),
        Act::Gelu => "gelu".into(),
    }
}

/// The attributes of an op as (key, value) text, in a fixed order.
fn attrs(op: &Op) -> Vec<(&'static str, String)> {
    let conv = |a: &ConvAttrs| {
        vec![
            ("stride", pair(a.stride)),
            ("pad", pair(a.pad)),
            ("dilation", pair(a.dilation)),
            ("groups", a.groups.to_string()),
        ]
    };
    let pool = |p: &PoolAttrs| {
        vec![
            ("kernel", pair(p.kernel)),
            ("stride", pair(p.stride)),
            ("pad", pair(p.pad)),
        ]
    };
    match op {
        Op::Conv2d(a) => conv(a),
        Op::Conv2dGradInput(a, hw) => {
            let mut v = conv(a);
            v.push(("input", pair(*hw)));
            v
        }
        Op::Conv2dGradWeight(a, k) => {
            let mut v = conv(a);
            v.push(("kernel", pair(*k)));
            v
        }
        Op::MatMul { ta, tb } => vec![("ta", ta.to_string()), ("tb", tb.to_string())],
        Op::BatchNorm { eps }
        | Op::BatchNormInfer { eps }
        | Op::BatchNormGrad { eps }
        | Op::BatchNormInferGrad { eps } => vec![("eps", float(*eps))],
        Op::RunningStats { momentum, n } => {
            vec![("momentum", float(*momentum)), ("n", n.to_string())]
        }
        Op::GroupNorm { groups, eps } | Op::GroupNormGrad { groups, eps } => {
            vec![("groups", groups.to_string()), ("eps", float(*eps))]
        }
        Op::Act(a) | Op::ActGrad(a) => vec![("f", act(a))],
        Op::MaxPool(p) | Op::MaxPoolGrad(p) | Op::AvgPool(p) => pool(p),
        Op::AvgPoolGrad(p, hw) => {
            let mut v = pool(p);
            v.push(("input", pair(*hw)));
            v
        }
        Op::GlobalAvgPoolGrad(hw) => vec![("input", pair(*hw))],
        Op::Reshape(s) => vec![("shape", shape(s))],
        Op::Slice { start, len } => vec![("start", start.to_string()), ("len", len.to_string())],
        Op::Dropout { p, salt } | Op::DropoutGrad { p, salt } => {
            vec![("p", float(*p)), ("salt", salt.to_string())]
        }
        Op::SoftmaxXent { smoothing } | Op::SoftmaxXentGrad { smoothing } => {
            vec![("smoothing", float(*smoothing))]
        }
        Op::OneHot { classes } => vec![("classes", classes.to_string())],
        Op::BiasAdd
        | Op::BiasGrad
        | Op::GlobalAvgPool
        | Op::Add
        | Op::Concat
        | Op::StopGradient
        | Op::CountCorrect => vec![],
    }
}

/// Parses the text form. Errors name the line.
pub fn parse(text: &str) -> Result<Graph, String> {
    let mut g = Graph::default();
    let mut names: HashMap<String, Vid> = HashMap::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |m: String| format!("line {}: {m}: `{line}`", n + 1);
        if let Some(rest) = line.strip_prefix("graph ") {
            g.name = rest.trim().to_string();
        } else if let Some((kw, rest)) = split_decl(line) {
            let (name, sh) = rest
                .split_once(':')
                .ok_or_else(|| err("expected `name: [shape]`".into()))?;
            let role = match kw {
                "input" => Role::Input,
                "param" => Role::Param,
                _ => Role::Buffer,
            };
            let name = name.trim();
            let v = g.add_value(name, parse_shape(sh).map_err(err)?, role);
            names.insert(name.to_string(), v);
        } else if let Some(rest) = line.strip_prefix("output ") {
            let (name, v) = rest
                .split_once('=')
                .ok_or_else(|| err("expected `output name = value`".into()))?;
            let v = *names
                .get(v.trim())
                .ok_or_else(|| err(format!("unknown value `{}`", v.trim())))?;
            g.outputs.push((name.trim().to_string(), v));
        } else {
            parse_node(&mut g, &mut names, line).map_err(err)?;
        }
    }
    Ok(g)
}

fn split_decl(line: &str) -> Option<(&str, &str)> {
    ["input ", "param ", "buffer "]
        .iter()
        .find_map(|kw| line.strip_prefix(kw).map(|r| (kw.trim(), r)))
}

fn parse_shape(s: &str) -> Result<Shape, String> {
    let s = s.trim();
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| format!("expected a shape, found `{s}`"))?;
    if inner.trim().is_empty() {
        return Ok(vec![]);
    }
    inner
        .split(',')
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .map_err(|_| format!("bad dimension `{d}`"))
        })
        .collect()
}

fn parse_node(g: &mut Graph, names: &mut HashMap<String, Vid>, line: &str) -> Result<(), String> {
    let (lhs, rhs) = line
        .split_once(" = ")
        .ok_or("expected `%a: [shape] = op(inputs) attrs`")?;
    let open = rhs.find('(').ok_or("expected `op(`")?;
    let close = rhs.find(')').ok_or("expected `)`")?;
    let op_name = rhs[..open].trim();
    let inputs: Vec<Vid> = rhs[open + 1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| names.get(s).copied().ok_or(format!("unknown value `{s}`")))
        .collect::<Result<_, _>>()?;
    let mut kv: HashMap<&str, &str> = HashMap::new();
    let mut layer = None;
    for tok in split_attrs(&rhs[close + 1..]) {
        if let Some(l) = tok.strip_prefix('@') {
            layer = Some(l.to_string());
        } else {
            let (k, v) = tok
                .split_once('=')
                .ok_or(format!("bad attribute `{tok}`"))?;
            kv.insert(k, v);
        }
    }
    let op = build_op(op_name, &kv)?;
    let outs: Vec<(&str, Shape)> = lhs
        .split("%")
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let s = s.trim().trim_end_matches(',').trim();
            let (n, sh) = s.split_once(':').ok_or(format!("bad output `{s}`"))?;
            Ok((n.trim(), parse_shape(sh)?))
        })
        .collect::<Result<_, String>>()?;
    let ins: Vec<&Shape> = inputs.iter().map(|v| g.shape(*v)).collect();
    let inferred = op.infer(&ins)?;
    if inferred.len() != outs.len() {
        return Err(format!(
            "{op_name} has {} outputs, {} written",
            inferred.len(),
            outs.len()
        ));
    }
    for ((n, s), inf) in outs.iter().zip(&inferred) {
        if s != inf {
            return Err(format!("%{n} is written {s:?} but {op_name} gives {inf:?}"));
        }
    }
    let vids = g.push(op, &inputs, layer.as_deref());
    for ((n, _), v) in outs.iter().zip(vids) {
        names.insert(format!("%{n}"), v);
    }
    Ok(())
}

/// Splits attributes on spaces, keeping `[a, b]` and `f(x)` together.
fn split_attrs(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = None;
    for (i, c) in s.char_indices() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            _ => {}
        }
        if c == ' ' && depth == 0 {
            if let Some(st) = start.take() {
                out.push(&s[st..i]);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(st) = start {
        out.push(&s[st..]);
    }
    out
}

fn build_op(name: &str, kv: &HashMap<&str, &str>) -> Result<Op, String> {
    let get = |k: &str| {
        kv.get(k)
            .copied()
            .ok_or(format!("{name}: missing attribute `{k}`"))
    };
    let usize_ = |k: &str| -> Result<usize, String> {
        get(k)?.parse().map_err(|_| format!("{name}: bad `{k}`"))
    };
    let f64_ = |k: &str| -> Result<f64, String> {
        get(k)?.parse().map_err(|_| format!("{name}: bad `{k}`"))
    };
    let bool_ = |k: &str| -> Result<bool, String> {
        get(k)?.parse().map_err(|_| format!("{name}: bad `{k}`"))
    };
    let pair_ = |k: &str| -> Result<[usize; 2], String> {
        let v = get(k)?;
        let (a, b) = v
            .split_once('x')
            .ok_or(format!("{name}: `{k}` must be AxB"))?;
        Ok([
            a.parse().map_err(|_| format!("{name}: bad `{k}`"))?,
            b.parse().map_err(|_| format!("{name}: bad `{k}`"))?,
        ])
    };
    let conv = || -> Result<ConvAttrs, String> {
        Ok(ConvAttrs {
            stride: pair_("stride")?,
            pad: pair_("pad")?,
            dilation: pair_("dilation")?,
            groups: usize_("groups")?,
        })
    };
    let pool = || -> Result<PoolAttrs, String> {
        Ok(PoolAttrs {
            kernel: pair_("kernel")?,
            stride: pair_("stride")?,
            pad: pair_("pad")?,
        })
    };
    let act_ = || -> Result<Act, String> {
        let f = get("f")?;
        Ok(match f {
            "relu" => Act::Relu,
            "sigmoid" => Act::Sigmoid,
            "tanh" => Act::Tanh,
            "gelu" => Act::Gelu,
            _ => {
                let s = f
                    .strip_prefix("leaky_relu(")
                    .and_then(|s| s.strip_suffix(')'))
                    .ok_or(format!("{name}: unknown activation `{f}`"))?;
                Act::LeakyRelu(s.parse().map_err(|_| format!("{name}: bad slope"))?)
            }
        })
    };
    Ok(match name {
        "conv2d" => Op::Conv2d(conv()?),
        "conv2d_grad_input" => Op::Conv2dGradInput(conv()?, pair_("input")?),
        "conv2d_grad_weight" => Op::Conv2dGradWeight(conv()?, pair_("kernel")?),
        "bias_add" => Op::BiasAdd,
        "bias_grad" => Op::BiasGrad,
        "matmul" => Op::MatMul {
            ta: bool_("ta")?,
            tb: bool_("tb")?,
        },
        "batchnorm" => Op::BatchNorm { eps: f64_("eps")? },
        "batchnorm_infer" => Op::BatchNormInfer { eps: f64_("eps")? },
        "batchnorm_grad" => Op::BatchNormGrad { eps: f64_("eps")? },
        "batchnorm_infer_grad" => Op::BatchNormInferGrad { eps: f64_("eps")? },
        "running_stats" => Op::RunningStats {
            momentum: f64_("momentum")?,
            n: usize_("n")?,
        },
        "groupnorm" => Op::GroupNorm {
            groups: usize_("groups")?,
            eps: f64_("eps")?,
        },
        "groupnorm_grad" => Op::GroupNormGrad {
            groups: usize_("groups")?,
            eps: f64_("eps")?,
        },
        "act" => Op::Act(act_()?),
        "act_grad" => Op::ActGrad(act_()?),
        "maxpool" => Op::MaxPool(pool()?),
        "maxpool_grad" => Op::MaxPoolGrad(pool()?),
        "avgpool" => Op::AvgPool(pool()?),
        "avgpool_grad" => Op::AvgPoolGrad(pool()?, pair_("input")?),
        "global_avg_pool" => Op::GlobalAvgPool,
        "global_avg_pool_grad" => Op::GlobalAvgPoolGrad(pair_("input")?),
        "reshape" => Op::Reshape(parse_shape(get("shape")?)?),
        "add" => Op::Add,
        "concat" => Op::Concat,
        "slice" => Op::Slice {
            start: usize_("start")?,
            len: usize_("len")?,
        },
        "dropout" => Op::Dropout {
            p: f64_("p")?,
            salt: get("salt")?.parse().map_err(|_| "dropout: bad `salt`")?,
        },
        "dropout_grad" => Op::DropoutGrad {
            p: f64_("p")?,
            salt: get("salt")?
                .parse()
                .map_err(|_| "dropout_grad: bad `salt`")?,
        },
        "stop_gradient" => Op::StopGradient,
        "softmax_xent" => Op::SoftmaxXent {
            smoothing: f64_("smoothing")?,
        },
        "softmax_xent_grad" => Op::SoftmaxXentGrad {
            smoothing: f64_("smoothing")?,
        },
        "count_correct" => Op::CountCorrect,
        "one_hot" => Op::OneHot {
            classes: usize_("classes")?,
        },
        other => return Err(format!("unknown op `{other}`")),
    })
}
