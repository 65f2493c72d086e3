//! The value checks the examples' command lines share (`examples/common`): what they accept, and
//! that a refusal says what was expected.

#[path = "../examples/common/mod.rs"]
mod cli;

#[test]
fn value_parsers_accept_and_refuse() {
    type Check = fn(&str) -> Result<f64, String>;
    fn usize_as_f64(s: &str) -> Result<f64, String> {
        cli::positive_usize(s).map(|v| v as f64)
    }
    let positive_usize: &Check = &(usize_as_f64 as Check);
    let cases: [(&str, &Check, &str, Result<f64, &str>); 12] = [
        ("usize", positive_usize, "3", Ok(3.0)),
        ("usize", positive_usize, "0", Err("at least 1")),
        ("usize", positive_usize, "-2", Err("integer >= 1")),
        ("usize", positive_usize, "1.5", Err("integer >= 1")),
        ("f64", &(cli::positive_f64 as Check), "2e-3", Ok(2e-3)),
        ("f64", &(cli::positive_f64 as Check), "0", Err("> 0")),
        ("f64", &(cli::positive_f64 as Check), "inf", Err("> 0")),
        ("f64", &(cli::positive_f64 as Check), "NaN", Err("> 0")),
        ("f64", &(cli::positive_f64 as Check), "abc", Err("> 0")),
        ("unit", &(cli::unit_f64 as Check), "0.7", Ok(0.7)),
        ("unit", &(cli::unit_f64 as Check), "1.5", Err("[0, 1]")),
        ("unit", &(cli::unit_f64 as Check), "x", Err("[0, 1]")),
    ];
    for (what, parse, input, want) in cases {
        match (parse(input), want) {
            (Ok(got), Ok(w)) => assert_eq!(got, w, "{what} {input}"),
            (Err(msg), Err(w)) => assert!(msg.contains(w), "{what} {input}: {msg:?} lacks {w:?}"),
            (got, w) => panic!("{what} {input}: got {got:?}, expected {w:?}"),
        }
    }
}

#[test]
fn the_examples_default_data_is_the_committed_copy() {
    assert!(cli::repo_data("mnist")
        .join("train-images.idx3-ubyte.gz")
        .is_file());
    assert!(cli::repo_data("shakespeare/shakespeare.txt.gz").is_file());
}
