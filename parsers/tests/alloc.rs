//! The hot paths do not allocate: fields borrow from the line and errors are
//! plain values. Counted with a thread-local counting allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use redtail_parsers::{Fields, ParserSpec};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCS.with(Cell::get);
    f();
    ALLOCS.with(Cell::get) - before
}

#[test]
fn parsing_common_lines_does_not_allocate() {
    // the counter works: an owned key for a nested JSON object allocates
    let mut f = Fields::new();
    let mut json = ParserSpec::Json.build();
    assert!(allocations(|| json.parse(r#"{"a":{"b":1}}"#, &mut f).unwrap()) > 0);
    let cases = [
        (ParserSpec::Nginx, r#"203.0.113.7 - bob [02/Jan/2024:03:04:05 +0000] "GET /index.html HTTP/1.1" 200 6120 "https://example.com/" "Mozilla/5.0 (X11; Linux x86_64)""#),
        (ParserSpec::Apache, r#"127.0.0.1 - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.0" 200 2326"#),
        (ParserSpec::Logfmt, r#"level=info msg="request done" status=200 dry_run"#),
        (ParserSpec::Json, r#"{"level":"info","msg":"hello","n":1,"ok":true,"tags":["a","b"]}"#),
        (ParserSpec::Syslog, "<34>Oct 11 22:14:15 mymachine su[12]: 'su root' failed"),
        (ParserSpec::Syslog, "<165>1 2003-10-11T22:14:15.003Z host app 1 ID47 - msg"),
        (ParserSpec::NginxError, r#"2024/01/02 03:04:05 [error] 1#2: *3 failed, client: 1.2.3.4, server: _, request: "GET / HTTP/1.1", host: "h""#),
        (ParserSpec::Iptables, "Jan  2 03:04:05 fw kernel: [ 1.5] [UFW BLOCK] IN=eth0 OUT= MAC=52:54:00:12:34:56:52:54:00:ab:cd:ef:08:00 SRC=1.2.3.4 DST=5.6.7.8 LEN=60 TOS=0x00 TTL=51 ID=1 DF PROTO=TCP SPT=1 DPT=22 WINDOW=1 RES=0x00 SYN URGP=0"),
        (ParserSpec::Regex("(?P<a>\\w+) (?P<b>\\w+)".into()), "hello world"),
    ];
    for (spec, line) in cases {
        let mut parser = spec.build();
        let mut fields = Fields::with_capacity(64);
        parser.parse(line, &mut fields).unwrap(); // warm-up (regex caches)
        fields.clear();
        let n = allocations(|| parser.parse(line, &mut fields).unwrap());
        assert_eq!(n, 0, "{} allocated {n} times for {line}", spec.name());
        assert!(!fields.is_empty());
    }
}

#[test]
fn errors_do_not_allocate() {
    let cases = [
        (
            ParserSpec::Nginx,
            "1.2.3.4 - - [02/Jan/2024:03:04:05 +0000] GET",
        ),
        (ParserSpec::Json, "{\"a\":"),
        (ParserSpec::Logfmt, "a=\"unterminated"),
        (ParserSpec::Syslog, "not syslog"),
        (ParserSpec::NginxError, "2024/01/02 03:04:05 [error] x"),
        (ParserSpec::Iptables, "no netfilter here"),
        (ParserSpec::Regex("(?P<a>\\d+)".into()), "no digits"),
    ];
    for (spec, line) in cases {
        let mut parser = spec.build();
        let mut fields = Fields::with_capacity(64);
        let _ = parser.parse(line, &mut fields);
        fields.clear();
        let n = allocations(|| {
            let e = parser.parse(line, &mut fields).unwrap_err();
            std::hint::black_box(e);
        });
        assert_eq!(n, 0, "{} allocated {n} times for {line}", spec.name());
    }
}
