#![no_main]

#[macro_use]
mod common;

use redtail_parsers::ParserSpec;

parser_target!(ParserSpec::Nginx);
