//! Throughput per parser on generated, realistic lines.
//!
//! `cargo bench -p redtail-parsers --bench parsers`; criterion reports
//! lines/s ("elem/s"); MB/s is lines/s times the average line length printed
//! at start-up.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use redtail_parsers::{Fields, ParserSpec};

const N: usize = 1000;

fn lines(name: &str) -> Vec<String> {
    (0..N)
        .map(|i| {
            let ip = format!("198.51.{}.{}", i % 250, (i * 7) % 250);
            match name {
                "raw" => format!("plain text log line number {i} with some words in it"),
                "json" => format!(
                    r#"{{"@timestamp":"2024-01-02T03:04:{:02}.123Z","log":{{"level":"info","logger":"http"}},"message":"request completed","http":{{"method":"GET","status":200}},"client":"{ip}","duration_ms":{}.5,"tags":["a","b"]}}"#,
                    i % 60,
                    i % 900
                ),
                "logfmt" => format!(
                    r#"time=2024-01-02T03:04:{:02}Z level=info msg="request completed" method=GET path=/api/v1/items/{i} status=200 client={ip} duration={}ms"#,
                    i % 60,
                    i % 900
                ),
                "syslog" => if i % 2 == 0 {
                    format!("<38>Jan  2 03:04:{:02} web01 sshd[{}]: Accepted publickey for deploy from {ip} port {} ssh2", i % 60, 1000 + i, 40000 + i)
                } else {
                    format!(r#"<165>1 2024-01-02T03:04:{:02}.003Z web01 app {i} ID47 [meta@32473 client="{ip}" n="{i}"] request completed"#, i % 60)
                },
                "nginx" | "apache" => format!(
                    r#"{ip} - - [02/Jan/2024:03:04:{:02} +0000] "GET /api/v1/items/{i}?page=2 HTTP/1.1" 200 {} "https://example.com/items" "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0""#,
                    i % 60,
                    1000 + i
                ),
                "nginx_error" => format!(
                    r#"2024/01/02 03:04:{:02} [error] 812#812: *{i} open() "/usr/share/nginx/html/x{i}" failed (2: No such file or directory), client: {ip}, server: _, request: "GET /x{i} HTTP/1.1", host: "example.com""#,
                    i % 60
                ),
                "iptables" => format!(
                    "Jan  2 03:04:{:02} fw01 kernel: [ 8123.456789] [UFW BLOCK] IN=eth0 OUT= MAC=52:54:00:12:34:56:52:54:00:ab:cd:ef:08:00 SRC={ip} DST=192.0.2.1 LEN=60 TOS=0x00 PREC=0x00 TTL=51 ID={i} DF PROTO=TCP SPT={} DPT=22 WINDOW=64240 RES=0x00 SYN URGP=0",
                    i % 60,
                    40000 + i
                ),
                "regex" => format!("{ip} INFO [auth] user{i} logged in from the web console"),
                _ => unreachable!(),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .throughput(Throughput::Elements(N as u64));
    for name in ParserSpec::NAMES {
        let pattern = (*name == "regex")
            .then_some(r"^(?P<client>\S+) (?P<level>[A-Z]+) \[(?P<module>[^\]]+)\] (?P<text>.*)$");
        let spec = ParserSpec::from_config(name, pattern).unwrap();
        let input = lines(name);
        let avg = input.iter().map(|l| l.len() + 1).sum::<usize>() as f64 / N as f64;
        eprintln!("{name}: average line length {avg:.1} bytes (incl. newline)");
        let mut parser = spec.build();
        let mut fields = Fields::with_capacity(32);
        for l in &input {
            fields.clear();
            parser.parse(l, &mut fields).expect(l);
        }
        group.bench_function(*name, |b| {
            b.iter(|| {
                for l in &input {
                    fields.clear();
                    let r = parser.parse(black_box(l), &mut fields);
                    black_box(&r);
                    black_box(fields.len());
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
