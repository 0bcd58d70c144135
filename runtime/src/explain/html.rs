//! The explanation report: one self-contained HTML page (inline CSS, no script, no
//! server) that shows every method's grid and per-sample cards, and the evaluation
//! table.
//!
//! The page only refers to files by relative paths, so the output folder can be
//! moved or opened straight from disk. Every text that comes from the user (model,
//! class and method names, descriptions, table cells) is HTML-escaped, and every
//! path is percent-encoded as a URL and then escaped.

use std::fmt::Write as _;

use super::render::colormap;

/// The whole page.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The model's name (the `<title>` and the heading).
    pub title: String,
    /// One line under the title, e.g. "weights: …, inference mode (batchnorm uses
    /// running statistics, dropout off)".
    pub subtitle: String,
    /// Class names by index; a class without a name is shown as "class N".
    pub class_names: Vec<String>,
    /// One section per method, in this order.
    pub methods: Vec<MethodSection>,
    /// The evaluation table, shown before the methods when present.
    pub evaluation: Option<Table>,
}

/// A generic table of pre-formatted cells: one row per method, one column per
/// metric. Cells that read as numbers are right-aligned; a row shorter than the
/// header is padded with empty cells.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    /// Column headers, the first one over the row labels (e.g. "method").
    pub columns: Vec<String>,
    /// Rows of cells, the first cell of each being its label (e.g. "gradcam").
    pub rows: Vec<Vec<String>>,
    /// Lines shown under the table (what each metric means, how many samples).
    pub notes: Vec<String>,
}

/// One explanation method's results.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodSection {
    /// The method's output folder name, e.g. "cam"; the section heading.
    pub name: String,
    /// One line, e.g. "CAM of layer `features`, class = label".
    pub description: String,
    /// Relative path of the method's grid picture.
    pub grid: String,
    /// One card per explained sample.
    pub samples: Vec<SampleRow>,
}

/// One explained sample of one method.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    /// Index of the sample in its data split.
    pub index: usize,
    /// Relative paths of the pictures and of the raw map.
    pub input_png: String,
    pub overlay_png: String,
    pub heat_png: String,
    pub npy: String,
    /// The sample's ground-truth mask, when the data set has one.
    pub mask_png: Option<String>,
    /// The true class.
    pub label: usize,
    /// The model's top class and its softmax probability.
    pub predicted: usize,
    pub probability: f32,
    /// The class whose score was explained, and that score.
    pub explained_class: usize,
    pub explained_score: f32,
    /// The map was constant (e.g. all zero) or not finite: there is nothing to show.
    pub degenerate: bool,
}

/// The text of the badge shown on a card whose map is degenerate.
pub const DEGENERATE_BADGE: &str = "degenerate map (constant, e.g. all zero)";

/// Renders the page as a complete HTML document.
pub fn index_html(page: &Page) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let title = esc(&page.title);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(out, "<title>{title} — explanations</title>");
    let _ = writeln!(out, "<style>\n{}</style>\n</head>\n<body>\n<main>", css());

    out.push_str("<header class=\"top\">\n");
    let _ = writeln!(out, "<h1>{title}</h1>");
    if !page.subtitle.is_empty() {
        let _ = writeln!(out, "<p class=\"subtitle\">{}</p>", esc(&page.subtitle));
    }
    out.push_str(&legend());
    if !page.methods.is_empty() {
        out.push_str("<nav>methods:");
        for (i, m) in page.methods.iter().enumerate() {
            let _ = write!(
                out,
                " <a href=\"#{}\">{}</a>",
                section_id(i, &m.name),
                esc(&m.name)
            );
        }
        out.push_str("</nav>\n");
    }
    out.push_str("</header>\n");

    if let Some(table) = &page.evaluation {
        out.push_str(&evaluation(table));
    }
    for (i, method) in page.methods.iter().enumerate() {
        out.push_str(&method_section(i, method, &page.class_names));
    }
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

fn evaluation(table: &Table) -> String {
    let mut out = String::from("<section class=\"evaluation\">\n<h2>Evaluation</h2>\n");
    out.push_str("<div class=\"scroll\"><table>\n<thead><tr>");
    for c in &table.columns {
        let _ = write!(out, "<th>{}</th>", esc(c));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    let width = table
        .columns
        .len()
        .max(table.rows.iter().map(Vec::len).max().unwrap_or(0));
    for row in &table.rows {
        out.push_str("<tr>");
        for k in 0..width {
            let cell = row.get(k).map_or("", String::as_str);
            if k == 0 {
                let _ = write!(out, "<th scope=\"row\">{}</th>", esc(cell));
            } else if looks_numeric(cell) {
                let _ = write!(out, "<td class=\"num\">{}</td>", esc(cell));
            } else {
                let _ = write!(out, "<td>{}</td>", esc(cell));
            }
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table></div>\n");
    if !table.notes.is_empty() {
        out.push_str("<ul class=\"notes\">\n");
        for n in &table.notes {
            let _ = writeln!(out, "<li>{}</li>", esc(n));
        }
        out.push_str("</ul>\n");
    }
    out.push_str("</section>\n");
    out
}

fn method_section(i: usize, m: &MethodSection, classes: &[String]) -> String {
    let mut out = String::new();
    let name = esc(&m.name);
    let _ = writeln!(
        out,
        "<section class=\"method\" id=\"{}\">\n<h2>{name}</h2>",
        section_id(i, &m.name)
    );
    if !m.description.is_empty() {
        let _ = writeln!(out, "<p class=\"description\">{}</p>", esc(&m.description));
    }
    let degenerate = m.samples.iter().filter(|s| s.degenerate).count();
    let _ = write!(out, "<p class=\"count\">{} samples", m.samples.len());
    if degenerate > 0 {
        let _ = write!(out, ", {degenerate} with a degenerate map");
    }
    out.push_str("</p>\n");
    let grid = url(&m.grid);
    let _ = writeln!(
        out,
        "<a href=\"{grid}\"><img class=\"grid\" src=\"{grid}\" alt=\"{name}: grid of all samples\"></a>"
    );
    out.push_str("<div class=\"cards\">\n");
    for s in &m.samples {
        out.push_str(&card(s, classes));
    }
    out.push_str("</div>\n</section>\n");
    out
}

fn card(s: &SampleRow, classes: &[String]) -> String {
    let mut out = String::new();
    let class = if s.degenerate {
        "card degenerate"
    } else {
        "card"
    };
    let _ = writeln!(out, "<article class=\"{class}\">");
    let (mark, verdict) = if s.predicted == s.label {
        ("✓", "right")
    } else {
        ("✗", "wrong")
    };
    let _ = writeln!(
        out,
        "<h3>#{} <span class=\"{verdict}\" title=\"prediction {verdict}\">{mark}</span></h3>",
        s.index
    );
    out.push_str("<div class=\"views\">\n");
    out.push_str(&view(&s.input_png, "input", true, s.index));
    out.push_str(&view(&s.overlay_png, "overlay", false, s.index));
    out.push_str(&view(&s.heat_png, "heat map", false, s.index));
    if let Some(mask) = &s.mask_png {
        out.push_str(&view(mask, "mask", true, s.index));
    }
    out.push_str("</div>\n");
    if s.degenerate {
        let _ = writeln!(
            out,
            "<p><span class=\"badge\">{DEGENERATE_BADGE}</span></p>"
        );
    }
    out.push_str("<dl>\n");
    let _ = writeln!(
        out,
        "<dt>label</dt><dd>{}</dd>",
        class_name(classes, s.label)
    );
    let _ = writeln!(
        out,
        "<dt>predicted</dt><dd class=\"{verdict}\">{} <span class=\"dim\">{}</span></dd>",
        class_name(classes, s.predicted),
        percent(s.probability)
    );
    let _ = writeln!(
        out,
        "<dt>explained</dt><dd>{} <span class=\"dim\">score {}</span></dd>",
        class_name(classes, s.explained_class),
        number(s.explained_score)
    );
    out.push_str("</dl>\n");
    let _ = writeln!(
        out,
        "<p class=\"raw\"><a href=\"{}\" download>raw map (.npy)</a></p>",
        url(&s.npy)
    );
    out.push_str("</article>\n");
    out
}

/// One picture of a card, linked to itself at full size. Inputs and masks are
/// drawn with crisp pixels; the smooth heat pictures are not.
fn view(path: &str, caption: &str, pixelated: bool, index: usize) -> String {
    let href = url(path);
    let class = if pixelated { "view pixel" } else { "view" };
    format!(
        "<figure><a href=\"{href}\"><img class=\"{class}\" src=\"{href}\" alt=\"{caption} of sample {index}\" loading=\"lazy\"></a><figcaption>{caption}</figcaption></figure>\n"
    )
}

/// A class's name (escaped) and index, or "class N" when it has no name.
fn class_name(classes: &[String], i: usize) -> String {
    match classes.get(i) {
        Some(name) if !name.is_empty() => {
            format!("{} <span class=\"dim\">({i})</span>", esc(name))
        }
        _ => format!("class {i}"),
    }
}

fn percent(p: f32) -> String {
    if p.is_finite() {
        format!("{:.1}%", 100.0 * p)
    } else {
        "n/a".to_string()
    }
}

fn number(v: f32) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "n/a".to_string()
    } else if a == 0.0 || (1e-3..1e5).contains(&a) {
        format!("{v:.3}")
    } else {
        format!("{v:.3e}")
    }
}

fn looks_numeric(cell: &str) -> bool {
    let t = cell.trim().trim_end_matches('%');
    !t.is_empty() && t.parse::<f64>().is_ok()
}

/// The legend: the colormap as a CSS gradient, so the page needs no extra file.
fn legend() -> String {
    let stops: Vec<String> = (0..=16)
        .map(|k| {
            let t = k as f32 / 16.0;
            let [r, g, b] = colormap(t);
            format!("rgb({r},{g},{b}) {:.2}%", 100.0 * t)
        })
        .collect();
    format!(
        "<div class=\"legend\"><span>low</span><span class=\"bar\" style=\"background: linear-gradient(to right, {})\"></span><span>high</span><span class=\"dim\">heat maps: inferno colour scale, each map scaled to its own minimum and maximum</span></div>\n",
        stops.join(", ")
    )
}

/// A unique HTML id for a method section: its position and its name reduced to
/// letters, digits, `-` and `_`.
fn section_id(i: usize, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("m{i}-{clean}")
}

/// Escapes text for HTML content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A relative file path as a URL for `href`/`src`: `\` becomes `/`, and every byte
/// other than letters, digits, `-._~/` is percent-encoded (so a space, `#`, `?`,
/// `%` or a non-ASCII name still points at the file). The result needs no further
/// HTML escaping.
fn url(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.replace('\\', "/").bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn css() -> &'static str {
    r#"body { margin: 0; background: #f6f6f4; color: #1f2328; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 1.5rem 1.25rem 3rem; }
h1 { margin: 0 0 .25rem; font-size: 1.6rem; }
h2 { margin: 2rem 0 .4rem; font-size: 1.25rem; border-bottom: 1px solid #d8d8d4; padding-bottom: .2rem; }
h3 { margin: 0 0 .4rem; font-size: .95rem; }
.subtitle { margin: 0 0 .6rem; color: #57606a; }
.dim { color: #6e7781; font-weight: normal; }
nav a { margin-right: .5rem; }
a { color: #0b62c4; }
.legend { display: flex; align-items: center; gap: .5rem; margin: .5rem 0; font-size: .85rem; flex-wrap: wrap; }
.legend .bar { display: inline-block; width: 220px; height: 12px; border-radius: 2px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; background: #fff; font-size: .9rem; }
th, td { padding: .3rem .7rem; border-bottom: 1px solid #e3e3df; text-align: left; }
thead th { background: #eeeeea; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.notes { color: #57606a; font-size: .85rem; }
.description { margin: .2rem 0; }
.count { margin: .2rem 0 .6rem; color: #57606a; font-size: .85rem; }
img.grid { display: block; max-width: 100%; height: auto; margin: .4rem 0 1rem; border: 1px solid #d8d8d4; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; }
.card { background: #fff; border: 1px solid #d8d8d4; border-radius: 8px; padding: .6rem .7rem; }
.card.degenerate { border-color: #d4a72c; background: #fffbea; }
.views { display: flex; gap: .4rem; }
figure { margin: 0; text-align: center; }
figcaption { font-size: .75rem; color: #6e7781; }
img.view { display: block; width: 128px; height: auto; background: #eee; }
img.pixel { image-rendering: pixelated; }
.badge { display: inline-block; padding: .05rem .45rem; border-radius: 4px; background: #fff1c2; border: 1px solid #d4a72c; color: #7a4e00; font-size: .8rem; font-weight: 600; }
.card p { margin: .4rem 0 0; }
dl { display: grid; grid-template-columns: auto 1fr; gap: 0 .6rem; margin: .4rem 0 0; font-size: .85rem; }
dt { color: #6e7781; }
dd { margin: 0; }
.right { color: #1a7f37; }
.wrong { color: #cf222e; }
.raw { font-size: .8rem; }
"#
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(index: usize, degenerate: bool) -> SampleRow {
        SampleRow {
            index,
            input_png: format!("cam/{index:04}_input.png"),
            overlay_png: format!("cam/{index:04}_overlay.png"),
            heat_png: format!("cam/{index:04}_heat.png"),
            npy: format!("cam/{index:04}.npy"),
            mask_png: (index != 7).then(|| format!("cam/{index:04}_mask.png")),
            label: 1,
            predicted: if index == 7 { 0 } else { 1 },
            probability: 0.931,
            explained_class: 1,
            explained_score: 4.21,
            degenerate,
        }
    }

    fn page() -> Page {
        Page {
            title: "tiny <net> & co".into(),
            subtitle: "weights: run/best.safetensors, inference mode".into(),
            class_names: vec!["<script>alert(1)</script>".into(), "cat \"big\"".into()],
            methods: vec![
                MethodSection {
                    name: "cam".into(),
                    description: "CAM of layer `features`, class = label".into(),
                    grid: "cam/grid.png".into(),
                    samples: vec![sample(4, false), sample(7, false)],
                },
                MethodSection {
                    name: "grad cam".into(),
                    description: "Grad-CAM <of> layer".into(),
                    grid: "grad cam/grid #1.png".into(),
                    samples: vec![sample(12, true)],
                },
            ],
            evaluation: Some(Table {
                columns: vec![
                    "method".into(),
                    "pointing game".into(),
                    "deletion AUC".into(),
                ],
                rows: vec![
                    vec!["cam".into(), "0.812".into(), "0.143".into()],
                    vec!["grad cam".into(), "n/a".into()],
                ],
                notes: vec!["lower deletion AUC is better".into()],
            }),
        }
    }

    /// Checks that the document's tags nest: every non-void element is closed, in
    /// order. Returns the names of the elements seen.
    fn check_balanced(html: &str) -> Vec<String> {
        const VOID: &[&str] = &["meta", "img", "br", "link", "hr", "input"];
        let mut stack: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        let mut rest = html;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("unclosed tag") + start;
            let tag = &rest[start + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('!') {
                continue;
            }
            let closing = tag.starts_with('/');
            let name: String = tag
                .trim_start_matches('/')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            assert!(!name.is_empty(), "a bare `<` in the text: <{tag}>");
            if closing {
                let open = stack.pop();
                assert_eq!(
                    open.as_deref(),
                    Some(name.as_str()),
                    "</{name}> closes {open:?}"
                );
            } else if !VOID.contains(&name.as_str()) {
                seen.push(name.clone());
                stack.push(name);
            }
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        seen
    }

    #[test]
    fn the_document_is_well_formed() {
        let html = index_html(&page());
        assert!(
            html.starts_with("<!DOCTYPE html>\n<html"),
            "{}",
            &html[..40]
        );
        assert!(html.trim_end().ends_with("</html>"));
        let seen = check_balanced(&html);
        for tag in [
            "html", "head", "body", "main", "section", "table", "article",
        ] {
            assert!(seen.iter().any(|t| t == tag), "no <{tag}>");
        }
        assert_eq!(seen.iter().filter(|t| *t == "article").count(), 3);
        assert!(!html.contains("<script"));
    }

    #[test]
    fn user_text_is_escaped() {
        let html = index_html(&page());
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("cat &quot;big&quot;"));
        assert!(html.contains("<h1>tiny &lt;net&gt; &amp; co</h1>"));
        assert!(html.contains("Grad-CAM &lt;of&gt; layer"));
        assert!(!html.contains("<net>") && !html.contains("<of>"));
        assert_eq!(esc("a'b\"c<d>&"), "a&#39;b&quot;c&lt;d&gt;&amp;");
    }

    #[test]
    fn every_file_is_linked_by_a_relative_url() {
        let p = page();
        let html = index_html(&p);
        for m in &p.methods {
            assert!(
                html.contains(&format!("src=\"{}\"", url(&m.grid))),
                "{}",
                m.grid
            );
            for s in &m.samples {
                let mut paths = vec![&s.input_png, &s.overlay_png, &s.heat_png];
                paths.extend(&s.mask_png);
                for path in paths {
                    assert!(html.contains(&format!("src=\"{}\"", url(path))), "{path}");
                }
                assert!(html.contains(&format!("href=\"{}\"", url(&s.npy))));
            }
        }
        // A space and a `#` are percent-encoded, so the link still names the file.
        assert!(html.contains("src=\"grad%20cam/grid%20%231.png\""));
        assert_eq!(url("a b\\ü?.png"), "a%20b/%C3%BC%3F.png");
        // Inputs and masks keep crisp pixels; overlays do not.
        assert!(html.contains("class=\"view pixel\" src=\"cam/0004_input.png\""));
        assert!(html.contains("class=\"view pixel\" src=\"cam/0004_mask.png\""));
        assert!(html.contains("class=\"view\" src=\"cam/0004_overlay.png\""));
        assert!(html.contains("image-rendering: pixelated"));
        assert!(!html.contains("0007_mask"));
    }

    #[test]
    fn the_degenerate_badge_marks_only_degenerate_maps() {
        let mut p = page();
        let html = index_html(&p);
        assert_eq!(html.matches(DEGENERATE_BADGE).count(), 1);
        let card = &html[html.find("<h3>#12").unwrap()..];
        assert!(card[..card.find("</article>").unwrap()].contains(DEGENERATE_BADGE));
        assert!(html.contains("1 samples, 1 with a degenerate map"));
        p.methods[1].samples[0].degenerate = false;
        let html = index_html(&p);
        assert!(!html.contains(DEGENERATE_BADGE));
        assert!(!html.contains("degenerate map"));
    }

    #[test]
    fn cards_show_classes_probability_and_score() {
        let html = index_html(&page());
        let card = &html[html.find("<h3>#7").unwrap()..];
        let card = &card[..card.find("</article>").unwrap()];
        assert!(card.contains("title=\"prediction wrong\""), "{card}");
        assert!(card
            .contains("<dt>label</dt><dd>cat &quot;big&quot; <span class=\"dim\">(1)</span></dd>"));
        assert!(card.contains("&lt;script&gt;alert(1)&lt;/script&gt; <span class=\"dim\">(0)</span> <span class=\"dim\">93.1%</span>"));
        assert!(card.contains("score 4.210"));
        // A class index past the names: shown by number.
        let mut p = page();
        p.methods[0].samples[0].explained_class = 9;
        assert!(index_html(&p).contains("<dd>class 9 <span class=\"dim\">score 4.210</span>"));
        assert_eq!(number(1.5e-6), "1.500e-6");
        assert_eq!(number(f32::NAN), "n/a");
        assert_eq!(percent(f32::INFINITY), "n/a");
    }

    #[test]
    fn the_evaluation_table_pads_rows_and_aligns_numbers() {
        let html = index_html(&page());
        assert!(html.contains("<th>pointing game</th>"));
        assert!(html.contains("<tr><th scope=\"row\">cam</th><td class=\"num\">0.812</td><td class=\"num\">0.143</td></tr>"));
        assert!(html.contains("<tr><th scope=\"row\">grad cam</th><td>n/a</td><td></td></tr>"));
        assert!(html.contains("<li>lower deletion AUC is better</li>"));
        let mut p = page();
        p.evaluation = None;
        assert!(!index_html(&p).contains("Evaluation"));
    }

    #[test]
    fn section_ids_are_unique_and_safe() {
        assert_eq!(section_id(0, "grad cam"), "m0-grad-cam");
        assert_eq!(section_id(3, "a\"<b"), "m3-a--b");
        let html = index_html(&page());
        assert!(html.contains("<a href=\"#m1-grad-cam\">grad cam</a>"));
        assert!(html.contains("id=\"m1-grad-cam\""));
    }

    /// Writes the page with pictures made by `render` to `CNNC_EXPLAIN_PREVIEW` (a
    /// folder) when set, to look at in a browser.
    #[test]
    fn preview_page() {
        use super::super::render;
        let Some(dir) = std::env::var_os("CNNC_EXPLAIN_PREVIEW") else {
            return;
        };
        let dir = std::path::Path::new(&dir);
        let (h, w) = (32, 32);
        let scale = render::display_scale(h, w);
        let mut p = page();
        p.methods.truncate(1);
        p.methods[0].samples = (0..6).map(|i| sample(i, i == 5)).collect();
        std::fs::create_dir_all(dir.join("cam")).unwrap();
        let mut tiles = Vec::new();
        for s in &p.methods[0].samples {
            let input: Vec<f32> = (0..3 * h * w)
                .map(|i| ((i % w) as f32 * 0.2 + (i / (h * w)) as f32).sin())
                .collect();
            let (cy, cx) = (8.0 + 3.0 * s.index as f32, 24.0 - 2.0 * s.index as f32);
            let raw: Vec<f32> = if s.degenerate {
                vec![0.0; h * w]
            } else {
                (0..h * w)
                    .map(|i| {
                        let (y, x) = ((i / w) as f32, (i % w) as f32);
                        (-((y - cy).powi(2) + (x - cx).powi(2)) / 40.0).exp()
                    })
                    .collect()
            };
            let map = render::normalize01(&raw);
            let over = render::overlay(
                &input,
                3,
                h,
                w,
                map.as_deref(),
                scale,
                render::DEFAULT_ALPHA,
            );
            let heat = render::heat(map.as_deref().unwrap_or(&raw), h, w, scale);
            let mask: Vec<f32> = raw.iter().map(|&v| f32::from(u8::from(v > 0.5))).collect();
            render::save_png(
                &dir.join(&s.input_png),
                &render::display_image(&input, 3, h, w),
            )
            .unwrap();
            render::save_png(&dir.join(&s.overlay_png), &over).unwrap();
            render::save_png(&dir.join(&s.heat_png), &heat).unwrap();
            if let Some(m) = &s.mask_png {
                render::save_png(&dir.join(m), &render::display_image(&mask, 1, h, w)).unwrap();
            }
            render::save_map_npy(&dir.join(&s.npy), &raw, h, w).unwrap();
            tiles.push(over);
        }
        render::save_png(&dir.join("cam/grid.png"), &render::grid(&tiles, 6, 4)).unwrap();
        std::fs::write(dir.join("index.html"), index_html(&p)).unwrap();
    }
}
