//! One test per grammar rule: source in, the AST as text out (expect-test;
//! `UPDATE_EXPECT=1` re-blesses). Errors are listed after the tree.

use cnnc_grammar::{parse, pretty};
use expect_test::{expect, Expect};

fn check(src: &str, expected: Expect) {
    let parsed = parse(src);
    let mut out = pretty::ast(&parsed.file);
    for e in &parsed.errors {
        let span = e.span();
        out.push_str(&format!(
            "error @{}..{}: {e}\n",
            span.offset(),
            span.offset() + span.len()
        ));
    }
    expected.assert_eq(&out);
}

/// Wraps a value in a train section, so value rules can be tested one by one.
fn setting(value: &str, expected: Expect) {
    check(&format!("train {{ x = {value} }}"), expected);
}

#[test]
fn integers_in_every_form() {
    setting(
        "[42, -3, +1, 1_000, 0x1F, 0b101, 0o17, 0]",
        expect![[r#"
        train @0..55
          set x = [42, -3, 1, 1000, 31, 5, 15, 0] @8..53
    "#]],
    );
}

#[test]
fn floats_in_every_form() {
    setting(
        "[0.5, .5, 5., 1e-3, 2.5E+3, -0.25, 1_000.5]",
        expect![[r#"
        train @0..57
          set x = [0.5, 0.5, 5.0, 0.001, 2500.0, -0.25, 1000.5] @8..55
    "#]],
    );
}

#[test]
fn numbers_out_of_range() {
    setting(
        "[99999999999999999999, 1e400]",
        expect![[r#"
        train @0..43
          set x = [0, 0.0] @8..41
        error @13..33: integer literal `99999999999999999999` is too large
        error @35..40: number literal `1e400` is too large
    "#]],
    );
}

#[test]
fn strings_and_escapes() {
    setting(
        r#"["a\"b", "c\\d", "tab\there", "bad\q"]"#,
        expect![[r#"
        train @0..52
          set x = ["a\"b", "c\\d", "tab\there", "bad"] @8..50
        error @46..48: unknown escape `\q` in string
    "#]],
    );
}

#[test]
fn booleans_names_and_calls() {
    setting(
        "f(true, false, same, input, g(h=1), k=[1, 2])",
        expect![[r#"
        train @0..59
          set x = f(true, false, same, input, g(h=1), k=[1, 2]) @8..57
    "#]],
    );
}

#[test]
fn lists_span_lines_and_allow_trailing_commas() {
    setting(
        "[\n  [-1, 2, -1],\n  [-1, 2, -1], # comment\n]",
        expect![[r#"
        train @0..57
          set x = [[-1, 2, -1], [-1, 2, -1]] @8..55
    "#]],
    );
}

#[test]
fn comments_of_all_kinds() {
    check(
        "# hash\n// slashes\nmodel /* inline */ M { # after\n  relu // end\n}\n",
        expect![[r#"
            model M @18..64
              layer relu @51..55
        "#]],
    );
}

#[test]
fn import_item() {
    check(
        r#"import "std/blocks.cnn""#,
        expect![[r#"
        import "std/blocks.cnn" @0..23
    "#]],
    );
}

#[test]
fn block_with_parameters_and_defaults() {
    check(
        "block b(out, kernel=3, stride=1,) {\n  conv(out, kernel=kernel)\n}",
        expect![[r#"
            block b @0..64
              param out @8..11
              param kernel=3 @13..21
              param stride=1 @23..31
              layer conv @38..62
                arg out @43..46
                arg kernel=kernel @48..61
        "#]],
    );
}

#[test]
fn layer_statement_forms() {
    check(
        "model M {\n  input image: [1, 28, 28]\n  relu\n  batchnorm bn\n  maxpool(2)\n  conv c1(16, kernel=3)\n  frozen conv v(1) from image\n  add(c1, input)\n}",
        expect![[r#"
            model M @0..144
              input image: [1, 28, 28] @12..36
              layer relu @39..43
              layer batchnorm bn @46..58
              layer maxpool @61..71
                arg 2 @69..70
              layer conv c1 @74..95
                arg 16 @82..84
                arg kernel=3 @86..94
              layer frozen conv v @98..125
                arg 1 @112..113
                from image @120..125
              layer add @128..142
                arg c1 @132..134
                arg input @136..141
        "#]],
    );
}

#[test]
fn statements_separated_by_semicolons() {
    check(
        "model M { relu; tanh; sigmoid }",
        expect![[r#"
            model M @0..31
              layer relu @10..14
              layer tanh @16..20
              layer sigmoid @22..29
        "#]],
    );
}

#[test]
fn arguments_span_lines() {
    check(
        "model M {\n  conv c(\n    16,\n    kernel = 3,\n  )\n}",
        expect![[r#"
            model M @0..49
              layer conv c @12..47
                arg 16 @24..26
                arg kernel=3 @32..42
        "#]],
    );
}

#[test]
fn repeat_nests() {
    check(
        "model M {\n  repeat 2 {\n    repeat n { relu }\n  }\n}",
        expect![[r#"
            model M @0..50
              repeat 2 @12..48
                repeat n @27..44
                  layer relu @38..42
        "#]],
    );
}

#[test]
fn train_section() {
    check(
        "train {\n  data = mnist(\"d\")\n  augment = [random_crop(28, pad=2), hflip]\n  batch = 64; epochs = 5\n}",
        expect![[r#"
            train @0..98
              set data = mnist("d") @10..27
              set augment = [random_crop(28, pad=2), hflip] @30..71
              set batch = 64 @74..84
              set epochs = 5 @86..96
        "#]],
    );
}

#[test]
fn explain_directives_with_clauses_in_any_order() {
    check(
        "explain {\n  saliency on test[0..16] class=predicted -> \"s\"\n  cam layer=f -> \"c\" on train[1, 5, 9,]\n  smoothgrad(samples=8)\n  gradcam on test\n}",
        expect![[r#"
            explain @0..142
              directive saliency @12..58
                on test[0..16] @21..35
                option class=predicted @36..51
                -> "s" @55..58
              directive cam @61..98
                option layer=f @65..72
                -> "c" @76..79
                on train[1, 5, 9] @80..98
              directive smoothgrad @101..122
                arg samples=8 @112..121
              directive gradcam @125..140
                on test @133..140
        "#]],
    );
}

#[test]
fn example_item() {
    check(
        "example conv_bn_relu(32, stride=2) on [16, 28, 28]",
        expect![[r#"
            example conv_bn_relu(32, stride=2) on [16, 28, 28] @0..50
        "#]],
    );
}

#[test]
fn keywords_are_not_names() {
    check(
        "model M { conv from(3) }",
        expect![[r#"
        model M @0..24
        error @19..20: unexpected `(`
    "#]],
    );
}

#[test]
fn every_broken_statement_is_reported_and_the_rest_is_read() {
    check(
        "model M {\n  conv(16,,3)\n  relu\n  linear(10\n}\nmodle X { relu }\ntrain {\n  lr 0.1\n  epochs = 3\n}\n",
        expect![[r#"
            model M @0..44
              layer relu @26..30
            train @62..93
              set epochs = 3 @81..91
            error @20..21: unexpected `,`
            error @43..44: unexpected `}`
            error @45..50: unexpected `modle`
            error @75..78: unexpected `0.1`
        "#]],
    );
}

#[test]
fn unclosed_brace_at_end_of_file() {
    check(
        "model M {\n  relu\n",
        expect![[r#"
        error @17..17: unexpected end of file
    "#]],
    );
}

#[test]
fn empty_and_blank_files() {
    check("", expect![[""]]);
    check("\n\n  # only a comment\n", expect![[""]]);
}

#[test]
fn brackets_in_comments_do_not_count_towards_the_nesting_limit() {
    let deep = "(".repeat(250);
    let src = format!("/* {deep} */\n# {deep}\n// {deep}\nmodel M {{ relu }}\n");
    let parsed = parse(&src);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let too_deep = format!("train {{ x = {}1{} }}", "[".repeat(201), "]".repeat(201));
    let parsed = parse(&too_deep);
    assert!(
        matches!(
            parsed.errors.as_slice(),
            [cnnc_grammar::SyntaxError::TooDeep { .. }]
        ),
        "{:?}",
        parsed.errors
    );
}
