#![no_main]

#[macro_use]
mod common;

use redtail_parsers::ParserSpec;

parser_target!(ParserSpec::Regex(
    r#"^(?P<client>\S+) (?P<level>[A-Z]+)(?: \[(?P<module>[^\]]+)\])? (?P<text>.*)$"#.to_string()
));
