//! Debug helper: prints the AST and syntax errors of a file.
fn main() {
    let path = std::env::args().nth(1).expect("usage: parse_dump FILE");
    let src = std::fs::read_to_string(path).unwrap();
    let p = cnnc_grammar::parse(&src);
    println!("{:#?}", p.file);
    for e in &p.errors {
        println!("{e:?}");
    }
}
