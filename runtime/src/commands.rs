//! What each `cnnc` subcommand does. Every function returns the process exit code
//! (see [`exit`]); nothing here panics on user input: unreadable or wrong files
//! become diagnostics, and stdout closing early (`cnnc … | head`) is not an error.

use crate::cli::{
    BenchArgs, CheckArgs, Cli, Color, Command, DumpArgs, EvalArgs, ExplainArgs, ExplainCodeArgs,
    MessageFormat, RunArgs, Stage,
};
use crate::{codes, render};
use cnnc_compiler::diag::{Diag, DiagKind};
use cnnc_compiler::pipeline::{self, FileResult, Frontend};
use std::io::{IsTerminal, Write};

/// Exit codes, the same for every subcommand (also listed in `cnnc --help`).
pub mod exit {
    /// Success; warnings may have been printed.
    pub const OK: i32 = 0;
    /// The user's input is wrong; diagnostics were printed.
    pub const USER: i32 = 1;
    /// Usage error (clap uses this code for bad arguments too).
    pub const USAGE: i32 = 2;
    /// A bug in cnnc.
    pub const INTERNAL: i32 = 3;
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> i32 {
    let color = use_color(cli.color);
    match cli.command {
        Command::Check(args) => check(&args, color),
        Command::Run(args) => run_cmd(&args, color),
        Command::Eval(args) => eval_cmd(&args, color),
        Command::Explain(args) => explain_cmd(&args, color),
        Command::Bench(args) => bench_cmd(&args, color),
        Command::Dump(args) => dump(&args, color),
        Command::ExplainCode(args) => explain_code(&args),
    }
}

fn check(args: &CheckArgs, color: bool) -> i32 {
    let fe = pipeline::check_paths(&args.files);
    match args.message_format {
        MessageFormat::Json => print_out(&render::json(&fe)),
        MessageFormat::Human => {
            print_err(&render::human(&fe, stderr_width(), color));
            let checked: Vec<&FileResult> =
                fe.files.iter().filter(|f| f.checked.is_some()).collect();
            let many = fe.files.len() > 1;
            for (i, file) in checked.iter().enumerate() {
                let Some(c) = &file.checked else { continue };
                let table = cnnc_compiler::summary::render(c);
                let mut text = String::new();
                if i > 0 {
                    text.push('\n');
                }
                if many {
                    text.push_str(&format!("{}:\n", file.name));
                }
                text.push_str(&table);
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                print_out(&text);
            }
        }
    }
    if fe.has_errors() {
        exit::USER
    } else {
        exit::OK
    }
}

/// Checks one file for `run`/`eval`: prints its diagnostics, and returns what was
/// checked (which has a model), or the exit code to stop with.
fn checked_model(
    file: &std::path::Path,
    color: bool,
) -> Result<cnnc_compiler::checked::CheckedFile, i32> {
    let fe = pipeline::check_paths(&[file.to_path_buf()]);
    print_err(&render::human(&fe, stderr_width(), color));
    if fe.has_errors() {
        return Err(exit::USER);
    }
    let Some(checked) = fe.files.into_iter().next().and_then(|f| f.checked) else {
        return Err(internal_error(
            "the check stage gave no result and no error",
        ));
    };
    match checked.model {
        Some(_) => Ok(checked),
        None => {
            print_err(&format!("error: `{}` has no model\n", file.display()));
            Err(exit::USER)
        }
    }
}

fn run_cmd(args: &RunArgs, color: bool) -> i32 {
    let checked = match checked_model(&args.file, color) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (Some(model), train) = (&checked.model, checked.train.as_ref()) else {
        return internal_error("checked_model returned no model");
    };
    let opts = crate::train::RunOptions {
        out: args.out.clone(),
        overwrite: args.overwrite,
        epochs: args.epochs,
        engine: args.engine.engine(),
        init: args.init.clone(),
        resume: args.resume,
        explain: checked.explain.clone(),
    };
    match crate::train::run(&args.file, model, train, &opts) {
        Ok(s) => {
            print_out(&format!(
                "done: test accuracy {:.2}%, test loss {:.4}; weights in {}\n",
                100.0 * s.test_accuracy,
                s.test_loss,
                s.out.join("checkpoints/final.safetensors").display()
            ));
            exit::OK
        }
        Err(e) => run_error(e),
    }
}

fn run_error(e: crate::train::RunError) -> i32 {
    match e {
        crate::train::RunError::Backend { message } => {
            internal_error(&format!("in the backend: {message}"))
        }
        e => {
            print_err(&format!("error: {e}\n"));
            exit::USER
        }
    }
}

fn eval_cmd(args: &EvalArgs, color: bool) -> i32 {
    let checked = match checked_model(&args.file, color) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(model) = &checked.model else {
        return internal_error("checked_model returned no model");
    };
    match crate::train::eval(
        &args.file,
        model,
        checked.train.as_ref(),
        &args.weights,
        args.data.as_deref(),
        args.engine.engine(),
        args.logits.as_deref(),
    ) {
        Ok((loss, acc, n)) => {
            if args.json {
                print_out(&format!(
                    "{}\n",
                    serde_json::json!({"accuracy": acc, "loss": loss, "n": n})
                ));
            } else {
                print_out(&format!(
                    "accuracy {:.2}% ({n} images), loss {loss:.4}\n",
                    100.0 * acc
                ));
            }
            exit::OK
        }
        Err(e) => run_error(e),
    }
}

fn explain_cmd(args: &ExplainArgs, color: bool) -> i32 {
    let checked = match checked_model(&args.file, color) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(model) = &checked.model else {
        return internal_error("checked_model returned no model");
    };
    if checked.explain.is_empty() {
        print_err(&format!(
            "error: `{}` has no `explain` section, so there is nothing to explain\n",
            args.file.display()
        ));
        return exit::USER;
    }
    let opts = crate::explain::SavedOptions {
        weights: &args.weights,
        out: args.out.as_deref(),
        overwrite: args.overwrite,
        engine: args.engine.engine(),
        evaluate: !args.no_evaluation,
    };
    match crate::explain::explain_saved(
        &args.file,
        model,
        checked.train.as_ref(),
        &checked.explain,
        &opts,
    ) {
        Ok(summary) => {
            crate::explain::report(&summary);
            exit::OK
        }
        Err(e) => run_error(e),
    }
}

fn bench_cmd(args: &BenchArgs, color: bool) -> i32 {
    let checked = match checked_model(&args.file, color) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(model) = &checked.model else {
        return internal_error("checked_model returned no model");
    };
    let opts = crate::bench::BenchOptions {
        steps: usize::try_from(args.steps).unwrap_or(usize::MAX),
        warmup: usize::try_from(args.warmup).unwrap_or(usize::MAX),
        engine: args.engine.engine(),
        explain: args.explain,
    };
    match crate::bench::run(model, checked.train.as_ref(), &opts) {
        Ok(r) if args.json => match serde_json::to_string(&r) {
            Ok(json) => {
                print_out(&format!("{json}\n"));
                exit::OK
            }
            Err(e) => internal_error(&format!("cannot serialise the bench report: {e}")),
        },
        Ok(r) => {
            print_out(&crate::bench::human(&r));
            exit::OK
        }
        Err(e) => run_error(e),
    }
}

fn dump(args: &DumpArgs, color: bool) -> i32 {
    match args.stage {
        Stage::Ast => dump_ast(args, color),
        Stage::Checked => dump_checked(args, color),
        Stage::Graph | Stage::Grad | Stage::Plan | Stage::Clif => dump_graph(args, color),
    }
}

/// Parses only: the tree is what the parser made, before any checking.
fn dump_ast(args: &DumpArgs, color: bool) -> i32 {
    let mut fe = Frontend::default();
    let name = args.file.display().to_string();
    let text = match pipeline::read_source(&args.file) {
        Ok(text) => text,
        Err(e) => {
            fe.diags.push(Diag::new(None, DiagKind::Load(e)));
            print_err(&render::human(&fe, stderr_width(), color));
            return exit::USER;
        }
    };
    let parsed = cnnc_grammar::parse(&text);
    let id = fe
        .sources
        .add(name, std::fs::canonicalize(&args.file).ok(), text);
    fe.diags.extend(
        parsed
            .errors
            .into_iter()
            .map(|e| Diag::new(Some(id), DiagKind::Syntax(e))),
    );
    if !fe.diags.is_empty() {
        print_err(&render::human(&fe, stderr_width(), color));
        return exit::USER;
    }
    print_out(&cnnc_grammar::pretty::ast(&parsed.file));
    exit::OK
}

/// The training graph at the file's batch size: before autodiff (`graph`) or
/// after it (`grad`).
fn dump_graph(args: &DumpArgs, color: bool) -> i32 {
    use cnnc_compiler::checked::Loss;
    use cnnc_compiler::ir::{lower, text};
    let fe = pipeline::check_paths(std::slice::from_ref(&args.file));
    print_err(&render::human(&fe, stderr_width(), color));
    if fe.has_errors() {
        return exit::USER;
    }
    let Some(checked) = fe.files.first().and_then(|f| f.checked.as_ref()) else {
        return internal_error("the check stage gave no result and no error");
    };
    let Some(model) = &checked.model else {
        print_err(&format!(
            "error: `{}` has no model to lower\n",
            args.file.display()
        ));
        return exit::USER;
    };
    let (batch, smoothing) = match &checked.train {
        Some(t) => {
            let Loss::CrossEntropy { smoothing } = t.loss;
            (t.batch as usize, smoothing)
        }
        None => (cnnc_compiler::summary::DEFAULT_BATCH as usize, 0.0),
    };
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| usize::try_from(t).unwrap_or(1),
    );
    let g = match args.stage {
        Stage::Graph => lower::loss_graph(model, batch, smoothing),
        _ => lower::train_graph(model, batch, smoothing),
    };
    match args.stage {
        Stage::Plan => print_out(&cnnc_compiler::codegen::plan::Plan::new(&g, threads).dump()),
        Stage::Clif => match clif_executable(&g, threads, args.checked) {
            Ok(exe) => print_out(&exe.jit().dump_clif()),
            Err(e) => return internal_error(&format!("compiling the training graph: {e}")),
        },
        _ => print_out(&text::print(&g)),
    }
    exit::OK
}

/// The executable whose kernels `dump --stage clif` prints.
fn clif_executable(
    g: &cnnc_compiler::ir::Graph,
    threads: usize,
    checked: bool,
) -> Result<cnnc_compiler::codegen::exec::Executable, String> {
    use cnnc_compiler::codegen::exec::{ExecOptions, Executable, ThreadPool};
    let opts = ExecOptions {
        checked,
        ..ExecOptions::default()
    };
    Executable::with_options(g, &ThreadPool::new(threads)?, &opts)
}

fn dump_checked(args: &DumpArgs, color: bool) -> i32 {
    let fe = pipeline::check_paths(std::slice::from_ref(&args.file));
    print_err(&render::human(&fe, stderr_width(), color));
    if fe.has_errors() {
        return exit::USER;
    }
    let Some(checked) = fe.files.first().and_then(|f| f.checked.as_ref()) else {
        return internal_error(&format!(
            "the check stage gave no result and no error for `{}`",
            args.file.display()
        ));
    };
    match serde_json::to_string_pretty(checked) {
        Ok(json) => {
            print_out(&json);
            print_out("\n");
            exit::OK
        }
        Err(e) => internal_error(&format!("cannot serialise the checked model: {e}")),
    }
}

fn explain_code(args: &ExplainCodeArgs) -> i32 {
    if args.list {
        let width = codes::ALL.iter().map(|c| c.code.len()).max().unwrap_or(0);
        let mut text = String::new();
        for c in codes::ALL {
            text.push_str(&format!("{:width$}  {}\n", c.code, c.title));
        }
        print_out(&text);
        return exit::OK;
    }
    let wanted = args.code.as_deref().unwrap_or_default();
    if let Some(c) = codes::find(wanted) {
        print_out(&codes::explain(c));
        return exit::OK;
    }
    let mut msg = format!("error: unknown code `{wanted}`\n");
    match codes::suggest(wanted) {
        Some(c) => msg.push_str(&format!("help: did you mean `{}`? ({})\n", c.code, c.title)),
        None => msg.push_str("help: `cnnc explain-code --list` lists every code\n"),
    }
    print_err(&msg);
    exit::USER
}

/// The message a panic would print, for an inconsistency found without one.
fn internal_error(msg: &str) -> i32 {
    print_err(&internal_error_text(msg));
    exit::INTERNAL
}

/// `error: internal error: …` plus the note asking for a report; the panic hook
/// prints the same text.
pub fn internal_error_text(msg: &str) -> String {
    format!(
        "error: internal error: {msg}\n\
         note: this is a bug in cnnc; please report it with the file that caused it\n"
    )
}

/// Whether to colour what goes to stderr.
pub fn use_color(choice: Color) -> bool {
    match choice {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => {
            // https://no-color.org: set and non-empty disables colour.
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            std::io::stderr().is_terminal() && !no_color
        }
    }
}

/// Columns to wrap diagnostics at: the terminal's width, else `$COLUMNS`, else 100.
pub(crate) fn stderr_width() -> usize {
    let stderr = std::io::stderr();
    if stderr.is_terminal() {
        if let Some((terminal_size::Width(w), _)) = terminal_size::terminal_size_of(&stderr) {
            return usize::from(w).max(40);
        }
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .filter(|w| *w >= 40)
        .unwrap_or(100)
}

/// Writes to stdout. A closed pipe (`cnnc … | head -1`) ends the output quietly.
fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn print_err(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes()).and_then(|()| err.flush());
}
